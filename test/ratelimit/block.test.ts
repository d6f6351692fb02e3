import { randomUUID } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { RateLimiter } from '../../src/ratelimit/limiter.js';
import { createMemoryBackend } from '../../src/ratelimit/memory.js';
import type { LimiterBackend } from '../../src/ratelimit/types.js';
import type { CallerMemo } from '../../src/types/context.js';
import { UsageRecorder } from '../../src/ratelimit/usage.js';
import { testConfig } from '../helpers/app.js';
import { getTestDb, silentLogger } from '../helpers/db.js';
import { T0, limits } from './helpers.js';

/**
 * The in-process "blocked until" of a refused org: a flood costs one backend call per expiry of
 * the block, not one per concurrent request (the stampede a plain expiry would let through).
 */

const limiters: RateLimiter[] = [];
afterEach(async () => {
  await Promise.all(limiters.splice(0).map((l) => l.close()));
});

/** The real memory backend, counting its calls and answering after a short delay, like a network would. */
function countingBackend(delayMs: number): LimiterBackend & { calls: number } {
  const inner = createMemoryBackend({ maxKeys: 10_000 });
  const backend = {
    kind: inner.kind,
    calls: 0,
    async acquire(req: Parameters<LimiterBackend['acquire']>[0]) {
      backend.calls++;
      await new Promise((r) => setTimeout(r, delayMs));
      return inner.acquire(req);
    },
    release: (orgId: string, slotId: string) => inner.release(orgId, slotId),
    refund: (req: Parameters<LimiterBackend['refund']>[0]) => inner.refund(req),
    close: () => inner.close(),
  };
  return backend;
}

async function limiterWith(backend: LimiterBackend): Promise<RateLimiter> {
  const config = testConfig();
  const usage = new UsageRecorder(await getTestDb(), silentLogger, 60_000);
  const limiter = new RateLimiter({ primary: backend, createFallback: null, usage, config: config.rateLimit, logger: silentLogger });
  limiters.push(limiter);
  return limiter;
}

describe('blocked until, at expiry', () => {
  // One token, ten a second: a refusal blocks for 100 ms.
  const orgLimits = limits({ orgBurst: 1, orgPerSecond: 10 });

  it('50 concurrent requests after the block expires make one backend call; the others are still refused', async () => {
    const backend = countingBackend(5);
    const limiter = await limiterWith(backend);
    const orgId = randomUUID();
    const ask = (nowMs: number) => limiter.acquireOrg({ orgId, userId: randomUUID(), limits: orgLimits, nowMs });

    expect((await ask(T0)).allowed).toBe(true);
    expect((await ask(T0)).allowed).toBe(false); // blocked until T0 + 100
    expect(backend.calls).toBe(2);
    const during = await Promise.all(Array.from({ length: 50 }, () => ask(T0 + 50)));
    expect(during.every((a) => !a.allowed)).toBe(true);
    expect(backend.calls).toBe(2); // all from memory

    const after = await Promise.all(Array.from({ length: 50 }, () => ask(T0 + 150)));
    expect(backend.calls).toBe(3); // one probe
    expect(after.filter((a) => a.allowed)).toHaveLength(1); // the probe found a token
    expect(after.filter((a) => !a.allowed)).toHaveLength(49);

    // Its answer ended the old block; the next request goes to the backend and is refused by it.
    expect((await ask(T0 + 151)).allowed).toBe(false);
    expect(backend.calls).toBe(4);
  });

  it('a probe that is refused again sets a new block', async () => {
    const backend = countingBackend(1);
    const limiter = await limiterWith(backend);
    const orgId = randomUUID();
    const slow = limits({ orgBurst: 1, orgPerSecond: 0.5 }); // a refusal blocks for up to a second
    const ask = (nowMs: number) => limiter.acquireOrg({ orgId, userId: randomUUID(), limits: slow, nowMs });
    expect((await ask(T0)).allowed).toBe(true);
    expect((await ask(T0)).allowed).toBe(false);
    // At T0 + 1000 the block (capped at 1 s) expires but the bucket has only 0.5 token: refused again.
    const probe = await ask(T0 + 1_000);
    expect(probe.allowed).toBe(false);
    expect(backend.calls).toBe(3);
    expect((await ask(T0 + 1_100)).allowed).toBe(false);
    expect(backend.calls).toBe(3); // the new block answers

  });

  it('a probe whose answer never comes back holds the others for at most a second, then another request asks', async () => {
    const backend = countingBackend(1);
    let hang = false;
    const hanging: LimiterBackend = {
      ...backend,
      acquire: (req) => (hang ? new Promise(() => undefined) : backend.acquire(req)),
    };
    const limiter = await limiterWith(hanging);
    const orgId = randomUUID();
    const ask = (nowMs: number) => limiter.acquireOrg({ orgId, userId: randomUUID(), limits: orgLimits, nowMs });
    expect((await ask(T0)).allowed).toBe(true);
    expect((await ask(T0)).allowed).toBe(false); // blocked until T0 + 100
    hang = true;
    void ask(T0 + 150); // the probe, never answered
    expect((await ask(T0 + 200)).allowed).toBe(false);
    expect((await ask(T0 + 1_100)).allowed).toBe(false); // still within a second of the probe
    hang = false;
    const calls = backend.calls;
    expect((await ask(T0 + 1_150)).allowed).toBe(true); // a new probe, answered
    expect(backend.calls).toBe(calls + 1);
  });
});

describe('rememberedRefusal (the refusal gate asks it before any hook runs)', () => {
  const orgLimits = limits({ orgBurst: 1, orgPerSecond: 10 });

  it('repeats exactly what admit() would repeat from memory, and nothing else', async () => {
    const backend = countingBackend(1);
    const limiter = await limiterWith(backend);
    const orgId = randomUUID();
    const userId = randomUUID();
    const args = (nowMs: number) => ({ orgId, userId, limits: orgLimits, nowMs });
    expect(limiter.rememberedRefusal(args(T0))).toBeNull(); // nothing remembered yet
    expect((await limiter.acquireOrg(args(T0))).allowed).toBe(true);
    const refused = await limiter.acquireOrg(args(T0)); // the backend's refusal: blocked until T0 + 100
    expect(refused.allowed).toBe(false);

    const again = limiter.rememberedRefusal(args(T0 + 50));
    expect(again).toMatchObject({ allowed: false, refusedBy: 'org_rate', retryAfterSeconds: refused.retryAfterSeconds, decision: refused.decision });
    // Another user of the org is refused too; another org is not; limits off never are.
    expect(limiter.rememberedRefusal({ ...args(T0 + 50), userId: randomUUID() })?.refusedBy).toBe('org_rate');
    expect(limiter.rememberedRefusal({ ...args(T0 + 50), orgId: randomUUID() })).toBeNull();
    expect(limiter.rememberedRefusal({ ...args(T0 + 50), limits: limits({}) })).toBeNull();
    // Asking counts nothing; countRefusal does.
    const before = limiter.stats.refused.org_rate;
    limiter.rememberedRefusal(args(T0 + 60));
    expect(limiter.stats.refused.org_rate).toBe(before);
    limiter.countRefusal('org_rate');
    expect(limiter.stats.refused.org_rate).toBe(before + 1);
    expect(backend.calls).toBe(2);

    // Expired: not the gate's to answer, and asking does not take the probe from admit().
    expect(limiter.rememberedRefusal(args(T0 + 150))).toBeNull();
    expect((await limiter.acquireOrg(args(T0 + 150))).allowed).toBe(true); // admit() probes
    expect(backend.calls).toBe(3);
  });

  it("keeps the caller's block keys in its memo while refusals are remembered, and a memo met with another caller is not trusted", async () => {
    const limiter = await limiterWith(countingBackend(0));
    const blockedOrg = randomUUID();
    const userId = randomUUID();
    const memo: CallerMemo = {};
    const args = (orgId: string, nowMs: number) => ({ orgId, userId, limits: orgLimits, nowMs, memo });
    expect((await limiter.acquireOrg(args(blockedOrg, T0))).allowed).toBe(true);
    // While nothing is remembered, no keys are kept (a cache of many admitted callers holds none).
    expect(memo.blockKeys).toBeUndefined();
    expect((await limiter.acquireOrg(args(blockedOrg, T0))).allowed).toBe(false); // blocked until T0 + 100
    expect(limiter.rememberedRefusal(args(blockedOrg, T0 + 10))?.refusedBy).toBe('org_rate');
    expect(memo.blockKeys).toMatchObject({ orgId: blockedOrg, userId });
    const kept = memo.blockKeys;
    expect(limiter.admit(args(blockedOrg, T0 + 10))).toMatchObject({ allowed: false, refusedBy: 'org_rate' });
    expect(memo.blockKeys).toBe(kept); // the same keys, not made again
    // The same memo with another org: its own keys, so not the blocked org's refusal.
    const otherOrg = randomUUID();
    expect(limiter.rememberedRefusal(args(otherOrg, T0 + 10))).toBeNull();
    expect((await limiter.acquireOrg(args(otherOrg, T0 + 10))).allowed).toBe(true);
    expect(memo.blockKeys).toMatchObject({ orgId: otherOrg, userId });
  });

  it('answers null while the caller holds a lease: admit() would admit from it', async () => {
    const backend = countingBackend(0);
    const limiter = await limiterWith(backend);
    const slow = limits({ orgBurst: 1_000, orgPerSecond: 0.001 });
    const orgId = randomUUID();
    const leased = randomUUID();
    const args = (userId: string) => ({ orgId, userId, limits: slow, nowMs: T0 });
    expect((await limiter.acquireOrg(args(leased))).allowed).toBe(true);
    await new Promise((r) => setTimeout(r, 20)); // a lease is asked for in the background
    expect(limiter.leaseStats.held).toBe(1);
    // Other users spend the rest of the org's bucket until the org is refused (and blocked).
    let refused = false;
    for (let i = 0; i < 2_000 && !refused; i++) {
      refused = !(await limiter.acquireOrg(args(randomUUID()))).allowed;
    }
    expect(refused).toBe(true);
    expect(limiter.rememberedRefusal(args(randomUUID()))?.refusedBy).toBe('org_rate');
    // The leased caller is still admitted by admit(), from its lease: the gate must not refuse it.
    expect(limiter.rememberedRefusal(args(leased))).toBeNull();
    expect(limiter.admit(args(leased))).toMatchObject({ allowed: true });
  });
});
