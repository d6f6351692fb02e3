/**
 * Where the benchmarks' PostgreSQL and Redis come from: the environment (BENCH_DATABASE_URL or
 * DATABASE_URL, BENCH_REDIS_URL or REDIS_URL), else scripts/services-up.sh, whose PostgreSQL gets a
 * database of the benchmarks' own.
 */
import { spawnSync } from 'node:child_process';
import pg from 'pg';
import { log, nonEmpty, REPO_ROOT, type ResolvedBackends } from './harness.js';

const DATABASE_NAME_WHEN_STARTED = 'llm_app_bench';

// ---------------------------------------------------------------------------------------------
// Backends: PostgreSQL and Redis from the environment, or started with scripts/services-up.sh

export const ENV_HELP = `Environment:
  BENCH_DATABASE_URL or DATABASE_URL   PostgreSQL for the app (the run creates bench-* orgs and users in it)
  BENCH_REDIS_URL or REDIS_URL         Redis for the app
  Whichever is missing is started with scripts/services-up.sh (PostgreSQL database ${DATABASE_NAME_WHEN_STARTED});
  they keep running afterwards (scripts/services-down.sh stops them).`;

/** The database for the run on a server that scripts/services-up.sh started: one of its own. */
async function benchDatabaseOn(serverUrl: string): Promise<string> {
  const url = new URL(serverUrl);
  const client = new pg.Client({ connectionString: serverUrl, connectionTimeoutMillis: 10_000, statement_timeout: 30_000 });
  await client.connect();
  try {
    const { rowCount } = await client.query('SELECT 1 FROM pg_database WHERE datname = $1', [DATABASE_NAME_WHEN_STARTED]);
    // A fixed identifier, never input: CREATE DATABASE takes no parameters.
    if (rowCount === 0) await client.query(`CREATE DATABASE ${DATABASE_NAME_WHEN_STARTED}`);
  } finally {
    await client.end();
  }
  url.pathname = `/${DATABASE_NAME_WHEN_STARTED}`;
  return url.toString();
}

/** `needRedis: false`: only PostgreSQL is needed (redisUrl is then whatever the environment gives, or null). */
export async function appBackends(needRedis = true): Promise<ResolvedBackends> {
  let dbUrl = nonEmpty(process.env.BENCH_DATABASE_URL) ?? nonEmpty(process.env.DATABASE_URL);
  let redisUrl = nonEmpty(process.env.BENCH_REDIS_URL) ?? nonEmpty(process.env.REDIS_URL);
  const notes: string[] = [];
  if (!dbUrl || (needRedis && !redisUrl)) {
    const missing = [!dbUrl && 'PostgreSQL', !redisUrl && 'Redis'].filter(Boolean).join(' and ');
    log(`  no ${missing} in the environment: starting local services with scripts/services-up.sh ...`);
    // Its stdout is only "export NAME=value" lines; its progress goes to our stderr.
    const run = spawnSync('bash', ['scripts/services-up.sh'], {
      cwd: REPO_ROOT,
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'inherit'],
      timeout: 600_000,
    });
    if (run.status !== 0) throw new Error(`scripts/services-up.sh failed (status ${run.status ?? run.signal})`);
    const exported = Object.fromEntries([...run.stdout.matchAll(/^export (\w+)=(.*)$/gm)].map((m) => [m[1]!, m[2]!]));
    if (!dbUrl) {
      if (!exported.DATABASE_URL) throw new Error('scripts/services-up.sh printed no DATABASE_URL');
      dbUrl = await benchDatabaseOn(exported.DATABASE_URL);
      notes.push(`PostgreSQL started by scripts/services-up.sh, database ${DATABASE_NAME_WHEN_STARTED} (scripts/services-down.sh stops it)`);
    }
    if (needRedis && !redisUrl) {
      if (!exported.REDIS_URL) throw new Error('scripts/services-up.sh printed no REDIS_URL');
      redisUrl = exported.REDIS_URL;
      notes.push(`Redis started by scripts/services-up.sh (scripts/services-down.sh stops it)`);
    }
  }
  return { backends: { database: { kind: 'postgres', url: dbUrl }, redisUrl: redisUrl ?? null }, notes };
}

