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

-- ISO 8601 as Celery writes it (YYYY-MM-DD[T ]HH:MM:SS[.fraction][Z|+HH:MM|+HHMM|+HH]) to Unix
-- seconds; naive times read as UTC. Mirrors celery_broker::schedule::parse_eta.
local function parse_eta(s)
  local y, mo, d, h, mi, sec, rest = match(s, '^(%d%d%d%d)%-(%d%d)%-(%d%d)[T ](%d%d):(%d%d):(%d%d)(.*)$')
  if not y then return nil end
  y, mo, d, h, mi, sec = tonumber(y), tonumber(mo), tonumber(d), tonumber(h), tonumber(mi), tonumber(sec)
  if mo < 1 or mo > 12 or d < 1 or d > 31 or h > 23 or mi > 59 or sec > 60 then return nil end
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
  return days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec + frac - offset
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

-- Histogram bucket (1-based) of a task due `ahead` seconds from now, for the edges in `edges`.
local function bucket_of(edges, ahead)
  for i = 1, #edges do
    if ahead <= edges[i] then return i end
  end
  return #edges + 1
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
