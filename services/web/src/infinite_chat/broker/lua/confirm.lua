-- Moves a room's confirmed position forward to a message its primary's replicas now have (WAIT said so), and tells
-- the replicas hearing the room, which then show every message up to it. Replication keeps the primary's order, so
-- a replica that has this message has every one before it: the position only ever moves forward, and a
-- confirmation that comes after a later one changes nothing.
-- KEYS[1]  the room's confirmed position (a message id)
-- ARGV[1]  the message id confirmed
-- ARGV[2]  the room's channel
-- ARGV[3]  the room's name
-- ARGV[4]  seconds without a message after which the room's keys are dropped (as the log's)
local function after(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
  a_ms, b_ms = tonumber(a_ms), tonumber(b_ms)
  return a_ms > b_ms or (a_ms == b_ms and tonumber(a_seq) > tonumber(b_seq))
end

local current = redis.call('GET', KEYS[1])
if current and not after(ARGV[1], current) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4])
redis.call('SPUBLISH', ARGV[2], ARGV[3] .. '\n\nconfirmed\n' .. ARGV[1])
return 1
