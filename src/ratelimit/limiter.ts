import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import type { CallerMemo } from '../types/context.js';
import type { RateLimitConfig } from '../config/env.js';
import { LeaseTable, type FreedMark, type Lease } from './leases.js';
import { utcPeriods, type Periods } from './periods.js';
import type { AcquireRequest, Decision, LimiterBackend, OrgLimits, Refusal } from './types.js';
import type { UsageRecorder } from './usage.js';

/**
 * Puts the backends together: Redis (shared by every instance) or memory, a memory fallback
 * while Redis fails, cap counters rebuilt from PostgreSQL, and an in-process "blocked until"
 * memory so an org (or IP) that is being refused costs no round trip for a while.
 */

export type LimiterMode = 'memory' | 'redis' | 'degraded';

export interface Admission {
  readonly allowed: boolean;
  readonly refusedBy?: Refusal;
  readonly retryAfterSeconds: number;
  /** Null when no limit applied (all off); a refusal repeated from memory carries the original. */
  readonly decision: Decision | null;
  readonly periods: Periods;
  readonly nowMs: number;
  /** Frees the concurrency slot; safe to call more than once. */
  readonly release: () => void;
}

export interface OrgAdmissionArgs {
  orgId: string;
  userId: string;
  limits: OrgLimits;
  cost?: number;
  /** The clock (tests pass a simulated one). */
  nowMs?: number;
  /** The caller's memo (kept with its cached authentication): where its lease is found first. */
  memo?: CallerMemo | null;
}

export interface LimiterStats {
  allowed: number;
  refused: Record<Refusal, number>;
  fallbackDecisions: number;
}

interface Blocked {
  untilMs: number;
  retryAtMs: number;
  refusedBy: Refusal;
  /** The refusal being repeated: its state goes out in the RateLimit field again. */
  decision: Decision | null;
  /** Once expired: when the one request that asks the backend again set off (null: none yet). */
  probeSinceMs: number | null;
}

// A refusal is remembered for at most this long: a limit raised with the CLI (or a bucket that
// refilled) is seen again within a second, and a flood costs one backend call per second.
const MAX_BLOCK_MS = 1_000;
const RECOVERY_PROBE_MS = 1_000;

const NO_RELEASE = () => undefined;
const PROBE = Symbol('probe');

/**
 * How long a refusal may be answered from memory. For a bucket: until enough tokens can have
 * come back. `remaining` is rounded down, so this errs toward refusing at most one token's time
 * too long, never toward admitting more than the limit.
 */
function blockMs(d: Decision, limits: OrgLimits, cost: number): number {
  switch (d.refusedBy) {
    case 'org_rate':
      return ((cost - d.org.remaining) / limits.orgPerSecond) * 1000;
    case 'user_rate':
      return ((cost - d.user.remaining) / limits.userPerSecond) * 1000;
    case 'daily_cap':
    case 'monthly_cap':
      return d.retryAfterSeconds * 1000;
    case 'concurrency':
    case undefined:
      return 0;
  }
}

/** A bounded Map that forgets its oldest entries: a flood of distinct keys cannot grow it. */
class BoundedMap<K, V> extends Map<K, V> {
  constructor(private readonly max: number) {
    super();
  }
  override set(key: K, value: V): this {
    if (!this.has(key) && this.size >= this.max) {
      const oldest = this.keys().next().value;
      if (oldest !== undefined) this.delete(oldest);
    }
    return super.set(key, value);
  }
}

const isOff = (l: OrgLimits) =>
  !(l.orgBurst > 0 && l.orgPerSecond > 0) &&
  !(l.userBurst > 0 && l.userPerSecond > 0) &&
  l.dailyCap === 0 &&
  l.monthlyCap === 0 &&
  l.maxConcurrent === 0;

export interface RateLimiterDeps {
  primary: LimiterBackend;
  /**
   * Makes the memory backend used while the primary (Redis) fails: a fresh one for every outage,
   * so counts from an earlier outage never linger. Null when the primary is memory.
   */
  createFallback: (() => LimiterBackend) | null;
  /**
   * Drops the primary's cap counters of these orgs, so the next request rebuilds them from
   * PostgreSQL, which by then holds what the fallback admitted during the outage.
   */
  forgetCaps?: (orgIds: string[], day: string, month: string) => Promise<void>;
  usage: UsageRecorder;
  config: RateLimitConfig;
  logger: Logger;
  /** Answers when Redis is reachable again (PING). */
  probe?: () => Promise<unknown>;
}

export class RateLimiter {
  private degraded = false;
  private fallback: LimiterBackend | null = null;
  private probeTimer: NodeJS.Timeout | null = null;
  private probing = false;
  private readonly blocked: BoundedMap<string, Blocked>;
  /** Last cap usage seen from the shared backend, per org: the floor for a fallback seed. */
  private readonly lastKnown: BoundedMap<string, { day: string; dayUsed: number; month: string; monthUsed: number }>;
  /** Usage at the moment the fallback took over an org: the fallback shares only what is left. */
  private readonly fallbackBase: BoundedMap<string, { day: string; dayUsed: number; monthUsed: number }>;
  private readonly instance = randomUUID().slice(0, 8);
  private slotSeq = 0;
  /** Local admission for callers far from their limits; null when RATE_LIMIT_LEASE_MAX is 0. */
  private readonly leases: LeaseTable | null;
  readonly stats: LimiterStats = {
    allowed: 0,
    refused: { org_rate: 0, user_rate: 0, daily_cap: 0, monthly_cap: 0, concurrency: 0 },
    fallbackDecisions: 0,
  };

  constructor(private readonly deps: RateLimiterDeps) {
    const max = deps.config.memoryMaxKeys;
    this.blocked = new BoundedMap(max);
    this.lastKnown = new BoundedMap(max);
    this.fallbackBase = new BoundedMap(max);
    const { leaseMax, leaseIdleMs, slotTtlMs } = deps.config;
    this.leases =
      leaseMax > 0
        ? new LeaseTable({
            maxTokens: leaseMax,
            idleMs: leaseIdleMs,
            // Leased slots are stamped when charged (granted or topped up): a lease not charged
            // again for this long is given back, well before the slot TTL would purge its slots.
            maxAgeMs: Math.min(300_000, Math.floor(slotTtlMs / 2)),
            slotTtlMs,
            instance: this.instance,
            acquire: (req, beforeCall) => this.decide(req.orgId, req, beforeCall),
            leasable: (backend) => backend === deps.primary,
          })
        : null;
  }

  /** Requests admitted from leases, leases granted, topped up and given back (for tests and metrics). */
  get leaseStats(): { admitted: number; granted: number; renewed: number; refunded: number; held: number } {
    const s = this.leases?.stats;
    return {
      admitted: s?.admitted ?? 0,
      granted: s?.granted ?? 0,
      renewed: s?.renewed ?? 0,
      refunded: s?.refunded ?? 0,
      held: this.leases?.size ?? 0,
    };
  }

  /** Gives back the leases idle for RATE_LIMIT_LEASE_IDLE_MS at `nowMs` (runs by itself every tenth of that, at most every 5 s). */
  sweepLeases(nowMs = Date.now()): void {
    this.leases?.sweep(nowMs);
  }

  get mode(): LimiterMode {
    if (!this.deps.createFallback) return 'memory';
    return this.degraded ? 'degraded' : 'redis';
  }

  /** Admission of one authenticated request of an org. */
  async acquireOrg(args: OrgAdmissionArgs): Promise<Admission> {
    return this.admit(args);
  }

  /**
   * acquireOrg() without a promise when none is needed: limits off, a lease, or a refusal
   * remembered in process are answered synchronously (the request path takes no microtask
   * detour); only a request that asks the backend gets a promise.
   */
  admit(args: OrgAdmissionArgs): Admission | Promise<Admission> {
    const nowMs = args.nowMs ?? Date.now();
    const cost = args.cost ?? 1;
    const periods = utcPeriods(nowMs);
    if (isOff(args.limits)) {
      this.deps.usage.record(args.orgId, periods.day, periods.month, cost);
      this.stats.allowed++;
      return { allowed: true, retryAfterSeconds: 0, decision: null, periods, nowMs, release: NO_RELEASE };
    }
    // Far from every limit: admitted from the caller's lease, in memory.
    const lease = this.leases?.take(args.orgId, args.userId, args.limits, cost, periods, nowMs, args.memo ?? null) ?? null;
    if (lease !== null) return this.leased(lease, args.orgId, cost, periods, nowMs);
    // Kept in the caller's memo only while some refusal is remembered: a cache of callers that are
    // all admitted (many tenants, say) holds no keys.
    const { org: orgKey, user: userKey } = blockKeys(args, this.blocked.size > 0);
    const orgBlock = this.checkBlocked(orgKey, nowMs);
    if (orgBlock && orgBlock !== PROBE) return this.refusedFromBlock(orgBlock, periods, nowMs);
    const userBlock = this.checkBlocked(userKey, nowMs, orgBlock !== PROBE);
    if (userBlock && userBlock !== PROBE) {
      if (orgBlock === PROBE) this.blocked.get(orgKey)!.probeSinceMs = null; // not asking after all
      return this.refusedFromBlock(userBlock, periods, nowMs);
    }
    const probed = orgBlock === PROBE ? orgKey : userBlock === PROBE ? userKey : null;
    return this.askBackend(args, cost, periods, nowMs, orgKey, userKey, probed);
  }

  /** Whether any refusal (of an org, a user or a key) is remembered: false, nothing can be repeated. */
  get remembersRefusals(): boolean {
    return this.blocked.size > 0;
  }

  /**
   * The refusal `admit()` would repeat from memory for this caller, without anything `admit()`
   * does besides: no lease taken, no probe started, no backend call. Null whenever `admit()` could
   * answer otherwise: limits off, a lease held, nothing remembered, or a block that has expired
   * (its probe is `admit()`'s to send). Not counted: `countRefusal()` counts it once it is sent.
   * For the refusal gate (src/middleware/refusalGate.ts).
   */
  rememberedRefusal(args: OrgAdmissionArgs): Admission | null {
    if (this.blocked.size === 0 || isOff(args.limits)) return null;
    if (this.leases?.holds(args.orgId, args.userId) === true) return null;
    const nowMs = args.nowMs ?? Date.now();
    const { org: orgKey, user: userKey } = blockKeys(args, true);
    const orgBlock = this.blocked.get(orgKey);
    if (orgBlock !== undefined) return this.stillRefusing(orgBlock, nowMs) ? repeated(orgBlock, utcPeriods(nowMs), nowMs) : null;
    const userBlock = this.blocked.get(userKey);
    if (userBlock !== undefined && this.stillRefusing(userBlock, nowMs)) return repeated(userBlock, utcPeriods(nowMs), nowMs);
    return null;
  }

  /** Counts a refusal answered outside `admit()` (the refusal gate's) in the decision stats. */
  countRefusal(refusedBy: Refusal): void {
    this.stats.refused[refusedBy]++;
  }

  /** Whether checkBlocked() would answer this block itself (not expired, or expired with its probe out). */
  private stillRefusing(b: Blocked, nowMs: number): boolean {
    return nowMs < b.untilMs || (b.probeSinceMs !== null && nowMs - b.probeSinceMs < MAX_BLOCK_MS);
  }

  private async askBackend(
    args: OrgAdmissionArgs,
    cost: number,
    periods: Periods,
    nowMs: number,
    orgKey: string,
    userKey: string,
    probed: string | null,
  ): Promise<Admission> {
    const slotId = `${this.instance}:${++this.slotSeq}`;
    // Which of the org's slots this instance had freed when the call went out (leases.ts, OrgLeases.freed).
    const leases = this.leases;
    let mark: FreedMark | null = null;
    const { decision, backend } = await this.decide(
      args.orgId,
      {
        orgId: args.orgId,
        userId: args.userId,
        limits: args.limits,
        cost,
        nowMs,
        ...periods,
        slotId,
        slotTtlMs: this.deps.config.slotTtlMs,
      },
      leases ? () => (mark = leases.mark(args.orgId)) : undefined,
    );
    this.rememberUsage(args.orgId, periods, decision, backend);
    // The probe is answered: the block it stood for ends here, or is replaced just below.
    if (probed !== null) this.blocked.delete(probed);
    // What the request reports: with what this instance's leases hold unused counted back in.
    const reported = backend === this.deps.primary && leases && mark ? leases.reportedDecision(args.orgId, args.userId, args.limits, decision, mark) : decision;
    if (!decision.allowed) {
      const refusedBy = decision.refusedBy ?? 'org_rate';
      this.stats.refused[refusedBy]++;
      if (refusedBy !== 'concurrency') {
        const key = refusedBy === 'user_rate' ? userKey : orgKey;
        this.block(key, nowMs, blockMs(decision, args.limits, cost), decision.retryAfterSeconds, refusedBy, decision);
      }
      return { allowed: false, refusedBy, retryAfterSeconds: decision.retryAfterSeconds, decision: reported, periods, nowMs, release: NO_RELEASE };
    }
    this.stats.allowed++;
    this.deps.usage.record(args.orgId, periods.day, periods.month, cost);
    // Leases only from the shared backend: the fallback's limits are shares, decided one by one.
    if (backend === this.deps.primary) this.leases?.consider(args.orgId, args.userId, args.limits, decision, periods, nowMs, args.memo ?? null);
    let released = args.limits.maxConcurrent === 0;
    return {
      allowed: true,
      retryAfterSeconds: 0,
      decision: reported,
      periods,
      nowMs,
      release: () => {
        if (released) return;
        released = true;
        // A slot that cannot be freed (Redis down) expires after slotTtlMs.
        backend.release(args.orgId, slotId).catch(() => undefined);
        if (backend === this.deps.primary) this.leases?.slotFreed(args.orgId);
      },
    };
  }

  /** Admission of one anonymous or failed-auth request from a client address. */
  acquireIp(ip: string, perMinute: number, nowMs = Date.now()): Promise<{ allowed: boolean; retryAfterSeconds: number }> {
    return this.acquireKey(`ip:${ip}`, { burst: perMinute, perSecond: perMinute / 60 }, nowMs);
  }

  /**
   * One token from the bucket named `key` (a client address, an account...), shared by every
   * instance like the org buckets: `burst` tokens, refilled at `perSecond`. Once a key has spent
   * its last token, its next attempts on this instance are refused from memory, without a
   * backend call. Keys are namespaced by the caller (`ip:`, `login:`...): they must not be org ids.
   */
  async acquireKey(
    key: string,
    bucket: { burst: number; perSecond: number },
    nowMs = Date.now(),
  ): Promise<{ allowed: boolean; retryAfterSeconds: number }> {
    const block = this.checkBlocked(key, nowMs);
    if (block && block !== PROBE) return { allowed: false, retryAfterSeconds: Math.max(1, Math.ceil((block.retryAtMs - nowMs) / 1000)) };
    const periods = utcPeriods(nowMs);
    const { perSecond } = bucket;
    const { decision } = await this.decide(key, {
      orgId: key,
      userId: '-',
      limits: {
        orgBurst: bucket.burst,
        orgPerSecond: perSecond,
        userBurst: 0,
        userPerSecond: 0,
        dailyCap: 0,
        monthlyCap: 0,
        maxConcurrent: 0,
      },
      cost: 1,
      nowMs,
      ...periods,
      slotId: '-',
      slotTtlMs: this.deps.config.slotTtlMs,
    });
    if (block === PROBE) this.blocked.delete(key);
    if (!decision.allowed) {
      this.block(key, nowMs, ((1 - decision.org.remaining) / perSecond) * 1000, decision.retryAfterSeconds, 'org_rate');
    } else if (decision.org.remaining < 1) {
      // The key has just spent its last token: refuse its next attempt in process, before any
      // database lookup (a failed authentication is only charged after it has happened).
      this.block(key, nowMs, 1000 / perSecond, Math.max(1, Math.ceil(1 / perSecond)), 'org_rate');
    }
    return { allowed: decision.allowed, retryAfterSeconds: decision.retryAfterSeconds };
  }

  /** Is this client address currently refused? No backend call: only the in-process memory. */
  isIpBlocked(ip: string, nowMs = Date.now()): number {
    const b = this.blocked.get(`ip:${ip}`);
    return b && nowMs < b.untilMs ? Math.max(1, Math.ceil((b.retryAtMs - nowMs) / 1000)) : 0;
  }

  /** Durable usage plus this process's unflushed part (for reports when no counter was read). */
  usageOf(orgId: string, day: string, month: string): Promise<{ day: number; month: number }> {
    return this.deps.usage.load(orgId, day, month);
  }

  async close(): Promise<void> {
    if (this.probeTimer) clearInterval(this.probeTimer);
    this.probeTimer = null;
    await this.leases?.close();
    await this.deps.usage.close();
    await this.deps.primary.close();
    await this.fallback?.close();
  }

  // -------------------------------------------------------------------------------------------

  private leased(lease: Lease, orgId: string, cost: number, periods: Periods, nowMs: number): Admission {
    this.stats.allowed++;
    const { usage } = this.deps;
    let tally = lease.org.usage;
    if (tally === null || tally.day !== periods.day || !usage.isCurrent(tally)) tally = lease.org.usage = usage.tally(orgId, periods.day, periods.month);
    tally.requests += cost;
    const leases = this.leases!;
    let released = false;
    return {
      allowed: true,
      retryAfterSeconds: 0,
      decision: leases.leasedDecision(lease),
      periods,
      nowMs,
      release: () => {
        if (released) return;
        released = true;
        leases.done(lease);
      },
    };
  }

  /** `beforeCall` runs just before each call to the shared backend (a seed makes it two). */
  private async decide(
    partition: string,
    req: AcquireRequest,
    beforeCall?: () => void,
  ): Promise<{ decision: Decision; backend: LimiterBackend }> {
    if (!this.degraded || !this.fallback) {
      try {
        return { decision: await this.withSeed(this.deps.primary, partition, req, false, beforeCall), backend: this.deps.primary };
      } catch (err) {
        if (!this.deps.createFallback) throw err;
        this.enterDegraded(err);
      }
    }
    this.stats.fallbackDecisions++;
    const fallback = this.fallback!;
    return { decision: await this.withSeed(fallback, partition, this.shareOf(partition, req), true), backend: fallback };
  }

  /** acquire(); when the cap counters are missing, load the usage and acquire again with it. */
  private async withSeed(
    backend: LimiterBackend,
    partition: string,
    req: AcquireRequest,
    isFallback: boolean,
    beforeCall?: () => void,
  ): Promise<Decision> {
    beforeCall?.();
    const first = await backend.acquire(req);
    if (!first.needsSeed) return first;
    const seed = await this.seedFor(partition, req);
    if (isFallback) this.fallbackBase.set(partition, { day: req.day, dayUsed: seed.day, monthUsed: seed.month });
    const seeded = isFallback ? this.shareOf(partition, { ...req, seed }) : { ...req, seed };
    beforeCall?.();
    return backend.acquire(seeded);
  }

  private async seedFor(partition: string, req: AcquireRequest): Promise<{ day: number; month: number }> {
    const stored = await this.deps.usage.load(partition, req.day, req.month);
    const known = this.lastKnown.get(partition);
    if (!known || known.month !== req.month) return stored;
    return {
      day: Math.max(stored.day, known.day === req.day ? known.dayUsed : 0),
      month: Math.max(stored.month, known.monthUsed),
    };
  }

  /**
   * While Redis is down every instance limits on its own, so each takes `fallbackShare` of every
   * limit; of the caps, only of what was left when the fallback took over the org.
   */
  private shareOf(partition: string, req: AcquireRequest): AcquireRequest {
    const share = this.deps.config.fallbackShare;
    if (share >= 1) return req;
    const l = req.limits;
    const scale = (n: number) => (n > 0 ? Math.max(1, Math.floor(n * share)) : 0);
    const base = this.fallbackBase.get(partition);
    const cap = (limit: number, used: number) => (limit > 0 ? used + Math.floor(Math.max(0, limit - used) * share) : 0);
    return {
      ...req,
      limits: {
        orgBurst: scale(l.orgBurst),
        orgPerSecond: l.orgPerSecond * share,
        userBurst: scale(l.userBurst),
        userPerSecond: l.userPerSecond * share,
        dailyCap: base && base.day === req.day ? cap(l.dailyCap, base.dayUsed) : scale(l.dailyCap),
        monthlyCap: base ? cap(l.monthlyCap, base.monthUsed) : scale(l.monthlyCap),
        maxConcurrent: scale(l.maxConcurrent),
      },
    };
  }

  private rememberUsage(partition: string, periods: Periods, d: Decision, backend: LimiterBackend): void {
    if (backend !== this.deps.primary || !this.deps.createFallback) return;
    this.lastKnown.set(partition, { day: periods.day, dayUsed: d.dayUsed, month: periods.month, monthUsed: d.monthUsed });
  }

  private enterDegraded(err: unknown): void {
    if (this.degraded) return;
    this.degraded = true;
    this.fallback = this.deps.createFallback!();
    this.deps.logger.error(
      { err: { message: (err as Error).message } },
      'Rate limiter degraded: Redis is unreachable; limiting in memory on this instance until it returns',
    );
    this.probeTimer = setInterval(() => void this.probe(), RECOVERY_PROBE_MS);
    this.probeTimer.unref();
  }

  private async probe(): Promise<void> {
    if (!this.deps.probe || this.probing) return;
    this.probing = true;
    try {
      await this.deps.probe();
      // Before going back: what the fallback admitted goes to PostgreSQL, and the orgs it served
      // have their Redis counters rebuilt from there, so the outage's usage still counts.
      const served = [...this.fallbackBase.keys()];
      await this.deps.usage.flush();
      if (served.length > 0 && this.deps.forgetCaps) {
        const p = utcPeriods(Date.now());
        await this.deps.forgetCaps(served, p.day, p.month);
      }
    } catch {
      return; // still down: try again on the next tick
    } finally {
      this.probing = false;
    }
    if (this.probeTimer) clearInterval(this.probeTimer);
    this.probeTimer = null;
    this.degraded = false;
    this.fallbackBase.clear();
    // Slots still held in the old fallback are released into it; nothing else reads it again.
    this.fallback = null;
    this.deps.logger.info('Rate limiter recovered: limiting on Redis again');
  }

  private block(key: string, nowMs: number, forMs: number, retryAfterSeconds: number, refusedBy: Refusal, decision: Decision | null = null): void {
    if (!(forMs > 0)) return;
    this.blocked.set(key, {
      untilMs: nowMs + Math.min(forMs, MAX_BLOCK_MS),
      retryAtMs: nowMs + retryAfterSeconds * 1000,
      refusedBy,
      decision,
      probeSinceMs: null,
    });
  }

  /**
   * The refusal to repeat from memory; PROBE when this request is the one to ask the backend
   * again; undefined when nothing is blocked. Once a block expires, the first request asks the
   * backend and, until its answer, the others are still refused from memory: one backend call
   * per expiry instead of one per concurrent request of a flood. A probe that has not answered
   * within MAX_BLOCK_MS is given up and another request asks.
   */
  private checkBlocked(key: string, nowMs: number, mayProbe = true): Blocked | typeof PROBE | undefined {
    const b = this.blocked.get(key);
    if (!b) return undefined;
    if (nowMs < b.untilMs) return b;
    if (!mayProbe) return undefined;
    if (b.probeSinceMs === null || nowMs - b.probeSinceMs >= MAX_BLOCK_MS) {
      b.probeSinceMs = nowMs;
      return PROBE;
    }
    return b;
  }

  private refusedFromBlock(b: Blocked, periods: Periods, nowMs: number): Admission {
    this.stats.refused[b.refusedBy]++;
    return repeated(b, periods, nowMs);
  }
}

/** The keys of the caller's remembered refusals in `blocked`: its org's, its own; `keep`: kept in its memo. */
function blockKeys(args: OrgAdmissionArgs, keep: boolean): { readonly org: string; readonly user: string } {
  const known = args.memo?.blockKeys;
  // The same strings as a rule (the cached caller's own), so the check costs two pointer compares.
  if (known !== undefined && known.orgId === args.orgId && known.userId === args.userId) return known;
  const keys = { orgId: args.orgId, userId: args.userId, org: `o:${args.orgId}`, user: `u:${args.orgId}:${args.userId}` };
  if (keep && args.memo) args.memo.blockKeys = keys;
  return keys;
}

/** The refusal a block repeats at `nowMs`. */
function repeated(b: Blocked, periods: Periods, nowMs: number): Admission {
  return {
    allowed: false,
    refusedBy: b.refusedBy,
    retryAfterSeconds: Math.max(1, Math.ceil((b.retryAtMs - nowMs) / 1000)),
    decision: b.decision,
    periods,
    nowMs,
    release: NO_RELEASE,
  };
}
