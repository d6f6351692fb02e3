/**
 * Authentication's door: who a caller is, looked up once and then kept in memory until it
 * changes. The rest of the app uses only what this file exports.
 */
import { randomUUID } from 'node:crypto';
import type { FastifyBaseLogger } from 'fastify';
import type { AuthCacheConfig } from '../config/env.js';
import type { Database, Subscription } from '../infra/database.js';
import { findAuthIdentity, type AuthLookup } from '../models/user.model.js';
import { AuthCache, parseInvalidation, type AuthCacheStats, type AuthLoader, type CachePolicy, type Invalidation } from './cache.js';

export type { AuthCacheStats, CachePolicy } from './cache.js';
export type { AuthLookup } from '../models/user.model.js';

/** The channel the triggers of migration 003 notify on. */
export const AUTH_CHANNEL = 'llm_app_auth';
const SYNC_PREFIX = 'sync:';
const SYNC_TIMEOUT_MS = 2_000;

export interface Authenticator {
  /** The cached answer, or undefined: then call `lookup`. Synchronous, for the common case. */
  peek(orgId: string, userId: string): AuthLookup | undefined;
  /**
   * The cached caller (a live user of that org) or undefined, for ids as they came in a request,
   * not yet validated: it answers only for the exact strings of ids it has stored.
   */
  peekCaller(orgId: string, userId: string): AuthLookup | undefined;
  lookup(orgId: string, userId: string): Promise<AuthLookup>;
  /**
   * Another cache of credentials (API keys, sessions...) with the same TTL, bounds and
   * invalidations as the caller cache: a message for a subject or an org reaches every cache.
   */
  createCache<V>(load: AuthLoader<V>, policy: CachePolicy<V>): AuthCache<V>;
  /** After this instance changed a subject (user, API key, session) or an org: forget it now, without waiting for the channel. */
  forgetUser(userId: string): void;
  forgetOrg(orgId: string): void;
  /**
   * Resolves true once every change committed before the call has reached this instance's cache
   * (a message sent through the channel has come back), false after 2 s.
   */
  sync(): Promise<boolean>;
  /** Whether changes made by other instances reach this one now (else cached callers live out their TTL). */
  readonly invalidationConnected: boolean;
  stats(): AuthCacheStats;
  /** Resolves true when the invalidation channel is up, false after `timeoutMs`. */
  ready(timeoutMs: number): Promise<boolean>;
  close(): Promise<void>;
}

export function createAuthenticator(config: AuthCacheConfig, db: Database, logger: FastifyBaseLogger): Authenticator {
  const cache = new AuthCache((orgId, userId) => findAuthIdentity(db, orgId, userId), config);
  const caches: AuthCache<unknown>[] = [cache as AuthCache<unknown>];
  const invalidate = (what: Invalidation) => {
    for (const c of caches) c.invalidate(what);
  };
  const syncWaiters = new Map<string, () => void>();
  const readyWaiters = new Set<() => void>();
  let lost = false;

  // With the cache off there is nothing to invalidate, and no connection to hold.
  const subscription: Subscription = config.ttlMs === 0 ? { connected: true, close: async () => undefined } : db.subscribe(AUTH_CHANNEL, {
    onMessage(payload) {
      if (payload.startsWith(SYNC_PREFIX)) {
        syncWaiters.get(payload.slice(SYNC_PREFIX.length))?.();
        return;
      }
      const what = parseInvalidation(payload);
      if (what) invalidate(what);
      else logger.warn({ payload: payload.slice(0, 100) }, 'Ignored an unknown message on the auth invalidation channel');
    },
    onConnected() {
      // Whatever changed while nobody was listening is unknown: start again from the database.
      invalidate({ kind: 'all' });
      if (lost) logger.info('Auth cache invalidation channel restored');
      lost = false;
      for (const resolve of readyWaiters) resolve();
      readyWaiters.clear();
    },
    onDisconnected(err) {
      lost = true;
      logger.warn(
        { err: { message: err.message } },
        `Auth cache invalidation channel lost: changes made elsewhere reach this instance only when cached callers expire (AUTH_CACHE_TTL_MS=${config.ttlMs}); reconnecting`,
      );
    },
  });

  return {
    peek: (orgId, userId) => cache.peek(orgId, userId),
    peekCaller: (orgId, userId) => cache.peekPositive(orgId, userId),
    lookup: (orgId, userId) => cache.lookup(orgId, userId),
    createCache<V>(load: AuthLoader<V>, policy: CachePolicy<V>) {
      const created = new AuthCache<V>(load, config, policy);
      caches.push(created as AuthCache<unknown>);
      return created;
    },
    forgetUser: (id) => invalidate({ kind: 'user', id }),
    forgetOrg: (id) => invalidate({ kind: 'org', id }),
    async sync() {
      if (config.ttlMs === 0) return true;
      const nonce = randomUUID();
      const arrived = new Promise<boolean>((resolve) => {
        const timer = setTimeout(() => {
          syncWaiters.delete(nonce);
          resolve(false);
        }, SYNC_TIMEOUT_MS);
        syncWaiters.set(nonce, () => {
          clearTimeout(timer);
          syncWaiters.delete(nonce);
          resolve(true);
        });
      });
      await db.query('SELECT pg_notify($1, $2)', [AUTH_CHANNEL, SYNC_PREFIX + nonce]);
      return arrived;
    },
    get invalidationConnected() {
      return subscription.connected;
    },
    stats: () => sumStats(caches.map((c) => c.stats())),
    async ready(timeoutMs) {
      if (subscription.connected) return true;
      let done: () => void = () => undefined;
      const up = new Promise<boolean>((resolve) => {
        done = () => resolve(true);
        readyWaiters.add(done);
      });
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(false), timeoutMs);
      });
      const result = await Promise.race([up, timeout]);
      clearTimeout(timer);
      readyWaiters.delete(done);
      return result;
    },
    close: () => subscription.close(),
  };
}

function sumStats(all: AuthCacheStats[]): AuthCacheStats {
  const total: AuthCacheStats = { hits: 0, negativeHits: 0, misses: 0, coalesced: 0, loads: 0, invalidations: 0, size: 0, negativeSize: 0 };
  for (const s of all) for (const k of Object.keys(total) as (keyof AuthCacheStats)[]) total[k] += s[k];
  // Every cache gets every invalidation: count them once.
  total.invalidations = all[0]?.invalidations ?? 0;
  return total;
}
