--[[ Settlement: a finished request's reservations adjusted to its real usage, leases released.

KEYS[i]    the key of check i, in admission order (one hash slot)
ARGV[1]    request id
ARGV[2]    n
ARGV[3]    admission time, ms (Redis' clock, as admission returned it)
then 4 per check, from 4 + 4 * (i - 1):
  kind     "sw" | "cc" | "bd" | "bm"
  delta    real minus reserved (negative: a refund; positive: debt)
  p1       sw: window ms      bd/bm: key ttl seconds
  p2       sw: bucket ms

A refund goes back to the bucket the reservation was made in, if that bucket is still live (an expired bucket no
longer limits anyone). Debt is charged to that bucket if live, else to the current one: either way later requests
wait for it. Budgets never go below zero.
]]

local n = tonumber(ARGV[2])
local admitted = tonumber(ARGV[3])
local now = nil -- Redis' clock, read only when debt lands in the current bucket

local function current_ms()
  if now == nil then
    local time = redis.call("TIME")
    now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  end
  return now
end

for i = 1, n do
  local base = 3 + 4 * (i - 1)
  local kind, key, delta = ARGV[base + 1], KEYS[i], tonumber(ARGV[base + 2])
  if kind == "cc" then
    redis.call("ZREM", key, ARGV[1])
  elseif kind == "sw" and delta ~= 0 then
    local window, bucket = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
    local index = math.floor(admitted / bucket)
    local state = redis.call("HMGET", key, "o", index, "s")
    local oldest, value, sum = tonumber(state[1]), tonumber(state[2]), tonumber(state[3]) or 0
    local live = oldest ~= nil and index >= oldest and value ~= nil
    if live then
      -- The reservation's bucket still counts: adjust it and the sum in one write (the script is atomic).
      local change = math.max(delta, -value)
      redis.call("HSET", key, index, value + change, "s", sum + change)
      if delta > 0 then
        redis.call("PEXPIRE", key, window * 2 + bucket)
      end
    elseif delta > 0 then
      -- A refund to an expired bucket limits no one; debt goes to the current bucket.
      local clock = current_ms()
      index = math.floor(clock / bucket)
      if oldest == nil then
        redis.call("HSET", key, "o", math.floor((clock - window) / bucket))
      end
      redis.call("HINCRBY", key, index, delta)
      redis.call("HINCRBY", key, "s", delta)
      redis.call("PEXPIRE", key, window * 2 + bucket)
    end
  elseif (kind == "bd" or kind == "bm") and delta ~= 0 then
    local value = redis.call("INCRBY", key, delta)
    if value < 0 then redis.call("SET", key, 0, "KEEPTTL") end
    if value == delta then -- created here (Redis lost it since admission): it lives until its period ends
      redis.call("EXPIRE", key, tonumber(ARGV[base + 3]))
    end
  end
end
return n
