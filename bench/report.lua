-- The one JSON line every wrk script of the benchmark ends with (bench/__main__.py reads it).
-- Loaded by mix.lua and plain.lua with dofile, from their own folder.

-- The latency at every 0.1 percentile: the benchmark pools several runs (the baseline's run
-- before and after the loads) into one distribution from these.
local function quantiles(latency)
  local q = {}
  for i = 1, 1000 do q[i] = string.format("%d", latency:percentile(i / 10)) end
  return table.concat(q, ",")
end

-- extra: further integer fields, e.g. {distinct_sent = 10}
function report(summary, latency, extra)
  local fields = ""
  for key, value in pairs(extra or {}) do
    fields = fields .. string.format(', "%s": %d', key, value)
  end
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "status_errors": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"quantiles_us": [%s]%s}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), quantiles(latency), fields))
end
