import { Cluster, Redis, type RedisOptions } from 'ioredis';
import type { Logger } from 'pino';
import type { Config } from '../config/env.js';

export type RedisClient = Redis | Cluster;

/**
 * An ioredis client tuned to fail fast: a command that cannot be sent is refused at once (no
 * offline queue) and one that gets no answer fails after commandTimeoutMs. Callers fall back
 * instead of waiting; the client keeps reconnecting in the background.
 */
export function createRedisClient(config: NonNullable<Config['redis']>, logger: Logger): RedisClient {
  const options: RedisOptions = {
    enableOfflineQueue: false,
    commandTimeout: config.commandTimeoutMs,
    maxRetriesPerRequest: 0,
    connectTimeout: Math.max(1_000, config.commandTimeoutMs * 4),
  };
  const backoff = (times: number) => Math.min(100 * 2 ** Math.min(times, 5), 2_000);
  // A Cluster manages its node connections itself (they connect lazily and reconnect through
  // clusterRetryStrategy): per-node lazyConnect or retryStrategy made it take seconds, or never,
  // to become ready.
  const client: RedisClient = config.cluster
    ? new Cluster([seedNode(config.url)], {
        redisOptions: { ...options, ...credentials(config.url) },
        enableOfflineQueue: false,
        clusterRetryStrategy: backoff,
      })
    : new Redis(config.url, {
        ...options,
        retryStrategy: backoff,
        // Off (ioredis' default), though it sends the commands of one tick in one write: its
        // pipelines kept their commands and answers alive until V8's next full collection. With
        // 50,000 new callers that was about 270 MB more promoted to the old generation and 20 MB
        // more RSS (bench/README.md). The cause, found by experiment: each pipeline defines its
        // `length` accessor on itself, not on its prototype; moved to the prototype, 200,000
        // commands promoted 10 MB instead of 189. The batching did not pay for it either: with
        // every request asking Redis twice (no leases, 10 tenants) the server answered 19.3-20.1k
        // requests/s with it and 23.9-24.1k without.
        enableAutoPipelining: false,
      });
  // Without a listener an 'error' event would crash the process; the limiter reports outages.
  let lastLogged = 0;
  client.on('error', (err: Error) => {
    const now = Date.now();
    if (now - lastLogged > 60_000) {
      lastLogged = now;
      logger.warn({ err: { message: err.message, code: (err as { code?: unknown }).code } }, 'Redis connection error');
    }
  });
  return client;
}

function seedNode(url: string): { host: string; port: number } {
  const u = new URL(url);
  return { host: u.hostname, port: Number(u.port || 6379) };
}

function credentials(url: string): Pick<RedisOptions, 'username' | 'password' | 'tls'> {
  const u = new URL(url);
  return {
    ...(u.username ? { username: decodeURIComponent(u.username) } : {}),
    ...(u.password ? { password: decodeURIComponent(u.password) } : {}),
    ...(u.protocol === 'rediss:' ? { tls: {} } : {}),
  };
}
