import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { softDeleteOrg } from '../src/models/org.model.js';
import { LIMITS_OFF, createTenant, type TestUser } from './helpers/app.js';
import { getTestDb, onPostgres, testDatabaseUrl } from './helpers/db.js';
import { msUntil, startServer, type ServerProcess } from './helpers/serverProcess.js';
import { startTcpProxy, type TcpProxy } from './helpers/tcpProxy.js';

/**
 * Revocation across instances: two real server processes on one PostgreSQL, each with its own auth
 * cache. A change made through one (or straight in the database) must stop the other from serving
 * the old caller within a second; with the invalidation channel cut, within the TTL.
 * Several processes on one database need PostgreSQL: the embedded database is single-process.
 */

const REVOCATION_BOUND_MS = 1_000;
const CHANNEL_LOSS_TTL_MS = 1_500;

const env = { ...LIMITS_OFF, ACCESS_LOG: 'false' };

async function me(server: ServerProcess, u: TestUser): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(`${server.baseUrl}/v1/me`, { headers: u.headers, signal: AbortSignal.timeout(5_000) });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

/** /health with auth headers: who the server's auth takes the caller for, without any other query. */
async function whoAmI(server: ServerProcess, u: TestUser): Promise<number> {
  const res = await fetch(`${server.baseUrl}/health`, { headers: u.headers, signal: AbortSignal.timeout(5_000) });
  await res.arrayBuffer();
  return res.status;
}

async function health(server: ServerProcess): Promise<Record<string, unknown>> {
  const res = await fetch(`${server.baseUrl}/health`, { signal: AbortSignal.timeout(5_000) });
  return (await res.json()) as Record<string, unknown>;
}

describe.skipIf(!onPostgres)('revocation across server processes', () => {
  let a: ServerProcess;
  let b: ServerProcess;
  let proxy: TcpProxy;
  let cut: ServerProcess;

  beforeAll(async () => {
    const target = new URL(testDatabaseUrl!);
    proxy = await startTcpProxy(target.hostname, Number(target.port || 5432));
    [a, b, cut] = await Promise.all([
      startServer({ database: { url: testDatabaseUrl! }, env }),
      startServer({ database: { url: testDatabaseUrl! }, env }),
      // Its queries go straight to the database; only its invalidation channel goes through the proxy.
      startServer({
        database: { url: testDatabaseUrl! },
        env: { ...env, DATABASE_LISTEN_URL: proxy.urlFor(testDatabaseUrl!), AUTH_CACHE_TTL_MS: String(CHANNEL_LOSS_TTL_MS) },
      }),
    ]);
  }, 60_000);

  afterAll(async () => {
    await Promise.all([a?.kill(), b?.kill(), cut?.kill()]);
    await proxy?.close();
  });

  it('a user deleted through one instance is refused by the other within a second', async () => {
    const t = await createTenant();
    const u = await t.addUser('member');
    expect(await whoAmI(b, u)).toBe(200); // cached on b
    expect(await whoAmI(b, u)).toBe(200);
    const del = await fetch(`${a.baseUrl}/v1/users/${u.id}`, { method: 'DELETE', headers: t.owner.headers });
    expect(del.status).toBe(204);
    const ms = await msUntil(async () => (await whoAmI(b, u)) === 401, 5_000);
    expect(ms).toBeLessThan(REVOCATION_BOUND_MS);
  });

  it('a role changed through one instance applies on the other within a second', async () => {
    const t = await createTenant();
    const u = await t.addUser('admin');
    expect((await me(b, u)).body.role).toBe('admin');
    const patch = await fetch(`${a.baseUrl}/v1/users/${u.id}`, {
      method: 'PATCH',
      headers: { ...t.owner.headers, 'content-type': 'application/json' },
      body: JSON.stringify({ role: 'member' }),
    });
    expect(patch.status).toBe(200);
    const ms = await msUntil(async () => (await me(b, u)).body.role === 'member', 5_000);
    expect(ms).toBeLessThan(REVOCATION_BOUND_MS);
    // And the demoted user is refused what needs an admin.
    const create = await fetch(`${b.baseUrl}/v1/users`, {
      method: 'POST',
      headers: { ...u.headers, 'content-type': 'application/json' },
      body: JSON.stringify({ email: 'nope@example.test' }),
    });
    expect(create.status).toBe(403);
  });

  it('an org deleted in the database is refused by every instance within a second', async () => {
    const t = await createTenant();
    for (const s of [a, b]) expect(await whoAmI(s, t.member)).toBe(200);
    expect(await softDeleteOrg(await getTestDb(), t.org.id)).toBe(true);
    for (const s of [a, b]) {
      const ms = await msUntil(async () => (await whoAmI(s, t.member)) === 401, 5_000);
      expect(ms).toBeLessThan(REVOCATION_BOUND_MS);
    }
  });

  it('with its invalidation channel cut, an instance serves a revoked user no longer than the TTL, then reconnects', async () => {
    expect(await health(cut)).toMatchObject({ authCache: 'ok' });
    await proxy.stop();
    await msUntil(async () => (await health(cut)).authCache === 'degraded', 10_000);

    const t = await createTenant();
    const u = await t.addUser('member');
    const beforeLookup = performance.now();
    expect(await whoAmI(cut, u)).toBe(200); // cached from now, for at most the TTL
    await (await getTestDb()).query('UPDATE users SET deleted_at = now() WHERE id = $1', [u.id]);
    // Nobody can tell it: it keeps taking the request for the deleted user's...
    expect(await whoAmI(cut, u)).toBe(200);
    // ...until the TTL, counted from when the lookup was made.
    await msUntil(async () => (await whoAmI(cut, u)) === 401, CHANNEL_LOSS_TTL_MS + 1_000);
    expect(performance.now() - beforeLookup).toBeLessThan(CHANNEL_LOSS_TTL_MS + 500);
    expect(cut.logs.some((l) => typeof l.msg === 'string' && l.msg.startsWith('Auth cache invalidation channel lost'))).toBe(true);

    await proxy.start();
    await msUntil(async () => (await health(cut)).authCache === 'ok', 10_000);
    const v = await t.addUser('admin');
    expect((await me(cut, v)).body.role).toBe('admin');
    await (await getTestDb()).query("UPDATE users SET role = 'member' WHERE id = $1", [v.id]);
    const ms = await msUntil(async () => (await me(cut, v)).body.role === 'member', 5_000);
    expect(ms).toBeLessThan(REVOCATION_BOUND_MS);
  }, 30_000);
});
