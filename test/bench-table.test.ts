import { describe, expect, it } from 'vitest';
import { applyRatios, summarize, table, type CaseResult, type Measurement } from '../bench/harness.js';

// The benchmark's own arithmetic and table: no server, no load.

function measurement(rps: number, p99: number, status: Partial<Measurement['status']> = {}): Measurement {
  return {
    requestsPerSecond: { mean: rps, stddev: 0, min: rps, max: rps },
    responses: rps,
    durationS: 1,
    latencyUs: { mean: p99 / 2, p50: p99 / 2, p90: p99, p99, p999: p99, max: p99 },
    autocannonLatencyMs: { p50: 0, p99: 0, mean: 0 },
    status: { '2xx': rps, '429': 0, otherNon2xx: 0, byCode: { 200: rps }, ...status },
    errors: 0,
    timeouts: 0,
    overran: false,
  };
}

function row(id: string, m: Measurement | null, extra: Partial<CaseResult> = {}): CaseResult {
  return {
    id,
    title: `case ${id}`,
    program: 'app',
    command: 'node dist/server.js',
    env: {},
    request: { method: 'GET', path: '/', headersPerRequest: false },
    startupMs: 100,
    limiter: 'redis',
    measurement: m,
    fixedRate: false,
    ratioToReference: null,
    p99RatioToReference: null,
    parts: [],
    rssMb: 100,
    peakRssMb: 100,
    redisCalls: null,
    cpu: null,
    serverWarnings: [],
    problems: [],
    notes: [],
    ...extra,
  };
}

describe('bench ratios', () => {
  it('divides req/s and p99 by the reference of the same round; a fixed-rate row gets no req/s ratio', () => {
    const results = [
      row('ref', measurement(10_000, 2_000)),
      row('me', measurement(6_000, 5_000)),
      row('noisy', measurement(100, 8_000), {
        fixedRate: true,
        parts: [{ label: 'A', measurement: measurement(2_500, 4_000), fixedRate: false, ratioToReference: null, p99RatioToReference: null }],
      }),
      row('broken', null),
    ];
    applyRatios(results, 'ref');
    expect(results.map((r) => [r.ratioToReference, r.p99RatioToReference])).toEqual([
      [1, 1],
      [0.6, 2.5],
      [null, 4],
      [null, null],
    ]);
    expect(results[2]!.parts[0]).toMatchObject({ ratioToReference: 0.25, p99RatioToReference: 2 });
  });

  it('leaves every ratio empty when the reference has no measurement', () => {
    const results = [row('ref', null), row('me', measurement(6_000, 5_000))];
    applyRatios(results, 'ref');
    expect(results[1]).toMatchObject({ ratioToReference: null, p99RatioToReference: null });
  });
});

describe('bench rounds', () => {
  const round = (rps: number, ratio: number, extra: Partial<CaseResult>, status: Partial<Measurement['status']> = {}, errors = 0) =>
    row('t10k', { ...measurement(rps, 2_000, status), errors }, { ratioToReference: ratio, ...extra });

  it("shows the median round, with the median ratio, and the worst of every round where a target reads one", () => {
    const [summary] = summarize(
      [{ id: 't10k' }],
      [
        [round(100, 0.9, { rssMb: 180 })],
        [round(90, 0.7, { rssMb: 205 }, { '429': 2, otherNon2xx: 1 })],
        [round(110, 0.8, { rssMb: 190 }, {}, 3)],
      ],
    );
    // The round of 100 req/s, its RSS and counts; the ratio is the median of 0.9, 0.7 and 0.8.
    expect(summary!.measurement!.requestsPerSecond.mean).toBe(100);
    expect(summary!.rssMb).toBe(180);
    expect(summary!.ratioToReference).toBe(0.8);
    expect(summary!.rounds).toMatchObject({ count: 3, requestsPerSecondMin: 90, requestsPerSecondMax: 110, rssMbMax: 205, status429: 2, errors: 4 });
  });

  it('with one round, is that round as it is', () => {
    const only = round(100, 0.9, { rssMb: 180 });
    expect(summarize([{ id: 't10k' }], [[only]])).toEqual([only]);
  });
});

describe('bench table', () => {
  it('has one line per case and per part, every line as many cells as the header', () => {
    const results = [
      row('ref', measurement(10_000, 2_000)),
      row('noisy', measurement(100, 8_000), {
        fixedRate: true,
        parts: [{ label: 'org A', measurement: measurement(2_500, 4_000, { '429': 2_000 }), fixedRate: false, ratioToReference: null, p99RatioToReference: null }],
      }),
      row('broken', null),
    ];
    applyRatios(results, 'ref');
    for (const roundTrips of [null, ['evalsha']]) {
      const lines = table(results, roundTrips, (r) => r.title).split('\n');
      const cells = (line: string) => line.split(' | ').length;
      expect(lines).toHaveLength(2 + 4);
      expect(new Set(lines.map(cells))).toEqual(new Set([cells(lines[0]!)]));
      expect(lines[3]).toMatch(/^\| case noisy +\| +100 \| +fixed \|/);
      expect(lines[4]).toMatch(/^\| {3}↳ org A +\| +2,500 \| +0\.25x \|/);
      expect(lines[5]).toMatch(/^\| case broken +\| FAILED \|/);
    }
  });
});
