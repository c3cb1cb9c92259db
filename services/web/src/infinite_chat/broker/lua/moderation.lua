-- A moderator's rule for a room, kept in the room's rules (a hash with no time to live: only moderators write it, and
-- eviction must not lift a ban), and published to the room's members on every replica, in one step.
-- KEYS[1]  the room's rules (keys.rules_key): "m:<folded name>" and "b:<folded name>" -> until (ms since the epoch,
--          -1 for good), "slow" -> seconds between one person's messages, "sockets" -> sockets one name may have
--          in the room (instead of NAME_SOCKETS)
-- KEYS[2]  the room's last message per name while slow mode is on (keys.spoke_key)
-- ARGV[1]  the field to set, or "" to set nothing (a chat-wide ban, announced in the room)
-- ARGV[2]  its value; "0" lifts the rule
-- ARGV[3]  the room's channel
-- ARGV[4]  "<room>\n\nmoderation\n<action>\n<folded name>\n<frame>"
if ARGV[1] ~= '' then
  if ARGV[2] == '0' then
    redis.call('HDEL', KEYS[1], ARGV[1])
    if ARGV[1] == 'slow' then
      redis.call('DEL', KEYS[2])
    end
  else
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  end
end
redis.call('SPUBLISH', ARGV[3], ARGV[4])
return 0
