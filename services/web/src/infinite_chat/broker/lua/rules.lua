-- What a room's moderators decided for one name, and how many sockets the name has in the room (a join's check),
-- in one call on the room's node.
-- KEYS[1]  the room's rules (moderation.lua)
-- KEYS[2]  the room's presence counts (presence.lua: name -> its connections in the room, on every replica)
-- ARGV[1]  "b:<folded name>"; ARGV[2] "m:<folded name>"; ARGV[3] the name as claimed (presence's spelling)
-- Returns {banned until, muted until, slow seconds, sockets per name, the name's sockets now}; false for none.
local rules = redis.call('HMGET', KEYS[1], ARGV[1], ARGV[2], 'slow', 'sockets')
return {rules[1], rules[2], rules[3], rules[4], redis.call('HGET', KEYS[2], ARGV[3])}
