import { randomBytes, randomUUID } from 'node:crypto';
import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ErrorCode } from '../src/errors.js';
import type { Database } from '../src/infra/database.js';
import { createOrg } from '../src/models/org.model.js';
import type { Role } from '../src/types/context.js';
import { addUser, buildTestApp, createTenant, randomSlug, type TestTenant, type TestUser } from './helpers/app.js';
import { getTestDb } from './helpers/db.js';
import { expectError, snapshotOrgUsers, withoutRequestId } from './helpers/securitySuite.js';

let app: FastifyInstance;
let db: Database;

beforeAll(async () => {
  db = await getTestDb();
  app = await buildTestApp({ db });
});
afterAll(() => app.close());

type Method = 'GET' | 'POST' | 'PATCH' | 'DELETE';

function call(caller: TestUser, method: Method, url: string, payload?: Record<string, unknown>): Promise<LightMyRequestResponse> {
  return app.inject({ method, url, headers: caller.headers, ...(payload ? { payload } : {}) });
}

const uniqueEmail = (prefix = 'user') => `${prefix}-${randomBytes(5).toString('hex')}@example.test`;
const ISO = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

interface UserDto {
  id: string;
  orgId: string;
  email: string;
  name: string | null;
  role: Role;
  createdAt: string;
  updatedAt: string;
}

interface UserRow {
  id: string;
  org_id: string;
  email: string;
  name: string | null;
  role: Role;
  created_at: Date;
  updated_at: Date;
  deleted_at: Date | null;
}

async function userRow(id: string): Promise<UserRow | undefined> {
  const { rows } = await db.query<UserRow>(
    'SELECT id, org_id, email, name, role, created_at, updated_at, deleted_at FROM users WHERE id = $1',
    [id],
  );
  return rows[0];
}

/** The API's view of a live user row: exactly these fields. */
function dtoOf(row: UserRow): UserDto {
  return {
    id: row.id,
    orgId: row.org_id,
    email: row.email,
    name: row.name,
    role: row.role,
    createdAt: row.created_at.toISOString(),
    updatedAt: row.updated_at.toISOString(),
  };
}

async function liveOwnerCount(orgId: string): Promise<number> {
  const { rows } = await db.query<{ n: number }>(
    "SELECT count(*)::int AS n FROM users WHERE org_id = $1 AND role = 'owner' AND deleted_at IS NULL",
    [orgId],
  );
  return rows[0]!.n;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

// ---------------------------------------------------------------------------------------------

describe('GET /v1/me and GET /v1/org', () => {
  it('GET /v1/me: exactly the caller as a User, for every role', async () => {
    const t = await createTenant(db);
    for (const caller of [t.owner, t.admin, t.member]) {
      const res = await call(caller, 'GET', '/v1/me');
      expect(res.statusCode).toBe(200);
      const row = (await userRow(caller.id))!;
      expect(res.json()).toEqual(dtoOf(row));
      expect(res.json()).toEqual({
        id: caller.id,
        orgId: t.org.id,
        email: caller.email,
        name: `Test ${caller.role}`,
        role: caller.role,
        createdAt: expect.stringMatching(ISO),
        updatedAt: expect.stringMatching(ISO),
      });
    }
  });

  it('GET /v1/org: exactly the caller\'s Org, metadata included', async () => {
    const metadata = { plan: 'pro', seats: 5, nested: { tags: ['a', 'b'], on: true } };
    const org = await createOrg(db, { name: 'Metadata Org', slug: randomSlug('meta'), metadata });
    const member = await addUser(db, org.id, 'member');
    const res = await call(member, 'GET', '/v1/org');
    expect(res.statusCode).toBe(200);
    expect(res.json()).toEqual({
      id: org.id,
      name: 'Metadata Org',
      slug: org.slug,
      metadata,
      createdAt: org.createdAt.toISOString(),
      updatedAt: org.updatedAt.toISOString(),
    });
  });

  it('GET /v1/org: each tenant sees its own org', async () => {
    const a = await createTenant(db);
    const b = await createTenant(db);
    expect((await call(a.member, 'GET', '/v1/org')).json<{ id: string }>().id).toBe(a.org.id);
    expect((await call(b.member, 'GET', '/v1/org')).json<{ id: string }>().id).toBe(b.org.id);
  });
});

// ---------------------------------------------------------------------------------------------

interface Page {
  data: UserDto[];
  nextCursor: string | null;
}

async function listPage(caller: TestUser, query: string): Promise<Page> {
  const res = await call(caller, 'GET', `/v1/users${query}`);
  expect({ status: res.statusCode, body: res.body }).toMatchObject({ status: 200 });
  const page = res.json<Page>();
  expect(Object.keys(page).sort()).toEqual(['data', 'nextCursor']);
  return page;
}

/** Walks every page with the given limit; returns the pages. */
async function allPages(caller: TestUser, limit: number): Promise<Page[]> {
  const pages: Page[] = [];
  let cursor: string | null = null;
  do {
    const page = await listPage(caller, `?limit=${limit}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`);
    pages.push(page);
    cursor = page.nextCursor;
    expect(pages.length).toBeLessThan(50);
  } while (cursor);
  return pages;
}

describe('GET /v1/users (cursor pagination)', () => {
  /** An org with exactly 7 users, in creation order. */
  let owner: TestUser;
  let created: UserDto[];

  beforeAll(async () => {
    const org = await createOrg(db, { name: 'Paged Org', slug: randomSlug('paged') });
    owner = await addUser(db, org.id, 'owner');
    created = [dtoOf((await userRow(owner.id))!)];
    for (let i = 0; i < 6; i++) {
      // PGlite's clock ticks in milliseconds: users created within one millisecond tie on
      // created_at, and ties are ordered by id. Spacing the creations makes creation order exact.
      await sleep(2);
      const res = await call(owner, 'POST', '/v1/users', { email: uniqueEmail('paged'), name: `Paged ${i}` });
      expect(res.statusCode).toBe(201);
      created.push(res.json<UserDto>());
    }
  });

  it('limit=3: three pages of 3, 3 and 1, every user exactly once, in creation order, nextCursor null at the end', async () => {
    const pages = await allPages(owner, 3);
    expect(pages.map((p) => p.data.length)).toEqual([3, 3, 1]);
    expect(pages.map((p) => p.nextCursor === null)).toEqual([false, false, true]);
    const listed = pages.flatMap((p) => p.data);
    expect(listed).toEqual(created);
    expect(new Set(listed.map((u) => u.id)).size).toBe(7);
  });

  it('the order is the database order (created_at, id), in both engines', async () => {
    const { rows } = await db.query<{ id: string }>(
      'SELECT id FROM users WHERE org_id = $1 AND deleted_at IS NULL ORDER BY created_at, id',
      [owner.orgId],
    );
    const listed = (await allPages(owner, 2)).flatMap((p) => p.data.map((u) => u.id));
    expect(listed).toEqual(rows.map((r) => r.id));
  });

  it('a limit equal to the number of users: one page, nextCursor null (no empty extra page)', async () => {
    const page = await listPage(owner, '?limit=7');
    expect(page.data).toEqual(created);
    expect(page.nextCursor).toBeNull();
  });

  it('limit=6: a page of 6 with a cursor, then a page of 1 with nextCursor null', async () => {
    const pages = await allPages(owner, 6);
    expect(pages.map((p) => p.data.length)).toEqual([6, 1]);
    expect(pages[1]!.nextCursor).toBeNull();
  });

  it('no limit: the default page holds all 7, nextCursor null', async () => {
    const page = await listPage(owner, '');
    expect(page.data).toEqual(created);
    expect(page.nextCursor).toBeNull();
  });

  it('limit=1 walks every user one at a time', async () => {
    const pages = await allPages(owner, 1);
    expect(pages.length).toBe(7);
    expect(pages.flatMap((p) => p.data)).toEqual(created);
  });

  it('out-of-range limits: 400 validation_failed', async () => {
    for (const limit of ['0', '101', '-1', '2.5', 'ten']) {
      const body = expectError(await call(owner, 'GET', `/v1/users?limit=${limit}`), 400, 'validation_failed');
      expect(body.details?.[0]?.field).toBe('querystring.limit');
    }
  });

  it('invalid cursors: 400 validation_failed on querystring.cursor', async () => {
    const b64 = (v: unknown) => Buffer.from(JSON.stringify(v)).toString('base64url');
    const cursors = [
      'garbage',
      '!!!',
      b64({ a: 1 }),
      b64(['2024-01-01T00:00:00.000000Z']),
      b64(['2024-01-01T00:00:00.000000Z', 'not-a-uuid']),
      b64(['yesterday', randomUUID()]),
      b64(['2024-13-45T99:99:99.000000Z', randomUUID()]),
      b64([12345, randomUUID()]),
      b64(["2024-01-01T00:00:00.000000Z'; DROP TABLE users; --", randomUUID()]),
    ];
    for (const cursor of cursors) {
      const res = await call(owner, 'GET', `/v1/users?limit=3&cursor=${encodeURIComponent(cursor)}`);
      const body = expectError(res, 400, 'validation_failed');
      expect(body.details?.map((d) => d.field)).toEqual(['querystring.cursor']);
    }
  });

  it("a cursor made in another org is refused like any unknown cursor, and shows nothing of that org", async () => {
    const other = await createTenant(db);
    const foreignCursor = (await listPage(other.owner, '?limit=1')).nextCursor;
    expect(foreignCursor).not.toBeNull();
    const foreign = await call(owner, 'GET', `/v1/users?limit=100&cursor=${encodeURIComponent(foreignCursor!)}`);
    const randomCursor = Buffer.from(`u1:${randomUUID()}`).toString('base64url');
    const random = await call(owner, 'GET', `/v1/users?limit=100&cursor=${encodeURIComponent(randomCursor)}`);
    expect(foreign.statusCode).toBe(400);
    expect(foreign.json().code).toBe('validation_failed');
    expect(withoutRequestId(foreign.json())).toEqual(withoutRequestId(random.json()));
  });

  it('users created back to back, within the same millisecond, are still listed in creation order', async () => {
    const org = await createOrg(db, { name: 'Burst Org', slug: randomSlug('burst') });
    const created: string[] = [];
    for (let i = 0; i < 20; i++) created.push((await addUser(db, org.id, i === 0 ? 'owner' : 'member')).id);
    const caller = await addUser(db, org.id, 'member');
    created.push(caller.id);
    const listed = (await allPages(caller, 7)).flatMap((p) => p.data.map((u) => u.id));
    expect(listed).toEqual(created);
  });

  it('deleting the user a cursor points at does not skip or repeat anyone', async () => {
    const t = await createTenant(db);
    const extra: UserDto[] = [];
    for (let i = 0; i < 4; i++) {
      await sleep(2);
      const res = await call(t.owner, 'POST', '/v1/users', { email: uniqueEmail('anchor') });
      extra.push(res.json<UserDto>());
    }
    const everyone = (await listPage(t.owner, '?limit=100')).data;
    expect(everyone).toHaveLength(7);
    const first = await listPage(t.owner, '?limit=3');
    const anchor = first.data[2]!;
    expect((await call(t.owner, 'DELETE', `/v1/users/${anchor.id}`)).statusCode).toBe(204);
    const rest = await listPage(t.owner, `?limit=100&cursor=${encodeURIComponent(first.nextCursor!)}`);
    expect(rest.data).toEqual(everyone.slice(3));
    expect(rest.nextCursor).toBeNull();
  });
});

// ---------------------------------------------------------------------------------------------

describe('GET /v1/users/:id', () => {
  it('a member reads a colleague: exactly the User', async () => {
    const t = await createTenant(db);
    const res = await call(t.member, 'GET', `/v1/users/${t.owner.id}`);
    expect(res.statusCode).toBe(200);
    expect(res.json()).toEqual(dtoOf((await userRow(t.owner.id))!));
  });

  it('timestamps read as Date#toISOString writes them: UTC, milliseconds, the microseconds cut off', async () => {
    const t = await createTenant(db);
    // PostgreSQL keeps microseconds; the API shows milliseconds, truncated as a Date truncates.
    await db.query("UPDATE users SET created_at = '2026-01-02 03:04:05.999999+05:30' WHERE id = $1", [t.admin.id]);
    const res = await call(t.member, 'GET', `/v1/users/${t.admin.id}`);
    expect(res.statusCode).toBe(200);
    expect(res.json<UserDto>().createdAt).toBe('2026-01-01T21:34:05.999Z');
    expect(res.json()).toEqual(dtoOf((await userRow(t.admin.id))!));
  });

  it('an upper-case id finds the same user', async () => {
    const t = await createTenant(db);
    const res = await call(t.member, 'GET', `/v1/users/${t.admin.id.toUpperCase()}`);
    expect(res.statusCode).toBe(200);
    expect(res.json<UserDto>().id).toBe(t.admin.id);
  });

  it('a random id: 404 not_found', async () => {
    const t = await createTenant(db);
    const body = expectError(await call(t.member, 'GET', `/v1/users/${randomUUID()}`), 404, 'not_found');
    expect(body.details).toBeUndefined();
  });

  it('a non-UUID id: 400 validation_failed on params.id', async () => {
    const t = await createTenant(db);
    const body = expectError(await call(t.member, 'GET', '/v1/users/123'), 400, 'validation_failed');
    expect(body.details?.map((d) => d.field)).toEqual(['params.id']);
  });
});

// ---------------------------------------------------------------------------------------------

describe('POST /v1/users', () => {
  it('201: email trimmed and lower-cased, role defaults to member, exactly the User; the row matches', async () => {
    const t = await createTenant(db);
    const local = `New.Person-${randomBytes(4).toString('hex')}`;
    const res = await call(t.admin, 'POST', '/v1/users', { email: `  ${local}@Example.TEST `, name: 'New Person' });
    expect({ status: res.statusCode, body: res.body }).toMatchObject({ status: 201 });
    const body = res.json<UserDto>();
    expect(body).toEqual({
      id: expect.stringMatching(UUID),
      orgId: t.org.id,
      email: `${local.toLowerCase()}@example.test`,
      name: 'New Person',
      role: 'member',
      createdAt: expect.stringMatching(ISO),
      updatedAt: expect.stringMatching(ISO),
    });
    const row = (await userRow(body.id))!;
    expect(row.deleted_at).toBeNull();
    expect(dtoOf(row)).toEqual(body);
  });

  it('without a name: name is null', async () => {
    const t = await createTenant(db);
    const res = await call(t.owner, 'POST', '/v1/users', { email: uniqueEmail() });
    expect(res.statusCode).toBe(201);
    expect(res.json<UserDto>().name).toBeNull();
    expect((await userRow(res.json<UserDto>().id))!.name).toBeNull();
  });

  it('the new user can authenticate at once', async () => {
    const t = await createTenant(db);
    const created = (await call(t.owner, 'POST', '/v1/users', { email: uniqueEmail(), role: 'admin' })).json<UserDto>();
    const res = await app.inject({ method: 'GET', url: '/v1/me', headers: { 'x-org-id': t.org.id, 'x-user-id': created.id } });
    expect(res.statusCode).toBe(200);
    expect(res.json()).toEqual(created);
  });

  it('duplicate email in the same org: 409 email_taken, and only one row', async () => {
    const t = await createTenant(db);
    const email = uniqueEmail('dup');
    expect((await call(t.admin, 'POST', '/v1/users', { email })).statusCode).toBe(201);
    const before = await snapshotOrgUsers(db, t.org.id);
    expectError(await call(t.admin, 'POST', '/v1/users', { email, name: 'Second' }), 409, 'email_taken');
    expect(await snapshotOrgUsers(db, t.org.id)).toEqual(before);
  });

  it("duplicate of an existing member's email (created outside the API): 409 email_taken", async () => {
    const t = await createTenant(db);
    expectError(await call(t.owner, 'POST', '/v1/users', { email: t.member.email }), 409, 'email_taken');
  });

  it('duplicate differing only in case (and surrounding spaces): 409 email_taken', async () => {
    const t = await createTenant(db);
    const email = uniqueEmail('case');
    expect((await call(t.admin, 'POST', '/v1/users', { email })).statusCode).toBe(201);
    const before = await snapshotOrgUsers(db, t.org.id);
    expectError(await call(t.admin, 'POST', '/v1/users', { email: email.toUpperCase() }), 409, 'email_taken');
    expectError(await call(t.admin, 'POST', '/v1/users', { email: ` ${email.replace(/^./, (c) => c.toUpperCase())} ` }), 409, 'email_taken');
    expect(await snapshotOrgUsers(db, t.org.id)).toEqual(before);
  });

  it('the same email in another org: 201', async () => {
    const a = await createTenant(db);
    const b = await createTenant(db);
    const email = uniqueEmail('shared');
    const inA = await call(a.admin, 'POST', '/v1/users', { email });
    const inB = await call(b.admin, 'POST', '/v1/users', { email: email.toUpperCase() });
    expect([inA.statusCode, inB.statusCode]).toEqual([201, 201]);
    expect(inA.json<UserDto>().orgId).toBe(a.org.id);
    expect(inB.json<UserDto>().orgId).toBe(b.org.id);
    expect(inB.json<UserDto>().email).toBe(email);
    expect(inA.json<UserDto>().id).not.toBe(inB.json<UserDto>().id);
  });

  it('the email of a deleted user can be used again: a new user, the old row stays deleted', async () => {
    const t = await createTenant(db);
    const email = uniqueEmail('again');
    const first = (await call(t.admin, 'POST', '/v1/users', { email })).json<UserDto>();
    expect((await call(t.admin, 'DELETE', `/v1/users/${first.id}`)).statusCode).toBe(204);
    const second = await call(t.admin, 'POST', '/v1/users', { email: email.toUpperCase(), role: 'admin' });
    expect(second.statusCode).toBe(201);
    expect(second.json<UserDto>()).toMatchObject({ email, role: 'admin', orgId: t.org.id });
    expect(second.json<UserDto>().id).not.toBe(first.id);
    expect((await userRow(first.id))!.deleted_at).toBeInstanceOf(Date);
    // And the address is taken again by the new live user.
    expectError(await call(t.admin, 'POST', '/v1/users', { email }), 409, 'email_taken');
  });

  it('the org comes from the caller, never from the body: an orgId field is refused (400) and nothing is created', async () => {
    const a = await createTenant(db);
    const b = await createTenant(db);
    const beforeA = await snapshotOrgUsers(db, a.org.id);
    const beforeB = await snapshotOrgUsers(db, b.org.id);
    for (const field of ['orgId', 'org_id']) {
      const res = await call(a.owner, 'POST', '/v1/users', { email: uniqueEmail(), [field]: b.org.id });
      expectError(res, 400, 'validation_failed');
    }
    expect(await snapshotOrgUsers(db, a.org.id)).toEqual(beforeA);
    expect(await snapshotOrgUsers(db, b.org.id)).toEqual(beforeB);
  });
});

// ---------------------------------------------------------------------------------------------

describe('PATCH /v1/users/:id', () => {
  it('changes the name only: 200 with the User, the role untouched, updatedAt not before createdAt', async () => {
    const t = await createTenant(db);
    const target = await t.addUser('member');
    const res = await call(t.admin, 'PATCH', `/v1/users/${target.id}`, { name: '  Renamed Person ' });
    expect(res.statusCode).toBe(200);
    const row = (await userRow(target.id))!;
    expect(row.name).toBe('Renamed Person');
    expect(row.role).toBe('member');
    expect(res.json()).toEqual(dtoOf(row));
    expect(row.updated_at.getTime()).toBeGreaterThanOrEqual(row.created_at.getTime());
  });

  it('clears the name with null', async () => {
    const t = await createTenant(db);
    const target = await t.addUser('member');
    const res = await call(t.admin, 'PATCH', `/v1/users/${target.id}`, { name: null });
    expect(res.statusCode).toBe(200);
    expect(res.json<UserDto>().name).toBeNull();
    expect((await userRow(target.id))!.name).toBeNull();
  });

  it('changes the role only: the name untouched', async () => {
    const t = await createTenant(db);
    const target = await t.addUser('member');
    const res = await call(t.admin, 'PATCH', `/v1/users/${target.id}`, { role: 'admin' });
    expect(res.statusCode).toBe(200);
    const row = (await userRow(target.id))!;
    expect(row).toMatchObject({ role: 'admin', name: 'Test member' });
    expect(res.json()).toEqual(dtoOf(row));
  });

  it('changes name and role together', async () => {
    const t = await createTenant(db);
    const target = await t.addUser('admin');
    const res = await call(t.owner, 'PATCH', `/v1/users/${target.id}`, { name: 'Both', role: 'member' });
    expect(res.statusCode).toBe(200);
    expect((await userRow(target.id))!).toMatchObject({ role: 'member', name: 'Both' });
  });

  it('the new role applies to the very next request of that user', async () => {
    const t = await createTenant(db);
    const target = await t.addUser('member');
    expectError(await call(target, 'POST', '/v1/users', { email: uniqueEmail() }), 403, 'forbidden');
    expect((await call(t.admin, 'PATCH', `/v1/users/${target.id}`, { role: 'admin' })).statusCode).toBe(200);
    expect((await call(target, 'POST', '/v1/users', { email: uniqueEmail() })).statusCode).toBe(201);
    expect((await call(t.admin, 'PATCH', `/v1/users/${target.id}`, { role: 'member' })).statusCode).toBe(200);
    expectError(await call(target, 'POST', '/v1/users', { email: uniqueEmail() }), 403, 'forbidden');
  });

  it('a random id: 404 not_found', async () => {
    const t = await createTenant(db);
    expectError(await call(t.owner, 'PATCH', `/v1/users/${randomUUID()}`, { name: 'x' }), 404, 'not_found');
  });
});

// ---------------------------------------------------------------------------------------------

describe('DELETE /v1/users/:id (soft delete)', () => {
  it('204 with an empty body; then GET 404, absent from the list, the row kept with deleted_at, and the user locked out', async () => {
    const t = await createTenant(db);
    const target = await t.addUser('member');
    expect((await call(target, 'GET', '/v1/me')).statusCode).toBe(200);

    const res = await call(t.admin, 'DELETE', `/v1/users/${target.id}`);
    expect(res.statusCode).toBe(204);
    expect(res.body).toBe('');

    const gone = expectError(await call(t.admin, 'GET', `/v1/users/${target.id}`), 404, 'not_found');
    const random = expectError(await call(t.admin, 'GET', `/v1/users/${randomUUID()}`), 404, 'not_found');
    expect(withoutRequestId(gone)).toEqual(withoutRequestId(random));

    const listed = (await listPage(t.admin, '?limit=100')).data.map((u) => u.id);
    expect(listed.sort()).toEqual([t.owner.id, t.admin.id, t.member.id].sort());

    const row = (await userRow(target.id))!;
    expect(row.deleted_at).toBeInstanceOf(Date);
    expect(row.org_id).toBe(t.org.id);

    expectError(await call(target, 'GET', '/v1/me'), 401, 'unauthorized');
    expectError(await call(target, 'GET', '/v1/users'), 401, 'unauthorized');
  });

  it('a deleted user cannot be deleted or changed again: 404 like a random id', async () => {
    const t = await createTenant(db);
    const target = await t.addUser('member');
    expect((await call(t.admin, 'DELETE', `/v1/users/${target.id}`)).statusCode).toBe(204);
    const deletedAt = (await userRow(target.id))!.deleted_at;
    const again = expectError(await call(t.admin, 'DELETE', `/v1/users/${target.id}`), 404, 'not_found');
    const random = expectError(await call(t.admin, 'DELETE', `/v1/users/${randomUUID()}`), 404, 'not_found');
    expect(withoutRequestId(again)).toEqual(withoutRequestId(random));
    expectError(await call(t.admin, 'PATCH', `/v1/users/${target.id}`, { role: 'admin' }), 404, 'not_found');
    expect((await userRow(target.id))!).toMatchObject({ role: 'member', deleted_at: deletedAt });
  });

  it('a user who deleted themselves is locked out at once', async () => {
    const t = await createTenant(db);
    const admin = await t.addUser('admin');
    expect((await call(admin, 'DELETE', `/v1/users/${admin.id}`)).statusCode).toBe(204);
    expectError(await call(admin, 'GET', '/v1/me'), 401, 'unauthorized');
  });
});

// ---------------------------------------------------------------------------------------------

type Action =
  | { kind: 'create'; role: Role }
  | { kind: 'patch'; target: Role | 'self'; body: { name?: string; role?: Role } }
  | { kind: 'delete'; target: Role | 'self' };

interface RoleCase {
  caller: Role;
  action: Action;
  allowed: boolean;
}

function describeAction(a: Action): string {
  switch (a.kind) {
    case 'create':
      return `create a ${a.role}`;
    case 'patch':
      return `PATCH ${a.target === 'self' ? 'itself' : `a ${a.target}`} with ${JSON.stringify(a.body)}`;
    case 'delete':
      return `delete ${a.target === 'self' ? 'itself' : `a ${a.target}`}`;
  }
}

const ROLE_CASES: RoleCase[] = [
  // Members read only.
  ...(['member', 'admin', 'owner'] as const).map((role) => ({ caller: 'member' as const, action: { kind: 'create' as const, role }, allowed: false })),
  ...(['member', 'admin', 'owner'] as const).flatMap((target) => [
    { caller: 'member' as const, action: { kind: 'patch' as const, target, body: { name: 'Nope' } }, allowed: false },
    { caller: 'member' as const, action: { kind: 'patch' as const, target, body: { role: 'member' as const } }, allowed: false },
    { caller: 'member' as const, action: { kind: 'delete' as const, target }, allowed: false },
  ]),
  { caller: 'member', action: { kind: 'patch', target: 'self', body: { role: 'admin' } }, allowed: false },
  { caller: 'member', action: { kind: 'patch', target: 'self', body: { name: 'Me' } }, allowed: false },
  { caller: 'member', action: { kind: 'delete', target: 'self' }, allowed: false },

  // Admins manage members and admins, never owners.
  { caller: 'admin', action: { kind: 'create', role: 'member' }, allowed: true },
  { caller: 'admin', action: { kind: 'create', role: 'admin' }, allowed: true },
  { caller: 'admin', action: { kind: 'create', role: 'owner' }, allowed: false },
  { caller: 'admin', action: { kind: 'patch', target: 'owner', body: { name: 'Renamed owner' } }, allowed: false },
  { caller: 'admin', action: { kind: 'patch', target: 'owner', body: { role: 'admin' } }, allowed: false },
  { caller: 'admin', action: { kind: 'patch', target: 'owner', body: { role: 'member' } }, allowed: false },
  { caller: 'admin', action: { kind: 'patch', target: 'owner', body: { role: 'owner' } }, allowed: false },
  { caller: 'admin', action: { kind: 'patch', target: 'member', body: { role: 'owner' } }, allowed: false },
  { caller: 'admin', action: { kind: 'patch', target: 'admin', body: { role: 'owner' } }, allowed: false },
  { caller: 'admin', action: { kind: 'patch', target: 'self', body: { role: 'owner' } }, allowed: false },
  { caller: 'admin', action: { kind: 'delete', target: 'owner' }, allowed: false },
  { caller: 'admin', action: { kind: 'patch', target: 'member', body: { role: 'admin' } }, allowed: true },
  { caller: 'admin', action: { kind: 'patch', target: 'member', body: { name: 'Renamed member' } }, allowed: true },
  { caller: 'admin', action: { kind: 'patch', target: 'admin', body: { role: 'member' } }, allowed: true },
  { caller: 'admin', action: { kind: 'patch', target: 'admin', body: { name: 'Renamed admin' } }, allowed: true },
  { caller: 'admin', action: { kind: 'patch', target: 'self', body: { role: 'member' } }, allowed: true },
  { caller: 'admin', action: { kind: 'delete', target: 'admin' }, allowed: true },
  { caller: 'admin', action: { kind: 'delete', target: 'member' }, allowed: true },

  // Owners manage everyone, owners included (the target owner is a second owner: not the last).
  { caller: 'owner', action: { kind: 'create', role: 'owner' }, allowed: true },
  { caller: 'owner', action: { kind: 'create', role: 'admin' }, allowed: true },
  { caller: 'owner', action: { kind: 'create', role: 'member' }, allowed: true },
  { caller: 'owner', action: { kind: 'patch', target: 'member', body: { role: 'owner' } }, allowed: true },
  { caller: 'owner', action: { kind: 'patch', target: 'admin', body: { role: 'owner' } }, allowed: true },
  { caller: 'owner', action: { kind: 'patch', target: 'owner', body: { role: 'admin' } }, allowed: true },
  { caller: 'owner', action: { kind: 'patch', target: 'owner', body: { role: 'member' } }, allowed: true },
  { caller: 'owner', action: { kind: 'patch', target: 'owner', body: { name: 'Renamed owner' } }, allowed: true },
  { caller: 'owner', action: { kind: 'patch', target: 'admin', body: { role: 'member' } }, allowed: true },
  { caller: 'owner', action: { kind: 'delete', target: 'owner' }, allowed: true },
  { caller: 'owner', action: { kind: 'delete', target: 'admin' }, allowed: true },
  { caller: 'owner', action: { kind: 'delete', target: 'member' }, allowed: true },
];

describe('role rules', () => {
  for (const c of ROLE_CASES) {
    it(`${c.caller} ${c.allowed ? 'can' : 'cannot'} ${describeAction(c.action)}${c.allowed ? '' : ' (403 forbidden, nothing changed)'}`, async () => {
      const t = await createTenant(db);
      const caller = t[c.caller];
      const a = c.action;
      const target = a.kind === 'create' ? undefined : a.target === 'self' ? caller : await t.addUser(a.target);
      const before = await snapshotOrgUsers(db, t.org.id);

      let res: LightMyRequestResponse;
      const email = uniqueEmail('rule');
      switch (a.kind) {
        case 'create':
          res = await call(caller, 'POST', '/v1/users', { email, role: a.role });
          break;
        case 'patch':
          res = await call(caller, 'PATCH', `/v1/users/${target!.id}`, a.body);
          break;
        case 'delete':
          res = await call(caller, 'DELETE', `/v1/users/${target!.id}`);
          break;
      }

      if (!c.allowed) {
        expectError(res, 403, 'forbidden');
        expect(await snapshotOrgUsers(db, t.org.id)).toEqual(before);
        return;
      }
      switch (a.kind) {
        case 'create': {
          expect({ status: res.statusCode, body: res.body }).toMatchObject({ status: 201 });
          const created = res.json<UserDto>();
          expect(created).toMatchObject({ email, role: a.role, orgId: t.org.id });
          expect((await userRow(created.id))!).toMatchObject({ role: a.role, org_id: t.org.id, deleted_at: null });
          break;
        }
        case 'patch': {
          expect({ status: res.statusCode, body: res.body }).toMatchObject({ status: 200 });
          const row = (await userRow(target!.id))!;
          expect(row).toMatchObject({ ...a.body, deleted_at: null });
          expect(res.json()).toEqual(dtoOf(row));
          break;
        }
        case 'delete':
          expect(res.statusCode).toBe(204);
          expect((await userRow(target!.id))!.deleted_at).toBeInstanceOf(Date);
          break;
      }
      expect(await liveOwnerCount(t.org.id)).toBeGreaterThanOrEqual(1);
    });
  }
});

// ---------------------------------------------------------------------------------------------

describe('the last owner', () => {
  function expectLastOwner(res: LightMyRequestResponse): void {
    expectError(res, 409, 'last_owner');
  }

  it('cannot demote themselves to admin or member: 409 last_owner, still owner', async () => {
    const t = await createTenant(db);
    for (const role of ['admin', 'member'] as const) {
      expectLastOwner(await call(t.owner, 'PATCH', `/v1/users/${t.owner.id}`, { role }));
      expectLastOwner(await call(t.owner, 'PATCH', `/v1/users/${t.owner.id}`, { role, name: 'Also renamed' }));
    }
    expect((await userRow(t.owner.id))!).toMatchObject({ role: 'owner', name: 'Test owner', deleted_at: null });
    expect(await liveOwnerCount(t.org.id)).toBe(1);
  });

  it('cannot delete themselves: 409 last_owner, still there', async () => {
    const t = await createTenant(db);
    expectLastOwner(await call(t.owner, 'DELETE', `/v1/users/${t.owner.id}`));
    expect((await userRow(t.owner.id))!.deleted_at).toBeNull();
    expect((await call(t.owner, 'GET', '/v1/me')).statusCode).toBe(200);
  });

  it('can still rename themselves, or set their role to owner again', async () => {
    const t = await createTenant(db);
    expect((await call(t.owner, 'PATCH', `/v1/users/${t.owner.id}`, { name: 'Still Owner' })).statusCode).toBe(200);
    expect((await call(t.owner, 'PATCH', `/v1/users/${t.owner.id}`, { role: 'owner' })).statusCode).toBe(200);
    expect((await userRow(t.owner.id))!).toMatchObject({ role: 'owner', name: 'Still Owner' });
  });

  it('a deleted second owner does not count', async () => {
    const t = await createTenant(db);
    const second = await t.addUser('owner');
    expect((await call(t.owner, 'DELETE', `/v1/users/${second.id}`)).statusCode).toBe(204);
    expectLastOwner(await call(t.owner, 'PATCH', `/v1/users/${t.owner.id}`, { role: 'admin' }));
    expectLastOwner(await call(t.owner, 'DELETE', `/v1/users/${t.owner.id}`));
  });

  it("another org's owner does not count", async () => {
    const t = await createTenant(db);
    await createTenant(db);
    expectLastOwner(await call(t.owner, 'PATCH', `/v1/users/${t.owner.id}`, { role: 'member' }));
  });

  it('once a second owner exists: the first can step down, then the second is the last', async () => {
    const t = await createTenant(db);
    const created = await call(t.owner, 'POST', '/v1/users', { email: uniqueEmail('owner2'), role: 'owner' });
    expect(created.statusCode).toBe(201);
    const second: TestUser = {
      id: created.json<UserDto>().id,
      orgId: t.org.id,
      email: created.json<UserDto>().email,
      role: 'owner',
      headers: { 'x-org-id': t.org.id, 'x-user-id': created.json<UserDto>().id },
    };

    expect((await call(t.owner, 'PATCH', `/v1/users/${t.owner.id}`, { role: 'admin' })).statusCode).toBe(200);
    expect((await userRow(t.owner.id))!.role).toBe('admin');
    expect(await liveOwnerCount(t.org.id)).toBe(1);

    // The former owner is an admin now and cannot touch the remaining owner.
    expectError(await call(t.owner, 'PATCH', `/v1/users/${second.id}`, { role: 'admin' }), 403, 'forbidden');
    // The remaining owner is the last one.
    expectLastOwner(await call(second, 'PATCH', `/v1/users/${second.id}`, { role: 'member' }));
    expectLastOwner(await call(second, 'DELETE', `/v1/users/${second.id}`));
    expect(await liveOwnerCount(t.org.id)).toBe(1);
  });

  it('once a second owner exists: an owner can delete themselves, and is locked out', async () => {
    const t = await createTenant(db);
    const second = await t.addUser('owner');
    expect((await call(t.owner, 'DELETE', `/v1/users/${t.owner.id}`)).statusCode).toBe(204);
    expectError(await call(t.owner, 'GET', '/v1/me'), 401, 'unauthorized');
    expect(await liveOwnerCount(t.org.id)).toBe(1);
    expectLastOwner(await call(second, 'DELETE', `/v1/users/${second.id}`));
  });

  it('an owner can demote or delete another owner, but not the last one standing', async () => {
    const t = await createTenant(db);
    const second = await t.addUser('owner');
    expect((await call(second, 'PATCH', `/v1/users/${t.owner.id}`, { role: 'member' })).statusCode).toBe(200);
    expectLastOwner(await call(second, 'PATCH', `/v1/users/${second.id}`, { role: 'admin' }));
    const third = await t.addUser('owner');
    expect((await call(third, 'DELETE', `/v1/users/${second.id}`)).statusCode).toBe(204);
    expectLastOwner(await call(third, 'DELETE', `/v1/users/${third.id}`));
    expect(await liveOwnerCount(t.org.id)).toBe(1);
  });

  describe('concurrent changes keep at least one owner', () => {
    async function twoOwners(): Promise<{ t: TestTenant; first: TestUser; second: TestUser }> {
      const t = await createTenant(db);
      const second = await t.addUser('owner');
      // Several connections ready (PostgreSQL), so both requests authenticate at once and then
      // race for the same org; on PGlite statements are serialised in arrival order anyway.
      await Promise.all([t.owner, second, t.owner, second].map((u) => call(u, 'GET', '/v1/me')));
      return { t, first: t.owner, second };
    }

    for (let round = 1; round <= 3; round++) {
      // The changes are serialised per org and the caller's role is re-read under the lock: the
      // one that comes second is no longer an owner, so it may not touch owners at all (403).
      it(`two owners demote each other at once: one 200, one 403, one owner left (round ${round})`, async () => {
        const { t, first, second } = await twoOwners();
        const results = await Promise.all([
          call(first, 'PATCH', `/v1/users/${second.id}`, { role: 'admin' }),
          call(second, 'PATCH', `/v1/users/${first.id}`, { role: 'admin' }),
        ]);
        expect(results.map((r) => r.statusCode).sort()).toEqual([200, 403]);
        expect(await liveOwnerCount(t.org.id)).toBe(1);
      });
    }

    it('both owners demote themselves at once: one 200, one 409 last_owner, one owner left', async () => {
      const { t, first, second } = await twoOwners();
      const results = await Promise.all([
        call(first, 'PATCH', `/v1/users/${first.id}`, { role: 'member' }),
        call(second, 'PATCH', `/v1/users/${second.id}`, { role: 'member' }),
      ]);
      expect(results.map((r) => r.statusCode).sort()).toEqual([200, 409]);
      expect(await liveOwnerCount(t.org.id)).toBe(1);
    });

    // The second one's caller has just been deleted: it is no longer anybody (401).
    it('two owners delete each other at once: one 204, one 401, one owner left', async () => {
      const { t, first, second } = await twoOwners();
      const results = await Promise.all([
        call(first, 'DELETE', `/v1/users/${second.id}`),
        call(second, 'DELETE', `/v1/users/${first.id}`),
      ]);
      expect(results.map((r) => r.statusCode).sort()).toEqual([204, 401]);
      expect(await liveOwnerCount(t.org.id)).toBe(1);
    });
  });
});

// ---------------------------------------------------------------------------------------------

describe("cross-org: another org's user id is a 404 and their row is untouched", () => {
  let a: TestTenant;
  let b: TestTenant;
  beforeAll(async () => {
    a = await createTenant(db);
    b = await createTenant(db);
  });

  const routes: { method: Method; body?: Record<string, unknown> }[] = [
    { method: 'GET' },
    { method: 'PATCH', body: { name: 'Hijacked' } },
    { method: 'PATCH', body: { role: 'owner' } },
    { method: 'PATCH', body: { role: 'member' } },
    { method: 'DELETE' },
  ];

  for (const route of routes) {
    for (const callerRole of ['owner', 'admin', 'member'] as const) {
      for (const targetRole of ['owner', 'admin', 'member'] as const) {
        it(`${route.method} ${route.body ? JSON.stringify(route.body) : ''} by A's ${callerRole} on B's ${targetRole}`, async () => {
          const caller = a[callerRole];
          const target = b[targetRole];
          const before = await snapshotOrgUsers(db, b.org.id);
          const res = await call(caller, route.method, `/v1/users/${target.id}`, route.body);
          // Members are refused every write whatever the target: the role check comes first and,
          // as for a random id, reveals nothing about the other org.
          const [status, code]: [number, ErrorCode] =
            callerRole === 'member' && route.method !== 'GET' ? [403, 'forbidden'] : [404, 'not_found'];
          const foreign = expectError(res, status, code);
          const random = expectError(await call(caller, route.method, `/v1/users/${randomUUID()}`, route.body), status, code);
          expect(withoutRequestId(foreign)).toEqual(withoutRequestId(random));
          expect(await snapshotOrgUsers(db, b.org.id)).toEqual(before);
        });
      }
    }
  }

  it("B's users never appear in A's list, and B's own requests still work", async () => {
    const listed = (await listPage(a.owner, '?limit=100')).data;
    expect(listed.map((u) => u.id).sort()).toEqual([a.owner.id, a.admin.id, a.member.id].sort());
    expect((await call(b.member, 'GET', '/v1/me')).statusCode).toBe(200);
    expect((await call(b.owner, 'GET', `/v1/users/${b.member.id}`)).statusCode).toBe(200);
  });
});
