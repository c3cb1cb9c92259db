-- Who holds a name (names.py): the claim is a hash of t (the SHA-256 of its token) and n (the name as first
-- claimed), kept for ARGV[4] seconds after the last join that used it.
-- KEYS[1]  the claim (keys.name_key of the folded name)
-- ARGV[1]  the SHA-256 of the token the join offers, or '' for none
-- ARGV[2]  the SHA-256 of the token a free name gets
-- ARGV[3]  the name as the join spells it
-- ARGV[4]  seconds a claim lasts without use
-- ARGV[5]  '1' to claim the name when it is free, '0' only to ask
-- Returns {"owned" | "taken" | "claimed" | "free", the name as claimed (or ARGV[3] when free)}.
local held = redis.call('HMGET', KEYS[1], 't', 'n')
if held[1] then
  if ARGV[1] ~= '' and held[1] == ARGV[1] then
    redis.call('EXPIRE', KEYS[1], ARGV[4])
    return {'owned', held[2]}
  end
  return {'taken', held[2]}
end
if ARGV[5] ~= '1' then
  return {'free', ARGV[3]}
end
redis.call('HSET', KEYS[1], 't', ARGV[2], 'n', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {'claimed', ARGV[3]}
