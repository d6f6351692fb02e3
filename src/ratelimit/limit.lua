--[[
Rate limiter: check every limit of one request, then charge them all, in one atomic step.
A refused request writes nothing but housekeeping (expired slots purged, missing cap counters
seeded). Same semantics and the same arithmetic, in the same order, as src/ratelimit/memory.ts.

All keys come in KEYS and share the hash tag {org:<id>}, so they live in one Cluster slot:
  KEYS[1] org bucket      hash { t = tokens (fractional, as a string), ts = last charge ms }
  KEYS[2] user bucket     same shape
  KEYS[3] day counter     integer cost admitted this UTC day
  KEYS[4] month counter   integer cost admitted this UTC month
  KEYS[5] slots           sorted set: slot id -> acquired at (ms)

ARGV (numbers as decimal strings):
  1 nowMs  2 cost  3 orgBurst  4 orgPerSecond  5 userBurst  6 userPerSecond  7 dailyCap
  8 monthlyCap  9 maxConcurrent  10 slotId  11 slotTtlMs  12 hasSeed (1|0)  13 seedDay
  14 seedMonth  15 dayEndsMs  16 monthEndsMs  17 dayTtlSeconds  18 monthTtlSeconds
  19 bucketTtlMarginSeconds  20 maxBucketTtlSeconds  21 slots (concurrency slots to take: 1 takes the
  slot slotId; n > 1, a lease, takes the n slots slotId#1 ... slotId#n; slots of these ids held
  already are stamped anew and not counted again)

The clock is the caller's (ARGV[1]), never Redis TIME: every backend answers from the same time.

Returns 11 integers (Redis truncates Lua numbers to integers, so nothing fractional leaves here):
  allowed, refusal code (0 none, 1 org_rate, 2 user_rate, 3 daily_cap, 4 monthly_cap,
  5 concurrency), retryAfterSeconds, needsSeed, org remaining, org resetSeconds,
  user remaining, user resetSeconds, dayUsed, monthUsed, concurrent
]]

local now = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local orgBurst = tonumber(ARGV[3])
local orgRate = tonumber(ARGV[4])
local userBurst = tonumber(ARGV[5])
local userRate = tonumber(ARGV[6])
local dailyCap = tonumber(ARGV[7])
local monthlyCap = tonumber(ARGV[8])
local maxConcurrent = tonumber(ARGV[9])
local slotId = ARGV[10]
local slotTtl = tonumber(ARGV[11])
local hasSeed = ARGV[12] == '1'
local seedDay = tonumber(ARGV[13])
local seedMonth = tonumber(ARGV[14])
local dayEnds = tonumber(ARGV[15])
local monthEnds = tonumber(ARGV[16])
local dayTtl = tonumber(ARGV[17])
local monthTtl = tonumber(ARGV[18])
local bucketTtlMargin = tonumber(ARGV[19])
local maxBucketTtl = tonumber(ARGV[20])
local slots = tonumber(ARGV[21])

-- Fractional tokens are stored as strings with 17 significant digits: that round-trips a double
-- exactly, so a bucket keeps every fraction of a token between requests.
local function fmt(x)
  return string.format('%.17g', x)
end

-- A bucket applies only when both burst and refill are set (0 = no limit).
local function bucketOn(burst, rate)
  return burst > 0 and rate > 0
end

-- Tokens available now, and the timestamp to store on charge. A missing bucket is full (it
-- expired because it was full again). Elapsed time is clamped at 0 (instances' clocks differ)
-- and the stored timestamp never moves back, or the same interval would be credited twice.
local function refill(key, burst, rate)
  local stored = redis.call('HMGET', key, 't', 'ts')
  local tokens = tonumber(stored[1])
  local ts = tonumber(stored[2])
  if tokens == nil or ts == nil then
    return burst, now
  end
  local elapsed = now - ts
  if elapsed < 0 then elapsed = 0 end
  tokens = tokens + elapsed * rate / 1000
  if tokens > burst then tokens = burst end
  if ts < now then ts = now end
  return tokens, ts
end

local function secondsUntil(endsMs)
  return math.max(1, math.ceil((endsMs - now) / 1000))
end

-- A cost above the burst can never be paid: wait until the month ends and keep refusing.
local function bucketWait(tokens, burst, rate)
  if cost > burst then return secondsUntil(monthEnds) end
  return math.max(1, math.ceil((cost - tokens) / rate))
end

local function charge(key, tokens, ts, burst, rate)
  redis.call('HSET', key, 't', fmt(tokens), 'ts', fmt(ts))
  -- Once full again the key carries no information: a missing bucket starts full.
  redis.call('EXPIRE', key, math.min(maxBucketTtl, math.ceil(burst / rate) + bucketTtlMargin))
end

-- 1. Read: buckets refilled to now, cap counters, slots (expired ones purged).
local orgIsOn = bucketOn(orgBurst, orgRate)
local userIsOn = bucketOn(userBurst, userRate)
local orgTokens, orgTs, userTokens, userTs
if orgIsOn then orgTokens, orgTs = refill(KEYS[1], orgBurst, orgRate) end
if userIsOn then userTokens, userTs = refill(KEYS[2], userBurst, userRate) end

local dayIsOn = dailyCap > 0
local monthIsOn = monthlyCap > 0
local dayUsed, monthUsed = 0, 0
local dayMissing, monthMissing = false, false
if dayIsOn then
  local v = redis.call('GET', KEYS[3])
  if v then dayUsed = tonumber(v) else dayMissing = true end
end
if monthIsOn then
  local v = redis.call('GET', KEYS[4])
  if v then monthUsed = tonumber(v) else monthMissing = true end
end

local concurrencyIsOn = maxConcurrent > 0
local held = 0
-- Slots this take adds: those of its id held already (a lease topped up, a retried request) are
-- only stamped anew.
local adds = slots
if concurrencyIsOn then
  -- Slots older than the TTL belong to requests whose instance died: free them.
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. fmt(now - slotTtl))
  held = redis.call('ZCARD', KEYS[5])
  if slots == 1 then
    if held > 0 and redis.call('ZSCORE', KEYS[5], slotId) ~= false then adds = 0 end
  elseif held + slots > maxConcurrent then
    -- Only where it can decide: counting a lease's slots is a lookup per slot.
    for i = 1, slots do
      if redis.call('ZSCORE', KEYS[5], slotId .. '#' .. i) ~= false then adds = adds - 1 end
    end
  end
end

local function reply(allowed, refusal, wait, needsSeed)
  local orgRemaining, orgReset, userRemaining, userReset = 0, 0, 0, 0
  if orgIsOn then
    orgRemaining = math.floor(orgTokens)
    orgReset = math.ceil((orgBurst - orgTokens) / orgRate)
  end
  if userIsOn then
    userRemaining = math.floor(userTokens)
    userReset = math.ceil((userBurst - userTokens) / userRate)
  end
  return { allowed, refusal, wait, needsSeed, orgRemaining, orgReset, userRemaining, userReset,
    dayUsed, monthUsed, held }
end

-- 2. Cap counters must exist to mean anything: without them, ask the caller for a seed (usage
--    from PostgreSQL). Only missing counters take the seed; an existing one is never lowered.
if dayMissing or monthMissing then
  if not hasSeed then return reply(0, 0, 0, 1) end
  if dayMissing then
    redis.call('SET', KEYS[3], seedDay, 'EX', dayTtl)
    dayUsed = seedDay
  end
  if monthMissing then
    redis.call('SET', KEYS[4], seedMonth, 'EX', monthTtl)
    monthUsed = seedMonth
  end
end

-- 3. Check every limit. The first refusal names the reason; the wait is the longest of all
--    refusals, because a retry succeeds only once every refusing limit has let go.
local refusal, wait = 0, 0
local function refuse(code, seconds)
  if refusal == 0 then refusal = code end
  if seconds > wait then wait = seconds end
end
if orgIsOn and orgTokens < cost then refuse(1, bucketWait(orgTokens, orgBurst, orgRate)) end
if userIsOn and userTokens < cost then refuse(2, bucketWait(userTokens, userBurst, userRate)) end
if dayIsOn and dayUsed + cost > dailyCap then refuse(3, secondsUntil(dayEnds)) end
if monthIsOn and monthUsed + cost > monthlyCap then refuse(4, secondsUntil(monthEnds)) end
if concurrencyIsOn and adds > 0 and held + adds > maxConcurrent then refuse(5, 1) end
if refusal ~= 0 then return reply(0, refusal, wait, 0) end

-- 4. Charge everything.
if orgIsOn then
  orgTokens = orgTokens - cost
  charge(KEYS[1], orgTokens, orgTs, orgBurst, orgRate)
end
if userIsOn then
  userTokens = userTokens - cost
  charge(KEYS[2], userTokens, userTs, userBurst, userRate)
end
if dayIsOn then dayUsed = redis.call('INCRBY', KEYS[3], cost) end
if monthIsOn then monthUsed = redis.call('INCRBY', KEYS[4], cost) end
if concurrencyIsOn then
  if slots == 1 then
    redis.call('ZADD', KEYS[5], fmt(now), slotId)
    held = held + adds
  else
    local args = {}
    local stamp = fmt(now)
    for i = 1, slots do
      args[#args + 1] = stamp
      args[#args + 1] = slotId .. '#' .. i
    end
    held = held + redis.call('ZADD', KEYS[5], unpack(args))
  end
  -- Once its newest slot is stale (strictly older than the TTL, as the purge counts) the set
  -- carries no information.
  redis.call('PEXPIRE', KEYS[5], math.ceil(slotTtl) + 1)
end
return reply(1, 0, 0, 0)
