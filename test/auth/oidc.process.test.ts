import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LIMITS_OFF, createTenant, type TestTenant, type TestUser } from '../helpers/app.js';
import { onPostgres, testDatabaseUrl } from '../helpers/db.js';
import { makeKey, OIDC_AUDIENCE, startProvider, type TestKey, type TestProvider } from '../helpers/oidcProvider.js';
import { msUntil, startServer, type ServerProcess } from '../helpers/serverProcess.js';

/**
 * The provider's tokens across real server processes on one PostgreSQL: a user deleted or demoted
 * through one instance is refused (or demoted) by the other within a second; and a server whose
 * provider is down at start starts anyway. Several processes on one database need PostgreSQL.
 */

const REVOCATION_BOUND_MS = 1_000;

async function me(server: ServerProcess, token: string): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(`${server.baseUrl}/v1/me`, { headers: { authorization: `Bearer ${token}` }, signal: AbortSignal.timeout(5_000) });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

describe.skipIf(!onPostgres)('OIDC tokens across server processes', () => {
  let provider: TestProvider;
  let down: TestProvider;
  let key: TestKey;
  let a: ServerProcess;
  let b: ServerProcess;
  let orphan: ServerProcess;

  const envFor = (p: TestProvider) => ({ ...LIMITS_OFF, ACCESS_LOG: 'false', AUTH_METHODS: 'oidc,fake', OIDC_ISSUER: p.issuer, OIDC_AUDIENCE });
  const tokenOf = (u: TestUser, t: TestTenant, p = provider) => p.sign(key, { email: u.email, org_id: t.org.slug });

  beforeAll(async () => {
    key = await makeKey('RS256');
    [provider, down] = await Promise.all([startProvider({ keys: [key] }), startProvider({ keys: [key] })]);
    await down.stop();
    [a, b, orphan] = await Promise.all([
      startServer({ database: { url: testDatabaseUrl! }, env: envFor(provider) }),
      startServer({ database: { url: testDatabaseUrl! }, env: envFor(provider) }),
      startServer({ database: { url: testDatabaseUrl! }, env: envFor(down) }),
    ]);
  }, 90_000);

  afterAll(async () => {
    await Promise.all([a?.kill(), b?.kill(), orphan?.kill()]);
    await Promise.all([provider?.close(), down?.close()]);
  });

  it('a user deleted through one instance is refused by the other within a second', async () => {
    const t = await createTenant();
    const u = await t.addUser('member');
    const token = await tokenOf(u, t);
    expect((await me(b, token)).status).toBe(200);
    expect((await me(b, token)).status).toBe(200); // cached on b
    const del = await fetch(`${a.baseUrl}/v1/users/${u.id}`, { method: 'DELETE', headers: { authorization: `Bearer ${await tokenOf(t.owner, t)}` } });
    expect(del.status).toBe(204);
    const ms = await msUntil(async () => (await me(b, token)).status === 401, 5_000);
    expect(ms).toBeLessThan(REVOCATION_BOUND_MS);
  });

  it('a role changed through one instance applies on the other within a second', async () => {
    const t = await createTenant();
    const u = await t.addUser('admin');
    const token = await tokenOf(u, t);
    expect((await me(b, token)).body.role).toBe('admin');
    const patch = await fetch(`${a.baseUrl}/v1/users/${u.id}`, {
      method: 'PATCH',
      headers: { ...t.owner.headers, 'content-type': 'application/json' },
      body: JSON.stringify({ role: 'member' }),
    });
    expect(patch.status).toBe(200);
    const ms = await msUntil(async () => (await me(b, token)).body.role === 'member', 5_000);
    expect(ms).toBeLessThan(REVOCATION_BOUND_MS);
  });

  it('a server whose provider is down at start serves, answers its tokens 503, and logs why', async () => {
    const health = await fetch(`${orphan.baseUrl}/health`, { signal: AbortSignal.timeout(5_000) });
    expect(health.status).toBe(200);
    const t = await createTenant();
    const res = await fetch(`${orphan.baseUrl}/v1/me`, { headers: { authorization: `Bearer ${await tokenOf(t.member, t, down)}` } });
    expect(res.status).toBe(503);
    expect(Number(res.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
    expect(((await res.json()) as { code: string }).code).toBe('service_unavailable');
    expect(orphan.logs.some((l) => typeof l.msg === 'string' && l.msg.startsWith('OIDC provider discovery') && l.level === 40)).toBe(true);
    // The development headers still work there.
    const fake = await fetch(`${orphan.baseUrl}/v1/me`, { headers: t.member.headers });
    expect(fake.status).toBe(200);
  });
});
