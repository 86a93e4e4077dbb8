"""Running the process: metrics, logs, the HTTP protocol's limits, process tuning, and the
bounded body reads every route that takes a body uses."""
