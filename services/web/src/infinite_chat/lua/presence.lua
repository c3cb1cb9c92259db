-- Who is online in one room. A sorted set of "<connection id>|<name>", each scored with the time (Redis's own
-- clock, so the replicas' clocks do not matter) after which it counts as gone unless its replica renews it.
-- A name is online while any of its connections is; join and leave events are published only when that changes,
-- through the same channel as messages.
-- KEYS[1]  the room's presence set
-- ARGV[1]  "join" | "leave" | "refresh"
-- ARGV[2]  time to live of an entry, in milliseconds
-- ARGV[3]  at most this many names in an event's "online" list (online_count always has the total)
-- ARGV[4]  the fan-out channel
-- ARGV[5]  the room's name
-- ARGV[6...]  the connection entries ("<connection id>|<name>") this call is about
local key = KEYS[1]
local action, ttl, list_max, channel, room = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
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

local function announce(event, name)
  local names, count = online()
  redis.call('PUBLISH', channel, room .. '\n\n' .. '{"type":"presence","event":"' .. event .. '","name":'
    .. cjson.encode(name) .. ',"online":' .. encode_names(names) .. ',"online_count":' .. count .. '}')
end

-- Entries whose replica stopped renewing them (it died without saying goodbye): their names leave.
local function sweep()
  local expired = redis.call('ZRANGEBYSCORE', key, '-inf', now)
  if #expired == 0 then return end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local _, _, seen = online()
  local gone = {}
  for _, entry in ipairs(expired) do
    local name = name_of(entry)
    if not seen[name] and not gone[name] then
      gone[name] = true
      announce('leave', name)
    end
  end
end

sweep()
if action == 'join' or action == 'refresh' then
  local _, _, seen = online()
  for i = 6, #ARGV do
    local entry = ARGV[i]
    -- A refresh re-adds an entry that was swept (its replica lost Redis for longer than the TTL).
    local added = redis.call('ZADD', key, now + ttl, entry)
    local name = name_of(entry)
    if added == 1 and not seen[name] then
      seen[name] = true
      announce('join', name)
    end
  end
elseif action == 'leave' then
  for i = 6, #ARGV do
    local entry = ARGV[i]
    if redis.call('ZREM', key, entry) == 1 then
      local _, _, seen = online()
      if not seen[name_of(entry)] then announce('leave', name_of(entry)) end
    end
  end
end
-- The set lives as long as someone renews it.
redis.call('PEXPIRE', key, ttl * 2)
local names, count = online()
return {encode_names(names), count}
