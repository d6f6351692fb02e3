/**
 * `npm run org:limits -- <org-slug> [--burst N] [--per-second N] [--user-burst N]
 *   [--user-per-second N] [--daily-cap N] [--monthly-cap N] [--max-concurrent N] [--reset]`
 *
 * Sets an org's own limits (0 = no limit; the word `default` returns one field to the
 * environment's default; --reset returns all of them) and prints the limits now in force.
 * Every instance applies a change from its next request on.
 */
import { parseArgs } from 'node:util';
import { loadCliConfig } from '../config/env.js';
import { createDatabase } from '../infra/database.js';
import { createLogger } from '../infra/logger.js';
import { findOrgBySlug } from '../models/org.model.js';
import {
  clearOrgLimitOverrides,
  effectiveLimits,
  findOrgLimitOverrides,
  setOrgLimitOverrides,
  type OrgLimitOverrides,
} from '../models/orgLimits.model.js';
import type { OrgLimits } from '../ratelimit/index.js';
import { runAsProgram } from './run.js';

const OPTIONS: Record<string, { field: keyof OrgLimits; integer: boolean }> = {
  burst: { field: 'orgBurst', integer: true },
  'per-second': { field: 'orgPerSecond', integer: false },
  'user-burst': { field: 'userBurst', integer: true },
  'user-per-second': { field: 'userPerSecond', integer: false },
  'daily-cap': { field: 'dailyCap', integer: true },
  'monthly-cap': { field: 'monthlyCap', integer: true },
  'max-concurrent': { field: 'maxConcurrent', integer: true },
};

const USAGE = `usage: npm run org:limits -- <org-slug> [${Object.keys(OPTIONS)
  .map((o) => `--${o} N|default`)
  .join('] [')}] [--reset]`;

export class UsageError extends Error {}

/** Parses the command line into a slug and the changes, or throws UsageError naming every problem. */
export function parseOrgLimitsArgs(argv: string[]): { slug: string; changes: OrgLimitOverrides; reset: boolean } {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      strict: true,
      options: {
        ...Object.fromEntries(Object.keys(OPTIONS).map((o) => [o, { type: 'string' as const }])),
        reset: { type: 'boolean' },
      },
    });
  } catch (err) {
    throw new UsageError(`${(err as Error).message}\n${USAGE}`);
  }
  const problems: string[] = [];
  if (parsed.positionals.length !== 1) problems.push('give exactly one org slug');
  const changes: OrgLimitOverrides = {};
  for (const [name, { field, integer }] of Object.entries(OPTIONS)) {
    const raw = (parsed.values as Record<string, string | boolean | undefined>)[name];
    if (typeof raw !== 'string') continue;
    if (raw === 'default') {
      changes[field] = null;
      continue;
    }
    const n = Number(raw);
    const ok = (integer ? /^\d+$/ : /^\d+(\.\d+)?$/).test(raw) && Number.isFinite(n) && n <= Number.MAX_SAFE_INTEGER;
    if (!ok) problems.push(`--${name}: must be ${integer ? 'a whole number' : 'a number'} >= 0 or "default" (got "${raw}")`);
    else changes[field] = n;
  }
  const reset = parsed.values.reset === true;
  if (reset && Object.keys(changes).length > 0) problems.push('--reset cannot be combined with other options');
  if (problems.length > 0) throw new UsageError(`${problems.join('\n')}\n${USAGE}`);
  return { slug: parsed.positionals[0]!, changes, reset };
}

async function main(argv: string[]): Promise<number> {
  let args;
  try {
    args = parseOrgLimitsArgs(argv);
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`${err.message}\n`);
      return 2;
    }
    throw err;
  }
  const config = loadCliConfig();
  if (!config) return 1;
  const logger = createLogger({ ...config, logLevel: 'warn' });
  const db = await createDatabase(config.database, logger);
  try {
    const org = await findOrgBySlug(db, args.slug);
    if (!org) {
      process.stderr.write(`No organization with slug "${args.slug}"\n`);
      return 1;
    }
    let overrides: OrgLimitOverrides;
    if (args.reset) {
      await clearOrgLimitOverrides(db, org.id);
      overrides = {};
    } else if (Object.keys(args.changes).length > 0) {
      overrides = await setOrgLimitOverrides(db, org.id, args.changes);
    } else {
      overrides = await findOrgLimitOverrides(db, org.id);
    }
    const report = {
      org: { id: org.id, slug: org.slug, name: org.name },
      overrides,
      effective: effectiveLimits(config.rateLimit.defaults, overrides),
    };
    process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
    return 0;
  } finally {
    await db.close();
  }
}

await runAsProgram(import.meta.url, 'Cannot update the limits', main);
