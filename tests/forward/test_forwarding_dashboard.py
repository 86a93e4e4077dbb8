"""The dashboard's Endpoints panel in a real headless Chromium: success rate, backlog, last
error, and the replay button (which queues the window's events again)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from playwright.sync_api import Browser, expect
from sqlalchemy import Engine, select, update

from app.config import Settings
from app.forward.queue import Outcome, record
from app.main import create_app
from app.store.models import Delivery

from ..helpers import add_endpoint, emit, make_settings, serving_in_thread, status_event

pytestmark = pytest.mark.slow


def test_endpoints_panel_shows_health_and_replays(browser: Browser, settings: Settings,
                                                  engine: Engine) -> None:
    # An endpoint nobody listens on (port 9, discard): its attempts fail.
    ep = add_endpoint(engine, "http://127.0.0.1:9/crm-hook")
    emit(engine, [status_event(f"m-{i}", "delivered") for i in range(3)])
    with engine.begin() as conn:  # one delivered, one refused with a 500
        first, second, third = conn.scalars(select(Delivery.id).order_by(Delivery.id))
        conn.execute(update(Delivery).values(lease_token="t"))
        # The third stays pending but not due for an hour: the app's dispatcher must not
        # attempt it (refused on port 9) before the page reads the 50 % success rate.
        conn.execute(update(Delivery).where(Delivery.id == third)
                     .values(next_attempt_at=datetime.now(UTC) + timedelta(hours=1)))
        record(conn, [
            Outcome(first, ep.id, "t", "delivered", attempted_at=status_event("x", "x")
                    .occurred_at, status_code=200, ok=True, response="ok"),
            Outcome(second, ep.id, "t", "failed", attempted_at=status_event("x", "x")
                    .occurred_at, status_code=500, response="database is on fire")])
    app = create_app(make_settings(database_url=settings.database_url,
                                   forward_retry_schedule="3600"))
    with serving_in_thread(app) as url:
        page = browser.new_page()
        page.goto(f"{url}/dashboard")
        row = page.locator(f"#endpoints tr[data-endpoint='{ep.id}']")
        expect(row).to_contain_text("http://127.0.0.1:9/crm-hook")
        expect(row).to_contain_text("50.0%")
        expect(row).to_contain_text("database is on fire")
        page.on("dialog", lambda d: d.accept("2"))
        row.get_by_role("button", name="Replay…").click()
        # m-0 (delivered) and m-1 (failed) are queued again; m-2 is still pending.
        expect(page.locator("#endpoints-note")).to_contain_text("2 events queued")
        page.close()
    with engine.connect() as conn:
        assert len(list(conn.scalars(select(Delivery.id)))) == 5
