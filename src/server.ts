/**
 * Process entry: configuration -> database (+ migrations, isolation check) -> rate limiter -> app
 * -> listen.
 * SIGTERM/SIGINT: stop accepting connections, let in-flight requests finish (bounded by
 * SHUTDOWN_TIMEOUT_MS), close the database, exit 0. A second signal exits at once.
 */
import { setFlagsFromString } from 'node:v8';
import closeWithGrace from 'close-with-grace';
import { buildApp } from './app.js';
import { ConfigError, loadConfig, type Config } from './config/env.js';
import { checkTenantIsolation } from './db/isolationCheck.js';
import { migrate } from './db/migrator.js';
import { seed } from './db/seed.js';
import { createDatabase, type Database } from './infra/database.js';
import { createLogger } from './infra/logger.js';
import { createRateLimiter } from './ratelimit/index.js';

// V8 lets the old generation grow to up to 4x what survived the last full collection before it
// collects again. With 50,000 cached callers that is 150 MB of heap for 75 MB of live objects;
// a fixed factor of 2 held the server at 220-240 MB RSS instead of 290-335, for about 2 % more
// CPU per GET /v1/me, within the run-to-run spread (bench/README.md). Read by V8 at every
// collection, so setting it here covers `npm start` and `node dist/server.js` alike; a value
// given on the command line wins.
if (!process.execArgv.some((a) => a.startsWith('--heap-growing-percent'))) setFlagsFromString('--heap-growing-percent=100');

let config: Config;
try {
  config = loadConfig();
} catch (err) {
  if (err instanceof ConfigError) {
    process.stderr.write(`${err.message}\n`);
    process.exit(1);
  }
  throw err;
}

const logger = createLogger(config);
if (config.env === 'production' && config.auth.methods.includes('fake')) {
  logger.warn('ALLOW_FAKE_AUTH=true: anyone who can reach this server can act as any user of any organization');
}

let db: Database | undefined;
try {
  db = await createDatabase(config.database, logger);
  if (config.migrateOnStart) {
    const { applied } = await migrate(db, logger);
    if (applied.length > 0) logger.info({ applied: applied.map((m) => m.filename) }, 'Migrations applied');
    if (config.env !== 'production') await seed(db);
  }
  // Tenant isolation rests on row-level security: never serve with a role that can get around it.
  const problems = await checkTenantIsolation(db);
  if (problems.length > 0) {
    logger.fatal({ problems }, `Tenant isolation is not enforced by the database: ${problems.join('; ')}`);
    await db.close().catch(() => undefined);
    process.exit(1);
  }
} catch (err) {
  logger.fatal({ err }, 'Cannot prepare the database');
  await db?.close().catch(() => undefined);
  process.exit(1);
}

const rateLimiter = createRateLimiter(config, db, logger);
// Give Redis a moment, so the first requests are not limited in memory for want of a connection.
if (!(await rateLimiter.ready(3_000))) {
  logger.warn('Redis is not reachable yet: limiting in memory on this instance until it is');
}
const app = await buildApp({ config, db, limiter: rateLimiter.limiter, logger });

closeWithGrace({ delay: config.shutdownTimeoutMs, logger }, async ({ signal, err }) => {
  if (err) logger.error({ err }, 'Shutting down after an error');
  else logger.info({ signal }, 'Shutting down: finishing in-flight requests');
  await app.close();
  await rateLimiter.close(); // writes the last usage batch, so it goes before the database
  await db.close();
  logger.info('Shutdown complete');
});

try {
  await app.listen({ host: config.host, port: config.port });
  const address = app.server.address();
  const port = address && typeof address === 'object' ? address.port : config.port;
  logger.info({ database: config.database.kind, env: config.env, port }, `llm-app listening on http://${config.host}:${port}`);
} catch (err) {
  logger.fatal({ err }, 'Cannot listen');
  await rateLimiter.close();
  await db.close();
  process.exit(1);
}
