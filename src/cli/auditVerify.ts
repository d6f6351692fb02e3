/**
 * `npm run audit:verify -- [org-slug]`
 *
 * Walks the audit log's hash chain of one org (or of every org) from its first entry and prints
 * one line per org: its entry count and head hash, or the first broken link (an entry whose hash
 * does not match, or a missing entry). Exits 0 when every chain is whole, 1 otherwise, 2 on bad
 * arguments. Keep the printed head hashes somewhere else: they also reveal a removed tail later.
 */
import { parseArgs } from 'node:util';
import { loadCliConfig } from '../config/env.js';
import { createDatabase } from '../infra/database.js';
import { createLogger } from '../infra/logger.js';
import { orgsToVerify, verifyAuditChain, type ChainReport } from '../models/audit.model.js';
import { runAsProgram } from './run.js';

const USAGE = 'usage: npm run audit:verify -- [org-slug]';

export function describeReport(slug: string, r: ChainReport): string {
  if (!r.broken) return `ok      ${slug}: ${r.rows} ${r.rows === 1 ? 'entry' : 'entries'}, head ${r.head ?? '(empty)'}`;
  const b = r.broken;
  const what =
    b.reason === 'hash_mismatch'
      ? `its hash does not match its content and the previous hash (expected ${b.expected}, stored ${b.found})`
      : `an entry is missing before it (expected ${b.expected}, found ${b.found})`;
  return `BROKEN  ${slug}: first broken link at seq ${b.seq} (entry ${b.id}): ${what}; ${r.rows} entries before it verified`;
}

async function main(argv: string[]): Promise<number> {
  let positionals: string[];
  try {
    ({ positionals } = parseArgs({ args: argv, allowPositionals: true, strict: true, options: {} }));
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n${USAGE}\n`);
    return 2;
  }
  if (positionals.length > 1) {
    process.stderr.write(`give at most one org slug\n${USAGE}\n`);
    return 2;
  }
  const slug = positionals[0];
  const config = loadCliConfig();
  if (!config) return 1;
  const logger = createLogger({ ...config, logLevel: 'warn' });
  const db = await createDatabase(config.database, logger);
  try {
    const orgs = await orgsToVerify(db, slug);
    if (slug !== undefined && orgs.length === 0) {
      process.stderr.write(`No organization with slug "${slug}"\n`);
      return 1;
    }
    let broken = 0;
    for (const org of orgs) {
      const report = await verifyAuditChain(db, org.id);
      if (report.broken) broken++;
      process.stdout.write(`${describeReport(org.slug, report)}\n`);
    }
    if (broken > 0) process.stderr.write(`${broken} of ${orgs.length} audit chains are broken\n`);
    return broken > 0 ? 1 : 0;
  } finally {
    await db.close();
  }
}

// Run only as a program, not when a test imports describeReport.
await runAsProgram(import.meta.url, 'Cannot verify the audit log', main);
