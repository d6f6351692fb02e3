import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Database } from '../src/infra/database.js';
import { newRequestId } from '../src/middleware/requestId.js';
import { buildTestApp, createTenant, type TestTenant } from './helpers/app.js';
import { getTestDb } from './helpers/db.js';

/**
 * Bad input on every route that takes input is a 4xx with the one error body shape, never a 500,
 * and no error body leaks internals. Every error response seen here is collected and checked
 * again at the end for stack traces, SQL and driver names.
 */

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const HTTP_REASON: Record<number, string> = {
  400: 'Bad Request',
  404: 'Not Found',
  413: 'Payload Too Large',
  415: 'Unsupported Media Type',
};

const collected: { what: string; status: number; body: string }[] = [];

function assertNoLeak(what: string, body: string): void {
  expect(body, `${what}: stack trace`).not.toMatch(/\n\s+at |"stack"/);
  expect(body, `${what}: SQL`).not.toContain('SELECT');
  expect(body, `${what}: driver`).not.toContain('pg');
  expect(body, `${what}: file path`).not.toContain('at /');
  expect(body, `${what}: file path`).not.toMatch(/\/(src|node_modules)\//);
}

/** Asserts the status, the code and the full error shape; returns the parsed body. */
function expectError(
  res: LightMyRequestResponse,
  status: number,
  code: string,
  what = `${res.statusCode} ${res.body.slice(0, 200)}`,
): { error: string; message: string; code: string; requestId: string; details?: { field: string; message: string }[] } {
  if (res.statusCode >= 400) collected.push({ what, status: res.statusCode, body: res.body });
  expect(res.statusCode, what).toBe(status);
  expect(res.headers['content-type'], what).toMatch(/^application\/json/);
  const body = res.json<{
    error: string;
    message: string;
    code: string;
    requestId: string;
    details?: { field: string; message: string }[];
  }>();
  expect(body.error, what).toBe(HTTP_REASON[status]);
  expect(body.code, what).toBe(code);
  expect(typeof body.message, what).toBe('string');
  expect(body.message.length, what).toBeGreaterThan(0);
  expect(body.requestId, what).toBe(res.headers['x-request-id']);
  const allowed = ['error', 'message', 'code', 'requestId', 'details'];
  expect(Object.keys(body).filter((k) => !allowed.includes(k)), what).toEqual([]);
  if (body.details !== undefined) {
    expect(Array.isArray(body.details), what).toBe(true);
    for (const d of body.details) {
      expect(Object.keys(d).sort(), what).toEqual(['field', 'message']);
      expect(typeof d.field).toBe('string');
      expect(typeof d.message).toBe('string');
    }
  }
  assertNoLeak(what, res.body);
  return body;
}

function expectValidation(res: LightMyRequestResponse, field: string, what?: string): void {
  const body = expectError(res, 400, 'validation_failed', what);
  const fields = (body.details ?? []).map((d) => d.field);
  expect(fields, what ?? res.body).toContain(field);
  // The message names the field too (its last segment: "cursor", "email", "body").
  expect(body.message, what ?? res.body).toContain(field.split('.').pop());
}

let app: FastifyInstance;
let db: Database;
let t: TestTenant;
let usersBefore: number;

const userCount = async (orgId: string) =>
  (await db.query<{ n: number }>('SELECT count(*)::int AS n FROM users WHERE org_id = $1', [orgId])).rows[0]!.n;

beforeAll(async () => {
  db = await getTestDb();
  app = await buildTestApp();
  t = await createTenant();
  usersBefore = await userCount(t.org.id);
});

afterAll(async () => {
  await app.close();
});

const post = (payload: unknown, headers: Record<string, string> = {}) =>
  app.inject({ method: 'POST', url: '/v1/users', headers: { ...t.admin.headers, ...headers }, payload: payload as string });

describe('POST /v1/users: bad bodies are 400 validation_failed', () => {
  const ok = { email: 'valid@example.com', name: 'Valid Name', role: 'member' };
  const cases: [string, unknown, string][] = [
    ['missing email', { name: 'No Email', role: 'member' }, 'body.email'],
    ['email not an email', { ...ok, email: 'not-an-email' }, 'body.email'],
    ['email without a domain dot', { ...ok, email: 'a@b' }, 'body.email'],
    ['email of 300 characters', { ...ok, email: `${'a'.repeat(288)}@example.com` }, 'body.email'],
    ['email as a number', { ...ok, email: 12345 }, 'body.email'],
    ['email as an object (operator injection)', { ...ok, email: { $gt: '' } }, 'body.email'],
    ['email as an array', { ...ok, email: ['a@example.com'] }, 'body.email'],
    ['email null', { ...ok, email: null }, 'body.email'],
    ['name of 1000 characters', { ...ok, name: 'n'.repeat(1000) }, 'body.name'],
    ['name of 256 characters', { ...ok, name: 'n'.repeat(256) }, 'body.name'],
    ['name with NUL', { ...ok, name: 'Bob\u0000Smith' }, 'body.name'],
    ['name with BEL', { ...ok, name: 'Bob\u0007Smith' }, 'body.name'],
    ['name with an escape sequence', { ...ok, name: 'Bob\u001b[31mRed' }, 'body.name'],
    // Not storable as sent: the driver would silently turn it into U+FFFD.
    ['name with a lone surrogate', { ...ok, name: 'Bob\ud800' }, 'body.name'],
    ['name empty', { ...ok, name: '' }, 'body.name'],
    ['name only spaces', { ...ok, name: '    ' }, 'body.name'],
    ['name as a number', { ...ok, name: 42 }, 'body.name'],
    ["role 'superuser'", { ...ok, role: 'superuser' }, 'body.role'],
    ["role 'OWNER' (case matters)", { ...ok, role: 'OWNER' }, 'body.role'],
    ['role as a number', { ...ok, role: 1 }, 'body.role'],
    ['role null', { ...ok, role: null }, 'body.role'],
    ['unknown field isAdmin', { ...ok, isAdmin: true }, 'body'],
    ['unknown field orgId (tenant comes from auth only)', { ...ok, orgId: '00000000-0000-0000-0000-000000000002' }, 'body'],
    ['body an array', [ok], 'body'],
    ['body a JSON string', JSON.stringify('a@example.com'), 'body'],
    ['body a JSON number', '42', 'body'],
    ['body null', 'null', 'body'],
  ];

  it.each(cases)('%s', async (what, payload, field) => {
    const res = await app.inject({
      method: 'POST',
      url: '/v1/users',
      headers: { ...t.admin.headers, 'content-type': 'application/json' },
      payload: typeof payload === 'string' ? payload : JSON.stringify(payload),
    });
    expectValidation(res, field, what);
  });

  it('an unknown field is named in the message', async () => {
    const body = expectError(await post({ ...ok, isAdmin: true }), 400, 'validation_failed');
    expect(JSON.stringify(body.details)).toContain('isAdmin');
  });

  it('no body at all is 400, not 500', async () => {
    const res = await app.inject({ method: 'POST', url: '/v1/users', headers: t.admin.headers });
    expectError(res, 400, 'validation_failed');
  });

  it('an empty body with content-type application/json is 400 bad_request', async () => {
    const res = await post('', { 'content-type': 'application/json' });
    expectError(res, 400, 'bad_request');
  });

  it('invalid JSON text with content-type application/json is 400 bad_request', async () => {
    for (const text of ['{"email": ', '{email: "a@example.com"}', "{'email':'a@example.com'}", '{"email":"a@example.com",}']) {
      const res = await post(text, { 'content-type': 'application/json' });
      expectError(res, 400, 'bad_request', text);
    }
  });

  it('prototype poisoning in JSON is refused with 400', async () => {
    const proto = await post('{"email":"p@example.com","__proto__":{"role":"owner"}}', { 'content-type': 'application/json' });
    expectError(proto, 400, 'bad_request');
    const ctor = await post('{"email":"c@example.com","constructor":{"prototype":{"role":"owner"}}}', {
      'content-type': 'application/json',
    });
    expectError(ctor, 400, 'bad_request');
  });

  it('content-type text/plain is 415 unsupported_media_type', async () => {
    const res = await post(JSON.stringify(ok), { 'content-type': 'text/plain' });
    expectError(res, 415, 'unsupported_media_type');
  });

  it('content-type application/xml is 415 unsupported_media_type', async () => {
    const res = await post('<user><email>x@example.com</email></user>', { 'content-type': 'application/xml' });
    expectError(res, 415, 'unsupported_media_type');
  });

  it('form-encoded bodies are 415 unsupported_media_type', async () => {
    const res = await post('email=f%40example.com', { 'content-type': 'application/x-www-form-urlencoded' });
    expectError(res, 415, 'unsupported_media_type');
  });

  it('none of the refused bodies created a user', async () => {
    expect(await userCount(t.org.id)).toBe(usersBefore);
  });

  it('the boundaries are accepted: email and name of exactly 255 characters, name null', async () => {
    const email = `${'e'.repeat(243)}@example.com`;
    expect(email).toHaveLength(255);
    const res = await post({ email, name: 'é'.repeat(255), role: 'member' });
    expect(res.statusCode, res.body).toBe(201);
    expect(res.json()).toMatchObject({ email, name: 'é'.repeat(255), role: 'member', orgId: t.org.id });
    const nullName = await post({ email: `null-name-${Date.now()}@example.com`, name: null });
    expect(nullName.statusCode, nullName.body).toBe(201);
    expect(nullName.json()).toMatchObject({ name: null, role: 'member' });
  });
});

describe('body size limit', () => {
  let small: FastifyInstance;
  beforeAll(async () => {
    small = await buildTestApp({ env: { BODY_LIMIT_BYTES: '2048' } });
  });
  afterAll(() => small.close());

  it('a body over BODY_LIMIT_BYTES is 413 payload_too_large', async () => {
    const res = await small.inject({
      method: 'POST',
      url: '/v1/users',
      headers: { ...t.admin.headers, 'content-type': 'application/json' },
      payload: JSON.stringify({ email: 'big@example.com', name: 'x'.repeat(10 * 1024) }),
    });
    expectError(res, 413, 'payload_too_large');
    const rows = await db.query('SELECT 1 FROM users WHERE org_id = $1 AND email = $2', [t.org.id, 'big@example.com']);
    expect(rows.rowCount).toBe(0);
  });

  it('a body under the limit on the same app still works', async () => {
    const email = `small-${Date.now()}@example.com`;
    const res = await small.inject({ method: 'POST', url: '/v1/users', headers: t.admin.headers, payload: { email } });
    expect(res.statusCode, res.body).toBe(201);
  });
});

describe('PATCH /v1/users/:id: bad bodies', () => {
  let targetId: string;
  beforeAll(async () => {
    targetId = (await t.addUser('member')).id;
  });
  const patch = (payload: unknown) =>
    app.inject({
      method: 'PATCH',
      url: `/v1/users/${targetId}`,
      headers: { ...t.admin.headers, 'content-type': 'application/json' },
      payload: JSON.stringify(payload),
    });

  it('an empty object is 400: must change at least one field', async () => {
    const body = expectError(await patch({}), 400, 'validation_failed');
    expect(body.message).toMatch(/at least one/);
    expect(body.details?.[0]?.field).toBe('body');
  });

  it('an unknown field is 400', async () => {
    expectValidation(await patch({ name: 'New', isAdmin: true }), 'body');
    expectValidation(await patch({ email: 'change@example.com' }), 'body');
    expectValidation(await patch({ orgId: '00000000-0000-0000-0000-000000000001' }), 'body');
  });

  it('an invalid role is 400', async () => {
    expectValidation(await patch({ role: 'superuser' }), 'body.role');
    expectValidation(await patch({ role: 7 }), 'body.role');
    expectValidation(await patch({ role: null }), 'body.role');
  });

  it('an invalid name is 400', async () => {
    expectValidation(await patch({ name: 'x'.repeat(1000) }), 'body.name');
    expectValidation(await patch({ name: 'a\u0000b' }), 'body.name');
    expectValidation(await patch({ name: '' }), 'body.name');
  });

  it('a non-object body is 400', async () => {
    expectValidation(await patch([{ name: 'x' }]), 'body');
    expectValidation(await patch('name'), 'body');
    expectValidation(await patch(null), 'body');
  });

  it('the target user is unchanged', async () => {
    const { rows } = await db.query<{ name: string; role: string; email: string }>(
      'SELECT name, role, email FROM users WHERE id = $1',
      [targetId],
    );
    expect(rows[0]).toMatchObject({ name: 'Test member', role: 'member' });
  });
});

describe(':id path parameters that are not UUIDs are 400 naming params.id', () => {
  const badIds: [string, string][] = [
    ['abc', 'abc'],
    ['123', '123'],
    ['UUID with a trailing character', '00000000-0000-0000-0000-000000000001x'],
    ['UUID without dashes', '00000000000000000000000000000001'],
    ['SQL injection', "' OR 1=1 --"],
    ['NUL byte', '\u0000'],
    ['10k characters', 'a'.repeat(10_000)],
  ];
  const methods = ['GET', 'PATCH', 'DELETE'] as const;

  for (const method of methods) {
    it.each(badIds)(`${method} /v1/users/<%s>`, async (what, id) => {
      const res = await app.inject({
        method,
        url: `/v1/users/${encodeURIComponent(id)}`,
        headers: t.admin.headers,
        ...(method === 'PATCH' ? { payload: { name: 'Changed' } } : {}),
      });
      expectValidation(res, 'params.id', `${method} ${what}`);
    });
  }

  it('the SQL-looking id did not touch the users table', async () => {
    expect(await userCount(t.org.id)).toBeGreaterThanOrEqual(usersBefore);
    const { rows } = await db.query<{ n: number }>(
      'SELECT count(*)::int AS n FROM users WHERE org_id = $1 AND deleted_at IS NOT NULL',
      [t.org.id],
    );
    expect(rows[0]!.n).toBe(0);
  });
});

describe('GET /v1/users query strings', () => {
  const list = (query: string) => app.inject({ method: 'GET', url: `/v1/users?${query}`, headers: t.admin.headers });
  const b64 = (v: unknown) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const aUuid = '00000000-0000-4000-8000-000000000001';

  const badLimits: [string, string][] = [
    ['limit=0', 'limit=0'],
    ['limit=101', 'limit=101'],
    ['limit=-1', 'limit=-1'],
    ['limit=abc', 'limit=abc'],
    ['limit=1.5', 'limit=1.5'],
    ['limit empty', 'limit='],
    ['limit huge', `limit=${'9'.repeat(400)}`],
    ['limit twice', 'limit=1&limit=2'],
  ];
  it.each(badLimits)('%s is 400 naming querystring.limit', async (_what, q) => {
    expectValidation(await list(q), 'querystring.limit', q);
  });

  const badCursors: [string, string][] = [
    ['garbage', 'garbage'],
    ['empty', ''],
    ['1000 characters', 'a'.repeat(1000)],
    ['not base64 JSON', encodeURIComponent('!!!***')],
    ['JSON of the wrong shape', b64({ ts: '2024-01-01', id: aUuid })],
    ['array with a non-UUID id', b64(['2024-01-01T00:00:00.000000Z', "' OR 1=1 --"])],
    ['array with a SQL timestamp', b64(["2024-01-01'; DROP TABLE users;--", aUuid])],
    ['timestamp February 30th', b64(['2024-02-30T00:00:00.000000Z', aUuid])],
    ['timestamp in year 0', b64(['0000-01-01T00:00:00.000000Z', aUuid])],
    ['timestamp with month 13', b64(['2024-13-01T00:00:00.000000Z', aUuid])],
  ];
  it.each(badCursors)('cursor %s is 400 naming querystring.cursor', async (what, cursor) => {
    expectValidation(await list(`cursor=${cursor}`), 'querystring.cursor', what);
  });

  it('an unknown query parameter is 400', async () => {
    const body = expectError(await list('limit=5&orgId=00000000-0000-0000-0000-000000000002'), 400, 'validation_failed');
    expect(body.details?.[0]?.field).toBe('querystring');
    expect(JSON.stringify(body.details)).toContain('orgId');
  });

  it('prototype-looking query parameters are 400 unknown parameters', async () => {
    for (const q of ['__proto__=1', 'constructor=1', '__proto__[limit]=1000']) {
      expectError(await list(q), 400, 'validation_failed', q);
    }
  });

  it("another tenant's cursor never pages into that tenant", async () => {
    const other = await createTenant();
    const theirs = await app.inject({ method: 'GET', url: '/v1/users?limit=1', headers: other.admin.headers });
    expect(theirs.statusCode).toBe(200);
    const cursor = theirs.json<{ nextCursor: string }>().nextCursor;
    expect(typeof cursor).toBe('string');
    const res = await list(`limit=100&cursor=${cursor}`);
    if (res.statusCode === 400) {
      expectValidation(res, 'querystring.cursor');
    } else {
      expect(res.statusCode, res.body).toBe(200);
      const orgIds = res.json<{ data: { orgId: string }[] }>().data.map((u) => u.orgId);
      expect(new Set(orgIds)).toEqual(new Set(orgIds.length ? [t.org.id] : []));
    }
  });

  it('valid queries still work and a well-formed cursor pages on', async () => {
    const first = await list('limit=1');
    expect(first.statusCode, first.body).toBe(200);
    const page = first.json<{ data: unknown[]; nextCursor: string }>();
    expect(page.data).toHaveLength(1);
    expect(typeof page.nextCursor).toBe('string');
    const second = await list(`limit=1&cursor=${page.nextCursor}`);
    expect(second.statusCode, second.body).toBe(200);
  });
});

describe('SQL-looking strings that are valid input are stored and returned verbatim', () => {
  it("name \"Robert'); DROP TABLE users;--\" and email \"o'reilly@example.com\"", async () => {
    const name = "Robert'); DROP TABLE users;--";
    const email = "o'reilly@example.com";
    const created = await post({ email, name, role: 'member' });
    expect(created.statusCode, created.body).toBe(201);
    const user = created.json<{ id: string; email: string; name: string }>();
    expect(user).toMatchObject({ email, name, role: 'member', orgId: t.org.id });
    expect(user.id).toMatch(UUID_RE);

    const fetched = await app.inject({ method: 'GET', url: `/v1/users/${user.id}`, headers: t.admin.headers });
    expect(fetched.statusCode).toBe(200);
    expect(fetched.json()).toMatchObject({ id: user.id, email, name });

    const { rows } = await db.query<{ email: string; name: string }>('SELECT email, name FROM users WHERE id = $1', [
      user.id,
    ]);
    expect(rows).toEqual([{ email, name }]);

    // The table is still there and still holds everyone else.
    const table = await db.query<{ t: string | null }>("SELECT to_regclass('public.users')::text AS t");
    expect(table.rows[0]!.t).toBe('users');
    expect(await userCount(t.org.id)).toBeGreaterThan(usersBefore);
    const seeded = await db.query('SELECT 1 FROM users WHERE email = $1', ['admin@acme.com']);
    expect(seeded.rowCount).toBe(1);
  });

  it('the same email again is a 409, not a 500', async () => {
    const res = await post({ email: "o'reilly@example.com" });
    collected.push({ what: 'duplicate', status: res.statusCode, body: res.body });
    expect(res.statusCode).toBe(409);
    expect(res.json()).toMatchObject({ error: 'Conflict', code: 'email_taken' });
    assertNoLeak('duplicate', res.body);
  });

  it('a PATCH with a SQL-looking name is stored verbatim', async () => {
    const target = await t.addUser('member');
    const name = "x', role = 'owner' WHERE 1=1; --";
    const res = await app.inject({
      method: 'PATCH',
      url: `/v1/users/${target.id}`,
      headers: t.admin.headers,
      payload: { name },
    });
    expect(res.statusCode, res.body).toBe(200);
    expect(res.json()).toMatchObject({ id: target.id, name, role: 'member' });
    const owners = await db.query<{ n: number }>("SELECT count(*)::int AS n FROM users WHERE org_id = $1 AND role = 'owner'", [
      t.org.id,
    ]);
    expect(owners.rows[0]!.n).toBe(1);
  });
});

describe('x-request-id', () => {
  it('a well-formed incoming id is echoed in the header and in error bodies', async () => {
    const id = 'abc-123_x.y:z';
    const ok = await app.inject({ method: 'GET', url: '/health', headers: { 'x-request-id': id } });
    expect(ok.statusCode).toBe(200);
    expect(ok.headers['x-request-id']).toBe(id);
    expect(ok.json()).toMatchObject({ requestId: id });

    const bad = await app.inject({
      method: 'POST',
      url: '/v1/users',
      headers: { ...t.admin.headers, 'x-request-id': id },
      payload: { email: 'nope' },
    });
    expect(expectError(bad, 400, 'validation_failed').requestId).toBe(id);

    const notFound = await app.inject({ method: 'GET', url: '/no-such-route', headers: { 'x-request-id': id } });
    expect(notFound.headers['x-request-id']).toBe(id);
    expect(expectError(notFound, 404, 'route_not_found').requestId).toBe(id);
  });

  it('an id of exactly 128 safe characters is honoured', async () => {
    const id = 'a'.repeat(128);
    const res = await app.inject({ method: 'GET', url: '/health', headers: { 'x-request-id': id } });
    expect(res.headers['x-request-id']).toBe(id);
  });

  const malformed: [string, string][] = [
    ['with spaces', 'abc 123'],
    ['200 characters', 'a'.repeat(200)],
    ['non-ASCII', 'caf\u00e9-\u00fc'],
    ['a forged log line', 'abc\\n{"level":60}'],
    ['quotes and angle brackets', '"><script>'],
  ];
  it.each(malformed)('a malformed id (%s) is replaced by a generated one', async (_what, id) => {
    const res = await app.inject({
      method: 'POST',
      url: '/v1/users',
      headers: { ...t.admin.headers, 'x-request-id': id },
      payload: { email: 'nope' },
    });
    const generated = res.headers['x-request-id'];
    expect(generated).not.toBe(id);
    expect(generated).toMatch(UUID_RE);
    expect(expectError(res, 400, 'validation_failed').requestId).toBe(generated);
  });

  it('generated ids are random version-4 UUIDs, distinct across refills of the random pool', () => {
    const V4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
    const ids = Array.from({ length: 1_000 }, () => newRequestId()); // about eight pools of 128
    for (const id of ids) expect(id).toMatch(V4);
    expect(new Set(ids).size).toBe(ids.length);
    // Every random hex digit takes many values (not a constant, nor a few bytes repeated).
    for (let pos = 0; pos < 36; pos++) {
      if ([8, 13, 14, 18, 23].includes(pos)) continue; // dashes, the version digit
      const seen = new Set(ids.map((id) => id[pos]));
      expect(seen.size, `position ${pos}`).toBeGreaterThanOrEqual(pos === 19 ? 4 : 16);
    }
  });

  it('without an incoming id every response gets a distinct generated one', async () => {
    const a = await app.inject({ method: 'GET', url: '/health' });
    const b = await app.inject({ method: 'GET', url: '/health' });
    expect(a.headers['x-request-id']).toMatch(UUID_RE);
    expect(b.headers['x-request-id']).toMatch(UUID_RE);
    expect(a.headers['x-request-id']).not.toBe(b.headers['x-request-id']);
  });
});

describe('unknown routes and methods', () => {
  it('an unknown route is a JSON 404 route_not_found', async () => {
    for (const url of ['/nope', '/v1/nope', '/v1/users/00000000-0000-0000-0000-000000000001/extra', '/v2/users']) {
      const res = await app.inject({ method: 'GET', url, headers: t.admin.headers });
      const body = expectError(res, 404, 'route_not_found', url);
      expect(body.message).toContain('not found');
    }
  });

  it('an unknown route without auth headers is also a JSON 404', async () => {
    expectError(await app.inject({ method: 'GET', url: '/nope' }), 404, 'route_not_found');
  });

  it('a wrong method on a known path is a JSON 404', async () => {
    const cases: [string, string][] = [
      ['PUT', `/v1/users/${t.member.id}`],
      ['POST', `/v1/users/${t.member.id}`],
      ['DELETE', '/v1/users'],
      ['PATCH', '/v1/users'],
      ['POST', '/health'],
      ['DELETE', '/v1/me'],
    ];
    for (const [method, url] of cases) {
      const res = await app.inject({ method: method as 'PUT', url, headers: t.admin.headers, payload: { name: 'x' } });
      expectError(res, 404, 'route_not_found', `${method} ${url}`);
    }
    // Nothing was changed by the refused requests.
    const member = await db.query<{ name: string; deleted_at: Date | null }>('SELECT name, deleted_at FROM users WHERE id = $1', [
      t.member.id,
    ]);
    expect(member.rows[0]).toEqual({ name: 'Test member', deleted_at: null });
  });

  it('a path with broken percent-encoding is a 400 with the error shape and a request id', async () => {
    for (const url of ['/v1/users/%zz', '/v1/users/%E0%A4%A']) {
      const res = await app.inject({ method: 'GET', url, headers: t.admin.headers });
      expectError(res, 400, 'bad_request', url);
      expect(res.headers['x-request-id'], url).toMatch(UUID_RE);
    }
  });

  it('a very long unknown URL is a 404 that does not echo all of it', async () => {
    const res = await app.inject({ method: 'GET', url: `/${'x'.repeat(5000)}` });
    expectError(res, 404, 'route_not_found');
    expect(res.body.length).toBeLessThan(1000);
  });
});

describe('error bodies never leak internals', () => {
  it('every 4xx/5xx body collected in this file is clean', () => {
    expect(collected.length).toBeGreaterThan(80);
    for (const c of collected) {
      expect(c.status, `${c.what}: never a 5xx`).toBeLessThan(500);
      assertNoLeak(c.what, c.body);
    }
  });
});
