-- What one client address may still add to Redis: bytes of messages, rooms it creates, and names it claims. An allowance per address
-- that refills evenly over a window (an hour), shared by every replica, so that one address cannot fill Redis
-- however many sockets it opens. The time is Redis's own clock.
-- KEYS[1]  the address's allowance: a hash of b (bytes left), r (rooms left), n (names left), t (when they were
--          counted, ms)
-- ARGV[1]  bytes this message adds
-- ARGV[2]  1 when this message creates its room, else 0
-- ARGV[3]  bytes per window
-- ARGV[4]  rooms per window
-- ARGV[5]  the window, in milliseconds
-- ARGV[6]  1 when a join claims a name, else 0
-- ARGV[7]  names per window
-- Returns {"ok", 0}, or {"quota_exceeded" | "too_many_rooms" | "too_many_names", milliseconds until it would be
-- allowed}; a refusal takes nothing.
local key = KEYS[1]
local size, new_room = tonumber(ARGV[1]), ARGV[2] == '1'
local size_cap, rooms_cap, window = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local new_name, names_cap = ARGV[6] == '1', tonumber(ARGV[7])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local state = redis.call('HMGET', key, 'b', 'r', 't', 'n')
local left_size, left_rooms, left_names = size_cap, rooms_cap, names_cap
if state[3] then
  local elapsed = math.max(0, now - tonumber(state[3]))
  left_size = math.min(size_cap, tonumber(state[1]) + elapsed * size_cap / window)
  left_rooms = math.min(rooms_cap, tonumber(state[2]) + elapsed * rooms_cap / window)
  -- An allowance counted by a release before names were counted has none of its own: a full one.
  left_names = math.min(names_cap, tonumber(state[4] or names_cap) + elapsed * names_cap / window)
end
if new_name and left_names < 1 then
  return {'too_many_names', math.max(1, math.ceil((1 - left_names) * window / names_cap))}
end
if new_room and left_rooms < 1 then
  return {'too_many_rooms', math.max(1, math.ceil((1 - left_rooms) * window / rooms_cap))}
end
if left_size < size then
  return {'quota_exceeded', math.max(1, math.ceil((size - left_size) * window / size_cap))}
end
left_size = left_size - size
if new_room then left_rooms = left_rooms - 1 end
if new_name then left_names = left_names - 1 end
-- Fractions kept as they are: a whole number would lose the refill of every call shorter than its unit.
redis.call('HSET', key, 'b', string.format('%.3f', left_size), 'r', string.format('%.6f', left_rooms),
  'n', string.format('%.6f', left_names), 't', now)
-- Once a whole window has passed the allowance is full again, as if the key had never been.
redis.call('PEXPIRE', key, window)
return {'ok', 0}
