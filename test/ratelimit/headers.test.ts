import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { rateLimitPolicy, rateLimitState } from '../../src/ratelimit/headers.js';
import type { Decision, OrgLimits } from '../../src/ratelimit/types.js';
import { ALLOWED_OFF, limits } from './helpers.js';

// Every limit on, a little used.
const someLimits = (over: Partial<OrgLimits> = {}): OrgLimits =>
  limits({ orgBurst: 100, orgPerSecond: 10, userBurst: 20, userPerSecond: 2, dailyCap: 1_000, monthlyCap: 10_000, maxConcurrent: 5, ...over });

const decision = (over: Partial<Decision> = {}): Decision => ({
  ...ALLOWED_OFF,
  org: { remaining: 99, resetSeconds: 1 },
  user: { remaining: 19, resetSeconds: 1 },
  dayUsed: 1,
  monthUsed: 1,
  concurrent: 1,
  ...over,
});

/** The field as the draft spells it, from String() of each number: what rateLimitState must write. */
function expected(l: OrgLimits, d: Decision, nowMs: number, p: { dayEndsMs: number; monthEndsMs: number }): string {
  const items: string[] = [];
  if (l.orgBurst > 0 && l.orgPerSecond > 0) items.push(`"org";r=${d.org.remaining};t=${d.org.resetSeconds}`);
  if (l.userBurst > 0 && l.userPerSecond > 0) items.push(`"user";r=${d.user.remaining};t=${d.user.resetSeconds}`);
  if (l.dailyCap > 0) items.push(`"day";r=${Math.max(0, l.dailyCap - d.dayUsed)};t=${Math.ceil((p.dayEndsMs - nowMs) / 1000)}`);
  if (l.monthlyCap > 0) items.push(`"month";r=${Math.max(0, l.monthlyCap - d.monthUsed)};t=${Math.ceil((p.monthEndsMs - nowMs) / 1000)}`);
  return items.join(', ');
}

describe('RateLimit field text', () => {
  it('is what String() of each number gives, for any whole numbers up to 2^53 - 1 and any set of limits on', () => {
    const big = fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER });
    const count = fc.oneof(fc.integer({ min: 0, max: 1_000 }), fc.integer({ min: 0, max: 2 ** 31 }), big);
    fc.assert(
      fc.property(
        fc.record({ orgBurst: count, userBurst: count, dailyCap: count, monthlyCap: count }),
        fc.record({ orgRemaining: count, orgReset: count, userRemaining: count, userReset: count, dayUsed: count, monthUsed: count }),
        fc.integer({ min: 0, max: 10 ** 12 }),
        fc.integer({ min: 0, max: 40 * 86_400_000 }),
        (caps, n, nowMs, ahead) => {
          const l = someLimits({ ...caps, orgPerSecond: 1, userPerSecond: 1 });
          const d = decision({
            org: { remaining: n.orgRemaining, resetSeconds: n.orgReset },
            user: { remaining: n.userRemaining, resetSeconds: n.userReset },
            dayUsed: n.dayUsed,
            monthUsed: n.monthUsed,
          });
          const p = { dayEndsMs: nowMs + (ahead % 86_400_000), monthEndsMs: nowMs + ahead };
          expect(rateLimitState(l, d, nowMs, p)).toBe(expected(l, d, nowMs, p));
        },
      ),
      { numRuns: 5_000 },
    );
  });

  it('writes the digits of round numbers and of the edges of the integer ranges exactly', () => {
    const l = someLimits({ orgBurst: 1, userBurst: 0, dailyCap: 0, monthlyCap: 0 });
    for (const n of [0, 9, 10, 99, 100, 1e8, 2 ** 30 - 1, 2 ** 30, 2 ** 31 - 1, 2 ** 31, 1e15, 1e15 - 1, 1e15 + 7, 100_000_000_000_007, 89_999_999 * 1e8 - 1, Number.MAX_SAFE_INTEGER]) {
      expect(rateLimitState(l, decision({ org: { remaining: n, resetSeconds: 0 } }), 0, { dayEndsMs: 0, monthEndsMs: 0 })).toBe(`"org";r=${n};t=0`);
    }
  });

  it('falls back to String() for what is not a whole number (never expected)', () => {
    const l = someLimits({ orgBurst: 1, userBurst: 0, dailyCap: 0, monthlyCap: 0 });
    for (const n of [1.5, -1, 2 ** 53, 2 ** 60]) {
      expect(rateLimitState(l, decision({ org: { remaining: n, resetSeconds: 0 } }), 0, { dayEndsMs: 0, monthEndsMs: 0 })).toBe(`"org";r=${n};t=0`);
    }
  });
});

describe('RateLimit fields', () => {
  it('lists the limits that are on, with caps too large for a small integer written in full', () => {
    const l = someLimits({ dailyCap: 1e15, monthlyCap: 3e15 });
    expect(rateLimitPolicy(l)).toBe('"org";q=100;w=10, "user";q=20;w=10, "day";q=1000000000000000;w=86400, "month";q=3000000000000000;w=2592000');
    const nowMs = 1_000_000;
    const field = rateLimitState(l, decision({ dayUsed: 12_345, monthUsed: 1e15 + 5 }), nowMs, {
      dayEndsMs: nowMs + 40_000_500,
      monthEndsMs: nowMs + 2_000_000_000,
    });
    expect(field).toBe('"org";r=99;t=1, "user";r=19;t=1, "day";r=999999999987655;t=40001, "month";r=1999999999999995;t=2000000');
  });

  it('leaves out what is off, and never reports less than nothing', () => {
    const l = someLimits({ orgBurst: 0, monthlyCap: 0 });
    expect(rateLimitPolicy(l)).toBe('"user";q=20;w=10, "day";q=1000;w=86400');
    expect(rateLimitState(l, decision({ dayUsed: 1_200 }), 0, { dayEndsMs: 1_000, monthEndsMs: 2_000 })).toBe('"user";r=19;t=1, "day";r=0;t=1');
  });
});
