-- Moves a room's log from the key layout before hash tags to the current one (RENAME keeps its entries, ids and
-- time to live). Standalone Redis only: that layout never ran on a cluster.
-- KEYS[1]  the old key (chat:room:<room>:log)
-- KEYS[2]  the new key (chat:{<room>}:log)
-- Returns 1 when moved, 0 when both exist (left alone: the caller warns), -1 when the old one is gone already.
if redis.call('EXISTS', KEYS[2]) == 1 then
  if redis.call('EXISTS', KEYS[1]) == 1 then
    return 0
  end
  return -1
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
redis.call('RENAME', KEYS[1], KEYS[2])
return 1
