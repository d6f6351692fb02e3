import { randomBytes, randomUUID } from 'node:crypto';
import type { FastifyInstance, InjectOptions, LightMyRequestResponse } from 'fastify';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Database } from '../src/infra/database.js';
import { setOrgLimitOverrides } from '../src/models/orgLimits.model.js';
import { addUsage } from '../src/models/usage.model.js';
import type { Role } from '../src/types/context.js';
import { insertApiKey } from './helpers/apiKeys.js';
import { buildTestApp, createTenant, type TestTenant } from './helpers/app.js';
import { bearer, SESSION_ENV, sessionToken, setPassword } from './helpers/sessions.js';
import { getTestDb, onPostgres, openTestDatabase, testDatabaseUrl } from './helpers/db.js';

/**
 * Every /v1 route, called as org B with org A's ids and with random ids: the answers must be the
 * same (a 404 or an empty result, with the same body), and nothing of org A may show. The route
 * list is checked against the OpenAPI document, so a new route without a case here fails.
 */

let app: FastifyInstance;
let db: Database;
let a: TestTenant;
let b: TestTenant;
/** B's callers with API keys of each role (besides its users with the development headers). */
let bKeys: Record<Role, Caller>;
/** B's users with access tokens of password sessions. */
let bSessions: Record<Role, Caller>;
/** Every id org A has: its org, users, audit entries, API keys, sessions. */
let aIds: string[];
/** Every string that would betray org A in a response. */
let aSecrets: string[];

const ROLES: Role[] = ['owner', 'admin', 'member'];
const userCursor = (id: string) => Buffer.from(`u1:${id}`).toString('base64url');
const keyCursor = (id: string) => Buffer.from(`k1:${id}`).toString('base64url');

/** Whoever calls: a user (development headers) or an API key (Authorization). */
interface Caller {
  headers: Record<string, string>;
}
const newEmail = () => `iso-${randomBytes(5).toString('hex')}@example.test`;

interface RouteCase {
  /** The request as `caller`, with `id` wherever the route takes an id (path, cursor, filter, body). */
  request(caller: Caller, id: string): InjectOptions;
  /** What must be equal between an answer to A's id and one to a random id. */
  comparable(res: LightMyRequestResponse): unknown;
}

/** Status and body without what differs from one request to the next. */
function sameAnswer(res: LightMyRequestResponse): unknown {
  const body = res.body ? (JSON.parse(res.body) as Record<string, unknown>) : null;
  if (body) delete body.requestId;
  return { status: res.statusCode, body };
}

const get = (url: string) => (caller: Caller): InjectOptions => ({ method: 'GET', url, headers: caller.headers });

// Keyed "METHOD openapi-path".
const CASES: Record<string, RouteCase> = {
  'GET /v1/me': { request: (c) => get('/v1/me')(c), comparable: sameAnswer },
  'GET /v1/org': { request: (c) => get('/v1/org')(c), comparable: sameAnswer },
  'GET /v1/org/usage': {
    request: (c) => get('/v1/org/usage')(c),
    // Usage moves with every request; what matters is whose it is.
    comparable: (res) => ({ status: res.statusCode, orgId: res.statusCode === 200 ? res.json<{ orgId: string }>().orgId : null }),
  },
  'GET /v1/users': { request: (c, id) => get(`/v1/users?cursor=${userCursor(id)}`)(c), comparable: sameAnswer },
  'GET /v1/users/{id}': { request: (c, id) => get(`/v1/users/${id}`)(c), comparable: sameAnswer },
  'PATCH /v1/users/{id}': {
    request: (c, id) => ({ method: 'PATCH', url: `/v1/users/${id}`, headers: c.headers, payload: { name: 'Taken Over' } }),
    comparable: sameAnswer,
  },
  'DELETE /v1/users/{id}': {
    request: (c, id) => ({ method: 'DELETE', url: `/v1/users/${id}`, headers: c.headers }),
    comparable: sameAnswer,
  },
  'POST /v1/users': {
    // The id slot is the user's email: A's user's address (or a fresh one) must not conflict in B.
    request: (c, email) => ({ method: 'POST', url: '/v1/users', headers: c.headers, payload: { email, role: 'member' } }),
    comparable: (res) => ({ status: res.statusCode, orgId: res.statusCode === 201 ? res.json<{ orgId: string }>().orgId : null }),
  },
  'GET /v1/audit-logs': {
    request: (c, id) => get(`/v1/audit-logs?actorId=${id}`)(c),
    comparable: sameAnswer,
  },
  'GET /v1/api-keys': { request: (c, id) => get(`/v1/api-keys?cursor=${keyCursor(id)}`)(c), comparable: sameAnswer },
  'POST /v1/api-keys': {
    // No id to give: what matters is whose key it makes.
    request: (c) => ({ method: 'POST', url: '/v1/api-keys', headers: c.headers, payload: { name: 'iso key', role: 'member' } }),
    comparable: (res) => ({ status: res.statusCode, orgId: res.statusCode === 201 ? res.json<{ orgId: string }>().orgId : null }),
  },
  'DELETE /v1/api-keys/{id}': {
    request: (c, id) => ({ method: 'DELETE', url: `/v1/api-keys/${id}`, headers: c.headers }),
    comparable: sameAnswer,
  },
  // Sign-in to B with the email of A's user (the id slot is an email here): the answer of an unknown email.
  'POST /v1/auth/login': {
    request: (_c, email) => ({ method: 'POST', url: '/v1/auth/login', payload: { orgSlug: b.org.slug, email, password: 'not-the-password-1' } }),
    comparable: sameAnswer,
  },
  'POST /v1/auth/refresh': {
    request: (_c, id) => ({ method: 'POST', url: '/v1/auth/refresh', payload: { refreshToken: refreshTokenFrom(id) } }),
    comparable: sameAnswer,
  },
  'POST /v1/auth/logout': {
    request: (_c, id) => ({ method: 'POST', url: '/v1/auth/logout', payload: { refreshToken: refreshTokenFrom(id) } }),
    comparable: sameAnswer,
  },
  // The caller's own password (B's users have one; a key has none): refused, whatever the id.
  'PUT /v1/me/password': {
    request: (c, id) => ({ method: 'PUT', url: '/v1/me/password', headers: c.headers, payload: { currentPassword: `not-it-${id}`, newPassword: `fresh-${id}` } }),
    comparable: sameAnswer,
  },
};

/** A well-formed refresh token made of an id's hex digits. */
const refreshTokenFrom = (id: string) => `llmr_${id.replace(/-/g, '').padEnd(43, '0')}`;
/** Routes whose id slot takes an email of A's users rather than an id. */
const EMAIL_ROUTES = new Set(['POST /v1/users', 'POST /v1/auth/login']);

async function snapshotA(): Promise<unknown[]> {
  const users = await db.query('SELECT * FROM users WHERE org_id = $1 ORDER BY id', [a.org.id]);
  const org = await db.query('SELECT * FROM orgs WHERE id = $1', [a.org.id]);
  const audit = await db.query('SELECT id, seq, hash FROM audit_logs WHERE org_id = $1 ORDER BY seq', [a.org.id]);
  const keys = await db.query('SELECT * FROM api_keys WHERE org_id = $1 ORDER BY id', [a.org.id]);
  const sessions = await db.query('SELECT * FROM sessions WHERE org_id = $1 ORDER BY id', [a.org.id]);
  return [users.rows, org.rows, audit.rows, keys.rows, sessions.rows];
}

function expectNothingOfA(res: LightMyRequestResponse, except: string[] = []): void {
  for (const secret of aSecrets) {
    if (except.includes(secret)) continue;
    expect(res.body.includes(secret), `response ${res.statusCode} reveals ${secret}: ${res.body.slice(0, 300)}`).toBe(false);
  }
}

beforeAll(async () => {
  db = await getTestDb();
  app = await buildTestApp({ db, env: SESSION_ENV });
  a = await createTenant(db);
  b = await createTenant(db);
  for (const t of [a, b]) {
    // Rows in every tenant table: users (above), limits, usage, audit entries and API keys (from the API).
    await setOrgLimitOverrides(db, t.org.id, { orgBurst: 500 });
    await addUsage(db, { orgIds: [t.org.id], days: ['2026-01-02'], requests: [3] });
    const res = await app.inject({ method: 'POST', url: '/v1/users', headers: t.owner.headers, payload: { email: newEmail() } });
    expect(res.statusCode).toBe(201);
    await app.inject({ method: 'POST', url: '/v1/users', headers: t.member.headers, payload: { email: newEmail() } }); // 403, audited
    for (const role of ROLES) {
      const key = await app.inject({ method: 'POST', url: '/v1/api-keys', headers: t.owner.headers, payload: { name: `iso-${randomBytes(5).toString('hex')}`, role } });
      expect(key.statusCode).toBe(201);
    }
    // A user with a password, signed in (sessions rows).
    const password = `${t.org.slug}-password`;
    await setPassword(db, t.member, password);
    const signIn = await app.inject({ method: 'POST', url: '/v1/auth/login', payload: { orgSlug: t.org.slug, email: t.member.email, password } });
    expect(signIn.statusCode).toBe(200);
  }
  const keyCallers: Partial<Record<Role, Caller>> = {};
  for (const role of ROLES) keyCallers[role] = { headers: (await insertApiKey(db, b.org.id, role, b.owner.id)).headers };
  bKeys = keyCallers as Record<Role, Caller>;
  const sessionCallers: Partial<Record<Role, Caller>> = {};
  for (const role of ROLES) sessionCallers[role] = { headers: bearer(await sessionToken(db, b[role])) };
  bSessions = sessionCallers as Record<Role, Caller>;
  await app.refusalAudit.settled();
  const users = await db.query<{ id: string; email: string }>('SELECT id, email FROM users WHERE org_id = $1', [a.org.id]);
  const audit = await db.query<{ id: string }>('SELECT id FROM audit_logs WHERE org_id = $1', [a.org.id]);
  const keys = await db.query<{ id: string; name: string; prefix: string }>('SELECT id, name, prefix FROM api_keys WHERE org_id = $1', [a.org.id]);
  expect(audit.rows.length).toBeGreaterThanOrEqual(3);
  expect(keys.rows.length).toBe(3);
  const sessions = await db.query<{ id: string; session_id: string }>('SELECT id, session_id FROM sessions WHERE org_id = $1', [a.org.id]);
  expect(sessions.rows.length).toBe(1);
  aIds = [
    a.org.id,
    ...users.rows.map((u) => u.id),
    ...audit.rows.map((r) => r.id),
    ...keys.rows.map((k) => k.id),
    ...sessions.rows.flatMap((r) => [r.id, r.session_id]),
  ];
  aSecrets = [...aIds, ...users.rows.map((u) => u.email), a.org.slug, ...keys.rows.flatMap((k) => [k.name, k.prefix])];
});
afterAll(() => app.close());

describe('every /v1 route, called as org B with org A ids', () => {
  it('has a case for every /v1 route and method in the OpenAPI document, and no other', async () => {
    const doc = (await app.inject({ method: 'GET', url: '/openapi.json' })).json<{ paths: Record<string, Record<string, unknown>> }>();
    const routes = Object.entries(doc.paths)
      .filter(([p]) => p.startsWith('/v1/'))
      .flatMap(([p, methods]) => Object.keys(methods).map((m) => `${m.toUpperCase()} ${p}`))
      .sort();
    expect(routes).toEqual(Object.keys(CASES).sort());
  });

  it('lists of org B contain nothing of org A (before B creates users with the addresses of A\u2019s)', async () => {
    for (const url of ['/v1/users?limit=100', '/v1/audit-logs?limit=100', '/v1/api-keys?limit=100', '/v1/me', '/v1/org', '/v1/org/usage']) {
      for (const caller of [b.owner, bKeys.owner, bSessions.owner]) {
        const res = await app.inject({ method: 'GET', url, headers: caller.headers });
        expect({ url, status: res.statusCode }).toEqual({ url, status: 200 });
        expectNothingOfA(res);
      }
    }
  });

  it('answers exactly as for a random id, reveals nothing of org A and changes nothing of it (property-based)', async () => {
    const before = await snapshotA();
    const aEmails = (await db.query<{ email: string }>('SELECT email FROM users WHERE org_id = $1', [a.org.id])).rows.map((r) => r.email);
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(...Object.keys(CASES)),
        fc.constantFrom(...aIds),
        fc.uuid(),
        fc.constantFrom(...ROLES),
        fc.constantFrom(...aEmails),
        fc.constantFrom('headers', 'key', 'session'),
        async (route, aId, randomId, role, aEmail, how) => {
          const c = CASES[route]!;
          const isPost = EMAIL_ROUTES.has(route);
          // B's user with the development headers or an access token, or B's API key of the same role.
          const caller = how === 'key' ? bKeys[role] : how === 'session' ? bSessions[role] : b[role];
          const foreign = await app.inject(c.request(caller, isPost ? aEmail : aId));
          const random = await app.inject(c.request(caller, isPost ? newEmail() : randomId.toLowerCase()));
          expect(c.comparable(foreign)).toEqual(c.comparable(random));
          expect(foreign.statusCode).toBeLessThan(500);
          expectNothingOfA(foreign, isPost ? [aEmail] : []);
          if (route === 'POST /v1/users') {
            // Free the address again for the next run (a deleted user's address can be reused).
            for (const res of [foreign, random].filter((r) => r.statusCode === 201)) {
              await db.query('UPDATE users SET deleted_at = now() WHERE id = $1', [res.json<{ id: string }>().id]);
            }
          }
        },
      ),
      { numRuns: 200 },
    );
    expect(await snapshotA()).toEqual(before);
  });

  it('an A id and a random id as the cursor of the users list get the same 400', async () => {
    const foreign = await app.inject(CASES['GET /v1/users']!.request(b.owner, a.member.id));
    const random = await app.inject(CASES['GET /v1/users']!.request(b.owner, randomUUID()));
    expect(foreign.statusCode).toBe(400);
    expect(sameAnswer(foreign)).toEqual(sameAnswer(random));
  });

  it('an A id as the audit-log actor filter gives the same empty page as a random id', async () => {
    const foreign = await app.inject(CASES['GET /v1/audit-logs']!.request(b.owner, a.owner.id));
    expect(foreign.json()).toEqual({ data: [], nextCursor: null });
  });
});

describe('a pool of one connection, serving org A and org B in turn', () => {
  let single: Database;
  let singleApp: FastifyInstance;
  beforeAll(async () => {
    single = onPostgres ? await openTestDatabase(testDatabaseUrl, 1) : db;
    singleApp = await buildTestApp({ db: single });
  });
  afterAll(async () => {
    await singleApp.close();
    if (single !== db) await single.close();
  });

  it('every answer holds only the caller\u2019s org, and the connection ends with no role or org of theirs', async () => {
    for (let i = 0; i < 24; i++) {
      const [me, other] = i % 2 === 0 ? [a, b] : [b, a];
      const caller = me.owner;
      const calls: (InjectOptions & { url: string })[] = [
        { method: 'GET', url: '/v1/users?limit=100', headers: caller.headers },
        { method: 'GET', url: '/v1/me', headers: caller.headers },
        { method: 'GET', url: '/v1/org', headers: caller.headers },
        { method: 'GET', url: '/v1/audit-logs?limit=100', headers: caller.headers },
        { method: 'GET', url: '/v1/api-keys?limit=100', headers: caller.headers },
        { method: 'GET', url: `/v1/users/${other.owner.id}`, headers: caller.headers },
        ...(i % 6 === 0 ? [{ method: 'POST' as const, url: '/v1/users', headers: caller.headers, payload: { email: newEmail() } }] : []),
      ];
      for (const call of calls) {
        const res = await singleApp.inject(call);
        const label = `${call.method} ${call.url} as ${me === a ? 'A' : 'B'}`;
        expect({ label, status: res.statusCode }).toEqual({ label, status: call.url.startsWith('/v1/users/') ? 404 : call.method === 'POST' ? 201 : 200 });
        expect({ label, leaks: res.body.includes(other.org.id) || res.body.includes(other.owner.id) }).toEqual({ label, leaks: false });
        if (call.url.startsWith('/v1/users?') || call.url.startsWith('/v1/api-keys?')) {
          const orgs = new Set(res.json<{ data: { orgId: string }[] }>().data.map((u) => u.orgId));
          expect([...orgs]).toEqual([me.org.id]);
        }
      }
    }
    const { rows } = await single.query<{ who: string; org: string | null }>(
      "SELECT current_user::text AS who, current_setting('app.org_id', true) AS org",
    );
    expect(rows[0]!.who).not.toBe('llm_app_tenant');
    expect(rows[0]!.org ?? '').toBe('');
  });
});
