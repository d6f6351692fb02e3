import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { queryAsTenant } from '../src/db/tenancy.js';
import type { Database } from '../src/infra/database.js';
import type * as UserModel from '../src/models/user.model.js';
import type { User } from '../src/models/user.model.js';
import { buildTestApp, createTenant, type TestTenant } from './helpers/app.js';
import { getTestDb } from './helpers/db.js';

/**
 * A build of the app whose user model forgets the org filter (the bug row-level security is
 * there for): the users list and the lookup by id lose `org_id = $1`. The routes still reach the
 * table only as the caller's tenant, so the second wall alone must keep org A out of org B's view.
 */

const UNFILTERED_LIST = `SELECT id, org_id, email, name, role, created_at, updated_at FROM users
                          WHERE deleted_at IS NULL ORDER BY seq LIMIT $1`;
const UNFILTERED_BY_ID = `SELECT id, org_id, email, name, role, created_at, updated_at FROM users
                           WHERE id = $1 AND deleted_at IS NULL`;

interface Row {
  id: string;
  org_id: string;
  email: string;
  name: string | null;
  role: User['role'];
  created_at: Date;
  updated_at: Date;
}
const toUser = (r: Row): User => ({
  id: r.id,
  orgId: r.org_id,
  email: r.email,
  name: r.name,
  role: r.role,
  createdAt: r.created_at.toISOString(),
  updatedAt: r.updated_at.toISOString(),
});

vi.mock('../src/models/user.model.js', async (importOriginal) => {
  const original = await importOriginal<typeof UserModel>();
  return {
    ...original,
    async listUsersInOrg(db: Database, orgId: string, opts: { limit: number }) {
      const { rows } = await queryAsTenant<Row>(db, orgId, UNFILTERED_LIST, [opts.limit]);
      return { users: rows.map(toUser), nextCursor: null };
    },
    async findUserInOrg(db: Database, orgId: string, userId: string) {
      const { rows } = await queryAsTenant<Row>(db, orgId, UNFILTERED_BY_ID, [userId]);
      return rows[0] ? toUser(rows[0]) : null;
    },
  };
});

let app: FastifyInstance;
let db: Database;
let a: TestTenant;
let b: TestTenant;

beforeAll(async () => {
  db = await getTestDb();
  app = await buildTestApp({ db });
  a = await createTenant(db);
  b = await createTenant(db);
});
afterAll(() => app.close());

describe('the org filter removed from the user model', () => {
  it('the same SQL without row-level security does return org A\u2019s users (so the build below really is broken)', async () => {
    const { rows } = await db.query<Row>(UNFILTERED_LIST, [100_000]);
    expect(rows.some((r) => r.org_id === a.org.id)).toBe(true);
    const byId = await db.query<Row>(UNFILTERED_BY_ID, [a.owner.id]);
    expect(byId.rows).toHaveLength(1);
  });

  it('GET /v1/users as org B still lists only org B\u2019s users', async () => {
    const res = await app.inject({ method: 'GET', url: '/v1/users?limit=100', headers: b.member.headers });
    expect(res.statusCode).toBe(200);
    const users = res.json<{ data: { id: string; orgId: string }[] }>().data;
    expect(users.map((u) => u.id).sort()).toEqual([b.owner.id, b.admin.id, b.member.id].sort());
    expect(res.body).not.toContain(a.org.id);
  });

  it('GET /v1/users/:id as org B with an org A id is still a 404', async () => {
    const res = await app.inject({ method: 'GET', url: `/v1/users/${a.owner.id}`, headers: b.member.headers });
    expect(res.statusCode).toBe(404);
    expect(res.body).not.toContain(a.owner.email);
    // And the same lookup of B's own user works, so the 404 is the wall, not a broken query.
    const own = await app.inject({ method: 'GET', url: `/v1/users/${b.owner.id}`, headers: b.member.headers });
    expect(own.statusCode).toBe(200);
  });
});
