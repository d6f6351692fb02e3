/**
 * Token leases: local admission for a caller that is far from every limit.
 *
 * Asking the backend (Redis) for every request is exact, and costs a round trip and a script run
 * per request. When a caller's last answer shows room to spare on every limit, the limiter asks
 * once for a lease instead: one backend call that charges `tokens` requests' worth to both
 * buckets and both cap counters, and takes `slots` concurrency slots, exactly as that many
 * requests would. The instance then admits that caller's requests from the lease in memory, with
 * no round trip, until the lease is spent; it asks for the next one when half is left, so a
 * steady caller seldom waits for it. A caller's first lease is small (16 requests); each one spent
 * within a second makes the next twice as big, up to RATE_LIMIT_LEASE_MAX.
 *
 * Nothing is admitted that the limits do not allow: a lease is charged before it is used, and a
 * refused lease is simply not granted. What a lease trades is the other direction: until it is
 * used or given back, its unused part is unavailable to the same caller on other instances. So a
 * lease is granted only while every limit keeps at least LEASE_HEADROOM times the lease after it
 * (near a limit, every request asks the backend one by one, exactly as without leases), and it is
 * given back (refund: the unused tokens to the buckets and off the counters, the slots freed)
 * once idle for `idleMs`, when the limits or the UTC day change, after `maxAgeMs`, and on close.
 *
 * Written here rather than taken from a library: the lease is a charge of the same atomic script
 * the limiter already runs (limit.lua with a larger cost), and its rules follow our limits.
 */
import type { Periods } from './periods.js';
import type { AcquireRequest, Decision, LimiterBackend, OrgLimits } from './types.js';

/** Every limit must keep at least this many times the lease after it is charged. */
export const LEASE_HEADROOM = 16;
/** A lease smaller than this is not worth a second round trip: such callers go one by one. */
export const MIN_LEASE_TOKENS = 4;
/**
 * A caller's first lease holds at most this many requests; each lease spent within
 * FAST_LEASE_MS makes the next one twice as big, up to the configured maximum: a busy caller
 * renews a few times a second, an occasional one holds little.
 */
const FIRST_LEASE_TOKENS = 16;
const FAST_LEASE_MS = 1_000;
/** Slots of a caller's first lease; doubled on renewal whenever they were all in use, up to MAX. */
const FIRST_LEASE_SLOTS = 2;
const MAX_LEASE_SLOTS = 64;
/** How often idle and old leases are looked for. */
const SWEEP_INTERVAL_MS = 1_000;

export interface Lease {
  readonly orgId: string;
  readonly userId: string;
  readonly limits: OrgLimits;
  readonly backend: LimiterBackend;
  readonly day: string;
  readonly month: string;
  readonly slotId: string;
  /** Slots held (0 when the concurrency cap is off). */
  readonly slots: number;
  readonly grantedAtMs: number;
  /** The size this lease was meant to have (its own charge plus what it carried over). */
  readonly size: number;
  /** Unused tokens. */
  tokens: number;
  inFlight: number;
  lastUsedMs: number;
  /** No longer admits; given back once its last request ends. */
  retired: boolean;
  /** A request found every slot in use: the next lease takes more. */
  slotsShort: boolean;
  renewing: boolean;
  // The backend's answer to the lease's charge, for the RateLimit field of its requests.
  readonly orgRemaining: number;
  readonly orgResetSeconds: number;
  readonly userRemaining: number;
  readonly userResetSeconds: number;
  readonly dayUsed: number;
  readonly monthUsed: number;
  readonly concurrent: number;
}

export interface LeaseSize {
  readonly tokens: number;
  readonly slots: number;
}

const sameLimits = (a: OrgLimits, b: OrgLimits) =>
  a === b ||
  (a.orgBurst === b.orgBurst &&
    a.orgPerSecond === b.orgPerSecond &&
    a.userBurst === b.userBurst &&
    a.userPerSecond === b.userPerSecond &&
    a.dailyCap === b.dailyCap &&
    a.monthlyCap === b.monthlyCap &&
    a.maxConcurrent === b.maxConcurrent);

/**
 * The lease a caller may take after the backend answered `d` (an admission), or null when any
 * limit is too close: each limit that is on must keep LEASE_HEADROOM times the lease after it.
 */
export function leaseSize(limits: OrgLimits, d: Decision, maxTokens: number, wantSlots: number): LeaseSize | null {
  let room = Infinity;
  if (limits.orgBurst > 0 && limits.orgPerSecond > 0) room = Math.min(room, d.org.remaining);
  if (limits.userBurst > 0 && limits.userPerSecond > 0) room = Math.min(room, d.user.remaining);
  if (limits.dailyCap > 0) room = Math.min(room, limits.dailyCap - d.dayUsed);
  if (limits.monthlyCap > 0) room = Math.min(room, limits.monthlyCap - d.monthUsed);
  const tokens = Math.min(maxTokens, Math.floor(room / (LEASE_HEADROOM + 1)));
  if (!(tokens >= MIN_LEASE_TOKENS)) return null;
  if (limits.maxConcurrent === 0) return { tokens, slots: 0 };
  const slots = Math.min(wantSlots, Math.floor((limits.maxConcurrent - d.concurrent) / (LEASE_HEADROOM + 1)));
  return slots >= 1 ? { tokens, slots } : null;
}

/** The state a leased request reports in its RateLimit field: the lease's charge, less what is still unused. */
export function leaseDecision(lease: Lease): Decision {
  return {
    allowed: true,
    retryAfterSeconds: 0,
    needsSeed: false,
    org: { remaining: lease.orgRemaining + lease.tokens, resetSeconds: lease.orgResetSeconds },
    user: { remaining: lease.userRemaining + lease.tokens, resetSeconds: lease.userResetSeconds },
    dayUsed: lease.dayUsed - lease.tokens,
    monthUsed: lease.monthUsed - lease.tokens,
    concurrent: lease.concurrent,
  };
}

export interface LeaseTableDeps {
  /** Largest lease, in requests (RATE_LIMIT_LEASE_MAX). */
  maxTokens: number;
  /** A lease unused this long is given back. */
  idleMs: number;
  /** A lease older than this is given back (its slots must not outlive the slot TTL). */
  maxAgeMs: number;
  /** Charges a lease: the limiter's own path to the backend (Redis, or the fallback in an outage). */
  acquire: (req: AcquireRequest) => Promise<{ decision: Decision; backend: LimiterBackend }>;
  /** Whether a lease charged on this backend may be used: the shared one only, not an outage's fallback. */
  leasable: (backend: LimiterBackend) => boolean;
  slotTtlMs: number;
  instance: string;
}

export interface LeaseStats {
  /** Requests admitted from a lease, without a backend call. */
  admitted: number;
  granted: number;
  refunded: number;
}

export class LeaseTable {
  /** org id -> user id -> the caller's current lease. Nested to avoid a key string per request. */
  private readonly byOrg = new Map<string, Map<string, Lease>>();
  /** Callers whose first lease is being asked for. */
  private readonly granting = new Set<string>();
  private readonly refunds = new Set<Promise<void>>();
  /** Retired leases whose requests are still in flight: they hold their slots until the last ends. */
  private readonly draining = new Set<Lease>();
  private readonly timer: NodeJS.Timeout;
  private seq = 0;
  private closed = false;
  readonly stats: LeaseStats = { admitted: 0, granted: 0, refunded: 0 };

  constructor(private readonly deps: LeaseTableDeps) {
    this.timer = setInterval(() => this.sweep(Date.now()), SWEEP_INTERVAL_MS);
    this.timer.unref();
  }

  get size(): number {
    let n = 0;
    for (const users of this.byOrg.values()) n += users.size;
    return n;
  }

  /**
   * Admits one request of `cost` from the caller's lease, or answers null: no lease, spent, all
   * its slots in use, or no longer valid (then it is given back). Synchronous.
   */
  take(orgId: string, userId: string, limits: OrgLimits, cost: number, periods: Periods, nowMs: number): Lease | null {
    const lease = this.byOrg.get(orgId)?.get(userId);
    if (lease === undefined) return null;
    if (
      !sameLimits(lease.limits, limits) ||
      lease.day !== periods.day ||
      lease.month !== periods.month ||
      nowMs - lease.grantedAtMs >= this.deps.maxAgeMs
    ) {
      this.retire(lease, nowMs);
      return null;
    }
    if (lease.tokens < cost || (lease.slots > 0 && lease.inFlight >= lease.slots)) {
      if (lease.tokens >= cost) lease.slotsShort = true;
      this.renew(lease, limits, periods, nowMs);
      return null;
    }
    lease.tokens -= cost;
    lease.inFlight++;
    lease.lastUsedMs = nowMs;
    this.stats.admitted++;
    if (lease.tokens * 2 < lease.size) this.renew(lease, limits, periods, nowMs);
    return lease;
  }

  /** The end of a request admitted from `lease`. */
  done(lease: Lease): void {
    lease.inFlight--;
    if (lease.retired && lease.inFlight === 0) {
      this.draining.delete(lease);
      this.giveBack(lease, lease.lastUsedMs);
    }
  }

  /** Slots this instance's leases of the org hold and no request uses: held, yet not in flight. */
  unusedSlots(orgId: string): number {
    let n = 0;
    for (const lease of this.byOrg.get(orgId)?.values() ?? []) n += lease.slots - lease.inFlight;
    for (const lease of this.draining) if (lease.orgId === orgId) n += lease.slots - lease.inFlight;
    return n;
  }

  /**
   * After the backend admitted a request of a caller without a lease: asks for one in the
   * background if `d` shows room enough. The request itself does not wait for it.
   */
  consider(orgId: string, userId: string, limits: OrgLimits, d: Decision, periods: Periods, nowMs: number): void {
    if (this.closed || this.byOrg.get(orgId)?.has(userId) === true) return;
    const size = leaseSize(limits, d, Math.min(FIRST_LEASE_TOKENS, this.deps.maxTokens), FIRST_LEASE_SLOTS);
    if (size === null) return;
    const key = `${orgId}\n${userId}`;
    if (this.granting.has(key)) return;
    this.granting.add(key);
    void this.grant(orgId, userId, limits, size, size.tokens, periods, nowMs, null).finally(() => this.granting.delete(key));
  }

  /** Gives every lease back (shutdown) and waits for the refunds. */
  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.timer);
    const nowMs = Date.now();
    for (const users of this.byOrg.values()) for (const lease of users.values()) this.retire(lease, nowMs);
    while (this.refunds.size > 0) await Promise.all([...this.refunds]);
  }

  /** Gives back the leases idle for idleMs or older than maxAgeMs (every second, and from tests). */
  sweep(nowMs: number): void {
    for (const users of this.byOrg.values()) {
      for (const lease of users.values()) {
        if (nowMs - lease.lastUsedMs >= this.deps.idleMs || nowMs - lease.grantedAtMs >= this.deps.maxAgeMs) this.retire(lease, nowMs);
      }
    }
  }

  // -------------------------------------------------------------------------------------------

  private renew(lease: Lease, limits: OrgLimits, periods: Periods, nowMs: number): void {
    if (lease.renewing || lease.retired || this.closed) return;
    const slots = lease.slots === 0 ? 0 : lease.slotsShort ? Math.min(MAX_LEASE_SLOTS, lease.slots * 2) : lease.slots;
    const wanted = nowMs - lease.grantedAtMs < FAST_LEASE_MS ? Math.min(this.deps.maxTokens, lease.size * 2) : lease.size;
    // The last answer of the backend, as the lease knows it, decides the next size.
    const size = leaseSize(limits, leaseDecision(lease), wanted, Math.max(1, slots));
    if (size === null) return; // near a limit now: the caller goes one by one once this lease is spent
    lease.renewing = true;
    // Topped up to the size, not added on top: what the lease still holds carries over.
    const cost = Math.max(1, size.tokens - lease.tokens);
    void this.grant(lease.orgId, lease.userId, limits, size, cost, periods, nowMs, lease).then((granted) => {
      lease.renewing = false;
      // Refused (another instance came close to a limit) or failed: this lease ends, and the
      // caller's next requests ask the backend one by one, whose answers decide on a new lease.
      if (!granted) this.retire(lease, nowMs);
    });
  }

  private async grant(
    orgId: string,
    userId: string,
    limits: OrgLimits,
    size: LeaseSize,
    cost: number,
    periods: Periods,
    nowMs: number,
    previous: Lease | null,
  ): Promise<boolean> {
    const slotId = `${this.deps.instance}:lease${++this.seq}`;
    let answer: { decision: Decision; backend: LimiterBackend };
    try {
      answer = await this.deps.acquire({
        orgId,
        userId,
        limits,
        cost,
        nowMs,
        ...periods,
        slotId,
        slots: Math.max(1, size.slots),
        slotTtlMs: this.deps.slotTtlMs,
      });
    } catch {
      return false; // the backend failed: requests go one by one, which handles the outage
    }
    const { decision: d, backend } = answer;
    if (!d.allowed) return false; // refused whole: nothing was charged, and no request was refused
    const lease: Lease = {
      orgId,
      userId,
      limits,
      backend,
      day: periods.day,
      month: periods.month,
      slotId,
      slots: limits.maxConcurrent > 0 ? Math.max(1, size.slots) : 0,
      grantedAtMs: nowMs,
      size: size.tokens,
      tokens: cost,
      inFlight: 0,
      lastUsedMs: nowMs,
      retired: false,
      slotsShort: false,
      renewing: false,
      orgRemaining: d.org.remaining,
      orgResetSeconds: d.org.resetSeconds,
      userRemaining: d.user.remaining,
      userResetSeconds: d.user.resetSeconds,
      dayUsed: d.dayUsed,
      monthUsed: d.monthUsed,
      concurrent: d.concurrent,
    };
    this.stats.granted++;
    if (!this.deps.leasable(backend)) {
      // Charged on the fallback of an outage, whose limits are shares: decided one by one there.
      this.giveBack(lease, nowMs);
      return false;
    }
    let users = this.byOrg.get(orgId);
    const current = users?.get(userId);
    if (this.closed || (previous !== null && current !== previous)) {
      // Closed, or the lease it was to follow is gone (given back, replaced): give this one back.
      this.giveBack(lease, nowMs);
      return true;
    }
    if (users === undefined) {
      users = new Map();
      this.byOrg.set(orgId, users);
    }
    users.set(userId, lease);
    if (current !== undefined) {
      // The previous lease's unused tokens carry over when nothing it was charged under changed;
      // its slots stay with its requests in flight, and are freed when the last one ends.
      if (current.day === lease.day && current.month === lease.month && sameLimits(current.limits, limits)) {
        lease.tokens += current.tokens;
        current.tokens = 0;
      }
      this.retire(current, nowMs);
    }
    return true;
  }

  private retire(lease: Lease, nowMs: number): void {
    if (lease.retired) return;
    lease.retired = true;
    const users = this.byOrg.get(lease.orgId);
    if (users?.get(lease.userId) === lease) {
      users.delete(lease.userId);
      if (users.size === 0) this.byOrg.delete(lease.orgId);
    }
    if (lease.inFlight === 0) this.giveBack(lease, nowMs);
    else this.draining.add(lease);
  }

  /** `nowMs`: the caller's clock (tests run on a simulated one); buckets refill to it first. */
  private giveBack(lease: Lease, nowMs: number): void {
    if (lease.tokens === 0 && lease.slots === 0) return;
    const tokens = lease.tokens;
    lease.tokens = 0;
    this.stats.refunded++;
    const refund = lease.backend
      .refund({
        orgId: lease.orgId,
        userId: lease.userId,
        limits: lease.limits,
        tokens,
        nowMs,
        day: lease.day,
        month: lease.month,
        slotId: lease.slotId,
        slots: lease.slots,
      })
      // Redis unreachable: the tokens stay charged (never admitted more than the limits), and
      // the slots expire after the slot TTL, as a crashed instance's do.
      .catch(() => undefined)
      .finally(() => this.refunds.delete(refund));
    this.refunds.add(refund);
  }
}
