/**
 * In-memory limiter backend: one process, the embedded default and the fallback while Redis is
 * unreachable. Same semantics as the Redis backend (src/ratelimit/limit.lua), step for step: the
 * pure helpers below are the single definition of the math, and the Lua script repeats it with the
 * same operations in the same order, so both backends answer identically for identical input.
 *
 * Atomicity comes for free here: acquire() does all of its work synchronously, so no other call
 * can interleave between the check and the charge.
 */
import type { AcquireRequest, BucketState, Decision, LimiterBackend, OrgLimits, Refusal, RefundRequest } from './types.js';

/** Cap counters live a little longer than their period so a late request still finds them. */
export const DAY_COUNTER_TTL_SECONDS = 2 * 86_400;
export const MONTH_COUNTER_TTL_SECONDS = 35 * 86_400;
/**
 * A bucket key may expire once the bucket would be full again: a missing bucket starts full, so
 * expiry loses nothing. The margin absorbs small clock differences between instances.
 */
export const BUCKET_TTL_MARGIN_SECONDS = 10;
/** Upper bound on a bucket key's lifetime, so absurd burst/rate ratios cannot overflow EXPIRE. */
export const MAX_BUCKET_TTL_SECONDS = 400 * 86_400;

/** Refusal codes as the Lua script returns them (index = code; 0 = admitted). */
export const REFUSAL_CODES: readonly (Refusal | undefined)[] = [
  undefined,
  'org_rate',
  'user_rate',
  'daily_cap',
  'monthly_cap',
  'concurrency',
];

export interface LimiterKeys {
  readonly orgBucket: string;
  readonly userBucket: string;
  readonly day: string;
  readonly month: string;
  readonly slots: string;
}

/**
 * Every key of an org carries the hash tag `{org:<id>}`: Redis Cluster hashes only the tag, so all
 * keys of one acquire live in one slot and the script runs unchanged on a cluster.
 */
export function orgKeyPrefix(orgId: string): string {
  return `rl:{org:${orgId}}`;
}

export function slotsKey(orgId: string): string {
  return `${orgKeyPrefix(orgId)}:c`;
}

export function limiterKeys(req: Pick<AcquireRequest, 'orgId' | 'userId' | 'day' | 'month'>): LimiterKeys {
  const prefix = orgKeyPrefix(req.orgId);
  return {
    orgBucket: `${prefix}:b`,
    userBucket: `${prefix}:u:${req.userId}`,
    day: `${prefix}:d:${req.day}`,
    month: `${prefix}:m:${req.month}`,
    slots: slotsKey(req.orgId),
  };
}

/**
 * A bucket applies only when both its burst and its refill are set: 0 means "no limit" for every
 * field, and a bucket that never refills would be a lifetime quota, which is what the caps are for.
 */
export function bucketIsOn(burst: number, perSecond: number): boolean {
  return burst > 0 && perSecond > 0;
}

export interface StoredBucket {
  /** Tokens at `ts`, fractional. */
  readonly tokens: number;
  /** The latest clock reading that charged this bucket (ms). */
  readonly ts: number;
}

/**
 * Tokens available at `nowMs` and the timestamp to store if the bucket is charged now.
 * A new bucket starts full. Elapsed time is clamped at 0 because instances' clocks differ
 * slightly, and the stored timestamp never moves backwards: otherwise an instance whose clock is
 * behind would rewind it and the next instance would be credited the same interval twice.
 */
export function refillBucket(
  stored: StoredBucket | undefined,
  burst: number,
  perSecond: number,
  nowMs: number,
): StoredBucket {
  if (stored === undefined) return { tokens: burst, ts: nowMs };
  const elapsed = Math.max(0, nowMs - stored.ts);
  // Same expression, same order as limit.lua, so both backends round identically.
  const tokens = Math.min(burst, stored.tokens + (elapsed * perSecond) / 1000);
  return { tokens, ts: Math.max(stored.ts, nowMs) };
}

export function bucketState(tokens: number, burst: number, perSecond: number): BucketState {
  return { remaining: Math.floor(tokens), resetSeconds: Math.ceil((burst - tokens) / perSecond) };
}

export const OFF_BUCKET: BucketState = Object.freeze({ remaining: 0, resetSeconds: 0 });

/** Seconds until `endsMs` (a period end), at least 1. */
export function secondsUntil(endsMs: number, nowMs: number): number {
  return Math.max(1, Math.ceil((endsMs - nowMs) / 1000));
}

/**
 * Seconds until a bucket holding `tokens` can pay `cost`. A cost above the burst can never be
 * paid: answer the seconds until the month ends (a long, bounded wait) and keep refusing.
 */
export function bucketRetryAfter(tokens: number, burst: number, perSecond: number, req: AcquireRequest): number {
  if (req.cost > burst) return secondsUntil(req.monthEndsMs, req.nowMs);
  return Math.max(1, Math.ceil((req.cost - tokens) / perSecond));
}

export function bucketTtlSeconds(burst: number, perSecond: number): number {
  return Math.min(MAX_BUCKET_TTL_SECONDS, Math.ceil(burst / perSecond) + BUCKET_TTL_MARGIN_SECONDS);
}

function isNonNegativeFinite(n: number): boolean {
  return Number.isFinite(n) && n >= 0;
}

/**
 * Rejects requests neither backend can answer correctly. Cost and seeds must be whole numbers
 * because the cap counters are integers (Redis INCRBY).
 */
export function validateAcquireRequest(req: AcquireRequest): void {
  if (!Number.isSafeInteger(req.cost) || req.cost < 1) {
    throw new RangeError(`rate limiter: cost must be a positive integer, got ${req.cost}`);
  }
  if (!Number.isFinite(req.nowMs) || !Number.isFinite(req.dayEndsMs) || !Number.isFinite(req.monthEndsMs)) {
    throw new RangeError('rate limiter: nowMs, dayEndsMs and monthEndsMs must be finite');
  }
  if (req.slots !== undefined && (!Number.isSafeInteger(req.slots) || req.slots < 1)) {
    throw new RangeError(`rate limiter: slots must be a positive integer, got ${req.slots}`);
  }
  if (!Number.isFinite(req.slotTtlMs) || req.slotTtlMs < 1) {
    throw new RangeError(`rate limiter: slotTtlMs must be at least 1, got ${req.slotTtlMs}`);
  }
  const fields: (keyof OrgLimits)[] = [
    'orgBurst',
    'orgPerSecond',
    'userBurst',
    'userPerSecond',
    'dailyCap',
    'monthlyCap',
    'maxConcurrent',
  ];
  for (const field of fields) {
    if (!isNonNegativeFinite(req.limits[field])) {
      throw new RangeError(`rate limiter: limits.${field} must be a finite number >= 0, got ${req.limits[field]}`);
    }
  }
  if (req.seed !== undefined) {
    const { day, month } = req.seed;
    if (!Number.isSafeInteger(day) || day < 0 || !Number.isSafeInteger(month) || month < 0) {
      throw new RangeError('rate limiter: seed.day and seed.month must be integers >= 0');
    }
  }
}

// ---------------------------------------------------------------------------------------------

interface BucketEntry {
  readonly kind: 'bucket';
  tokens: number;
  ts: number;
  expiresAt: number;
}
interface CounterEntry {
  readonly kind: 'counter';
  value: number;
  expiresAt: number;
}
interface SlotsEntry {
  readonly kind: 'slots';
  /** slotId -> acquired at (ms). */
  readonly slots: Map<string, number>;
  expiresAt: number;
}
type Entry = BucketEntry | CounterEntry | SlotsEntry;

/** Entries examined for expiry per acquire: bounded work, yet every entry is visited in turn. */
const SWEEP_STEP = 16;
/** An acquire touches at most 5 keys; eviction must never pick one of them. */
const MIN_MAX_KEYS = 16;

/**
 * A Map used as an LRU with expiry. A Map iterates in insertion order, so re-inserting an entry on
 * each access keeps the least recently used one first: eviction is O(1).
 *
 * Evicting is always safe, only looser: an evicted bucket comes back full, an evicted slot set
 * forgets its in-flight requests, and an evicted cap counter comes back through `needsSeed`, which
 * rebuilds it from PostgreSQL (the durable record of usage), so no quota is lost.
 *
 * Expiry is measured on the callers' clock (the backend never reads one) and applied lazily on
 * access plus an incremental sweep on each acquire; no timer keeps the process alive.
 */
class LruStore {
  private readonly entries = new Map<string, Entry>();
  private cursor: MapIterator<[string, Entry]> | undefined;

  constructor(private readonly maxKeys: number) {}

  get size(): number {
    return this.entries.size;
  }

  /** The live entry at `key` (touched as most recently used), or undefined if absent/expired. */
  get<K extends Entry['kind']>(key: string, kind: K, nowMs: number): Extract<Entry, { kind: K }> | undefined {
    const entry = this.entries.get(key);
    if (entry === undefined) return undefined;
    this.entries.delete(key);
    if (entry.expiresAt <= nowMs || entry.kind !== kind) return undefined;
    this.entries.set(key, entry);
    return entry as Extract<Entry, { kind: K }>;
  }

  /** Without touching or checking expiry: for release(), which has no clock. */
  peek(key: string): Entry | undefined {
    return this.entries.get(key);
  }

  set(key: string, entry: Entry): void {
    this.entries.delete(key);
    while (this.entries.size >= this.maxKeys) {
      const oldest = this.entries.keys().next();
      if (oldest.done === true) break;
      this.entries.delete(oldest.value);
    }
    this.entries.set(key, entry);
  }

  delete(key: string): void {
    this.entries.delete(key);
  }

  /**
   * Advances a cursor over the map by a few entries, dropping expired ones. A Map iterator stays
   * valid across deletions and insertions, so the cursor survives between calls.
   */
  sweep(nowMs: number): void {
    for (let i = 0; i < SWEEP_STEP; i++) {
      this.cursor ??= this.entries.entries();
      const next = this.cursor.next();
      if (next.done === true) {
        this.cursor = undefined;
        return;
      }
      const [key, entry] = next.value;
      if (entry.expiresAt <= nowMs) this.entries.delete(key);
    }
  }

  clear(): void {
    this.entries.clear();
    this.cursor = undefined;
  }
}

/** The members a take of `slots` slots adds, as limit.lua names them. */
function slotIds(slotId: string, slots: number): string[] {
  if (slots === 1) return [slotId];
  return Array.from({ length: slots }, (_, i) => `${slotId}#${i + 1}`);
}

export interface MemoryBackend extends LimiterBackend {
  readonly kind: 'memory';
  /** Keys currently held (for tests and metrics). */
  size(): number;
}

export function createMemoryBackend(opts: { maxKeys: number }): MemoryBackend {
  if (!Number.isSafeInteger(opts.maxKeys) || opts.maxKeys < MIN_MAX_KEYS) {
    throw new RangeError(`rate limiter: maxKeys must be an integer >= ${MIN_MAX_KEYS}, got ${opts.maxKeys}`);
  }
  const store = new LruStore(opts.maxKeys);

  function acquireNow(req: AcquireRequest): Decision {
    validateAcquireRequest(req);
    const { limits, nowMs, cost } = req;
    store.sweep(nowMs);
    const keys = limiterKeys(req);

    // 1. Read: buckets refilled to now, cap counters, slots (expired ones purged).
    const orgOn = bucketIsOn(limits.orgBurst, limits.orgPerSecond);
    const userOn = bucketIsOn(limits.userBurst, limits.userPerSecond);
    const orgEntry = orgOn ? store.get(keys.orgBucket, 'bucket', nowMs) : undefined;
    const userEntry = userOn ? store.get(keys.userBucket, 'bucket', nowMs) : undefined;
    const orgNow = orgOn ? refillBucket(orgEntry, limits.orgBurst, limits.orgPerSecond, nowMs) : undefined;
    const userNow = userOn ? refillBucket(userEntry, limits.userBurst, limits.userPerSecond, nowMs) : undefined;
    // Tokens to report: as refilled now, or after the charge if admitted.
    let orgTokens = orgNow?.tokens;
    let userTokens = userNow?.tokens;

    const dayOn = limits.dailyCap > 0;
    const monthOn = limits.monthlyCap > 0;
    let dayEntry = dayOn ? store.get(keys.day, 'counter', nowMs) : undefined;
    let monthEntry = monthOn ? store.get(keys.month, 'counter', nowMs) : undefined;

    const concurrencyOn = limits.maxConcurrent > 0;
    const slotsEntry = concurrencyOn ? store.get(keys.slots, 'slots', nowMs) : undefined;
    if (slotsEntry !== undefined) {
      for (const [slotId, acquiredAt] of slotsEntry.slots) {
        if (acquiredAt < nowMs - req.slotTtlMs) slotsEntry.slots.delete(slotId);
      }
    }
    let held = slotsEntry?.slots.size ?? 0;
    const slots = req.slots ?? 1;
    // Slots this take adds: those of its id held already (a lease topped up, a retried request)
    // are only stamped anew.
    let adds = slots;
    if (slotsEntry !== undefined) {
      if (slots === 1) adds = slotsEntry.slots.has(req.slotId) ? 0 : 1;
      else if (held + slots > limits.maxConcurrent) for (const id of slotIds(req.slotId, slots)) if (slotsEntry.slots.has(id)) adds--;
    }

    const state = (allowed: boolean, refusedBy: Refusal | undefined, retryAfterSeconds: number, needsSeed: boolean): Decision => ({
      allowed,
      ...(refusedBy === undefined ? {} : { refusedBy }),
      retryAfterSeconds,
      needsSeed,
      org: orgTokens === undefined ? OFF_BUCKET : bucketState(orgTokens, limits.orgBurst, limits.orgPerSecond),
      user: userTokens === undefined ? OFF_BUCKET : bucketState(userTokens, limits.userBurst, limits.userPerSecond),
      dayUsed: dayEntry?.value ?? 0,
      monthUsed: monthEntry?.value ?? 0,
      concurrent: held,
    });

    // 2. Cap counters must exist to mean anything: without them, ask the caller for a seed.
    const dayMissing = dayOn && dayEntry === undefined;
    const monthMissing = monthOn && monthEntry === undefined;
    if (dayMissing || monthMissing) {
      if (req.seed === undefined) return state(false, undefined, 0, true);
      // Only missing counters take the seed: an existing counter is never lowered.
      if (dayMissing) {
        dayEntry = { kind: 'counter', value: req.seed.day, expiresAt: nowMs + DAY_COUNTER_TTL_SECONDS * 1000 };
        store.set(keys.day, dayEntry);
      }
      if (monthMissing) {
        monthEntry = { kind: 'counter', value: req.seed.month, expiresAt: nowMs + MONTH_COUNTER_TTL_SECONDS * 1000 };
        store.set(keys.month, monthEntry);
      }
    }

    // 3. Check every limit. The first refusal names the reason; the wait is the longest of all
    //    refusals, because a retry succeeds only once every refusing limit has let go.
    let refusedBy: Refusal | undefined;
    let retryAfter = 0;
    const refuse = (reason: Refusal, wait: number): void => {
      refusedBy ??= reason;
      retryAfter = Math.max(retryAfter, wait);
    };
    if (orgNow !== undefined && orgNow.tokens < cost) {
      refuse('org_rate', bucketRetryAfter(orgNow.tokens, limits.orgBurst, limits.orgPerSecond, req));
    }
    if (userNow !== undefined && userNow.tokens < cost) {
      refuse('user_rate', bucketRetryAfter(userNow.tokens, limits.userBurst, limits.userPerSecond, req));
    }
    if (dayEntry !== undefined && dayEntry.value + cost > limits.dailyCap) {
      refuse('daily_cap', secondsUntil(req.dayEndsMs, nowMs));
    }
    if (monthEntry !== undefined && monthEntry.value + cost > limits.monthlyCap) {
      refuse('monthly_cap', secondsUntil(req.monthEndsMs, nowMs));
    }
    if (concurrencyOn && adds > 0 && held + adds > limits.maxConcurrent) refuse('concurrency', 1);
    if (refusedBy !== undefined) return state(false, refusedBy, retryAfter, false);

    // 4. Charge everything.
    if (orgNow !== undefined) {
      orgTokens = orgNow.tokens - cost;
      writeBucket(keys.orgBucket, orgTokens, orgNow.ts, bucketTtlSeconds(limits.orgBurst, limits.orgPerSecond), nowMs);
    }
    if (userNow !== undefined) {
      userTokens = userNow.tokens - cost;
      writeBucket(keys.userBucket, userTokens, userNow.ts, bucketTtlSeconds(limits.userBurst, limits.userPerSecond), nowMs);
    }
    if (dayEntry !== undefined) dayEntry.value += cost;
    if (monthEntry !== undefined) monthEntry.value += cost;
    if (concurrencyOn) {
      // Expire the set only once its newest slot is strictly older than the TTL, as the purge does.
      const expiresAt = nowMs + req.slotTtlMs + 1;
      let entry = slotsEntry;
      if (entry === undefined) {
        entry = { kind: 'slots', slots: new Map(), expiresAt };
        store.set(keys.slots, entry);
      }
      entry.expiresAt = expiresAt;
      for (const id of slotIds(req.slotId, slots)) entry.slots.set(id, nowMs);
      held = entry.slots.size;
    }
    return state(true, undefined, 0, false);
  }

  function refundNow(req: RefundRequest): void {
    const { limits, nowMs, tokens } = req;
    const keys = limiterKeys(req);
    const giveBack = (key: string, burst: number, perSecond: number) => {
      if (tokens <= 0 || !bucketIsOn(burst, perSecond)) return;
      const entry = store.get(key, 'bucket', nowMs);
      if (entry === undefined) return; // a missing bucket is full already
      const now = refillBucket(entry, burst, perSecond, nowMs);
      writeBucket(key, Math.min(burst, now.tokens + tokens), now.ts, bucketTtlSeconds(burst, perSecond), nowMs);
    };
    giveBack(keys.orgBucket, limits.orgBurst, limits.orgPerSecond);
    giveBack(keys.userBucket, limits.userBurst, limits.userPerSecond);
    for (const key of [keys.day, keys.month]) {
      const counter = tokens > 0 ? store.get(key, 'counter', nowMs) : undefined;
      if (counter !== undefined) counter.value -= Math.min(counter.value, tokens);
    }
    if (req.slots > 0) {
      const entry = store.peek(keys.slots);
      if (entry?.kind === 'slots') {
        for (const id of slotIds(req.slotId, req.slots)) entry.slots.delete(id);
        if (entry.slots.size === 0) store.delete(keys.slots);
      }
    }
  }

  function writeBucket(key: string, tokens: number, ts: number, ttlSeconds: number, nowMs: number): void {
    store.set(key, { kind: 'bucket', tokens, ts, expiresAt: nowMs + ttlSeconds * 1000 });
  }

  return {
    kind: 'memory',
    async acquire(req) {
      return acquireNow(req);
    },
    async release(orgId, slotId) {
      const key = slotsKey(orgId);
      const entry = store.peek(key);
      if (entry?.kind !== 'slots') return;
      entry.slots.delete(slotId);
      if (entry.slots.size === 0) store.delete(key);
    },
    async refund(req) {
      refundNow(req);
    },
    async close() {
      store.clear();
    },
    size: () => store.size,
  };
}
