"""Prometheus metrics. Each worker process exposes its own on /metrics."""

from functools import lru_cache

from prometheus_client import Counter, Gauge, Histogram

CALLBACKS = Counter(
    "dlr_callbacks_total", "Callbacks answered, by notification type and outcome",
    ["type", "outcome"],
)


@lru_cache(maxsize=64)
def callback_counter(type_: str, outcome: str) -> Counter:
    """CALLBACKS' child for one type and outcome (a closed set), looked up once: `labels()`
    checks and locks on every call, a callback's largest cost after its own parsing."""
    return CALLBACKS.labels(type=type_, outcome=outcome)


BATCH_SIZE = Histogram(
    "dlr_batch_size", "Items written per group commit",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
COMMIT_SECONDS = Histogram(
    "dlr_commit_seconds", "Time to write and commit one batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
DB_ERRORS = Counter("dlr_db_errors_total", "Database errors on the write path", ["kind"])
SENDS = Counter("dlr_sends_total", "Requests to the provider's send API, by answer code", ["code"])

# Forwarding (outbound webhooks).
FORWARD_DELIVERIES = Counter(
    "dlr_forward_deliveries_total",
    "Forwarding attempts by endpoint and outcome (delivered, retry, failed, gone)",
    ["endpoint", "outcome"],
)
FORWARD_ATTEMPT_SECONDS = Histogram(
    "dlr_forward_attempt_seconds", "Time from sending an event to the endpoint's answer",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
FORWARD_BACKLOG = Gauge(
    "dlr_forward_backlog", "Deliveries due but not delivered yet, by endpoint", ["endpoint"],
)
FORWARD_OLDEST_PENDING = Gauge(
    "dlr_forward_oldest_pending_seconds", "Age of the oldest delivery still pending",
)

# The spool (app/store/spool.py): callbacks kept on local disk while PostgreSQL is away.
SPOOL_DEPTH = Gauge("dlr_spool_depth", "Callbacks kept in the local spool, not yet stored")
SPOOL_OLDEST = Gauge("dlr_spool_oldest_seconds", "Age of the oldest callback in the spool")
SPOOL_DRAINED = Counter("dlr_spool_drained_total", "Spooled callbacks stored once the "
                        "database answered again")
