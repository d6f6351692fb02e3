import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { createPgliteDatabase, createPostgresDatabase, type Database } from '../../src/infra/database.js';
import { silentLogger, testDatabaseUrl } from './db.js';

/**
 * A brand-new, empty database for tests that must see the schema being created (migrations, seed,
 * the db:migrate CLI). Never the shared test database.
 *
 * - PostgreSQL (TEST_DATABASE_URL set): `CREATE DATABASE llm_app_mig_<hex>` on the test server;
 *   every `open()` is a separate pool (a separate "process" for concurrency tests); `drop()` closes
 *   them and drops the database WITH (FORCE).
 * - PGlite: one instance, in memory or (persisted: true) in a temp folder that a child process can
 *   use through DATA_DIR. `open()` always returns that same instance: PGlite is one connection.
 */
export interface ScratchDatabase {
  readonly kind: 'postgres' | 'pglite';
  /** The variables that point a child process (server, db:migrate) at this database. */
  readonly env: Readonly<Record<string, string>>;
  /** A connection to it: a new pool on PostgreSQL, the one instance on PGlite. */
  open(): Promise<Database>;
  /** Closes what open() returned (a child process may then use a persisted PGlite folder). */
  closeConnections(): Promise<void>;
  /** Closes connections and deletes the database. Safe to call twice. */
  drop(): Promise<void>;
}

export async function createScratchDatabase(opts: { persisted?: boolean } = {}): Promise<ScratchDatabase> {
  return testDatabaseUrl ? createPostgresScratch(testDatabaseUrl) : createPgliteScratch(opts.persisted ?? false);
}

async function adminQuery(adminUrl: string, sql: string): Promise<void> {
  const client = new pg.Client({ connectionString: adminUrl, connectionTimeoutMillis: 5_000 });
  await client.connect();
  try {
    await client.query(sql);
  } finally {
    await client.end();
  }
}

async function createPostgresScratch(adminUrl: string): Promise<ScratchDatabase> {
  const name = `llm_app_mig_${randomBytes(6).toString('hex')}`;
  // The name is generated here from hex digits only, so it is safe to put in the statement.
  await adminQuery(adminUrl, `CREATE DATABASE ${name}`);
  const u = new URL(adminUrl);
  u.pathname = `/${name}`;
  const url = u.toString();
  const opened: Database[] = [];
  let dropped = false;
  const closeConnections = async () => {
    const all = opened.splice(0);
    await Promise.all(all.map((db) => db.close().catch(() => undefined)));
  };
  return {
    kind: 'postgres',
    env: { DATABASE_URL: url },
    async open() {
      const db = createPostgresDatabase(
        { kind: 'postgres', url, poolMax: 3, idleTimeoutMs: 10_000, connectionTimeoutMs: 5_000, statementTimeoutMs: 20_000 },
        silentLogger,
      );
      opened.push(db);
      return db;
    },
    closeConnections,
    async drop() {
      if (dropped) return;
      dropped = true;
      await closeConnections();
      await adminQuery(adminUrl, `DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
    },
  };
}

async function createPgliteScratch(persisted: boolean): Promise<ScratchDatabase> {
  const dataDir = persisted ? await mkdtemp(path.join(os.tmpdir(), 'llm-app-mig-')) : undefined;
  let instance: Promise<Database> | undefined;
  const closeConnections = async () => {
    const current = instance;
    instance = undefined;
    if (current) await (await current).close();
  };
  return {
    kind: 'pglite',
    get env(): Record<string, string> {
      // Without a folder another process would fall back to ./.data: refuse rather than touch it.
      if (!dataDir) throw new Error('An in-memory PGlite is not reachable from a child process: use { persisted: true }');
      return { DATA_DIR: dataDir };
    },
    open() {
      instance ??= createPgliteDatabase(dataDir ?? 'memory://');
      return instance;
    },
    closeConnections,
    async drop() {
      await closeConnections();
      if (dataDir) await rm(dataDir, { recursive: true, force: true });
    },
  };
}
