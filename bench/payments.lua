-- wrk script of bench/payments.sh: POST /payments/process with a new
-- Idempotency-Key per request, between two random accounts of the list.
--   PAYMENTS_MODE=gateway: through the kernel, with PAYMENTS_TOKEN.
--   PAYMENTS_MODE=direct:  straight to the hub, each request with one of the
--     pre-signed assertions of PAYMENTS_ASSERTIONS ("<jwt> <correlation id>"
--     per line; an assertion is accepted once, so none is reused).
-- done() prints one line: RESULT requests duration_us errors status_errors p50_ms p95_ms p99_ms

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

local function lines(path)
  local out = {}
  local file = assert(io.open(path, "r"))
  for line in file:lines() do
    if line ~= "" then table.insert(out, line) end
  end
  file:close()
  return out
end

function init(args)
  mode = os.getenv("PAYMENTS_MODE")
  path = os.getenv("PAYMENTS_PATH")
  token = os.getenv("PAYMENTS_TOKEN")
  tenant = os.getenv("PAYMENTS_TENANT")
  user = os.getenv("PAYMENTS_USER")
  accounts = lines(os.getenv("PAYMENTS_ACCOUNTS"))
  assertions = {}
  if mode == "direct" then
    -- Thread `id` of `count` takes every count-th line: no two threads share one.
    local all = lines(os.getenv("PAYMENTS_ASSERTIONS"))
    local count = tonumber(os.getenv("PAYMENTS_THREADS"))
    for i = id + 1, #all, count do table.insert(assertions, all[i]) end
  end
  counter = 0
  prefix = string.format("%s-%d-%d-", mode, os.time(), id)
  math.randomseed(os.time() + id)
end

function request()
  counter = counter + 1
  local payer = accounts[math.random(#accounts)]
  local payee = payer
  while payee == payer do payee = accounts[math.random(#accounts)] end
  local key = prefix .. counter
  local body = '{"amount_minor":1,"currency":"EUR","payer_account":"' .. payer ..
    '","payee_account":"' .. payee .. '","reference":"bench ' .. key .. '"}'
  local headers = { ["Content-Type"] = "application/json", ["Idempotency-Key"] = key }
  if mode == "gateway" then
    headers["Authorization"] = "Bearer " .. token
  else
    local line = assertions[counter]
    if line == nil then
      -- Out of assertions: the run was faster than planned. Count it as an error.
      line = assertions[#assertions]
    end
    local jwt, cid = line:match("^(%S+) (%S+)$")
    headers["x-kernel-assertion"] = jwt
    headers["x-tenant-id"] = tenant
    headers["x-user-sub"] = user
    headers["x-actor-type"] = "user"
    headers["x-correlation-id"] = cid
  end
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %.3f %.3f %.3f\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout, e.status,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000))
end
