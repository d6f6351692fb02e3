import { Redis } from 'ioredis';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createMemoryBackend, type MemoryBackend } from '../../src/ratelimit/memory.js';
import { createRedisBackend } from '../../src/ratelimit/redis.js';
import type { AcquireRequest, Decision, LimiterBackend, OrgLimits } from '../../src/ratelimit/types.js';
import { ALLOWED_OFF, NO_USAGE, T0, limits, newOrgId, periodOf, request, type RequestOptions } from './helpers.js';

/**
 * One contract, two backends. Time is simulated: every call passes its own nowMs, so refill and
 * period boundaries are exact and nothing sleeps.
 */

const redisUrl = process.env.TEST_REDIS_URL || process.env.REDIS_URL || undefined;

interface Subject {
  /** The backend under test. */
  readonly a: LimiterBackend;
  /** A second instance sharing a's state (another app instance); memory has only one. */
  readonly b: LimiterBackend;
  /** A fresh org id; its keys are removed after the test. */
  org(): string;
}


function contract(subject: () => Subject): void {
  const acquire = (orgId: string, userId: string, lim: OrgLimits, nowMs: number, opts?: RequestOptions): Promise<Decision> =>
    subject().a.acquire(request(orgId, userId, lim, nowMs, opts));

  async function times(n: number, call: () => Promise<Decision>): Promise<Decision[]> {
    const out: Decision[] = [];
    for (let i = 0; i < n; i++) out.push(await call());
    return out;
  }

  describe('token buckets', () => {
    it('admits a burst, then refills continuously over time, never above capacity', async () => {
      const org = subject().org();
      const lim = limits({ orgBurst: 5, orgPerSecond: 1 });
      const burst = await times(5, () => acquire(org, 'u1', lim, T0));
      expect(burst.map((d) => [d.allowed, d.org.remaining])).toEqual([
        [true, 4],
        [true, 3],
        [true, 2],
        [true, 1],
        [true, 0],
      ]);
      expect(await acquire(org, 'u1', lim, T0)).toEqual({
        ...ALLOWED_OFF,
        allowed: false,
        refusedBy: 'org_rate',
        retryAfterSeconds: 1,
        org: { remaining: 0, resetSeconds: 5 },
      });
      // Half a token is not enough; the wait rounds up to a whole second.
      expect(await acquire(org, 'u1', lim, T0 + 500)).toMatchObject({ allowed: false, refusedBy: 'org_rate', retryAfterSeconds: 1 });
      expect((await acquire(org, 'u1', lim, T0 + 1000)).allowed).toBe(true);
      expect((await acquire(org, 'u1', lim, T0 + 1000)).allowed).toBe(false);
      // An hour later the bucket holds its capacity, not 3600 tokens.
      const later = await times(6, () => acquire(org, 'u1', lim, T0 + 3_600_000));
      expect(later.map((d) => d.allowed)).toEqual([true, true, true, true, true, false]);
    });

    it('keeps fractional tokens between charges', async () => {
      const org = subject().org();
      const lim = limits({ orgBurst: 2, orgPerSecond: 1 });
      await times(2, () => acquire(org, 'u1', lim, T0));
      // 1.5 tokens: one admitted, 0.5 left.
      expect(await acquire(org, 'u1', lim, T0 + 1500)).toMatchObject({ allowed: true, org: { remaining: 0, resetSeconds: 2 } });
      // 0.5 + 0.5 = 1: admitted only if the half token was kept.
      expect((await acquire(org, 'u1', lim, T0 + 2000)).allowed).toBe(true);
      expect((await acquire(org, 'u1', lim, T0 + 2000)).allowed).toBe(false);
    });

    it('computes retryAfter from the refill rate', async () => {
      const org = subject().org();
      const lim = limits({ orgBurst: 1, orgPerSecond: 0.5 });
      expect((await acquire(org, 'u1', lim, T0)).allowed).toBe(true);
      expect(await acquire(org, 'u1', lim, T0)).toMatchObject({ allowed: false, retryAfterSeconds: 2, org: { remaining: 0, resetSeconds: 2 } });
      expect(await acquire(org, 'u1', lim, T0 + 1000)).toMatchObject({ allowed: false, retryAfterSeconds: 1 });
      expect((await acquire(org, 'u1', lim, T0 + 2000)).allowed).toBe(true);
    });

    it('clamps a clock that runs behind: no negative refill, and no interval credited twice', async () => {
      const org = subject().org();
      const lim = limits({ orgBurst: 10, orgPerSecond: 1 });
      await times(9, () => acquire(org, 'u1', lim, T0));
      // An instance 5 s behind takes the last token; it must not rewind the bucket's clock.
      expect((await acquire(org, 'u1', lim, T0 - 5000)).allowed).toBe(true);
      expect(await acquire(org, 'u1', lim, T0 - 5000)).toMatchObject({ allowed: false, retryAfterSeconds: 1, org: { remaining: 0 } });
      // One second after T0: exactly one token, not six.
      const after = await times(2, () => acquire(org, 'u1', lim, T0 + 1000));
      expect(after.map((d) => d.allowed)).toEqual([true, false]);
    });

    it('limits each user inside the org bucket without starving the org', async () => {
      const org = subject().org();
      const lim = limits({ orgBurst: 10, orgPerSecond: 1, userBurst: 3, userPerSecond: 1 });
      const first = await times(3, () => acquire(org, 'alice', lim, T0));
      expect(first.every((d) => d.allowed)).toBe(true);
      expect(await acquire(org, 'alice', lim, T0)).toEqual({
        ...ALLOWED_OFF,
        allowed: false,
        refusedBy: 'user_rate',
        retryAfterSeconds: 1,
        org: { remaining: 7, resetSeconds: 3 },
        user: { remaining: 0, resetSeconds: 3 },
      });
      expect(await acquire(org, 'bob', lim, T0)).toMatchObject({
        allowed: true,
        org: { remaining: 6, resetSeconds: 4 },
        user: { remaining: 2, resetSeconds: 1 },
      });
    });

    it('refuses a cost above the burst forever, with a long retryAfter', async () => {
      const org = subject().org();
      const lim = limits({ orgBurst: 5, orgPerSecond: 1, userBurst: 3, userPerSecond: 1 });
      const untilMonthEnd = Math.ceil((periodOf(T0).monthEndsMs - T0) / 1000);
      expect(await acquire(org, 'u1', lim, T0, { cost: 6 })).toMatchObject({
        allowed: false,
        refusedBy: 'org_rate',
        retryAfterSeconds: untilMonthEnd,
        org: { remaining: 5 },
      });
      // Above the user burst only: refused by the user bucket, and the org bucket was not charged.
      expect(await acquire(org, 'u1', lim, T0 + 86_400_000, { cost: 4 })).toMatchObject({
        allowed: false,
        refusedBy: 'user_rate',
        retryAfterSeconds: untilMonthEnd - 86_400,
        org: { remaining: 5 },
        user: { remaining: 3 },
      });
      expect((await acquire(org, 'u1', lim, T0 + 86_400_000, { cost: 3 })).allowed).toBe(true);
    });
  });

  describe('hard caps', () => {
    it('refuses at the day boundary until the next day, whose counter is seeded again', async () => {
      const org = subject().org();
      const lim = limits({ dailyCap: 3, monthlyCap: 1000 });
      const lastTenth = Date.UTC(2031, 0, 15, 23, 59, 59, 900);
      const used = await times(3, () => acquire(org, 'u1', lim, lastTenth, { seed: NO_USAGE }));
      expect(used.map((d) => [d.allowed, d.dayUsed, d.monthUsed])).toEqual([
        [true, 1, 1],
        [true, 2, 2],
        [true, 3, 3],
      ]);
      expect(await acquire(org, 'u1', lim, lastTenth)).toEqual({
        ...ALLOWED_OFF,
        allowed: false,
        refusedBy: 'daily_cap',
        retryAfterSeconds: 1,
        dayUsed: 3,
        monthUsed: 3,
      });
      const midnight = Date.UTC(2031, 0, 16);
      expect(await acquire(org, 'u1', lim, midnight)).toMatchObject({ allowed: false, needsSeed: true, dayUsed: 0, monthUsed: 3 });
      // The month counter exists: a seed never overrides it.
      expect(await acquire(org, 'u1', lim, midnight, { seed: { day: 0, month: 999 } })).toEqual({
        ...ALLOWED_OFF,
        dayUsed: 1,
        monthUsed: 4,
      });
    });

    it('refuses at the month boundary until the next month', async () => {
      const org = subject().org();
      const lim = limits({ monthlyCap: 2 });
      const lastTenth = Date.UTC(2031, 0, 31, 23, 59, 59, 900);
      await times(2, () => acquire(org, 'u1', lim, lastTenth, { seed: NO_USAGE }));
      expect(await acquire(org, 'u1', lim, lastTenth)).toMatchObject({
        allowed: false,
        refusedBy: 'monthly_cap',
        retryAfterSeconds: 1,
        monthUsed: 2,
      });
      const nextMonth = Date.UTC(2031, 1, 1);
      expect(await acquire(org, 'u1', lim, nextMonth)).toMatchObject({ allowed: false, needsSeed: true });
      expect(await acquire(org, 'u1', lim, nextMonth, { seed: NO_USAGE })).toEqual({ ...ALLOWED_OFF, monthUsed: 1 });
    });

    it('waits for the longest refusal, and names the first', async () => {
      const org = subject().org();
      const lim = limits({ orgBurst: 1, orgPerSecond: 1, dailyCap: 1 });
      const now = periodOf(T0).dayEndsMs - 10_000;
      expect((await acquire(org, 'u1', lim, now, { seed: NO_USAGE })).allowed).toBe(true);
      expect(await acquire(org, 'u1', lim, now)).toMatchObject({ allowed: false, refusedBy: 'org_rate', retryAfterSeconds: 10 });
    });
  });

  describe('a refused request consumes nothing', () => {
    it('leaves buckets, counters and slots as they were', async () => {
      const org = subject().org();
      const lim = limits({ orgBurst: 5, orgPerSecond: 1, userBurst: 100, userPerSecond: 1, dailyCap: 100, monthlyCap: 1000, maxConcurrent: 10 });
      await times(4, () => acquire(org, 'u1', lim, T0, { seed: NO_USAGE }));
      // One token left; cost 2 refused.
      const refused = await acquire(org, 'u1', lim, T0, { cost: 2 });
      expect(refused).toEqual({
        allowed: false,
        refusedBy: 'org_rate',
        retryAfterSeconds: 1,
        needsSeed: false,
        org: { remaining: 1, resetSeconds: 4 },
        user: { remaining: 96, resetSeconds: 4 },
        dayUsed: 4,
        monthUsed: 4,
        concurrent: 4,
      });
      expect(await acquire(org, 'u1', lim, T0, { cost: 1 })).toEqual({
        allowed: true,
        retryAfterSeconds: 0,
        needsSeed: false,
        org: { remaining: 0, resetSeconds: 5 },
        user: { remaining: 95, resetSeconds: 5 },
        dayUsed: 5,
        monthUsed: 5,
        concurrent: 5,
      });
    });

    it('does not charge the buckets when a later limit refuses', async () => {
      const org = subject().org();
      const lim = limits({ orgBurst: 10, orgPerSecond: 1, userBurst: 10, userPerSecond: 1, dailyCap: 100, maxConcurrent: 1 });
      expect(await acquire(org, 'u1', lim, T0, { slotId: 's1', seed: NO_USAGE })).toMatchObject({ allowed: true, org: { remaining: 9 } });
      expect(await acquire(org, 'u1', lim, T0, { slotId: 's2' })).toEqual({
        allowed: false,
        refusedBy: 'concurrency',
        retryAfterSeconds: 1,
        needsSeed: false,
        org: { remaining: 9, resetSeconds: 1 },
        user: { remaining: 9, resetSeconds: 1 },
        dayUsed: 1,
        monthUsed: 0,
        concurrent: 1,
      });
      await subject().a.release(org, 's1');
      expect(await acquire(org, 'u1', lim, T0, { slotId: 's3' })).toMatchObject({
        allowed: true,
        org: { remaining: 8 },
        user: { remaining: 8 },
        dayUsed: 2,
        concurrent: 1,
      });
    });
  });

  describe('seeding the cap counters', () => {
    it('asks for a seed and charges nothing; then seeds, admits and refuses', async () => {
      const org = subject().org();
      const lim = limits({ orgBurst: 10, orgPerSecond: 1, dailyCap: 5, monthlyCap: 100, maxConcurrent: 5 });
      expect(await acquire(org, 'u1', lim, T0)).toEqual({
        allowed: false,
        retryAfterSeconds: 0,
        needsSeed: true,
        org: { remaining: 10, resetSeconds: 0 },
        user: { remaining: 0, resetSeconds: 0 },
        dayUsed: 0,
        monthUsed: 0,
        concurrent: 0,
      });
      expect(await acquire(org, 'u1', lim, T0, { seed: { day: 4, month: 10 } })).toMatchObject({
        allowed: true,
        needsSeed: false,
        org: { remaining: 9 },
        dayUsed: 5,
        monthUsed: 11,
        concurrent: 1,
      });
      expect(await acquire(org, 'u1', lim, T0)).toMatchObject({ allowed: false, refusedBy: 'daily_cap', needsSeed: false, dayUsed: 5 });
      // A smaller seed does not lower the existing counter.
      expect(await acquire(org, 'u1', lim, T0, { seed: NO_USAGE })).toMatchObject({ allowed: false, refusedBy: 'daily_cap', dayUsed: 5, monthUsed: 11 });
    });

    it('seeds only the counter that is missing', async () => {
      const org = subject().org();
      const monthOnly = limits({ monthlyCap: 100 });
      expect(await acquire(org, 'u1', monthOnly, T0, { seed: { day: 40, month: 50 } })).toEqual({ ...ALLOWED_OFF, monthUsed: 51 });
      // The daily cap is switched on: only the day counter is missing.
      const both = limits({ dailyCap: 10, monthlyCap: 100 });
      expect(await acquire(org, 'u1', both, T0)).toMatchObject({ needsSeed: true, allowed: false, monthUsed: 51 });
      expect(await acquire(org, 'u1', both, T0, { seed: { day: 3, month: 0 } })).toEqual({ ...ALLOWED_OFF, dayUsed: 4, monthUsed: 52 });
    });

    it('seeds only the month counter when the day counter exists', async () => {
      const org = subject().org();
      expect(await acquire(org, 'u1', limits({ dailyCap: 10 }), T0, { seed: { day: 6, month: 60 } })).toEqual({ ...ALLOWED_OFF, dayUsed: 7 });
      const both = limits({ dailyCap: 10, monthlyCap: 100 });
      expect(await acquire(org, 'u1', both, T0)).toMatchObject({ needsSeed: true, allowed: false, dayUsed: 7 });
      expect(await acquire(org, 'u1', both, T0, { seed: { day: 0, month: 20 } })).toEqual({ ...ALLOWED_OFF, dayUsed: 8, monthUsed: 21 });
    });

    it('never asks for a seed when both caps are off', async () => {
      const org = subject().org();
      const lim = limits({ orgBurst: 10, orgPerSecond: 1, maxConcurrent: 3 });
      expect(await acquire(org, 'u1', lim, T0)).toMatchObject({ allowed: true, needsSeed: false, dayUsed: 0, monthUsed: 0 });
    });
  });

  describe('concurrency slots', () => {
    it('holds up to the maximum, frees on release, and release is idempotent', async () => {
      const org = subject().org();
      const lim = limits({ maxConcurrent: 2 });
      expect(await acquire(org, 'u1', lim, T0, { slotId: 'a' })).toEqual({ ...ALLOWED_OFF, concurrent: 1 });
      expect(await acquire(org, 'u2', lim, T0, { slotId: 'b' })).toEqual({ ...ALLOWED_OFF, concurrent: 2 });
      expect(await acquire(org, 'u1', lim, T0, { slotId: 'c' })).toEqual({
        ...ALLOWED_OFF,
        allowed: false,
        refusedBy: 'concurrency',
        retryAfterSeconds: 1,
        concurrent: 2,
      });
      await subject().a.release(org, 'a');
      await subject().b.release(org, 'a');
      await subject().a.release(org, 'never-taken');
      await subject().a.release(subject().org(), 'x');
      expect(await acquire(org, 'u1', lim, T0, { slotId: 'c' })).toEqual({ ...ALLOWED_OFF, concurrent: 2 });
      expect((await acquire(org, 'u1', lim, T0, { slotId: 'd' })).allowed).toBe(false);
    });

    it('purges slots held longer than slotTtlMs (a crashed instance)', async () => {
      const org = subject().org();
      const lim = limits({ maxConcurrent: 2 });
      await acquire(org, 'u1', lim, T0, { slotId: 'old1', slotTtlMs: 10_000 });
      await acquire(org, 'u1', lim, T0 + 5000, { slotId: 'old2', slotTtlMs: 10_000 });
      expect(await acquire(org, 'u1', lim, T0 + 10_000, { slotTtlMs: 10_000 })).toMatchObject({ allowed: false, concurrent: 2 });
      // old1 is now older than the TTL; old2 is not.
      expect(await acquire(org, 'u1', lim, T0 + 10_001, { slotId: 'new', slotTtlMs: 10_000 })).toEqual({ ...ALLOWED_OFF, concurrent: 2 });
      expect(await acquire(org, 'u1', lim, T0 + 15_001, { slotTtlMs: 10_000 })).toEqual({ ...ALLOWED_OFF, concurrent: 2 });
    });

    it('keeps orgs apart', async () => {
      const [orgA, orgB] = [subject().org(), subject().org()];
      const lim = limits({ maxConcurrent: 1 });
      expect((await acquire(orgA, 'u1', lim, T0)).allowed).toBe(true);
      expect((await acquire(orgA, 'u1', lim, T0)).allowed).toBe(false);
      expect((await acquire(orgB, 'u1', lim, T0)).allowed).toBe(true);
    });
  });

  describe('leases: several slots at once, and refunds', () => {
    const refund = (orgId: string, lim: OrgLimits, tokens: number, nowMs: number, slotId = 'none', slots = 0) =>
      subject().a.refund({ orgId, userId: 'u1', limits: lim, tokens, nowMs, ...periodOf(nowMs), slotId, slots });

    it('takes n slots only when all n fit, and frees all n on refund', async () => {
      const org = subject().org();
      const lim = limits({ maxConcurrent: 5 });
      const first = await acquire(org, 'u1', lim, T0, { slotId: 'L1', slots: 3 });
      expect([first.allowed, first.concurrent]).toEqual([true, 3]);
      const tooMany = await acquire(org, 'u1', lim, T0, { slotId: 'L2', slots: 3 });
      expect([tooMany.allowed, tooMany.refusedBy, tooMany.concurrent]).toEqual([false, 'concurrency', 3]);
      const fits = await acquire(org, 'u1', lim, T0, { slotId: 'L3', slots: 2 });
      expect([fits.allowed, fits.concurrent]).toEqual([true, 5]);
      await refund(org, lim, 0, T0, 'L1', 3);
      const after = await acquire(org, 'u1', lim, T0, { slotId: 'one' });
      expect([after.allowed, after.concurrent]).toEqual([true, 3]);
      // A lease of one slot is the slot slotId itself, as a request's.
      await refund(org, lim, 0, T0, 'one', 1);
      expect((await acquire(org, 'u1', lim, T0, { slotId: 'L4', slots: 1 })).concurrent).toBe(3);
    });

    it('a take of slots its id already holds (a lease topped up) counts them once and stamps them anew', async () => {
      const org = subject().org();
      const lim = limits({ maxConcurrent: 3 });
      const ttl = { slotTtlMs: 10_000 };
      expect((await acquire(org, 'u1', lim, T0, { slotId: 'L', slots: 2, ...ttl })).concurrent).toBe(2);
      // Again, near the cap: admitted, and still 2 in flight (3 would be one too many with 2 more).
      const again = await acquire(org, 'u1', lim, T0 + 9_000, { slotId: 'L', slots: 2, ...ttl });
      expect([again.allowed, again.concurrent]).toEqual([true, 2]);
      // Another id needs 2 more: refused. One more slot fits.
      expect((await acquire(org, 'u1', lim, T0 + 9_000, { slotId: 'M', slots: 2, ...ttl })).refusedBy).toBe('concurrency');
      expect((await acquire(org, 'u1', lim, T0 + 9_000, { slotId: 'one', ...ttl })).concurrent).toBe(3);
      // Stamped at T0 + 9 s: past the first take's TTL the lease's slots are still held.
      const later = await acquire(org, 'u1', lim, T0 + 15_000, { slotId: 'x', ...ttl });
      expect([later.allowed, later.concurrent]).toEqual([false, 3]);
      // A take of more slots than the id holds counts only the new one.
      await subject().a.release(org, 'one');
      const grown = await acquire(org, 'u1', lim, T0 + 15_000, { slotId: 'L', slots: 3, ...ttl });
      expect([grown.allowed, grown.concurrent]).toEqual([true, 3]);
    });

    it('gives unused tokens back to both buckets, never above the burst, and takes them off both counters, never below 0', async () => {
      const org = subject().org();
      const lim = limits({ orgBurst: 100, orgPerSecond: 1, userBurst: 50, userPerSecond: 1, dailyCap: 1_000, monthlyCap: 5_000 });
      const lease = await acquire(org, 'u1', lim, T0, { cost: 30, seed: NO_USAGE });
      expect([lease.allowed, lease.org.remaining, lease.user.remaining, lease.dayUsed, lease.monthUsed]).toEqual([true, 70, 20, 30, 30]);
      await refund(org, lim, 10, T0);
      const next = await acquire(org, 'u1', lim, T0);
      expect([next.org.remaining, next.user.remaining, next.dayUsed, next.monthUsed]).toEqual([79, 29, 21, 21]);
      // Refilled to now first (2 s: 2 tokens each), then given back, capped at the burst.
      await refund(org, lim, 100, T0 + 2_000);
      const full = await acquire(org, 'u1', lim, T0 + 2_000);
      expect([full.org.remaining, full.user.remaining, full.dayUsed, full.monthUsed]).toEqual([99, 49, 1, 1]);
    });

    it('leaves a missing bucket or counter missing', async () => {
      const org = subject().org();
      const lim = limits({ orgBurst: 10, orgPerSecond: 1, dailyCap: 100 });
      await refund(org, lim, 5, T0);
      // Still a fresh org: a full bucket, and a counter that asks for its seed.
      const d = await acquire(org, 'u1', lim, T0);
      expect([d.allowed, d.needsSeed, d.org.remaining]).toEqual([false, true, 10]);
    });
  });

  describe('limits set to 0', () => {
    it('are off: nothing refuses, nothing is counted, no seed is asked for', async () => {
      const org = subject().org();
      const off = limits({});
      const all = await times(200, () => acquire(org, 'u1', off, T0, { cost: 1_000_000 }));
      expect(all).toEqual(Array.from({ length: 200 }, () => ALLOWED_OFF));
    });

    it('a bucket with burst or refill 0 is off', async () => {
      const org = subject().org();
      const noRefill = limits({ orgBurst: 1, orgPerSecond: 0, userBurst: 0, userPerSecond: 5 });
      const all = await times(20, () => acquire(org, 'u1', noRefill, T0));
      expect(all.every((d) => d.allowed && d.org.remaining === 0 && d.user.remaining === 0)).toBe(true);
    });
  });

  describe('exact admission under concurrency', () => {
    // Two instances (for Redis: two connections) race with the same clock.
    async function race(lim: OrgLimits, n: number): Promise<number> {
      const org = subject().org();
      const { a, b } = subject();
      const decisions = await Promise.all(
        Array.from({ length: n }, (_, i) => (i % 2 === 0 ? a : b).acquire(request(org, `u${i % 7}`, lim, T0, { seed: NO_USAGE }))),
      );
      expect(decisions.every((d) => !d.needsSeed)).toBe(true);
      return decisions.filter((d) => d.allowed).length;
    }

    it('500 calls against burst 100 admit exactly 100', async () => {
      expect(await race(limits({ orgBurst: 100, orgPerSecond: 1 }), 500)).toBe(100);
    });

    it('500 calls against a daily cap of 60 admit exactly 60', async () => {
      expect(await race(limits({ orgBurst: 1000, orgPerSecond: 1, dailyCap: 60, monthlyCap: 1000 }), 500)).toBe(60);
    });

    it('500 calls against 30 concurrency slots admit exactly 30', async () => {
      expect(await race(limits({ maxConcurrent: 30 }), 500)).toBe(30);
    });
  });

  it('reports every Decision field exactly', async () => {
    const org = subject().org();
    const lim = limits({ orgBurst: 10, orgPerSecond: 2, userBurst: 4, userPerSecond: 1, dailyCap: 100, monthlyCap: 1000, maxConcurrent: 5 });
    expect(await acquire(org, 'u1', lim, T0, { cost: 3, seed: { day: 7, month: 70 } })).toEqual({
      allowed: true,
      retryAfterSeconds: 0,
      needsSeed: false,
      org: { remaining: 7, resetSeconds: 2 },
      user: { remaining: 1, resetSeconds: 3 },
      dayUsed: 10,
      monthUsed: 73,
      concurrent: 1,
    });
    // 250 ms later: org 7.5 tokens, user 1.25 tokens.
    expect(await acquire(org, 'u1', lim, T0 + 250, { cost: 2 })).toEqual({
      allowed: false,
      refusedBy: 'user_rate',
      retryAfterSeconds: 1,
      needsSeed: false,
      org: { remaining: 7, resetSeconds: 2 },
      user: { remaining: 1, resetSeconds: 3 },
      dayUsed: 10,
      monthUsed: 73,
      concurrent: 1,
    });
    expect(await acquire(org, 'u2', lim, T0 + 250, { cost: 2 })).toEqual({
      allowed: true,
      retryAfterSeconds: 0,
      needsSeed: false,
      org: { remaining: 5, resetSeconds: 3 },
      user: { remaining: 2, resetSeconds: 2 },
      dayUsed: 12,
      monthUsed: 75,
      concurrent: 2,
    });
  });

  it('rejects a request it cannot answer correctly', async () => {
    const org = subject().org();
    for (const cost of [0, -1, 1.5, Number.NaN]) {
      await expect(acquire(org, 'u1', limits({}), T0, { cost })).rejects.toThrow(RangeError);
    }
    const bad = { ...request(org, 'u1', limits({}), T0), limits: limits({ orgBurst: -1 }) } satisfies AcquireRequest;
    await expect(subject().a.acquire(bad)).rejects.toThrow(/orgBurst/);
  });
}

describe('memory backend', () => {
  let backend: MemoryBackend;
  beforeEach(() => {
    backend = createMemoryBackend({ maxKeys: 100_000 });
  });
  afterEach(() => backend.close());

  contract(() => ({ a: backend, b: backend, org: newOrgId }));

  describe('bounded memory', () => {
    it('stays within maxKeys under a flood of distinct users, evicting the least recently used', async () => {
      const small = createMemoryBackend({ maxKeys: 1000 });
      const org = newOrgId();
      const lim = limits({ orgBurst: 100_000, orgPerSecond: 1, userBurst: 5, userPerSecond: 1, dailyCap: 1_000_000, monthlyCap: 1_000_000 });
      let maxSize = 0;
      for (let i = 0; i < 50_000; i++) {
        const d = await small.acquire(request(org, `user-${i}`, lim, T0, { seed: NO_USAGE }));
        if (!d.allowed) throw new Error(`request ${i} refused: ${JSON.stringify(d)}`);
        maxSize = Math.max(maxSize, small.size());
      }
      expect(maxSize).toBeLessThanOrEqual(1000);
      // The org's own keys are used on every request, so LRU kept them: nothing was re-seeded or refilled.
      expect(await small.acquire(request(org, 'user-0', lim, T0))).toMatchObject({
        allowed: true,
        needsSeed: false,
        org: { remaining: 100_000 - 50_001 },
        dayUsed: 50_001,
        monthUsed: 50_001,
      });
      await small.close();
      expect(small.size()).toBe(0);
    });

    it('drops expired entries without being asked for them again', async () => {
      const org = newOrgId();
      const lim = limits({ userBurst: 2, userPerSecond: 1 });
      for (let i = 0; i < 500; i++) await backend.acquire(request(org, `user-${i}`, lim, T0));
      expect(backend.size()).toBe(500);
      // An hour later every user bucket has expired (full again); a few calls sweep them away.
      for (let i = 0; i < 40; i++) await backend.acquire(request(org, 'someone', lim, T0 + 3_600_000));
      expect(backend.size()).toBe(1);
    });

    it('refuses a maxKeys too small to hold one request', () => {
      expect(() => createMemoryBackend({ maxKeys: 4 })).toThrow(RangeError);
    });
  });
});

describe.skipIf(!redisUrl)('redis backend', () => {
  let first: Redis;
  let second: Redis;
  let a: LimiterBackend;
  let b: LimiterBackend;
  let orgs: string[] = [];

  beforeAll(() => {
    const options = { maxRetriesPerRequest: 1, enableOfflineQueue: true, lazyConnect: false };
    first = new Redis(redisUrl!, options);
    second = new Redis(redisUrl!, options);
    a = createRedisBackend(first);
    b = createRedisBackend(second);
  });
  afterAll(async () => {
    await Promise.all([a.close(), b.close()]);
    await Promise.all([first.quit(), second.quit()]);
  });

  /** The keys of one org, and nothing else: the server is shared with other tests. */
  async function keysOf(orgId: string): Promise<string[]> {
    const found: string[] = [];
    let cursor = '0';
    do {
      const [next, batch] = await first.scan(cursor, 'MATCH', `rl:{org:${orgId}}:*`, 'COUNT', 1000);
      cursor = next;
      found.push(...batch);
    } while (cursor !== '0');
    return found.sort();
  }

  afterEach(async () => {
    for (const org of orgs) {
      const keys = await keysOf(org);
      if (keys.length > 0) await first.del(...keys);
    }
    orgs = [];
  });

  contract(() => ({
    a,
    b,
    org: () => {
      const id = newOrgId();
      orgs.push(id);
      return id;
    },
  }));

  it('lays out one hash-tagged key per limit, each with its expiry', async () => {
    const org = newOrgId();
    orgs.push(org);
    const lim = limits({ orgBurst: 100, orgPerSecond: 1, userBurst: 10, userPerSecond: 0.5, dailyCap: 10, monthlyCap: 10, maxConcurrent: 2 });
    await a.acquire(request(org, 'u1', lim, T0, { seed: NO_USAGE, slotId: 's1', slotTtlMs: 30_000 }));
    const p = `rl:{org:${org}}`;
    expect(await keysOf(org)).toEqual([`${p}:b`, `${p}:c`, `${p}:d:2031-01-15`, `${p}:m:2031-01`, `${p}:u:u1`].sort());
    expect(await first.ttl(`${p}:b`)).toBeGreaterThan(100);
    expect(await first.ttl(`${p}:b`)).toBeLessThanOrEqual(110);
    expect(await first.ttl(`${p}:u:u1`)).toBeGreaterThan(20);
    expect(await first.ttl(`${p}:u:u1`)).toBeLessThanOrEqual(30);
    expect(await first.ttl(`${p}:d:2031-01-15`)).toBeGreaterThan(2 * 86_400 - 60);
    expect(await first.ttl(`${p}:m:2031-01`)).toBeGreaterThan(35 * 86_400 - 60);
    expect(await first.pttl(`${p}:c`)).toBeGreaterThan(0);
    expect(await first.pttl(`${p}:c`)).toBeLessThanOrEqual(30_001);
    expect(await first.zrange(`${p}:c`, 0, -1, 'WITHSCORES')).toEqual(['s1', String(T0)]);
    expect(await first.hgetall(`${p}:b`)).toEqual({ t: '99', ts: String(T0) });
    // Fractions survive as text: 0.5 tokens/s for 300 ms.
    await a.acquire(request(org, 'u1', lim, T0 + 300, { seed: NO_USAGE }));
    expect(Number(await first.hget(`${p}:u:u1`, 't'))).toBe(9 + (300 * 0.5) / 1000 - 1);
    await a.release(org, 's1');
    expect(await first.zscore(`${p}:c`, 's1')).toBeNull();
  });

  it('answers exactly as the memory backend for the same sequence of requests', async () => {
    const memory = createMemoryBackend({ maxKeys: 100_000 });
    const org = newOrgId();
    orgs.push(org);
    // A small deterministic generator, so a failure reproduces.
    let state = 20310115;
    const next = (): number => {
      state = (state * 1103515245 + 12345) % 2 ** 31;
      return state / 2 ** 31;
    };
    const lim = limits({ orgBurst: 20, orgPerSecond: 3.7, userBurst: 7, userPerSecond: 1.3, dailyCap: 150, monthlyCap: 400, maxConcurrent: 6 });
    let now = Date.UTC(2031, 0, 15, 23, 59, 50);
    const held: string[] = [];
    for (let i = 0; i < 400; i++) {
      now += Math.floor(next() * 700) - 100; // sometimes backwards: clocks differ
      if (held.length > 0 && next() < 0.3) {
        const slot = held.splice(Math.floor(next() * held.length), 1)[0]!;
        await Promise.all([memory.release(org, slot), a.release(org, slot)]);
      }
      const needsSeed = next() < 0.5;
      const req = request(org, `u${Math.floor(next() * 3)}`, lim, now, {
        cost: 1 + Math.floor(next() * 3),
        slotId: `s${i}`,
        // Longer than the test runs in real time, so Redis never expires the set on its own clock.
        slotTtlMs: 20_000,
        ...(needsSeed ? { seed: { day: 2, month: 30 } } : {}),
      });
      const [fromMemory, fromRedis] = await Promise.all([memory.acquire(req), a.acquire(req)]);
      expect(fromRedis, `request ${i}`).toEqual(fromMemory);
      if (fromRedis.allowed) held.push(req.slotId);
    }
    await memory.close();
  });
});
