"""Forwarding end to end: callbacks in, webhooks out; real `dlr serve` processes sharing the
work on one PostgreSQL; kill -9 with deliveries in flight and the receiver down."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections import defaultdict

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine

from app.config import Settings
from app.store.db import make_engine
from app.store.migrate import upgrade

from ..helpers import (
    UUID_A,
    AppFactory,
    Received,
    Sink,
    client_for,
    dlr,
    emit,
    make_settings,
    running_server,
    running_sink,
    status_event,
    verified,
    wipe,
)

pytestmark = pytest.mark.slow
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


async def test_callbacks_become_exactly_one_event_per_change(app_with: AppFactory,
                                                             engine: Engine) -> None:
    app: FastAPI = await app_with(forward_retry_schedule="0.2")
    with running_sink() as sink:
        async with client_for(app) as c:
            r = await c.post("/api/v1/endpoints", json={"url": sink.url})
            assert r.status_code == 201, r.text
            secret = r.json()["secret"]
            calls: list[dict[str, str]] = [
                {"type": "delivery", "status": "in process"},
                {"type": "delivery", "status": "delivered"},
                {"type": "delivery", "status": "delivered"},   # a resend: no event
                {"type": "delivery", "status": "in process"},  # late and lower: no event
                {"type": "seen"},
                {"type": "seen"},                             # a resend: no event
                {"type": "reply", "text": "Thanks! 👍"},
                {"type": "reply", "text": "Thanks! 👍"},       # a resend: no event
                {"type": "reply", "text": "When?"},
            ]
            for fields in calls:
                r = await dlr(c, "POST", msg_id=UUID_A, p_transaction_id="camp-1", **fields)
                assert r.status_code == 200
        got = await asyncio.to_thread(sink.wait_for, 5)
        await asyncio.sleep(1.0)  # anything extra would have arrived by now
        got = sink.requests()
    bodies = sorted((verified(r, secret) for r in got), key=lambda b: b["data"]["sequence"])
    assert [(b["type"], b["data"]["status"]) for b in bodies] == [
        ("message.status", "in_process"),
        ("message.status", "delivered"),
        ("message.status", "seen"),
        ("message.reply", "seen"),
        ("message.reply", "seen"),
    ]
    assert [b["data"]["previous_status"] for b in bodies[1:3]] == ["in_process", "delivered"]
    sequences = [b["data"]["sequence"] for b in bodies]
    assert len(set(sequences)) == 5
    assert [b["data"]["reply"]["text"] for b in bodies[3:]] == ["Thanks! 👍", "When?"]
    assert all(b["data"]["msg_id"] == UUID_A for b in bodies)
    assert {"events", "replies"}.isdisjoint(bodies[0]["data"])


def _delivered_by(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(m.group(1)) for m in re.finditer(
        r'^dlr_forward_deliveries_total\{[^}]*outcome="delivered"[^}]*\} (\S+)$', text, re.M))


def _overlapping(requests: list[Received]) -> list[str]:
    """webhook-ids that were being received twice at the same moment."""
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in requests:
        spans[r.webhook_id].append((r.started, r.finished))
    twice = []
    for webhook_id, times in spans.items():
        times.sort()
        if any(b[0] < a[1] for a, b in zip(times, times[1:], strict=False)):
            twice.append(webhook_id)
    return twice


def test_two_replicas_share_the_work(pg_url: str) -> None:
    engine = make_engine(make_settings(database_url=pg_url))
    upgrade(engine)
    wipe(engine)
    events = 600
    with running_sink() as sink:
        sink.delay = 0.01  # each answer takes a moment, as a real receiver's does
        env = {"DLR_DATABASE_URL": pg_url, "DLR_FORWARD_URL": sink.url,
               "DLR_FORWARD_SECRET": SECRET, "DLR_FORWARD_CONCURRENCY": "4",
               "DLR_FORWARD_RETRY_SCHEDULE": "0.5"}
        with running_server(env) as (one, _), running_server(env) as (two, _):
            time.sleep(1.5)  # both have synced the endpoint from their settings
            for start in range(0, events, 100):
                emit(engine, [status_event(f"m-{i}", "delivered")
                              for i in range(start, start + 100)])
            got = sink.wait_for(events, timeout=60)
            shares = (_delivered_by(one), _delivered_by(two))
    engine.dispose()
    ids = [r.webhook_id for r in got]
    assert len(set(ids)) == events
    assert len(ids) == events  # no crash, all answered 200: each exactly once
    assert _overlapping(got) == []
    assert all(share > 0 for share in shares), shares
    for r in got[:20]:
        verified(r, SECRET)


def test_kill_9_in_flight_with_the_receiver_down_loses_nothing(settings: Settings,
                                                               engine: Engine) -> None:
    events = 60
    port_sink = Sink()
    port_sink.hang = True  # requests stay in flight until the process dies
    port_sink.start()
    env = {"DLR_DATABASE_URL": settings.database_url, "DLR_FORWARD_URL": port_sink.url,
           "DLR_FORWARD_SECRET": SECRET, "DLR_FORWARD_CONCURRENCY": "4",
           "DLR_FORWARD_TIMEOUT": "0.5", "DLR_FORWARD_RETRY_SCHEDULE": ",".join(["0.5"] * 60)}
    try:
        with running_server(env) as (_, proc):
            time.sleep(1.5)
            emit(engine, [status_event(f"m-{i}", "delivered") for i in range(events)])
            deadline = time.monotonic() + 10
            while not _in_flight(port_sink) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _in_flight(port_sink), "nothing was sent before the kill"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        port_sink.stop()  # the receiver is down while the service restarts
        with running_server(env):
            time.sleep(2.0)  # the restarted process tries, fails, backs off
            back = Sink(port_sink.port)
            back.start()
            try:
                got = _distinct(back, events, timeout=60)
                missing = events - len({r.webhook_id for r in got})
            finally:
                back.stop()
    finally:
        port_sink.stop()
    assert missing == 0
    for r in got[:10]:
        verified(r, SECRET)


def _distinct(sink: Sink, count: int, timeout: float) -> list[Received]:
    """Wait until `count` distinct webhook-ids arrived (repeats after a crash are allowed)."""
    deadline = time.monotonic() + timeout
    while len({r.webhook_id for r in sink.requests()}) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return sink.requests()


def _in_flight(sink: Sink) -> bool:
    return sink.arrived > 0
