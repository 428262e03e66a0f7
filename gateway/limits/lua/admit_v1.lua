--[[ Admission: every limit that applies to a request, checked and reserved in one atomic step.

All keys belong to one hash slot (one team, or one model for organisation-wide caps), so this runs unchanged on
Redis Cluster. Time comes from Redis (TIME), never from a gateway. All-or-nothing: a request refused by one check
reserves nothing in the others.

KEYS[i]     the key of check i
ARGV[1]     request id (the member of concurrency leases)
ARGV[2]     n, the number of checks
ARGV[3..6]  day start ms, day end ms, month start ms, month end ms: the UTC budget periods the gateway computed;
            if Redis' clock is outside them (a request right at midnight) the script answers code 2 and the
            gateway retries with Redis' time
ARGV[7]     clamp: the completion tokens the request asked for, if the gateway may lower max_tokens to fit
            ("0": never clamp)
ARGV[8]     prompt tokens estimated (for clamping)
then 6 per check, from 9 + 6 * (i - 1):
  kind      "sw" sliding window | "cc" concurrency | "bd" daily budget | "bm" monthly budget
            | "mk" the slot's budgets-initialised marker (code 3 if missing: rebuild budgets from SQL first)
  limit     integer
  amount    integer to reserve (cc: slots; beyond the first, slots are members <request id>:1 .. :amount-1,
            a worker's grant of slots for its later requests)
  p1        sw: window ms        cc: lease ms       bd/bm: key ttl seconds
  p2        sw: bucket ms        cc: -              bd/bm: 1 hard, 0 soft
  tokens    "1" if the amount is a token count (clamping lowers it), else "0"

Sliding window layout (hash): field "s" = sum of the live buckets, "o" = oldest live bucket index, and one field
per bucket index. At time t the live buckets are those from floor((t - W) / b): the oldest is counted whole, so
for every window of length W the amounts admitted inside it never exceed the limit. Expired buckets are
subtracted from "s" and deleted as time moves on (amortised O(1) per call).

Returns {code, now_ms, failed_check, retry_ms, granted_completion, value_1 .. value_n}
  code 0: admitted; 1: refused by failed_check (retry_ms: when it could pass, -1: not within the period);
  2: budget period mismatch; 3: budgets of this slot not initialised (Redis lost its data, or is new). value_i: the check's usage after this request (for the x-ratelimit headers).
]]

local time = redis.call("TIME")
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local n = tonumber(ARGV[2])
local day_start, day_end = tonumber(ARGV[3]), tonumber(ARGV[4])
local month_start, month_end = tonumber(ARGV[5]), tonumber(ARGV[6])
local clamp_completion = tonumber(ARGV[7])
local prompt_estimate = tonumber(ARGV[8])

local function arg(i, k) return ARGV[8 + 6 * (i - 1) + k] end

-- Bring a sliding window up to date: its live sum, whether it exists, and the current bucket's value (read in
-- the same call, so that reserving is one HSET rather than two HINCRBYs: the script is atomic).
local function sw_sum(key, window, bucket)
  local state = redis.call("HMGET", key, "s", "o", math.floor(now / bucket))
  local sum, oldest, current = tonumber(state[1]) or 0, tonumber(state[2]), tonumber(state[3]) or 0
  local first_live = math.floor((now - window) / bucket)
  if oldest == nil then
    return 0, false, 0
  end
  if oldest < first_live then
    if first_live - oldest > math.ceil(window / bucket) + 1 then
      redis.call("DEL", key) -- idle for longer than a window: everything expired
      return 0, false, 0
    end
    for index = oldest, first_live - 1 do
      local value = tonumber(redis.call("HGET", key, index))
      if value then
        sum = sum - value
        redis.call("HDEL", key, index)
      end
    end
    redis.call("HSET", key, "s", sum, "o", first_live)
  end
  return sum, true, current
end

-- When would a sliding window have room for `amount` again?
local function sw_retry(key, window, bucket, sum, amount, limit)
  local first_live = math.floor((now - window) / bucket)
  local current = math.floor(now / bucket)
  local freed = 0
  for index = first_live, current do
    freed = freed + (tonumber(redis.call("HGET", key, index)) or 0)
    if sum - freed + amount <= limit then
      return (index + 1) * bucket + window - now
    end
  end
  return (current + 1) * bucket + window - now
end

local current_usage = {}
local amounts = {}
local window_exists = {}
local bucket_value = {}
for i = 1, n do
  local kind, key = arg(i, 1), KEYS[i]
  if kind == "sw" then
    current_usage[i], window_exists[i], bucket_value[i] = sw_sum(key, tonumber(arg(i, 4)), tonumber(arg(i, 5)))
  elseif kind == "cc" then
    redis.call("ZREMRANGEBYSCORE", key, "-inf", now)
    current_usage[i] = redis.call("ZCARD", key)
  elseif kind == "mk" then
    if redis.call("EXISTS", key) == 0 then
      return {3, now, i, 0, 0}
    end
    current_usage[i] = 0
  else
    local period_start, period_end = day_start, day_end
    if kind == "bm" then period_start, period_end = month_start, month_end end
    if now < period_start or now >= period_end then
      return {2, now, i, 0, 0}
    end
    current_usage[i] = tonumber(redis.call("GET", key)) or 0
  end
  amounts[i] = tonumber(arg(i, 3))
end

-- Clamping: lower every token reservation to what the tightest token check still allows.
local granted = 0
if clamp_completion > 0 then
  local room = clamp_completion
  for i = 1, n do
    local kind = arg(i, 1)
    local enforced = kind ~= "bd" and kind ~= "bm" or arg(i, 5) == "1"
    if arg(i, 6) == "1" and enforced then
      room = math.min(room, tonumber(arg(i, 2)) - current_usage[i] - prompt_estimate)
    end
  end
  if room >= 1 and room < clamp_completion then
    granted = room
    for i = 1, n do
      if arg(i, 6) == "1" then amounts[i] = prompt_estimate + room end
    end
  end
end

for i = 1, n do
  local kind, limit = arg(i, 1), tonumber(arg(i, 2))
  local over = current_usage[i] + amounts[i] > limit

  if kind == "mk" then over = false end
  local soft_budget = (kind == "bd" or kind == "bm") and arg(i, 5) == "0"
  if over and not soft_budget then
    local retry = -1
    if kind == "sw" then
      retry = sw_retry(KEYS[i], tonumber(arg(i, 4)), tonumber(arg(i, 5)), current_usage[i], amounts[i], limit)
    elseif kind == "cc" then
      retry = 1000
    end
    return {1, now, i, retry, 0}
  end
end

local result = {0, now, 0, 0, granted}
for i = 1, n do
  local kind, key, amount = arg(i, 1), KEYS[i], amounts[i]
  if kind == "sw" then
    local window, bucket = tonumber(arg(i, 4)), tonumber(arg(i, 5))
    local index = math.floor(now / bucket)
    local total = current_usage[i] + amount
    if window_exists[i] then
      redis.call("HSET", key, index, bucket_value[i] + amount, "s", total)
    else
      redis.call("HSET", key, index, amount, "s", total, "o", math.floor((now - window) / bucket))
    end
    -- The key outlives its newest bucket by a window: its expiry moves only when a bucket is created.
    if bucket_value[i] == 0 or not window_exists[i] then
      redis.call("PEXPIRE", key, window * 2 + bucket)
    end
    result[5 + i] = total
  elseif kind == "cc" then
    local expiry = now + tonumber(arg(i, 4))
    redis.call("ZADD", key, expiry, ARGV[1])
    for slot = 1, amount - 1 do
      redis.call("ZADD", key, expiry, ARGV[1] .. ":" .. slot)
    end
    redis.call("PEXPIRE", key, tonumber(arg(i, 4)) * 2)
    result[5 + i] = current_usage[i] + amount
  elseif kind == "mk" then
    result[5 + i] = 0
  else
    -- A budget counter lives until its period ends: the expiry is set when the counter is created.
    if redis.call("INCRBY", key, amount) == amount then
      redis.call("EXPIRE", key, tonumber(arg(i, 4)))
    end
    result[5 + i] = current_usage[i] + amount
  end
end
return result
