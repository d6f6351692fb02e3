/**
 * Rate limiting and quotas: the only door into src/ratelimit. Per-org and per-user token
 * buckets, daily and monthly caps, a concurrency cap per org, per-address limits for anonymous
 * and failed-auth traffic; on Redis (shared by every instance) or in memory.
 */
import type { Logger } from 'pino';
import type { Config } from '../config/env.js';
import type { Database } from '../infra/database.js';
import { createRedisClient, type RedisClient } from '../infra/redis.js';
import { RateLimiter } from './limiter.js';
import { createMemoryBackend, limiterKeys } from './memory.js';
import { createRedisBackend } from './redis.js';
import { UsageRecorder } from './usage.js';

export { RateLimiter, type Admission, type LimiterMode } from './limiter.js';
export { registerIpLimit, registerOrgLimit } from './plugin.js';
export { utcPeriods } from './periods.js';
export type { OrgLimits, Decision, Refusal } from './types.js';

export interface RateLimiterHandle {
  limiter: RateLimiter;
  /** Resolves true once Redis is connected (at once without Redis), false after `timeoutMs`. */
  ready(timeoutMs: number): Promise<boolean>;
  /** Closes the limiter (flushing usage to the database), then its Redis connection. */
  close(): Promise<void>;
}

export function createRateLimiter(config: Config, db: Database, logger: Logger): RateLimiterHandle {
  const usage = new UsageRecorder(db, logger, config.rateLimit.usageFlushIntervalMs);
  usage.start();
  const memory = () => createMemoryBackend({ maxKeys: config.rateLimit.memoryMaxKeys });
  if (!config.redis) {
    const limiter = new RateLimiter({ primary: memory(), createFallback: null, usage, config: config.rateLimit, logger });
    return { limiter, ready: () => Promise.resolve(true), close: () => limiter.close() };
  }
  const client: RedisClient = createRedisClient(config.redis, logger);
  const limiter = new RateLimiter({
    primary: createRedisBackend(client),
    createFallback: memory,
    // One DEL per org: an org's keys share a hash slot, different orgs may not (Cluster).
    forgetCaps: async (orgIds, day, month) => {
      for (const orgId of orgIds) {
        const keys = limiterKeys({ orgId, userId: '-', day, month });
        await client.del(keys.day, keys.month);
      }
    },
    usage,
    config: config.rateLimit,
    logger,
    probe: () => client.ping(),
  });
  return {
    limiter,
    ready: (timeoutMs) =>
      client.status === 'ready'
        ? Promise.resolve(true)
        : new Promise<boolean>((resolve) => {
            const timer = setTimeout(() => {
              client.off('ready', onReady);
              resolve(false);
            }, timeoutMs);
            const onReady = () => {
              clearTimeout(timer);
              resolve(true);
            };
            client.once('ready', onReady);
          }),
    async close() {
      await limiter.close();
      await client.quit().catch(() => client.disconnect());
    },
  };
}
