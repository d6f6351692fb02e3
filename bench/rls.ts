/**
 * The cost of tenant isolation in the database: the page of 20 users that GET /v1/users reads,
 * (a) as it was read before row-level security — the connection's own role, the org in the WHERE
 * clause only — and (b) as the app reads it now — queryAsTenant: the tenant role and app.org_id
 * set for the transaction, RLS policies applied, in one round trip. Same pool, same SQL text, same
 * org, alternated in rounds so that drift affects both alike.
 *
 *   npm run bench:rls [-- --duration 10 --rounds 3 --concurrency 16 --quick]
 *
 * Prints a table and writes bench/results/rls-<time>.json. Asserts nothing about speed.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pino } from 'pino';
import { migrate } from '../src/db/migrator.js';
import { createPostgresDatabase, type Database } from '../src/infra/database.js';
import { listUsersInOrg, USERS_PAGE_SQL } from '../src/models/user.model.js';
import { appBackends } from './backends.js';
import { ensureBenchData } from './data.js';
import { log, redact, REPO_ROOT } from './harness.js';

interface Options {
  durationS: number;
  rounds: number;
  concurrency: number;
  warmupS: number;
}

function parse(argv: string[]): Options {
  const opts: Options = { durationS: 10, rounds: 3, concurrency: 16, warmupS: 2 };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const next = () => {
      const v = Number(argv[++i]);
      if (!Number.isFinite(v) || v <= 0) throw new Error(`${arg} needs a positive number`);
      return v;
    };
    if (arg === '--duration') opts.durationS = next();
    else if (arg === '--rounds') opts.rounds = Math.floor(next());
    else if (arg === '--concurrency') opts.concurrency = Math.floor(next());
    else if (arg === '--quick') Object.assign(opts, { durationS: 1, rounds: 1, warmupS: 0.5 });
    else if (arg === '--help') {
      process.stdout.write(
        'npm run bench:rls [-- --duration S --rounds N --concurrency C --quick]\n' +
          'Environment: BENCH_DATABASE_URL or DATABASE_URL (else scripts/services-up.sh and its llm_app_bench database).\n',
      );
      process.exit(0);
    } else throw new Error(`unknown option ${arg} (--help lists them)`);
  }
  return opts;
}

interface Sample {
  queries: number;
  perSecond: number;
  p50us: number;
  p99us: number;
}

/** `concurrency` loops calling `fn` back to back for `seconds`; latencies in µs. */
async function measure(fn: () => Promise<unknown>, seconds: number, concurrency: number): Promise<Sample> {
  const latencies: number[] = [];
  const endAt = performance.now() + seconds * 1000;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() < endAt) {
        const t0 = performance.now();
        await fn();
        latencies.push((performance.now() - t0) * 1000);
      }
    }),
  );
  const elapsedS = (performance.now() - started) / 1000;
  latencies.sort((x, y) => x - y);
  const at = (q: number) => latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))] ?? 0;
  return { queries: latencies.length, perSecond: latencies.length / elapsedS, p50us: at(0.5), p99us: at(0.99) };
}

const opts = parse(process.argv.slice(2));
const { backends } = await appBackends(false);
if (backends.database.kind !== 'postgres') throw new Error('bench:rls needs PostgreSQL');
const url = backends.database.url;
log(`bench:rls on ${redact(url)}: ${opts.rounds} round(s) of ${opts.durationS} s per case, ${opts.concurrency} concurrent queries`);

const logger = pino({ level: 'warn' });
const db: Database = createPostgresDatabase(
  { kind: 'postgres', url, poolMax: opts.concurrency, idleTimeoutMs: 10_000, connectionTimeoutMs: 5_000, statementTimeoutMs: 5_000 },
  logger,
);
let code = 0;
try {
  await migrate(db, logger);
  const { data, summary } = await ensureBenchData(url, {}, ['main']);
  log(`  ${summary}`);
  const orgId = data.main[0]!.orgId;

  const cases = {
    plain: {
      title: 'a. no RLS: connection role, org in WHERE only',
      run: () => db.query(USERS_PAGE_SQL, [orgId, null, 21], 'bench_users_page_plain'),
    },
    rls: {
      title: 'b. RLS: queryAsTenant (role + app.org_id, one round trip)',
      run: () => listUsersInOrg(db, orgId, { limit: 20 }),
    },
  } as const;

  // Same answer both ways, or the comparison means nothing.
  const plainRows = (await cases.plain.run()).rows.length;
  const rlsRows = (await cases.rls.run()).users.length;
  if (plainRows !== 21 || rlsRows !== 20) throw new Error(`unexpected page sizes: plain ${plainRows} (expected 21), RLS ${rlsRows} (expected 20)`);

  const results: Record<keyof typeof cases, Sample[]> = { plain: [], rls: [] };
  for (let round = 1; round <= opts.rounds; round++) {
    const order = round % 2 === 1 ? (['plain', 'rls'] as const) : (['rls', 'plain'] as const);
    for (const id of order) {
      await measure(cases[id].run, opts.warmupS, opts.concurrency);
      const sample = await measure(cases[id].run, opts.durationS, opts.concurrency);
      results[id].push(sample);
      log(`  round ${round} ${id}: ${Math.round(sample.perSecond).toLocaleString('en-US')} queries/s, p50 ${Math.round(sample.p50us)} µs, p99 ${Math.round(sample.p99us)} µs`);
    }
  }

  const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]!;
  const summaryOf = (id: keyof typeof cases) => ({
    perSecond: median(results[id].map((s) => s.perSecond)),
    p50us: median(results[id].map((s) => s.p50us)),
    p99us: median(results[id].map((s) => s.p99us)),
  });
  const plain = summaryOf('plain');
  const rls = summaryOf('rls');
  const ratios = results.rls.map((s, i) => s.perSecond / results.plain[i]!.perSecond);
  const rows = [
    ['Case', 'queries/s', 'ratio', 'p50 µs', 'p99 µs'],
    [cases.plain.title, Math.round(plain.perSecond).toLocaleString('en-US'), '1.00x', String(Math.round(plain.p50us)), String(Math.round(plain.p99us))],
    [cases.rls.title, Math.round(rls.perSecond).toLocaleString('en-US'), `${(rls.perSecond / plain.perSecond).toFixed(2)}x`, String(Math.round(rls.p50us)), String(Math.round(rls.p99us))],
  ];
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  const line = (r: string[]) => `| ${r.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join(' | ')} |`;
  process.stdout.write(
    [line(rows[0]!), `| ${widths.map((w, c) => (c === 0 ? '-'.repeat(w) : `${'-'.repeat(w - 1)}:`)).join(' | ')} |`, ...rows.slice(1).map(line)].join('\n') +
      `\n\nRatio per round (b/a): ${ratios.map((r) => r.toFixed(2)).join(', ')}. Medians over rounds; ${opts.concurrency} concurrent queries, ${opts.durationS} s per case and round.\n`,
  );
  const dir = path.join(REPO_ROOT, 'bench', 'results');
  mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `rls-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
  writeFileSync(
    file,
    `${JSON.stringify({ options: opts, machine: { cpus: os.cpus().length, model: os.cpus()[0]?.model, loadavg: os.loadavg() }, results, ratios }, null, 2)}\n`,
  );
  log(`  results: ${path.relative(REPO_ROOT, file)}`);
} catch (err) {
  log(`FAILED: ${(err as Error).message}`);
  code = 1;
} finally {
  await db.close();
}
process.exit(code);
