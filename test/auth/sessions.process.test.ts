import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LIMITS_OFF, createTenant, type TestTenant, type TestUser } from '../helpers/app.js';
import { getTestDb, onPostgres, testDatabaseUrl } from '../helpers/db.js';
import { msUntil, startServer, type ServerProcess } from '../helpers/serverProcess.js';
import { newPassword, setPassword, TEST_SIGNING_KEY, type Tokens } from '../helpers/sessions.js';

/**
 * Sessions across instances: two real server processes on one PostgreSQL, sharing the signing key
 * (so each accepts the other's access tokens) and each with its own auth cache. A session ended
 * through one instance (logout, reuse of a refresh token, a deleted user, a changed role, a
 * password change) must be refused by the other within a second. And no secret of any of it may
 * appear in either server's logs. Several processes on one database need PostgreSQL.
 */

const REVOCATION_BOUND_MS = 1_000;

// Every line the server can write: debug level and the access log on.
const env = { ...LIMITS_OFF, ACCESS_LOG: 'true', LOG_LEVEL: 'debug', JWT_SIGNING_KEY: TEST_SIGNING_KEY };

/** Every secret the tests handle, to be searched for in the logs at the end. */
const secrets: string[] = [TEST_SIGNING_KEY];

async function post(server: ServerProcess, url: string, body: unknown, headers: Record<string, string> = {}): Promise<Response> {
  return fetch(`${server.baseUrl}${url}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(5_000),
  });
}

async function signIn(server: ServerProcess, t: TestTenant, u: TestUser, password: string): Promise<Tokens> {
  const res = await post(server, '/v1/auth/login', { orgSlug: t.org.slug, email: u.email, password });
  expect(res.status).toBe(200);
  const tokens = (await res.json()) as Tokens;
  // The whole token and its signature alone: a log line must hold neither.
  secrets.push(tokens.accessToken, tokens.accessToken.split('.')[2]!, tokens.refreshToken, tokens.refreshToken.slice(5));
  return tokens;
}

/** /health with the access token: whether that server still takes it (no other query). */
async function statusWith(server: ServerProcess, accessToken: string): Promise<number> {
  const res = await fetch(`${server.baseUrl}/health`, { headers: { authorization: `Bearer ${accessToken}` }, signal: AbortSignal.timeout(5_000) });
  await res.arrayBuffer();
  return res.status;
}

describe.skipIf(!onPostgres)('sessions across server processes', () => {
  let a: ServerProcess;
  let b: ServerProcess;
  let t: TestTenant;

  beforeAll(async () => {
    [a, b] = await Promise.all([
      startServer({ database: { url: testDatabaseUrl! }, env }),
      startServer({ database: { url: testDatabaseUrl! }, env }),
    ]);
    t = await createTenant();
  }, 60_000);

  afterAll(async () => {
    await Promise.all([a?.kill(), b?.kill()]);
  });

  /** A fresh user with a password, signed in on `a` and known (cached) on `b`. */
  async function signedInEverywhere(role: 'member' | 'admin' = 'member') {
    const u = await t.addUser(role);
    const password = await setPassword(await getTestDb(), u);
    secrets.push(password);
    const tokens = await signIn(a, t, u, password);
    expect(await statusWith(b, tokens.accessToken)).toBe(200);
    expect(await statusWith(b, tokens.accessToken)).toBe(200); // now from b's cache
    return { u, password, tokens };
  }

  it('logout through one instance: the other refuses the access token within a second', async () => {
    const { tokens } = await signedInEverywhere();
    expect((await post(a, '/v1/auth/logout', { refreshToken: tokens.refreshToken })).status).toBe(204);
    const ms = await msUntil(async () => (await statusWith(b, tokens.accessToken)) === 401, 5_000);
    expect(ms).toBeLessThan(REVOCATION_BOUND_MS);
  });

  it('reuse of a refresh token on one instance: the other refuses the session within a second', async () => {
    const { tokens } = await signedInEverywhere();
    const rotated = (await (await post(b, '/v1/auth/refresh', { refreshToken: tokens.refreshToken })).json()) as Tokens;
    secrets.push(rotated.accessToken, rotated.refreshToken);
    expect(await statusWith(b, rotated.accessToken)).toBe(200);
    expect((await post(a, '/v1/auth/refresh', { refreshToken: tokens.refreshToken })).status).toBe(401);
    const ms = await msUntil(async () => (await statusWith(b, rotated.accessToken)) === 401, 5_000);
    expect(ms).toBeLessThan(REVOCATION_BOUND_MS);
  });

  it('a user deleted through one instance: the other refuses their access token within a second', async () => {
    const { u, tokens } = await signedInEverywhere();
    const del = await fetch(`${a.baseUrl}/v1/users/${u.id}`, { method: 'DELETE', headers: t.owner.headers });
    expect(del.status).toBe(204);
    const ms = await msUntil(async () => (await statusWith(b, tokens.accessToken)) === 401, 5_000);
    expect(ms).toBeLessThan(REVOCATION_BOUND_MS);
  });

  it('a role changed through one instance: the other refuses the access token within a second', async () => {
    const { u, tokens } = await signedInEverywhere('admin');
    const patch = await fetch(`${a.baseUrl}/v1/users/${u.id}`, {
      method: 'PATCH',
      headers: { ...t.owner.headers, 'content-type': 'application/json' },
      body: JSON.stringify({ role: 'member' }),
    });
    expect(patch.status).toBe(200);
    const ms = await msUntil(async () => (await statusWith(b, tokens.accessToken)) === 401, 5_000);
    expect(ms).toBeLessThan(REVOCATION_BOUND_MS);
  });

  it('a password changed through one instance: the other refuses the other sessions within a second, not the current one', async () => {
    const { u, password, tokens: current } = await signedInEverywhere();
    const other = await signIn(a, t, u, password);
    expect(await statusWith(b, other.accessToken)).toBe(200);
    const next = newPassword();
    secrets.push(next);
    const put = await fetch(`${a.baseUrl}/v1/me/password`, {
      method: 'PUT',
      headers: { authorization: `Bearer ${current.accessToken}`, 'content-type': 'application/json' },
      body: JSON.stringify({ currentPassword: password, newPassword: next }),
    });
    expect(put.status).toBe(204);
    const ms = await msUntil(async () => (await statusWith(b, other.accessToken)) === 401, 5_000);
    expect(ms).toBeLessThan(REVOCATION_BOUND_MS);
    expect(await statusWith(b, current.accessToken)).toBe(200);
  });

  it('failed sign-ins and refused tokens too, and then: no password, access token, refresh token or signing key in any log line', async () => {
    const u = await t.addUser('member');
    const password = await setPassword(await getTestDb(), u);
    secrets.push(password, `${password}-wrong`);
    expect((await post(a, '/v1/auth/login', { orgSlug: t.org.slug, email: u.email, password: `${password}-wrong` })).status).toBe(401);
    const ok = await signIn(b, t, u, password);
    // Tokens sent in places where they are refused or malformed.
    expect((await post(a, '/v1/auth/refresh', { refreshToken: `${ok.refreshToken}x` })).status).toBe(401);
    expect(await statusWith(a, `${ok.accessToken}x`)).toBe(401);
    const res = await fetch(`${a.baseUrl}/v1/me?token=${encodeURIComponent('not-a-secret')}`, { headers: { authorization: `Bearer ${ok.accessToken}` } });
    expect(res.status).toBe(200);

    for (const server of [a, b]) {
      await server.waitForLog((l) => l.msg === 'request completed');
      const text = `${server.logs.map((l) => JSON.stringify(l)).join('\n')}\n${server.rawOutput()}`;
      expect(server.logs.length).toBeGreaterThan(10);
      for (const secret of secrets) {
        expect(text.includes(secret), `a log line of the server contains a secret (${secret.slice(0, 6)}…)`).toBe(false);
      }
      // The access log is there, and shows the routes.
      expect(server.logs.some((l) => l.msg === 'request completed' && l.url === '/v1/auth/login')).toBe(true);
    }
  });
});
