-- Who is online in one room, and its presence events. Every call costs O(log N) in the room's size per entry it is
-- about, per expired entry it sweeps (at most ARGV[7]), per name it lists and per name of an event it publishes (at
-- most 2 * ARGV[3]): nothing here reads the whole room.
--
-- A name is online while any of its connections is. Each change (a name comes online or goes) is recorded against
-- the state at the room's last presence event, and events go out at most once per room per interval: the first
-- change after a quiet interval at once, later ones when the interval is over, as one event with the net change.
-- A name that changes back before the next event cancels out, unless someone read the list in between (a join's
-- welcome, a page of the HTTP API): that reader saw it changed, so the next event says where it stands now. So the
-- welcome's list (or a page), with each later event applied, is exactly who is online. An event is published through
-- the same channel as messages, as "<room>\n\n<event>\n<name>\n<count>\n<truncated>\n<joined>\n<left>" (the lists as
-- JSON; names hold no newline); each replica builds the frame (protocol.py) as it hears it.
-- KEYS[1]  the room's connections: a sorted set of "<connection id>|<name>", each scored with the time (Redis's own
--          clock, ms, so the replicas' clocks do not matter) after which it is gone unless its replica renews it
-- KEYS[2]  the room's names online, with how many connections each has in KEYS[1]: a hash of name -> count
-- KEYS[3]  the room's names online as a sorted set, every score 0, so ordered by their bytes (UTF-8: by code point)
-- KEYS[4]  the change since the room's last event: a sorted set of "+<name>" (came online) and "-<name>" (went),
--          every score 0
-- KEYS[5]  for each name in KEYS[4], how many list reads there had been when it was recorded, or "read" once one has
--          seen it: a hash
-- KEYS[6]  the room's presence events: a hash of at (when the last event went out, ms), event and name (the last
--          change), reads (lists read since the last event while a change waited)
-- ARGV[1]  "join" | "leave" | "refresh" | "flush" (publish a waiting change if it is due) | "page" (read the list)
-- ARGV[2]  time to live of an entry, in milliseconds
-- ARGV[3]  at most this many names in a welcome's list and in each of an event's joined and left lists
-- ARGV[4]  the room's channel (chat:{<room>}:channel)
-- ARGV[5]  the room's name
-- ARGV[6]  the room's presence interval, in milliseconds
-- ARGV[7]  at most this many expired entries are swept per call
-- ARGV[8...]  the connection entries this call is about; for "page": the name to list after ("" for the first) and
--          how many to list
-- Returns the names listed (for a join, the first ARGV[3] names online; for a page, the page; else none), how many
-- names are online, and the milliseconds until the room wants another call (0 when it does not): a waiting change is
-- due, or expired entries are left to sweep (then 1). The caller asks again ("flush") then.
local connections, counts, names, changes, change_reads, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local action, ttl, list_max, channel, room = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
local interval, sweep_max = tonumber(ARGV[6]), tonumber(ARGV[7])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function name_of(entry)
  return string.sub(entry, string.find(entry, '|', 1, true) + 1)
end

-- A change against the state at the last event. The opposite change of the same name undoes it, if no list was read
-- since: else the reader saw it changed, and the next event must say where it stands now whatever happens next.
-- Returns whether it recorded a new change (true) or undid or updated one (false).
local function changed(sign, name)
  local opposite = (sign == '+') and '-' or '+'
  local reads = redis.call('HGET', events, 'reads') or '0'
  local recorded = redis.call('HGET', change_reads, name)
  redis.call('HSET', events, 'event', (sign == '+') and 'join' or 'leave', 'name', name)
  if not recorded then
    redis.call('ZADD', changes, 0, sign .. name)
    redis.call('HSET', change_reads, name, reads)
    return true
  elseif recorded == reads then
    redis.call('ZREM', changes, opposite .. name)
    redis.call('HDEL', change_reads, name)
  else
    redis.call('ZREM', changes, opposite .. name)
    redis.call('ZADD', changes, 0, sign .. name)
    redis.call('HSET', change_reads, name, 'read')
  end
  return false
end

-- A read of the list (a welcome, a page) while changes wait: from now on they cannot cancel out unannounced.
local function read()
  if redis.call('EXISTS', changes) == 0 then return nil end
  return redis.call('HINCRBY', events, 'reads', 1)
end

-- The names set says whether a name is online; the counts say how many of its connections remain. (Were one of
-- the two ever lost, by eviction, a count at zero or below is dropped and a name never leaves twice.)
local function gained(name)
  redis.call('HINCRBY', counts, name, 1)
  return redis.call('ZADD', names, 0, name) == 1 and changed('+', name)
end

local function lost(name)
  if redis.call('HINCRBY', counts, name, -1) <= 0 then
    redis.call('HDEL', counts, name)
    if redis.call('ZREM', names, name) == 1 then changed('-', name) end
  end
end

-- Entries whose replica stopped renewing them (it died without saying goodbye, or lost Redis for longer than the
-- TTL): their connections are gone. A bounded number per call, so no call holds Redis long however many a dead
-- replica left behind; the rest go on the next call, which the caller makes at once.
local expired = redis.call('ZRANGEBYSCORE', connections, '-inf', now, 'LIMIT', 0, sweep_max)
for _, entry in ipairs(expired) do
  redis.call('ZREM', connections, entry)
  lost(name_of(entry))
end
local unswept = #expired == sweep_max and redis.call('ZCOUNT', connections, '-inf', now) > 0

if action == 'join' then
  local entry = ARGV[8]
  local name = name_of(entry)
  if redis.call('ZADD', connections, now + ttl, entry) == 1 and gained(name) then
    -- The welcome reads the list with the joiner's own change in it; that read alone must not keep the change
    -- from cancelling out (the joiner leaves the room before its name can), so the change counts from after it.
    local reads = read()
    if reads then redis.call('HSET', change_reads, name, reads) end
  else
    read()
  end
elseif action == 'refresh' then
  for i = 8, #ARGV do
    local entry = ARGV[i]
    -- Added (not renewed): a refresh of an entry that was swept meanwhile.
    if redis.call('ZADD', connections, now + ttl, entry) == 1 then gained(name_of(entry)) end
  end
elseif action == 'leave' then
  for i = 8, #ARGV do
    local entry = ARGV[i]
    if redis.call('ZREM', connections, entry) == 1 then lost(name_of(entry)) end
  end
end

local function encode_names(list)
  -- cjson writes an empty table as {}, and the protocol says a list.
  if #list == 0 then return '[]' end
  return cjson.encode(list)
end

-- Up to list_max changed names of one sign, without the sign, and whether there were more.
local function changed_names(first, after)
  local list = redis.call('ZRANGEBYLEX', changes, first, after, 'LIMIT', 0, list_max)
  local more = #list == list_max and redis.call('ZLEXCOUNT', changes, first, after) > list_max
  for i, member in ipairs(list) do list[i] = string.sub(member, 2) end
  return list, more
end

local wait = 0
-- Nothing waits when there is no net change: also when every change since the last event has cancelled out.
if redis.call('EXISTS', changes) == 1 then
  local state = redis.call('HMGET', events, 'at', 'event', 'name')
  local at = tonumber(state[1] or '') or 0
  if now - at >= interval then
    local joined, more_joined = changed_names('[+', '(,')
    local left, more_left = changed_names('[-', '(.')
    local event, name = state[2], state[3]
    -- The last change names a net change, unless it undid an earlier one: then another net change does.
    if not (event and redis.call('ZSCORE', changes, ((event == 'join') and '+' or '-') .. name)) then
      if #joined > 0 then event, name = 'join', joined[1] else event, name = 'leave', left[1] end
    end
    local truncated = (more_joined or more_left) and '1' or '0'
    local payload = room .. '\n\n' .. event .. '\n' .. name .. '\n' .. redis.call('ZCARD', names) .. '\n'
      .. truncated .. '\n' .. encode_names(joined) .. '\n' .. encode_names(left)
    redis.call('SPUBLISH', channel, payload)
    redis.call('DEL', changes, change_reads)
    redis.call('HSET', events, 'at', now, 'reads', 0)
  else
    wait = at + interval - now
  end
end
if unswept then wait = 1 end

local listed = {}
if action == 'join' or action == 'page' then
  local from, limit = '-', list_max
  if action == 'page' then
    if ARGV[8] ~= '' then from = '(' .. ARGV[8] end
    limit = tonumber(ARGV[9])
  end
  listed = redis.call('ZRANGEBYLEX', names, from, '+', 'LIMIT', 0, limit)
  if action == 'page' then read() end
end
-- All live as long as someone in the room renews them, and expire together when nobody does.
for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ttl * 2) end
return {listed, redis.call('ZCARD', names), wait}
