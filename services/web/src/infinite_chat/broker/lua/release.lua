-- Gives up a claimed name (claim.lua's hash), if the token offered is its own; a ban on the name (b) stays.
-- KEYS[1]  the claim
-- ARGV[1]  the SHA-256 of the token offered
-- Returns 1 when the name is free now (released, or nobody's already), 0 when it is someone else's.
local held = redis.call('HGET', KEYS[1], 't')
if not held then
  return 1
end
if held ~= ARGV[1] then
  return 0
end
redis.call('HDEL', KEYS[1], 't', 'n')
return 1
