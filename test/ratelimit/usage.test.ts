import { describe, expect, it } from 'vitest';
import type { Database } from '../../src/infra/database.js';
import { addUsage, findUsage } from '../../src/models/usage.model.js';
import { RateLimiter } from '../../src/ratelimit/limiter.js';
import { createMemoryBackend } from '../../src/ratelimit/memory.js';
import { utcPeriods } from '../../src/ratelimit/periods.js';
import { UsageRecorder } from '../../src/ratelimit/usage.js';
import { createTenant, testConfig } from '../helpers/app.js';
import { getTestDb, silentLogger } from '../helpers/db.js';
import { limits } from './helpers.js';

/**
 * The usage batch (src/ratelimit/usage.ts): admitted requests are counted in memory and written
 * to PostgreSQL in batches. Leased requests add to a tally the limiter keeps per org; a tally
 * stays the one that counts across writes (a failed write puts its counts back on it) until it is
 * let go, idle through a whole interval.
 */

/** The real database, with writes of usage failing while `failing.on` is set. */
function withFailingWrites(db: Database) {
  const failing = { on: false };
  const wrapped = new Proxy(db, {
    get(target, key, receiver) {
      if (key === 'queryInTransaction' && failing.on) return () => Promise.reject(new Error('connection refused'));
      const value: unknown = Reflect.get(target, key, receiver);
      return typeof value === 'function' ? (value as (...a: unknown[]) => unknown).bind(target) : value;
    },
  });
  return { db: wrapped, failing };
}

describe('usage batches', () => {
  it('a leased org is counted exactly across many batches', async () => {
    const db = await getTestDb();
    const t = await createTenant(db);
    const usage = new UsageRecorder(db, silentLogger, 60_000);
    const config = testConfig({ RATE_LIMIT_LEASE_MAX: '64' });
    const limiter = new RateLimiter({ primary: createMemoryBackend({ maxKeys: config.rateLimit.memoryMaxKeys }), createFallback: null, usage, config: config.rateLimit, logger: silentLogger });
    const far = limits({ orgBurst: 1_000_000, orgPerSecond: 1_000, userBurst: 1_000_000, userPerSecond: 1_000, dailyCap: 1_000_000, monthlyCap: 1_000_000 });
    let admitted = 0;
    try {
      for (let batch = 0; batch < 6; batch++) {
        for (let i = 0; i < 50; i++) {
          const a = await limiter.acquireOrg({ orgId: t.org.id, userId: t.member.id, limits: far });
          expect(a.allowed).toBe(true);
          a.release();
          admitted++;
        }
        await new Promise((r) => setTimeout(r, 5)); // the background lease requests
        await usage.flush();
      }
      expect(limiter.leaseStats.admitted).toBeGreaterThan(200); // most of them from a lease
    } finally {
      await limiter.close();
    }
    const p = utcPeriods(Date.now());
    expect(await findUsage(db, t.org.id, p.day, p.month)).toEqual({ day: admitted, month: admitted });
  });

  it('a failed write keeps every count, those added to a tally while it failed included', async () => {
    const real = await getTestDb();
    const t = await createTenant(real);
    const { db, failing } = withFailingWrites(real);
    const usage = new UsageRecorder(db, silentLogger, 60_000);
    const p = utcPeriods(Date.now());
    // What the limiter does: keep the tally, and fetch it again once it no longer counts.
    let held = usage.tally(t.org.id, p.day, p.month);
    const add = (n: number) => {
      if (!usage.isCurrent(held)) held = usage.tally(t.org.id, p.day, p.month);
      held.requests += n;
    };
    add(5);
    failing.on = true;
    const write = usage.flush();
    add(3); // lands in the next batch while the write is in flight
    await write; // failed: the first batch is put back, the newer counts merged into it
    add(2);
    expect(usage.unflushed(t.org.id, p.day, p.month)).toEqual({ day: 10, month: 10 });
    failing.on = false;
    await usage.flush();
    add(1);
    await usage.flush();
    expect(await findUsage(real, t.org.id, p.day, p.month)).toEqual({ day: 11, month: 11 });
  });

  it('an org that keeps sending keeps its tally across writes; an idle one is forgotten', async () => {
    const db = await getTestDb();
    const busy = await createTenant(db);
    const idle = await createTenant(db);
    const usage = new UsageRecorder(db, silentLogger, 60_000);
    const p = utcPeriods(Date.now());
    const held = usage.tally(busy.org.id, p.day, p.month);
    const idleHeld = usage.tally(idle.org.id, p.day, p.month);
    idleHeld.requests += 2;
    for (let i = 1; i <= 3; i++) {
      held.requests += i;
      await usage.flush();
      // Written and emptied, and still the one that counts: nothing new per write.
      expect(usage.isCurrent(held)).toBe(true);
      expect(usage.tally(busy.org.id, p.day, p.month)).toBe(held);
      expect(held.requests).toBe(0);
    }
    // The idle org's 2 were written by the first write; nothing came after, so it was let go.
    expect(usage.isCurrent(idleHeld)).toBe(false);
    const again = usage.tally(idle.org.id, p.day, p.month);
    expect(again).not.toBe(idleHeld);
    again.requests += 1;
    await usage.flush();
    expect(await findUsage(db, busy.org.id, p.day, p.month)).toEqual({ day: 6, month: 6 });
    expect(await findUsage(db, idle.org.id, p.day, p.month)).toEqual({ day: 3, month: 3 });
  });

  it('a batch counts each entry toward its own day and month', async () => {
    const db = await getTestDb();
    const a = await createTenant(db);
    const b = await createTenant(db);
    await addUsage(db, {
      orgIds: [a.org.id, a.org.id, a.org.id, b.org.id],
      days: ['2026-01-30', '2026-01-31', '2026-02-01', '2026-01-31'],
      requests: [1, 2, 4, 8],
    });
    await addUsage(db, { orgIds: [a.org.id], days: ['2026-01-31'], requests: [16] });
    expect(await findUsage(db, a.org.id, '2026-01-31', '2026-01')).toEqual({ day: 18, month: 19 });
    expect(await findUsage(db, a.org.id, '2026-02-01', '2026-02')).toEqual({ day: 4, month: 4 });
    expect(await findUsage(db, b.org.id, '2026-01-31', '2026-01')).toEqual({ day: 8, month: 8 });
    expect(await findUsage(db, b.org.id, '2026-02-01', '2026-02')).toEqual({ day: 0, month: 0 });
  });
});
