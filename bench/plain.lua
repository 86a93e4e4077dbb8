-- A plain GET of wrk's URL (the baseline), or of a random path from a file of paths
-- (BENCH_PATHS, one per line), reporting the same JSON line as mix.lua.
local paths = {}
local file = os.getenv("BENCH_PATHS")
if file then
  for line in io.lines(file) do table.insert(paths, line) end
end

function init(args)
  math.randomseed(os.time() + (tonumber(tostring({}):sub(8), 16) or 0))
end

function request()
  if #paths > 0 then
    return wrk.format("GET", paths[math.random(#paths)])
  end
  return wrk.format("GET")
end

-- The latency at every 0.1 percentile: the benchmark merges the short runs of one round
-- into one distribution from these.
local function quantiles(latency)
  local q = {}
  for i = 1, 1000 do q[i] = string.format("%d", latency:percentile(i / 10)) end
  return table.concat(q, ",")
end

function done(summary, latency, requests)
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "status_errors": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d, "quantiles_us": [%s]}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), quantiles(latency)))
end
