import { randomBytes } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SEED } from '../src/db/seed.js';
import { buildTestApp, createTenant, type TestTenant } from './helpers/app.js';
import { getTestDb } from './helpers/db.js';
import { API_KEY_SCHEME, insertApiKey } from './helpers/apiKeys.js';
import { createOidcScheme } from './helpers/oidcProvider.js';
import { SESSION_SCHEME } from './helpers/sessions.js';
import { describeTenantRouteSecurity, expectError, FAKE_SCHEME, type TenantRouteSpec } from './helpers/securitySuite.js';

const newUserBody = () => ({ email: `sec-${randomBytes(5).toString('hex')}@example.test`, name: 'Security Test' });

// Every tenant route, with the lowest role allowed to call it, as every authentication method.
const ROUTES: TenantRouteSpec[] = [
  { method: 'GET', url: () => '/v1/me', okStatus: 200 },
  { method: 'GET', url: () => '/v1/org', okStatus: 200 },
  { method: 'GET', url: () => '/v1/users', okStatus: 200 },
  { method: 'GET', url: () => '/v1/org/usage', minRole: 'admin', okStatus: 200 },
  { method: 'GET', url: () => '/v1/audit-logs', minRole: 'admin', okStatus: 200 },
  { method: 'GET', url: ({ id }) => `/v1/users/${id}`, takesId: true, okStatus: 200 },
  { method: 'POST', url: () => '/v1/users', body: newUserBody, minRole: 'admin', okStatus: 201 },
  {
    method: 'PATCH',
    url: ({ id }) => `/v1/users/${id}`,
    takesId: true,
    body: () => ({ name: 'Renamed', role: 'admin' }),
    minRole: 'admin',
    okStatus: 200,
  },
  { method: 'DELETE', url: ({ id }) => `/v1/users/${id}`, takesId: true, minRole: 'admin', okStatus: 204 },
  { method: 'GET', url: () => '/v1/api-keys', minRole: 'admin', okStatus: 200 },
  { method: 'POST', url: () => '/v1/api-keys', body: () => ({ name: 'Security test key', role: 'member' }), minRole: 'admin', okStatus: 201 },
  {
    method: 'DELETE',
    url: ({ id }) => `/v1/api-keys/${id}`,
    takesId: true,
    minRole: 'admin',
    okStatus: 204,
    makeTarget: async (t) => (await insertApiKey(await getTestDb(), t.org.id, 'member', t.owner.id)).id,
  },
];

const oidc = await createOidcScheme();
afterAll(() => oidc.stop());
for (const scheme of [FAKE_SCHEME, API_KEY_SCHEME, SESSION_SCHEME, oidc]) {
  for (const route of ROUTES) describeTenantRouteSecurity(route, scheme);
}
// A first password, set by a user signed in another way (an API key has none; a session's user
// has one already, so needs currentPassword: test/auth/sessions.test.ts).
describeTenantRouteSecurity(
  { method: 'PUT', url: () => '/v1/me/password', body: () => ({ newPassword: `sec-${randomBytes(9).toString('hex')}` }), okStatus: 204 },
  FAKE_SCHEME,
);

describe('fake auth on the public GET /health', () => {
  let app: FastifyInstance;
  let a: TestTenant;
  let b: TestTenant;
  beforeAll(async () => {
    app = await buildTestApp();
    a = await createTenant();
    b = await createTenant();
  });
  afterAll(() => app.close());

  it('no headers: 200, anonymous (no org or user in the body)', async () => {
    const res = await app.inject({ method: 'GET', url: '/health' });
    expect(res.statusCode).toBe(200);
    const body = res.json<Record<string, unknown>>();
    expect(body).not.toHaveProperty('org');
    expect(body).not.toHaveProperty('user');
    expect(body.requestId).toBe(res.headers['x-request-id']);
  });

  it("brief's Test 3, seeded data: Acme admin claiming Tech Startup -> 403 with the exact body", async () => {
    const [acme, tech] = SEED.orgs;
    const acmeAdmin = SEED.users.find((u) => u.email === 'admin@acme.com')!;
    const res = await app.inject({
      method: 'GET',
      url: '/health',
      headers: { 'x-org-id': tech.id, 'x-user-id': acmeAdmin.id },
    });
    expect(acme.id).toBe(acmeAdmin.orgId);
    expect(res.json()).toEqual({
      error: 'Forbidden',
      message: 'User does not belong to specified organization',
      code: 'forbidden',
      requestId: res.headers['x-request-id'],
    });
    expectError(res, 403, 'forbidden');
  });

  it('wrong org with fresh tenants: 403 with the exact body', async () => {
    const res = await app.inject({ method: 'GET', url: '/health', headers: { 'x-org-id': b.org.id, 'x-user-id': a.admin.id } });
    expect(res.statusCode).toBe(403);
    expect(res.json()).toEqual({
      error: 'Forbidden',
      message: 'User does not belong to specified organization',
      code: 'forbidden',
      requestId: res.headers['x-request-id'],
    });
  });

  it('only one header: 400 bad_request naming the missing one', async () => {
    const onlyOrg = expectError(await app.inject({ method: 'GET', url: '/health', headers: { 'x-org-id': a.org.id } }), 400, 'bad_request');
    expect(onlyOrg.details).toEqual([{ field: 'headers.x-user-id', message: expect.any(String) }]);
    const onlyUser = expectError(await app.inject({ method: 'GET', url: '/health', headers: { 'x-user-id': a.admin.id } }), 400, 'bad_request');
    expect(onlyUser.details).toEqual([{ field: 'headers.x-org-id', message: expect.any(String) }]);
  });

  it('malformed UUID: 400 bad_request naming the header', async () => {
    const badOrg = expectError(
      await app.inject({ method: 'GET', url: '/health', headers: { 'x-org-id': 'acme', 'x-user-id': a.admin.id } }),
      400,
      'bad_request',
    );
    expect(badOrg.details).toEqual([{ field: 'headers.x-org-id', message: expect.any(String) }]);
    const badUser = expectError(
      await app.inject({ method: 'GET', url: '/health', headers: { 'x-org-id': a.org.id, 'x-user-id': '1' } }),
      400,
      'bad_request',
    );
    expect(badUser.details).toEqual([{ field: 'headers.x-user-id', message: expect.any(String) }]);
  });

  it('unknown user, unknown org: 401 unauthorized', async () => {
    const unknownUser = { 'x-org-id': a.org.id, 'x-user-id': '6f1c1a52-2d6e-4a8e-9b7a-000000000000' };
    expectError(await app.inject({ method: 'GET', url: '/health', headers: unknownUser }), 401, 'unauthorized');
    const unknownOrg = { 'x-org-id': '6f1c1a52-2d6e-4a8e-9b7a-000000000000', 'x-user-id': a.admin.id };
    expectError(await app.inject({ method: 'GET', url: '/health', headers: unknownOrg }), 401, 'unauthorized');
  });

  it('soft-deleted user: 401 unauthorized', async () => {
    const u = await a.addUser('member');
    await (await getTestDb()).query('UPDATE users SET deleted_at = now() WHERE id = $1', [u.id]);
    expectError(await app.inject({ method: 'GET', url: '/health', headers: u.headers }), 401, 'unauthorized');
  });

  it('upper-case UUIDs and surrounding spaces in the headers identify the same user', async () => {
    const headers = { 'x-org-id': ` ${a.org.id.toUpperCase()} `, 'x-user-id': a.member.id.toUpperCase() };
    const res = await app.inject({ method: 'GET', url: '/v1/me', headers });
    expect(res.statusCode).toBe(200);
    expect(res.json()).toMatchObject({ id: a.member.id, orgId: a.org.id, role: 'member' });
  });

  it('valid headers: 200 with org and user {id, email, role}', async () => {
    const res = await app.inject({ method: 'GET', url: '/health', headers: a.member.headers });
    expect(res.statusCode).toBe(200);
    expect(res.json()).toEqual({
      status: 'ok',
      env: 'test',
      timestamp: expect.any(String),
      requestId: res.headers['x-request-id'],
      database: 'connected',
      rateLimiter: 'memory',
      authCache: 'ok',
      org: a.org.id,
      user: { id: a.member.id, email: a.member.email, role: 'member' },
    });
  });
});
