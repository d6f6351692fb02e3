/**
 * Token leases: local admission for a caller that is far from every limit.
 *
 * Asking the backend (Redis) for every request is exact, and costs a round trip and a script run
 * per request. When a caller's last answer shows room to spare on every limit, the limiter asks
 * once for a lease instead: one backend call that charges `tokens` requests' worth to both
 * buckets and both cap counters, and takes `slots` concurrency slots, exactly as that many
 * requests would. The instance then admits that caller's requests from the lease in memory, with
 * no round trip, until the lease is spent; it is topped up when half is left, so a steady
 * caller seldom waits for it. A caller's first lease is small (64 requests); each one spent
 * within a second makes the next twice as big, up to RATE_LIMIT_LEASE_MAX.
 *
 * A renewal tops the same lease up: one backend call that charges the tokens it adds and takes the
 * lease's slots again (which only refreshes them), so a busy caller costs one call per renewal and
 * holds one set of slots. Only a lease that needs more slots is replaced by a new one.
 *
 * Nothing is admitted that the limits do not allow: a lease is charged before it is used, and a
 * refused lease is simply not granted. What a lease trades is the other direction: until it is
 * used or given back, its unused part is unavailable to the same caller on other instances. So a
 * lease is granted only while every limit keeps at least LEASE_HEADROOM times the lease after it
 * (near a limit, every request asks the backend one by one, exactly as without leases), and it is
 * given back (refund: the unused tokens to the buckets and off the counters, the slots freed)
 * once idle for `idleMs`, when the limits or the UTC day change, `maxAgeMs` after its last
 * charge, and on close.
 *
 * Written here rather than taken from a library: the lease is a charge of the same atomic script
 * the limiter already runs (limit.lua with a larger cost), and its rules follow our limits.
 */
import type { Periods } from './periods.js';
import type { AcquireRequest, Decision, LimiterBackend, OrgLimits } from './types.js';
import type { UsageTally } from './usage.js';
import type { CallerMemo } from '../types/context.js';

/** Every limit must keep at least this many times the lease after it is charged. */
const LEASE_HEADROOM = 16;
/** A lease smaller than this is not worth a second round trip: such callers go one by one. */
const MIN_LEASE_TOKENS = 4;
/**
 * A caller's first lease holds at most this many requests; each lease spent within
 * FAST_LEASE_MS makes the next one twice as big, up to the configured maximum: a busy caller
 * renews a few times a second, an occasional one holds little.
 */
const FIRST_LEASE_TOKENS = 64;
const FAST_LEASE_MS = 1_000;
/** Slots of a caller's first lease; doubled on renewal whenever they were all in use, up to MAX. */
const FIRST_LEASE_SLOTS = 2;
const MAX_LEASE_SLOTS = 64;
/** Refunds in flight at once while closing (one pipeline to Redis each, with auto-pipelining). */
export const CLOSE_BATCH = 512;
/**
 * How often idle and old leases are looked for: a tenth of the shorter of the two times (so a
 * lease is given back at most 10 % late), at most every 5 s. A sweep reads every lease: with
 * 50,000 callers each second's sweep was about 1 % of a busy server's time.
 */
const sweepIntervalMs = (idleMs: number, maxAgeMs: number) => Math.max(100, Math.min(5_000, idleMs / 10, maxAgeMs / 10));

/** This instance's leases of one org, and what the org's numbers are once they are counted in. */
interface OrgLeases {
  readonly users: Map<string, Lease>;
  /** Leases not given back yet: current ones and retired ones whose requests are in flight. */
  leases: number;
  /** Tokens and slots those leases hold and no request has used: charged on the backend, not spent. */
  unusedTokens: number;
  unusedSlots: number;
  // The backend's last answer about the org (a lease's charge or a request decided one by one).
  orgRemaining: number;
  orgResetSeconds: number;
  dayUsed: number;
  monthUsed: number;
  concurrent: number;
  /**
   * Slots this instance has freed for the org since this record was made (requests decided one
   * by one that ended, leases given back), and that count when the call of the last answer went
   * out. The backend runs one connection's commands in order: slots freed after that call are
   * still in the answer's `concurrent`, and are taken off what is reported.
   */
  freed: number;
  freedAtAnswer: number;
  /** Where the limiter counts the org's leased requests (kept here: a leased request looks up nothing else). */
  usage: UsageTally | null;
}

/**
 * Taken just before a backend call about an org goes out: which of the org's slots this instance
 * had freed by then (see OrgLeases.freed).
 */
export interface FreedMark {
  readonly org: OrgLeases | undefined;
  readonly freed: number;
}

/** Keeps `d` as the org's latest answer, from a call that went out at `mark`. */
function setLastAnswer(o: OrgLeases, d: Decision, mark: FreedMark): void {
  o.orgRemaining = d.org.remaining;
  o.orgResetSeconds = d.org.resetSeconds;
  o.dayUsed = d.dayUsed;
  o.monthUsed = d.monthUsed;
  o.concurrent = d.concurrent;
  // A record made after the call went out counts only slots freed after it.
  o.freedAtAnswer = mark.org === o ? mark.freed : 0;
}

/**
 * A bucket's state with what leases hold unused counted back in: never above its burst (a bucket
 * that refilled to full since the lease was charged has nothing to give back), and a full one
 * resets in 0 s.
 */
function withUnused(remaining: number, resetSeconds: number, unused: number, burst: number, perSecond: number): Decision['org'] {
  const total = remaining + unused;
  if (!(burst > 0 && perSecond > 0) || total < burst) return { remaining: total, resetSeconds };
  return { remaining: burst, resetSeconds: 0 };
}

/** The org's requests in flight as the backend last saw them, less the slots freed here since. */
const concurrentNow = (o: OrgLeases): number => Math.max(0, o.concurrent - (o.freed - o.freedAtAnswer));

export interface Lease {
  readonly org: OrgLeases;
  readonly orgId: string;
  readonly userId: string;
  readonly limits: OrgLimits;
  readonly backend: LimiterBackend;
  readonly day: string;
  readonly month: string;
  /** Numbers its concurrency slots' id (see slotIdOf): a number per lease, not a string. */
  readonly seq: number;
  /** Slots held (0 when the concurrency cap is off). */
  readonly slots: number;
  /** When it was last charged (granted or topped up): its slots were stamped then. */
  chargedAtMs: number;
  /** The size its last charge was meant to give it (the charge plus what it still held). */
  size: number;
  /** Unused tokens. */
  tokens: number;
  inFlight: number;
  lastUsedMs: number;
  /** No longer admits; given back once its last request ends. */
  retired: boolean;
  /** A request found every slot in use: the next lease takes more. */
  slotsShort: boolean;
  renewing: boolean;
  /** Given back to the backend: a top-up answered after that gives its own charge back. */
  givenBack: boolean;
  /** The user bucket as the lease's last charge left it. */
  userRemaining: number;
  userResetSeconds: number;
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
 * The lease a caller may take after the backend answered `d`, or null when any limit is too
 * close: each limit that is on must keep LEASE_HEADROOM times the lease after it.
 */
function leaseSize(
  limits: OrgLimits,
  d: Pick<Decision, 'org' | 'user' | 'dayUsed' | 'monthUsed' | 'concurrent'>,
  maxTokens: number,
  wantSlots: number,
): LeaseSize | null {
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

export interface LeaseTableDeps {
  /** Largest lease, in requests (RATE_LIMIT_LEASE_MAX). */
  maxTokens: number;
  /** A lease unused this long is given back. */
  idleMs: number;
  /** A lease not charged again for this long is given back (its slots must not outlive the slot TTL). */
  maxAgeMs: number;
  /**
   * Charges a lease: the limiter's own path to the backend (Redis, or the fallback in an outage).
   * `beforeCall` runs just before each call to the shared backend.
   */
  acquire: (req: AcquireRequest, beforeCall?: () => void) => Promise<{ decision: Decision; backend: LimiterBackend }>;
  /** Whether a lease charged on this backend may be used: the shared one only, not an outage's fallback. */
  leasable: (backend: LimiterBackend) => boolean;
  slotTtlMs: number;
  instance: string;
}

export interface LeaseStats {
  /** Requests admitted from a lease, without a backend call. */
  admitted: number;
  granted: number;
  /** Leases topped up in place. */
  renewed: number;
  refunded: number;
}

export class LeaseTable {
  /** org id -> this instance's leases of the org. Nested to avoid a key string per request. */
  private readonly byOrg = new Map<string, OrgLeases>();
  /** Callers whose first lease is being asked for. */
  private readonly granting = new Set<string>();
  private readonly refunds = new Set<Promise<void>>();
  private readonly timer: NodeJS.Timeout;
  private seq = 0;
  private held = 0;
  private closed = false;
  readonly stats: LeaseStats = { admitted: 0, granted: 0, renewed: 0, refunded: 0 };

  constructor(private readonly deps: LeaseTableDeps) {
    this.timer = setInterval(() => this.sweep(Date.now()), sweepIntervalMs(deps.idleMs, deps.maxAgeMs));
    this.timer.unref();
  }

  /** Current leases (one per caller at most). */
  get size(): number {
    return this.held;
  }

  /** Whether the caller holds a lease on this instance (spent or not). */
  holds(orgId: string, userId: string): boolean {
    return this.byOrg.get(orgId)?.users.has(userId) ?? false;
  }

  /**
   * Admits one request of `cost` from the caller's lease, or answers null: no lease, spent, all
   * its slots in use, or no longer valid (then it is given back). Synchronous.
   */
  take(orgId: string, userId: string, limits: OrgLimits, cost: number, periods: Periods, nowMs: number, memo: CallerMemo | null = null): Lease | null {
    // The caller's memo first: with many callers, the table's lookups are what a leased request
    // costs most. It is only a shortcut: a lease found there must still be the caller's current one.
    let lease = memo?.lease as Lease | undefined;
    if (lease === undefined || lease.retired || lease.userId !== userId || lease.orgId !== orgId) {
      lease = this.byOrg.get(orgId)?.users.get(userId);
      if (lease === undefined) return null;
      if (memo !== null) memo.lease = lease;
    }
    if (
      !sameLimits(lease.limits, limits) ||
      lease.day !== periods.day ||
      lease.month !== periods.month ||
      nowMs - lease.chargedAtMs >= this.deps.maxAgeMs
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
    lease.org.unusedTokens -= cost;
    if (lease.slots > 0) lease.org.unusedSlots--;
    lease.inFlight++;
    lease.lastUsedMs = nowMs;
    this.stats.admitted++;
    if (lease.tokens * 2 < lease.size) this.renew(lease, limits, periods, nowMs);
    return lease;
  }

  /** The end of a request admitted from `lease`. */
  done(lease: Lease): void {
    lease.inFlight--;
    if (lease.slots > 0) lease.org.unusedSlots++;
    if (lease.retired && lease.inFlight === 0) this.giveBack(lease, lease.lastUsedMs);
  }

  /**
   * What a request admitted from `lease` reports (RateLimit field, GET /v1/org/usage): the
   * backend's last answer about the org, with what this instance's leases hold unused counted
   * back in, as if every request had been decided one by one.
   */
  leasedDecision(lease: Lease): Decision {
    const o = lease.org;
    const l = lease.limits;
    return {
      allowed: true,
      retryAfterSeconds: 0,
      needsSeed: false,
      org: withUnused(o.orgRemaining, o.orgResetSeconds, o.unusedTokens, l.orgBurst, l.orgPerSecond),
      user: withUnused(lease.userRemaining, lease.userResetSeconds, lease.tokens, l.userBurst, l.userPerSecond),
      dayUsed: o.dayUsed - o.unusedTokens,
      monthUsed: o.monthUsed - o.unusedTokens,
      concurrent: Math.max(0, concurrentNow(o) - o.unusedSlots),
    };
  }

  /**
   * The same for a request the backend decided (`d`): the backend's numbers count what this
   * instance's leases of the org hold unused as spent; they are counted back in. Also keeps `d`
   * as the org's latest answer (its call went out at `mark`). Returns `d` itself when the org has
   * no lease here.
   */
  reportedDecision(orgId: string, userId: string, limits: OrgLimits, d: Decision, mark: FreedMark): Decision {
    const o = this.byOrg.get(orgId);
    if (o === undefined) return d;
    setLastAnswer(o, d, mark);
    const own = o.users.get(userId)?.tokens ?? 0;
    return {
      ...d,
      org: withUnused(d.org.remaining, d.org.resetSeconds, o.unusedTokens, limits.orgBurst, limits.orgPerSecond),
      user: withUnused(d.user.remaining, d.user.resetSeconds, own, limits.userBurst, limits.userPerSecond),
      dayUsed: d.dayUsed - o.unusedTokens,
      monthUsed: d.monthUsed - o.unusedTokens,
      concurrent: Math.max(0, concurrentNow(o) - o.unusedSlots),
    };
  }

  /** Taken just before a backend call about `orgId` goes out (reportedDecision needs it). */
  mark(orgId: string): FreedMark {
    const org = this.byOrg.get(orgId);
    return { org, freed: org?.freed ?? 0 };
  }

  /** This instance freed one slot of `orgId` on the backend (a request decided one by one ended). */
  slotFreed(orgId: string): void {
    const o = this.byOrg.get(orgId);
    if (o !== undefined) o.freed++;
  }

  /**
   * After the backend admitted a request of a caller without a lease: asks for one in the
   * background if `d` shows room enough. The request itself does not wait for it.
   */
  consider(orgId: string, userId: string, limits: OrgLimits, d: Decision, periods: Periods, nowMs: number, memo: CallerMemo | null = null): void {
    if (this.closed || this.byOrg.get(orgId)?.users.has(userId) === true) return;
    const size = leaseSize(limits, d, Math.min(FIRST_LEASE_TOKENS, this.deps.maxTokens), FIRST_LEASE_SLOTS);
    if (size === null) return;
    const key = `${orgId}\n${userId}`;
    if (this.granting.has(key)) return;
    this.granting.add(key);
    void this.grant(orgId, userId, limits, size, size.tokens, periods, nowMs, null)
      .then((granted) => {
        // The caller's next request finds it without the table's two lookups.
        if (typeof granted === 'object' && memo !== null) memo.lease = granted;
      })
      .finally(() => this.granting.delete(key));
  }

  /**
   * Gives every lease back (shutdown) and waits for the refunds, at most CLOSE_BATCH at a time: an
   * instance serving many tenants holds tens of thousands of leases, and giving 50,000 back at
   * once built every call before the first answer came, about 300 MB more for a second or two.
   */
  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.timer);
    const nowMs = Date.now();
    for (const o of [...this.byOrg.values()]) {
      for (const lease of [...o.users.values()]) {
        this.retire(lease, nowMs);
        if (this.refunds.size >= CLOSE_BATCH) await Promise.all([...this.refunds]);
      }
    }
    while (this.refunds.size > 0) await Promise.all([...this.refunds]);
  }

  /** Gives back the leases idle for idleMs or not charged for maxAgeMs (every sweepIntervalMs, and from tests). */
  sweep(nowMs: number): void {
    // A Map's iteration goes on correctly past entries deleted during it (retire() deletes).
    for (const o of this.byOrg.values()) {
      for (const lease of o.users.values()) {
        if (nowMs - lease.lastUsedMs >= this.deps.idleMs || nowMs - lease.chargedAtMs >= this.deps.maxAgeMs) this.retire(lease, nowMs);
      }
    }
  }

  // -------------------------------------------------------------------------------------------

  private renew(lease: Lease, limits: OrgLimits, periods: Periods, nowMs: number): void {
    if (lease.renewing || lease.retired || this.closed) return;
    const slots = lease.slots === 0 ? 0 : lease.slotsShort ? Math.min(MAX_LEASE_SLOTS, lease.slots * 2) : lease.slots;
    const wanted = nowMs - lease.chargedAtMs < FAST_LEASE_MS ? Math.min(this.deps.maxTokens, lease.size * 2) : lease.size;
    // The backend's last answer decides the next size (what leases hold unused counts as spent).
    const o = lease.org;
    const last = {
      org: { remaining: o.orgRemaining, resetSeconds: o.orgResetSeconds },
      user: { remaining: lease.userRemaining, resetSeconds: lease.userResetSeconds },
      dayUsed: o.dayUsed,
      monthUsed: o.monthUsed,
      concurrent: concurrentNow(o),
    };
    const size = leaseSize(limits, last, wanted, Math.max(1, slots));
    if (size === null) return; // near a limit now: the caller goes one by one once this lease is spent
    lease.renewing = true;
    // Topped up to the size, not added on top: what the lease still holds carries over.
    const cost = Math.max(1, size.tokens - lease.tokens);
    // The same slots (none when the cap is off): the lease itself is charged again. More slots: a
    // new lease takes them, and this one's are freed once its requests end.
    const charged: Promise<Lease | boolean> =
      size.slots === lease.slots || lease.slots === 0
        ? this.topUp(lease, limits, size, cost, periods, nowMs)
        : this.grant(lease.orgId, lease.userId, limits, size, cost, periods, nowMs, lease);
    void charged.then((granted) => {
      lease.renewing = false;
      // Refused (another instance came close to a limit) or failed: this lease ends, and the
      // caller's next requests ask the backend one by one, whose answers decide on a new lease.
      if (!granted) this.retire(lease, nowMs);
    });
  }

  /**
   * Charges a new lease and installs it as the caller's: the lease, or false when refused or
   * failed, or true when it was given back at once without a failure (closing, or the lease it was
   * to follow is gone).
   */
  private async grant(
    orgId: string,
    userId: string,
    limits: OrgLimits,
    size: LeaseSize,
    cost: number,
    periods: Periods,
    nowMs: number,
    previous: Lease | null,
  ): Promise<Lease | boolean> {
    const seq = ++this.seq;
    const slotId = this.slotIdOf(seq);
    const slots = limits.maxConcurrent > 0 ? Math.max(1, size.slots) : 0;
    const charged = await this.charge(orgId, userId, limits, cost, periods, nowMs, slotId, slots);
    if (charged === null) return false;
    const { decision: d, backend, mark } = charged;
    this.stats.granted++;
    let o = this.byOrg.get(orgId);
    if (o === undefined) {
      o = {
        users: new Map(),
        leases: 0,
        unusedTokens: 0,
        unusedSlots: 0,
        orgRemaining: 0,
        orgResetSeconds: 0,
        dayUsed: 0,
        monthUsed: 0,
        concurrent: 0,
        freed: 0,
        freedAtAnswer: 0,
        usage: null,
      };
      this.byOrg.set(orgId, o);
    }
    setLastAnswer(o, d, mark);
    o.leases++;
    o.unusedTokens += cost;
    o.unusedSlots += slots;
    const lease: Lease = {
      org: o,
      orgId,
      userId,
      limits,
      backend,
      day: periods.day,
      month: periods.month,
      seq,
      slots,
      chargedAtMs: nowMs,
      size: size.tokens,
      tokens: cost,
      inFlight: 0,
      lastUsedMs: nowMs,
      retired: false,
      slotsShort: false,
      renewing: false,
      givenBack: false,
      userRemaining: d.user.remaining,
      userResetSeconds: d.user.resetSeconds,
    };
    const current = o.users.get(userId);
    if (!this.deps.leasable(backend) || this.closed || (previous !== null && current !== previous)) {
      // Charged on the fallback of an outage (whose limits are shares: decided one by one there),
      // or closed, or the lease it was to follow is gone: given back at once.
      lease.retired = true;
      this.giveBack(lease, nowMs);
      return this.deps.leasable(backend);
    }
    o.users.set(userId, lease);
    this.held++;
    if (current !== undefined) {
      // The previous lease's unused tokens carry over when nothing it was charged under changed;
      // its slots stay with its requests in flight, and are freed when the last one ends.
      if (current.day === lease.day && current.month === lease.month && sameLimits(current.limits, limits)) {
        lease.tokens += current.tokens;
        current.tokens = 0;
      }
      this.retire(current, nowMs);
    }
    return lease;
  }

  /**
   * One backend call charging `cost` tokens and `slots` slots (at least one is sent; the backend
   * ignores it while the cap is off) under `slotId`: the answer, the backend that gave it and the
   * freed-slots mark of the call, or null when it failed or was refused whole (nothing charged).
   * A failure leaves the outage to the requests, which go one by one.
   */
  private async charge(
    orgId: string,
    userId: string,
    limits: OrgLimits,
    cost: number,
    periods: Periods,
    nowMs: number,
    slotId: string,
    slots: number,
  ): Promise<{ decision: Decision; backend: LimiterBackend; mark: FreedMark } | null> {
    let mark = this.mark(orgId);
    try {
      const { decision, backend } = await this.deps.acquire(
        { orgId, userId, limits, cost, nowMs, ...periods, slotId, slots: Math.max(1, slots), slotTtlMs: this.deps.slotTtlMs },
        () => (mark = this.mark(orgId)),
      );
      return decision.allowed ? { decision, backend, mark } : null;
    } catch {
      return null;
    }
  }

  /**
   * Charges `lease` again, in place: `cost` more tokens, and its own slots taken again (the
   * backend counts only slots not held yet, so this stamps them anew). False when refused or
   * failed; the caller then retires the lease.
   */
  private async topUp(lease: Lease, limits: OrgLimits, size: LeaseSize, cost: number, periods: Periods, nowMs: number): Promise<boolean> {
    const charged = await this.charge(lease.orgId, lease.userId, limits, cost, periods, nowMs, this.slotIdOf(lease.seq), lease.slots);
    if (charged === null) return false;
    const { decision: d, backend, mark } = charged;
    if (backend !== lease.backend || lease.givenBack) {
      // Charged elsewhere than the lease (the fallback of an outage), or the lease was given back
      // while this charge was on its way: the charge goes back where it was made. Its slots too,
      // unless they are the lease's own on its backend: its give-back, sent after this charge,
      // freed them.
      const of = { orgId: lease.orgId, userId: lease.userId, limits, day: periods.day, month: periods.month, seq: lease.seq };
      this.refund(backend, of, cost, backend === lease.backend ? 0 : Math.max(1, lease.slots), nowMs);
      return false;
    }
    this.stats.renewed++;
    const o = lease.org;
    setLastAnswer(o, d, mark);
    o.unusedTokens += cost;
    lease.tokens += cost;
    lease.size = size.tokens;
    lease.chargedAtMs = nowMs;
    lease.userRemaining = d.user.remaining;
    lease.userResetSeconds = d.user.resetSeconds;
    lease.slotsShort = false;
    return true;
  }

  private retire(lease: Lease, nowMs: number): void {
    if (lease.retired) return;
    lease.retired = true;
    if (lease.org.users.get(lease.userId) === lease) {
      lease.org.users.delete(lease.userId);
      this.held--;
    }
    if (lease.inFlight === 0) this.giveBack(lease, nowMs);
  }

  /** The backend's id of a lease's slots (`<instance>:lease<seq>`), made when it is charged and given back. */
  private slotIdOf(seq: number): string {
    return `${this.deps.instance}:lease${seq}`;
  }

  /** `nowMs`: the caller's clock (tests run on a simulated one); buckets refill to it first. */
  private giveBack(lease: Lease, nowMs: number): void {
    const o = lease.org;
    const tokens = lease.tokens;
    lease.tokens = 0;
    lease.givenBack = true;
    o.unusedTokens -= tokens;
    o.unusedSlots -= lease.slots - lease.inFlight;
    o.freed += lease.slots;
    o.leases--;
    if (o.leases === 0 && this.byOrg.get(lease.orgId) === o) this.byOrg.delete(lease.orgId);
    this.refund(lease.backend, lease, tokens, lease.slots, nowMs);
  }

  /** Gives `tokens` and `slots` charged for the lease `of` back to `backend`; close() waits for it. */
  private refund(
    backend: LimiterBackend,
    of: Pick<Lease, 'orgId' | 'userId' | 'limits' | 'day' | 'month' | 'seq'>,
    tokens: number,
    slots: number,
    nowMs: number,
  ): void {
    if (tokens === 0 && slots === 0) return;
    this.stats.refunded++;
    const refund = backend
      .refund({
        orgId: of.orgId,
        userId: of.userId,
        limits: of.limits,
        tokens,
        nowMs,
        day: of.day,
        month: of.month,
        slotId: this.slotIdOf(of.seq),
        slots,
      })
      // Redis unreachable: the tokens stay charged (never admitted more than the limits), and
      // the slots expire after the slot TTL, as a crashed instance's do.
      .catch(() => undefined)
      .finally(() => this.refunds.delete(refund));
    this.refunds.add(refund);
  }
}
