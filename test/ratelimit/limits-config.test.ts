import { spawn } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { parseOrgLimitsArgs, UsageError } from '../../src/cli/orgLimits.js';
import { ConfigError, loadConfig } from '../../src/config/env.js';
import { findOrgLimitOverrides } from '../../src/models/orgLimits.model.js';
import { createTenant } from '../helpers/app.js';
import { getTestDb, onPostgres, testDatabaseUrl } from '../helpers/db.js';
import { REPO_ROOT } from '../helpers/process.js';

function problemsOf(env: Record<string, string>): string[] {
  try {
    loadConfig(env, { isTty: false });
  } catch (err) {
    if (err instanceof ConfigError) return [...err.problems];
    throw err;
  }
  throw new Error(`expected ${JSON.stringify(env)} to be refused`);
}

describe('limit settings in the environment', () => {
  it('has the documented defaults, and no Redis unless REDIS_URL is set', () => {
    const c = loadConfig({}, { isTty: false });
    expect(c.redis).toBeNull();
    expect(c.rateLimit.defaults).toEqual({
      orgBurst: 200,
      orgPerSecond: 100,
      userBurst: 50,
      userPerSecond: 20,
      dailyCap: 100_000,
      monthlyCap: 2_000_000,
      maxConcurrent: 50,
    });
    expect(c.rateLimit.ipPerMinute).toBe(600);
    expect(loadConfig({ REDIS_URL: 'redis://127.0.0.1:6379', REDIS_CLUSTER: 'true' }).redis).toEqual({
      url: 'redis://127.0.0.1:6379',
      cluster: true,
      commandTimeoutMs: 250,
    });
  });

  it.each([
    ['ORG_RATE_LIMIT_BURST', '-1'],
    ['ORG_RATE_LIMIT_BURST', '1.5'],
    ['ORG_RATE_LIMIT_PER_SECOND', 'fast'],
    ['USER_RATE_LIMIT_BURST', 'x'],
    ['USER_RATE_LIMIT_PER_SECOND', '-2'],
    ['ORG_DAILY_REQUEST_CAP', '1e3'],
    ['ORG_MONTHLY_REQUEST_CAP', ''.padEnd(30, '9')],
    ['ORG_MAX_CONCURRENT_REQUESTS', 'many'],
    ['IP_RATE_LIMIT_PER_MINUTE', '-5'],
    ['REDIS_URL', 'http://127.0.0.1:6379'],
    ['REDIS_URL', 'not a url'],
    ['REDIS_CLUSTER', 'yes'],
    ['REDIS_COMMAND_TIMEOUT_MS', '0'],
    ['RATE_LIMIT_FALLBACK_SHARE', '2'],
    ['RATE_LIMIT_FALLBACK_SHARE', '0'],
    ['USAGE_FLUSH_INTERVAL_MS', '10000'],
    ['LOAD_SHED_MAX_EVENT_LOOP_DELAY_MS', 'off'],
  ])('%s=%s is refused with a message naming it', (name, value) => {
    const problems = problemsOf({ [name]: value });
    expect(problems).toHaveLength(1);
    expect(problems[0]).toMatch(new RegExp(`^${name}: `));
  });

  it('accepts fractional refill rates and 0 as "no limit"', () => {
    const c = loadConfig({ ORG_RATE_LIMIT_PER_SECOND: '0.5', ORG_DAILY_REQUEST_CAP: '0' }, { isTty: false });
    expect(c.rateLimit.defaults.orgPerSecond).toBe(0.5);
    expect(c.rateLimit.defaults.dailyCap).toBe(0);
  });
});

describe('npm run org:limits: arguments', () => {
  it('reads a slug and the changes; "default" resets one field', () => {
    expect(parseOrgLimitsArgs(['acme-corp', '--burst', '100', '--per-second', '2.5', '--daily-cap', 'default'])).toEqual({
      slug: 'acme-corp',
      changes: { orgBurst: 100, orgPerSecond: 2.5, dailyCap: null },
      reset: false,
    });
    expect(parseOrgLimitsArgs(['acme-corp', '--reset'])).toEqual({ slug: 'acme-corp', changes: {}, reset: true });
  });

  it.each([
    [['acme-corp', '--burst', 'ten'], '--burst: must be a whole number'],
    [['acme-corp', '--burst', '1.5'], '--burst: must be a whole number'],
    [['acme-corp', '--per-second', '-1'], "'--per-second' argument is ambiguous"],
    [['acme-corp', '--daily-cap', '1e9'], '--daily-cap: must be a whole number'],
    [['acme-corp', '--colour', 'red'], "Unknown option '--colour'"],
    [['--burst', '5'], 'give exactly one org slug'],
    [['a', 'b'], 'give exactly one org slug'],
    [['acme-corp', '--reset', '--burst', '1'], '--reset cannot be combined'],
  ])('%j is refused: %s', (argv, message) => {
    let err: unknown;
    try {
      parseOrgLimitsArgs(argv);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(UsageError);
    expect((err as Error).message).toContain(message);
    expect((err as Error).message).toContain('usage: npm run org:limits');
  });
});

function runCli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli/orgLimits.ts', ...args], {
      cwd: REPO_ROOT,
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', DATABASE_URL: testDatabaseUrl ?? '', NODE_ENV: 'test' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

// The CLI is a separate process: it can share the test database only on PostgreSQL.
describe.skipIf(!onPostgres)('npm run org:limits: against the database', () => {
  it('sets, shows and resets an org own limits', async () => {
    const t = await createTenant();
    const set = await runCli([t.org.slug, '--burst', '7', '--per-second', '0.5', '--max-concurrent', '0']);
    expect(set.code, set.stderr).toBe(0);
    const report = JSON.parse(set.stdout);
    expect(report.org).toEqual({ id: t.org.id, slug: t.org.slug, name: t.org.name });
    expect(report.overrides).toEqual({ orgBurst: 7, orgPerSecond: 0.5, maxConcurrent: 0 });
    expect(report.effective).toMatchObject({ orgBurst: 7, orgPerSecond: 0.5, maxConcurrent: 0, userBurst: 50 });
    expect(await findOrgLimitOverrides(await getTestDb(), t.org.id)).toEqual({ orgBurst: 7, orgPerSecond: 0.5, maxConcurrent: 0 });

    const back = await runCli([t.org.slug, '--burst', 'default']);
    expect(JSON.parse(back.stdout).overrides).toEqual({ orgPerSecond: 0.5, maxConcurrent: 0 });

    const reset = await runCli([t.org.slug, '--reset']);
    expect(JSON.parse(reset.stdout).overrides).toEqual({});
    expect(await findOrgLimitOverrides(await getTestDb(), t.org.id)).toEqual({});
  });

  it('exits 2 on bad values and 1 on an unknown org, changing nothing', async () => {
    const t = await createTenant();
    const bad = await runCli([t.org.slug, '--burst', 'lots']);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toContain('--burst: must be a whole number');
    expect(await findOrgLimitOverrides(await getTestDb(), t.org.id)).toEqual({});
    const unknown = await runCli(['no-such-org-slug-x1', '--burst', '5']);
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toContain('No organization with slug "no-such-org-slug-x1"');
  });
});
