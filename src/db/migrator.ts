import { createHash } from 'node:crypto';
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Logger } from 'pino';
import { isUnavailableError, type Database } from '../infra/database.js';

/**
 * Applies src/db/migrations/NNN_name.sql in order. Written here rather than taken from a library
 * because none of the maintained runners gives all of: the NNN_name.sql file names the project
 * uses (postgrator needs NNN.do.name.sql), a query function that serves both pg and PGlite
 * (node-pg-migrate needs a pg client), checksums of applied files, and a lock between runners.
 *
 * Each file runs in its own transaction that first takes a transaction-level advisory lock and
 * re-reads what is applied, so several processes migrating at once apply every file exactly once.
 * A file edited after it was applied stops the run before anything else happens.
 */

export const MIGRATIONS_DIR = fileURLToPath(new URL('./migrations/', import.meta.url));

// Arbitrary constant shared by every llm-app process: the advisory lock that serialises runners.
const MIGRATION_LOCK_KEY = 4_242_001;
const FILE_PATTERN = /^(\d{3,})_([a-z0-9_]+)\.sql$/;

export interface MigrationFile {
  version: number;
  name: string;
  filename: string;
  checksum: string;
  sql: string;
}

export class MigrationError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'MigrationError';
  }
}

export async function readMigrations(dir: string = MIGRATIONS_DIR): Promise<MigrationFile[]> {
  const entries = (await readdir(dir)).filter((f) => f.endsWith('.sql')).sort();
  const files: MigrationFile[] = [];
  const seen = new Map<number, string>();
  for (const filename of entries) {
    const m = FILE_PATTERN.exec(filename);
    if (!m) {
      throw new MigrationError(`Migration file name "${filename}" does not match NNN_lowercase_name.sql`);
    }
    const version = Number(m[1]);
    const clash = seen.get(version);
    if (clash) throw new MigrationError(`Two migration files have version ${version}: ${clash} and ${filename}`);
    seen.set(version, filename);
    // Line endings are normalised so a checkout with CRLF does not look like an edit.
    const sql = (await readFile(path.join(dir, filename), 'utf8')).replace(/\r\n/g, '\n');
    files.push({ version, name: m[2] ?? '', filename, sql, checksum: createHash('sha256').update(sql).digest('hex') });
  }
  return files.sort((a, b) => a.version - b.version);
}

interface AppliedRow {
  version: number;
  name: string;
  checksum: string;
}

export interface MigrateResult {
  applied: MigrationFile[];
}

export async function migrate(db: Database, logger: Logger, dir: string = MIGRATIONS_DIR): Promise<MigrateResult> {
  const files = await readMigrations(dir);
  const applied: MigrationFile[] = [];
  let warnedUnknown = false;
  for (;;) {
    const next = await db.transaction(async (tx) => {
      await tx.query('SELECT pg_advisory_xact_lock($1)', [MIGRATION_LOCK_KEY]);
      await tx.exec(`CREATE TABLE IF NOT EXISTS schema_migrations (
        version    INTEGER PRIMARY KEY,
        name       TEXT NOT NULL,
        checksum   TEXT NOT NULL,
        applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
      )`);
      const { rows } = await tx.query<AppliedRow>('SELECT version, name, checksum FROM schema_migrations ORDER BY version');
      const byVersion = new Map(rows.map((r) => [r.version, r]));
      for (const file of files) {
        const row = byVersion.get(file.version);
        if (row && row.checksum !== file.checksum) {
          throw new MigrationError(
            `Migration ${file.filename} was changed after it was applied (checksum ${file.checksum.slice(0, 12)}… ` +
              `differs from the applied ${row.checksum.slice(0, 12)}…). Migrations are append-only: restore the file ` +
              `and put the change in a new migration.`,
          );
        }
      }
      const unknown = rows.filter((r) => !files.some((f) => f.version === r.version));
      if (unknown.length > 0 && !warnedUnknown) {
        warnedUnknown = true;
        // A newer release migrated this database (rolling deploy): not an error for this process.
        logger.warn({ versions: unknown.map((r) => r.version) }, 'Database has migrations this release does not know');
      }
      const pending = files.find((f) => !byVersion.has(f.version));
      if (!pending) return null;
      try {
        await tx.exec(pending.sql);
      } catch (err) {
        if (isUnavailableError(err)) throw err;
        throw new MigrationError(`Migration ${pending.filename} failed: ${(err as Error).message}`, { cause: err });
      }
      await tx.query('INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)', [
        pending.version,
        pending.name,
        pending.checksum,
      ]);
      return pending;
    });
    if (!next) break;
    logger.info({ migration: next.filename }, 'Applied migration');
    applied.push(next);
  }
  return { applied };
}
