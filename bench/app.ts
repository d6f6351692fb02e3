/**
 * The app against a bare Fastify reference, side by side in one run, on PostgreSQL and Redis:
 * anonymous health, /v1/me with auth and limits, a page of /v1/users, an org over its limit, a noisy
 * neighbour, 10 against 10,000 tenants; then the embedded default (PGlite, in-memory limiter).
 * `npm run bench -- --help` for the options; bench/README.md for what each case does and the results.
 */
import { SEED } from '../src/db/seed.js';
import type { OrgLimitOverrides } from '../src/models/orgLimits.model.js';
import { effectiveLimits } from '../src/models/orgLimits.model.js';
import { rateLimitPolicy } from '../src/ratelimit/headers.js';
import type { OrgLimits } from '../src/ratelimit/types.js';
import { appBackends, ENV_HELP } from './backends.js';
import { ensureBenchData, GROUPS, type BenchData, type BenchUser, type Group } from './data.js';
import {
  load,
  log,
  makeTempDir,
  redact,
  runBenchmark,
  type BenchCase,
  type BenchOptions,
  type CaseResult,
  type Measurement,
  type ServerHandle,
} from './harness.js';
import { BENCH_SERVER_ENV, limitEnv, NEVER_REFUSES } from './limits.js';

// ---------------------------------------------------------------------------------------------
// Settings

/** The org over its limit: one token, refilled every 1000 s. Every request after the first is refused. */
const REFUSED_LIMITS: OrgLimitOverrides = { orgBurst: 1, orgPerSecond: 0.001 };
/** The noisy org A: 100 requests per second admitted, the rest of its flood refused. */
const NOISY_A_LIMITS: OrgLimitOverrides = { orgBurst: 100, orgPerSecond: 100 };
/**
 * Org B's normal traffic: a fixed rate, far below every limit it has, spread over enough
 * connections that each sends a request only every 200 ms (autocannon's connections wait for an
 * answer before sending again, so fewer of them could not keep the rate while A slows the server).
 */
const NOISY_B_RATE = 100;
const NOISY_B_CONNECTIONS = 20;
/** Bound of the many-tenants warm-up that requests every user once. */
const TOUCH_TIME_LIMIT_S = 120;
/** With --quick, that warm-up requests this many of the users, not all: enough to prove it works. */
const TOUCH_QUICK_SAMPLE = 1_000;
/**
 * The server keeps an authenticated user in its auth cache for a while (AUTH_CACHE_TTL_MS, 30 s by
 * default). Requesting 50,000 users once takes 15-40 s on 2 cores, so with the default the first
 * of them would expire before the measurement even starts. The many-tenants cases compare per-tenant
 * costs with every user cached, so both run with a lifetime that outlasts warm-up and measurement,
 * and the measurement is cut short if it would outlast it all the same.
 */
const TENANTS_AUTH_CACHE_TTL_S = 300;
const TENANTS_ENV = { AUTH_CACHE_TTL_MS: String(TENANTS_AUTH_CACHE_TTL_S * 1000) };

// ---------------------------------------------------------------------------------------------
// Data: created once the database is migrated, read by the cases

let benchData: BenchData | null = null;

function users(group: Group): BenchUser[] {
  if (!benchData) throw new Error('the bench data was not prepared');
  return benchData[group];
}

const headersCache = new Map<BenchUser, Record<string, string>>();
function headersOf(u: BenchUser): Record<string, string> {
  let h = headersCache.get(u);
  if (!h) {
    h = { 'x-org-id': u.orgId, 'x-user-id': u.userId };
    headersCache.set(u, h);
  }
  return h;
}

/** Headers of a random user of the group, chosen per request. */
const anyUserOf = (group: Group) => () => {
  const list = users(group);
  return headersOf(list[Math.floor(Math.random() * list.length)]!);
};

/** Fisher–Yates: a random order in which every element comes exactly once. */
function shuffled<T>(items: readonly T[]): T[] {
  const out = [...items];
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Setup checks

/**
 * One request before the warm-up: the user must get one of `okStatuses`, and the limits the
 * server applies to its org (the RateLimit-Policy header) must be the ones the case relies on.
 */
function probeAs(
  who: () => Record<string, string>,
  path: string,
  okStatuses: number[],
  limits: OrgLimits,
  body?: (json: unknown) => string[],
) {
  return async (server: ServerHandle): Promise<string[]> => {
    const headers = who();
    const res = await fetch(`${server.baseUrl}${path}`, { headers, signal: AbortSignal.timeout(5_000) });
    const text = await res.text();
    const problems: string[] = [];
    const as = `GET ${path} as user ${headers['x-user-id']} of org ${headers['x-org-id']}`;
    if (!okStatuses.includes(res.status)) {
      problems.push(`${as} answered ${res.status}, expected ${okStatuses.join(' or ')}: ${text.slice(0, 300)}`);
      return problems;
    }
    const expected = rateLimitPolicy(limits);
    const actual = res.headers.get('ratelimit-policy') ?? '';
    if (actual !== expected) problems.push(`${as}: the server applies other limits (RateLimit-Policy "${actual}", expected "${expected}")`);
    if (res.status === 200 && body) problems.push(...body(JSON.parse(text)).map((p) => `${as}: ${p}`));
    return problems;
  };
}

const someSuccess = (m: Measurement): string[] => (m.status['2xx'] === 0 ? ['no 2xx response: the requests do not reach the route'] : []);
const noRefusals = (m: Measurement): string[] =>
  m.status['429'] > 0 ? [`${m.status['429']} responses were 429: limits meant never to refuse did refuse`] : [];
const served = (m: Measurement): string[] => [...someSuccess(m), ...noRefusals(m)];

// ---------------------------------------------------------------------------------------------
// Cases

const fmt = (n: number) => Math.round(n).toLocaleString('en-US');

/** Many tenants: every request a random user of the group, after a warm-up that requested each of them once. */
function tenantsCase(id: string, group: Group, title: string): BenchCase {
  const request = { path: '/v1/me', headersPerRequest: anyUserOf(group) };
  let firstTouchAt = 0;
  return {
    id,
    title,
    env: TENANTS_ENV,
    request,
    probe: probeAs(() => headersOf(users(group)[0]!), '/v1/me', [200], NEVER_REFUSES),
    async warmup({ server, opts, log: say }) {
      if (opts.warmupS > 0) await load(server.baseUrl, request, { connections: opts.connections, durationS: opts.warmupS });
      // Then each user exactly once, in a random order: every one of them is known to the server
      // (its auth cache, the limiter's buckets) before the measurement starts.
      const all = users(group);
      const order = shuffled(all).slice(0, opts.quick ? TOUCH_QUICK_SAMPLE : all.length);
      const what = order.length === all.length ? `each of the ${fmt(all.length)} users` : `${fmt(order.length)} of the ${fmt(all.length)} users (--quick)`;
      let next = 0;
      firstTouchAt = performance.now();
      say(`requesting ${what} once ...`);
      const m = await load(
        server.baseUrl,
        { path: '/v1/me', headersPerRequest: () => headersOf(order[next++ % order.length]!) },
        { connections: opts.connections, amount: order.length, timeLimitS: TOUCH_TIME_LIMIT_S },
      );
      const seconds = (performance.now() - firstTouchAt) / 1000;
      if (m.overran) return { problems: [`the warm-up did not finish requesting ${what} within ${TOUCH_TIME_LIMIT_S} s`] };
      if (m.status['2xx'] !== order.length) {
        return {
          problems: [
            `the warm-up requested ${what} and got ${fmt(m.status['2xx'])} 2xx (statuses ${JSON.stringify(m.status.byCode)}, ${m.errors} errors)`,
          ],
        };
      }
      return { notes: [`the warm-up requested ${what} once (all 200, in ${seconds.toFixed(1)} s) before measuring`] };
    },
    async measure({ server, opts }) {
      // Ends 5 s before the first user the warm-up requested could leave the auth cache.
      const left = Math.floor(TENANTS_AUTH_CACHE_TTL_S - (performance.now() - firstTouchAt) / 1000 - 5);
      const durationS = Math.max(1, Math.min(opts.durationS, left));
      const measurement = await load(server.baseUrl, request, { connections: opts.connections, durationS });
      const sinceFirst = (performance.now() - firstTouchAt) / 1000;
      const notes = [
        `measured ${durationS} s${durationS < opts.durationS ? ` (cut short: the auth cache keeps a user ${TENANTS_AUTH_CACHE_TTL_S} s here)` : ''}, ` +
          `ending ${sinceFirst.toFixed(1)} s after the warm-up requested its first user`,
      ];
      if (sinceFirst > TENANTS_AUTH_CACHE_TTL_S) {
        notes.push(`that is longer than the auth cache keeps a user here (${TENANTS_AUTH_CACHE_TTL_S} s): part of the run looked users up again`);
      }
      return { measurement, notes };
    },
    check: served,
  };
}

const seededAdmin = SEED.users.find((u) => u.email === 'admin@acme.com')!;
const mainOwner = () => headersOf(users('main')[0]!);

const cases: BenchCase[] = [
  {
    id: 'ref',
    title: 'reference: bare Fastify, GET /',
    program: 'reference',
    env: {},
    request: { path: '/' },
    check: someSuccess,
  },
  {
    id: 'health',
    title: 'GET /health, anonymous',
    env: {},
    request: { path: '/health' },
    check: served,
  },
  {
    id: 'me',
    title: 'GET /v1/me, auth + limits',
    env: {},
    request: () => ({ path: '/v1/me', headers: mainOwner() }),
    probe: probeAs(mainOwner, '/v1/me', [200], NEVER_REFUSES),
    check: served,
  },
  {
    id: 'users',
    title: 'GET /v1/users, a page of 20',
    env: {},
    request: () => ({ path: '/v1/users', headers: mainOwner() }),
    probe: probeAs(mainOwner, '/v1/users', [200], NEVER_REFUSES, (json) => {
      const page = json as { data?: unknown[]; nextCursor?: unknown };
      return page.data?.length === 20 && typeof page.nextCursor === 'string'
        ? []
        : [`expected 20 users and a next cursor, got ${page.data?.length ?? 'no'} users and cursor ${String(page.nextCursor)}`];
    }),
    check: served,
  },
  {
    id: 'refused',
    title: 'GET /v1/me, org over its limit',
    env: {},
    request: () => ({ path: '/v1/me', headers: headersOf(users('refused')[0]!) }),
    // The probe takes the bucket's one token (200), or finds it spent by an earlier run against the
    // same Redis (429): either way every request after it is refused.
    probe: probeAs(() => headersOf(users('refused')[0]!), '/v1/me', [200, 429], effectiveLimits(NEVER_REFUSES, REFUSED_LIMITS)),
    check: (m) => (m.status['429'] === 0 ? ['no 429 at all: the org was not over its limit'] : []),
  },
  {
    id: 'noisy',
    title: `noisy neighbour: org B at ${NOISY_B_RATE} req/s`,
    env: {},
    request: { path: '/v1/me', headersPerRequest: anyUserOf('noisy-b') },
    fixedRate: true,
    async probe(server) {
      return [
        ...(await probeAs(anyUserOf('noisy-a'), '/v1/me', [200, 429], effectiveLimits(NEVER_REFUSES, NOISY_A_LIMITS))(server)),
        ...(await probeAs(anyUserOf('noisy-b'), '/v1/me', [200], NEVER_REFUSES)(server)),
      ];
    },
    async warmup({ server, opts }) {
      if (opts.warmupS > 0) await noisyLoads(server, opts, opts.warmupS);
      return {};
    },
    async measure({ server, opts }) {
      const { a, b } = await noisyLoads(server, opts, opts.durationS);
      const got = b.requestsPerSecond.mean;
      return {
        measurement: b,
        parts: [{ label: `org A flooding, ${opts.connections} connections`, measurement: a }],
        notes:
          got < NOISY_B_RATE * 0.9
            ? [`org B got ${fmt(got)} of its ${NOISY_B_RATE} req/s: its requests waited behind A's long enough that its connections could not keep the rate`]
            : [],
      };
    },
    check: (b, run) => {
      const problems: string[] = [];
      const otherErrors = b.errors + b.status.otherNon2xx;
      if (b.status['2xx'] === 0) problems.push('org B got no 2xx response');
      if (b.status['429'] > 0) problems.push(`org B got ${b.status['429']} responses 429 while org A flooded`);
      if (otherErrors > 0) problems.push(`org B got ${otherErrors} errors (${b.errors} connection errors or timeouts, statuses ${JSON.stringify(b.status.byCode)})`);
      const a = run.parts?.[0]?.measurement;
      if (a && a.status['429'] === 0) problems.push('org A was never refused: it was not over its limit');
      return problems;
    },
  },
  tenantsCase('t10', 't10', `${GROUPS.t10.orgs} tenants x ${GROUPS.t10.usersPerOrg} users, random user`),
  tenantsCase('t10k', 't10k', `${fmt(GROUPS.t10k.orgs)} tenants x ${GROUPS.t10k.usersPerOrg} users, random user`),
  {
    id: 'embedded',
    title: 'embedded: GET /v1/me (PGlite, memory limiter)',
    env: {},
    // A fresh DATA_DIR each time: the startup includes creating the database, migrations and seed.
    backends: () => ({ database: { kind: 'pglite', dataDir: makeTempDir('llm-app-bench-pglite-') }, redisUrl: null }),
    // The seeded admin: this database is a temporary folder that nobody keeps.
    request: { path: '/v1/me', headers: { 'x-org-id': seededAdmin.orgId, 'x-user-id': seededAdmin.id } },
    probe: probeAs(() => ({ 'x-org-id': seededAdmin.orgId, 'x-user-id': seededAdmin.id }), '/v1/me', [200], NEVER_REFUSES),
    check: served,
  },
];

/** Org A floods with every connection while org B sends its fixed rate, at the same time. */
async function noisyLoads(server: ServerHandle, opts: BenchOptions, durationS: number): Promise<{ a: Measurement; b: Measurement }> {
  const [a, b] = await Promise.all([
    load(server.baseUrl, { path: '/v1/me', headersPerRequest: anyUserOf('noisy-a') }, { connections: opts.connections, durationS }),
    load(
      server.baseUrl,
      { path: '/v1/me', headersPerRequest: anyUserOf('noisy-b') },
      { connections: NOISY_B_CONNECTIONS, durationS, overallRate: NOISY_B_RATE },
    ),
  ]);
  return { a, b };
}

// ---------------------------------------------------------------------------------------------
// After the table: the embedded start-up, the notes, and the targets

function targetLines(results: CaseResult[], opts: BenchOptions): string[] {
  const by = (id: string) => results.find((r) => r.id === id);
  const verdict = (met: boolean | null) => (met === null ? 'n/a' : met ? 'met' : 'NOT MET');
  const x = (v: number | null | undefined) => (v === null || v === undefined ? 'n/a' : `${v.toFixed(2)}x`);
  const lines: string[] = [];

  const me = by('me');
  const meMet = me?.ratioToReference != null && me.p99RatioToReference != null ? me.ratioToReference >= 0.6 && me.p99RatioToReference < 3 : null;
  lines.push(
    `  /v1/me with auth and limits: ${x(me?.ratioToReference)} the reference's req/s (target >= 0.60x), ` +
      `p99 ${x(me?.p99RatioToReference)} the reference's (target < 3x): ${verdict(meMet)}`,
  );

  const t10 = by('t10')?.measurement;
  const t10k = by('t10k');
  const tenantsRatio = t10 && t10k?.measurement && t10.requestsPerSecond.mean > 0 ? t10k.measurement.requestsPerSecond.mean / t10.requestsPerSecond.mean : null;
  // With several rounds: the highest RSS of them, not the median round's.
  const rss = t10k?.rounds ? t10k.rounds.rssMbMax : (t10k?.rssMb ?? null);
  const tenantsMet = tenantsRatio !== null && rss !== null ? tenantsRatio >= 0.9 && rss < 200 : null;
  lines.push(
    `  10,000 tenants: ${x(tenantsRatio)} the 10-tenant req/s (target >= 0.90x), server RSS ${rss === null ? 'n/a' : `${rss.toFixed(0)} MB`}` +
      `${t10k?.rounds ? ' (the highest of the rounds)' : ''} (target < 200 MB): ${verdict(tenantsMet)}`,
  );

  const refused = by('refused');
  lines.push(
    `  refused requests: ${x(refused?.ratioToReference)} the reference's req/s (target >= 0.80x): ` +
      `${verdict(refused?.ratioToReference != null ? refused.ratioToReference >= 0.8 : null)}`,
  );

  // With several rounds: org B's 429s and errors in all of them together.
  const noisy = by('noisy');
  const b = noisy?.measurement;
  const b429 = noisy?.rounds ? noisy.rounds.status429 : b ? b.status['429'] : null;
  const bErrors = noisy?.rounds ? noisy.rounds.errors : b ? b.errors + b.status.otherNon2xx : null;
  lines.push(
    `  noisy neighbour: org B got ${b429 === null ? 'n/a' : fmt(b429)} 429s and ${bErrors === null ? 'n/a' : fmt(bErrors)} errors` +
      `${noisy?.rounds ? ` (in all ${noisy.rounds.count} rounds)` : ''} (target: none of either): ${verdict(b429 !== null && bErrors !== null ? b429 === 0 && bErrors === 0 : null)}`,
  );
  return [
    `Targets${opts.quick ? ' (a --quick run only proves that the benchmark runs: its figures are not a measurement)' : ''}:`,
    ...lines,
  ];
}

function footer(results: CaseResult[], _backends: unknown, opts: BenchOptions): string[] {
  const embedded = results.find((r) => r.id === 'embedded');
  const out: string[] = [''];
  if (embedded) {
    out.push(
      `Embedded default: ${embedded.command || 'the server'} with a fresh DATA_DIR (PGlite created, migrated, seeded) answered 200 on /health ` +
        `${embedded.startupMs === null ? '(it did not start)' : `${fmt(embedded.startupMs)} ms after it was spawned`}` +
        ` (npm start runs the same command; npm itself adds its own start-up).`,
    );
  }
  out.push(
    `Noisy neighbour: org A floods past its own limit (${NOISY_A_LIMITS.orgPerSecond}/s), org B sends ${NOISY_B_RATE} req/s over ${NOISY_B_CONNECTIONS} connections; both at once against one server.`,
  );
  for (const r of results) for (const note of r.notes) out.push(`${r.title}: ${note}`);
  out.push('', ...targetLines(results, opts), '');
  return out;
}

// ---------------------------------------------------------------------------------------------

const code = await runBenchmark({
  name: 'app',
  title: 'llm-app against bare Fastify',
  // The org limiter is on for every org, far above what a run reaches, except where an org has
  // its own limits (the refused org and the noisy org A).
  commonEnv: { ...BENCH_SERVER_ENV, ...limitEnv(NEVER_REFUSES) },
  cases,
  referenceId: 'ref',
  envHelp: ENV_HELP,
  buildIfStale: true,
  backends: appBackends,
  async prepare(backends) {
    if (backends.database.kind !== 'postgres') throw new Error('the bench data needs PostgreSQL');
    log(`  creating or checking the bench data in ${redact(backends.database.url)} ...`);
    const { data, summary } = await ensureBenchData<Group>(backends.database.url, {
      refused: REFUSED_LIMITS,
      'noisy-a': NOISY_A_LIMITS,
    });
    benchData = data;
    return [summary];
  },
  rowLabel: (r) => r.title,
  redisRoundTrips: ['evalsha', 'eval', 'zrem'],
  footer,
});
process.exit(code);
