/**
 * `npm run db:migrate`: applies pending migrations, then (outside production) the seed data.
 * Exit code 0 on success, 1 on any failure, with the reason on the log.
 */
import { loadCliConfig } from '../config/env.js';
import { createDatabase, DatabaseUnavailableError } from '../infra/database.js';
import type { DatabaseConfig } from '../config/env.js';
import { createLogger } from '../infra/logger.js';
import { migrate } from './migrator.js';
import { seed } from './seed.js';

async function main(): Promise<number> {
  const config = loadCliConfig();
  if (!config) return 1;
  const logger = createLogger({ ...config, logLevel: config.logLevel === 'debug' ? 'info' : config.logLevel });
  logger.info('Starting database migration...');
  const db = await createDatabase(config.database, logger);
  try {
    try {
      await db.query('SELECT 1');
    } catch (err) {
      const cause = err instanceof DatabaseUnavailableError ? err.cause : err;
      logger.error(
        { database: describeTarget(config.database), err: { code: (cause as { code?: unknown }).code, message: (cause as Error).message } },
        'Cannot connect to the database',
      );
      return 1;
    }
    logger.info({ database: describeTarget(config.database) }, 'Database connection established');
    const { applied } = await migrate(db, logger);
    logger.info({ applied: applied.map((m) => m.filename) }, 'Migration completed successfully');
    if (config.env !== 'production') {
      logger.info(await seed(db), 'Database seeded');
    }
    return 0;
  } catch (err) {
    logger.error({ err }, 'Migration failed');
    return 1;
  } finally {
    await db.close();
    await new Promise<void>((resolve) => logger.flush(() => resolve()));
  }
}

/** Where we connect, for messages: host, port and database, never the password. */
function describeTarget(db: DatabaseConfig): string {
  if (db.kind === 'pglite') return `embedded database in ${db.dataDir}`;
  const u = new URL(db.url);
  return `postgres ${u.hostname}:${u.port || '5432'}${u.pathname}`;
}

process.exitCode = await main();
