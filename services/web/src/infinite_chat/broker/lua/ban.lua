-- Bans a name from the whole chat (or lifts the ban), on the name's claim (claim.lua's hash): field b holds until
-- when (ms since the epoch, -1 for good). The claim then lasts as long as the ban, whatever its idle time.
-- KEYS[1]  the name's claim
-- ARGV[1]  until when, or "0" to lift the ban ("until" is a word of Lua: the variable is "ending")
-- ARGV[2]  seconds a claim lasts without use
local ending = tonumber(ARGV[1])
if ending == 0 then
  redis.call('HDEL', KEYS[1], 'b')
  if redis.call('EXISTS', KEYS[1]) == 1 then
    redis.call('EXPIRE', KEYS[1], ARGV[2])
  end
  return 0
end
redis.call('HSET', KEYS[1], 'b', ARGV[1])
if ending == -1 then
  redis.call('PERSIST', KEYS[1])
else
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  local left = math.ceil((ending - now) / 1000)
  if left + tonumber(ARGV[2]) > redis.call('TTL', KEYS[1]) then
    redis.call('EXPIRE', KEYS[1], left + tonumber(ARGV[2]))
  end
end
return 0
