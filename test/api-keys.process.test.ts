import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hashApiKeySecret } from '../src/models/apiKey.model.js';
import { bearer } from './helpers/apiKeys.js';
import { LIMITS_OFF, createTenant, type TestTenant } from './helpers/app.js';
import { getTestDb, onPostgres, testDatabaseUrl } from './helpers/db.js';
import { msUntil, startServer, type ServerProcess } from './helpers/serverProcess.js';

/**
 * API keys across real server processes on one PostgreSQL, each with its own auth cache: a key
 * revoked, re-roled or expired through one instance (or straight in the database) stops working
 * on the other within a second. And neither server writes a key, or its hash, to any log line,
 * with every log level on.
 * Several processes on one database need PostgreSQL: the embedded database is single-process, so
 * this suite is skipped there.
 */

const REVOCATION_BOUND_MS = 1_000;

// Debug and trace lines too, and the access log: every line a server can write is searched.
const env = { ...LIMITS_OFF, ACCESS_LOG: 'true', LOG_LEVEL: 'trace' };

/** Every secret these tests used: no server may have logged any of them. */
const secrets: string[] = [];

async function call(server: ServerProcess, path: string, init: RequestInit = {}): Promise<{ status: number; body: Record<string, unknown> | null }> {
  const res = await fetch(`${server.baseUrl}${path}`, { ...init, signal: AbortSignal.timeout(5_000) });
  const text = await res.text();
  return { status: res.status, body: text ? (JSON.parse(text) as Record<string, unknown>) : null };
}

async function newKey(server: ServerProcess, t: TestTenant, role: string): Promise<{ id: string; secret: string }> {
  const res = await call(server, '/v1/api-keys', {
    method: 'POST',
    headers: { ...t.owner.headers, 'content-type': 'application/json' },
    body: JSON.stringify({ name: `process ${role}`, role }),
  });
  expect(res.status).toBe(201);
  const key = res.body as { id: string; secret: string };
  secrets.push(key.secret);
  return key;
}

/** Who the server takes the key for, from its auth cache (no other query): /health. */
async function statusAs(server: ServerProcess, secret: string): Promise<number> {
  return (await call(server, '/health', { headers: bearer(secret) })).status;
}

describe.skipIf(!onPostgres)('API keys across server processes (PostgreSQL only: the embedded database serves one process)', () => {
  let a: ServerProcess;
  let b: ServerProcess;

  beforeAll(async () => {
    [a, b] = await Promise.all([startServer({ database: { url: testDatabaseUrl! }, env }), startServer({ database: { url: testDatabaseUrl! }, env })]);
  }, 60_000);

  afterAll(async () => {
    await Promise.all([a?.kill(), b?.kill()]);
  });

  it('a key revoked through one instance is refused by the other within a second', async () => {
    const t = await createTenant();
    const key = await newKey(a, t, 'admin');
    expect(await statusAs(b, key.secret)).toBe(200); // cached on b
    expect(await statusAs(b, key.secret)).toBe(200);
    const del = await call(a, `/v1/api-keys/${key.id}`, { method: 'DELETE', headers: t.owner.headers });
    expect(del.status).toBe(204);
    // The instance that revoked it forgets it at once.
    expect(await statusAs(a, key.secret)).toBe(401);
    const ms = await msUntil(async () => (await statusAs(b, key.secret)) === 401, 5_000);
    expect(ms).toBeLessThan(REVOCATION_BOUND_MS);
  });

  it('a key revoked, or expired, in the database is refused by every instance within a second', async () => {
    const t = await createTenant();
    const revoked = await newKey(a, t, 'member');
    const expired = await newKey(a, t, 'member');
    for (const s of [a, b]) for (const k of [revoked, expired]) expect(await statusAs(s, k.secret)).toBe(200);
    const db = await getTestDb();
    await db.query('UPDATE api_keys SET revoked_at = now() WHERE id = $1', [revoked.id]);
    await db.query("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1", [expired.id]);
    for (const s of [a, b]) {
      for (const k of [revoked, expired]) {
        const ms = await msUntil(async () => (await statusAs(s, k.secret)) === 401, 5_000);
        expect(ms).toBeLessThan(REVOCATION_BOUND_MS);
      }
    }
  });

  it("a key's role lowered in the database applies on every instance within a second", async () => {
    const t = await createTenant();
    const key = await newKey(a, t, 'admin');
    const canListKeys = async (s: ServerProcess) => (await call(s, '/v1/api-keys', { headers: bearer(key.secret) })).status;
    for (const s of [a, b]) expect(await canListKeys(s)).toBe(200);
    await (await getTestDb()).query("UPDATE api_keys SET role = 'member' WHERE id = $1", [key.id]);
    for (const s of [a, b]) {
      const ms = await msUntil(async () => (await canListKeys(s)) === 403, 5_000);
      expect(ms).toBeLessThan(REVOCATION_BOUND_MS);
    }
  });

  it('no log line of either server holds a key or its hash', async () => {
    // A key used in a URL by mistake, and a failed one, on top of everything above.
    const t = await createTenant();
    const key = await newKey(b, t, 'admin');
    expect((await call(b, `/v1/users?key=${key.secret}`, { headers: bearer(key.secret) })).status).toBe(400);
    expect((await call(b, '/v1/users', { headers: bearer(`${key.secret.slice(0, -1)}0`) })).status).toBe(401);
    expect((await call(b, '/v1/users', { headers: bearer(key.secret) })).status).toBe(200);
    // Logged at all (so the search is not vacuous): the requests, at debug the authentications.
    await b.waitForLog((l) => l.msg === 'request completed' && typeof l.url === 'string' && l.url.includes('llmk_[redacted]'));
    for (const s of [a, b]) {
      expect(s.logs.some((l) => l.msg === 'Request authenticated')).toBe(true);
      const all = s.logs.map((l) => JSON.stringify(l)).join('\n') + s.rawOutput();
      for (const secret of secrets) {
        const hash = hashApiKeySecret(secret);
        for (const needle of [secret, secret.slice(12), hash.toString('hex'), hash.toString('base64')]) {
          expect(all.includes(needle), `a log line holds ${needle.slice(0, 16)}…`).toBe(false);
        }
      }
    }
    expect(secrets.length).toBe(5);
  });
});
