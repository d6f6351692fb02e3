/**
 * The limiter's contract. Two backends implement it with the same semantics: Redis (one Lua
 * script per request, shared by every instance) and memory (one instance, the embedded default
 * and the fallback while Redis is unreachable).
 */

/** Effective limits of one org. 0 means "no limit" for every field. */
export interface OrgLimits {
  /** Org token bucket: capacity (burst) and refill in tokens per second. */
  readonly orgBurst: number;
  readonly orgPerSecond: number;
  /** Per-user token bucket inside the org. */
  readonly userBurst: number;
  readonly userPerSecond: number;
  /** Hard caps on admitted cost per calendar day and month (UTC). */
  readonly dailyCap: number;
  readonly monthlyCap: number;
  /** Requests in flight at once. */
  readonly maxConcurrent: number;
}

export interface AcquireRequest {
  readonly orgId: string;
  readonly userId: string;
  readonly limits: OrgLimits;
  /** What this request costs in bucket tokens and toward the caps (1 for a plain request). */
  readonly cost: number;
  /** The caller's clock (ms since epoch). Backends never read a clock of their own. */
  readonly nowMs: number;
  /** Calendar periods of nowMs in UTC: 'YYYY-MM-DD' and 'YYYY-MM', and when each ends (ms). */
  readonly day: string;
  readonly month: string;
  readonly dayEndsMs: number;
  readonly monthEndsMs: number;
  /** Unique id of the concurrency slot this request takes (the request id). */
  readonly slotId: string;
  /**
   * Concurrency slots to take (default 1: the slot `slotId`). A lease (src/ratelimit/leases.ts)
   * takes n > 1 at once, named `slotId#1` ... `slotId#n`, and is refused unless all n fit.
   */
  readonly slots?: number;
  /** Longest a slot may be held before it is considered leaked (a crashed instance). */
  readonly slotTtlMs: number;
  /**
   * Usage already counted toward the caps, from PostgreSQL: given when a previous call answered
   * `needsSeed` (the cap counters were missing: first use, Redis restart, flush or eviction).
   * A backend sets a missing counter to this value; an existing counter is never lowered.
   */
  readonly seed?: { readonly day: number; readonly month: number };
}

export type Refusal = 'org_rate' | 'user_rate' | 'daily_cap' | 'monthly_cap' | 'concurrency';

export interface BucketState {
  /** Whole tokens left after this request (or now, if refused). */
  readonly remaining: number;
  /** Seconds until the bucket is full again. */
  readonly resetSeconds: number;
}

export interface Decision {
  readonly allowed: boolean;
  /** The first limit that refused, in the order org_rate, user_rate, daily_cap, monthly_cap, concurrency. */
  readonly refusedBy?: Refusal;
  /** When refused: seconds until a retry can succeed (at least 1). */
  readonly retryAfterSeconds: number;
  /**
   * The cap counters of this period do not exist and no seed was given: nothing was charged.
   * Call again with `seed` (loaded from PostgreSQL).
   */
  readonly needsSeed: boolean;
  readonly org: BucketState;
  readonly user: BucketState;
  /** Cost counted toward the caps in this day and month, this request included if allowed. */
  readonly dayUsed: number;
  readonly monthUsed: number;
  /** Slots held in the org, this request's included if allowed. */
  readonly concurrent: number;
}

/** What a lease gives back: the tokens it did not use, and its slots. */
export interface RefundRequest {
  readonly orgId: string;
  readonly userId: string;
  readonly limits: OrgLimits;
  /** Unused cost: back into both buckets (never above the burst), off both cap counters. */
  readonly tokens: number;
  readonly nowMs: number;
  /** The lease's periods: its charge went to these counters. */
  readonly day: string;
  readonly month: string;
  readonly slotId: string;
  /** Slots the lease took (0 when the concurrency cap was off). */
  readonly slots: number;
}

export interface LimiterBackend {
  readonly kind: 'redis' | 'memory';
  /** Checks every limit, then charges all of them, atomically: a refused request consumes nothing. */
  acquire(req: AcquireRequest): Promise<Decision>;
  /** Frees a concurrency slot; idempotent. */
  release(orgId: string, slotId: string): Promise<void>;
  /** Gives back what a lease did not use; idempotent only for its slots, so call it once. */
  refund(req: RefundRequest): Promise<void>;
  close(): Promise<void>;
}
