/**
 * The rate limiter's cost: GET /v1/me with limits off (the reference), with limits on but never
 * refusing (the allowed path), and for an org over its limit (the refused path), side by side in
 * one run. `npm run bench:limiter -- --help` for the options; bench/README.md for the results.
 */
import { SEED } from '../src/db/seed.js';
import { rateLimitPolicy } from '../src/ratelimit/headers.js';
import type { OrgLimits } from '../src/ratelimit/types.js';
import { ensureBenchData } from './data.js';
import { runBenchmark, type BenchCase, type Measurement, type ServerHandle } from './harness.js';
import { BENCH_SERVER_ENV, limitEnv, NEVER_REFUSES, OFF } from './limits.js';

// The caller: BENCH_ORG_ID and BENCH_USER_ID when set; else, on PostgreSQL, the benchmark's own org
// (bench-limiter-00001, created by the run) and, on the embedded database (a temporary folder
// nobody keeps), the seeded acme-corp admin. Every admitted request counts toward the caller's
// org's daily and monthly usage, which PostgreSQL keeps: never spend a real org's quota by default.
const admin = SEED.users.find((u) => u.email === 'admin@acme.com')!;
const CHOSEN = process.env.BENCH_ORG_ID && process.env.BENCH_USER_ID ? { orgId: process.env.BENCH_ORG_ID, userId: process.env.BENCH_USER_ID } : null;
let caller = CHOSEN ?? { orgId: admin.orgId, userId: admin.id };
let who = CHOSEN ? `user ${CHOSEN.userId} of org ${CHOSEN.orgId}` : 'the seeded acme-corp admin';
const HEADERS: Record<string, string> = {};
function setCaller(c: { orgId: string; userId: string }): void {
  caller = c;
  HEADERS['x-org-id'] = c.orgId;
  HEADERS['x-user-id'] = c.userId;
}
setCaller(caller);

/** The same, except the org bucket: one token, refilled every 1000 s. Only the first request passes. */
const OVER_LIMIT: OrgLimits = { ...NEVER_REFUSES, orgBurst: 1, orgPerSecond: 0.001 };

/**
 * One request before the warm-up: the seeded user must authenticate, and the limits the server
 * applies (its RateLimit-Policy header) must be the ones this case set. They differ when the org
 * has its own values in org_limits, which override the environment.
 */
function probe(limits: OrgLimits, okStatuses: number[]) {
  return async (server: ServerHandle): Promise<string[]> => {
    const res = await fetch(`${server.baseUrl}/v1/me`, { headers: HEADERS, signal: AbortSignal.timeout(5_000) });
    const body = await res.text();
    const problems: string[] = [];
    if (!okStatuses.includes(res.status)) {
      problems.push(`GET /v1/me as ${who} answered ${res.status}, expected ${okStatuses.join(' or ')}: ${body.slice(0, 300)}`);
    }
    const expected = rateLimitPolicy(limits);
    const actual = res.headers.get('ratelimit-policy') ?? '';
    if (res.status !== 401 && res.status !== 400 && actual !== expected) {
      problems.push(
        `the server applies other limits than this case set (RateLimit-Policy "${actual}", expected "${expected}"): ` +
          'the org probably has its own values in org_limits (`npm run org:limits -- <org-slug>` shows them, ' +
          '`--reset` clears them), or set BENCH_ORG_ID and BENCH_USER_ID to a user of an org without its own limits',
      );
    }
    return problems;
  };
}

const noRefusals = (m: Measurement): string[] =>
  m.status['429'] > 0 ? [`${m.status['429']} responses were 429: limits meant never to refuse did refuse`] : [];
const someSuccess = (m: Measurement): string[] =>
  m.status['2xx'] === 0 ? ['no 2xx response: the requests do not reach the route'] : [];

const request = { path: '/v1/me', headers: HEADERS };

const cases: BenchCase[] = [
  {
    id: 'a',
    title: 'limits off (reference)',
    env: limitEnv(OFF),
    request,
    probe: probe(OFF, [200]),
    check: (m) => [...someSuccess(m), ...noRefusals(m)],
  },
  {
    id: 'b',
    title: 'limits on, allowed',
    env: limitEnv(NEVER_REFUSES),
    request,
    probe: probe(NEVER_REFUSES, [200]),
    check: (m) => [...someSuccess(m), ...noRefusals(m)],
  },
  {
    id: 'c',
    title: 'org over its limit, refused',
    env: limitEnv(OVER_LIMIT),
    request,
    // The probe takes the bucket's one token (200), or finds it already spent by an earlier run
    // against the same Redis (429): either way every request after it is refused.
    probe: probe(OVER_LIMIT, [200, 429]),
    check: (m) => (m.status['429'] === 0 ? ['no 429 at all: the org was not over its limit'] : []),
  },
];

const code = await runBenchmark({
  name: 'limiter',
  title: 'Rate limiter cost: GET /v1/me',
  commonEnv: BENCH_SERVER_ENV,
  cases,
  referenceId: 'a',
  help: ['BENCH_ORG_ID, BENCH_USER_ID          the caller (default: the org bench-limiter-00001, created by the run)'],
  async prepare(backends) {
    if (CHOSEN || backends.database.kind !== 'postgres') return [`caller: ${who}`];
    const { data, summary } = await ensureBenchData(backends.database.url, {}, ['limiter']);
    setCaller(data.limiter[0]!);
    who = `the only user of bench-limiter-00001 (${caller.userId})`;
    return [summary, `caller: ${who}`];
  },
  // Calls the app makes to Redis per request: the limit script (EVALSHA, or EVAL when Redis does
  // not know it yet) and the release of the concurrency slot (ZREM).
  redisRoundTrips: ['evalsha', 'eval', 'zrem'],
  footer: (_results, backends) => [
    `Every admitted request counted toward the org's usage (org_usage in the database${backends.redisUrl ? ', day/month counters in Redis' : ''}).`,
  ],
});
process.exit(code);
