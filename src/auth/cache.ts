import { LRUCache } from 'lru-cache';
import type { AuthLookup } from '../models/user.model.js';

/**
 * The caller lookup of every authenticated request, kept in process memory.
 *
 * Storage, LRU eviction and TTL are lru-cache's. What is written here is what no cache library
 * gives together and what authentication needs to be correct:
 *  - Invalidation by user id or by org id without an index of keys: every invalidation takes the
 *    next number of a counter ("epoch") and remembers it per id; an entry (or a lookup in flight)
 *    older than the last invalidation of its user or org is stale. That also covers a lookup that
 *    read the database just before a change and finishes just after the change's invalidation.
 *  - Single flight: concurrent misses for one (org, user) make one query; a lookup that started
 *    before an invalidation is not joined by requests that come after it.
 *  - A separate, smaller LRU for failed lookups, so a flood of unknown ids cannot evict the callers
 *    that do exist; and an org-wide negative entry, so random user ids in an unknown org cost one
 *    query, not one each.
 *  - A bound that holds whatever happens to the invalidation channel: an entry's TTL counts from
 *    the moment its query started, so nothing is served longer than `ttlMs` after it was read.
 */

export interface AuthCacheOptions {
  /** 0 turns the cache off: every lookup queries. */
  ttlMs: number;
  maxEntries: number;
  negativeMaxEntries: number;
}

/**
 * Loads the answer for a key: an org (the one the caller claims, or '' when the credential names
 * no org, as an API key does) and an id within it (a user id, a session id, a key's hash...).
 */
export type AuthLoader<V = AuthLookup> = (orgId: string, id: string) => Promise<V>;

/**
 * What a cache needs to know about its answers. Every id is a "subject": a user, an API key, a
 * session... (UUIDs, unique across tables), invalidated by `{ kind: 'user', id }`.
 */
export interface CachePolicy<V> {
  /**
   * 'positive': kept in the main LRU; 'negative': in the small one; 'unknown_org': one negative
   * entry for the whole org, whatever the id (every id of an unknown org gets the same answer).
   */
  classify(value: V, orgId: string): 'positive' | 'negative' | 'unknown_org';
  /** Subjects and orgs besides the key's own whose invalidation makes this answer stale. */
  dependsOn(value: V): { subject?: string | undefined; org?: string | undefined };
  /** The answer an 'unknown_org' entry gives. */
  readonly unknownOrg: V;
  /** Called once on every answer before it is stored: freeze what callers must not change. */
  freeze?(value: V): void;
  /**
   * The id alone names the answer, whatever org is asked about (a user id, a UUID), and
   * `classify(value, orgId)` tells whether it is positive for that org. Positive
   * answers are then kept under the id alone: a hit builds no key string, and a caller's raw
   * header values can be tried before they are validated (only validated ids are ever stored).
   */
  readonly keyedById?: boolean;
}

/** The caller lookup by (org, user id) of the header and session methods. */
export const USER_LOOKUP_POLICY: CachePolicy<AuthLookup> = {
  classify: (v, orgId) => (v.user && v.user.orgId === orgId ? 'positive' : v.orgExists ? 'negative' : 'unknown_org'),
  // A user of another org is refused (403) only while that org is live too.
  dependsOn: (v) => ({ subject: v.user?.id, org: v.user?.orgId }),
  unknownOrg: Object.freeze({ orgExists: false, user: null, limitOverrides: Object.freeze({}) }),
  freeze: (v) => Object.freeze(v.limitOverrides),
  // A user id is unique in practice; should two orgs ever share one, their entries replace each
  // other (each lookup checks the org), which is slower but never answers for the wrong org.
  keyedById: true,
};

/** What the invalidation channel carries. `user` is any subject: a user, an API key, a session. */
export type Invalidation = { kind: 'user'; id: string } | { kind: 'org'; id: string } | { kind: 'all' };

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/**
 * `u:<user id>`, `k:<api key id>`, `s:<session id>`, `o:<org id>` or `*`, as the database triggers
 * send them; null for anything else.
 */
export function parseInvalidation(payload: string): Invalidation | null {
  if (payload === '*') return { kind: 'all' };
  const id = payload.slice(2);
  if (!UUID.test(id) || payload[1] !== ':') return null;
  const kind = payload.charAt(0);
  if (kind === 'o') return { kind: 'org', id };
  return kind === 'u' || kind === 'k' || kind === 's' ? { kind: 'user', id } : null;
}

interface Entry<V> {
  value: V;
  /** The epoch when its query started. */
  epoch: number;
  /**
   * performance.now() after which it is not served: its query's start plus the TTL. Kept here
   * rather than given to lru-cache as a TTL: a hit then reads one object it reads anyway, instead
   * of lru-cache's two per-slot arrays (with 50,000 callers, each read is a cache miss).
   */
  expiresAt: number;
}

interface Flight<V> {
  promise: Promise<V>;
  epoch: number;
  startedAt: number;
}

/** Invalidations remembered beyond this are replaced by one "everything" invalidation. */
const MAX_REMEMBERED_INVALIDATIONS = 100_000;

export interface AuthCacheStats {
  hits: number;
  negativeHits: number;
  misses: number;
  /** Misses that joined a lookup already in flight instead of querying. */
  coalesced: number;
  loads: number;
  invalidations: number;
  size: number;
  negativeSize: number;
}

/** Epoch and time of the last invalidation of each id, oldest first. */
type InvalidationLog = Map<string, { epoch: number; at: number }>;

export class AuthCache<V = AuthLookup> {
  private readonly enabled: boolean;
  // Made on the first store: an LRU with a \`max\` allocates its slots for \`max\` entries up front
  // (4 MB for 100,000), and a cache of credentials this server never sees (API keys, sessions)
  // would hold that from start to exit.
  private positive: LRUCache<string, Entry<V>> | undefined;
  private negative: LRUCache<string, Entry<V>> | undefined;
  private readonly inflight = new Map<string, Flight<V>>();
  private epoch = 0;
  private allInvalidatedAt = 0;
  private readonly users: InvalidationLog = new Map();
  private readonly orgs: InvalidationLog = new Map();
  private readonly counts = { hits: 0, negativeHits: 0, misses: 0, coalesced: 0, loads: 0, invalidations: 0 };

  private readonly policy: CachePolicy<V>;

  constructor(
    private readonly load: AuthLoader<V>,
    private readonly opts: AuthCacheOptions,
    policy?: CachePolicy<V>,
  ) {
    // Without a policy the values are AuthLookups (the default type argument).
    this.policy = policy ?? (USER_LOOKUP_POLICY as unknown as CachePolicy<V>);
    this.enabled = opts.ttlMs > 0;
  }

  /** The cached answer, or undefined when it must be looked up (then call `lookup`). */
  peek(orgId: string, userId: string): V | undefined {
    if (!this.enabled) return undefined;
    const hit = this.peekPositive(orgId, userId);
    if (hit !== undefined) return hit;
    if (!this.negative) return undefined;
    const key = `${orgId}:${userId}`;
    for (const negativeKey of [key, orgKey(orgId)]) {
      const miss = this.negative.get(negativeKey);
      if (!miss) continue;
      if (miss.expiresAt > performance.now() && !this.isStale(miss, orgId, userId)) {
        this.counts.negativeHits++;
        return miss.value;
      }
      this.negative.delete(negativeKey);
    }
    return undefined;
  }

  /**
   * Only the positive answer, or undefined. With a policy `keyedById`, the ids may be a caller's
   * raw header values: a hit means both are exactly ids this cache stored (so well-formed).
   */
  peekPositive(orgId: string, userId: string): V | undefined {
    if (!this.positive) return undefined;
    const key = this.positiveKey(orgId, userId);
    const hit = this.positive.get(key);
    if (hit === undefined) return undefined;
    // Kept under the id alone: the answer is this org's only if it says so.
    if (this.policy.keyedById === true && this.policy.classify(hit.value, orgId) !== 'positive') return undefined;
    if (hit.expiresAt <= performance.now() || this.isStale(hit, orgId, userId)) {
      this.positive.delete(key);
      return undefined;
    }
    this.counts.hits++;
    return hit.value;
  }

  /** The answer from the cache, or from one database query shared by concurrent callers. */
  async lookup(orgId: string, userId: string): Promise<V> {
    const cached = this.peek(orgId, userId);
    if (cached) return cached;
    this.counts.misses++;
    if (!this.enabled) {
      this.counts.loads++;
      return this.load(orgId, userId);
    }
    const key = `${orgId}:${userId}`;
    const now = performance.now();
    const flying = this.inflight.get(key);
    // Joined only if nothing about this caller changed since it started, and it is younger than
    // the TTL (older invalidations are forgotten, so its epoch would prove nothing).
    if (flying && flying.epoch >= this.lastInvalidation(orgId, userId) && now - flying.startedAt < this.opts.ttlMs) {
      this.counts.coalesced++;
      // The key's own id may not be the subject its answer depends on (an API key is cached by
      // its hash, and invalidated by its id): once the answer is known, check that too, and look
      // again if it changed while the query ran.
      // (Answers about the key's own id need no second look: the check above covered them, as
      // far as anything can for a request that arrived while the query ran.)
      return flying.promise.then((value) =>
        this.policy.dependsOn(value).subject !== userId && this.isStale({ value, epoch: flying.epoch }, orgId, userId)
          ? this.lookup(orgId, userId)
          : value,
      );
    }
    const epoch = this.epoch;
    this.counts.loads++;
    const promise = this.load(orgId, userId).then(
      (value) => {
        if (this.inflight.get(key)?.promise === promise) this.inflight.delete(key);
        this.store(key, orgId, userId, { value, epoch }, now);
        return value;
      },
      (err: unknown) => {
        if (this.inflight.get(key)?.promise === promise) this.inflight.delete(key);
        throw err;
      },
    );
    this.inflight.set(key, { promise, epoch, startedAt: now });
    return promise;
  }

  invalidate(what: Invalidation): void {
    this.counts.invalidations++;
    const epoch = ++this.epoch;
    if (what.kind === 'all' || this.users.size + this.orgs.size >= MAX_REMEMBERED_INVALIDATIONS) {
      this.allInvalidatedAt = epoch;
      this.users.clear();
      this.orgs.clear();
      this.positive?.clear();
      this.negative?.clear();
      return;
    }
    const log = what.kind === 'user' ? this.users : this.orgs;
    const now = performance.now();
    // Re-inserted so the map stays ordered by time, and pruned from its old end: an invalidation
    // older than the TTL cannot concern any entry still alive (TTLs count from the query's start).
    log.delete(what.id);
    log.set(what.id, { epoch, at: now });
    for (const [id, v] of log) {
      if (now - v.at <= this.opts.ttlMs) break;
      log.delete(id);
    }
    if (what.kind === 'org') this.negative?.delete(orgKey(what.id));
  }

  stats(): AuthCacheStats {
    return { ...this.counts, size: this.positive?.size ?? 0, negativeSize: this.negative?.size ?? 0 };
  }

  private lastInvalidation(orgId: string, userId: string, otherOrgId?: string): number {
    let last = this.allInvalidatedAt;
    if (this.orgs.size > 0) {
      last = Math.max(last, this.orgs.get(orgId)?.epoch ?? 0);
      if (otherOrgId !== undefined) last = Math.max(last, this.orgs.get(otherOrgId)?.epoch ?? 0);
    }
    if (this.users.size > 0) last = Math.max(last, this.users.get(userId)?.epoch ?? 0);
    return last;
  }

  private positiveKey(orgId: string, id: string, value?: V): string {
    if (this.policy.keyedById !== true) return `${orgId}:${id}`;
    // Stored under the answer's own copy of the id (its subject), which the entry keeps anyway,
    // rather than the request's: one string per cached caller instead of two.
    return (value === undefined ? undefined : this.policy.dependsOn(value).subject) ?? id;
  }

  private isStale(entry: Pick<Entry<V>, 'value' | 'epoch'>, orgId: string, userId: string): boolean {
    // Nothing invalidated one by one within the TTL (the common case): only "everything" counts.
    if (this.users.size === 0 && this.orgs.size === 0) return entry.epoch < this.allInvalidatedAt;
    const { subject, org } = this.policy.dependsOn(entry.value);
    let last = this.lastInvalidation(orgId, userId, org !== orgId ? org : undefined);
    if (subject !== undefined && subject !== userId && this.users.size > 0) {
      last = Math.max(last, this.users.get(subject)?.epoch ?? 0);
    }
    return entry.epoch < last;
  }

  private store(key: string, orgId: string, userId: string, answer: Pick<Entry<V>, 'value' | 'epoch'>, startedAt: number): void {
    if (!this.enabled) return;
    if (this.isStale(answer, orgId, userId)) return;
    const expiresAt = startedAt + this.opts.ttlMs;
    if (expiresAt <= performance.now()) return;
    const entry: Entry<V> = { value: answer.value, epoch: answer.epoch, expiresAt };
    this.policy.freeze?.(entry.value);
    const classified = this.policy.classify(entry.value, orgId);
    // LRUs bounded by count only: expiry is the entry's own (see Entry). An expired entry is
    // dropped when next asked for, or evicted as the least recently used.
    if (classified === 'positive') {
      (this.positive ??= new LRUCache({ max: this.opts.maxEntries })).set(this.positiveKey(orgId, userId, entry.value), entry);
      this.negative?.delete(key);
      return;
    }
    const negative = (this.negative ??= new LRUCache({ max: this.opts.negativeMaxEntries }));
    switch (classified) {
      case 'unknown_org':
        // Whatever the id, an unknown org answers 401: one entry serves every id in it.
        negative.set(orgKey(orgId), { value: this.policy.unknownOrg, epoch: entry.epoch, expiresAt });
        break;
      case 'negative':
        negative.set(key, entry);
        break;
    }
  }
}

const orgKey = (orgId: string) => `o:${orgId}`;
