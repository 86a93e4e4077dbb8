"""The forwarding benchmark's table rows (bench/forwarding.py): a drain that outlasts the
wait reports what is still pending, not as lost."""

from __future__ import annotations

from typing import Any

from bench.forwarding import markdown_rows


def _result(arrived: int, pending: int, lost: int) -> dict[str, Any]:
    cpu = {"server_us": 400.0, "database_us": 0.0, "sink_us": 50.0, "wrk_us": 20.0,
           "idle_cores": 0.5}
    return {"forwarding": {
        "ingest": {"baseline_rps": 10_000, "ingest_rps": 2_000, "ratio": 0.2, "p99_ms": 40.0,
                   "non_200": 0, "delivered": 100, "events": 100, "duplicates": 0,
                   "drained_s_after_load": 0.0, "cpu": cpu, "baseline_cpu": cpu},
        "latency": {"achieved_rate": 980, "max_ms": 30.0, "p50_ms": 5.0, "p99_ms": 16.0,
                    "lost": 0, "duplicates": 0, "backlog_zero_s_after_load": 0.0},
        "outage": {"outage_s": 60.0, "first_arrival_s_after_up": 30.0, "drain_rate": 200,
                   "arrived": arrived, "acknowledged": 60_000, "waited_s": 300,
                   "pending": pending, "lost": lost, "duplicates": 0},
    }}


def test_a_drain_cut_off_by_the_wait_says_how_many_are_still_pending() -> None:
    row = markdown_rows("postgresql", _result(54_871, 5_129, 0))[-1]
    assert "54,871 of 60,000 arrived within the 300 s waited, 5,129 still pending" in row
    assert "lost 0," in row


def test_a_complete_drain_reads_as_before() -> None:
    row = markdown_rows("sqlite", _result(60_000, 0, 0))[-1]
    assert "60,000 of 60,000 arrived, lost 0, twice 0" in row
    assert "pending" not in row


def test_what_is_neither_arrived_nor_pending_is_reported_lost() -> None:
    row = markdown_rows("sqlite", _result(59_000, 400, 600))[-1]
    assert "400 still pending, lost 600" in row
