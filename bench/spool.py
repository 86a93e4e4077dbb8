"""PostgreSQL away under a campaign's steady load (issue 25): callbacks at about 1,000/s (the
benchmark's mix, 20 connections each waiting 10 ms between requests) before, during and after
an outage of `outage` seconds. The round runs on a PostgreSQL server of its own (durable, as
in production), stopped for the outage and started again on the same port: the TCP relay the
tests cut relays every byte through Python threads, which halved the drain it was measuring
(5,100/s through it, 10,600/s without, the same spool). Reported: non-200 answers in each
phase, the callbacks' p99 before and during, how fast the spool drained once PostgreSQL was
back, and that exactly what was sent is stored, once."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import throwaway_postgres

# 20 connections, each waiting 10 ms after its answer: about 1,000 callbacks/s here.
CONNECTIONS = 20
RATE_ENV = {"BENCH_DELAY_MS": "10"}


def spool_round(database: Callable[[str], Any], server_with: Any, wrk: Any, workdir: Path,
                outage: int, console: Any) -> dict[str, Any]:
    """`database(admin_url)`: the benchmark's database, made on the round's own server."""
    prefix = f"s{uuid.uuid4().hex[:6]}"

    def env(phase: str) -> dict[str, str]:
        # A prefix per phase: each wrk run numbers its messages from 1 again.
        return RATE_ENV | {"BENCH_PREFIX": f"{prefix}-{phase}", "BENCH_RESEND": "0.1"}

    with throwaway_postgres(durable=True) as postgres:
        db = database(postgres.url)
        server = server_with(db.url, {"DLR_SPOOL_PATH": str(workdir / "spool.db")})
        phases: dict[str, Any] = {}
        try:
            phases["before"] = wrk(server.url + "/dlr", "mix.lua", 10, CONNECTIONS, env("b"))
            postgres.stop()
            console.print(f"  PostgreSQL stopped for {outage} s under load")
            phases["during"] = wrk(server.url + "/dlr", "mix.lua", outage, CONNECTIONS,
                                   env("d"))
            depth = server.metric("dlr_spool_depth")
            postgres.start()
            back = time.monotonic()
            drained_at = None
            with httpx.Client(timeout=5) as client:
                while time.monotonic() - back < 300:
                    r = client.get(f"{server.url}/readyz")
                    if r.status_code == 200 and r.json().get("status") == "ready":
                        drained_at = time.monotonic()
                        break
                    time.sleep(0.05)
            phases["after"] = wrk(server.url + "/dlr", "mix.lua", 10, CONNECTIONS, env("a"))
        finally:
            server.stop()
        try:
            stored = db.exactness(f"{prefix}-")
        finally:
            db.drop()
    sent = sum(p.extra["distinct_sent"] for p in phases.values())
    drain_seconds = (drained_at - back) if drained_at is not None else None
    return {
        "outage_seconds": outage,
        "rate_per_second": round(phases["during"].rps),
        "non_200": {name: p.non_200 for name, p in phases.items()},
        "p99_ms": {name: p.p99_ms for name, p in phases.items()},
        "spooled": int(depth),
        "drain_seconds": round(drain_seconds, 2) if drain_seconds is not None else None,
        "drain_per_second": round(depth / drain_seconds) if drain_seconds else None,
        "distinct_sent": sent, "stored": stored["stored"],
        "stored_twice": stored["stored"] - stored["distinct_stored"],
        # Only requests in flight when a wrk run stopped (one per connection) may be missing.
        "lost_at_most": max(0, sent - stored["stored"]),
    }


def markdown_rows(res: dict[str, Any]) -> list[str]:
    nb = res["non_200"]
    drain = (f"{res['spooled']:,} spooled, drained in {res['drain_seconds']} s "
             f"({res['drain_per_second']:,}/s)" if res["drain_seconds"] is not None
             else f"{res['spooled']:,} spooled, NOT drained within 300 s")
    return [
        "| postgresql | PostgreSQL away under load | before / during / after |",
        "|---|---|---|",
        f"| | callbacks at ~{res['rate_per_second']:,}/s, outage {res['outage_seconds']} s | "
        f"non-200 {nb['before']} / {nb['during']} / {nb['after']}; p99 "
        f"{res['p99_ms']['before']:.1f} / {res['p99_ms']['during']:.1f} / "
        f"{res['p99_ms']['after']:.1f} ms |",
        f"| | the spool | {drain} |",
        f"| | exactly once | {res['distinct_sent']:,} distinct sent, {res['stored']:,} stored, "
        f"{res['stored_twice']} twice, at most {res['lost_at_most']} in flight when a run "
        "stopped |",
    ]
