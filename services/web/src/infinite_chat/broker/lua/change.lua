-- Changes a message of a room's log: an edit, a deletion or a reaction. The change is checked against the message
-- and its current state, recorded in that state (what readers of the log show the message as), appended to the log
-- as an entry after the message and published, all in one atomic step, as append.lua does for a message.
-- KEYS[1]  the room's log (a stream)
-- KEYS[2]  the room's confirmed position (keys.confirmed_key), kept only when ARGV[9] is "1"
-- KEYS[3]  the room's changed messages (a hash: message id -> its state as JSON, below)
-- KEYS[4]  the same messages by time (a sorted set: id scored by its milliseconds), to forget trimmed ones
-- KEYS[5]  the room's rules (moderation.lua): a muted name may delete its own messages, not edit or react
-- ARGV[1]  the change: "edit", "delete" or "reaction"
-- ARGV[2]  the message's id
-- ARGV[3]  who changes it (the name of the connection)
-- ARGV[4]  the change's body: the tail of its JSON object, `"room":...}`; a reaction's count is added here
-- ARGV[5]  entries to retain at least
-- ARGV[6]  the room's channel
-- ARGV[7]  the room's name
-- ARGV[8]  seconds without a message after which the room's keys are dropped
-- ARGV[9]  "1" when messages are confirmed by replicas (confirm.lua), "0" when not
-- ARGV[10] the edit window, in milliseconds
-- ARGV[11] a reaction's emoji; ARGV[12] "1" to add it, "0" to take it away
-- ARGV[13] reactions one message may hold
-- ARGV[14] the folded name of who changes it, as the rules know it
-- ARGV[15] "1" for a moderator: not held back by the rules, and may delete anyone's message (marked "moderated")
-- A message's state: {"e": latest edit's id, "x": its body, "d": deletion's id, "m": 1 when a moderator deleted
-- someone else's message, "r": [[emoji, [name, ...]], ...]}.
-- Returns {id, "ok"} for a change made, {newest id of the log, "no_change"} when the message is already as asked,
-- and {false, code} for a refusal (unknown_message, not_yours, message_deleted, edit_window_closed,
-- too_many_reactions), {false, "muted", milliseconds left (-1: until lifted)} for a muted name.
local kind, target, name = ARGV[1], ARGV[2], ARGV[3]
local moderator = ARGV[15] == '1'
if kind ~= 'delete' and not moderator then
  local muted = tonumber(redis.call('HGET', KEYS[5], 'm:' .. ARGV[14]))
  if muted then
    local time = redis.call('TIME')
    local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
    if muted == -1 or muted > now then
      return {false, 'muted', muted == -1 and -1 or muted - now}
    end
  end
end
local found = redis.call('XRANGE', KEYS[1], target, target)
local entry = found[1]
-- A message's entry has one field, its body; a change's has its kind too: only messages can be changed.
if not entry or #entry[2] ~= 2 then
  return {false, 'unknown_message'}
end
local message = cjson.decode('{' .. entry[2][2])
local moderated = false
if (kind == 'edit' or kind == 'delete') and message.name ~= name then
  if kind == 'edit' or not moderator then
    return {false, 'not_yours'}
  end
  moderated = true
end
local raw = redis.call('HGET', KEYS[3], target)
local state = raw and cjson.decode(raw) or {}

local function unchanged()
  -- A write, so that a WAIT after this script also covers an earlier try of this change made on another connection.
  redis.call('EXPIRE', KEYS[1], ARGV[8])
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  return {last[1][1], 'no_change'}
end

local body = ARGV[4]
if kind == 'delete' then
  if state.d then
    return unchanged()
  end
  if moderated then
    body = string.sub(body, 1, -2) .. ',"moderated":true}'
  end
elseif state.d then
  return {false, 'message_deleted'}
elseif kind == 'edit' then
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  local sent = tonumber(string.match(target, '^(%d+)-'))
  if now - sent > tonumber(ARGV[10]) then
    return {false, 'edit_window_closed'}
  end
  local current = state.x and cjson.decode('{' .. state.x).text or message.text
  if cjson.decode('{' .. body).text == current then
    return unchanged()
  end
else
  local emoji, on = ARGV[11], ARGV[12] == '1'
  local reactions = state.r or {}
  local total, names, at = 0, nil, nil
  for i, reaction in ipairs(reactions) do
    total = total + #reaction[2]
    if reaction[1] == emoji then
      names, at = reaction[2], i
    end
  end
  local position = nil
  for i, who in ipairs(names or {}) do
    if who == name then
      position = i
    end
  end
  if on == (position ~= nil) then
    return unchanged()
  end
  if on then
    if total >= tonumber(ARGV[13]) then
      return {false, 'too_many_reactions'}
    end
    if names then
      table.insert(names, name)
    else
      names = {name}
      table.insert(reactions, {emoji, names})
    end
  else
    table.remove(names, position)
    if #names == 0 then
      table.remove(reactions, at)
    end
  end
  state.r = (#reactions > 0) and reactions or nil
  body = string.sub(body, 1, -2) .. ',"count":' .. #(names or {}) .. '}'
end

if ARGV[9] == '1' and redis.call('EXISTS', KEYS[2]) == 0 then
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  redis.call('SET', KEYS[2], last[1] and last[1][1] or '0-0', 'EX', ARGV[8])
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'b', body, 'k', kind)
if kind == 'edit' then
  state.e, state.x = id, body
elseif kind == 'delete' then
  state = {d = id, m = moderated and 1 or nil}
end
if next(state) == nil then
  redis.call('HDEL', KEYS[3], target)
else
  redis.call('HSET', KEYS[3], target, cjson.encode(state))
  redis.call('ZADD', KEYS[4], tonumber(string.match(target, '^(%d+)-')), target)
end

-- Forget the states of messages trimmed from the log, a few at a time.
local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
local gone = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. string.match(oldest[1], '^(%d+)-'), 'LIMIT', 0, 10)
for _, old in ipairs(gone) do
  redis.call('HDEL', KEYS[3], old)
  redis.call('ZREM', KEYS[4], old)
end
for i = 1, 4 do
  if i ~= 2 or ARGV[9] == '1' then
    redis.call('EXPIRE', KEYS[i], ARGV[8])
  end
end

redis.call('SPUBLISH', ARGV[6], ARGV[7] .. '\n' .. id .. '\n' .. kind .. '\n' .. body)
return {id, 'ok'}
