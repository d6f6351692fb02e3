import { randomUUID } from 'node:crypto';
import http from 'node:http';
import net from 'node:net';
import type { AddressInfo } from 'node:net';
import type { FastifyInstance } from 'fastify';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { setOrgLimitOverrides } from '../../src/models/orgLimits.model.js';
import { buildApp } from '../../src/app.js';
import { RateLimiter } from '../../src/ratelimit/limiter.js';
import { createMemoryBackend } from '../../src/ratelimit/memory.js';
import type { LimiterBackend } from '../../src/ratelimit/types.js';
import { UsageRecorder } from '../../src/ratelimit/usage.js';
import { buildTestApp, createTenant, testConfig, type TestUser } from '../helpers/app.js';
import { insertApiKey } from '../helpers/apiKeys.js';
import { getTestDb, silentLogger } from '../helpers/db.js';

/**
 * The limits as a client meets them, through HTTP, on the in-memory limiter (the Redis backend
 * has the same contract: test/ratelimit/backends.test.ts runs both; the multi-process suite runs
 * the server on Redis).
 */

const apps: FastifyInstance[] = [];
afterEach(async () => {
  await Promise.all(apps.splice(0).map((a) => a.close()));
});
afterAll(async () => {
  await Promise.all(apps.splice(0).map((a) => a.close()));
});

async function appWith(env: Record<string, string>): Promise<FastifyInstance> {
  const app = await buildTestApp({ env });
  apps.push(app);
  return app;
}

const get = (app: FastifyInstance, user: TestUser, url = '/v1/me') => app.inject({ method: 'GET', url, headers: user.headers });

async function statuses(app: FastifyInstance, user: TestUser, n: number, url = '/v1/me'): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < n; i++) out.push((await get(app, user, url)).statusCode);
  return out;
}

const count = (xs: number[], v: number) => xs.filter((x) => x === v).length;

describe('org and user token buckets', () => {
  it('admits the burst, then 429 rate_limited with Retry-After and the IETF fields', async () => {
    // A refill so slow that nothing comes back during the test.
    const app = await appWith({ ORG_RATE_LIMIT_BURST: '3', ORG_RATE_LIMIT_PER_SECOND: '0.01' });
    const t = await createTenant();
    const ok = await get(app, t.member);
    expect(ok.statusCode).toBe(200);
    expect(ok.headers['ratelimit-policy']).toBe('"org";q=3;w=300');
    expect(ok.headers.ratelimit).toBe('"org";r=2;t=100');
    expect(await statuses(app, t.member, 2)).toEqual([200, 200]);
    const refused = await get(app, t.member);
    expect(refused.statusCode).toBe(429);
    expect(refused.json()).toEqual({
      error: 'Too Many Requests',
      message: 'Too many requests for this organization; retry later',
      code: 'rate_limited',
      requestId: refused.headers['x-request-id'],
    });
    expect(Number(refused.headers['retry-after'])).toBeGreaterThanOrEqual(99);
    expect(refused.headers['ratelimit-policy']).toBe('"org";q=3;w=300');
  });

  it('one user cannot use up the org: the user bucket refuses that user while others are served', async () => {
    const app = await appWith({
      ORG_RATE_LIMIT_BURST: '10',
      ORG_RATE_LIMIT_PER_SECOND: '0.01',
      USER_RATE_LIMIT_BURST: '2',
      USER_RATE_LIMIT_PER_SECOND: '0.01',
    });
    const t = await createTenant();
    expect(await statuses(app, t.member, 4)).toEqual([200, 200, 429, 429]);
    const res = await get(app, t.member);
    expect(res.json().message).toBe('Too many requests for this user; retry later');
    expect(await statuses(app, t.admin, 2)).toEqual([200, 200]);
    expect(await statuses(app, t.owner, 2)).toEqual([200, 200]);
  });

  it('a flooding org causes no 429 for another org', async () => {
    const app = await appWith({ ORG_RATE_LIMIT_BURST: '5', ORG_RATE_LIMIT_PER_SECOND: '0.01' });
    const noisy = await createTenant();
    const quiet = await createTenant();
    const flood = await Promise.all(Array.from({ length: 60 }, () => get(app, noisy.member)));
    expect(count(flood.map((r) => r.statusCode), 200)).toBe(5);
    expect(count(flood.map((r) => r.statusCode), 429)).toBe(55);
    expect(await statuses(app, quiet.member, 5)).toEqual([200, 200, 200, 200, 200]);
  });

  it('a refused request consumes nothing: tokens come back at the refill rate, whatever the flood', async () => {
    const app = await appWith({ ORG_RATE_LIMIT_BURST: '2', ORG_RATE_LIMIT_PER_SECOND: '20' });
    const t = await createTenant();
    expect(await statuses(app, t.member, 2)).toEqual([200, 200]);
    // Refused requests while the bucket refills (one token per 50 ms).
    const refused = await statuses(app, t.member, 3);
    expect(refused.every((s) => s === 429 || s === 200)).toBe(true);
    await new Promise((r) => setTimeout(r, 150));
    // Had the refusals consumed tokens, fewer than 2 would be back by now.
    expect((await get(app, t.member)).statusCode).toBe(200);
  });
});

describe('hard caps', () => {
  it('the daily cap refuses with quota_exceeded until the day turns (UTC)', async () => {
    const app = await appWith({ ORG_DAILY_REQUEST_CAP: '3' });
    const t = await createTenant();
    expect(await statuses(app, t.member, 4)).toEqual([200, 200, 200, 429]);
    const res = await get(app, t.admin);
    expect(res.statusCode).toBe(429);
    expect(res.json().code).toBe('quota_exceeded');
    const now = Date.now();
    const midnight = Date.UTC(new Date(now).getUTCFullYear(), new Date(now).getUTCMonth(), new Date(now).getUTCDate() + 1);
    const retryAfter = Number(res.headers['retry-after']);
    expect(Math.abs(retryAfter - (midnight - now) / 1000)).toBeLessThan(5);
  });

  it('the monthly cap holds across days', async () => {
    const app = await appWith({ ORG_MONTHLY_REQUEST_CAP: '2' });
    const t = await createTenant();
    expect(await statuses(app, t.member, 3)).toEqual([200, 200, 429]);
    expect((await get(app, t.member)).json().message).toBe('Monthly request quota of this organization is used up');
  });

  it('usage is durable: a new instance on the same database starts from what was used', async () => {
    const env = { ORG_DAILY_REQUEST_CAP: '5', USAGE_FLUSH_INTERVAL_MS: '50' };
    const t = await createTenant();
    const first = await appWith(env);
    expect(await statuses(first, t.member, 3)).toEqual([200, 200, 200]);
    await first.close(); // flushes the last batch
    apps.splice(apps.indexOf(first), 1);
    const db = await getTestDb();
    const { rows } = await db.query<{ period: string; requests: string }>(
      'SELECT period, requests::text AS requests FROM org_usage WHERE org_id = $1 ORDER BY period',
      [t.org.id],
    );
    expect(rows).toEqual([
      { period: 'day', requests: '3' },
      { period: 'month', requests: '3' },
    ]);
    const second = await appWith(env);
    expect(await statuses(second, t.member, 3)).toEqual([200, 200, 429]);
  });
});

describe('per-org limits from org_limits', () => {
  it('a change applies to the next request', async () => {
    const app = await appWith({ ORG_RATE_LIMIT_BURST: '100', ORG_RATE_LIMIT_PER_SECOND: '100' });
    const t = await createTenant();
    expect(await statuses(app, t.member, 2)).toEqual([200, 200]);
    await setOrgLimitOverrides(await getTestDb(), t.org.id, { dailyCap: 3 });
    // Made outside the app, the change reaches its auth cache through the invalidation channel.
    expect(await app.authenticator.sync()).toBe(true);
    expect(await statuses(app, t.member, 2)).toEqual([200, 429]);
    await setOrgLimitOverrides(await getTestDb(), t.org.id, { dailyCap: 0 });
    expect(await app.authenticator.sync()).toBe(true);
    // The refusal is remembered in process for at most a second.
    await new Promise((r) => setTimeout(r, 1_100));
    expect(await statuses(app, t.member, 2)).toEqual([200, 200]);
  });

  it('GET /v1/org/usage shows limits, usage, remaining and reset times to admins', async () => {
    const app = await appWith({
      ORG_RATE_LIMIT_BURST: '50',
      ORG_RATE_LIMIT_PER_SECOND: '0.5',
      ORG_DAILY_REQUEST_CAP: '1000',
      ORG_MONTHLY_REQUEST_CAP: '5000',
      ORG_MAX_CONCURRENT_REQUESTS: '7',
    });
    const t = await createTenant();
    await statuses(app, t.member, 4);
    const res = await get(app, t.admin, '/v1/org/usage');
    expect(res.statusCode).toBe(200);
    const body = res.json();
    const day = new Date().toISOString().slice(0, 10);
    expect(body).toMatchObject({
      orgId: t.org.id,
      limiter: 'memory',
      limits: { orgBurst: 50, orgPerSecond: 0.5, dailyCap: 1000, monthlyCap: 5000, maxConcurrent: 7 },
      rate: { org: { burst: 50, remaining: 45 } },
      quota: {
        day: { period: day, cap: 1000, used: 5, remaining: 995 },
        month: { period: day.slice(0, 7), cap: 5000, used: 5, remaining: 4995 },
      },
      concurrency: { max: 7, inFlight: 1 },
    });
    expect(Date.parse(body.quota.day.resetsAt)).toBeGreaterThan(Date.now());
    expect((await get(app, t.member, '/v1/org/usage')).statusCode).toBe(403);
  });
});

describe('concurrency', () => {
  // Requests held open by sending their body slowly, over a real socket.
  async function listen(app: FastifyInstance): Promise<number> {
    await app.listen({ host: '127.0.0.1', port: 0 });
    return (app.server.address() as AddressInfo).port;
  }

  function holdOpen(port: number, user: TestUser) {
    const body = JSON.stringify({ email: `held-${randomUUID()}@example.test` });
    // A connection of its own (no keep-alive pool): each held request is independent.
    const req = http.request({
      agent: false,
      host: '127.0.0.1',
      port,
      method: 'POST',
      path: '/v1/users',
      headers: { ...user.headers, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
    });
    let answered = false;
    const response = new Promise<number>((resolve, reject) => {
      req.on('response', (res) => {
        answered = true;
        res.resume();
        resolve(res.statusCode ?? 0);
      });
      req.on('error', reject);
    });
    req.write(body.slice(0, 5));
    return {
      /** Still waiting for its body, so still holding its slot (not refused on arrival). */
      isHeld: () => !answered,
      finish: () => {
        req.end(body.slice(5));
        return response;
      },
      abort: () => {
        req.on('error', () => undefined);
        req.destroy();
        response.catch(() => undefined);
      },
    };
  }

  const fetchStatus = async (port: number, user: TestUser) =>
    (await fetch(`http://127.0.0.1:${port}/v1/me`, { headers: user.headers })).status;

  it('caps requests in flight per org; a slot frees when the response finishes or the client leaves', async () => {
    const app = await appWith({ ORG_MAX_CONCURRENT_REQUESTS: '2' });
    const port = await listen(app);
    const t = await createTenant();
    const other = await createTenant();
    // One at a time, each given time to reach the limiter, so no other request competes for the slots.
    const settle = () => new Promise((r) => setTimeout(r, 200));
    const a = holdOpen(port, t.admin);
    await settle();
    const b = holdOpen(port, t.admin);
    await settle();
    expect([a.isHeld(), b.isHeld()]).toEqual([true, true]);
    await expect.poll(() => fetchStatus(port, t.member), { timeout: 5_000 }).toBe(429);
    const res = await fetch(`http://127.0.0.1:${port}/v1/me`, { headers: t.member.headers });
    expect(await res.json()).toMatchObject({ code: 'rate_limited', message: 'Too many requests in flight for this organization' });
    expect(await fetchStatus(port, other.member)).toBe(200);

    expect(await a.finish()).toBe(201);
    await expect.poll(() => fetchStatus(port, t.member), { timeout: 5_000 }).toBe(200);

    // The last poll's own slot is freed just after its response: let it go before taking c.
    await settle();
    const c = holdOpen(port, t.admin);
    await settle();
    expect(c.isHeld()).toBe(true);
    await expect.poll(() => fetchStatus(port, t.member), { timeout: 5_000 }).toBe(429);
    c.abort();
    await expect.poll(() => fetchStatus(port, t.member), { timeout: 5_000 }).toBe(200);
    expect(await b.finish()).toBe(201);
  });
  it('frees the slot of a client that leaves while its request is still being admitted', async () => {
    // Without leases: every request holds a slot of its own on the backend, which is what this
    // is about, and GET /v1/org/usage reads the backend's count.
    const app = await appWith({ ORG_MAX_CONCURRENT_REQUESTS: '50', RATE_LIMIT_LEASE_MAX: '0' });
    const port = await listen(app);
    const t = await createTenant();
    // Each client sends a request and disconnects at once, mostly before the auth lookup ends.
    await Promise.all(
      Array.from(
        { length: 100 },
        (_, i) =>
          new Promise<void>((resolve) => {
            const socket = net.connect(port, '127.0.0.1', () => {
              socket.write(
                `GET /v1/me HTTP/1.1\r\nHost: 127.0.0.1\r\nx-org-id: ${t.member.headers['x-org-id']}\r\n` +
                  `x-user-id: ${t.member.headers['x-user-id']}\r\n\r\n`,
              );
              // Leave at different moments: before, during and after the lookup and the limiter.
              setTimeout(() => {
                socket.destroy();
                resolve();
              }, i % 8);
            });
            socket.on('error', () => resolve());
          }),
      ),
    );
    // Only this request itself is in flight once the server has caught up.
    await expect
      .poll(async () => (await get(app, t.admin, '/v1/org/usage')).json<{ concurrency: { inFlight: number } }>().concurrency.inFlight, {
        timeout: 5_000,
      })
      .toBe(1);
  });
});

describe('a client that leaves while its admission waits for the backend', () => {
  it('frees the slot the answer brings: the request is gone, and nothing else would free it', async () => {
    const config = testConfig({ ORG_MAX_CONCURRENT_REQUESTS: '50', RATE_LIMIT_LEASE_MAX: '0' });
    const db = await getTestDb();
    const inner = createMemoryBackend({ maxKeys: 10_000 });
    let holdMs = 0;
    // The memory backend, answering late while holdMs is set: the client leaves meanwhile.
    const slow: LimiterBackend = {
      ...inner,
      acquire: async (req) => {
        const answer = await inner.acquire(req);
        if (holdMs > 0) await new Promise((r) => setTimeout(r, holdMs));
        return answer;
      },
    };
    const limiter = new RateLimiter({
      primary: slow,
      createFallback: null,
      usage: new UsageRecorder(db, silentLogger, 60_000),
      config: config.rateLimit,
      logger: silentLogger,
    });
    const app = await buildApp({ config, db, limiter, logger: silentLogger });
    app.addHook('onClose', () => limiter.close());
    apps.push(app);
    await app.listen({ host: '127.0.0.1', port: 0 });
    const port = (app.server.address() as AddressInfo).port;
    const t = await createTenant();
    await app.authenticator.sync();
    expect((await get(app, t.member)).statusCode).toBe(200); // the caller is cached

    holdMs = 150;
    await new Promise<void>((resolve) => {
      const socket = net.connect(port, '127.0.0.1', () => {
        socket.write(`GET /v1/me HTTP/1.1\r\nHost: 127.0.0.1\r\nx-org-id: ${t.member.orgId}\r\nx-user-id: ${t.member.id}\r\n\r\n`);
        setTimeout(() => {
          socket.destroy(); // gone while the backend still holds its answer (and its slot)
          resolve();
        }, 50);
      });
    });
    await new Promise((r) => setTimeout(r, 300)); // the answer arrives after the client left
    holdMs = 0;
    const usage = await get(app, t.admin, '/v1/org/usage');
    expect(usage.json<{ concurrency: { inFlight: number } }>().concurrency.inFlight).toBe(1); // itself alone
  });
});

describe('per client address', () => {
  it('limits anonymous requests per IP', async () => {
    const app = await appWith({ IP_RATE_LIMIT_PER_MINUTE: '3' });
    const codes: number[] = [];
    for (let i = 0; i < 5; i++) codes.push((await app.inject({ method: 'GET', url: '/health', remoteAddress: '10.9.8.1' })).statusCode);
    expect(codes).toEqual([200, 200, 200, 429, 429]);
    // Another address is not affected.
    expect((await app.inject({ method: 'GET', url: '/health', remoteAddress: '10.9.8.2' })).statusCode).toBe(200);
  });

  it('refuses an address that keeps failing authentication, without looking the ids up, and spares valid callers elsewhere', async () => {
    const app = await appWith({ IP_RATE_LIMIT_PER_MINUTE: '3' });
    const t = await createTenant();
    const guess = { 'x-org-id': t.org.id, 'x-user-id': randomUUID() };
    const codes: number[] = [];
    for (let i = 0; i < 5; i++) {
      codes.push((await app.inject({ method: 'GET', url: '/v1/me', headers: guess, remoteAddress: '10.9.9.1' })).statusCode);
    }
    expect(codes).toEqual([401, 401, 401, 429, 429]);
    // Even a valid caller from that address waits; from another address it is served.
    expect((await app.inject({ method: 'GET', url: '/v1/me', headers: t.member.headers, remoteAddress: '10.9.9.1' })).statusCode).toBe(429);
    expect((await app.inject({ method: 'GET', url: '/v1/me', headers: t.member.headers, remoteAddress: '10.9.9.2' })).statusCode).toBe(200);
  });

  it('charges failed bearer credentials to their address, and valid ones not at all', async () => {
    const app = await appWith({ IP_RATE_LIMIT_PER_MINUTE: '3' });
    const codes: number[] = [];
    for (const authorization of ['Bearer llmk_unknown', 'Bearer not-a-token', 'Bearer e30.e30.', 'Bearer llmk_again', 'Bearer llmk_more']) {
      codes.push((await app.inject({ method: 'GET', url: '/v1/me', headers: { authorization }, remoteAddress: '10.9.11.1' })).statusCode);
    }
    expect(codes).toEqual([401, 401, 401, 429, 429]);
    // A valid key is not an anonymous request: its address's budget is not spent by it.
    const t = await createTenant();
    const key = await insertApiKey(await getTestDb(), t.org.id, 'member', t.owner.id);
    const served: number[] = [];
    for (let i = 0; i < 5; i++) {
      served.push((await app.inject({ method: 'GET', url: '/v1/me', headers: key.headers, remoteAddress: '10.9.11.2' })).statusCode);
    }
    expect(served).toEqual([200, 200, 200, 200, 200]);
  });

  it('trusts X-Forwarded-For only with TRUST_PROXY=true', async () => {
    const untrusting = await appWith({ IP_RATE_LIMIT_PER_MINUTE: '1' });
    const xff = (ip: string) => ({ method: 'GET' as const, url: '/health', remoteAddress: '10.9.10.1', headers: { 'x-forwarded-for': ip } });
    expect((await untrusting.inject(xff('1.1.1.1'))).statusCode).toBe(200);
    expect((await untrusting.inject(xff('2.2.2.2'))).statusCode).toBe(429);
    const trusting = await appWith({ IP_RATE_LIMIT_PER_MINUTE: '1', TRUST_PROXY: 'true' });
    expect((await trusting.inject(xff('3.3.3.3'))).statusCode).toBe(200);
    expect((await trusting.inject(xff('4.4.4.4'))).statusCode).toBe(200);
    expect((await trusting.inject(xff('3.3.3.3'))).statusCode).toBe(429);
  });
});

describe('limit configuration', () => {
  it('per-org overrides beat the defaults, 0 turns a limit off', async () => {
    const app = await appWith({ ORG_DAILY_REQUEST_CAP: '1' });
    const t = await createTenant();
    await setOrgLimitOverrides(await getTestDb(), t.org.id, { dailyCap: 0 });
    expect(await app.authenticator.sync()).toBe(true);
    expect(await statuses(app, t.member, 3)).toEqual([200, 200, 200]);
  });
});

describe('leases, through HTTP', () => {
  it('a caller far from its limits is admitted from leases: the RateLimit field still counts each request, /metrics shows the leases', async () => {
    const app = await appWith({
      ORG_RATE_LIMIT_BURST: '100000',
      ORG_RATE_LIMIT_PER_SECOND: '0.01',
      USER_RATE_LIMIT_BURST: '100000',
      USER_RATE_LIMIT_PER_SECOND: '0.01',
      ORG_DAILY_REQUEST_CAP: '1000000',
      ORG_MAX_CONCURRENT_REQUESTS: '10000',
    });
    const t = await createTenant();
    const remaining: string[] = [];
    for (let i = 0; i < 60; i++) {
      const res = await get(app, t.member);
      expect(res.statusCode).toBe(200);
      remaining.push(res.headers.ratelimit as string);
      await new Promise((r) => setTimeout(r, 2)); // lets the lease, asked in the background, arrive
    }
    // On one instance, a leased request reports what one by one would: the org's and the user's
    // remaining count down by one per request, the day's used count up by one.
    remaining.forEach((field, i) => {
      expect(field).toMatch(new RegExp(`^"org";r=${99_999 - i};t=\\d+, "user";r=${99_999 - i};t=\\d+, "day";r=${999_999 - i};t=\\d+$`));
    });
    const usage = (await get(app, t.admin, '/v1/org/usage')).json<{ quota: { day: { used: number } }; concurrency: { inFlight: number } }>();
    expect(usage.quota.day.used).toBe(61);
    expect(usage.concurrency.inFlight).toBe(1);
    const metrics = (await app.inject({ method: 'GET', url: '/metrics' })).body;
    expect(metrics).toMatch(/^rate_limit_lease_events_total\{event="admitted"\} [1-9]\d+$/m);
    expect(metrics).toMatch(/^rate_limit_lease_events_total\{event="granted"\} [1-9]/m);
    expect(metrics).toMatch(/^rate_limit_leases [1-9]$/m);
  });
});
