-- Appends one message to a room's log and publishes it on the room's channel in the same atomic step, so that
-- publish order is log order (every client sees the same order) and nothing is published that is not stored.
-- A say retried with the same name and ref within the retry window is not stored again: the reply names the message
-- stored the first time.
-- KEYS[1]  the room's log (a stream)
-- KEYS[2]  the room's confirmed position (keys.confirmed_key), kept only when ARGV[8] is "1"
-- KEYS[3]  the refs of this retry window (a hash "<name>\n<ref>" -> id; field "" holds when the window began)
-- KEYS[4]  the refs of the window before
-- KEYS[5]  the room's rules (moderation.lua): a muted sender, or one who spoke too recently in slow mode, is refused
-- KEYS[6]  the room's last message per name while slow mode is on
-- ARGV[1]  the message body: the tail of its JSON object, `"room":...}` (the id and time are added by readers)
-- ARGV[2]  entries to retain at least (MAXLEN ~ trims whole stream nodes, so a few more may stay)
-- ARGV[3]  the room's channel (chat:{<room>}:channel)
-- ARGV[4]  the room's name
-- ARGV[5]  seconds without a message after which the log is dropped
-- ARGV[6]  "<name>\n<ref>", or "" for a say without a ref (it cannot be told from a retry, so it is always stored)
-- ARGV[7]  the retry window, in milliseconds
-- ARGV[8]  "1" when messages are confirmed by replicas (confirm.lua), "0" when not
-- ARGV[9]  the sender's folded name (names.fold), as the rules know it
-- ARGV[10] "1" for a moderator, whom the rules do not hold back
-- Returns {id, 0, false} for a message stored now, {id, 1, body} for a retry of one stored before (body false
-- once it has been trimmed from the log), and {false, "muted" | "slow_mode", milliseconds until it may send} for a
-- refusal (-1: until a moderator lifts it).
local field = ARGV[6]
if field ~= '' then
  local known = redis.call('HGET', KEYS[3], field) or redis.call('HGET', KEYS[4], field)
  if known then
    -- Renewing the expiry is a write: a WAIT after this script then covers the first try too, wherever it was made.
    redis.call('EXPIRE', KEYS[1], ARGV[5])
    local entry = redis.call('XRANGE', KEYS[1], known, known)
    return {known, 1, entry[1] and entry[1][2][2] or false}
  end
end

local slow = 0
if ARGV[10] ~= '1' then
  local rules = redis.call('HMGET', KEYS[5], 'm:' .. ARGV[9], 'slow')
  local muted, every = tonumber(rules[1]), tonumber(rules[2])
  if muted or every then
    local time = redis.call('TIME')
    local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
    if muted and (muted == -1 or muted > now) then
      return {false, 'muted', muted == -1 and -1 or muted - now}
    end
    if every then
      local last = tonumber(redis.call('HGET', KEYS[6], ARGV[9]))
      if last and now - last < every * 1000 then
        return {false, 'slow_mode', every * 1000 - (now - last)}
      end
      redis.call('HSET', KEYS[6], ARGV[9], now)
      redis.call('PEXPIRE', KEYS[6], every * 1000)
    end
  end
end

if ARGV[8] == '1' and redis.call('EXISTS', KEYS[2]) == 0 then
  -- The first message since the room's log began (or since confirmation was turned on): what the log holds already
  -- was written before and counts as confirmed.
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  redis.call('SET', KEYS[2], last[1] and last[1][1] or '0-0', 'EX', ARGV[5])
end

local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'b', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
if ARGV[8] == '1' then
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end

if field ~= '' then
  -- Two hashes in turn instead of one field per expiry (Redis 7.0 has no expiry per field): a ref is remembered for
  -- one to two windows, and each hash holds at most a window's refs of the room.
  local window = tonumber(ARGV[7])
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  local began = tonumber(redis.call('HGET', KEYS[3], '') or '')
  if began and now - began >= window then
    redis.call('RENAME', KEYS[3], KEYS[4])
    redis.call('PEXPIRE', KEYS[4], window)
    began = nil
  end
  if not began then
    redis.call('HSET', KEYS[3], '', now)
  end
  redis.call('HSET', KEYS[3], field, id)
  redis.call('PEXPIRE', KEYS[3], 2 * window)
end

redis.call('SPUBLISH', ARGV[3], ARGV[4] .. '\n' .. id .. '\n' .. ARGV[1])
return {id, 0, false}
