import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { intText, rateLimitPolicy, rateLimitState } from '../../src/ratelimit/headers.js';
import type { Decision, OrgLimits } from '../../src/ratelimit/types.js';

const limits = (over: Partial<OrgLimits> = {}): OrgLimits => ({
  orgBurst: 100,
  orgPerSecond: 10,
  userBurst: 20,
  userPerSecond: 2,
  dailyCap: 1_000,
  monthlyCap: 10_000,
  maxConcurrent: 5,
  ...over,
});

const decision = (over: Partial<Decision> = {}): Decision => ({
  allowed: true,
  retryAfterSeconds: 0,
  needsSeed: false,
  org: { remaining: 99, resetSeconds: 1 },
  user: { remaining: 19, resetSeconds: 1 },
  dayUsed: 1,
  monthUsed: 1,
  concurrent: 1,
  ...over,
});

describe('intText', () => {
  it('writes every whole number as String() does, large ones included', () => {
    fc.assert(fc.property(fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }), (n) => intText(n) === String(n)), { numRuns: 20_000 });
    // Low halves with leading zeros, and the edges of the two-halves path.
    for (const n of [0, 2 ** 30 - 1, 2 ** 30, 1e8, 1e15, 1e15 + 7, 1e15 - 1, 100_000_000_000_007, 123_400_000_005, Number.MAX_SAFE_INTEGER]) {
      expect(intText(n)).toBe(String(n));
    }
  });

  it('leaves anything else to String()', () => {
    for (const n of [1.5, 2 ** 40 + 0.5, -1, -(2 ** 40), 2 ** 53, 2 ** 60, Infinity, NaN]) expect(intText(n)).toBe(String(n));
  });
});

describe('RateLimit fields', () => {
  it('lists the limits that are on, with caps too large for a small integer written in full', () => {
    const l = limits({ dailyCap: 1e15, monthlyCap: 3e15 });
    expect(rateLimitPolicy(l)).toBe('"org";q=100;w=10, "user";q=20;w=10, "day";q=1000000000000000;w=86400, "month";q=3000000000000000;w=2592000');
    const nowMs = 1_000_000;
    const field = rateLimitState(l, decision({ dayUsed: 12_345, monthUsed: 1e15 + 5 }), nowMs, {
      dayEndsMs: nowMs + 40_000_500,
      monthEndsMs: nowMs + 2_000_000_000,
    });
    expect(field).toBe('"org";r=99;t=1, "user";r=19;t=1, "day";r=999999999987655;t=40001, "month";r=1999999999999995;t=2000000');
  });

  it('leaves out what is off, and never reports less than nothing', () => {
    const l = limits({ orgBurst: 0, monthlyCap: 0 });
    expect(rateLimitPolicy(l)).toBe('"user";q=20;w=10, "day";q=1000;w=86400');
    expect(rateLimitState(l, decision({ dayUsed: 1_200 }), 0, { dayEndsMs: 1_000, monthEndsMs: 2_000 })).toBe('"user";r=19;t=1, "day";r=0;t=1');
  });
});
