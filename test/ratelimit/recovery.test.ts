import type { FastifyInstance } from 'fastify';
import { afterAll, describe, expect, it } from 'vitest';
import { buildTestApp, createTenant, type TestUser } from '../helpers/app.js';
import { hasRedisServer, redisServers } from '../helpers/redisServer.js';

/**
 * A Redis that stops answering for a while but keeps its keys (a network blip, a long pause):
 * what the fallback admitted meanwhile must still count against the caps once Redis is back.
 */
describe.skipIf(!hasRedisServer)('after a Redis outage that kept its keys', () => {
  const servers = redisServers();
  let app: FastifyInstance | undefined;
  afterAll(async () => {
    await app?.close();
  });

  const statuses = async (user: TestUser, n: number) => {
    const out: number[] = [];
    for (let i = 0; i < n; i++) out.push((await app!.inject({ method: 'GET', url: '/v1/me', headers: user.headers })).statusCode);
    return out;
  };

  it('the usage admitted in memory during the outage still counts toward the daily cap', async () => {
    const redis = await servers.start();
    app = await buildTestApp({
      env: { REDIS_URL: redis.url, ORG_DAILY_REQUEST_CAP: '10', USAGE_FLUSH_INTERVAL_MS: '100', REDIS_COMMAND_TIMEOUT_MS: '100' },
    });
    const t = await createTenant();
    expect(await statuses(t.member, 4)).toEqual([200, 200, 200, 200]);

    // Every command waits (and so times out) while the pause lasts; no key is lost.
    const admin = redis.client();
    await admin.call('CLIENT', 'PAUSE', '1500', 'ALL');
    expect(await statuses(t.member, 4)).toEqual([200, 200, 200, 200]);
    expect((await app.inject('/health')).json().rateLimiter).toBe('degraded');

    await expect
      .poll(async () => (await app!.inject('/health')).json<{ rateLimiter: string }>().rateLimiter, { timeout: 10_000, interval: 200 })
      .toBe('redis');
    // 8 of 10 used: without the outage's 4, Redis alone would still admit 6.
    expect(await statuses(t.member, 4)).toEqual([200, 200, 429, 429]);
  });
});
