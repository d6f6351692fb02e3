import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { migrate } from '../src/db/migrator.js';
import { seed } from '../src/db/seed.js';
import type { Database } from '../src/infra/database.js';
import { getTestDb, silentLogger } from './helpers/db.js';
import { createScratchDatabase, type ScratchDatabase } from './helpers/migrationDb.js';

const ACME = '00000000-0000-0000-0000-000000000001';
const TECH = '00000000-0000-0000-0000-000000000002';

// The data of the product brief, with the fixed ids the README's curl examples use.
const EXPECTED_ORGS = [
  { id: ACME, name: 'Acme Corp', slug: 'acme-corp', deleted_at: null, metadata: {} },
  { id: TECH, name: 'Tech Startup Inc', slug: 'tech-startup', deleted_at: null, metadata: {} },
];
const EXPECTED_USERS = [
  { id: '00000000-0000-0000-0001-000000000001', org_id: ACME, email: 'admin@acme.com', role: 'admin' },
  { id: '00000000-0000-0000-0001-000000000002', org_id: ACME, email: 'user@acme.com', role: 'member' },
  { id: '00000000-0000-0000-0002-000000000001', org_id: TECH, email: 'founder@techstartup.com', role: 'owner' },
].map((u) => ({ ...u, name: expect.any(String) as unknown, deleted_at: null, metadata: {} }));

const orgColumns = 'SELECT id, name, slug, deleted_at, metadata FROM orgs';
const userColumns = 'SELECT id, org_id, email, name, role, deleted_at, metadata FROM users';

async function fullContents(db: Database) {
  return {
    orgs: (await db.query('SELECT * FROM orgs ORDER BY id')).rows,
    users: (await db.query('SELECT * FROM users ORDER BY id')).rows,
  };
}

describe('seed() on a fresh migrated database', () => {
  let scratch: ScratchDatabase;
  let db: Database;
  beforeAll(async () => {
    scratch = await createScratchDatabase();
    db = await scratch.open();
    await migrate(db, silentLogger);
  });
  afterAll(async () => {
    await scratch.drop();
  });

  it('creates exactly the orgs and users of the brief, with their fixed ids, and reports them', async () => {
    expect((await db.query('SELECT count(*)::int AS n FROM orgs')).rows).toEqual([{ n: 0 }]);

    const report = await seed(db);

    expect((await db.query(`${orgColumns} ORDER BY id`)).rows).toEqual(EXPECTED_ORGS);
    expect((await db.query(`${userColumns} ORDER BY id`)).rows).toEqual(EXPECTED_USERS);
    expect(report).toEqual({
      orgs: EXPECTED_ORGS.map(({ id, name, slug }) => ({ id, name, slug })),
      users: EXPECTED_USERS.map(({ id, email, role, org_id }) => ({ id, email, role, org_id })),
    });
  });

  it('seeding again changes nothing (full table contents, timestamps included) and reports the same', async () => {
    const before = await fullContents(db);
    expect(before.orgs).toHaveLength(2);
    expect(before.users).toHaveLength(3);

    const report = await seed(db);
    await seed(db);

    expect(await fullContents(db)).toEqual(before);
    expect(report.orgs.map((o) => o.id)).toEqual([ACME, TECH]);
    expect(report.users.map((u) => u.email)).toEqual(['admin@acme.com', 'user@acme.com', 'founder@techstartup.com']);
  });

  it('leaves seeded rows that were changed since alone', async () => {
    await db.query("UPDATE users SET name = 'Renamed' WHERE id = $1", [EXPECTED_USERS[1]!.id]);
    const before = await fullContents(db);

    await seed(db);

    expect(await fullContents(db)).toEqual(before);
    expect(before.users.find((u) => u.id === EXPECTED_USERS[1]!.id)?.name).toBe('Renamed');
  });
});

describe('the shared test database', () => {
  it('is seeded', async () => {
    const db = await getTestDb();
    // Other tests add their own orgs and users: look only at the seeded ids.
    const orgs = await db.query(`${orgColumns} WHERE id = ANY($1::uuid[]) ORDER BY id`, [[ACME, TECH]]);
    expect(orgs.rows).toEqual(EXPECTED_ORGS);
    const users = await db.query(`${userColumns} WHERE id = ANY($1::uuid[]) ORDER BY id`, [EXPECTED_USERS.map((u) => u.id)]);
    expect(users.rows).toEqual(EXPECTED_USERS);
  });
});
