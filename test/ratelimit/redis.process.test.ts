import { randomUUID } from 'node:crypto';
import { cpSync, mkdtempSync, rmSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SEED } from '../../src/db/seed.js';
import { createPgliteDatabase } from '../../src/infra/database.js';
import { setOrgLimitOverrides } from '../../src/models/orgLimits.model.js';
import type { OrgLimits } from '../../src/ratelimit/types.js';
import { LIMITS_OFF, createTenant } from '../helpers/app.js';
import { getTestDb, onPostgres, testDatabaseUrl } from '../helpers/db.js';
import { hasRedisServer, redisServers, type RedisServer } from '../helpers/redisServer.js';
import { startServer, type ServerProcess } from '../helpers/serverProcess.js';

/**
 * The limiter on Redis as users meet it: real server processes over real sockets, each suite on a
 * redis-server of its own that it can kill, restart and flush.
 *
 * Two instances can share a database only on PostgreSQL (the embedded database belongs to one
 * process), so the multi-instance suite runs only there; on PostgreSQL the tests make their own
 * orgs. The single-instance suites run in both modes: on the embedded database each server owns a
 * private data folder (a copy of one migrated and seeded folder) that the test process cannot
 * reach while the server runs, so they use the seeded orgs, which are private to that server.
 */

type AuthHeaders = Record<string, string>;

interface Caller {
  readonly orgId: string;
  readonly admin: AuthHeaders;
  readonly member: AuthHeaders;
}

interface ErrorBody {
  error: string;
  message: string;
  code: string;
  requestId: string;
}

interface Reply {
  readonly status: number;
  readonly headers: Headers;
  readonly body: unknown;
  readonly ms: number;
}

const FLUSH_INTERVAL_MS = 200;

/**
 * Every limit off unless a suite turns it on; the per-address limit and load shedding stay off.
 * A Redis command that gets no answer in time switches the instance to its in-memory fallback,
 * which loosens the limits by design: on a busy test machine the production default (250 ms) can
 * be missed, so the timeout is long here. A dead Redis is refused at once whatever the timeout.
 */
const BASE_ENV: Record<string, string> = {
  ...LIMITS_OFF,
  REDIS_COMMAND_TIMEOUT_MS: '5000',
  ACCESS_LOG: 'false',
  USAGE_FLUSH_INTERVAL_MS: String(FLUSH_INTERVAL_MS),
  IP_RATE_LIMIT_PER_MINUTE: '0',
  LOAD_SHED_MAX_EVENT_LOOP_DELAY_MS: '0',
};

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const today = () => new Date().toISOString().slice(0, 10);
const headersOf = (u: { id: string; orgId: string }): AuthHeaders => ({ 'x-org-id': u.orgId, 'x-user-id': u.id });
const seededUser = (email: string) => SEED.users.find((u) => u.email === email)!;

/** A request with a bound: a hang fails the test with a clear error instead of timing it out. */
async function call(server: ServerProcess, headers: AuthHeaders, path = '/v1/me', timeoutMs = 5_000): Promise<Reply> {
  const started = performance.now();
  const res = await fetch(`${server.baseUrl}${path}`, { headers, signal: AbortSignal.timeout(timeoutMs) });
  const text = await res.text();
  let body: unknown = text;
  try {
    body = JSON.parse(text) as unknown;
  } catch {
    // not JSON: kept as text, which no assertion below accepts
  }
  return { status: res.status, headers: res.headers, body, ms: performance.now() - started };
}

async function sequential(n: number, task: () => Promise<Reply>): Promise<Reply[]> {
  const out: Reply[] = [];
  for (let i = 0; i < n; i++) out.push(await task());
  return out;
}

/** `n` tasks, at most `concurrency` at a time; results in task order. */
async function inPool<T>(n: number, concurrency: number, task: (i: number) => Promise<T>): Promise<T[]> {
  const out = new Array<T>(n);
  let next = 0;
  const worker = async () => {
    while (next < n) {
      const i = next++;
      out[i] = await task(i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(n, concurrency) }, worker));
  return out;
}

const statusCounts = (replies: readonly Reply[]): Record<number, number> => {
  const counts: Record<number, number> = {};
  for (const r of replies) counts[r.status] = (counts[r.status] ?? 0) + 1;
  return counts;
};
const codesOf = (replies: readonly Reply[]) => [...new Set(replies.filter((r) => r.status !== 200).map((r) => (r.body as ErrorBody).code))];
const admitted = (replies: readonly Reply[]) => replies.filter((r) => r.status === 200).length;

async function until<T>(what: string, read: () => Promise<T>, ok: (v: T) => boolean, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: T | undefined;
  for (;;) {
    try {
      last = await read();
      if (ok(last)) return last;
    } catch (err) {
      last = undefined;
      if (Date.now() > deadline) throw err;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last value: ${JSON.stringify(last)}`);
    await sleep(50);
  }
}

const degradedLines = (server: ServerProcess) => server.logs.filter((l) => l.msg?.startsWith('Rate limiter degraded') ?? false);

/** Exact limits hold while Redis answers: first make sure it did, for a clear failure if not. */
function expectStayedOnRedis(...ss: ServerProcess[]): void {
  for (const s of ss) expect(degradedLines(s)).toEqual([]);
}

const healthMode = async (server: ServerProcess) => ((await call(server, {}, '/health')).body as { rateLimiter: string }).rateLimiter;

/** Usage rows of an org in the shared PostgreSQL test database: { day, month } for today. */
async function storedUsage(orgId: string): Promise<{ day: number; month: number }> {
  const db = await getTestDb();
  const { rows } = await db.query<{ period: string; requests: string }>(
    `SELECT period, requests::text AS requests FROM org_usage
      WHERE org_id = $1 AND period_start IN ($2::date, date_trunc('month', $2::date)::date)`,
    [orgId, today()],
  );
  const by = new Map(rows.map((r) => [r.period, Number(r.requests)]));
  return { day: by.get('day') ?? 0, month: by.get('month') ?? 0 };
}

/** Waits until the batched usage of an org has reached PostgreSQL (then checks it stays put). */
async function expectStoredUsage(orgId: string, requests: number): Promise<void> {
  await until(`org_usage = ${requests}`, () => storedUsage(orgId), (u) => u.day >= requests, 5 * 1_000);
  await sleep(2 * FLUSH_INTERVAL_MS);
  expect(await storedUsage(orgId)).toEqual({ day: requests, month: requests });
}

// --- servers --------------------------------------------------------------------------------

const redis = redisServers();
const servers: ServerProcess[] = [];
const tempDirs: string[] = [];

function tempDir(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  tempDirs.push(dir);
  return dir;
}

afterAll(async () => {
  await Promise.allSettled(servers.splice(0).map((s) => s.kill()));
  for (const d of tempDirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/**
 * On the embedded database a fresh data folder costs seconds of start-up (creating the cluster,
 * migrations); one server prepares a folder once and every server starts on a copy of it.
 */
let template: Promise<string> | undefined;
function pgliteTemplate(): Promise<string> {
  template ??= (async () => {
    const dir = tempDir('llm-app-rl-template-');
    const s = await startServer({ database: { dataDir: dir }, env: BASE_ENV });
    servers.push(s);
    s.signal('SIGTERM');
    const exit = await s.waitForExit(10_000);
    if (exit.code !== 0) throw new Error(`template server exited with ${JSON.stringify(exit)}:\n${s.rawOutput()}`);
    return dir;
  })();
  return template;
}

interface App {
  readonly server: ServerProcess;
  /** The embedded database's folder (null on PostgreSQL). */
  readonly dataDir: string | null;
}

async function startApp(redisServer: RedisServer, env: Record<string, string>): Promise<App> {
  let dataDir: string | null = null;
  if (!onPostgres) {
    dataDir = tempDir('llm-app-rl-');
    cpSync(await pgliteTemplate(), dataDir, { recursive: true });
  }
  const server = await startServer({
    database: dataDir === null ? { url: testDatabaseUrl! } : { dataDir },
    env: { ...BASE_ENV, REDIS_URL: redisServer.url, ...env },
  });
  servers.push(server);
  return { server, dataDir };
}

/** A fresh org on PostgreSQL; on the embedded database, a seeded org private to the server. */
async function callerFor(seeded: 'acme' | 'tech'): Promise<Caller> {
  if (onPostgres) {
    const t = await createTenant();
    return { orgId: t.org.id, admin: t.admin.headers, member: t.member.headers };
  }
  if (seeded === 'acme') {
    const admin = seededUser('admin@acme.com');
    return { orgId: admin.orgId, admin: headersOf(admin), member: headersOf(seededUser('user@acme.com')) };
  }
  const founder = seededUser('founder@techstartup.com');
  return { orgId: founder.orgId, admin: headersOf(founder), member: headersOf(founder) };
}

const orgKey = (orgId: string, suffix: string) => `rl:{org:${orgId}}:${suffix}`;

// Every suite's servers start together in one hook: start-up is most of this file's time.
interface Fixture {
  redis: RedisServer;
  app: App;
}
let multi: { redis: RedisServer; a: ServerProcess; b: ServerProcess } | undefined;
let outage: Fixture;
let flushed: Fixture;
let headerFixture: Fixture;
let concurrency: Fixture;

async function fixture(env: Record<string, string>): Promise<Fixture> {
  const r = await redis.start();
  return { redis: r, app: await startApp(r, env) };
}

beforeAll(async () => {
  if (!hasRedisServer) return;
  if (onPostgres) await getTestDb(); // migrated before the servers race to it
  const starting = {
    multi: onPostgres
      ? redis.start().then(async (r) => {
          // Limits off by default: each test sets its org's own in org_limits, which every
          // instance reads on every request.
          const [a, b] = await Promise.all([startApp(r, {}), startApp(r, {})]);
          return { redis: r, a: a.server, b: b.server };
        })
      : Promise.resolve(undefined),
    outage: fixture({ ORG_DAILY_REQUEST_CAP: '30' }),
    flushed: fixture({ ORG_DAILY_REQUEST_CAP: '20' }),
    headerFixture: fixture({
      ORG_RATE_LIMIT_BURST: '3',
      ORG_RATE_LIMIT_PER_SECOND: '0.001',
      USER_RATE_LIMIT_BURST: '5',
      USER_RATE_LIMIT_PER_SECOND: '0.001',
      ORG_DAILY_REQUEST_CAP: '1000',
      ORG_MONTHLY_REQUEST_CAP: '5000',
    }),
    concurrency: fixture({ ORG_MAX_CONCURRENT_REQUESTS: '2' }),
  };
  // Settle every start before failing, so none is left running unowned.
  await Promise.allSettled(Object.values(starting));
  multi = await starting.multi;
  outage = await starting.outage;
  flushed = await starting.flushed;
  headerFixture = await starting.headerFixture;
  concurrency = await starting.concurrency;
}, 60_000);

// --- suites ---------------------------------------------------------------------------------

// Two processes sharing one database need PostgreSQL: the embedded database is single-process.
describe.skipIf(!hasRedisServer || !onPostgres)('two server processes sharing one Redis', () => {
  const both = () => [multi!.a, multi!.b];

  async function orgWith(limits: Partial<OrgLimits>): Promise<Caller & { users: AuthHeaders[] }> {
    const t = await createTenant();
    await setOrgLimitOverrides(await getTestDb(), t.org.id, limits);
    return { orgId: t.org.id, admin: t.admin.headers, member: t.member.headers, users: [t.owner.headers, t.admin.headers, t.member.headers] };
  }

  it('admits exactly the burst of a concurrent flood split across both instances', async () => {
    const c = await orgWith({ orgBurst: 40, orgPerSecond: 0.001 }); // no refill to speak of
    const replies = await inPool(300, 60, (i) => call(both()[i % 2]!, c.users[i % 3]!));
    expectStayedOnRedis(...both());
    expect(statusCounts(replies)).toEqual({ 200: 40, 429: 260 });
    expect(codesOf(replies)).toEqual(['rate_limited']);
    // The bucket lives in the shared Redis, empty to within the refill of the last seconds.
    const tokens = Number(await multi!.redis.client().hget(orgKey(c.orgId, 'b'), 't'));
    expect(tokens).toBeGreaterThanOrEqual(0);
    expect(tokens).toBeLessThan(1);
    await expectStoredUsage(c.orgId, 40);
  });

  it('holds the daily cap exactly across both instances', async () => {
    const c = await orgWith({ dailyCap: 25 });
    const replies = await inPool(120, 40, (i) => call(both()[i % 2]!, c.users[i % 3]!));
    expectStayedOnRedis(...both());
    expect(statusCounts(replies)).toEqual({ 200: 25, 429: 95 });
    expect(codesOf(replies)).toEqual(['quota_exceeded']);
    expect(await multi!.redis.client().get(orgKey(c.orgId, `d:${today()}`))).toBe('25');
    await expectStoredUsage(c.orgId, 25);
  });

  it('an org flooding both instances causes not one 429 for another org using both at the same time', async () => {
    const noisy = await orgWith({ orgBurst: 10, orgPerSecond: 0.001 });
    const quiet = await orgWith({ orgBurst: 1_000, orgPerSecond: 100, dailyCap: 100_000, maxConcurrent: 50 });
    const [flood, normal] = await Promise.all([
      inPool(400, 60, (i) => call(both()[i % 2]!, noisy.users[i % 3]!)),
      inPool(80, 4, (i) => call(both()[i % 2]!, quiet.users[i % 3]!)),
    ]);
    expectStayedOnRedis(...both());
    expect(statusCounts(flood)).toEqual({ 200: 10, 429: 390 });
    expect(statusCounts(normal)).toEqual({ 200: 80 });
  });

  it('after FLUSHALL an instance that never served the org rebuilds its usage from PostgreSQL', async () => {
    const c = await orgWith({ dailyCap: 20 });
    const [a, b] = both();
    expect(statusCounts(await sequential(15, () => call(a!, c.member)))).toEqual({ 200: 15 });
    await expectStoredUsage(c.orgId, 15);
    await multi!.redis.flushAll();
    // b has no memory of this org: only org_usage can tell it that 15 are used.
    const afterFlush = await sequential(10, () => call(b!, c.member));
    expectStayedOnRedis(...both());
    expect(afterFlush.map((r) => r.status)).toEqual([200, 200, 200, 200, 200, 429, 429, 429, 429, 429]);
    expect(codesOf(afterFlush)).toEqual(['quota_exceeded']);
    expect(statusCounts(await sequential(3, () => call(a!, c.member)))).toEqual({ 429: 3 });
    await expectStoredUsage(c.orgId, 20);
  });
});

describe.skipIf(!hasRedisServer)('Redis killed and restarted under a running server', () => {
  it('serves throughout, degrades to memory and back, and the daily cap is not reset', async () => {
    const { server, dataDir } = outage.app;
    const c = await callerFor('acme');
    expect(await healthMode(server)).toBe('redis');
    const before = await sequential(10, () => call(server, c.member));
    expect(statusCounts(before)).toEqual({ 200: 10 });
    expectStayedOnRedis(server);

    await outage.redis.stop();
    // Each request answered quickly, 200 or 429, never an error: a command to a dead Redis fails
    // at once (no offline queue) and the instance limits in memory.
    const during = await sequential(25, () => call(server, c.member, '/v1/me', 2_500));
    expect(during.filter((r) => r.status !== 200 && r.status !== 429)).toEqual([]);
    expect(Math.max(...during.map((r) => r.ms))).toBeLessThan(2_000);
    // The cap is held from the usage last seen on Redis (10 of 30), this instance enforcing
    // all of it (RATE_LIMIT_FALLBACK_SHARE=1).
    expect(statusCounts(during)).toEqual({ 200: 20, 429: 5 });
    expect(codesOf(during)).toEqual(['quota_exceeded']);
    expect(await until('/health degraded', () => healthMode(server), (m) => m === 'degraded', 5_000)).toBe('degraded');
    const metrics = await (await fetch(`${server.baseUrl}/metrics`)).text();
    expect(metrics).toMatch(/^rate_limiter_degraded 1$/m);
    await server.waitForLog((l) => l.msg?.startsWith('Rate limiter degraded') ?? false, 5_000);

    await outage.redis.restart();
    expect(await until('/health back on redis', () => healthMode(server), (m) => m === 'redis', 10_000)).toBe('redis');
    await server.waitForLog((l) => l.msg?.startsWith('Rate limiter recovered') ?? false, 5_000);
    // The outage was logged once, however many requests met it.
    expect(degradedLines(server)).toHaveLength(1);

    // Redis came back empty: the counter is rebuilt from the recorded usage, not from zero. The
    // instance remembers its last refusal for up to a second: wait that out, so the next
    // requests are decided on Redis.
    await sleep(1_100);
    const after = await sequential(10, () => call(server, c.member));
    expect(statusCounts(after)).toEqual({ 429: 10 });
    expect(codesOf(after)).toEqual(['quota_exceeded']);
    expect(await outage.redis.client().get(orgKey(c.orgId, `d:${today()}`))).toBe('30');
    const total = admitted(before) + admitted(during) + admitted(after);
    expect(total).toBe(30);

    if (dataDir === null) {
      await expectStoredUsage(c.orgId, total);
    } else {
      // The embedded database is the server's alone: stop it (which writes the last batch) and
      // read its folder.
      server.signal('SIGTERM');
      expect(await server.waitForExit(10_000)).toEqual({ code: 0, signal: null });
      const db = await createPgliteDatabase(dataDir);
      try {
        const { rows } = await db.query<{ period: string; requests: string }>(
          'SELECT period, requests::text AS requests FROM org_usage WHERE org_id = $1 ORDER BY period',
          [c.orgId],
        );
        expect(rows).toEqual([
          { period: 'day', requests: String(total) },
          { period: 'month', requests: String(total) },
        ]);
      } finally {
        await db.close();
      }
    }
  });
});

describe.skipIf(!hasRedisServer)('Redis flushed under a running server', () => {
  it('rebuilds the daily counter from the recorded usage: 15 of 20 used, 5 more admitted', async () => {
    const { server } = flushed.app;
    const c = await callerFor('acme');
    expect(statusCounts(await sequential(15, () => call(server, c.member)))).toEqual({ 200: 15 });
    if (onPostgres) await expectStoredUsage(c.orgId, 15);
    else await sleep(3 * FLUSH_INTERVAL_MS);
    await flushed.redis.flushAll();
    expect(await flushed.redis.client().dbsize()).toBe(0);
    const after = await sequential(10, () => call(server, c.member));
    expectStayedOnRedis(server);
    expect(after.map((r) => r.status)).toEqual([200, 200, 200, 200, 200, 429, 429, 429, 429, 429]);
    expect(codesOf(after)).toEqual(['quota_exceeded']);
    expect(await flushed.redis.client().get(orgKey(c.orgId, `d:${today()}`))).toBe('20');
    expect(await healthMode(server)).toBe('redis');
  });
});

/** Parses a RateLimit field: `"org";r=2;t=100, "day";r=9;t=40210` -> { org: { r: 2, t: 100 }, ... }. */
function parseRateLimit(field: string | null): Record<string, Record<string, number>> {
  const out: Record<string, Record<string, number>> = {};
  for (const item of (field ?? '').split(',').map((s) => s.trim()).filter(Boolean)) {
    const [name, ...params] = item.split(';');
    const m = /^"([^"]+)"$/.exec(name ?? '');
    if (!m) throw new Error(`not a structured-field string item: ${item}`);
    out[m[1]!] = Object.fromEntries(params.map((p) => p.split('=')).map(([k, v]) => [k!, Number(v)]));
  }
  return out;
}

describe.skipIf(!hasRedisServer)('rate-limit headers from the Redis-backed server', () => {
  const POLICY = '"org";q=3;w=3000, "user";q=5;w=5000, "day";q=1000;w=86400, "month";q=5000;w=2592000';

  function periodSeconds(): { day: number; month: number } {
    const now = new Date();
    const y = now.getUTCFullYear();
    const m = now.getUTCMonth();
    return {
      day: (Date.UTC(y, m, now.getUTCDate() + 1) - now.getTime()) / 1000,
      month: (Date.UTC(y, m + 1, 1) - now.getTime()) / 1000,
    };
  }

  function expectState(r: Reply, org: number, orgT: number, user: number, userT: number, used: number): void {
    const state = parseRateLimit(r.headers.get('ratelimit'));
    expect(Object.keys(state)).toEqual(['org', 'user', 'day', 'month']);
    expect(state.org).toEqual({ r: org, t: orgT });
    expect(state.user).toEqual({ r: user, t: userT });
    expect(state.day!.r).toBe(1000 - used);
    expect(state.month!.r).toBe(5000 - used);
    const expected = periodSeconds();
    expect(Math.abs(state.day!.t! - expected.day)).toBeLessThan(5);
    expect(Math.abs(state.month!.t! - expected.month)).toBeLessThan(5);
  }

  it('200s carry RateLimit-Policy and RateLimit; a 429 adds Retry-After and keeps both fields', async () => {
    const { server } = headerFixture.app;
    const c = await callerFor('acme');
    const ok = await sequential(3, () => call(server, c.member));
    expect(ok.map((r) => r.status)).toEqual([200, 200, 200]);
    for (const r of ok) {
      expect(r.headers.get('ratelimit-policy')).toBe(POLICY);
      expect(r.headers.get('retry-after')).toBeNull();
    }
    // One token per 1000 s in both buckets: t is the time until the bucket is full again.
    expectState(ok[0]!, 2, 1000, 4, 1000, 1);
    expectState(ok[1]!, 1, 2000, 3, 2000, 2);
    expectState(ok[2]!, 0, 3000, 2, 3000, 3);

    const refused = await call(server, c.member);
    expectStayedOnRedis(server);
    expect(refused.status).toBe(429);
    expect(refused.body).toEqual({
      error: 'Too Many Requests',
      message: 'Too many requests for this organization; retry later',
      code: 'rate_limited',
      requestId: refused.headers.get('x-request-id'),
    });
    expect(refused.headers.get('retry-after')).toBe('1000');
    expect(refused.headers.get('ratelimit-policy')).toBe(POLICY);
    // Nothing was charged: the user bucket and the caps are where the last 200 left them.
    expectState(refused, 0, 3000, 2, 3000, 3);
  });

  it('a 429 answered from the instance\'s memory of a refusal carries the same fields', async () => {
    const { server } = headerFixture.app;
    const c = await callerFor('tech');
    expect((await sequential(3, () => call(server, c.member))).map((r) => r.status)).toEqual([200, 200, 200]);
    const first = await call(server, c.member);
    expectStayedOnRedis(server);
    expect(first.status).toBe(429);
    // Within the second that follows, the refusal is repeated without a Redis round trip.
    const again = await call(server, c.member);
    expect(again.status).toBe(429);
    expect((again.body as ErrorBody).code).toBe('rate_limited');
    expect(Number(again.headers.get('retry-after'))).toBeGreaterThanOrEqual(999);
    expect(Number(again.headers.get('retry-after'))).toBeLessThanOrEqual(1000);
    expect(again.headers.get('ratelimit-policy')).toBe(POLICY);
    // README: every /v1 response carries the policies and the current state.
    const state = parseRateLimit(again.headers.get('ratelimit'));
    expect(Object.keys(state)).toEqual(['org', 'user', 'day', 'month']);
    expect(state.org).toMatchObject({ r: 0 });
    expect(state.day).toMatchObject({ r: 997 });
  });
});

describe.skipIf(!hasRedisServer)('concurrency slots on Redis', () => {
  /** A POST /v1/users held in flight by sending its body slowly; admitted once its headers arrive. */
  function holdOpen(server: ServerProcess, admin: AuthHeaders) {
    const body = JSON.stringify({ email: `held-${randomUUID()}@example.test` });
    const req = http.request({
      host: '127.0.0.1',
      port: server.port,
      method: 'POST',
      path: '/v1/users',
      agent: false,
      headers: { ...admin, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
    });
    const response = new Promise<number>((resolve, reject) => {
      req.on('response', (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      });
      req.on('error', reject);
    });
    response.catch(() => undefined);
    req.write(body.slice(0, 5));
    return {
      finish: () => {
        req.end(body.slice(5));
        return response;
      },
      abort: () => {
        req.on('error', () => undefined);
        req.destroy();
      },
    };
  }

  it('two in flight hold both slots; a third is refused; an aborted client frees its slot', async () => {
    const { server } = concurrency.app;
    const slots = concurrency.redis.client();
    const c = await callerFor('acme');
    const other = await callerFor('tech');
    const slotsHeld = () => slots.zcard(orgKey(c.orgId, 'c'));

    const a = holdOpen(server, c.admin);
    const b = holdOpen(server, c.admin);
    expect(await until('two slots held in Redis', slotsHeld, (n) => n === 2, 5_000)).toBe(2);

    const refused = await call(server, c.member);
    expectStayedOnRedis(server);
    expect(refused.status).toBe(429);
    expect(refused.body).toEqual({
      error: 'Too Many Requests',
      message: 'Too many requests in flight for this organization',
      code: 'rate_limited',
      requestId: refused.headers.get('x-request-id'),
    });
    expect(refused.headers.get('retry-after')).toBe('1');
    expect((await call(server, other.member)).status).toBe(200);
    expect(await slotsHeld()).toBe(2);

    a.abort();
    expect(await until('the aborted slot freed', slotsHeld, (n) => n === 1, 5_000)).toBe(1);
    expect((await call(server, c.member)).status).toBe(200);
    // That request's slot is freed once its response has gone out.
    expect(await until('its slot freed', slotsHeld, (n) => n === 1, 5_000)).toBe(1);

    expect(await b.finish()).toBe(201);
    expect(await until('every slot freed', slotsHeld, (n) => n === 0, 5_000)).toBe(0);
    expect((await call(server, c.member)).status).toBe(200);
  });
});
