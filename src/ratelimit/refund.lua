--[[
Rate limiter: give back what a lease did not use (src/ratelimit/leases.ts). Same semantics and
arithmetic as refund() in src/ratelimit/memory.ts.

A lease charged `tokens` to the buckets and the cap counters at once, and took `slots`
concurrency slots; the instance admitted requests from it locally and now returns the rest:
  - each bucket gets the unused tokens back, refilled to now first and never above its burst;
    a missing bucket is full already and stays missing;
  - each cap counter of the lease's day and month is lowered by them if it still exists (never
    below 0); a missing counter is rebuilt from PostgreSQL, which only counts admitted requests;
  - the lease's slots are freed (slotId itself for one slot, as limit.lua names them).

KEYS: as limit.lua (org bucket, user bucket, day counter, month counter, slots).
ARGV: 1 nowMs  2 tokens  3 orgBurst  4 orgPerSecond  5 userBurst  6 userPerSecond
      7 slotId  8 slots  9 bucketTtlMarginSeconds  10 maxBucketTtlSeconds
]]

local now = tonumber(ARGV[1])
local tokens = tonumber(ARGV[2])
local slotId = ARGV[7]
local slots = tonumber(ARGV[8])
local bucketTtlMargin = tonumber(ARGV[9])
local maxBucketTtl = tonumber(ARGV[10])

local function fmt(x)
  return string.format('%.17g', x)
end

-- The refill is limit.lua's refill(), step for step: a Redis script cannot load another's code.
local function giveBack(key, burst, rate)
  if tokens <= 0 or not (burst > 0 and rate > 0) then return end
  local stored = redis.call('HMGET', key, 't', 'ts')
  local t = tonumber(stored[1])
  local ts = tonumber(stored[2])
  if t == nil or ts == nil then return end
  local elapsed = now - ts
  if elapsed < 0 then elapsed = 0 end
  t = t + elapsed * rate / 1000
  if t > burst then t = burst end
  if ts < now then ts = now end
  t = t + tokens
  if t > burst then t = burst end
  redis.call('HSET', key, 't', fmt(t), 'ts', fmt(ts))
  redis.call('EXPIRE', key, math.min(maxBucketTtl, math.ceil(burst / rate) + bucketTtlMargin))
end

local function lower(key)
  if tokens <= 0 then return end
  local v = tonumber(redis.call('GET', key))
  if v == nil then return end
  redis.call('DECRBY', key, math.min(v, tokens))
end

giveBack(KEYS[1], tonumber(ARGV[3]), tonumber(ARGV[4]))
giveBack(KEYS[2], tonumber(ARGV[5]), tonumber(ARGV[6]))
lower(KEYS[3])
lower(KEYS[4])
if slots == 1 then
  redis.call('ZREM', KEYS[5], slotId)
elseif slots > 1 then
  local members = {}
  for i = 1, slots do members[#members + 1] = slotId .. '#' .. i end
  redis.call('ZREM', KEYS[5], unpack(members))
end
return 1
