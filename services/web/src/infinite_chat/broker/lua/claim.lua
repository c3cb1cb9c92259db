-- Who holds a name (names.py): the claim is a hash of t (the SHA-256 of its token) and n (the name as first
-- claimed), kept for ARGV[4] seconds after the last join that used it; b (ban.lua) when the name is banned from the
-- chat.
-- KEYS[1]  the claim (keys.name_key of the folded name)
-- ARGV[1]  the SHA-256 of the token the join offers, or '' for none
-- ARGV[2]  the SHA-256 of the token a free name gets
-- ARGV[3]  the name as the join spells it
-- ARGV[4]  seconds a claim lasts without use
-- ARGV[5]  '1' to claim the name when it is free, '0' only to ask
-- Returns {"owned" | "taken" | "claimed" | "free" | "banned", the name as claimed (or ARGV[3] when free), until
-- when it is banned (ms; -1 for good; 0 when it is not)}.
local held = redis.call('HMGET', KEYS[1], 't', 'n', 'b')
local banned = tonumber(held[3])
if banned then
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  if banned == -1 or banned > now then
    return {'banned', held[2] or ARGV[3], banned}
  end
end
if held[1] then
  if ARGV[1] ~= '' and held[1] == ARGV[1] then
    redis.call('EXPIRE', KEYS[1], ARGV[4])
    return {'owned', held[2], 0}
  end
  return {'taken', held[2], 0}
end
if ARGV[5] ~= '1' then
  return {'free', ARGV[3], 0}
end
redis.call('HSET', KEYS[1], 't', ARGV[2], 'n', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {'claimed', ARGV[3], 0}
