"""The dashboard: end to end in a real headless Chromium (simulator DLRs in, numbers on
screen), its sign-in with an API key, and what a browser without access is told."""

from __future__ import annotations

import base64
import hashlib
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import httpx
import pytest
from itsdangerous import TimestampSigner
from playwright.sync_api import Browser, Page, expect
from sqlalchemy import Engine

from app.config import Settings
from app.core.notifications import STATUS_EXTENDED_MEANING
from app.main import create_app
from app.simulator.provider import EmitterSettings, ProviderSimulator
from app.web.security import SESSION_COOKIE, new_session

from ..helpers import AppFactory, client_for, free_port, make_settings, serving_in_thread

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
USER, SECRET = "partner", "s3cret-key"
KEY = "dash-key-7f3a9c1e5b"
REMOTE = "203.0.113.7"  # a browser that is not on the server's machine
HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


@dataclass
class Stack:
    """The receiver on a real port, fed by the provider simulator's DLRs."""

    sim: ProviderSimulator
    api: httpx.Client

    def wait_for_dlrs(self) -> None:
        deadline = time.monotonic() + 30
        while self.sim.emitter.busy or self.sim.emitter.counters.attempts == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"DLRs still pending: {self.sim.emitter.counters}")
            time.sleep(0.05)


@contextmanager
def receiver_with_simulator(settings: Settings, api_keys: str | None = None,
                            **emitter: Any) -> Iterator[Stack]:
    sim = ProviderSimulator(user=USER, secret_key=SECRET)
    port = free_port()
    sim.emitter.settings = EmitterSettings(
        callback_url=f"http://127.0.0.1:{port}/dlr", rate=0, seed=7, time_scale=0.0001,
        **emitter)
    with serving_in_thread(sim.app()) as sim_url:
        app_settings = make_settings(
            database_url=settings.database_url, bulk_url=f"{sim_url}/",
            media_url=f"{sim_url}/upload/", bulk_user=USER, bulk_secret_key=SECRET,
            bulk_from="Shop", send_backoff=0.01, send_timeout=2, api_keys=api_keys)
        headers = {"X-API-Key": api_keys.split(",")[0]} if api_keys else {}
        with serving_in_thread(create_app(app_settings), port=port) as url, \
                httpx.Client(base_url=url, timeout=10, headers=headers) as api:
            yield Stack(sim, api)


def send_campaign(stack: Stack, name: str = "spring", messages: int = 30) -> None:
    phones = [f"79{len(name):02d}{i:07d}" for i in range(messages)]
    r = stack.api.post("/api/v1/messages", json={"phone": phones, "txt": "Весенняя акция",
                                                 "p_transaction_id": name, "campaign": name})
    assert r.status_code == 200, r.text
    stack.wait_for_dlrs()


@pytest.fixture
def campaign(settings: Settings, engine: Engine) -> Iterator[Stack]:
    with receiver_with_simulator(settings, undelivered_rate=0.4, seen_rate=0.6,
                                 reply_rate=0.5, duplicate_rate=0.2) as stack:
        send_campaign(stack, "autumn", 6)  # another campaign, which the filter must leave out
        send_campaign(stack)
        yield stack


def bar_number(page: Page, card: str, key: str) -> int:
    text = page.locator(f"#{card} .bar[data-key='{key}'] .num b").inner_text()
    return int(text.replace(",", ""))


def lines_of(page: Page, selector: str) -> list[int]:
    """How many lines each matching cell's text takes on screen."""
    return page.evaluate("""(sel) => [...document.querySelectorAll(sel)].map((el) => {
        const r = document.createRange(); r.selectNodeContents(el);
        return new Set([...r.getClientRects()].map((b) => Math.round(b.top))).size; })""",
                         selector)


@pytest.mark.slow
def test_dashboard_shows_the_campaign(browser: Browser, campaign: Stack) -> None:
    stats = campaign.api.get("/api/v1/stats", params={"campaign": "spring"}).json()
    assert stats["rejected"] == 0
    # A narrow window: two columns of cards, where long cells would wrap.
    page = browser.new_page(viewport={"width": 960, "height": 1000})
    try:
        page.goto(f"{campaign.api.base_url}/dashboard")
        # Every campaign is listed, the most recently active first; choosing one applies it
        # to every card.
        expect(page.locator("#campaigns tr[data-campaign]")).to_have_count(2)
        assert page.locator("#campaigns tr[data-campaign]").first.get_attribute(
            "data-campaign") == "spring"
        everyone = campaign.api.get("/api/v1/stats").json()
        expect(page.locator("#funnel-total")).to_have_text(
            f"{everyone['funnel']['sent']} messages")
        page.click("#campaigns a[data-pick='spring']")
        expect(page.locator("#campaign")).to_have_value("spring")
        expect(page.locator("#funnel-total")).to_have_text(f"{stats['funnel']['sent']} messages")
        shown = campaign.api.get("/api/v1/replies", params={"campaign": "spring",
                                                            "limit": 10}).json()["items"]
        expect(page.locator("#replies tr[data-msg]")).to_have_count(len(shown))
        assert {m["campaign"] for m in shown} == {"spring"}
        for key in ("sent", "delivered", "seen", "replied"):
            assert bar_number(page, "funnel", key) == stats["funnel"][key], key
        assert stats["funnel"]["sent"] == 30 and stats["by_status_extended"]
        for code, n in stats["by_status_extended"].items():
            assert bar_number(page, "failures", code) == n
            # The provider document's meaning of each code is shown beside it.
            row = page.locator("#failures table tr", has_text=code)
            expect(row).to_contain_text(STATUS_EXTENDED_MEANING[code])

        # The activity chart has a time axis: round local times under the bars.
        ticks = page.locator("#activity text.tick")
        expect(ticks.first).to_be_attached()
        labels = ticks.all_text_contents()
        assert len(labels) >= 3 and all(re.fullmatch(r"\d\d:\d\d", t) for t in labels), labels
        expect(page.locator("#activity rect").first).to_be_attached()

        # No callback was rejected: the table says so instead of showing a bare header.
        expect(page.locator("#rejected tr.none")).to_contain_text("None")

        # A reply arriving now shows up without reloading, emoji included.
        msg_id = next(iter(campaign.api.get("/api/v1/messages", params={
            "campaign": "spring", "limit": 1}).json()["items"]))["msg_id"]
        text = f"Новый ответ 👍🎉 {uuid.uuid4().hex[:6]}"
        assert campaign.api.post("/dlr", data={"type": "reply", "msg_id": msg_id,
                                               "text": text}).status_code == 200
        reply = page.locator("#replies td.reply-text", has_text=text)
        expect(reply).to_be_visible(timeout=10_000)
        # Emoji have a colour emoji font to fall back on (no boxes where one is installed).
        assert "Emoji" in reply.evaluate("(el) => getComputedStyle(el).fontFamily")
        # Times stay on one line.
        assert lines_of(page, "#replies td.when") and set(lines_of(page, "#replies td.when")) == {1}

        # Find the message and see its timeline.
        page.fill("#find", msg_id)
        page.click("#find-form button")
        expect(page.locator("#timeline-msg")).to_contain_text(msg_id)
        expect(page.locator("#timeline-msg")).to_contain_text(text)
        assert set(lines_of(page, "#timeline-msg td.when")) == {1}
        expect(page.locator("#db-status")).to_have_text("reachable")
        expect(page.locator("#sign-out")).to_be_hidden()  # nobody signed in: loopback
        ARTIFACTS.mkdir(exist_ok=True)
        time.sleep(0.3)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    finally:
        page.close()


@pytest.mark.slow
def test_sign_in_with_a_key_then_read_only(browser: Browser, settings: Settings,
                                           engine: Engine) -> None:
    with receiver_with_simulator(settings, api_keys=f"other-key,{KEY}", undelivered_rate=0.2,
                                 seen_rate=0.5, reply_rate=0.3) as stack:
        send_campaign(stack)
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        page = context.new_page()
        url = str(stack.api.base_url)
        try:
            answer = page.goto(f"{url}/dashboard")
            assert answer is not None and answer.status == 401
            page.fill("input[name=key]", "not-the-key")
            page.click("button[type=submit]")
            expect(page.locator(".error")).to_contain_text("not one of this server's API keys")
            assert context.cookies() == []

            page.fill("input[name=key]", KEY)
            page.click("button[type=submit]")
            expect(page.locator("#funnel-total")).to_have_text("30 messages")
            expect(page.locator("#sign-out")).to_be_visible()
            [cookie] = context.cookies()
            assert cookie["name"] == SESSION_COOKIE and cookie["httpOnly"]
            assert cookie["sameSite"] == "Strict" and KEY not in cookie["value"]
            assert 11 * 3600 < cookie["expires"] - time.time() <= 12 * 3600
            assert page.evaluate("document.cookie") == ""  # the page's script cannot read it

            # The session reads, and sends nothing.
            status = page.evaluate("""async () => [
                (await fetch('/api/v1/stats')).status,
                (await fetch('/api/v1/messages', {method: 'POST',
                    headers: {'Content-Type': 'application/json'},
                    body: JSON.stringify({phone: ['79031234567'], txt: 'hi'})})).status]""")
            assert status == [200, 401]

            page.click("#sign-out button")
            expect(page.locator("input[name=key]")).to_be_visible()
            assert context.cookies() == []
            assert page.evaluate("async () => (await fetch('/api/v1/stats')).status") == 401
        finally:
            context.close()


def test_dashboard_is_authorised_like_the_api(settings: Settings, engine: Engine) -> None:
    app = create_app(make_settings(database_url=settings.database_url, api_keys=KEY))
    with serving_in_thread(app) as url:
        r = httpx.get(f"{url}/dashboard")
        assert r.status_code == 401 and r.json()["detail"]  # JSON for clients that are not browsers
        r = httpx.get(f"{url}/dashboard", headers={"X-API-Key": KEY})
        assert r.status_code == 200 and "Funnel" in r.text
        assert "VIBER_USER_NOT_FOUND" in r.text  # the meanings are in the page


async def sign_in(client: httpx.AsyncClient, key: str, **headers: str) -> httpx.Response:
    return await client.post("/dashboard/sign-in", data={"key": key},
                             headers=HTML | headers)


def set_cookie(response: httpx.Response) -> str:
    [header] = response.headers.get_list("set-cookie")
    return header


async def test_a_session_opens_reads_of_the_api_and_the_dashboard_only(
        app_with: AppFactory) -> None:
    app = await app_with(api_keys=f"{KEY},second-key", restrict_metrics=True,
                         restrict_docs=True)
    async with client_for(app, peer=REMOTE) as client:
        r = await sign_in(client, KEY)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard"
        header = set_cookie(r)
        attrs = {a.strip().split("=")[0].lower() for a in header.split(";")}
        assert {"httponly", "path", "max-age"} <= attrs and "samesite=strict" in header.lower()
        assert "secure" not in attrs  # plain HTTP: a Secure cookie would never come back
        morsel = SimpleCookie(header)[SESSION_COOKIE]
        assert morsel["max-age"] == "43200" and morsel["path"] == "/"
        assert KEY not in morsel.value

        assert (await client.get("/api/v1/stats")).status_code == 200
        assert (await client.get("/api/v1/messages/nope")).status_code == 404
        # A day ago: the timeline's window is at most 2 days before now.
        since = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
        assert (await client.get("/api/v1/timeline", params={"since": since})
                ).status_code == 200
        page = await client.get("/dashboard", headers=HTML)
        assert page.status_code == 200 and "Funnel" in page.text
        assert "const SIGNED_IN = true;" in page.text
        # Sends, and everything outside /api and the dashboard, still need the key.
        send = await client.post("/api/v1/messages", json={"phone": ["79031234567"],
                                                           "txt": "hi"})
        assert send.status_code == 401
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/openapi.json")).status_code == 401
        # A presented key that is wrong is refused, session or not.
        assert (await client.get("/api/v1/stats", headers={"X-API-Key": "wrong"})
                ).status_code == 401

        out = await client.post("/dashboard/sign-out", headers=HTML)
        assert out.status_code == 303 and 'max-age=0' in set_cookie(out).lower()
        assert (await client.get("/api/v1/stats")).status_code == 401


async def test_sessions_end(app_with: AppFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    app = await app_with(api_keys=KEY)
    stats = "/api/v1/stats"

    async def status_with(cookie: str, on: Any = app) -> int:
        async with client_for(on, peer=REMOTE) as client:
            client.cookies.set(SESSION_COOKIE, cookie)
            return (await client.get(stats)).status_code

    fresh = new_session(KEY)
    assert await status_with(fresh) == 200
    # Tampered with, or signed with something that is not one of the keys.
    assert await status_with(fresh[:-2] + ("AA" if not fresh.endswith("AA") else "BB")) == 401
    assert await status_with(new_session("guessed-key")) == 401
    assert await status_with("") == 401
    # The key was removed from DLR_API_KEYS: its sessions end with it.
    assert await status_with(fresh, await app_with(api_keys="a-new-key")) == 401
    # Older than 12 hours.
    now = int(time.time())
    monkeypatch.setattr(TimestampSigner, "get_timestamp", lambda self: now - 12 * 3600 - 5)
    stale = new_session(KEY)
    monkeypatch.undo()
    assert await status_with(stale) == 401


async def test_sign_in_refuses_wrong_keys_and_odd_requests(app_with: AppFactory) -> None:
    app = await app_with(api_keys=KEY, trusted_proxies="10.0.0.0/8")
    async with client_for(app, peer=REMOTE) as client:
        wrong = await sign_in(client, KEY + "x")
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        assert "That is not one of this server" in wrong.text and 'name="key"' in wrong.text
        assert (await sign_in(client, "")).status_code == 401
        foreign = await sign_in(client, KEY, **{"Sec-Fetch-Site": "cross-site"})
        assert foreign.status_code == 403 and "set-cookie" not in foreign.headers
        huge = await client.post("/dashboard/sign-in", content=b"key=" + b"k" * 10_000,
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert huge.status_code == 400 and "set-cookie" not in huge.headers
        # A form of more fields than a sign-in has is refused the same way (it was a 500).
        many = await client.post("/dashboard/sign-in", content="&".join(
            f"f{i}=v" for i in range(11)).encode() + b"&key=" + KEY.encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert many.status_code == 400 and "set-cookie" not in many.headers
        assert "Secure" not in set_cookie(await sign_in(client, KEY))
    # Behind a trusted TLS proxy, the cookie is sent over HTTPS only.
    async with client_for(app, peer="10.1.2.3") as proxied:
        r = await sign_in(proxied, KEY, **{"X-Forwarded-Proto": "https",
                                           "X-Forwarded-For": REMOTE})
        assert r.status_code == 303 and "Secure" in set_cookie(r)


async def test_without_keys_a_remote_browser_is_told_how_to_get_in(
        app_with: AppFactory) -> None:
    app = await app_with()
    async with client_for(app, peer=REMOTE) as client:
        page = await client.get("/dashboard", headers=HTML)
        assert page.status_code == 403 and page.headers["content-type"].startswith("text/html")
        assert "DLR_API_KEYS" in page.text and "ssh -L" in page.text
        api_client = await client.get("/dashboard")
        assert api_client.status_code == 403 and "loopback" in api_client.json()["detail"]
        # There is nothing to sign in to: the form sends the browser back to the explanation.
        r = await sign_in(client, "anything")
        assert r.status_code == 303 and "set-cookie" not in r.headers
    async with client_for(app) as local:
        assert (await local.get("/dashboard", headers=HTML)).status_code == 200


async def test_with_keys_a_browser_gets_the_sign_in_form(app_with: AppFactory) -> None:
    app = await app_with(api_keys=KEY)
    async with client_for(app) as client:  # loopback too: keys rule when set
        page = await client.get("/dashboard", headers=HTML)
        assert page.status_code == 401
        assert '<form method="post" action="/dashboard/sign-in">' in page.text
        assert "Funnel" not in page.text


# --- headers, layout in a narrow window, the ingest rate ----------------------------------------

def _script_hashes(page_html: str) -> set[str]:
    return {"'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
            for body in re.findall(r"<script>(.*?)</script>", page_html, re.DOTALL)}


def _check_security_headers(r: httpx.Response) -> None:
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    csp = dict(part.strip().split(" ", 1)
               for part in r.headers["content-security-policy"].split(";"))
    assert csp["frame-ancestors"] == "'none'" and csp["default-src"] == "'self'"
    assert csp["connect-src"] == "'self'" and csp["form-action"] == "'self'"
    # Only the page's own inline scripts run: by hash, never 'unsafe-inline'.
    assert "unsafe-inline" not in csp["script-src"]
    assert set(csp["script-src"].split()) == (_script_hashes(r.text) or {"'none'"})


async def test_every_dashboard_page_is_sent_with_security_headers(app_with: AppFactory) -> None:
    app = await app_with()
    async with client_for(app) as local:
        r = await local.get("/dashboard", headers=HTML)
        assert r.status_code == 200 and "<script>" in r.text
        _check_security_headers(r)
    async with client_for(app, peer=REMOTE) as remote:
        r = await remote.get("/dashboard", headers=HTML)
        assert r.status_code == 403
        _check_security_headers(r)
    keyed = await app_with(api_keys=KEY)
    async with client_for(keyed) as client:
        r = await client.get("/dashboard", headers=HTML)
        assert r.status_code == 401 and "sign-in" in r.text
        _check_security_headers(r)
        r = await client.post("/dashboard/sign-in", data={"key": "wrong"})
        assert r.status_code == 401
        _check_security_headers(r)


@pytest.mark.slow
def test_cards_keep_their_content_inside_and_the_rate_follows_a_burst(
        browser: Browser, settings: Settings, engine: Engine) -> None:
    app = create_app(make_settings(database_url=settings.database_url))
    with serving_in_thread(app) as url, httpx.Client(base_url=url, timeout=10) as api:
        # Rejected callbacks with long unbroken raw content, and a burst of callbacks now.
        for i in range(5):
            assert api.get("/dlr", params={"type": "bogus" + "x" * 80, "msg_id": f"r{i}" * 30,
                                           "p_transaction_id": "y" * 90}).status_code == 200
        for i in range(40):
            assert api.get("/dlr", params={"type": "delivery", "msg_id": f"burst-{i}",
                                           "status": "delivered"}).status_code == 200
        long_url = "https://hooks.example.com/" + "averyveryverylongpathsegment" * 4
        r = api.post("/api/v1/endpoints", json={
            "url": long_url, "events": ["message.status", "message.reply"]})
        assert r.status_code == 201, r.text
        page = browser.new_page(viewport={"width": 960, "height": 1000})
        violations: list[str] = []
        page.on("console", lambda m: violations.append(m.text)
                if "Content Security Policy" in m.text else None)
        try:
            page.goto(f"{url}/dashboard")
            expect(page.locator("#rejected tr").first).to_contain_text("type")
            expect(page.locator("#endpoints .ep-url")).to_have_count(1)
            # The rejected table stays inside the Health card.
            card = page.locator("#health-card").bounding_box()
            table = page.locator("#rejected-table").bounding_box()
            holder = page.locator("#health-card .contain").bounding_box()
            assert card and table and holder
            assert holder["x"] + holder["width"] <= card["x"] + card["width"] + 0.5
            assert table["x"] + table["width"] <= card["x"] + card["width"] + 0.5
            assert set(lines_of(page, "#rejected td.when")) == {1}
            # Endpoints: the URL is one line (whole in its title), event names never break.
            ep_url = page.locator("#endpoints .ep-url")
            assert ep_url.get_attribute("title") == long_url
            assert set(lines_of(page, "#endpoints .ep-url")) == {1}
            assert set(lines_of(page, "#endpoints .nw")) == {1}
            ep_card = page.locator("#endpoints-card").bounding_box()
            ep_table = page.locator("#endpoints-table").bounding_box()
            assert ep_card and ep_table
            assert ep_table["x"] + ep_table["width"] <= ep_card["x"] + ep_card["width"] + 0.5
            # Right after the burst the rate is not 0.
            rate = page.locator("#ingest-rate")
            expect(rate).to_contain_text("callbacks/s")
            assert float(rate.inner_text().split()[0]) > 0
            assert not violations, violations
        finally:
            page.close()
