-- Publishes the names a replica heard typing in a room (typists.py) to every replica hearing the room. A script only
-- so that a cluster runs it on the node of the room's slot, where its shard channel is: nothing is stored.
-- KEYS[1]  the room's log (not touched: it names the slot)
-- ARGV[1]  the room's channel
-- ARGV[2]  "<room>\n\ntyping\n<names as JSON>"
redis.call('SPUBLISH', ARGV[1], ARGV[2])
return 0
