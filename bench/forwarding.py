"""Forwarding's measurements (run by `python -m bench`, one round per backend):

1. ingest of the callback mix with one endpoint subscribed to everything and a local sink
   answering 200, as a ratio to the same server's /healthz (the issue asks >= 0.55);
2. at 1,000 callbacks/s, the time from each callback's 200 to its event's arrival at the sink
   (p50/p99; p99 < 1 s asked), and how long after the load stops the last event arrives
   (< 5 s asked);
3. the sink down for a minute while 1,000 callbacks/s arrive, then back: how fast the backlog
   drains (>= 1,000 events/s asked), with none lost and none delivered twice.

The sink is `sink_app` below, in its own uvicorn process: it answers 200 at once and keeps
(arrival time, webhook-id, msg_id) of every request, served back on /arrivals.
Callbacks at a fixed rate come from `paced`, a small asyncio client on keep-alive
connections (wrk cannot hold a rate).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from rich.console import Console
from sqlalchemy import Engine, text

from bench.cpu import cell

console = Console()
RATE = 1000.0
PACED_CONNECTIONS = 32
SINK_READY_PATH = "/stats"

# --- the sink (its own process: `uvicorn bench.forwarding:sink_app`) --------------------------

_ARRIVALS: list[tuple[float, str, str]] = []


async def _answer(send: Callable[..., Any], status: int, body: bytes,
                  content_type: bytes = b"text/plain") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def sink_app(scope: dict[str, Any], receive: Callable[..., Any],
                   send: Callable[..., Any]) -> None:
    """A webhook receiver that answers 200 at once and remembers what came when."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/stats":
        body = json.dumps({"arrivals": len(_ARRIVALS)}).encode()
        await _answer(send, 200, body, b"application/json")
        return
    if scope["path"] == "/arrivals":
        await _answer(send, 200, json.dumps(_ARRIVALS).encode(), b"application/json")
        return
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    arrived = time.time()
    headers = dict(scope["headers"])
    try:
        msg_id = json.loads(b"".join(chunks))["data"]["msg_id"]
    except (ValueError, KeyError, TypeError):
        msg_id = ""
    _ARRIVALS.append((arrived, headers.get(b"webhook-id", b"").decode(), msg_id))
    await _answer(send, 200, b"ok")


class Sink:
    """The sink process; `stop()` takes it down, a new Sink on the same port brings it up."""

    def __init__(self, make_server: Callable[..., Any], db_url: str, port: int,
                 workdir: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.server = make_server(db_url, port, 1, ready=SINK_READY_PATH,
                                  log=workdir / f"sink-{port}-{time.time():.0f}.log",
                                  command=[sys.executable, "-m", "uvicorn",
                                           "bench.forwarding:sink_app", "--port", str(port),
                                           "--no-access-log", "--log-level", "warning"])

    def arrivals(self, prefix: str) -> list[tuple[float, str, str]]:
        rows = httpx.get(f"{self.url}/arrivals", timeout=60).json()
        return [(t, w, m) for t, w, m in rows if m.startswith(prefix)]

    def stop(self) -> None:
        self.server.stop()


# --- callbacks at a fixed rate ----------------------------------------------------------------


async def _response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = next((int(line.split(":", 1)[1]) for line in lines[1:]
                   if line.lower().startswith("content-length:")), 0)
    if length:
        await reader.readexactly(length)
    return status


async def paced(base_url: str, paths: list[str], rate: float = RATE,
                connections: int = PACED_CONNECTIONS) -> dict[int, float]:
    """GET every path, request i due at start + i / rate, over keep-alive connections;
    returns {i: wall-clock time its 200 was read}."""
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    start = time.monotonic() + 0.2
    next_index = 0
    ok: dict[int, float] = {}

    async def worker() -> None:
        nonlocal next_index
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while next_index < len(paths):
                i = next_index
                next_index += 1
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                request = f"GET {paths[i]} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
                for _ in range(3):  # the server may close an idle keep-alive connection
                    try:
                        writer.write(request)
                        status = await _response(reader)
                        break
                    except (ConnectionError, asyncio.IncompleteReadError):
                        writer.close()
                        reader, writer = await asyncio.open_connection(host, port)
                else:
                    continue
                if status == 200:
                    ok[i] = time.time()
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return ok


def _callbacks(prefix: str, count: int) -> list[str]:
    """One new message per callback: each is a status change, so each makes one event."""
    return [f"/dlr?type=delivery&status=delivered&msg_id={prefix}-{i}"
            f"&p_transaction_id={prefix}" for i in range(count)]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _wait_for(sink: Sink, prefix: str, count: int, timeout: float
              ) -> list[tuple[float, str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        got = sink.arrivals(prefix)
        if len({m for _, _, m in got}) >= count or time.monotonic() > deadline:
            return got
        time.sleep(0.25)


# --- the three measurements -------------------------------------------------------------------


def _add_endpoint(server_url: str, sink_url: str) -> str:
    r = httpx.post(f"{server_url}/api/v1/endpoints", json={"url": f"{sink_url}/hook"},
                   timeout=10)
    r.raise_for_status()
    return str(r.json()["id"])


def ingest_with_endpoint(server: Any, sink: Sink, db_engine: Any, bracketed: Callable[..., Any],
                         seconds: int, connections: int) -> dict[str, Any]:
    prefix = f"f{uuid.uuid4().hex[:6]}"
    runs = bracketed(server.url, {"mix": ("/dlr", "mix.lua", {"BENCH_PREFIX": prefix})},
                     seconds, connections)
    baseline, mix = runs["baseline"], runs["mix"]
    stopped = time.time()
    with db_engine.connect() as conn:
        events = int(conn.execute(text("SELECT count(*) FROM outbound_events "
                                       "WHERE msg_key LIKE :p"), {"p": f"{prefix}-%"}).scalar())
    deadline = time.monotonic() + 120
    got = sink.arrivals(f"{prefix}-")
    while len({w for _, w, _ in got}) < events and time.monotonic() < deadline:
        time.sleep(0.5)
        got = sink.arrivals(f"{prefix}-")
    ids = [w for _, w, _ in got]
    return {
        "baseline_rps": round(baseline.rps), "ingest_rps": round(mix.rps),
        "ratio": round(mix.rps / baseline.rps, 2), "p99_ms": mix.p99_ms,
        "non_200": mix.non_200 + baseline.non_200, "events": events,
        "cpu": mix.cpu_per_request, "baseline_cpu": baseline.cpu_per_request,
        "delivered": len(set(ids)), "duplicates": len(ids) - len(set(ids)),
        # Measured from the end of the round (the mix, then the baseline's second half).
        "drained_s_after_load": round(max(0.0, max((t for t, _, _ in got), default=stopped)
                                          - stopped), 1),
    }


def latency_at_rate(server: Any, sink: Sink, seconds: int, rate: float = RATE
                    ) -> dict[str, Any]:
    prefix = f"l{uuid.uuid4().hex[:6]}"
    paths = _callbacks(prefix, int(seconds * rate))
    started = time.monotonic()
    ok = asyncio.run(paced(server.url, paths, rate))
    took = time.monotonic() - started
    stopped = time.time()
    got = _wait_for(sink, f"{prefix}-", len(ok), timeout=60)
    first: dict[str, float] = {}
    for t, _, m in got:
        first[m] = min(t, first.get(m, t))
    latencies = [first[f"{prefix}-{i}"] - t for i, t in ok.items() if f"{prefix}-{i}" in first]
    return {
        "callbacks": len(paths), "acknowledged": len(ok),
        "achieved_rate": round(len(ok) / took),
        "arrived": len(first), "lost": len(ok) - len([i for i in ok if f"{prefix}-{i}" in first]),
        "duplicates": len(got) - len(first),
        "p50_ms": round(_quantile(latencies, 0.5) * 1000, 1),
        "p99_ms": round(_quantile(latencies, 0.99) * 1000, 1),
        "max_ms": round(max(latencies, default=float("nan")) * 1000, 1),
        "backlog_zero_s_after_load": round(max((t for t, _, _ in got), default=stopped)
                                           - stopped, 2),
    }


def drain_account(expected: set[str], arrived: set[str], pending: set[str]) -> dict[str, int]:
    """Of the messages whose callbacks were acknowledged: how many arrived, how many are still
    pending in the database (late), and how many are neither (lost). The bench's msg_ids are
    not UUIDs, so a message's key is its msg_id."""
    late = (expected - arrived) & pending
    return {"arrived": len(expected & arrived), "pending": len(late),
            "lost": len(expected - arrived - late)}


def drain_after_outage(server: Any, sink: Sink, restart: Callable[[], Sink], outage: int,
                       engine: Engine, rate: float = RATE) -> tuple[dict[str, Any], Sink]:
    prefix = f"o{uuid.uuid4().hex[:6]}"
    sink.stop()
    paths = _callbacks(prefix, int(outage * rate))
    started = time.monotonic()
    ok = asyncio.run(paced(server.url, paths, rate))
    took = time.monotonic() - started
    up = time.time()
    sink = restart()
    waited = max(300, outage * 3)
    _wait_for(sink, f"{prefix}-", len(ok), timeout=waited)
    # What has not arrived when the wait ends is late (its delivery still pending in the
    # database) or lost. The database is asked first and the sink after, so a delivery that
    # arrives in between counts as arrived, not as lost.
    with engine.connect() as conn:
        pending = set(conn.execute(text(
            "SELECT DISTINCT e.msg_key FROM deliveries d "
            "JOIN outbound_events e ON e.id = d.event_id "
            "WHERE d.status = 'pending' AND e.msg_key LIKE :p"), {"p": f"{prefix}-%"}).scalars())
    got = sink.arrivals(f"{prefix}-")
    times = sorted(t for t, _, _ in got)
    distinct = {m for _, _, m in got}
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    return {
        "outage_s": round(took, 1), "acknowledged": len(ok), "waited_s": waited,
        **drain_account({f"{prefix}-{i}" for i in ok}, distinct, pending),
        "duplicates": len(got) - len(distinct),
        "first_arrival_s_after_up": round(times[0] - up, 1) if times else None,
        "drain_s": round(span, 1),
        "drain_rate": round(len(got) / span) if len(times) > 1 and span > 0 else None,
    }, sink


def forwarding_round(db: Any, make_server: Callable[..., Any], bracketed: Callable[..., Any],
                     free_port: Callable[[], int], seconds: int, connections: int,
                     workdir: Path, outage: int = 60) -> dict[str, Any]:
    """All three measurements on one `dlr serve` with one endpoint pointing at the sink."""
    sink_port = free_port()

    def restart() -> Sink:
        return Sink(make_server, db.url, sink_port, workdir)

    sink = restart()
    server = make_server(db.url, free_port(), 1)
    result: dict[str, Any] = {}
    try:
        result["endpoint"] = _add_endpoint(server.url, sink.url)
        console.print("  forwarding: ingest with one endpoint")
        result["ingest"] = ingest_with_endpoint(server, sink, db.engine, bracketed, seconds,
                                                connections)
        console.print(f"  forwarding: latency at {RATE:,.0f} callbacks/s")
        result["latency"] = latency_at_rate(server, sink, seconds)
        console.print(f"  forwarding: sink down {outage} s at {RATE:,.0f} callbacks/s, then up")
        result["outage"], sink = drain_after_outage(server, sink, restart, outage, db.engine)
    finally:
        server.stop()
        sink.stop()
    console.print(result)
    return result


def markdown_rows(backend: str, res: dict[str, Any]) -> list[str]:
    """Rows for the README's table (bench/__main__.py's columns: backend, run, /healthz
    req/s, req/s, ratio, p50 / p99 ms, non-200, exact, peak RSS MB, CPU)."""

    f = res.get("forwarding")
    if not f:
        return []
    i, lt, o = f["ingest"], f["latency"], f["outage"]
    drain = f"{o['drain_rate']:,} events/s" if o["drain_rate"] else "–"
    return [
        f"| {backend} | callback mix, one endpoint subscribed to everything, local sink "
        f"answering 200 | {i['baseline_rps']:,} | {i['ingest_rps']:,} | **{i['ratio']:.2f}** "
        f"| – / {i['p99_ms']:.1f} | {i['non_200']} | {i['delivered']:,} of {i['events']:,} "
        f"events forwarded, {i['duplicates']} twice, the last {i['drained_s_after_load']} s "
        f"after the load | – | {cell(i['cpu'], i['baseline_cpu'])} |",
        f"| {backend} | forwarding at {lt['achieved_rate']:,} callbacks/s: callback's 200 to "
        f"the event's arrival (max {lt['max_ms']:,.0f} ms) | – | – | – | "
        f"{lt['p50_ms']:.0f} / **{lt['p99_ms']:.0f}** | – | lost {lt['lost']}, twice "
        f"{lt['duplicates']}; backlog zero {lt['backlog_zero_s_after_load']} s after the load "
        f"| – | – |",
        f"| {backend} | sink down {o['outage_s']:.0f} s under 1,000 callbacks/s, then up: "
        f"backlog drain (first event {o['first_arrival_s_after_up']} s after the sink was up) "
        f"| – | **{drain}** | – | – | – | {o['arrived']:,} of {o['acknowledged']:,} arrived"
        + (f" within the {o['waited_s']} s waited, {o['pending']:,} still pending"
           if o["arrived"] < o["acknowledged"] else "")
        + f", lost {o['lost']:,}, twice {o['duplicates']:,} | – | – |",
    ]
