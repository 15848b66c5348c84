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
--            are walked whole, the rest split what is left, at least 1 each). With more non-empty
--            lists than that, one message of `limit` of them, taken in turn from ARGV[6]; 0 walks
--            nothing (lengths only). So the walk never exceeds the limit.
-- ARGV[5]  = characters of a delivery tag to report and compare (a prefix)
-- ARGV[6]  = rotation: where in the non-empty lists to start when they cannot all be walked
-- ARGV[7 …] = the markers to look for, for the keys that have some: `<i> <tag prefix> …` with i
--            the key's 1-based index in KEYS
--
-- Returns one string, a line per key in key order: the length alone for a list not walked (`0`
-- for an empty one), else nine space-separated fields
--   len walked scheduled beyond_visibility farthest_eta buckets first_due newest hits
-- with `-` for an empty field: buckets `bucket:count,...` (0-based), first_due
-- `position:tag:eta_ms:published_ms` (`-` for a missing ETA or stamp), newest a tag, hits
-- `tag:position,...`. Positions count from the head (0); farthest_eta is Unix seconds rounded up
-- (0: none). Tags are restricted to [A-Za-z0-9-] by tag_of, so the separators are unambiguous.
-- One flat string instead of nested arrays: converting thousands of small Lua tables to a RESP
-- reply cost more than the walk itself (BENCHMARKS-broker.md).
--
-- Cost: the walk copies each message into Lua and searches it for its ETA (and its tag where
-- needed), a few µs per 1.5 KB message; the limit bounds how long Redis is blocked.

local now = tonumber(ARGV[1])
local visibility = tonumber(ARGV[2])
local edges = parse_edges(ARGV[3])
local budget = tonumber(ARGV[4])
local tag_len = tonumber(ARGV[5])
local rotation = tonumber(ARGV[6]) or 0
local concat = table.concat

local hints = {}
for a = 7, #ARGV do
  local index, markers = match(ARGV[a], '^(%d+) (.*)$')
  if index then hints[tonumber(index)] = markers end
end

local lens, nonempty = {}, {}
for i, key in ipairs(KEYS) do
  lens[i] = redis.call('LLEN', key)
  if lens[i] > 0 then nonempty[#nonempty + 1] = i end
end

-- Water-filling without a sort: lists no longer than an equal share of what is left are walked
-- whole; the rest split what remains, at least one message each (which stays within the limit
-- while there are no more non-empty lists than the limit; beyond, the heads of `budget` lists,
-- in turn).
local allowance, remaining, pending = {}, budget, nonempty
if budget <= 0 then
  pending = {}
elseif #nonempty > budget then
  for k = 0, budget - 1 do allowance[nonempty[(rotation + k) % #nonempty + 1]] = 1 end
  pending = {}
end
while #pending > 0 do
  local share = math.max(1, floor(remaining / #pending))
  local rest = {}
  for _, i in ipairs(pending) do
    if lens[i] <= share then
      allowance[i] = lens[i]
      remaining = remaining - lens[i]
    else
      rest[#rest + 1] = i
    end
  end
  if #rest == #pending then
    for _, i in ipairs(rest) do allowance[i] = share end
    break
  end
  pending = rest
end

local function field(n) return n and tostring(n) or '-' end

local PAGE = 100
local lines = {}
for i, key in ipairs(KEYS) do
  local len, walk = lens[i], allowance[i] or 0
  if walk == 0 then
    lines[i] = len
  else
    -- Tables only where needed: most lists hold no scheduled task and no marker.
    local scheduled, beyond, farthest, histogram = 0, 0, 0, nil
    local first_due, newest, hits = '-', nil, nil
    local wanted, unfound = nil, 0
    local hinted = hints[i]
    if hinted then
      wanted = {}
      for marker in string.gmatch(hinted, '%S+') do
        wanted[marker] = true
        unfound = unfound + 1
      end
    end
    local position = 0
    while position < walk do
      local n = math.min(PAGE, walk - position)
      -- LRANGE returns left to right; the head is the last element.
      local page = redis.call('LRANGE', key, -(position + n), -(position + 1))
      for j = #page, 1, -1 do
        local value, tag = page[j], nil
        local eta = eta_of(value)
        if eta and eta > now then
          scheduled = scheduled + 1
          if eta - now > visibility then beyond = beyond + 1 end
          if eta > farthest then farthest = math.ceil(eta) end
          local b = bucket_of(edges, eta - now)
          histogram = histogram or {}
          histogram[b] = (histogram[b] or 0) + 1
        elseif first_due == '-' then
          tag = tag_of(value, tag_len)
          first_due = position .. ':' .. tag .. ':' .. field(eta and floor(eta * 1000)) .. ':'
            .. field(published_ms_of(value) or nil)
        end
        if unfound > 0 then
          tag = tag or tag_of(value, tag_len)
          if wanted[tag] then
            wanted[tag] = nil
            unfound = unfound - 1
            hits = hits or {}
            hits[#hits + 1] = tag .. ':' .. position
          end
        end
        position = position + 1
        -- The walk reached index 0: that message is the newest.
        if position == len then newest = tag or tag_of(value, tag_len) end
      end
      if #page < n then break end
    end
    if not newest and walk > 0 then newest = tag_of(redis.call('LINDEX', key, 0) or '', tag_len) end
    if not newest or newest == '' then newest = '-' end
    local buckets = '-'
    if histogram then
      local flat, parts = sparse(histogram, #edges + 1), {}
      for k = 1, #flat, 2 do parts[#parts + 1] = flat[k] .. ':' .. flat[k + 1] end
      buckets = concat(parts, ',')
    end
    local hit_list = hits and concat(hits, ',') or '-'
    lines[i] = len .. ' ' .. position .. ' ' .. scheduled .. ' ' .. beyond .. ' ' .. farthest .. ' ' .. buckets
      .. ' ' .. first_due .. ' ' .. newest .. ' ' .. hit_list
  end
end
return concat(lines, '\n')
