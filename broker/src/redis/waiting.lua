-- Walks each queue's priority lists from the head (index -1, the next message a worker pops) and
-- reports, per list, what Celery will do with the messages there, server-side, so no task body
-- leaves Redis:
-- - how many are scheduled (ETA in the future; e.g. put back by a worker's warm shutdown, which
--   RPUSHes held messages to the head) and when they come due;
-- - the first due message (its place, delivery tag, ETA and publish stamp) and where the latency
--   tracker's markers are, so the tracker can tell how long the oldest due task has waited.
--
-- KEYS     = every priority list of every probed queue
-- ARGV[1]  = now (Unix seconds)
-- ARGV[2]  = visibility_timeout (seconds)
-- ARGV[3]  = upper edges (seconds from now) of the due-time histogram buckets, space-separated
-- ARGV[4]  = scan limit: messages walked in all lists together (shared out fairly: short lists
--            are walked whole, the rest split what is left; every non-empty list gets at least 1)
-- ARGV[5]  = characters of a delivery tag to report and compare (a prefix)
-- ARGV[5 + i] = the markers to look for in KEYS[i], space-separated tag prefixes ('' for none)
--
-- Returns, per key, {len, walked, scheduled, beyond_visibility, farthest_eta,
--   {bucket, count, ...}, first_due, newest_tag, {marker, position, ...}}
-- where first_due is {position, tag, eta_ms or false, published_ms or false} or {} and positions
-- count from the head (0). `farthest_eta` is in Unix seconds rounded up, 0 when none.
--
-- Cost: the walk copies each message into Lua and searches it twice (ETA, and the tag while
-- markers are still unfound), a few µs per 1.5 KB message; the limit bounds how long Redis is
-- blocked (BENCHMARKS-broker.md).

local now = tonumber(ARGV[1])
local visibility = tonumber(ARGV[2])
local edges = parse_edges(ARGV[3])
local budget = tonumber(ARGV[4])
local tag_len = tonumber(ARGV[5])

local lens, nonempty = {}, {}
for i, key in ipairs(KEYS) do
  lens[i] = redis.call('LLEN', key)
  if lens[i] > 0 then nonempty[#nonempty + 1] = i end
end

-- Water-filling: shortest lists first, each gets min(its length, an equal share of what is left).
table.sort(nonempty, function(a, b) return lens[a] < lens[b] end)
local allowance, left = {}, budget
for k, i in ipairs(nonempty) do
  local share = math.max(1, floor(left / (#nonempty - k + 1)))
  allowance[i] = math.min(lens[i], share)
  left = math.max(0, left - allowance[i])
end

local PAGE = 100
local out = {}
for i, key in ipairs(KEYS) do
  local len, walk = lens[i], allowance[i] or 0
  local scheduled, beyond, farthest, histogram = 0, 0, 0, {}
  local first_due, newest, hits = {}, '', {}
  local wanted, unfound = {}, 0
  for marker in string.gmatch(ARGV[5 + i] or '', '%S+') do
    wanted[marker] = true
    unfound = unfound + 1
  end
  local position = 0
  while position < walk do
    local n = math.min(PAGE, walk - position)
    -- LRANGE returns left to right; the head is the last element.
    local page = redis.call('LRANGE', key, -(position + n), -(position + 1))
    for j = #page, 1, -1 do
      local value = page[j]
      local eta = eta_of(value)
      if eta and eta > now then
        scheduled = scheduled + 1
        if eta - now > visibility then beyond = beyond + 1 end
        if eta > farthest then farthest = math.ceil(eta) end
        local b = bucket_of(edges, eta - now)
        histogram[b] = (histogram[b] or 0) + 1
      elseif first_due[1] == nil then
        first_due = {position, tag_of(value, tag_len), eta and floor(eta * 1000) or false, published_ms_of(value)}
      end
      if unfound > 0 then
        local tag = tag_of(value, tag_len)
        if wanted[tag] then
          wanted[tag] = nil
          unfound = unfound - 1
          hits[#hits + 1] = tag
          hits[#hits + 1] = position
        end
      end
      position = position + 1
    end
    if #page < n then break end
  end
  if len > 0 then newest = tag_of(redis.call('LINDEX', key, 0) or '', tag_len) end
  out[i] = {len, position, scheduled, beyond, farthest, sparse(histogram, #edges + 1), first_due, newest, hits}
end
return out
