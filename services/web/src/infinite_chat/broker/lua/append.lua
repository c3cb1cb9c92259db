-- Appends one message to a room's log and publishes it on the room's channel in the same atomic step, so that
-- publish order is log order (every client sees the same order) and nothing is published that is not stored.
-- KEYS[1]  the room's log (a stream)
-- ARGV[1]  the message body: the tail of its JSON object, `"room":...}` (the id and time are added by readers)
-- ARGV[2]  entries to retain at least (MAXLEN ~ trims whole stream nodes, so a few more may stay)
-- ARGV[3]  the room's channel (chat:{<room>}:channel)
-- ARGV[4]  the room's name
-- ARGV[5]  seconds without a message after which the log is dropped
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'b', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('SPUBLISH', ARGV[3], ARGV[4] .. '\n' .. id .. '\n' .. ARGV[1])
return id
