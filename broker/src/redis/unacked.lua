-- Counts kombu's unacked messages per (exchange, routing key) server-side, so a probe never
-- downloads the unacked hash (whose values are whole task messages).
--
-- KEYS[1] = <prefix>unacked        hash: delivery tag -> JSON [message, exchange, routing_key]
-- KEYS[2] = <prefix>unacked_index  zset: delivery tag -> delivery time (seconds)
-- ARGV[1] = delivery time before which an entry is orphaned (now - visibility_timeout)
-- ARGV[2] = scan limit: a larger hash is estimated from a random sample of this many entries
-- ARGV[3] = <prefix>_kombu.binding.  (binding sets of the exchanges seen are returned)
--
-- Returns {hlen, entries_examined, {{exchange, routing_key, count, orphaned}, ...},
--          {{exchange, {binding members}}, ...}}

local total = redis.call('HLEN', KEYS[1])
local limit = tonumber(ARGV[2])

local orphaned = {}
for _, tag in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])) do
  orphaned[tag] = true
end

local groups, order, examined, seen = {}, {}, 0, {}

local function count(tag, value)
  if seen[tag] then return end
  seen[tag] = true
  examined = examined + 1
  -- kombu writes json.dumps([raw, exchange, routing_key]): the two names end the value. Only
  -- names with escapes need a full decode.
  local ex, rk = string.match(string.sub(value, -600), '"([^"\\]*)", "([^"\\]*)"%]$')
  if not ex then
    local ok, decoded = pcall(cjson.decode, value)
    if ok and type(decoded) == 'table' then ex, rk = decoded[2], decoded[3] end
    if type(ex) ~= 'string' then ex = '' end
    if type(rk) ~= 'string' then rk = '' end
  end
  local key = ex .. '\0' .. rk
  local group = groups[key]
  if not group then
    group = {ex, rk, 0, 0}
    groups[key] = group
    order[#order + 1] = group
  end
  group[3] = group[3] + 1
  if orphaned[tag] then group[4] = group[4] + 1 end
end

if total <= limit then
  local cursor = '0'
  repeat
    local page = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', 1000)
    cursor = page[1]
    local kv = page[2]
    for i = 1, #kv, 2 do count(kv[i], kv[i + 1]) end
  until cursor == '0'
else
  local kv = redis.call('HRANDFIELD', KEYS[1], limit, 'WITHVALUES')
  for i = 1, #kv, 2 do count(kv[i], kv[i + 1]) end
end

local bindings, listed = {}, {}
for _, group in ipairs(order) do
  local ex = group[1]
  if ex ~= '' and not listed[ex] then
    listed[ex] = true
    bindings[#bindings + 1] = {ex, redis.call('SMEMBERS', ARGV[3] .. ex)}
  end
end

return {total, examined, order, bindings}
