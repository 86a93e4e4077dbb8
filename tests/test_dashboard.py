"""The dashboard end to end in a real headless Chromium: simulator DLRs in, numbers on screen."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy import Engine

from app.config import Settings
from app.notifications import STATUS_EXTENDED_MEANING

from .test_send_integration import Stack, stack_for

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "Chromium is needed: apt-get install chromium (make test does)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def campaign(settings: Settings, engine: Engine) -> Iterator[Stack]:
    gen = stack_for(settings, undelivered_rate=0.4, seen_rate=0.6, reply_rate=0.5,
                    duplicate_rate=0.2)
    stack = next(gen)
    try:
        phones = [f"7903{i:07d}" for i in range(30)]
        r = stack.api.post("/api/v1/messages", json={"phone": phones, "txt": "Весенняя акция",
                                                     "p_transaction_id": "spring"})
        assert r.status_code == 200, r.text
        stack.wait_for_dlrs()
        yield stack
    finally:
        gen.close()


def bar_number(page: Page, card: str, key: str) -> int:
    text = page.locator(f"#{card} .bar[data-key='{key}'] .num b").inner_text()
    return int(text.replace(",", ""))


def test_dashboard_shows_the_campaign(browser: Browser, campaign: Stack) -> None:
    stats = campaign.api.get("/api/v1/stats", params={"p_transaction_id": "spring"}).json()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{campaign.api.base_url}/dashboard")
        page.fill("#campaign", "spring")
        page.click("#apply")
        expect(page.locator("#funnel-total")).to_have_text(f"{stats['funnel']['sent']} messages")
        for key in ("sent", "delivered", "seen", "replied"):
            assert bar_number(page, "funnel", key) == stats["funnel"][key], key
        assert stats["funnel"]["sent"] == 30 and stats["by_status_extended"]
        for code, n in stats["by_status_extended"].items():
            assert bar_number(page, "failures", code) == n
            # The provider document's meaning of each code is shown beside it.
            row = page.locator("#failures table tr", has_text=code)
            expect(row).to_contain_text(STATUS_EXTENDED_MEANING[code])

        # A reply arriving now shows up without reloading.
        msg_id = next(iter(campaign.api.get("/api/v1/messages", params={
            "p_transaction_id": "spring", "limit": 1}).json()["items"]))["msg_id"]
        text = f"Новый ответ {uuid.uuid4().hex[:6]}"
        assert campaign.api.post("/dlr", data={"type": "reply", "msg_id": msg_id,
                                               "text": text}).status_code == 200
        expect(page.locator("#replies")).to_contain_text(text, timeout=10_000)

        # Find the message and see its timeline.
        page.fill("#find", msg_id)
        page.click("#find-form button")
        expect(page.locator("#timeline-msg")).to_contain_text(msg_id)
        expect(page.locator("#timeline-msg")).to_contain_text(text)
        expect(page.locator("#db-status")).to_have_text("reachable")
        expect(page.locator("#activity rect").first).to_be_attached()
        ARTIFACTS.mkdir(exist_ok=True)
        time.sleep(0.3)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    finally:
        page.close()


def test_dashboard_is_authorised_like_the_api(campaign: Stack) -> None:
    import httpx

    from app.main import create_app
    from tests.helpers import make_settings

    from .server import serving_in_thread

    app = create_app(make_settings(database_url=campaign.settings.database_url,
                                   api_keys="dash-key"))
    with serving_in_thread(app) as url:
        assert httpx.get(f"{url}/dashboard").status_code == 401
        r = httpx.get(f"{url}/dashboard", headers={"X-API-Key": "dash-key"})
        assert r.status_code == 200 and "Funnel" in r.text
        assert "VIBER_USER_NOT_FOUND" in r.text  # the meanings are in the page
