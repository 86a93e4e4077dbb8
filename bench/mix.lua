-- The callback mix of a campaign, for wrk: about 70% delivered, 15% seen, 10% undelivered
-- with a status_extended, 5% Cyrillic replies, and about 10% exact resends of earlier ones.
-- Every new notification is distinct; seen and reply refer to messages delivered earlier on
-- the same thread, so they update existing rows as a real campaign does.
local prefix = os.getenv("BENCH_PREFIX") or "bench"
local resend_share = tonumber(os.getenv("BENCH_RESEND") or "0.1")
local method = os.getenv("BENCH_METHOD") or "POST"
-- Milliseconds each connection waits between its requests (a steady rate rather than a burst).
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
local codes = {"VIBER_USER_NOT_FOUND", "VIBER_EXPIRED", "VIBER_BLOCKED_BY_USER", "PHONE_INCORRECT"}
-- "Спасибо, получил" percent-encoded
local reply_text = "%D0%A1%D0%BF%D0%B0%D1%81%D0%B8%D0%B1%D0%BE%2C+%D0%BF%D0%BE%D0%BB%D1%83%D1%87%D0%B8%D0%BB"

dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "report.lua")
local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end

function init(args)
  distinct = 0
  resends = 0
  delivered = 0   -- messages delivered so far on this thread
  seen_next = 0
  reply_next = 0
  history = {}
  hist_n = 0
  math.randomseed(tid * 7919)
  headers = {["Content-Type"] = "application/x-www-form-urlencoded"}
end

local function new_body()
  local r = math.random(100)
  distinct = distinct + 1
  if r <= 70 or delivered < 10 then
    delivered = delivered + 1
    return string.format("type=delivery&msg_id=%s-%d-%d&status=delivered&p_transaction_id=%s-c%d",
      prefix, tid, delivered, prefix, delivered % 100)
  elseif r <= 85 then
    seen_next = seen_next + 1
    return string.format("type=seen&msg_id=%s-%d-%d", prefix, tid, seen_next)
  elseif r <= 95 then
    delivered = delivered + 1
    return string.format("type=delivery&msg_id=%s-%d-%d&status=undelivered&status_extended=%s",
      prefix, tid, delivered, codes[(delivered % #codes) + 1])
  else
    reply_next = reply_next + 1
    return string.format("type=reply&msg_id=%s-%d-%d&text=%s+%d", prefix, tid, reply_next,
      reply_text, reply_next)
  end
end

if delay_ms > 0 then
  function delay()
    return delay_ms
  end
end

function request()
  local body
  if hist_n > 100 and math.random() < resend_share then
    resends = resends + 1
    body = history[math.random(hist_n)]
  else
    body = new_body()
    hist_n = hist_n + 1
    history[hist_n] = body
  end
  if method == "GET" then
    return wrk.format("GET", "/dlr?" .. body)
  end
  return wrk.format("POST", "/dlr", headers, body)
end

function done(summary, latency, requests)
  local d, rs = 0, 0
  for _, t in ipairs(threads) do
    d = d + t:get("distinct")
    rs = rs + t:get("resends")
  end
  report(summary, latency, {distinct_sent = d, resends_sent = rs})
end
