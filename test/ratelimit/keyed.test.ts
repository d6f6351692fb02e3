import { randomUUID } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { createRedisClient } from '../../src/infra/redis.js';
import { RateLimiter } from '../../src/ratelimit/limiter.js';
import { createMemoryBackend } from '../../src/ratelimit/memory.js';
import { createRedisBackend } from '../../src/ratelimit/redis.js';
import type { LimiterBackend } from '../../src/ratelimit/types.js';
import { UsageRecorder } from '../../src/ratelimit/usage.js';
import { testConfig } from '../helpers/app.js';
import { getTestDb, silentLogger } from '../helpers/db.js';
import { hasRedisServer, redisServers } from '../helpers/redisServer.js';
import { T0 } from './helpers.js';

/**
 * acquireKey: a token bucket under any name (a client address, an account), on either backend,
 * shared by every instance on Redis. The per-address limit and the password-attempt limits use it.
 */

const limiters: RateLimiter[] = [];
const closers: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  await Promise.all(limiters.splice(0).map((l) => l.close()));
  await Promise.all(closers.splice(0).map((c) => c()));
});

async function limiterOn(backend: LimiterBackend): Promise<RateLimiter> {
  const config = testConfig();
  const usage = new UsageRecorder(await getTestDb(), silentLogger, 60_000);
  const limiter = new RateLimiter({ primary: backend, createFallback: null, usage, config: config.rateLimit, logger: silentLogger });
  limiters.push(limiter);
  return limiter;
}

// Three attempts, refilled over 15 minutes: one every 300 s.
const bucket = { burst: 3, perSecond: 3 / 900 };

function behavesAsABucket(makeBackend: () => Promise<LimiterBackend>) {
  it('allows the burst, then refuses with the seconds until the next token, then allows one more once it came back', async () => {
    const limiter = await limiterOn(await makeBackend());
    const key = `test:${randomUUID()}`;
    const answers = [];
    for (let i = 0; i < 4; i++) answers.push(await limiter.acquireKey(key, bucket, T0 + i));
    expect(answers.map((a) => a.allowed)).toEqual([true, true, true, false]);
    expect(answers[3]!.retryAfterSeconds).toBeGreaterThanOrEqual(299);
    expect(answers[3]!.retryAfterSeconds).toBeLessThanOrEqual(300);
    expect((await limiter.acquireKey(key, bucket, T0 + 200_000)).allowed).toBe(false);
    expect((await limiter.acquireKey(key, bucket, T0 + 301_000)).allowed).toBe(true);
    expect((await limiter.acquireKey(key, bucket, T0 + 302_000)).allowed).toBe(false);
  });

  it('keys are independent of each other and of the per-address limit', async () => {
    const limiter = await limiterOn(await makeBackend());
    const [k1, k2] = [`test:${randomUUID()}`, `test:${randomUUID()}`];
    for (let i = 0; i < 3; i++) expect((await limiter.acquireKey(k1, bucket, T0)).allowed).toBe(true);
    expect((await limiter.acquireKey(k1, bucket, T0)).allowed).toBe(false);
    expect((await limiter.acquireKey(k2, bucket, T0)).allowed).toBe(true);
    expect((await limiter.acquireIp('10.1.2.3', 60, T0)).allowed).toBe(true);
  });
}

describe('acquireKey on the memory backend', () => {
  behavesAsABucket(() => Promise.resolve(createMemoryBackend({ maxKeys: 10_000 })));

  it('after the last token, the next attempt is refused in process without asking the backend', async () => {
    const inner = createMemoryBackend({ maxKeys: 10_000 });
    let calls = 0;
    const counting: LimiterBackend = {
      kind: 'memory',
      acquire: (r) => (calls++, inner.acquire(r)),
      release: (orgId, slotId) => inner.release(orgId, slotId),
      refund: (req) => inner.refund(req),
      close: () => inner.close(),
    };
    const limiter = await limiterOn(counting);
    const key = `test:${randomUUID()}`;
    for (let i = 0; i < 3; i++) await limiter.acquireKey(key, bucket, T0);
    expect(calls).toBe(3);
    expect((await limiter.acquireKey(key, bucket, T0 + 10)).allowed).toBe(false);
    expect(calls).toBe(3);
  });
});

describe.skipIf(!hasRedisServer)('acquireKey on Redis', () => {
  const servers = redisServers();
  const redisBackend = async (url: string) => {
    const client = createRedisClient({ url, cluster: false, commandTimeoutMs: 1_000 }, silentLogger);
    closers.push(() => client.quit().catch(() => client.disconnect()));
    if (client.status !== 'ready') await new Promise((resolve) => client.once('ready', resolve));
    return createRedisBackend(client);
  };
  let url: string | undefined;
  const server = async () => (url ??= (await servers.start()).url);

  behavesAsABucket(async () => redisBackend(await server()));

  it('two instances share one bucket', async () => {
    const [one, two] = [await limiterOn(await redisBackend(await server())), await limiterOn(await redisBackend(await server()))];
    const key = `test:${randomUUID()}`;
    expect((await one.acquireKey(key, bucket, T0)).allowed).toBe(true);
    expect((await two.acquireKey(key, bucket, T0 + 1)).allowed).toBe(true);
    expect((await one.acquireKey(key, bucket, T0 + 2)).allowed).toBe(true);
    expect((await two.acquireKey(key, bucket, T0 + 3)).allowed).toBe(false);
  });
});
