import { randomBytes, randomUUID } from 'node:crypto';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { queryAsTenant, SYSTEM_ROLE, TENANT_ROLE, withSystem, withTenant } from '../src/db/tenancy.js';
import type { Database } from '../src/infra/database.js';
import { hashPassword } from '../src/auth/passwords.js';
import { recordAuditEvent, SYSTEM_ACTOR } from '../src/models/audit.model.js';
import { createSession } from '../src/models/session.model.js';
import { setOrgLimitOverrides } from '../src/models/orgLimits.model.js';
import { addUsage } from '../src/models/usage.model.js';
import { insertApiKey } from './helpers/apiKeys.js';
import { createTenant, type TestTenant } from './helpers/app.js';
import { tenantTables } from './helpers/catalog.js';
import { getTestDb, onPostgres, openTestDatabase, testDatabaseUrl } from './helpers/db.js';

/**
 * Row-level security on its own, at the database layer: as the tenant role with org B set, no
 * tenant table shows or accepts a row of org A, whatever the query says. The tables come from the
 * catalog, so a tenant table added later is covered (and must get rows here, or the first test fails).
 */

let db: Database;
let a: TestTenant;
let b: TestTenant;
let tables: string[];

const ident = (name: string) => pg.escapeIdentifier(name);
const orgColumn = (table: string) => (table === 'orgs' ? 'id' : 'org_id');

/** Rows in every tenant table for one org: users (createTenant, one with a password), limits, usage, audit entries, API keys, sessions. */
async function fillEveryTable(t: TestTenant): Promise<void> {
  await setOrgLimitOverrides(db, t.org.id, { orgBurst: 7 });
  await addUsage(db, { orgIds: [t.org.id], days: ['2026-01-02'], requests: [3] });
  await recordAuditEvent(db, t.org.id, { action: 'auth.failed', actor: SYSTEM_ACTOR });
  await insertApiKey(db, t.org.id, 'admin', t.owner.id);
  const passwordHash = await hashPassword(`fill-${randomUUID()}`);
  await db.query('UPDATE users SET password_hash = $3 WHERE org_id = $1 AND id = $2', [t.org.id, t.member.id, passwordHash]);
  const meta = { requestId: 'fill', ip: '127.0.0.1', userAgent: null };
  const session = await createSession(db, t.org.id, t.member.id, passwordHash, { tokenHash: randomBytes(32).toString('hex'), ttlSeconds: 60 }, meta);
  expect(session).not.toBeNull();
}

/** Every row of `table` as the connection's own (superuser) role: the view without RLS. */
async function countAsSuperuser(table: string, orgId: string): Promise<number> {
  const { rows } = await db.query<{ n: number }>(
    `SELECT count(*)::int AS n FROM ${ident(table)} WHERE ${orgColumn(table)} = $1`,
    [orgId],
  );
  return rows[0]!.n;
}

beforeAll(async () => {
  db = await getTestDb();
  a = await createTenant(db);
  b = await createTenant(db);
  await fillEveryTable(a);
  await fillEveryTable(b);
  tables = [...(await tenantTables(db)), 'orgs'];
});

describe('row-level security at the database layer', () => {
  it('both orgs have rows in every tenant table (so the checks below are not vacuous)', async () => {
    for (const table of tables) {
      expect({ table, a: (await countAsSuperuser(table, a.org.id)) > 0 }).toEqual({ table, a: true });
      expect({ table, b: (await countAsSuperuser(table, b.org.id)) > 0 }).toEqual({ table, b: true });
    }
  });

  it("as org B's tenant, every tenant table shows no row of org A, with or without an org filter", async () => {
    for (const table of tables) {
      const col = ident(orgColumn(table));
      const seen = await withTenant(db, b.org.id, async (tx) => {
        const all = await tx.query<{ org: string }>(`SELECT ${col}::text AS org FROM ${ident(table)}`);
        const asked = await tx.query(`SELECT 1 FROM ${ident(table)} WHERE ${col} = $1`, [a.org.id]);
        return { orgs: [...new Set(all.rows.map((r) => r.org))], askedForA: asked.rowCount };
      });
      expect({ table, ...seen }).toEqual({ table, orgs: [b.org.id], askedForA: 0 });
    }
  });

  it('with no org set, the tenant role sees no row of any tenant table', async () => {
    for (const setup of [
      { sql: `SELECT set_config('role', '${TENANT_ROLE}', true)` },
      { sql: `SELECT set_config('role', '${TENANT_ROLE}', true), set_config('app.org_id', '', true)` },
    ]) {
      for (const table of tables) {
        const n = await db.transaction(async (tx) => (await tx.query(`SELECT 1 FROM ${ident(table)}`)).rowCount, { setup });
        expect({ table, n }).toEqual({ table, n: 0 });
      }
    }
  });

  it("as org B's tenant, inserting a copy of an org A row into any tenant table fails", async () => {
    for (const table of tables) {
      // Every column a row can be given (identity and generated columns are the table's own).
      const { rows: cols } = await db.query<{ name: string }>(
        `SELECT attname AS name FROM pg_attribute
          WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped AND attidentity = '' AND attgenerated = ''
          ORDER BY attnum`,
        [table],
      );
      const list = cols.map((c) => ident(c.name)).join(', ');
      const { rows } = await db.query<{ row: Record<string, unknown> }>(
        `SELECT to_jsonb(t) AS row FROM ${ident(table)} t WHERE ${ident(orgColumn(table))} = $1 LIMIT 1`,
        [a.org.id],
      );
      const err = await withTenant(db, b.org.id, (tx) =>
        tx.query(`INSERT INTO ${ident(table)} (${list}) SELECT ${list} FROM jsonb_populate_record(NULL::${ident(table)}, $1)`, [
          JSON.stringify(rows[0]!.row),
        ]),
      ).then(
        () => null,
        (e: unknown) => e,
      );
      // 42501: "new row violates row-level security policy" (or no INSERT right at all).
      expect({ table, code: (err as { code?: string } | null)?.code }).toEqual({ table, code: '42501' });
    }
  });

  it('a brand-new user row for org A, written as org B, is refused by the policy itself', async () => {
    const err = await withTenant(db, b.org.id, (tx) =>
      tx.query(`INSERT INTO users (org_id, email, role) VALUES ($1, 'x@example.test', 'member')`, [a.org.id]),
    ).catch((e: unknown) => e as Error);
    expect(err).toMatchObject({ code: '42501', message: expect.stringContaining('row-level security') });
  });

  it("as org B's tenant, updates of org A rows change nothing", async () => {
    const before = await db.query('SELECT * FROM users WHERE org_id = $1 ORDER BY id', [a.org.id]);
    const changed = await withTenant(
      db,
      b.org.id,
      async (tx) => (await tx.query(`UPDATE users SET name = 'taken over' WHERE org_id = $1`, [a.org.id])).rowCount,
    );
    expect(changed).toBe(0);
    expect((await db.query('SELECT * FROM users WHERE org_id = $1 ORDER BY id', [a.org.id])).rows).toEqual(before.rows);
  });

  it("as org B's tenant, revoking org A's keys changes nothing; a tenant may change nothing of a key but revoked_at, and delete none", async () => {
    const revoked = await withTenant(
      db,
      b.org.id,
      async (tx) => (await tx.query('UPDATE api_keys SET revoked_at = now() WHERE org_id = $1', [a.org.id])).rowCount,
    );
    expect(revoked).toBe(0);
    expect((await db.query('SELECT 1 FROM api_keys WHERE org_id = $1 AND revoked_at IS NOT NULL', [a.org.id])).rowCount).toBe(0);
    for (const sql of [
      "UPDATE api_keys SET role = 'owner' WHERE org_id = $1",
      'UPDATE api_keys SET secret_hash = sha256(secret_hash) WHERE org_id = $1',
      'UPDATE api_keys SET last_used_at = now() WHERE org_id = $1',
      'DELETE FROM api_keys WHERE org_id = $1',
    ]) {
      const err = await withTenant(db, a.org.id, (tx) => tx.query(sql, [a.org.id])).catch((e: unknown) => e);
      expect({ sql, err }).toMatchObject({ sql, err: { code: '42501' } });
    }
  });

  it('the tenant role may read and append audit entries of its org, never change or remove them', async () => {
    for (const sql of [`UPDATE audit_logs SET action = 'user.deleted' WHERE org_id = $1`, 'DELETE FROM audit_logs WHERE org_id = $1']) {
      const err = await withTenant(db, a.org.id, (tx) => tx.query(sql, [a.org.id])).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: '42501', message: expect.stringContaining('permission denied') });
    }
  });

  it('nobody changes or removes audit entries, the table owner included', async () => {
    for (const sql of [
      `UPDATE audit_logs SET action = 'user.deleted' WHERE org_id = '${a.org.id}'`,
      `DELETE FROM audit_logs WHERE org_id = '${a.org.id}'`,
      'TRUNCATE audit_logs',
    ]) {
      await expect(db.query(sql)).rejects.toMatchObject({ code: '42501', message: expect.stringContaining('append-only') });
    }
  });

  it('the system role sees and writes every org', async () => {
    const orgs = await withSystem(db, async (tx) => {
      const { rows } = await tx.query<{ org_id: string }>('SELECT DISTINCT org_id FROM users WHERE org_id = ANY($1::uuid[])', [
        [a.org.id, b.org.id],
      ]);
      return rows.map((r) => r.org_id).sort();
    });
    expect(orgs).toEqual([a.org.id, b.org.id].sort());
  });

  it('a scope runs as its role, without superuser rights, and with the org it was given', async () => {
    const tenant = await withTenant(db, a.org.id, async (tx) => {
      const { rows } = await tx.query<{ who: string; su: string; org: string }>(
        "SELECT current_user::text AS who, current_setting('is_superuser') AS su, current_setting('app.org_id') AS org",
      );
      return rows[0];
    });
    expect(tenant).toEqual({ who: TENANT_ROLE, su: 'off', org: a.org.id });
    const single = await queryAsTenant<{ who: string }>(db, b.org.id, 'SELECT current_user::text AS who');
    expect(single.rows).toEqual([{ who: TENANT_ROLE }]);
    const system = await withSystem(db, async (tx) => (await tx.query<{ who: string }>('SELECT current_user::text AS who')).rows[0]);
    expect(system).toEqual({ who: SYSTEM_ROLE });
  });

  it('refuses an org id that is not a UUID before any SQL runs', () => {
    expect(() => withTenant(db, "x' OR true --", () => Promise.resolve())).toThrow(TypeError);
  });
});

describe('a pooled connection keeps nothing of a tenant transaction (pool of one connection)', () => {
  let single: Database;
  beforeAll(async () => {
    // PGlite is one connection already; on PostgreSQL a pool of exactly one.
    single = onPostgres ? await openTestDatabase(testDatabaseUrl, 1) : db;
  });
  afterAll(async () => {
    if (single !== db) await single.close();
  });

  // No org is either never set on this connection (null) or set and ended ('').
  const session = async () => {
    const { rows } = await single.query<{ who: string; org: string | null; su: string }>(
      "SELECT current_user::text AS who, current_setting('app.org_id', true) AS org, current_setting('is_superuser') AS su",
    );
    return { ...rows[0]!, org: rows[0]!.org ?? '' };
  };

  it('after a committed, a failed and a one-statement scope, the connection is back to its own user with no org', async () => {
    const own = await session();
    expect(own.who).not.toBe(TENANT_ROLE);
    await withTenant(single, a.org.id, (tx) => tx.query('SELECT 1 FROM users'));
    expect(await session()).toEqual(own);
    const boom = new Error('boom');
    await expect(
      withTenant(single, a.org.id, async (tx) => {
        await tx.query('SELECT 1 FROM users');
        throw boom;
      }),
    ).rejects.toBe(boom);
    expect(await session()).toEqual(own);
    await expect(queryAsTenant(single, b.org.id, 'SELECT no_such_column FROM users')).rejects.toMatchObject({ code: '42703' });
    expect(await session()).toEqual(own);
  });

  it('one-statement scopes: a failed setup stops the statement, a write commits, the settings end with it', async () => {
    const slug = `scope-${randomUUID().slice(0, 8)}`;
    const insert = "INSERT INTO orgs (name, slug) VALUES ('Scoped', $1)";
    // A setup that fails (a role that does not exist): the write after it must not happen.
    const bad = { sql: "SELECT set_config('role', 'llm_app_no_such_role', true)" };
    await expect(single.queryInTransaction(bad, insert, [slug])).rejects.toMatchObject({ code: '22023' });
    expect((await single.query('SELECT 1 FROM orgs WHERE slug = $1', [slug])).rowCount).toBe(0);
    // A setup that works, as the system role: the write is committed.
    const system = { sql: `SELECT set_config('role', '${SYSTEM_ROLE}', true)`, name: 'test_system_scope' };
    const done = await single.queryInTransaction(system, `${insert} RETURNING slug`, [slug], 'test_scoped_insert');
    expect(done.rows).toEqual([{ slug }]);
    expect((await single.query('SELECT 1 FROM orgs WHERE slug = $1', [slug])).rowCount).toBe(1);
    // The same names again on the same connection (bound, not parsed again), then the role is gone.
    const again = await single.queryInTransaction<{ who: string }>(system, 'SELECT current_user::text AS who', []);
    expect(again.rows).toEqual([{ who: SYSTEM_ROLE }]);
    expect((await session()).who).not.toBe(SYSTEM_ROLE);
  });

  it('alternating orgs on the one connection, each sees only its own rows', async () => {
    for (let i = 0; i < 20; i++) {
      const t = i % 2 === 0 ? a : b;
      const { rows } = await queryAsTenant<{ org_id: string }>(single, t.org.id, 'SELECT DISTINCT org_id FROM users');
      expect(rows).toEqual([{ org_id: t.org.id }]);
    }
  });

  it('a query that forgets its org filter still returns only the tenant\u2019s rows (the same SQL as the owner sees both orgs)', async () => {
    // The users list without `org_id = $1`: the second wall alone.
    const sql = 'SELECT id, org_id FROM users WHERE deleted_at IS NULL ORDER BY seq';
    const asTenant = await queryAsTenant<{ org_id: string }>(single, b.org.id, sql);
    expect(new Set(asTenant.rows.map((r) => r.org_id))).toEqual(new Set([b.org.id]));
    // Control: the connection's own superuser skips RLS, so the query really does reach org A's rows.
    const unscoped = await single.query<{ org_id: string }>(sql);
    expect(unscoped.rows.some((r) => r.org_id === a.org.id)).toBe(true);
  });
});

describe('concurrent tenant transactions', () => {
  it('never see each other\u2019s org, whatever the interleaving', async () => {
    const orgs = [a, b, a, b, a, b, a, b];
    const results = await Promise.all(
      orgs.map((t) =>
        withTenant(db, t.org.id, async (tx) => {
          const first = await tx.query<{ org_id: string }>('SELECT DISTINCT org_id FROM users');
          const second = await tx.query<{ org: string }>("SELECT current_setting('app.org_id') AS org");
          return { expected: t.org.id, users: first.rows.map((r) => r.org_id), setting: second.rows[0]!.org };
        }),
      ),
    );
    for (const r of results) expect(r).toEqual({ expected: r.expected, users: [r.expected], setting: r.expected });
  });

  it('a random org id that does not exist sees nothing at all', async () => {
    for (const table of tables) {
      const n = await withTenant(db, randomUUID(), async (tx) => (await tx.query(`SELECT 1 FROM ${ident(table)}`)).rowCount);
      expect({ table, n }).toEqual({ table, n: 0 });
    }
  });
});
