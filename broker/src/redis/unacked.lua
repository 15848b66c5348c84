-- Counts kombu's unacked messages per (exchange, routing key) server-side, so a probe never
-- downloads the unacked hash (whose values are whole task messages).
--
-- KEYS[1] = <prefix>unacked        hash: delivery tag -> JSON [message, exchange, routing_key]
-- KEYS[2] = <prefix>unacked_index  zset: delivery tag -> delivery time (seconds)
-- ARGV[1] = delivery time at or before which an entry is orphaned (now - visibility_timeout),
--           the bound kombu's restore_visible uses
-- ARGV[2] = scan limit: past this many entries the scan stops, and the counts so far are a sample
--           (scan order follows the hash of the random delivery tags, not the queue)
-- ARGV[3] = <prefix>_kombu.binding.  (the binding sets of the exchanges seen are returned)
-- ARGV[4] = now (Unix seconds)
-- ARGV[5] = visibility_timeout (seconds)
-- ARGV[6] = upper edges (seconds from now) of the due-time histogram buckets, space-separated
--
-- Returns {hlen, entries_examined, {{exchange, routing_key, count, orphaned, scheduled,
--          beyond_visibility, farthest_eta, {bucket, count, ...}}, ...},
--          {{exchange, {binding members}}, ...}}
-- where `scheduled` counts entries whose ETA is still in the future (held by a worker until due),
-- `beyond_visibility` those of them due after their delivery time + visibility_timeout (kombu will
-- restore them to the queue while the worker still holds them: they run more than once), and
-- `farthest_eta` is their latest ETA (Unix seconds, rounded up; 0 when none).
--
-- Cost: about 4 µs per entry of 1.5 KB on a 2-core VM (copying values into Lua dominates), so the
-- limit bounds how long Redis is blocked. HSCAN returns no duplicates here: nothing runs between
-- its calls inside a script, so the hash cannot rehash mid-scan.

local total = redis.call('HLEN', KEYS[1])
local limit = tonumber(ARGV[2])
local now = tonumber(ARGV[4])
local visibility = tonumber(ARGV[5])
local edges = parse_edges(ARGV[6])

local orphaned, any_orphaned = {}, false
for _, tag in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])) do
  orphaned[tag] = true
  any_orphaned = true
end

local groups, order, examined = {}, {}, 0

local function count(tag, value)
  examined = examined + 1
  -- kombu writes json.dumps([raw, exchange, routing_key]): the two names end the value. The match
  -- starts near the end and is anchored there; only names with escapes need a full decode.
  local ex, rk = match(value, '^.*"([^"\\]*)", "([^"\\]*)"%]$', math.max(1, #value - 600))
  if not ex then
    local ok, decoded = pcall(cjson.decode, value)
    if ok and type(decoded) == 'table' then ex, rk = decoded[2], decoded[3] end
    if type(ex) ~= 'string' then ex = '' end
    if type(rk) ~= 'string' then rk = '' end
  end
  local key = ex .. '\0' .. rk
  local group = groups[key]
  if not group then
    group = {ex, rk, 0, 0, 0, 0, 0, {}}
    groups[key] = group
    order[#order + 1] = group
  end
  group[3] = group[3] + 1
  if any_orphaned and orphaned[tag] then group[4] = group[4] + 1 end
  local eta = eta_of(value)
  if eta and eta > now then
    group[5] = group[5] + 1
    -- Due further ahead than the timeout from now: certainly beyond it (delivered <= now);
    -- otherwise it depends on when it was delivered.
    if eta - now > visibility then
      group[6] = group[6] + 1
    else
      local delivered = tonumber(redis.call('ZSCORE', KEYS[2], tag))
      if delivered and eta > delivered + visibility then group[6] = group[6] + 1 end
    end
    if eta > group[7] then group[7] = math.ceil(eta) end
    local b = bucket_of(edges, eta - now)
    group[8][b] = (group[8][b] or 0) + 1
  end
end

-- Small pages keep the Lua heap small; larger ones measured slower.
local cursor = '0'
repeat
  local page = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', 100)
  cursor = page[1]
  local kv = page[2]
  for i = 1, #kv, 2 do count(kv[i], kv[i + 1]) end
until cursor == '0' or examined >= limit

local bindings, listed = {}, {}
for _, group in ipairs(order) do
  group[8] = sparse(group[8], #edges + 1)
  local ex = group[1]
  if ex ~= '' and not listed[ex] then
    listed[ex] = true
    bindings[#bindings + 1] = {ex, redis.call('SMEMBERS', ARGV[3] .. ex)}
  end
end

return {total, examined, order, bindings}
