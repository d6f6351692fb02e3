/**
 * The API key method: `Authorization: Bearer llmk_...`.
 *
 * The secret's SHA-256 is looked up once (the system path: the key names its org) and the answer
 * kept in an auth cache keyed by that hash. A revoked, re-roled or deleted key is dropped from
 * every instance's cache by the database's own message ('k:<key id>', migration 006); its org's
 * deletion or new limits by 'o:<org id>'. Expiry needs no message: it is checked on every request
 * against the cached expiry, so a key never outlives its expires_at by a request.
 *
 * The last use of each key is kept in memory and written in batches, one statement per interval
 * (USAGE_FLUSH_INTERVAL_MS), not one write per request.
 */
import { createHash } from 'node:crypto';
import type { FastifyBaseLogger, FastifyRequest } from 'fastify';
import type { Database } from '../infra/database.js';
import { invalidToken, type BearerResolver, type ResolvedCaller } from '../middleware/authenticate.js';
import { API_KEY_FORMAT, findApiKeyByHash, isKeyLive, recordApiKeysLastUsed, type ApiKeyLookup } from '../models/apiKey.model.js';
import type { AuthCache, CachePolicy } from './cache.js';
import type { Authenticator } from './index.js';

/** The lookup, with the caller it authenticates as when the key was live when read. */
interface KeyAnswer extends ApiKeyLookup {
  readonly resolved: ResolvedCaller | null;
}

const NO_KEY: KeyAnswer = Object.freeze({ key: null, orgLive: false, limitOverrides: Object.freeze({}), resolved: null });

const KEY_POLICY: CachePolicy<KeyAnswer> = {
  // Every answer is about one hash: never 'unknown_org' (all keys share the empty org of the cache key).
  classify: (v) => (v.resolved ? 'positive' : 'negative'),
  dependsOn: (v) => ({ subject: v.key?.id, org: v.key?.orgId }),
  unknownOrg: NO_KEY,
  freeze: (v) => {
    Object.freeze(v.limitOverrides);
    if (v.key) Object.freeze(v.key);
  },
};

function answerOf(found: ApiKeyLookup): KeyAnswer {
  const { key } = found;
  if (!key || !found.orgLive || !isKeyLive(key, Date.now())) return { ...found, resolved: null };
  // Built once per lookup and shared by every request of the key while it is cached.
  const resolved: ResolvedCaller = Object.freeze({
    context: Object.freeze({ userId: key.id, orgId: key.orgId, role: key.role, email: null, authMethod: 'api_key' as const, credentialId: key.id }),
    caller: null,
    limitOverrides: found.limitOverrides,
  });
  return { ...found, resolved };
}

const sha256Hex = (s: string) => createHash('sha256').update(s, 'utf8').digest('hex');

export interface ApiKeyMethod {
  resolve: BearerResolver;
  /**
   * The caller of a live key whose answer is cached; undefined for anything else (malformed,
   * uncached, unknown, revoked, expired), which `resolve` answers. Records the key's use, as
   * `resolve` does. Never throws, never queries.
   */
  cached: (token: string) => ResolvedCaller | undefined;
  /** Writes the last uses recorded so far (tests; close). */
  flush(): Promise<void>;
  close(): Promise<void>;
}

export function createApiKeyMethod(deps: { db: Database; auth: Authenticator; log: FastifyBaseLogger; flushIntervalMs: number }): ApiKeyMethod {
  const { db, auth, log } = deps;
  // The cache key is ('', hash): the org is what the lookup finds out.
  const cache: AuthCache<KeyAnswer> = auth.createCache<KeyAnswer>(
    (_org, hashHex) => findApiKeyByHash(db, Buffer.from(hashHex, 'hex')).then(answerOf),
    KEY_POLICY,
  );
  const lastUsed = new LastUsedRecorder(db, log, deps.flushIntervalMs);
  lastUsed.start();

  const accept = (answer: KeyAnswer, request: FastifyRequest): ResolvedCaller => {
    const { key, resolved } = answer;
    // A key of a deleted org, like an unknown one, is nobody's: no org to record the refusal in.
    if (!key || !answer.orgLive) throw invalidToken('Invalid API key');
    const now = Date.now();
    if (!resolved || !isKeyLive(key, now)) {
      request.claimedIdentity = { orgId: key.orgId, actor: { type: 'api_key', id: key.id, email: null } };
      throw invalidToken(key.revokedAt !== null ? 'This API key has been revoked' : 'This API key has expired');
    }
    lastUsed.record(key.orgId, key.id, now);
    return resolved;
  };

  return {
    resolve(token, request) {
      if (!API_KEY_FORMAT.test(token)) throw invalidToken('Malformed API key');
      const hash = sha256Hex(token);
      const cached = cache.peek('', hash);
      if (cached) return accept(cached, request);
      return cache.lookup('', hash).then((answer) => accept(answer, request));
    },
    // A request the refusal gate looks at and passes on is hashed again by `resolve`: no raw key
    // is kept between the two to save that (only their hashes are kept anywhere).
    cached: (token) => {
      if (!API_KEY_FORMAT.test(token)) return undefined;
      const answer = cache.peek('', sha256Hex(token));
      if (!answer?.resolved || !answer.key || !answer.orgLive) return undefined;
      const now = Date.now();
      if (!isKeyLive(answer.key, now)) return undefined;
      lastUsed.record(answer.key.orgId, answer.key.id, now);
      return answer.resolved;
    },
    flush: () => lastUsed.flush(),
    close: () => lastUsed.close(),
  };
}

interface LastUse {
  orgId: string;
  keyId: string;
  atMs: number;
}

/**
 * The last use of each key since the previous batch, written in one UPDATE per interval. A batch
 * that fails is kept (newer uses win) and tried again on the next tick; close() writes the rest.
 */
class LastUsedRecorder {
  private pending = new Map<string, LastUse>();
  private inFlight: Promise<void> | null = null;
  private timer: NodeJS.Timeout | null = null;
  private failing = false;

  constructor(
    private readonly db: Database,
    private readonly log: FastifyBaseLogger,
    private readonly intervalMs: number,
    /** Keys waiting at most; beyond, the oldest entry is dropped (its key's last use is then written late or not at all). */
    private readonly maxPending = 100_000,
  ) {}

  start(): void {
    this.timer ??= setInterval(() => void this.flush(), this.intervalMs);
    this.timer.unref();
  }

  record(orgId: string, keyId: string, atMs: number): void {
    const cur = this.pending.get(keyId);
    if (cur) {
      if (atMs > cur.atMs) cur.atMs = atMs;
      return;
    }
    if (this.pending.size >= this.maxPending) {
      const oldest = this.pending.keys().next().value;
      if (oldest !== undefined) this.pending.delete(oldest);
    }
    this.pending.set(keyId, { orgId, keyId, atMs });
  }

  async flush(): Promise<void> {
    // One batch at a time; a flush asked for meanwhile writes what came after it.
    while (this.inFlight) await this.inFlight;
    if (this.pending.size === 0) return;
    const batch = this.pending;
    this.pending = new Map();
    this.inFlight = (async () => {
      try {
        await recordApiKeysLastUsed(
          this.db,
          [...batch.values()].map((u) => ({ orgId: u.orgId, keyId: u.keyId, at: new Date(u.atMs) })),
        );
        if (this.failing) this.log.info('API keys\' last use is being written to the database again');
        this.failing = false;
      } catch (err) {
        for (const [id, use] of batch) {
          const newer = this.pending.get(id);
          if (newer) newer.atMs = Math.max(newer.atMs, use.atMs);
          else this.pending.set(id, use);
        }
        if (!this.failing) this.log.warn({ err }, 'Cannot write API keys\' last use to the database; keeping it to retry');
        this.failing = true;
      } finally {
        this.inFlight = null;
      }
    })();
    return this.inFlight;
  }

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    await this.flush();
  }
}
