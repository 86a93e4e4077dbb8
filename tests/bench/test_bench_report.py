"""The forwarding benchmark's drain accounting and table rows (bench/forwarding.py): a drain
that outlasts the wait reports what is still pending apart from what is lost."""

from __future__ import annotations

from typing import Any

from bench.forwarding import drain_account, markdown_rows


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


def test_a_wait_cut_short_with_nothing_pending_says_so_and_counts_the_rest_lost() -> None:
    row = markdown_rows("sqlite", _result(59_000, 0, 1_000))[-1]
    assert "arrived within the 300 s waited, 0 still pending, lost 1,000" in row


def test_the_account_splits_what_did_not_arrive_into_late_and_lost() -> None:
    expected = {f"o-{i}" for i in range(10)}
    arrived = {f"o-{i}" for i in range(6)} | {"other-1"}  # another load's arrival is ignored
    # o-0 arrived while its outcome was not yet recorded: arrived, not late; o-6 and o-7 are
    # still pending; o-8 and o-9 are neither; a pending message of no acknowledged callback
    # counts for nothing.
    pending = {"o-0", "o-6", "o-7", "o-x"}
    assert drain_account(expected, arrived, pending) == {"arrived": 6, "pending": 2, "lost": 2}


def test_everything_arrived_is_nothing_lost() -> None:
    ids = {f"o-{i}" for i in range(5)}
    assert drain_account(ids, ids, set()) == {"arrived": 5, "pending": 0, "lost": 0}
