import pino from 'pino';
import { migrate } from '../../src/db/migrator.js';
import { seed } from '../../src/db/seed.js';
import { createPgliteDatabase, createPostgresDatabase, type Database } from '../../src/infra/database.js';

/**
 * The suite runs against PostgreSQL when TEST_DATABASE_URL (or DATABASE_URL) is set, else against
 * an in-memory PGlite. One database per test file (worker), migrated and seeded once; tests make
 * their own orgs and users so they never depend on each other or on order.
 */
export const testDatabaseUrl: string | undefined = process.env.TEST_DATABASE_URL || process.env.DATABASE_URL || undefined;
export const onPostgres = testDatabaseUrl !== undefined;

export const silentLogger = pino({ level: process.env.TEST_LOG_LEVEL ?? 'silent' });

let shared: Promise<Database> | undefined;

export function openTestDatabase(url: string | undefined = testDatabaseUrl, poolMax = 5): Promise<Database> {
  return url
    ? Promise.resolve(
        createPostgresDatabase(
          { kind: 'postgres', url, poolMax, idleTimeoutMs: 10_000, connectionTimeoutMs: 2_000, statementTimeoutMs: 10_000 },
          silentLogger,
        ),
      )
    : createPgliteDatabase('memory://');
}

/** The database shared by the tests of this file: migrated and seeded. */
export function getTestDb(): Promise<Database> {
  shared ??= (async () => {
    const db = await openTestDatabase();
    await migrate(db, silentLogger);
    await seed(db);
    return db;
  })();
  return shared;
}

export async function closeTestDb(): Promise<void> {
  if (!shared) return;
  const db = await shared;
  shared = undefined;
  await db.close();
}
