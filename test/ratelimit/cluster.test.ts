import { execFile, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { Cluster, Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { limiterKeys } from '../../src/ratelimit/memory.js';
import { createRedisBackend } from '../../src/ratelimit/redis.js';
import type { LimiterBackend } from '../../src/ratelimit/types.js';
import { NO_USAGE, T0, limits, newOrgId, periodOf, request } from './helpers.js';
import { buildTestApp, createTenant } from '../helpers/app.js';

/**
 * The Lua script on a real 3-master Redis Cluster on 127.0.0.1: the hash tag must put every key
 * of one call in one slot, whichever node owns it, and EVALSHA must recover from NOSCRIPT on
 * nodes that have never seen the script.
 */

const run = promisify(execFile);
const hasRedisServer = spawnSync('redis-server', ['--version']).status === 0;

function portIsFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

/** A client port whose cluster bus port (+10000) is free too. */
async function freeClusterPort(taken: Set<number>): Promise<number> {
  for (;;) {
    const port = 20_000 + Math.floor(Math.random() * 25_000);
    if (!taken.has(port) && (await portIsFree(port)) && (await portIsFree(port + 10_000))) {
      taken.add(port);
      return port;
    }
  }
}

async function until(what: string, check: () => Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check().catch(() => false)) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function cli(port: number, ...args: string[]): Promise<string> {
  const { stdout } = await run('redis-cli', ['-h', '127.0.0.1', '-p', String(port), ...args]);
  return stdout;
}

describe.skipIf(!hasRedisServer)('limit.lua on a 3-master Redis Cluster', () => {
  const dir = mkdtempSync(join(tmpdir(), 'rl-cluster-'));
  const nodes: { port: number; process: ChildProcess }[] = [];
  /** Direct connection per node, to check where keys live (a wrong node answers MOVED). */
  const direct = new Map<number, Redis>();
  let cluster: Cluster;
  let backend: LimiterBackend;
  /** Hash slot -> port of the master that owns it. */
  const owner = new Map<number, number>();

  beforeAll(async () => {
    const taken = new Set<number>();
    for (let i = 0; i < 3; i++) {
      const port = await freeClusterPort(taken);
      const child = spawn(
        'redis-server',
        [
          '--port', String(port),
          '--bind', '127.0.0.1',
          '--cluster-enabled', 'yes',
          '--cluster-config-file', join(dir, `nodes-${port}.conf`),
          '--cluster-node-timeout', '5000',
          '--save', '',
          '--appendonly', 'no',
          '--dir', dir,
        ],
        { stdio: 'ignore' },
      );
      nodes.push({ port, process: child });
    }
    for (const { port } of nodes) await until(`redis on ${port}`, async () => (await cli(port, 'ping')).trim() === 'PONG');
    await run('redis-cli', [
      '--cluster', 'create',
      ...nodes.map(({ port }) => `127.0.0.1:${port}`),
      '--cluster-replicas', '0',
      '--cluster-yes',
    ]);
    for (const { port } of nodes) {
      await until(`cluster_state:ok on ${port}`, async () => (await cli(port, 'cluster', 'info')).includes('cluster_state:ok'));
      direct.set(port, new Redis({ host: '127.0.0.1', port, maxRetriesPerRequest: 1 }));
    }
    const any = direct.get(nodes[0]!.port)!;
    for (const [from, to, master] of await any.cluster('SLOTS')) {
      for (let s = from; s <= to; s++) owner.set(s, master![1]);
    }
    expect(owner.size).toBe(16_384);

    cluster = new Cluster(nodes.map(({ port }) => ({ host: '127.0.0.1', port })), { redisOptions: { maxRetriesPerRequest: 1 } });
    backend = createRedisBackend(cluster);
  }, 60_000);

  afterAll(async () => {
    await cluster?.quit().catch(() => undefined);
    await Promise.all([...direct.values()].map((c) => c.quit().catch(() => undefined)));
    await Promise.all(
      nodes.map(
        ({ process: child }) =>
          new Promise<void>((resolve) => {
            if (child.exitCode !== null) return resolve();
            child.once('exit', () => resolve());
            child.kill('SIGTERM');
          }),
      ),
    );
    rmSync(dir, { recursive: true, force: true });
  });

  /** The master that owns an org's keys (asked of the cluster itself). */
  async function ownerOf(orgId: string): Promise<number> {
    const slot = await direct.get(nodes[0]!.port)!.cluster('KEYSLOT', `rl:{org:${orgId}}:b`);
    return owner.get(slot)!;
  }

  /** Org ids such that every master owns at least `perNode` of them. */
  async function orgsOnEveryNode(perNode: number): Promise<{ orgId: string; port: number }[]> {
    const byNode = new Map<number, string[]>(nodes.map(({ port }) => [port, []]));
    while ([...byNode.values()].some((ids) => ids.length < perNode)) {
      const orgId = newOrgId();
      const ids = byNode.get(await ownerOf(orgId))!;
      if (ids.length < perNode) ids.push(orgId);
    }
    return [...byNode].flatMap(([port, ids]) => ids.map((orgId) => ({ orgId, port })));
  }

  it('admits exactly each org’s burst, caps and slots, with every key on the org’s node', async () => {
    const orgs = await orgsOnEveryNode(2);
    const lim = limits({ orgBurst: 20, orgPerSecond: 1, userBurst: 15, userPerSecond: 1, dailyCap: 1000, monthlyCap: 1000, maxConcurrent: 100 });
    const decisions = await Promise.all(
      orgs.flatMap(({ orgId }) =>
        Array.from({ length: 60 }, (_, i) => backend.acquire(request(orgId, `u${i % 2}`, lim, T0, { seed: NO_USAGE }))),
      ),
    );
    for (const [n, { orgId, port }] of orgs.entries()) {
      const mine = decisions.slice(n * 60, (n + 1) * 60);
      expect(mine.filter((d) => d.allowed).length, orgId).toBe(20);
      // Which bucket refuses first depends on arrival order; that every refusal is a bucket's does not.
      expect(mine.filter((d) => d.refusedBy === 'org_rate' || d.refusedBy === 'user_rate').length).toBe(40);
      // All five keys exist on the owning master (any other node would answer MOVED).
      const keys = limiterKeys({ orgId, userId: 'u0', ...periodOf(T0) });
      const node = direct.get(port)!;
      expect(await node.exists(keys.orgBucket, keys.userBucket, keys.day, keys.month, keys.slots)).toBe(5);
      expect(await node.get(keys.day)).toBe('20');
      expect(await node.zcard(keys.slots)).toBe(20);
    }
  });

  it('runs the seed, cap and release flow through the cluster', async () => {
    const orgs = await orgsOnEveryNode(1);
    const lim = limits({ dailyCap: 2, monthlyCap: 100, maxConcurrent: 1 });
    for (const { orgId } of orgs) {
      expect(await backend.acquire(request(orgId, 'u1', lim, T0, { slotId: 'a' }))).toMatchObject({ allowed: false, needsSeed: true });
      expect(await backend.acquire(request(orgId, 'u1', lim, T0, { slotId: 'a', seed: { day: 0, month: 7 } }))).toMatchObject({
        allowed: true,
        dayUsed: 1,
        monthUsed: 8,
        concurrent: 1,
      });
      expect(await backend.acquire(request(orgId, 'u1', lim, T0, { slotId: 'b' }))).toMatchObject({ allowed: false, refusedBy: 'concurrency' });
      await backend.release(orgId, 'a');
      expect(await backend.acquire(request(orgId, 'u1', lim, T0, { slotId: 'b' }))).toMatchObject({ allowed: true, dayUsed: 2, concurrent: 1 });
      await backend.release(orgId, 'b');
      expect(await backend.acquire(request(orgId, 'u1', lim, T0, { slotId: 'c' }))).toMatchObject({
        allowed: false,
        refusedBy: 'daily_cap',
        concurrent: 0,
      });
    }
  });

  it('serves the app with REDIS_CLUSTER=true: exact limits through the cluster, "redis" on /health', async () => {
    const app = await buildTestApp({
      env: {
        REDIS_URL: `redis://127.0.0.1:${nodes[0]!.port}`,
        REDIS_CLUSTER: 'true',
        // Exact counts need every call to reach Redis: on a loaded machine the default 250 ms
        // could time a call out and send it to the in-memory fallback (tested elsewhere).
        REDIS_COMMAND_TIMEOUT_MS: '5000',
        ORG_RATE_LIMIT_BURST: '4',
        ORG_RATE_LIMIT_PER_SECOND: '0.001',
      },
    });
    try {
      const t = await createTenant();
      // The cluster client discovers the topology after connecting.
      await until('the app on the cluster', async () => (await app.inject('/health')).json().rateLimiter === 'redis');
      const codes = await Promise.all(
        Array.from({ length: 12 }, async () => (await app.inject({ method: 'GET', url: '/v1/me', headers: t.member.headers })).statusCode),
      );
      expect(codes.filter((c) => c === 200)).toHaveLength(4);
      expect(codes.filter((c) => c === 429)).toHaveLength(8);
      expect((await app.inject('/health')).json().rateLimiter).toBe('redis');
      const node = direct.get(await ownerOf(t.org.id))!;
      expect(await node.exists(`rl:{org:${t.org.id}}:b`)).toBe(1);
    } finally {
      await app.close();
    }
  });
});
