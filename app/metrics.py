"""Prometheus metrics. Each worker process exposes its own on /metrics."""

from prometheus_client import Counter, Histogram

CALLBACKS = Counter(
    "dlr_callbacks_total", "Callbacks answered, by notification type and outcome",
    ["type", "outcome"],
)
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
