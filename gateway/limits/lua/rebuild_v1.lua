--[[ Rebuilding one slot's budgets from the SQL ledger after Redis lost them (or on a new Redis).

KEYS[1]      the slot's marker key
KEYS[2..n+1] budget counters
ARGV[1]      n
ARGV[1 + 2i], ARGV[2 + 2i]: the value from SQL and the key's ttl in seconds, for counter i

Runs once: if another gateway already rebuilt the slot (the marker exists) nothing changes. Values are added, not
set, so reservations settled while the marker was missing are kept.
]]
if redis.call("EXISTS", KEYS[1]) == 1 then
  return 0
end
local n = tonumber(ARGV[1])
for i = 1, n do
  local value, ttl = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  if value > 0 then
    redis.call("INCRBY", KEYS[i + 1], value)
  end
  redis.call("EXPIRE", KEYS[i + 1], ttl)
end
redis.call("SET", KEYS[1], "1")
return 1
