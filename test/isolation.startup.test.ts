import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checkTenantIsolation } from '../src/db/isolationCheck.js';
import { migrate } from '../src/db/migrator.js';
import { TENANT_ROLE } from '../src/db/tenancy.js';
import { createPostgresDatabase, type Database } from '../src/infra/database.js';
import { createOrg } from '../src/models/org.model.js';
import { buildTestApp } from './helpers/app.js';
import { onPostgres, silentLogger, testDatabaseUrl } from './helpers/db.js';
import { createScratchDatabase, type ScratchDatabase } from './helpers/migrationDb.js';
import { parseJsonLines, runTsScript } from './helpers/process.js';

/**
 * The server refuses to start when row-level security does not hold (checked on a database of its
 * own, broken on purpose), and the whole thing works for a database user that is not a superuser,
 * as on managed PostgreSQL: such a user owns the tables and still sees no tenant row by itself.
 */

describe('start-up refuses a database where the tenant role can get around row-level security', () => {
  let scratch: ScratchDatabase;
  beforeAll(async () => {
    scratch = await createScratchDatabase({ persisted: true });
    const db = await scratch.open();
    await migrate(db, silentLogger);
    // Two ways to open the wall, each only in this database: an unforced table, a table the role owns.
    await db.query('ALTER TABLE users NO FORCE ROW LEVEL SECURITY');
    await db.query(`ALTER TABLE org_usage OWNER TO ${TENANT_ROLE}`);
    await scratch.closeConnections();
  });
  afterAll(() => scratch?.drop());

  it('exits 1 before listening, naming every problem', async () => {
    const res = await runTsScript(
      'src/server.ts',
      { ...scratch.env, NODE_ENV: 'test', HOST: '127.0.0.1', PORT: '0', LOG_FORMAT: 'json', LOG_LEVEL: 'info' },
      { timeoutMs: 30_000 },
    );
    expect(res.code).toBe(1);
    const logs = parseJsonLines(res.stdout);
    expect(logs.some((l) => typeof l.msg === 'string' && l.msg.startsWith('llm-app listening'))).toBe(false);
    const fatal = logs.find((l) => l.level === 60);
    expect(fatal?.msg).toContain('Tenant isolation is not enforced by the database');
    expect(fatal?.problems).toEqual(
      expect.arrayContaining(['table users does not force row-level security', `role ${TENANT_ROLE} owns table org_usage (or has its owner's rights)`]),
    );
  });
});

describe.skipIf(!onPostgres)('a database user that is not a superuser (managed PostgreSQL)', () => {
  const suffix = randomBytes(5).toString('hex');
  const owner = `llm_app_rls_owner_${suffix}`;
  const dbName = `llm_app_rls_owner_${suffix}`;
  let admin: pg.Client;
  let db: Database;

  beforeAll(async () => {
    admin = new pg.Client({ connectionString: testDatabaseUrl });
    await admin.connect();
    // Names are generated here from hex digits only. CREATEROLE: the migration grants itself the
    // application roles (they exist already on this server, created by other databases' migrations).
    await admin.query(`CREATE ROLE ${owner} LOGIN CREATEROLE NOSUPERUSER NOBYPASSRLS`);
    await admin.query(`CREATE DATABASE ${dbName} OWNER ${owner}`);
    const url = new URL(testDatabaseUrl!);
    url.username = owner;
    url.password = '';
    url.pathname = `/${dbName}`;
    db = createPostgresDatabase(
      { kind: 'postgres', url: url.toString(), poolMax: 3, idleTimeoutMs: 10_000, connectionTimeoutMs: 5_000, statementTimeoutMs: 20_000 },
      silentLogger,
    );
    await migrate(db, silentLogger);
  });

  afterAll(async () => {
    await db?.close();
    await admin.query(`DROP DATABASE IF EXISTS ${dbName} WITH (FORCE)`);
    await admin.query(`DROP ROLE IF EXISTS ${owner}`);
    await admin.end();
  });

  it('migrates, passes the isolation check and serves tenants through the application roles', async () => {
    expect(await checkTenantIsolation(db)).toEqual([]);
    const org = await createOrg(db, { name: 'Managed', slug: `managed-${suffix}` });
    const app = await buildTestApp({ db });
    try {
      // The first user comes in through the system path, as an operator would add it.
      const { withSystem } = await import('../src/db/tenancy.js');
      const ownerId = await withSystem(db, async (tx) => {
        const { rows } = await tx.query<{ id: string }>(
          `INSERT INTO users (org_id, email, role) VALUES ($1, 'boss@example.test', 'owner') RETURNING id`,
          [org.id],
        );
        return rows[0]!.id;
      });
      const headers = { 'x-org-id': org.id, 'x-user-id': ownerId };
      const created = await app.inject({ method: 'POST', url: '/v1/users', headers, payload: { email: 'new@example.test' } });
      expect(created.statusCode).toBe(201);
      const list = await app.inject({ method: 'GET', url: '/v1/users', headers });
      expect(list.json<{ data: unknown[] }>().data).toHaveLength(2);
      const log = await app.inject({ method: 'GET', url: '/v1/audit-logs', headers });
      expect(log.json<{ data: { action: string }[] }>().data.map((e) => e.action)).toEqual(['user.created', 'org.created']);
    } finally {
      await app.close();
    }
  });

  it('the table owner itself sees no tenant row: FORCE ROW LEVEL SECURITY, and no policy for it', async () => {
    const own = await db.query<{ who: string; users: number; orgs: number }>(
      'SELECT current_user::text AS who, (SELECT count(*)::int FROM users) AS users, (SELECT count(*)::int FROM orgs) AS orgs',
    );
    expect(own.rows[0]).toEqual({ who: owner, users: 0, orgs: 0 });
    await expect(db.query(`INSERT INTO orgs (name, slug) VALUES ('Sneaky', 'sneaky-${suffix}')`)).rejects.toMatchObject({ code: '42501' });
  });
});
