import { randomUUID } from 'node:crypto';
import { Redis } from 'ioredis';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { CLOSE_BATCH } from '../../src/ratelimit/leases.js';
import { RateLimiter, type Admission } from '../../src/ratelimit/limiter.js';
import { createMemoryBackend } from '../../src/ratelimit/memory.js';
import { createRedisBackend } from '../../src/ratelimit/redis.js';
import type { LimiterBackend, OrgLimits } from '../../src/ratelimit/types.js';
import { UsageRecorder } from '../../src/ratelimit/usage.js';
import type { CallerMemo } from '../../src/types/context.js';
import { testConfig } from '../helpers/app.js';
import { getTestDb, silentLogger } from '../helpers/db.js';
import { T0, limits, request } from './helpers.js';

/**
 * Leases (src/ratelimit/leases.ts): callers far from every limit are admitted from a lease
 * charged in advance, without a backend call per request; near a limit, one by one. Never more
 * than the limits; once the leases are given back, the backend holds exactly what was admitted.
 */

const redisUrl = process.env.TEST_REDIS_URL || process.env.REDIS_URL || undefined;

const limiters: RateLimiter[] = [];
const clients: Redis[] = [];
afterEach(async () => {
  await Promise.all(limiters.splice(0).map((l) => l.close()));
});
afterAll(async () => {
  await Promise.all(clients.splice(0).map((c) => c.quit()));
});

/** A backend that counts the acquire and refund calls reaching it. */
function counting(inner: LimiterBackend): LimiterBackend & { acquires: number; refunds: number } {
  const backend = {
    kind: inner.kind,
    acquires: 0,
    acquire(req: Parameters<LimiterBackend['acquire']>[0]) {
      backend.acquires++;
      return inner.acquire(req);
    },
    release: (orgId: string, slotId: string) => inner.release(orgId, slotId),
    refunds: 0,
    refund(req: Parameters<LimiterBackend['refund']>[0]) {
      backend.refunds++;
      return inner.refund(req);
    },
    close: () => Promise.resolve(),
  };
  return backend;
}

/**
 * A backend whose answer to one acquire is held until `letGo()`: `holdAfter(n)` lets n more
 * calls through, then holds the next one (its work is done at once; only the answer waits).
 */
function holding(inner: LimiterBackend & { acquires: number; refunds: number }) {
  let pass = -1;
  let release: () => void = () => undefined;
  const backend: LimiterBackend & { acquires: number; refunds: number } = {
    ...inner,
    acquire: async (req) => {
      if (pass < 0 || pass-- > 0) return inner.acquire(req);
      const answer = await inner.acquire(req);
      await new Promise<void>((resolve) => (release = resolve));
      return answer;
    },
  };
  return {
    backend,
    holdAfter: (n: number) => (pass = n),
    /** Whether the held call has been made. */
    held: () => pass < 0,
    letGo: () => release(),
  };
}

async function limiterOn(backend: LimiterBackend, env: Record<string, string> = {}): Promise<RateLimiter> {
  const config = testConfig({ RATE_LIMIT_LEASE_MAX: '64', ...env });
  const usage = new UsageRecorder(await getTestDb(), silentLogger, 60_000);
  const limiter = new RateLimiter({ primary: backend, createFallback: null, usage, config: config.rateLimit, logger: silentLogger });
  limiters.push(limiter);
  return limiter;
}

/** Lets the background lease requests (a promise or a Redis round trip away) finish. */
const settle = () => new Promise((r) => setTimeout(r, 20));

const FAR: OrgLimits = limits({
  orgBurst: 1_000_000,
  orgPerSecond: 0.001,
  userBurst: 1_000_000,
  userPerSecond: 0.001,
  dailyCap: 10_000_000,
  monthlyCap: 10_000_000,
  maxConcurrent: 100_000,
});

interface Shared {
  /** Two backends over the same state (two instances), each counting its calls. */
  backends(): [LimiterBackend & { acquires: number; refunds: number }, LimiterBackend & { acquires: number; refunds: number }];
  /** What the state holds for an org now: one request admitted and given back, to read it. */
  read(orgId: string, lim: OrgLimits): Promise<{ orgRemaining: number; dayUsed: number; concurrent: number }>;
}

async function readBack(backend: LimiterBackend, orgId: string, lim: OrgLimits) {
  // Caps and concurrency raised so that the read itself is admitted; the keys are the same.
  const open = { ...lim, dailyCap: lim.dailyCap && 1e12, monthlyCap: lim.monthlyCap && 1e12, maxConcurrent: lim.maxConcurrent && 1e9 };
  const req = request(orgId, 'reader', open, T0 + 1, { slotId: 'reader' });
  const d = await backend.acquire(req);
  expect(d.allowed).toBe(true);
  await backend.refund({ ...req, tokens: 1, slots: 1 });
  return { orgRemaining: d.org.remaining + 1, dayUsed: d.dayUsed - 1, concurrent: d.concurrent - 1 };
}

const memoryShared = (): Shared => {
  const inner = createMemoryBackend({ maxKeys: 100_000 });
  return {
    backends: () => [counting(inner), counting(inner)],
    read: (orgId, lim) => readBack(inner, orgId, lim),
  };
};

const redisShared = (): Shared => {
  const first = new Redis(redisUrl!, { maxRetriesPerRequest: 1 });
  const second = new Redis(redisUrl!, { maxRetriesPerRequest: 1 });
  clients.push(first, second);
  const reader = createRedisBackend(first);
  return {
    backends: () => [counting(createRedisBackend(first)), counting(createRedisBackend(second))],
    read: (orgId, lim) => readBack(reader, orgId, lim),
  };
};

const acquire = (l: RateLimiter, orgId: string, userId: string, lim: OrgLimits, nowMs = T0): Promise<Admission> =>
  l.acquireOrg({ orgId, userId, limits: lim, nowMs });

const subjects: [string, () => Shared][] = [['memory', memoryShared]];
if (redisUrl) subjects.push(['redis', redisShared]);

describe.each(subjects)('leases on the %s backend', (_name, shared) => {
  it('far from every limit, one backend call admits a lease of requests, and the RateLimit state counts down as one by one', async () => {
    const [backend] = shared().backends();
    const limiter = await limiterOn(backend);
    const org = randomUUID();
    const remaining: number[] = [];
    for (let i = 0; i < 300; i++) {
      const a = await acquire(limiter, org, 'u1', FAR);
      expect(a.allowed).toBe(true);
      remaining.push(a.decision!.org.remaining, a.decision!.user.remaining);
      a.release();
      if (i % 10 === 0) await settle();
    }
    // 300 requests: the first one by one, then leases of 64 renewed in the background (a request
    // that finds the lease spent before its successor arrives asks the backend itself).
    expect(backend.acquires).toBeLessThan(40);
    expect(limiter.leaseStats.admitted).toBeGreaterThan(200);
    // Never more remaining than one by one would report; less by at most what leases hold unused.
    remaining.forEach((r, i) => {
      const exact = 1_000_000 - 1 - Math.floor(i / 2);
      expect(r).toBeLessThanOrEqual(exact);
      expect(r).toBeGreaterThan(exact - 2 * 64);
    });
    // From a lease, exactly: what the lease's charge left, plus what it has not used yet.
    await settle();
    const next = await acquire(limiter, org, 'u1', FAR);
    expect([next.decision!.org.remaining, next.decision!.user.remaining, next.decision!.dayUsed]).toEqual([
      1_000_000 - 301,
      1_000_000 - 301,
      301,
    ]);
    next.release();
  });

  it("a caller's memo holds its lease from the grant; topped up, the lease is the same; another caller's lease in it is not used", async () => {
    const [backend] = shared().backends();
    const limiter = await limiterOn(backend);
    const org = randomUUID();
    const memo: CallerMemo = {};
    const admit = (userId: string, m: CallerMemo) => limiter.acquireOrg({ orgId: org, userId, limits: FAR, nowMs: T0, memo: m });
    (await admit('u1', memo)).release(); // one by one; a lease is asked for in the background
    await settle();
    // In the memo from its grant: the caller's next request looks nothing up in the table.
    const first = memo.lease as { tokens: number; retired: boolean } | undefined;
    expect(first).toBeDefined();
    expect(first!.retired).toBe(false);
    (await admit('u1', memo)).release();
    expect(memo.lease).toBe(first);
    // Spent down to half: topped up in the background; the memo still leads to it.
    for (let i = 0; i < 40; i++) (await admit('u1', memo)).release();
    await settle();
    (await admit('u1', memo)).release();
    expect(limiter.leaseStats.renewed).toBeGreaterThan(0);
    expect(memo.lease).toBe(first);
    expect(first!.retired).toBe(false);
    expect(first!.tokens).toBeGreaterThan(32);
    // u1's memo handed with another caller's request: u2 has no lease, so it asks the backend,
    // and u1's lease is not charged for it.
    const tokens = first!.tokens;
    const acquires = backend.acquires;
    (await admit('u2', memo)).release();
    expect(backend.acquires).toBeGreaterThan(acquires); // (and maybe u2's own first lease)
    expect(first!.tokens).toBe(tokens);
    expect(memo.lease).toBe(first);
  });

  it('a busy caller keeps one lease: each renewal is one backend call, gives nothing back, and holds the same slots', async () => {
    const state = shared();
    const [backend] = state.backends();
    const limiter = await limiterOn(backend);
    const org = randomUUID();
    for (let i = 0; i < 400; i++) {
      (await acquire(limiter, org, 'u1', FAR)).release();
      if (i % 10 === 0) await settle();
    }
    await settle();
    const { granted, renewed, refunded } = limiter.leaseStats;
    expect(granted).toBe(1);
    expect(renewed).toBeGreaterThan(5);
    // Requests that found the lease spent before its top-up asked one by one; nothing else did.
    expect(backend.acquires).toBeLessThanOrEqual(1 + granted + renewed + 10);
    expect(refunded).toBe(0);
    expect(backend.refunds).toBe(0);
    // One lease, nothing in flight: the backend holds its 2 slots, stamped again by each top-up.
    expect((await state.read(org, FAR)).concurrent).toBe(2);
    await limiter.close();
    const after = await state.read(org, FAR);
    expect([after.dayUsed, after.concurrent]).toEqual([400, 0]);
  });

  it('a top-up answered after its lease was given back gives its own charge back', async () => {
    const state = shared();
    const hold = holding(state.backends()[0]);
    const limiter = await limiterOn(hold.backend);
    const org = randomUUID();
    (await acquire(limiter, org, 'u1', FAR)).release(); // one by one; the first lease (64) follows
    await settle();
    expect(limiter.leaseStats.granted).toBe(1);
    hold.holdAfter(0);
    // 33 from the lease: 31 left, under half, so its top-up is asked for (and held).
    for (let i = 0; i < 33; i++) (await acquire(limiter, org, 'u1', FAR)).release();
    await settle();
    expect(hold.held()).toBe(true);
    // New limits retire the lease; nothing of it is in flight, so it is given back at once.
    const other = { ...FAR, maxConcurrent: 99_999 };
    (await acquire(limiter, org, 'u1', other)).release();
    await settle();
    expect(limiter.leaseStats.refunded).toBe(1);
    hold.letGo();
    await settle();
    expect(limiter.leaseStats.renewed).toBe(0);
    await limiter.close();
    // Exactly the 35 admitted requests: the top-up's tokens went back too.
    expect((await state.read(org, FAR)).dayUsed).toBe(35);
  });

  it('what a leased request reports in flight leaves out requests decided one by one that ended since the backend last answered', async () => {
    const [backend] = shared().backends();
    const limiter = await limiterOn(backend);
    const org = randomUUID();
    (await acquire(limiter, org, 'u1', FAR)).release();
    await settle(); // u1 has a lease
    // u2 has none: decided one by one, and held while u2's own lease is granted (that answer
    // counts u2's request in flight); then it ends.
    const u2 = await acquire(limiter, org, 'u2', FAR);
    expect(u2.allowed).toBe(true);
    await settle();
    expect(limiter.leaseStats.granted).toBe(2);
    u2.release();
    // From u1's lease, with no backend call since: exactly itself in flight.
    const u1 = await acquire(limiter, org, 'u1', FAR);
    expect(u1.decision!.concurrent).toBe(1);
    u1.release();
  });

  it('an answer that went out before a request ended still counts that request, and it is left out', async () => {
    const hold = holding(shared().backends()[0]);
    const limiter = await limiterOn(hold.backend);
    const org = randomUUID();
    (await acquire(limiter, org, 'u1', FAR)).release();
    await settle(); // u1 has a lease
    // u2's request is decided one by one; u2's lease is then charged while that request is in
    // flight, and answered only after it ended.
    hold.holdAfter(1);
    const u2 = await acquire(limiter, org, 'u2', FAR);
    await settle();
    expect(hold.held()).toBe(true);
    u2.release();
    hold.letGo();
    await settle();
    expect(limiter.leaseStats.granted).toBe(2);
    const u1 = await acquire(limiter, org, 'u1', FAR);
    expect(u1.decision!.concurrent).toBe(1);
    u1.release();
  });

  it('what a request reports remaining never exceeds a bucket, though leases hold tokens unused', async () => {
    const [backend] = shared().backends();
    const limiter = await limiterOn(backend);
    const org = randomUUID();
    // Buckets of 1,000 that refill at once: the leases' charges are made up by the next refill.
    const quick = limits({ orgBurst: 1_000, orgPerSecond: 1e9, userBurst: 1_000, userPerSecond: 1e9, maxConcurrent: 100_000 });
    (await acquire(limiter, org, 'u1', quick)).release();
    await settle();
    expect(limiter.leaseStats.granted).toBe(1);
    // A second later the org bucket is full again on the backend; u2 is decided one by one.
    const u2 = await acquire(limiter, org, 'u2', quick, T0 + 1_000);
    const u1 = await acquire(limiter, org, 'u1', quick, T0 + 1_000);
    for (const a of [u2, u1]) {
      expect(a.allowed).toBe(true);
      expect(a.decision!.org).toEqual({ remaining: 1_000, resetSeconds: 0 });
      expect(a.decision!.user.remaining).toBeLessThanOrEqual(1_000);
      a.release();
    }
  });

  it('near a limit, every request asks the backend: no lease with the default limits (a user bucket of 50)', async () => {
    const [backend] = shared().backends();
    const limiter = await limiterOn(backend);
    const org = randomUUID();
    const defaults = testConfig({ ORG_RATE_LIMIT_BURST: '200', USER_RATE_LIMIT_BURST: '50', ORG_MAX_CONCURRENT_REQUESTS: '50' }).rateLimit
      .defaults;
    const admitted: boolean[] = [];
    for (let i = 0; i < 60; i++) {
      const a = await acquire(limiter, org, 'u1', { ...defaults, userPerSecond: 0.001 });
      admitted.push(a.allowed);
      a.release();
      await settle();
    }
    expect(limiter.leaseStats.granted).toBe(0);
    expect(admitted.filter(Boolean)).toHaveLength(50);
  });

  it('two instances never admit more than the limits, and once the leases are given back the backend holds exactly what was admitted', async () => {
    const state = shared();
    const [ba, bb] = state.backends();
    const a = await limiterOn(ba);
    const b = await limiterOn(bb);
    const org = randomUUID();
    // Room for leases at first, then near the cap: the end is decided one by one.
    const lim = limits({ orgBurst: 5_000, orgPerSecond: 0.001, dailyCap: 3_000, maxConcurrent: 10_000 });
    let allowed = 0;
    const users = ['u1', 'u2', 'u3'];
    for (let round = 0; round < 40; round++) {
      const batch = await Promise.all(
        Array.from({ length: 100 }, (_, i) => acquire(i % 2 === 0 ? a : b, org, users[(round + i) % 3]!, lim)),
      );
      for (const adm of batch) {
        if (adm.allowed) allowed++;
        adm.release();
      }
      await settle();
    }
    expect(a.leaseStats.granted + b.leaseStats.granted).toBeGreaterThan(0);
    expect(allowed).toBeLessThanOrEqual(3_000);
    // Leases held at the end are given back: a refund puts back exactly what was not used.
    await Promise.all([a.close(), b.close()]);
    const after = await state.read(org, lim);
    expect(after.dayUsed).toBe(allowed);
    expect(after.orgRemaining).toBe(5_000 - allowed);
    expect(after.concurrent).toBe(0);
    // Near the cap the rest went one by one: at most what the last leases held unused was left.
    expect(allowed).toBeGreaterThan(3_000 - 2 * 3 * 64);
  });

  it('a lease unused for RATE_LIMIT_LEASE_IDLE_MS gives back its unused tokens and its slots', async () => {
    const state = shared();
    const [backend] = state.backends();
    const limiter = await limiterOn(backend, { RATE_LIMIT_LEASE_IDLE_MS: '5000' });
    const org = randomUUID();
    for (let i = 0; i < 3; i++) {
      (await acquire(limiter, org, 'u1', FAR)).release();
      await settle();
    }
    expect(limiter.leaseStats.held).toBe(1);
    const held = await state.read(org, FAR);
    expect(held.dayUsed).toBeGreaterThan(3); // the lease is charged in advance
    expect(held.concurrent).toBeGreaterThan(0); // and holds its slots
    limiter.sweepLeases(T0 + 4_000);
    expect(limiter.leaseStats.held).toBe(1);
    limiter.sweepLeases(T0 + 5_000);
    expect(limiter.leaseStats.held).toBe(0);
    await settle();
    const back = await state.read(org, FAR);
    expect([back.dayUsed, back.orgRemaining, back.concurrent]).toEqual([3, 1_000_000 - 3, 0]);
  });

  it('new limits end the lease at once: the next request is decided under them, and the lease is given back', async () => {
    const state = shared();
    const [backend] = state.backends();
    const limiter = await limiterOn(backend);
    const org = randomUUID();
    for (let i = 0; i < 3; i++) {
      (await acquire(limiter, org, 'u1', FAR)).release();
      await settle();
    }
    expect(limiter.leaseStats.held).toBe(1);
    const calls = backend.acquires;
    // The org's limits change (the CLI): its daily cap is now what is already used.
    const tight = { ...FAR, dailyCap: 3 };
    const refused = await acquire(limiter, org, 'u1', tight);
    expect([refused.allowed, refused.refusedBy]).toEqual([false, 'daily_cap']);
    expect(backend.acquires).toBe(calls + 1);
    await settle();
    expect(limiter.leaseStats.refunded).toBeGreaterThan(0);
    expect((await state.read(org, FAR)).dayUsed).toBe(3);
  });

  it('more requests in flight than a lease has slots go to the backend; the next lease takes more slots; all slots end free', async () => {
    const state = shared();
    const [backend] = state.backends();
    // Leases big enough that tokens never run short here: only slots do.
    const limiter = await limiterOn(backend, { RATE_LIMIT_LEASE_MAX: '1000' });
    const org = randomUUID();
    (await acquire(limiter, org, 'u1', FAR)).release();
    await settle();
    // 20 requests in flight at once, held: the first lease has 2 slots.
    const first = await Promise.all(Array.from({ length: 20 }, () => acquire(limiter, org, 'u1', FAR)));
    expect(first.every((adm) => adm.allowed)).toBe(true);
    const callsAfterFirst = backend.acquires;
    expect(callsAfterFirst).toBeGreaterThan(10);
    for (const adm of first) adm.release();
    // Renewals double the slots while they run short, up to 64: soon 20 in flight need no call.
    for (let round = 0; round < 6; round++) {
      const held = await Promise.all(Array.from({ length: 20 }, () => acquire(limiter, org, 'u1', FAR)));
      for (const adm of held) adm.release();
      await settle();
    }
    const before = backend.acquires;
    const last = await Promise.all(Array.from({ length: 20 }, () => acquire(limiter, org, 'u1', FAR)));
    expect(backend.acquires - before).toBe(0);
    for (const adm of last) adm.release();
    await limiter.close();
    expect((await state.read(org, FAR)).concurrent).toBe(0);
  });
});

describe('closing', () => {
  it('gives every lease back, at most CLOSE_BATCH refunds at a time', async () => {
    const inner = counting(createMemoryBackend({ maxKeys: 1_000_000 }));
    let inFlight = 0;
    let most = 0;
    const backend: LimiterBackend = {
      ...inner,
      refund: async (req) => {
        inFlight++;
        most = Math.max(most, inFlight);
        try {
          await new Promise((r) => setTimeout(r, 1)); // a round trip
          return await inner.refund(req);
        } finally {
          inFlight--;
        }
      },
    };
    const limiter = await limiterOn(backend);
    const perOrg = Math.ceil(CLOSE_BATCH / 4);
    const orgs = Array.from({ length: 10 }, () => randomUUID());
    const callers = perOrg * orgs.length; // more than two batches
    for (let i = 0; i < callers; i++) (await acquire(limiter, orgs[i % orgs.length]!, `u${i}`, FAR)).release();
    await settle();
    expect(limiter.leaseStats.held).toBe(callers);
    await limiter.close();
    expect(inner.refunds).toBe(callers);
    expect(inFlight).toBe(0);
    expect(most).toBeLessThanOrEqual(CLOSE_BATCH);
    expect(most).toBeGreaterThan(1); // in batches, not one after the other
    // Everything unused came back: each org's day holds exactly its admitted requests.
    for (const org of orgs) {
      const d = await inner.acquire(request(org, 'reader', FAR, T0));
      expect(d.dayUsed).toBe(perOrg + 1);
    }
  });
});

describe('during a Redis outage', () => {
  it('admits from a lease granted before, and takes no new lease from the memory fallback, whose limits are shares', async () => {
    const shared = createMemoryBackend({ maxKeys: 10_000 });
    let up = true;
    const fail = () => Promise.reject(new Error('connection refused'));
    const flaky: LimiterBackend = {
      kind: 'redis',
      acquire: (req) => (up ? shared.acquire(req) : fail()),
      release: (orgId, slotId) => (up ? shared.release(orgId, slotId) : fail()),
      refund: (req) => (up ? shared.refund(req) : fail()),
      close: () => Promise.resolve(),
    };
    const fallback = counting(createMemoryBackend({ maxKeys: 10_000 }));
    const config = testConfig({ RATE_LIMIT_LEASE_MAX: '64' });
    const usage = new UsageRecorder(await getTestDb(), silentLogger, 60_000);
    const limiter = new RateLimiter({ primary: flaky, createFallback: () => fallback, usage, config: config.rateLimit, logger: silentLogger });
    limiters.push(limiter);
    const org = randomUUID();
    for (let i = 0; i < 3; i++) {
      (await acquire(limiter, org, 'u1', FAR)).release();
      await settle();
    }
    expect(limiter.leaseStats.held).toBe(1);
    up = false;
    for (let i = 0; i < 60; i++) {
      const a = await acquire(limiter, org, 'u1', FAR);
      expect(a.allowed).toBe(true);
      a.release();
      await settle();
    }
    expect(limiter.mode).toBe('degraded');
    // The lease from before was used (it was charged on Redis), then requests went one by one.
    expect(limiter.leaseStats.admitted).toBeGreaterThan(0);
    expect(fallback.acquires).toBeGreaterThan(10);
    expect(limiter.leaseStats.held).toBe(0);
  });
});

describe('RATE_LIMIT_LEASE_MAX=0', () => {
  it('turns leases off: every request asks the backend', async () => {
    const [backend] = memoryShared().backends();
    const limiter = await limiterOn(backend, { RATE_LIMIT_LEASE_MAX: '0' });
    const org = randomUUID();
    for (let i = 0; i < 50; i++) {
      (await acquire(limiter, org, 'u1', FAR)).release();
      await settle();
    }
    expect(backend.acquires).toBe(51); // the first request asks twice: the cap counters get their seed
    expect(limiter.leaseStats.granted).toBe(0);
  });
});
