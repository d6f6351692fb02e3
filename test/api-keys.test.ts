import { createHash, randomUUID } from 'node:crypto';
import type { FastifyInstance, InjectOptions, LightMyRequestResponse } from 'fastify';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../src/app.js';
import { AUTH_CHANNEL } from '../src/auth/index.js';
import type { Config } from '../src/config/env.js';
import type { Database } from '../src/infra/database.js';
import { loggerOptions } from '../src/infra/logger.js';
import { API_KEY_FORMAT, hashApiKeySecret, newApiKeySecret } from '../src/models/apiKey.model.js';
import { softDeleteOrg } from '../src/models/org.model.js';
import { createUserInOrg } from '../src/models/user.model.js';
import { createRateLimiter } from '../src/ratelimit/index.js';
import type { RequestContext } from '../src/types/context.js';
import { bearer, insertApiKey } from './helpers/apiKeys.js';
import { buildTestApp, createTenant, testConfig, type TestTenant } from './helpers/app.js';
import { getTestDb, onPostgres, openTestDatabase, silentLogger, testDatabaseUrl } from './helpers/db.js';
import { startTcpProxy } from './helpers/tcpProxy.js';
import { expectError, withoutRequestId } from './helpers/securitySuite.js';

/**
 * API keys end to end: created, listed and revoked through the API with their audit rows; the
 * secret shown once and stored only as its SHA-256; a key authenticates as its org with its role
 * on every route; revoked, expired, unknown and malformed keys and keys of deleted orgs are 401;
 * the last use is written in batches; no log line ever holds a secret.
 */

let app: FastifyInstance;
let db: Database;
let t: TestTenant;
let other: TestTenant;

interface KeyBody {
  id: string;
  orgId: string;
  name: string;
  role: string;
  prefix: string;
  createdBy: { type: string; id: string };
  createdAt: string;
  expiresAt: string | null;
  revokedAt: string | null;
  lastUsedAt: string | null;
  secret?: string;
}

const json = { 'content-type': 'application/json' };

async function createKey(
  caller: { headers: Record<string, string> },
  body: Record<string, unknown> = { name: 'test key', role: 'member' },
  theApp = app,
): Promise<LightMyRequestResponse> {
  return theApp.inject({ method: 'POST', url: '/v1/api-keys', headers: { ...caller.headers, ...json }, payload: body });
}

/** A key made through the API; returns its description and the secret. */
async function newKey(caller: { headers: Record<string, string> }, role = 'member', theApp = app): Promise<KeyBody & { secret: string }> {
  const res = await createKey(caller, { name: `key ${randomUUID().slice(0, 8)}`, role }, theApp);
  expect({ status: res.statusCode, body: res.body }).toMatchObject({ status: 201 });
  return res.json();
}

const as = (secret: string) => ({ headers: bearer(secret) });

async function auditRows(orgId: string, action: string) {
  const { rows } = await db.query<{ actor_type: string; actor_id: string | null; target_type: string | null; target_id: string | null; metadata: Record<string, unknown> }>(
    'SELECT actor_type, actor_id, target_type, target_id, metadata FROM audit_logs WHERE org_id = $1 AND action = $2 ORDER BY seq',
    [orgId, action],
  );
  return rows;
}

/** The app on the shared database with a changed configuration and, optionally, a logger of its own. */
async function customApp(
  patch: (c: Config) => Config,
  logger = silentLogger,
  env: Record<string, string> = {},
  database: Database = db,
): Promise<FastifyInstance> {
  const config = patch(testConfig(env));
  const limiter = createRateLimiter(config, database, silentLogger);
  await limiter.ready(5_000);
  const custom = await buildApp({ config, db: database, limiter: limiter.limiter, logger });
  custom.addHook('onClose', () => limiter.close());
  await custom.ready();
  return custom;
}

const withFlushInterval = (ms: number) => (c: Config): Config => ({ ...c, rateLimit: { ...c.rateLimit, usageFlushIntervalMs: ms } });
const HOUR = 3_600_000;

async function lastUsedInDb(keyId: string): Promise<Date | null> {
  const { rows } = await db.query<{ last_used_at: Date | null }>('SELECT last_used_at FROM api_keys WHERE id = $1', [keyId]);
  return rows[0]!.last_used_at;
}

beforeAll(async () => {
  db = await getTestDb();
  app = await buildTestApp({ db });
  t = await createTenant(db);
  other = await createTenant(db);
});
afterAll(() => app.close());

describe('creating a key', () => {
  it('answers 201 with the secret once, the description, no-store; the database holds only its SHA-256 and prefix', async () => {
    const res = await createKey(t.admin, { name: '  billing service  ', role: 'admin' });
    expect(res.statusCode).toBe(201);
    expect(res.headers['cache-control']).toBe('no-store');
    const key = res.json<KeyBody & { secret: string }>();
    expect(key).toEqual({
      id: expect.any(String),
      orgId: t.org.id,
      name: 'billing service',
      role: 'admin',
      prefix: key.secret.slice(0, 12),
      createdBy: { type: 'user', id: t.admin.id },
      createdAt: expect.any(String),
      expiresAt: null,
      revokedAt: null,
      lastUsedAt: null,
      secret: expect.stringMatching(API_KEY_FORMAT),
    });

    // Stored: the SHA-256 of the secret, as bytes; the secret itself nowhere in the row.
    const { rows } = await db.query<{ secret_hash: Uint8Array; prefix: string; whole: string }>(
      'SELECT secret_hash, prefix, to_jsonb(k)::text AS whole FROM api_keys k WHERE id = $1',
      [key.id],
    );
    expect(Buffer.from(rows[0]!.secret_hash).equals(createHash('sha256').update(key.secret).digest())).toBe(true);
    expect(rows[0]!.prefix).toBe(key.secret.slice(0, 12));
    expect(rows[0]!.whole).not.toContain(key.secret);
    expect(rows[0]!.whole).not.toContain(key.secret.slice(12));

    // Never again: not in the list, not on /v1/me of the key, not in the audit log.
    for (const url of ['/v1/api-keys?limit=100', '/v1/audit-logs?limit=100']) {
      const list = await app.inject({ method: 'GET', url, headers: t.owner.headers });
      expect(list.statusCode).toBe(200);
      expect(list.body).not.toContain(key.secret.slice(12));
      expect(list.body).not.toContain('secret');
    }
    const me = await app.inject({ method: 'GET', url: '/v1/me', headers: bearer(key.secret) });
    expect(me.body).not.toContain(key.secret.slice(12));
  });

  it('issues llmk_ + 43 base62 characters (256 random bits): 100 keys all distinct, every character in use', () => {
    const secrets = Array.from({ length: 100 }, () => newApiKeySecret());
    expect(new Set(secrets).size).toBe(100);
    for (const s of secrets) {
      expect(s).toMatch(/^llmk_[0-9A-Za-z]{43}$/);
      expect(s).toHaveLength(48);
    }
    // 4,300 characters drawn from 62: each appears ~69 times; one never seen would mean a narrow alphabet.
    const seen = new Set(secrets.flatMap((s) => [...s.slice(5)]));
    expect(seen.size).toBe(62);
    // 43 base62 characters hold log2(62) * 43 = 256.03 bits.
    expect(Math.log2(62) * 43).toBeGreaterThanOrEqual(256);
    // No two share even their displayed prefix often: 100 keys, 7 random characters each.
    expect(new Set(secrets.map((s) => s.slice(0, 12))).size).toBeGreaterThanOrEqual(99);
  });

  it('through the API: 20 keys, all distinct, all in the format', async () => {
    const keys = await Promise.all(Array.from({ length: 20 }, () => newKey(t.owner)));
    expect(new Set(keys.map((k) => k.secret)).size).toBe(20);
    expect(new Set(keys.map((k) => k.id)).size).toBe(20);
    for (const k of keys) expect(k.secret).toMatch(API_KEY_FORMAT);
  });

  it('caps the role at the creator\u2019s: an admin cannot mint an owner key, an owner can', async () => {
    expectError(await createKey(t.admin, { name: 'x', role: 'owner' }), 403, 'forbidden');
    expect((await createKey(t.admin, { name: 'x', role: 'admin' })).statusCode).toBe(201);
    expect((await createKey(t.owner, { name: 'x', role: 'owner' })).statusCode).toBe(201);
    // The same cap for a key creating keys: its own role.
    const adminKey = await newKey(t.owner, 'admin');
    expectError(await createKey(as(adminKey.secret), { name: 'x', role: 'owner' }), 403, 'forbidden');
    const child = await createKey(as(adminKey.secret), { name: 'child', role: 'admin' });
    expect(child.statusCode).toBe(201);
    expect(child.json().createdBy).toEqual({ type: 'api_key', id: adminKey.id });
  });

  it('members get 403 on every API key route', async () => {
    const key = await newKey(t.owner);
    expectError(await createKey(t.member), 403, 'forbidden');
    expectError(await app.inject({ method: 'GET', url: '/v1/api-keys', headers: t.member.headers }), 403, 'forbidden');
    expectError(await app.inject({ method: 'DELETE', url: `/v1/api-keys/${key.id}`, headers: t.member.headers }), 403, 'forbidden');
  });

  it.each([
    ['no name', { role: 'member' }, 'body.name'],
    ['an empty name', { name: '   ' }, 'body.name'],
    ['a name with a control character', { name: 'a\u0000b' }, 'body.name'],
    ['an unknown role', { name: 'x', role: 'root' }, 'body.role'],
    ['an unknown field', { name: 'x', scopes: ['all'] }, 'body'],
    ['an expiry in the past', { name: 'x', expiresAt: '2020-01-01T00:00:00Z' }, 'body.expiresAt'],
    ['an expiry that is not a date-time', { name: 'x', expiresAt: 'tomorrow' }, 'body.expiresAt'],
    ['an expiry without a time zone', { name: 'x', expiresAt: '2099-01-01T00:00:00' }, 'body.expiresAt'],
  ])('refuses %s with 400 naming the field', async (_what, body, field) => {
    const res = await createKey(t.owner, body);
    const err = expectError(res, 400, 'validation_failed');
    expect(err.details?.[0]?.field).toBe(field);
  });

  it('writes api_key.created in the same transaction: actor the caller, target the key, no secret', async () => {
    const key = await newKey(t.admin, 'member');
    const rows = (await auditRows(t.org.id, 'api_key.created')).filter((r) => r.target_id === key.id);
    expect(rows).toEqual([
      {
        actor_type: 'user',
        actor_id: t.admin.id,
        target_type: 'api_key',
        target_id: key.id,
        metadata: { name: key.name, role: 'member', prefix: key.prefix, expiresAt: null },
      },
    ]);
    expect(JSON.stringify(rows)).not.toContain(key.secret.slice(12));
  });

  it('a refused creation writes no key and no audit row', async () => {
    const before = (await db.query('SELECT count(*)::int AS n FROM api_keys WHERE org_id = $1', [t.org.id])).rows[0];
    const audit = (await auditRows(t.org.id, 'api_key.created')).length;
    expectError(await createKey(t.admin, { name: 'x', role: 'owner' }), 403, 'forbidden');
    expect((await db.query('SELECT count(*)::int AS n FROM api_keys WHERE org_id = $1', [t.org.id])).rows[0]).toEqual(before);
    expect((await auditRows(t.org.id, 'api_key.created')).length).toBe(audit);
  });
});

describe('listing keys', () => {
  it('newest first, paginated with limit and cursor, no secrets, nothing of another org', async () => {
    const fresh = await createTenant(db);
    const made = [];
    for (let i = 0; i < 5; i++) made.push(await newKey(fresh.owner));
    await newKey(other.owner);
    const page1 = await app.inject({ method: 'GET', url: '/v1/api-keys?limit=2', headers: fresh.admin.headers });
    expect(page1.statusCode).toBe(200);
    const p1 = page1.json<{ data: KeyBody[]; nextCursor: string | null }>();
    expect(p1.data.map((k) => k.id)).toEqual([made[4]!.id, made[3]!.id]);
    expect(p1.nextCursor).toEqual(expect.any(String));
    const p2 = (await app.inject({ method: 'GET', url: `/v1/api-keys?limit=2&cursor=${p1.nextCursor}`, headers: fresh.admin.headers })).json();
    const p3 = (await app.inject({ method: 'GET', url: `/v1/api-keys?limit=2&cursor=${p2.nextCursor}`, headers: fresh.admin.headers })).json();
    expect([...p2.data, ...p3.data].map((k: KeyBody) => k.id)).toEqual([made[2]!.id, made[1]!.id, made[0]!.id]);
    expect(p3.nextCursor).toBeNull();
    for (const k of [...p1.data, ...p2.data, ...p3.data]) {
      expect(k).not.toHaveProperty('secret');
      expect(k.orgId).toBe(fresh.org.id);
    }
  });

  it('refuses a bad limit or cursor with 400', async () => {
    expectError(await app.inject({ method: 'GET', url: '/v1/api-keys?limit=0', headers: t.admin.headers }), 400, 'validation_failed');
    expectError(await app.inject({ method: 'GET', url: '/v1/api-keys?limit=101', headers: t.admin.headers }), 400, 'validation_failed');
    expectError(await app.inject({ method: 'GET', url: '/v1/api-keys?cursor=nonsense', headers: t.admin.headers }), 400, 'validation_failed');
    expectError(await app.inject({ method: 'GET', url: '/v1/api-keys?unknown=1', headers: t.admin.headers }), 400, 'validation_failed');
  });
});

describe('revoking a key', () => {
  it('204, the key is refused at once (401 with WWW-Authenticate), shown revoked, audited once', async () => {
    const key = await newKey(t.owner, 'admin');
    expect((await app.inject({ method: 'GET', url: '/v1/users', headers: bearer(key.secret) })).statusCode).toBe(200);
    const del = await app.inject({ method: 'DELETE', url: `/v1/api-keys/${key.id}`, headers: t.admin.headers });
    expect(del.statusCode).toBe(204);
    expect(del.body).toBe('');
    const refused = await app.inject({ method: 'GET', url: '/v1/users', headers: bearer(key.secret) });
    expect(expectError(refused, 401, 'unauthorized').message).toContain('revoked');
    expect(refused.headers['www-authenticate']).toBe('Bearer realm="llm-app", error="invalid_token"');

    const listed = (await app.inject({ method: 'GET', url: '/v1/api-keys?limit=100', headers: t.admin.headers })).json<{ data: KeyBody[] }>();
    expect(listed.data.find((k) => k.id === key.id)?.revokedAt).toEqual(expect.any(String));

    // Again: still 204, nothing more recorded.
    expect((await app.inject({ method: 'DELETE', url: `/v1/api-keys/${key.id}`, headers: t.admin.headers })).statusCode).toBe(204);
    const rows = (await auditRows(t.org.id, 'api_key.revoked')).filter((r) => r.target_id === key.id);
    expect(rows).toEqual([
      { actor_type: 'user', actor_id: t.admin.id, target_type: 'api_key', target_id: key.id, metadata: { name: key.name, role: 'admin', prefix: key.prefix } },
    ]);
  });

  it('another org\u2019s key or a random id: 404 with the same body, and the other org\u2019s key still works', async () => {
    const foreignKey = await newKey(other.owner);
    const foreign = expectError(await app.inject({ method: 'DELETE', url: `/v1/api-keys/${foreignKey.id}`, headers: t.owner.headers }), 404, 'not_found');
    const random = expectError(await app.inject({ method: 'DELETE', url: `/v1/api-keys/${randomUUID()}`, headers: t.owner.headers }), 404, 'not_found');
    expect(withoutRequestId(foreign)).toEqual(withoutRequestId(random));
    expect((await app.inject({ method: 'GET', url: '/v1/me', headers: bearer(foreignKey.secret) })).statusCode).toBe(200);
    const { rows } = await db.query('SELECT revoked_at FROM api_keys WHERE id = $1', [foreignKey.id]);
    expect(rows).toEqual([{ revoked_at: null }]);
  });

  it('only owners revoke owner keys; a key may revoke itself', async () => {
    const ownerKey = await newKey(t.owner, 'owner');
    expectError(await app.inject({ method: 'DELETE', url: `/v1/api-keys/${ownerKey.id}`, headers: t.admin.headers }), 403, 'forbidden');
    expect((await app.inject({ method: 'DELETE', url: `/v1/api-keys/${ownerKey.id}`, headers: bearer(ownerKey.secret) })).statusCode).toBe(204);
    expectError(await app.inject({ method: 'GET', url: '/v1/me', headers: bearer(ownerKey.secret) }), 401, 'unauthorized');
    expect((await auditRows(t.org.id, 'api_key.revoked')).filter((r) => r.target_id === ownerKey.id)).toEqual([
      expect.objectContaining({ actor_type: 'api_key', actor_id: ownerKey.id }),
    ]);
  });

  it('a malformed id is a 400', async () => {
    expectError(await app.inject({ method: 'DELETE', url: '/v1/api-keys/not-a-uuid', headers: t.owner.headers }), 400, 'validation_failed');
  });
});

describe('authenticating with a key', () => {
  it('acts as its org with its role: an admin key lists users and creates one; a member key cannot create keys', async () => {
    const adminKey = await newKey(t.owner, 'admin');
    const users = await app.inject({ method: 'GET', url: '/v1/users?limit=100', headers: bearer(adminKey.secret) });
    expect(users.statusCode).toBe(200);
    expect(users.json().data.map((u: { orgId: string }) => u.orgId)).toContain(t.org.id);
    const created = await app.inject({
      method: 'POST',
      url: '/v1/users',
      headers: { ...bearer(adminKey.secret), ...json },
      payload: { email: `k-${randomUUID().slice(0, 8)}@example.test` },
    });
    expect(created.statusCode).toBe(201);
    expect((await auditRows(t.org.id, 'user.created')).find((r) => r.target_id === created.json().id)).toMatchObject({
      actor_type: 'api_key',
      actor_id: adminKey.id,
    });

    const memberKey = await newKey(t.owner, 'member');
    expect((await app.inject({ method: 'GET', url: '/v1/users', headers: bearer(memberKey.secret) })).statusCode).toBe(200);
    expectError(await createKey(as(memberKey.secret)), 403, 'forbidden');
    expectError(await app.inject({ method: 'GET', url: '/v1/audit-logs', headers: bearer(memberKey.secret) }), 403, 'forbidden');
  });

  it('GET /v1/me answers with the key; /health shows it as the caller', async () => {
    const key = await newKey(t.owner, 'admin');
    const me = await app.inject({ method: 'GET', url: '/v1/me', headers: bearer(key.secret) });
    expect(me.statusCode).toBe(200);
    expect(me.json()).toEqual({
      type: 'api_key',
      id: key.id,
      orgId: t.org.id,
      name: key.name,
      role: 'admin',
      prefix: key.prefix,
      createdAt: key.createdAt,
      expiresAt: null,
    });
    const health = await app.inject({ method: 'GET', url: '/health', headers: bearer(key.secret) });
    expect(health.json()).toMatchObject({ org: t.org.id, user: { id: key.id, email: null, role: 'admin' } });
  });

  it('outlives its creator: the admin who made it is deleted, the key keeps working', async () => {
    const creator = await t.addUser('admin');
    const key = await newKey(creator, 'admin');
    expect((await app.inject({ method: 'DELETE', url: `/v1/users/${creator.id}`, headers: t.owner.headers })).statusCode).toBe(204);
    expectError(await app.inject({ method: 'GET', url: '/v1/me', headers: creator.headers }), 401, 'unauthorized');
    expect((await app.inject({ method: 'GET', url: '/v1/users', headers: bearer(key.secret) })).statusCode).toBe(200);
    expect((await createKey(as(key.secret), { name: 'still here', role: 'member' })).statusCode).toBe(201);
  });

  it('a key of org A on org B\u2019s ids: 404 like a random id, on every route that takes an id', async () => {
    const key = await newKey(t.owner, 'owner');
    const bKey = await newKey(other.owner);
    const calls: { label: string; foreignId: string; request: (id: string) => InjectOptions }[] = [
      { label: 'GET /v1/users/:id', foreignId: other.member.id, request: (id) => ({ method: 'GET', url: `/v1/users/${id}` }) },
      {
        label: 'PATCH /v1/users/:id',
        foreignId: other.member.id,
        request: (id) => ({ method: 'PATCH', url: `/v1/users/${id}`, headers: json, payload: { name: 'Taken' } }),
      },
      { label: 'DELETE /v1/users/:id', foreignId: other.member.id, request: (id) => ({ method: 'DELETE', url: `/v1/users/${id}` }) },
      { label: 'DELETE /v1/api-keys/:id', foreignId: bKey.id, request: (id) => ({ method: 'DELETE', url: `/v1/api-keys/${id}` }) },
    ];
    for (const { label, foreignId, request } of calls) {
      const send = (id: string) => {
        const r = request(id);
        return app.inject({ ...r, headers: { ...r.headers, ...bearer(key.secret) } });
      };
      const foreign = await send(foreignId);
      const random = await send(randomUUID());
      expect({ label, status: foreign.statusCode }).toEqual({ label, status: 404 });
      expect(withoutRequestId(expectError(foreign, 404, 'not_found'))).toEqual(withoutRequestId(expectError(random, 404, 'not_found')));
    }
    expect((await app.inject({ method: 'GET', url: '/v1/me', headers: bearer(bKey.secret) })).statusCode).toBe(200);
    // And the id-bearing queries: a cursor of B's and B's ids as filters find nothing.
    const cursor = Buffer.from(`k1:${bKey.id}`).toString('base64url');
    expectError(await app.inject({ method: 'GET', url: `/v1/api-keys?cursor=${cursor}`, headers: bearer(key.secret) }), 400, 'validation_failed');
    const audit = await app.inject({ method: 'GET', url: `/v1/audit-logs?actorId=${other.owner.id}`, headers: bearer(key.secret) });
    expect(audit.json()).toEqual({ data: [], nextCursor: null });
  });

  it.each([
    ['never issued', () => newApiKeySecret(), 'Invalid API key'],
    ['too short', () => newApiKeySecret().slice(0, 20), 'Malformed API key'],
    ['too long', () => `${newApiKeySecret()}0`, 'Malformed API key'],
    ['not base62', () => `${newApiKeySecret().slice(0, 47)}-`, 'Malformed API key'],
    ['the prefix alone', () => 'llmk_', 'Malformed API key'],
  ])('a key that is %s: 401 with WWW-Authenticate', async (_what, secret, message) => {
    const res = await app.inject({ method: 'GET', url: '/v1/me', headers: bearer(secret()) });
    expect(expectError(res, 401, 'unauthorized').message).toBe(message);
    expect(res.headers['www-authenticate']).toBe('Bearer realm="llm-app", error="invalid_token"');
  });

  it('a key whose expires_at passed (set in the database): 401', async () => {
    const key = await newKey(t.owner);
    expect((await app.inject({ method: 'GET', url: '/v1/me', headers: bearer(key.secret) })).statusCode).toBe(200);
    await db.query("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1", [key.id]);
    await app.authenticator.sync();
    const res = await app.inject({ method: 'GET', url: '/v1/me', headers: bearer(key.secret) });
    expect(expectError(res, 401, 'unauthorized').message).toContain('expired');
  });

  it('a key that expires while cached is refused from its expiry on, without another lookup', async () => {
    const expiresAt = new Date(Date.now() + 3_000);
    const res = await createKey(t.owner, { name: 'short-lived', expiresAt: expiresAt.toISOString() });
    expect(res.statusCode).toBe(201);
    const key = res.json<KeyBody & { secret: string }>();
    expect(key.expiresAt).toBe(expiresAt.toISOString());
    expect((await app.inject({ method: 'GET', url: '/v1/me', headers: bearer(key.secret) })).statusCode).toBe(200);
    const loads = app.authenticator.stats().loads;
    // The cache keeps entries for AUTH_CACHE_TTL_MS (30 s): only the expiry check can refuse it.
    for (;;) {
      const sentAt = Date.now();
      const status = (await app.inject({ method: 'GET', url: '/v1/me', headers: bearer(key.secret) })).statusCode;
      if (status === 200) {
        // Accepted: it was checked after it was sent, and before the expiry.
        expect(sentAt).toBeLessThan(expiresAt.getTime());
      } else {
        expect(status).toBe(401);
        // Refused: it was checked before the answer came, and after the expiry.
        expect(Date.now()).toBeGreaterThanOrEqual(expiresAt.getTime());
        break;
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    expect(app.authenticator.stats().loads).toBe(loads);
  });

  it('a key of a deleted org: 401', async () => {
    const gone = await createTenant(db);
    const key = await newKey(gone.owner, 'owner');
    expect((await app.inject({ method: 'GET', url: '/v1/me', headers: bearer(key.secret) })).statusCode).toBe(200);
    expect(await softDeleteOrg(db, gone.org.id)).toBe(true);
    await app.authenticator.sync();
    expectError(await app.inject({ method: 'GET', url: '/v1/me', headers: bearer(key.secret) }), 401, 'unauthorized');
  });

  it('a refused revoked or expired key is audited in its org as auth.failed by the key; an unknown one nowhere', async () => {
    const fresh = await createTenant(db);
    const revoked = await insertApiKey(db, fresh.org.id, 'admin', fresh.owner.id, { revoked: true });
    const expired = await insertApiKey(db, fresh.org.id, 'admin', fresh.owner.id, { expiresAt: new Date(Date.now() - 60_000) });
    for (const k of [revoked, expired]) {
      expect((await app.inject({ method: 'GET', url: '/v1/users', headers: k.headers })).statusCode).toBe(401);
    }
    expect((await app.inject({ method: 'GET', url: '/v1/users', headers: bearer(newApiKeySecret()) })).statusCode).toBe(401);
    await app.refusalAudit.settled();
    const rows = await auditRows(fresh.org.id, 'auth.failed');
    expect(rows).toEqual([
      { actor_type: 'api_key', actor_id: revoked.id, target_type: null, target_id: null, metadata: { status: 401, method: 'GET', route: '/v1/users' } },
      { actor_type: 'api_key', actor_id: expired.id, target_type: null, target_id: null, metadata: { status: 401, method: 'GET', route: '/v1/users' } },
    ]);
  });

  it('refusals of one org are audited in the order they happened', async () => {
    const fresh = await createTenant(db);
    const keys = [];
    for (let i = 0; i < 8; i++) keys.push(await insertApiKey(db, fresh.org.id, 'admin', fresh.owner.id, { revoked: true }));
    for (const k of keys) expect((await app.inject({ method: 'GET', url: '/v1/users', headers: k.headers })).statusCode).toBe(401);
    await app.refusalAudit.settled();
    const rows = await auditRows(fresh.org.id, 'auth.failed');
    expect(rows.map((r) => r.actor_id)).toEqual(keys.map((k) => k.id));
  });

  it('a 403 to a key is audited as access.denied by the key', async () => {
    const fresh = await createTenant(db);
    const key = await insertApiKey(db, fresh.org.id, 'member', fresh.owner.id);
    expect((await app.inject({ method: 'GET', url: '/v1/api-keys', headers: key.headers })).statusCode).toBe(403);
    await app.refusalAudit.settled();
    expect(await auditRows(fresh.org.id, 'access.denied')).toEqual([
      expect.objectContaining({ actor_type: 'api_key', actor_id: key.id }),
    ]);
  });
});

describe('the models re-check a key under the org lock', () => {
  const ctxOf = (k: { id: string; orgId: string }, role: RequestContext['role']): RequestContext => ({
    userId: k.id,
    orgId: k.orgId,
    role,
    email: null,
    authMethod: 'api_key',
    credentialId: k.id,
  });
  const meta = { requestId: 'test', ip: null, userAgent: null };
  const email = () => `m-${randomUUID().slice(0, 8)}@example.test`;

  it('acts with the key\u2019s current role, and not at all once it is revoked or expired', async () => {
    const key = await insertApiKey(db, t.org.id, 'admin', t.owner.id);
    // Authenticated as admin a moment ago; the key is a member now.
    await db.query("UPDATE api_keys SET role = 'member' WHERE id = $1", [key.id]);
    await expect(createUserInOrg(db, ctxOf(key, 'admin'), { email: email(), role: 'member' }, meta)).rejects.toMatchObject({ code: 'forbidden' });
    await db.query("UPDATE api_keys SET role = 'admin' WHERE id = $1", [key.id]);
    await expect(createUserInOrg(db, ctxOf(key, 'admin'), { email: email(), role: 'member' }, meta)).resolves.toMatchObject({ orgId: t.org.id });
    await db.query("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1", [key.id]);
    await expect(createUserInOrg(db, ctxOf(key, 'admin'), { email: email(), role: 'member' }, meta)).rejects.toMatchObject({ code: 'unauthorized' });
    await db.query('UPDATE api_keys SET expires_at = NULL, revoked_at = now() WHERE id = $1', [key.id]);
    await expect(createUserInOrg(db, ctxOf(key, 'admin'), { email: email(), role: 'member' }, meta)).rejects.toMatchObject({ code: 'unauthorized' });
  });

  it('a key id used as a user id (or the reverse) does not pass', async () => {
    // A user context with a key's id and a key context with a user's id both find nobody.
    const key = await insertApiKey(db, t.org.id, 'owner', t.owner.id);
    const asUser: RequestContext = { ...ctxOf(key, 'owner'), authMethod: 'fake', credentialId: null };
    await expect(createUserInOrg(db, asUser, { email: email(), role: 'member' }, meta)).rejects.toMatchObject({ code: 'unauthorized' });
    await expect(createUserInOrg(db, ctxOf({ id: t.owner.id, orgId: t.org.id }, 'owner'), { email: email(), role: 'member' }, meta)).rejects.toMatchObject({
      code: 'unauthorized',
    });
  });
});

describe('last use, written in batches', () => {
  it('is not written per request but by a flush, never moves backwards, and shows in the list', async () => {
    const batched = await customApp(withFlushInterval(HOUR));
    try {
      const keys = [await insertApiKey(db, t.org.id, 'admin', t.owner.id), await insertApiKey(db, t.org.id, 'member', t.owner.id)];
      let lastRequestAt = 0;
      for (let i = 0; i < 10; i++) {
        for (const k of keys) {
          lastRequestAt = Date.now();
          expect((await batched.inject({ method: 'GET', url: '/v1/me', headers: k.headers })).statusCode).toBe(200);
        }
      }
      // Twenty requests, no timer tick possible in an hour: nothing written yet.
      for (const k of keys) expect(await lastUsedInDb(k.id)).toBeNull();
      await batched.bearerMethods.flush();
      for (const k of keys) {
        const at = await lastUsedInDb(k.id);
        expect(at).not.toBeNull();
        expect(at!.getTime()).toBeGreaterThanOrEqual(lastRequestAt - 1_000);
        expect(at!.getTime()).toBeLessThanOrEqual(Date.now());
      }
      const listed = (await batched.inject({ method: 'GET', url: '/v1/api-keys?limit=100', headers: t.owner.headers })).json<{ data: KeyBody[] }>();
      expect(listed.data.find((k) => k.id === keys[0]!.id)?.lastUsedAt).toBe((await lastUsedInDb(keys[0]!.id))!.toISOString());

      // Another instance wrote a later use already: an older one does not replace it.
      const later = new Date(Date.now() + 86_400_000);
      await db.query('UPDATE api_keys SET last_used_at = $2 WHERE id = $1', [keys[0]!.id, later.toISOString()]);
      expect((await batched.inject({ method: 'GET', url: '/v1/me', headers: keys[0]!.headers })).statusCode).toBe(200);
      await batched.bearerMethods.flush();
      expect((await lastUsedInDb(keys[0]!.id))!.getTime()).toBe(later.getTime());
    } finally {
      await batched.close();
    }
  });

  it('writing the last use does not flush the auth caches; revoking does', async () => {
    const key = await insertApiKey(db, t.org.id, 'member', t.owner.id);
    const messages: string[] = [];
    const sub = db.subscribe(AUTH_CHANNEL, { onMessage: (p) => messages.push(p), onConnected: () => undefined, onDisconnected: () => undefined });
    try {
      for (let i = 0; i < 50 && !sub.connected; i++) await new Promise((r) => setTimeout(r, 20));
      expect(sub.connected).toBe(true);
      await db.query('UPDATE api_keys SET last_used_at = now() WHERE id = $1', [key.id]);
      await db.query("UPDATE api_keys SET last_used_at = now() + interval '1 second' WHERE id = $1", [key.id]);
      await db.query('UPDATE api_keys SET revoked_at = now() WHERE id = $1', [key.id]);
      for (let i = 0; i < 100 && !messages.includes(`k:${key.id}`); i++) await new Promise((r) => setTimeout(r, 20));
      // Messages arrive in commit order: the revocation's is the first about this key, and the only one.
      expect(messages.filter((m) => m.endsWith(key.id))).toEqual([`k:${key.id}`]);
      await db.query("UPDATE api_keys SET role = 'admin' WHERE id = $1", [key.id]);
      await db.query("UPDATE api_keys SET expires_at = now() + interval '1 day' WHERE id = $1", [key.id]);
      for (let i = 0; i < 100 && messages.filter((m) => m.endsWith(key.id)).length < 3; i++) await new Promise((r) => setTimeout(r, 20));
      expect(messages.filter((m) => m.endsWith(key.id))).toEqual([`k:${key.id}`, `k:${key.id}`, `k:${key.id}`]);
    } finally {
      await sub.close();
    }
  });

  it('is written by the timer on its own, and by close()', async () => {
    const ticking = await customApp(withFlushInterval(50));
    const key = await insertApiKey(db, t.org.id, 'member', t.owner.id);
    try {
      expect((await ticking.inject({ method: 'GET', url: '/v1/me', headers: key.headers })).statusCode).toBe(200);
      for (let i = 0; i < 250 && (await lastUsedInDb(key.id)) === null; i++) await new Promise((r) => setTimeout(r, 20));
      expect(await lastUsedInDb(key.id)).not.toBeNull();
    } finally {
      await ticking.close();
    }

    const closing = await customApp(withFlushInterval(HOUR));
    const other = await insertApiKey(db, t.org.id, 'member', t.owner.id);
    expect((await closing.inject({ method: 'GET', url: '/v1/me', headers: other.headers })).statusCode).toBe(200);
    expect(await lastUsedInDb(other.id)).toBeNull();
    await closing.close();
    expect(await lastUsedInDb(other.id)).not.toBeNull();
  });
});

describe.skipIf(!onPostgres)('last use while the database is unreachable', () => {
  it('a batch that cannot be written is kept, and written by the next flush once the database is back', async () => {
    const target = new URL(testDatabaseUrl!);
    const proxy = await startTcpProxy(target.hostname, Number(target.port || 5432));
    const proxied = await openTestDatabase(proxy.urlFor(testDatabaseUrl!));
    const cut = await customApp(withFlushInterval(HOUR), silentLogger, {}, proxied);
    try {
      const key = await insertApiKey(db, t.org.id, 'member', t.owner.id);
      expect((await cut.inject({ method: 'GET', url: '/v1/me', headers: key.headers })).statusCode).toBe(200);
      await proxy.stop();
      // Still recognised from the cache; its use is recorded, the write fails.
      expect((await cut.inject({ method: 'GET', url: '/health', headers: key.headers })).json()).toMatchObject({ user: { id: key.id } });
      await cut.bearerMethods.flush();
      expect(await lastUsedInDb(key.id)).toBeNull();
      await proxy.start();
      await cut.bearerMethods.flush();
      expect(await lastUsedInDb(key.id)).not.toBeNull();
    } finally {
      await proxy.start().catch(() => undefined);
      await cut.close();
      await proxied.close();
      await proxy.close();
    }
  });
});

describe('no secret in any log line', () => {
  it('creating, using (also in a URL by mistake), revoking and refusing a key logs neither the key nor its hash', async () => {
    const lines: string[] = [];
    const logger = pino(loggerOptions({ logLevel: 'trace', logFormat: 'json' }), { write: (l: string) => void lines.push(l) });
    const logged = await customApp((c) => c, logger, { ACCESS_LOG: 'true', LOG_LEVEL: 'trace' });
    try {
      const created = await logged.inject({ method: 'POST', url: '/v1/api-keys', headers: { ...t.owner.headers, ...json }, payload: { name: 'logged', role: 'admin' } });
      expect(created.statusCode).toBe(201);
      const { secret, id } = created.json<{ secret: string; id: string }>();
      const h = bearer(secret);
      expect((await logged.inject({ method: 'GET', url: '/v1/users', headers: h })).statusCode).toBe(200);
      expect((await logged.inject({ method: 'GET', url: `/v1/users?api_key=${secret}`, headers: h })).statusCode).toBe(400);
      expect((await logged.inject({ method: 'GET', url: `/v1/nowhere/${secret}`, headers: h })).statusCode).toBe(404);
      expect((await logged.inject({ method: 'POST', url: '/v1/users', headers: { ...h, ...json }, payload: '{"email": broken' })).statusCode).toBe(400);
      expect((await logged.inject({ method: 'DELETE', url: `/v1/api-keys/${id}`, headers: h })).statusCode).toBe(204);
      expect((await logged.inject({ method: 'GET', url: '/v1/users', headers: h })).statusCode).toBe(401);
      expect((await logged.inject({ method: 'GET', url: '/v1/users', headers: { authorization: `Bearer ${secret}x` } })).statusCode).toBe(401);
      await logged.bearerMethods.flush();
      await logged.refusalAudit.settled();
      // Should the headers of a request ever be logged, the key is cut out of them.
      logger.info({ req: { headers: h } }, 'a request object');
      logger.info({ headers: h }, 'bare headers');
      logger.info({ request: { headers: h } }, 'nested headers');
      expect(lines.filter((l) => l.includes('"authorization":"[redacted]"'))).toHaveLength(3);

      const all = lines.join('\n');
      // The logger did see these requests (so the search below is not vacuous).
      expect(lines.filter((l) => l.includes('request completed')).length).toBeGreaterThanOrEqual(7);
      expect(all).toContain('Request authenticated');
      const hash = hashApiKeySecret(secret);
      for (const needle of [secret, secret.slice(12), hash.toString('hex'), hash.toString('base64'), hash.toString('base64url')]) {
        expect(all.includes(needle), `a log line holds ${needle.slice(0, 16)}…`).toBe(false);
      }
    } finally {
      await logged.close();
    }
  });
});

describe('configuration', () => {
  it('with api_key missing from AUTH_METHODS, keys are refused and no background writer runs', async () => {
    const noKeys = await buildTestApp({ db, env: { AUTH_METHODS: 'fake' } });
    try {
      const key = await insertApiKey(db, t.org.id, 'admin', t.owner.id);
      const res = await noKeys.inject({ method: 'GET', url: '/v1/me', headers: key.headers });
      expect(expectError(res, 401, 'unauthorized').message).toContain('not enabled');
      // The routes that manage keys stay: a dashboard may manage keys that another deployment accepts.
      expect((await noKeys.inject({ method: 'GET', url: '/v1/api-keys', headers: t.owner.headers })).statusCode).toBe(200);
    } finally {
      await noKeys.close();
    }
  });
});
