-- Who is online in one room. A sorted set of "<connection id>|<name>", each scored with the time (Redis's own
-- clock, so the replicas' clocks do not matter) after which it counts as gone unless its replica renews it.
-- A name is online while any of its connections is. A change (a name comes online or goes) is published through
-- the same channel as messages (as "<room>\n\n<event>\n<name>\n<count>\n<names as a JSON list>"; names hold no
-- newline), at most once per room per interval: a change within the interval after the last
-- event waits, and the event that ends the wait carries the state after every change meanwhile, with the last
-- change as its event and name. So a burst of joins and leaves costs the room one event per interval.
-- KEYS[1]  the room's presence set
-- KEYS[2]  the room's presence events: a hash of at (when the last event went out, ms), due (1 while a change
--          waits), event and name (the last change)
-- ARGV[1]  "join" | "leave" | "refresh" | "flush" (publish a waiting change if it is due)
-- ARGV[2]  time to live of an entry, in milliseconds
-- ARGV[3]  at most this many names in an event's "online" list (online_count always has the total)
-- ARGV[4]  the room's channel (chat:{<room>}:channel)
-- ARGV[5]  the room's name
-- ARGV[6]  the room's presence interval, in milliseconds
-- ARGV[7...]  the connection entries ("<connection id>|<name>") this call is about
-- Returns the names online (JSON list, at most ARGV[3]), their number, and the milliseconds until a waiting change
-- is due (0 when none waits): the caller asks again ("flush") then.
local key, events = KEYS[1], KEYS[2]
local action, ttl, list_max, channel, room = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
local interval = tonumber(ARGV[6])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function name_of(entry)
  return string.sub(entry, string.find(entry, '|', 1, true) + 1)
end

-- Names online now, sorted and without repeats; the first list_max of them, and how many in all.
local function online()
  local seen, names = {}, {}
  for _, entry in ipairs(redis.call('ZRANGEBYSCORE', key, '(' .. now, '+inf')) do
    local name = name_of(entry)
    if not seen[name] then
      seen[name] = true
      names[#names + 1] = name
    end
  end
  table.sort(names)
  local count = #names
  for i = count, list_max + 1, -1 do names[i] = nil end
  return names, count, seen
end

local function encode_names(names)
  -- cjson writes an empty table as {}, and the protocol says a list.
  if #names == 0 then return '[]' end
  return cjson.encode(names)
end

local change_event, change_name = nil, nil

-- Entries whose replica stopped renewing them (it died without saying goodbye): their names leave.
local function sweep()
  local expired = redis.call('ZRANGEBYSCORE', key, '-inf', now)
  if #expired == 0 then return end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local _, _, seen = online()
  for _, entry in ipairs(expired) do
    local name = name_of(entry)
    if not seen[name] then change_event, change_name = 'leave', name end
  end
end

sweep()
if action == 'join' or action == 'refresh' then
  local _, _, seen = online()
  for i = 7, #ARGV do
    local entry = ARGV[i]
    -- A refresh re-adds an entry that was swept (its replica lost Redis for longer than the TTL).
    local added = redis.call('ZADD', key, now + ttl, entry)
    local name = name_of(entry)
    if added == 1 and not seen[name] then
      seen[name] = true
      change_event, change_name = 'join', name
    end
  end
elseif action == 'leave' then
  for i = 7, #ARGV do
    local entry = ARGV[i]
    if redis.call('ZREM', key, entry) == 1 then
      local _, _, seen = online()
      if not seen[name_of(entry)] then change_event, change_name = 'leave', name_of(entry) end
    end
  end
end

if change_event then
  redis.call('HSET', events, 'due', '1', 'event', change_event, 'name', change_name)
end
local wait = 0
local state = redis.call('HMGET', events, 'at', 'due', 'event', 'name')
if state[2] == '1' then
  local at = tonumber(state[1] or '') or 0
  if now - at >= interval then
    local names, count = online()
    -- The fields, not the frame: each replica builds the presence object (protocol.py) as it hears this.
    redis.call('SPUBLISH', channel, room .. '\n\n' .. state[3] .. '\n' .. state[4] .. '\n' .. count .. '\n'
      .. encode_names(names))
    redis.call('HSET', events, 'at', now, 'due', '0')
  else
    wait = at + interval - now
  end
end
-- Both live as long as someone renews the set.
redis.call('PEXPIRE', key, ttl * 2)
redis.call('PEXPIRE', events, ttl * 2)
local names, count = online()
return {encode_names(names), count, wait}
