-- A plain GET of wrk's URL (the baseline), or of a random path from a file of paths
-- (BENCH_PATHS, one per line), reporting the same JSON line as mix.lua.
dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "report.lua")
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

function done(summary, latency, requests)
  report(summary, latency)
end
