-- Shared prelude of the probe's scripts (prepended to unacked.lua and waiting.lua): reading a
-- Celery message's ETA, delivery tag and publish stamp without decoding the whole message.
--
-- A kombu message is JSON written by Python's json.dumps: {"body": ..., "content-encoding": ...,
-- "content-type": ..., "headers": {"lang": ..., "task": ..., "id": ..., "shadow": ..., "eta": ...,
-- ...}, "properties": {..., "delivery_tag": "<uuid>"}}. Inside a JSON string every quote is
-- escaped, so the text `"eta": "` can only be a key: the first one is the headers' ETA (protocol
-- 2; null when the task has none, which does not match). A plain find costs a memchr-speed pass
-- over the message instead of a full decode.

local find, sub, match, floor = string.find, string.sub, string.match, math.floor

-- Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- Seconds since the epoch of the date and time `YYYY-MM-DD[T ]HH:MM:SS` (no zone), memoised per
-- script run: tasks sent in a burst share their ETA's second, and the full parse dominates the
-- cost of reading an ETA.
local seconds_of = {}
local function civil_seconds(head)
  local cached = seconds_of[head]
  if cached ~= nil then return cached end
  local y, mo, d, h, mi, sec = match(head, '^(%d%d%d%d)%-(%d%d)%-(%d%d)[T ](%d%d):(%d%d):(%d%d)$')
  local value = false
  if y then
    y, mo, d, h, mi, sec = tonumber(y), tonumber(mo), tonumber(d), tonumber(h), tonumber(mi), tonumber(sec)
    if mo >= 1 and mo <= 12 and d >= 1 and d <= 31 and h <= 23 and mi <= 59 and sec <= 60 then
      value = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec
    end
  end
  seconds_of[head] = value
  return value
end

-- ISO 8601 as Celery writes it (YYYY-MM-DD[T ]HH:MM:SS[.fraction][Z|+HH:MM|+HHMM|+HH]) to Unix
-- seconds; naive times read as UTC. Mirrors celery_broker::schedule::parse_eta.
local function parse_eta(s)
  local base = civil_seconds(sub(s, 1, 19))
  if not base then return nil end
  local rest = sub(s, 20)
  local frac = 0
  if sub(rest, 1, 1) == '.' then
    local digits = match(rest, '^%.(%d+)')
    if not digits then return nil end
    frac = tonumber('0.' .. digits)
    rest = sub(rest, #digits + 2)
  end
  local offset = 0
  if rest ~= '' and rest ~= 'Z' then
    local sign, oh, om = match(rest, '^([+-])(%d%d):(%d%d)$')
    if not sign then sign, oh, om = match(rest, '^([+-])(%d%d)(%d%d)$') end
    if not sign then
      sign, oh = match(rest, '^([+-])(%d%d)$')
      om = '00'
    end
    if not sign then return nil end
    offset = (tonumber(oh) * 60 + tonumber(om)) * 60
    if sign == '-' then offset = -offset end
  end
  return base + frac - offset
end

-- The message's ETA in Unix seconds, or nil.
local function eta_of(value)
  local at = find(value, '"eta": "', 1, true)
  if not at then return nil end
  local stop = find(value, '"', at + 8, true)
  if not stop then return nil end
  return parse_eta(sub(value, at + 8, stop - 1))
end

-- The first `len` characters of the delivery tag (kombu's last property, so looked for near the
-- end first), or '' when there is none or it holds characters other than [A-Za-z0-9-] (kombu's
-- are UUIDs; replies use other characters as separators).
local function tag_of(value, len)
  local key = '"delivery_tag": "'
  local at = find(value, key, math.max(1, #value - 200), true) or find(value, key, 1, true)
  if not at then return '' end
  local tag = sub(value, at + #key, at + #key + len - 1)
  if not match(tag, '^[%w%-]*$') then return '' end
  return tag
end

-- properties.published_at (Judoscale's before_task_publish stamp, Unix seconds) or a header of
-- that name, in Unix milliseconds; false when absent.
local function published_ms_of(value)
  local at = find(value, '"published_at": ', 1, true)
  if not at then return false end
  local n = tonumber(match(value, '^[%d%.eE+-]+', at + 16))
  if not n then return false end
  return floor(n * 1000)
end

-- Histogram bucket (1-based) of a task due `ahead` seconds from now, for the ascending edges in
-- `edges`: the first edge >= ahead (binary search), or the overflow bucket.
local function bucket_of(edges, ahead)
  local lo, hi = 1, #edges + 1
  while lo < hi do
    local mid = floor((lo + hi) / 2)
    if ahead <= edges[mid] then hi = mid else lo = mid + 1 end
  end
  return lo
end

local function parse_edges(text)
  local edges = {}
  for edge in string.gmatch(text, '%d+') do edges[#edges + 1] = tonumber(edge) end
  return edges
end

-- A sparse histogram {bucket, count, bucket, count, ...} with 0-based buckets, as Redis returns it.
local function sparse(histogram, buckets)
  local out = {}
  for i = 1, buckets do
    if histogram[i] then
      out[#out + 1] = i - 1
      out[#out + 1] = histogram[i]
    end
  end
  return out
end

-- End of the prelude.
