import { generateKeyPair, SignJWT, decodeJwt, decodeProtectedHeader, type JWTPayload } from 'jose';
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NO_USER_ID } from '../../src/models/audit.model.js';
import type { Database } from '../../src/infra/database.js';
import { insertApiKey } from '../helpers/apiKeys.js';
import { buildTestApp, createTenant, type TestTenant } from '../helpers/app.js';
import { getTestDb } from '../helpers/db.js';
import { expectError } from '../helpers/securitySuite.js';
import {
  bearer,
  login,
  loginRequest,
  logout,
  me,
  newPassword,
  refresh,
  SESSION_ENV,
  setPassword,
  TEST_SIGNING_KEY,
  type Tokens,
} from '../helpers/sessions.js';

/**
 * Password sign-in and its sessions, through HTTP: login, the access token's claims and every way
 * a forged or stale token is refused, refresh rotation and reuse detection, logout, the events
 * that end sessions, password changes and rules, attempt limits and the audit log.
 */

let app: FastifyInstance;
let db: Database;
let t: TestTenant;

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const key = new TextEncoder().encode(TEST_SIGNING_KEY);

beforeAll(async () => {
  db = await getTestDb();
  app = await buildTestApp({ env: SESSION_ENV });
  t = await createTenant(db);
});
afterAll(() => app.close());

/** The body without its requestId (which differs per request), byte for byte. */
const bodyWithoutRequestId = (res: LightMyRequestResponse) => res.body.replace(res.json<{ requestId: string }>().requestId, '<id>');

async function auditRows(orgId: string, action?: string) {
  await app.refusalAudit.settled();
  const { rows } = await db.query<{ action: string; actor_type: string; actor_id: string | null; actor_email: string | null; target_id: string | null; metadata: Record<string, unknown> }>(
    `SELECT action, actor_type, actor_id, actor_email, target_id, metadata FROM audit_logs
      WHERE org_id = $1 AND ($2::text IS NULL OR action = $2::text) ORDER BY seq`,
    [orgId, action ?? null],
  );
  return rows;
}

describe('POST /v1/auth/login', () => {
  it('answers an access token and a refresh token; the access token authenticates as the user', async () => {
    const u = await t.addUser('admin');
    const password = await setPassword(db, u);
    const res = await loginRequest(app, { orgSlug: t.org.slug, email: u.email.toUpperCase(), password });
    expect(res.statusCode).toBe(200);
    expect(res.headers['cache-control']).toBe('no-store');
    const body = res.json<Tokens>();
    expect(Object.keys(body).sort()).toEqual(['accessToken', 'expiresIn', 'refreshToken', 'tokenType']);
    expect(body.tokenType).toBe('Bearer');
    expect(body.expiresIn).toBe(900);
    expect(body.refreshToken).toMatch(/^llmr_[0-9A-Za-z]{43}$/);

    expect(decodeProtectedHeader(body.accessToken)).toEqual({ alg: 'HS256', typ: 'at+jwt' });
    const claims = decodeJwt(body.accessToken);
    expect(Object.keys(claims).sort()).toEqual(['aud', 'exp', 'iat', 'iss', 'jti', 'org_id', 'role', 'sid', 'sub']);
    expect(claims).toMatchObject({ sub: u.id, org_id: t.org.id, role: 'admin', iss: 'llm-app', aud: 'llm-app' });
    expect(claims.sid).toMatch(UUID);
    expect(claims.jti).toMatch(UUID);
    expect(claims.exp! - claims.iat!).toBe(900);
    expect(Math.abs(claims.iat! - Date.now() / 1000)).toBeLessThan(60);

    const who = await me(app, body.accessToken);
    expect(who.statusCode).toBe(200);
    expect(who.json()).toMatchObject({ id: u.id, orgId: t.org.id, email: u.email, role: 'admin' });
    const health = await app.inject({ method: 'GET', url: '/health', headers: bearer(body.accessToken) });
    expect(health.json().user).toEqual({ id: u.id, email: u.email, role: 'admin' });

    // Each sign-in is a session of its own, with its own tokens.
    const again = await login(app, t, u, password);
    expect(decodeJwt(again.accessToken).sid).not.toBe(claims.sid);
    expect(again.refreshToken).not.toBe(body.refreshToken);
  });

  it('stores only the SHA-256 of the refresh token, with expiry, address and user agent', async () => {
    const u = await t.addUser('member');
    const password = await setPassword(db, u);
    const res = await loginRequest(app, { orgSlug: t.org.slug, email: u.email, password }, { headers: { 'user-agent': 'sessions-test/1.0' } });
    const { refreshToken, accessToken } = res.json<Tokens>();
    const { rows } = await db.query<{ id: string; session_id: string; hash: string; ttl: number; ip: string; user_agent: string }>(
      `SELECT id, session_id, encode(token_hash, 'hex') AS hash, extract(epoch FROM expires_at - created_at)::int AS ttl, ip, user_agent
         FROM sessions WHERE org_id = $1 AND user_id = $2`,
      [t.org.id, u.id],
    );
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({
      session_id: decodeJwt(accessToken).sid,
      hash: createHash('sha256').update(refreshToken).digest('hex'),
      ttl: 30 * 86_400,
      ip: '127.0.0.1',
      user_agent: 'sessions-test/1.0',
    });
    const dump = JSON.stringify((await db.query('SELECT * FROM sessions WHERE org_id = $1', [t.org.id])).rows);
    expect(dump).not.toContain(refreshToken);
    expect(dump).not.toContain(refreshToken.slice(5));
  });

  it('wrong org, unknown email, wrong password, no password, deleted user: byte-identical 401 bodies', async () => {
    const u = await t.addUser('member');
    const password = await setPassword(db, u);
    const noPassword = await t.addUser('member');
    const deleted = await t.addUser('member');
    const deletedPassword = await setPassword(db, deleted);
    await db.query('UPDATE users SET deleted_at = now() WHERE id = $1', [deleted.id]);
    const other = await createTenant(db);
    const attempts = [
      { orgSlug: other.org.slug, email: u.email, password },
      { orgSlug: `no-such-${randomBytes(4).toString('hex')}`, email: u.email, password },
      { orgSlug: t.org.slug, email: `nobody-${randomBytes(4).toString('hex')}@example.test`, password },
      { orgSlug: t.org.slug, email: u.email, password: `${password}x` },
      { orgSlug: t.org.slug, email: noPassword.email, password },
      { orgSlug: t.org.slug, email: deleted.email, password: deletedPassword },
    ];
    const bodies = new Set<string>();
    for (const a of attempts) {
      const res = await loginRequest(app, a);
      expectError(res, 401, 'unauthorized');
      expect(res.headers['www-authenticate']).toBe('Bearer realm="llm-app"');
      bodies.add(bodyWithoutRequestId(res));
    }
    expect([...bodies]).toEqual([
      '{"error":"Unauthorized","message":"Invalid organization, email or password","code":"unauthorized","requestId":"<id>"}',
    ]);
    // A deleted org is a wrong org.
    const gone = await createTenant(db);
    const gonePassword = await setPassword(db, gone.owner);
    expect((await login(app, gone, gone.owner, gonePassword)).accessToken).toBeTruthy();
    await db.query('UPDATE orgs SET deleted_at = now() WHERE id = $1', [gone.org.id]);
    const res = await loginRequest(app, { orgSlug: gone.org.slug, email: gone.owner.email, password: gonePassword });
    expect(bodyWithoutRequestId(res)).toBe([...bodies][0]);
  });

  it('takes the same time for an unknown user as for a wrong password (medians within 0.5x-2x)', async () => {
    const u = await t.addUser('member');
    const password = await setPassword(db, u);
    const time = async (body: { orgSlug: string; email: string; password: string }) => {
      const start = performance.now();
      const res = await loginRequest(app, body);
      const ms = performance.now() - start;
      expect(res.statusCode).toBe(401);
      return ms;
    };
    const unknown: number[] = [];
    const wrong: number[] = [];
    await time({ orgSlug: t.org.slug, email: u.email, password: 'warm-up-attempt-1' });
    for (let i = 0; i < 17; i++) {
      // Interleaved, so a slow moment of the machine hits both series alike.
      unknown.push(await time({ orgSlug: t.org.slug, email: `nobody-${i}@example.test`, password }));
      wrong.push(await time({ orgSlug: t.org.slug, email: u.email, password: `${password}-${i}` }));
    }
    const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
    const ratio = median(unknown) / median(wrong);
    expect(ratio, `medians: unknown ${median(unknown).toFixed(1)} ms, wrong password ${median(wrong).toFixed(1)} ms`).toBeGreaterThan(0.5);
    expect(ratio).toBeLessThan(2);
  }, 60_000);

  it('refuses bad input with 400 naming the field, a non-JSON body with 415 and a large one with 413', async () => {
    const missing = await app.inject({ method: 'POST', url: '/v1/auth/login', payload: { orgSlug: t.org.slug, email: 'a@example.test' } });
    expect(expectError(missing, 400, 'validation_failed').details).toEqual([{ field: 'body.password', message: expect.any(String) }]);
    const badEmail = await loginRequest(app, { orgSlug: t.org.slug, email: 'not-an-email', password: 'x' });
    expect(expectError(badEmail, 400, 'validation_failed').details?.[0]?.field).toBe('body.email');
    const extra = await app.inject({ method: 'POST', url: '/v1/auth/login', payload: { orgSlug: 'a', email: 'a@example.test', password: 'x', admin: true } });
    expectError(extra, 400, 'validation_failed');
    const text = await app.inject({ method: 'POST', url: '/v1/auth/login', headers: { 'content-type': 'text/plain' }, payload: 'password=x' });
    expectError(text, 415, 'unsupported_media_type');
    const big = await loginRequest(app, { orgSlug: t.org.slug, email: 'a@example.test', password: 'x'.repeat(20_000) });
    expectError(big, 413, 'payload_too_large');
    const long = await loginRequest(app, { orgSlug: t.org.slug, email: 'a@example.test', password: 'x'.repeat(1_025) });
    expect(expectError(long, 400, 'validation_failed').details?.[0]?.field).toBe('body.password');
  });

  it('the seed users sign in with the development passwords of the README', async () => {
    for (const [orgSlug, email, password, role] of [
      ['acme-corp', 'admin@acme.com', 'acme-admin-dev-password', 'admin'],
      ['acme-corp', 'user@acme.com', 'acme-user-dev-password', 'member'],
      ['tech-startup', 'founder@techstartup.com', 'tech-founder-dev-password', 'owner'],
    ] as const) {
      const res = await loginRequest(app, { orgSlug, email, password });
      expect({ email, status: res.statusCode }).toEqual({ email, status: 200 });
      expect((await me(app, res.json<Tokens>().accessToken)).json()).toMatchObject({ email, role });
    }
  });
});

describe('access tokens', () => {
  let valid: Tokens;
  let claims: JWTPayload;
  let userId: string;

  beforeAll(async () => {
    const u = await t.addUser('member');
    userId = u.id;
    valid = await login(app, t, u, await setPassword(db, u));
    claims = decodeJwt(valid.accessToken);
  });

  const now = () => Math.floor(Date.now() / 1000);
  const sign = (payload: JWTPayload, header: { alg?: string; typ?: string } = {}, signingKey: Uint8Array = key) =>
    new SignJWT(payload).setProtectedHeader({ alg: 'HS256', typ: 'at+jwt', ...header }).sign(signingKey);
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');

  const expectRefused = async (token: string) => {
    const res = await me(app, token);
    const body = expectError(res, 401, 'unauthorized');
    expect(res.headers['www-authenticate']).toBe('Bearer realm="llm-app", error="invalid_token"');
    return body;
  };

  it('a token forged with the real key and valid claims is accepted (so the refusals below are not vacuous)', async () => {
    const res = await me(app, await sign({ ...claims, jti: randomUUID(), iat: now(), exp: now() + 60 }));
    expect(res.statusCode).toBe(200);
    expect(res.json().id).toBe(userId);
  });

  it('missing: 401', async () => {
    const res = await app.inject({ method: 'GET', url: '/v1/me' });
    expectError(res, 401, 'unauthorized');
  });

  it.each([
    ['not a JWT', 'abc'],
    ['two segments', 'e30.e30'],
    ['garbage segments', 'a.b.c'],
    ['a refresh token as a bearer', 'llmr_0123456789012345678901234567890123456789012'],
  ])('malformed (%s): 401', async (_what, token) => {
    await expectRefused(token);
  });

  it('expired (signed with the real key, exp an hour ago): 401 saying so', async () => {
    const body = await expectRefused(await sign({ ...claims, iat: now() - 4_000, exp: now() - 3_600 }));
    expect(body.message).toBe('Access token expired');
  });

  it('not yet valid (nbf in an hour): 401', async () => {
    await expectRefused(await sign({ ...claims, nbf: now() + 3_600, exp: now() + 7_200 }));
  });

  it('wrong audience: 401', async () => {
    await expectRefused(await sign({ ...claims, aud: 'someone-else' }));
  });

  it('wrong issuer: 401', async () => {
    await expectRefused(await sign({ ...claims, iss: 'https://evil.example' }));
  });

  it('alg "none" (unsigned, crafted by hand) with our issuer: 401', async () => {
    await expectRefused(`${b64({ alg: 'none', typ: 'at+jwt' })}.${b64(claims)}.`);
    await expectRefused(`${b64({ alg: 'none', typ: 'at+jwt' })}.${b64(claims)}.${valid.accessToken.split('.')[2]}`);
  });

  it('HS/RS confusion: an RS256 token with our issuer, and an HS256 token signed with another key: 401', async () => {
    const { privateKey } = await generateKeyPair('RS256');
    await expectRefused(await new SignJWT(claims).setProtectedHeader({ alg: 'RS256', typ: 'at+jwt' }).sign(privateKey));
    await expectRefused(await sign(claims, {}, randomBytes(48)));
  });

  it('wrong typ header (JWT, none): 401', async () => {
    await expectRefused(await sign(claims, { typ: 'JWT' }));
    const noTyp = await new SignJWT(claims).setProtectedHeader({ alg: 'HS256' }).sign(key);
    await expectRefused(noTyp);
  });

  it('a missing claim (sid, org_id, jti) or a changed payload under the old signature: 401', async () => {
    for (const drop of ['sid', 'org_id', 'jti', 'sub']) {
      const partial: JWTPayload = { ...claims };
      delete partial[drop];
      await expectRefused(await sign(partial));
    }
    const [h, , s] = valid.accessToken.split('.');
    await expectRefused(`${h}.${b64({ ...claims, role: 'owner' })}.${s}`);
  });

  it('acts with the current role from the database, not the role claim', async () => {
    const forged = await sign({ ...claims, role: 'owner', jti: randomUUID() });
    const res = await app.inject({ method: 'POST', url: '/v1/users', headers: bearer(forged), payload: { email: `x-${randomBytes(3).toString('hex')}@example.test` } });
    expect(res.statusCode).toBe(403);
    expect((await me(app, forged)).json().role).toBe('member');
  });

  it("a token of org A asking for org B's objects: 404, as for a random id", async () => {
    const b = await createTenant(db);
    const foreign = await app.inject({ method: 'GET', url: `/v1/users/${b.member.id}`, headers: bearer(valid.accessToken) });
    const random = await app.inject({ method: 'GET', url: `/v1/users/${randomUUID()}`, headers: bearer(valid.accessToken) });
    expectError(foreign, 404, 'not_found');
    expect(bodyWithoutRequestId(foreign)).toBe(bodyWithoutRequestId(random));
    const admin = await login(app, t, t.admin, await setPassword(db, t.admin));
    const patch = await app.inject({ method: 'PATCH', url: `/v1/users/${b.member.id}`, headers: bearer(admin.accessToken), payload: { name: 'x' } });
    expectError(patch, 404, 'not_found');
  });
});

describe('refresh, reuse and logout', () => {
  it('rotates the refresh token; the old one is then refused', async () => {
    const u = await t.addUser('member');
    const first = await login(app, t, u, await setPassword(db, u));
    const res = await refresh(app, first.refreshToken);
    expect(res.statusCode).toBe(200);
    expect(res.headers['cache-control']).toBe('no-store');
    const second = res.json<Tokens>();
    expect(second.refreshToken).not.toBe(first.refreshToken);
    expect(decodeJwt(second.accessToken).sid).toBe(decodeJwt(first.accessToken).sid);
    expect(decodeJwt(second.accessToken).jti).not.toBe(decodeJwt(first.accessToken).jti);
    expect((await me(app, second.accessToken)).statusCode).toBe(200);
    const third = await refresh(app, second.refreshToken);
    expect(third.statusCode).toBe(200);
    // The rows: a chain of used tokens, each replaced by the next.
    const { rows } = await db.query<{ used: boolean; replaced: boolean }>(
      'SELECT used_at IS NOT NULL AS used, replaced_by IS NOT NULL AS replaced FROM sessions WHERE org_id = $1 AND user_id = $2 ORDER BY created_at, used_at NULLS LAST',
      [t.org.id, u.id],
    );
    expect(rows).toEqual([
      { used: true, replaced: true },
      { used: true, replaced: true },
      { used: false, replaced: false },
    ]);
  });

  it('presenting a used refresh token revokes the whole session: its newest refresh token and its access tokens stop working', async () => {
    const u = await t.addUser('member');
    const password = await setPassword(db, u);
    const first = await login(app, t, u, password);
    const other = await login(app, t, u, password);
    const second = (await refresh(app, first.refreshToken)).json<Tokens>();
    expect((await me(app, second.accessToken)).statusCode).toBe(200);

    const reuse = await refresh(app, first.refreshToken);
    expectError(reuse, 401, 'unauthorized');
    for (const access of [first.accessToken, second.accessToken]) expectError(await me(app, access), 401, 'unauthorized');
    expectError(await refresh(app, second.refreshToken), 401, 'unauthorized');
    // Another session of the same user is not touched.
    expect((await me(app, other.accessToken)).statusCode).toBe(200);
    expect((await refresh(app, other.refreshToken)).statusCode).toBe(200);

    const audit = await auditRows(t.org.id, 'session.reuse_detected');
    expect(audit.filter((r) => r.target_id === decodeJwt(first.accessToken).sid)).toEqual([
      expect.objectContaining({ actor_type: 'user', actor_id: u.id, actor_email: u.email }),
    ]);
  });

  it('the same refresh token sent five times at once: one 200, four 401, and the whole session ends, the new tokens too', async () => {
    const u = await t.addUser('member');
    const s = await login(app, t, u, await setPassword(db, u));
    const answers = await Promise.all(Array.from({ length: 5 }, () => refresh(app, s.refreshToken)));
    expect(answers.map((r) => r.statusCode).sort()).toEqual([200, 401, 401, 401, 401]);
    const winner = answers.find((r) => r.statusCode === 200)!.json<Tokens>();
    expectError(await refresh(app, winner.refreshToken), 401, 'unauthorized');
    expectError(await me(app, winner.accessToken), 401, 'unauthorized');
    const { rows } = await db.query<{ live: number }>('SELECT count(*)::int AS live FROM sessions WHERE org_id = $1 AND user_id = $2 AND revoked_at IS NULL', [t.org.id, u.id]);
    expect(rows).toEqual([{ live: 0 }]);
  });

  it('sign-ins, refreshes and role changes of one user at once: no error, and no session outlives the last role change', async () => {
    const u = await t.addUser('member');
    const password = await setPassword(db, u);
    const sessions = await Promise.all([login(app, t, u, password), login(app, t, u, password)]);
    const roles = ['admin', 'member', 'admin', 'member'] as const;
    const answers = await Promise.all([
      ...sessions.map((x) => refresh(app, x.refreshToken)),
      ...roles.map((role) => app.inject({ method: 'PATCH', url: `/v1/users/${u.id}`, headers: t.owner.headers, payload: { role } })),
      loginRequest(app, { orgSlug: t.org.slug, email: u.email, password }),
    ]);
    for (const r of answers) expect(r.statusCode, r.body).toBeLessThan(500);
    // Every session that existed before the last role change has ended. The concurrent changes
    // may have left either role, and setting the same role again changes nothing: two changes,
    // so that at least one of them is a real one.
    for (const role of ['member', 'admin'] as const) {
      const last = await app.inject({ method: 'PATCH', url: `/v1/users/${u.id}`, headers: t.owner.headers, payload: { role } });
      expect(last.statusCode).toBe(200);
    }
    const { rows } = await db.query<{ live: number }>('SELECT count(*)::int AS live FROM sessions WHERE org_id = $1 AND user_id = $2 AND revoked_at IS NULL', [t.org.id, u.id]);
    expect(rows).toEqual([{ live: 0 }]);
  });

  it('refuses unknown, malformed and expired refresh tokens with 401', async () => {
    for (const token of ['llmr_' + '0'.repeat(43), 'nope', 'llmr_short']) expectError(await refresh(app, token), 401, 'unauthorized');
    expectError(await app.inject({ method: 'POST', url: '/v1/auth/refresh', payload: {} }), 400, 'validation_failed');
    const u = await t.addUser('member');
    const s = await login(app, t, u, await setPassword(db, u));
    await db.query("UPDATE sessions SET expires_at = now() - interval '1 second' WHERE org_id = $1 AND user_id = $2", [t.org.id, u.id]);
    expectError(await refresh(app, s.refreshToken), 401, 'unauthorized');
  });

  it('a refresh sent with a stale Authorization header still works (the header is not looked at)', async () => {
    const u = await t.addUser('member');
    const s = await login(app, t, u, await setPassword(db, u));
    const res = await app.inject({ method: 'POST', url: '/v1/auth/refresh', headers: bearer('expired.or.garbage'), payload: { refreshToken: s.refreshToken } });
    expect(res.statusCode).toBe(200);
  });

  it('logout ends the session: its access and refresh tokens stop working; again is a 204; an unknown token a 401', async () => {
    const u = await t.addUser('member');
    const password = await setPassword(db, u);
    const s = await login(app, t, u, password);
    const kept = await login(app, t, u, password);
    expect((await me(app, s.accessToken)).statusCode).toBe(200);
    const out = await logout(app, s.refreshToken);
    expect(out.statusCode).toBe(204);
    expect(out.body).toBe('');
    expectError(await me(app, s.accessToken), 401, 'unauthorized');
    expectError(await refresh(app, s.refreshToken), 401, 'unauthorized');
    expect((await logout(app, s.refreshToken)).statusCode).toBe(204);
    expectError(await logout(app, 'llmr_' + 'A'.repeat(43)), 401, 'unauthorized');
    expect((await me(app, kept.accessToken)).statusCode).toBe(200);
    const revoked = await auditRows(t.org.id, 'session.revoked');
    expect(revoked.filter((r) => r.target_id === decodeJwt(s.accessToken).sid)).toEqual([
      expect.objectContaining({ actor_id: u.id, metadata: { reason: 'logout' } }),
    ]);
  });

  it('logout with a refresh token already exchanged ends the session too', async () => {
    const u = await t.addUser('member');
    const s = await login(app, t, u, await setPassword(db, u));
    const next = (await refresh(app, s.refreshToken)).json<Tokens>();
    expect((await logout(app, s.refreshToken)).statusCode).toBe(204);
    expectError(await me(app, next.accessToken), 401, 'unauthorized');
    expectError(await refresh(app, next.refreshToken), 401, 'unauthorized');
  });
});

describe('what else ends sessions', () => {
  it('deleting the user ends their sessions: access and refresh tokens are refused at once', async () => {
    const u = await t.addUser('member');
    const s = await login(app, t, u, await setPassword(db, u));
    expect((await me(app, s.accessToken)).statusCode).toBe(200);
    expect((await app.inject({ method: 'DELETE', url: `/v1/users/${u.id}`, headers: t.owner.headers })).statusCode).toBe(204);
    expectError(await me(app, s.accessToken), 401, 'unauthorized');
    expectError(await refresh(app, s.refreshToken), 401, 'unauthorized');
    const { rows } = await db.query('SELECT DISTINCT revoked_reason FROM sessions WHERE org_id = $1 AND user_id = $2', [t.org.id, u.id]);
    expect(rows).toEqual([{ revoked_reason: 'user_deleted' }]);
  });

  it('changing the role ends their sessions, and a new sign-in carries the new role', async () => {
    const u = await t.addUser('admin');
    const password = await setPassword(db, u);
    const s = await login(app, t, u, password);
    expect((await me(app, s.accessToken)).json().role).toBe('admin');
    const patch = await app.inject({ method: 'PATCH', url: `/v1/users/${u.id}`, headers: t.owner.headers, payload: { role: 'member' } });
    expect(patch.statusCode).toBe(200);
    expectError(await me(app, s.accessToken), 401, 'unauthorized');
    expectError(await refresh(app, s.refreshToken), 401, 'unauthorized');
    const again = await login(app, t, u, password);
    expect(decodeJwt(again.accessToken).role).toBe('member');
    expect((await me(app, again.accessToken)).json().role).toBe('member');
  });

  it('a change made in the database directly (an operator) ends them as well', async () => {
    const u = await t.addUser('member');
    const s = await login(app, t, u, await setPassword(db, u));
    await db.query("UPDATE users SET role = 'admin' WHERE id = $1", [u.id]);
    expect(await app.authenticator.sync()).toBe(true);
    expectError(await me(app, s.accessToken), 401, 'unauthorized');
  });

  it('a deleted org refuses its access tokens and refresh tokens', async () => {
    const o = await createTenant(db);
    const s = await login(app, o, o.member, await setPassword(db, o.member));
    await db.query('UPDATE orgs SET deleted_at = now() WHERE id = $1', [o.org.id]);
    expect(await app.authenticator.sync()).toBe(true);
    expectError(await me(app, s.accessToken), 401, 'unauthorized');
    expectError(await refresh(app, s.refreshToken), 401, 'unauthorized');
  });
});

describe('PUT /v1/me/password', () => {
  const put = (headers: Record<string, string>, payload: Record<string, unknown>) =>
    app.inject({ method: 'PUT', url: '/v1/me/password', headers, payload });

  it('changes the password and ends every other session, not the current one', async () => {
    const u = await t.addUser('member');
    const password = await setPassword(db, u);
    const current = await login(app, t, u, password);
    const others = [await login(app, t, u, password), await login(app, t, u, password)];
    const next = newPassword();
    const res = await put(bearer(current.accessToken), { currentPassword: password, newPassword: next });
    expect(res.statusCode).toBe(204);

    expect((await me(app, current.accessToken)).statusCode).toBe(200);
    expect((await refresh(app, current.refreshToken)).statusCode).toBe(200);
    for (const o of others) {
      expectError(await me(app, o.accessToken), 401, 'unauthorized');
      expectError(await refresh(app, o.refreshToken), 401, 'unauthorized');
    }
    expectError(await loginRequest(app, { orgSlug: t.org.slug, email: u.email, password }), 401, 'unauthorized');
    expect((await loginRequest(app, { orgSlug: t.org.slug, email: u.email, password: next })).statusCode).toBe(200);

    const audit = (await auditRows(t.org.id, 'user.password_changed')).filter((r) => r.target_id === u.id);
    expect(audit).toEqual([expect.objectContaining({ actor_type: 'user', actor_id: u.id, metadata: { firstPassword: false, sessionsEnded: 2 } })]);
  });

  it('stores an argon2id hash with m=19456, t=2, p=1 and a random salt', async () => {
    const u = await t.addUser('member');
    const first = await put(u.headers, { newPassword: newPassword() });
    expect(first.statusCode).toBe(204);
    const { rows } = await db.query<{ password_hash: string }>('SELECT password_hash FROM users WHERE id = $1', [u.id]);
    const parts = rows[0]!.password_hash.split('$');
    // ['', 'argon2id', 'v=19', 'm=19456,t=2,p=1', salt, hash]
    expect(parts.slice(0, 4)).toEqual(['', 'argon2id', 'v=19', 'm=19456,t=2,p=1']);
    const params = Object.fromEntries(parts[3]!.split(',').map((kv) => kv.split('=')).map(([k, v]) => [k, Number(v)]));
    expect(params.m).toBeGreaterThanOrEqual(19_456);
    expect(params.t).toBeGreaterThanOrEqual(2);
    expect(params.p).toBe(1);
    expect(Buffer.from(parts[4]!, 'base64').length).toBeGreaterThanOrEqual(16);
    expect(Buffer.from(parts[5]!, 'base64').length).toBe(32);
    // The same password for two users: two different salts, two different hashes.
    const [v, w] = [await t.addUser('member'), await t.addUser('member')];
    const same = 'one-and-the-same-Pa55phrase';
    for (const x of [v, w]) expect((await put(x.headers, { newPassword: same })).statusCode).toBe(204);
    const hashes = await db.query<{ password_hash: string }>('SELECT password_hash FROM users WHERE id = ANY($1::uuid[])', [[v.id, w.id]]);
    expect(new Set(hashes.rows.map((r) => r.password_hash)).size).toBe(2);
    // The database itself refuses anything but an argon2id hash.
    for (const bad of ['hunter2-in-clear', '$2b$10$abcdefghijklmnopqrstuv', '$argon2i$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA']) {
      await expect(db.query('UPDATE users SET password_hash = $2 WHERE id = $1', [v.id, bad])).rejects.toMatchObject({ code: '23514' });
    }
  });

  it('a user without a password sets one without currentPassword; then currentPassword is required and checked', async () => {
    const u = await t.addUser('member');
    const first = newPassword();
    expect((await put(u.headers, { newPassword: first })).statusCode).toBe(204);
    const missing = await put(u.headers, { newPassword: newPassword() });
    expect(expectError(missing, 400, 'validation_failed').details).toEqual([{ field: 'body.currentPassword', message: expect.any(String) }]);
    const wrong = await put(u.headers, { currentPassword: `${first}!`, newPassword: newPassword() });
    expect(expectError(wrong, 403, 'forbidden').message).toContain('currentPassword');
    expect((await loginRequest(app, { orgSlug: t.org.slug, email: u.email, password: first })).statusCode).toBe(200);
    const audit = (await auditRows(t.org.id, 'user.password_changed')).filter((r) => r.target_id === u.id);
    expect(audit.map((r) => r.metadata)).toEqual([{ firstPassword: true, sessionsEnded: 0 }]);
  });

  it('password rules: too short, too long (in characters, not bytes), common, the email or its name part: 400 naming newPassword', async () => {
    const u = await t.addUser('member', `${randomBytes(4).toString('hex')}.long.name@example.test`);
    const local = u.email.split('@')[0]!;
    const cases: [string, string][] = [
      ['short1234!x', 'at least 12'],
      ['🦊🐙🚀🎲🧩🪐🌵🎻🍉🦉🐝', 'at least 12'], // 11 characters, 22 UTF-16 units
      ['x'.repeat(64) + 'y'.repeat(65), 'at most 128'],
      ['password1234', 'common'],
      ['Password2024!', 'common'],
      ['P@ssw0rd1234', 'common'],
      ['qwertyuiop123', 'common'],
      ['iloveyou2024', 'common'],
      ['aaaaaaaaaaaaaaaa', 'common'],
      [u.email, 'email'],
      [u.email.toUpperCase(), 'email'],
      [local, 'email'],
    ];
    for (const [pw, why] of cases) {
      const res = await put(u.headers, { newPassword: pw });
      const body = expectError(res, 400, 'validation_failed');
      expect({ pw, details: body.details }).toEqual({ pw, details: [{ field: 'body.newPassword', message: expect.stringContaining(why) }] });
    }
    expect((await db.query('SELECT password_hash FROM users WHERE id = $1', [u.id])).rows).toEqual([{ password_hash: null }]);
    // Twelve characters of four bytes each are twelve characters.
    expect((await put(u.headers, { newPassword: '🦊🐙🚀🎲🧩🪐🌵🎻🍉🦉🐝🐢' })).statusCode).toBe(204);
  });

  it('an API key has no password: 403', async () => {
    const key = await insertApiKey(db, t.org.id, 'owner', t.owner.id);
    const res = await put(key.headers, { newPassword: newPassword() });
    expect(expectError(res, 403, 'forbidden').message).toContain('API key');
  });

  it('refuses a body that is not a string or has other fields (400), and callers without credentials (401)', async () => {
    const u = await t.addUser('member');
    expectError(await put(u.headers, { newPassword: 12 }), 400, 'validation_failed');
    expectError(await put(u.headers, { newPassword: newPassword(), role: 'owner' }), 400, 'validation_failed');
    expectError(await put({}, { newPassword: newPassword() }), 401, 'unauthorized');
  });
});

describe('limits on password attempts', () => {
  let limited: FastifyInstance;
  afterAll(async () => limited?.close());

  it('per account: after N attempts the next is a 429 with Retry-After, even with the right password; other accounts go on', async () => {
    limited = await buildTestApp({ env: { ...SESSION_ENV, LOGIN_ATTEMPTS_PER_ACCOUNT: '3' } });
    const u = await t.addUser('member');
    const password = await setPassword(db, u);
    const codes: number[] = [];
    for (let i = 0; i < 3; i++) codes.push((await loginRequest(limited, { orgSlug: t.org.slug, email: u.email, password: `wrong-${i}-password` })).statusCode);
    expect(codes).toEqual([401, 401, 401]);
    const locked = await loginRequest(limited, { orgSlug: t.org.slug, email: u.email.toUpperCase(), password });
    const body = expectError(locked, 429, 'rate_limited');
    expect(body.message).toContain('password attempts');
    expect(Number(locked.headers['retry-after'])).toBeGreaterThan(0);
    // The lock is the account's (org + email), not the address's.
    const v = await t.addUser('member');
    expect((await loginRequest(limited, { orgSlug: t.org.slug, email: v.email, password: await setPassword(db, v) })).statusCode).toBe(200);
    // Unknown accounts are limited the same way (nothing tells them apart).
    const ghost = { orgSlug: t.org.slug, email: `ghost-${randomBytes(3).toString('hex')}@example.test`, password: 'whatever-it-is' };
    const ghostCodes: number[] = [];
    for (let i = 0; i < 4; i++) ghostCodes.push((await loginRequest(limited, ghost)).statusCode);
    expect(ghostCodes).toEqual([401, 401, 401, 429]);
  });

  it('per client address, across accounts', async () => {
    const app2 = await buildTestApp({ env: { ...SESSION_ENV, LOGIN_ATTEMPTS_PER_IP: '3' } });
    try {
      const codes: number[] = [];
      for (let i = 0; i < 4; i++) {
        const res = await loginRequest(app2, { orgSlug: t.org.slug, email: `spray-${i}@example.test`, password: 'spray-password-1' }, { remoteAddress: '10.7.7.7' });
        codes.push(res.statusCode);
      }
      expect(codes).toEqual([401, 401, 401, 429]);
      const u = await t.addUser('member');
      const password = await setPassword(db, u);
      expect((await loginRequest(app2, { orgSlug: t.org.slug, email: u.email, password }, { remoteAddress: '10.7.7.7' })).statusCode).toBe(429);
      expect((await loginRequest(app2, { orgSlug: t.org.slug, email: u.email, password }, { remoteAddress: '10.7.7.8' })).statusCode).toBe(200);
    } finally {
      await app2.close();
    }
  });

  it('the per-address limit charges requests with an access token only when the token fails', async () => {
    const app4 = await buildTestApp({ env: { ...SESSION_ENV, IP_RATE_LIMIT_PER_MINUTE: '3' } });
    try {
      const u = await t.addUser('member');
      const s = await login(app4, t, u, await setPassword(db, u));
      const call = (token: string) => app4.inject({ method: 'GET', url: '/v1/me', headers: bearer(token), remoteAddress: '10.6.6.6' });
      const valid: number[] = [];
      for (let i = 0; i < 6; i++) valid.push((await call(s.accessToken)).statusCode);
      expect(valid).toEqual([200, 200, 200, 200, 200, 200]);
      const forged: number[] = [];
      for (let i = 0; i < 4; i++) forged.push((await call(`${s.accessToken}x`)).statusCode);
      expect(forged).toEqual([401, 401, 401, 429]);
      expect((await call(s.accessToken)).statusCode).toBe(429);
    } finally {
      await app4.close();
    }
  });

  it('the current password of a password change is limited the same way', async () => {
    const app3 = await buildTestApp({ env: { ...SESSION_ENV, LOGIN_ATTEMPTS_PER_ACCOUNT: '2' } });
    try {
      const u = await t.addUser('member');
      const password = await setPassword(db, u);
      const put = (currentPassword: string) =>
        app3.inject({ method: 'PUT', url: '/v1/me/password', headers: u.headers, payload: { currentPassword, newPassword: newPassword() } });
      expect((await put('wrong-one-here')).statusCode).toBe(403);
      expect((await put('wrong-two-here')).statusCode).toBe(403);
      const locked = await put(password);
      expectError(locked, 429, 'rate_limited');
      expect(Number(locked.headers['retry-after'])).toBeGreaterThan(0);
    } finally {
      await app3.close();
    }
  });
});

describe('the audit log of sign-ins', () => {
  it('records session.created, and failed sign-ins as auth.failed in the org with the claimed email', async () => {
    const o = await createTenant(db);
    const password = await setPassword(db, o.member);
    const s = await login(app, o, o.member, password);
    // Refusals are written after their response: each is waited for, so the order is known.
    await loginRequest(app, { orgSlug: o.org.slug, email: o.member.email, password: 'not-the-password' });
    await app.refusalAudit.settled();
    await loginRequest(app, { orgSlug: o.org.slug, email: 'Nobody.Here@Example.test', password: 'not-the-password' });
    await app.refusalAudit.settled();
    await refresh(app, s.refreshToken);
    const rows = await auditRows(o.org.id);
    const sid = decodeJwt(s.accessToken).sid;
    expect(rows.filter((r) => r.action !== 'org.created').map((r) => [r.action, r.actor_type, r.actor_id, r.actor_email, r.target_id])).toEqual([
      ['session.created', 'user', o.member.id, o.member.email, sid],
      ['auth.failed', 'user', o.member.id, o.member.email, null],
      ['auth.failed', 'user', NO_USER_ID, 'nobody.here@example.test', null],
      ['session.refreshed', 'user', o.member.id, o.member.email, sid],
    ]);
    const failed = rows.filter((r) => r.action === 'auth.failed');
    expect(failed.map((r) => r.metadata)).toEqual([
      { status: 401, method: 'POST', route: '/v1/auth/login' },
      { status: 401, method: 'POST', route: '/v1/auth/login' },
    ]);
    // Nothing of the password anywhere in the log.
    const { rows: all } = await db.query('SELECT * FROM audit_logs WHERE org_id = $1', [o.org.id]);
    expect(JSON.stringify(all)).not.toContain(password);
    expect(JSON.stringify(all)).not.toContain('not-the-password');
  });

  it('GET /v1/audit-logs filters by the new actions', async () => {
    const res = await app.inject({ method: 'GET', url: '/v1/audit-logs?action=session.created&limit=5', headers: t.owner.headers });
    expect(res.statusCode).toBe(200);
    expect(res.json<{ data: { action: string }[] }>().data.every((e) => e.action === 'session.created')).toBe(true);
  });
});

describe('with password sign-in turned off', () => {
  it('has no /v1/auth routes and refuses our JWTs as from an unknown issuer', async () => {
    const off = await buildTestApp({ env: { AUTH_METHODS: 'api_key,fake' } });
    try {
      expect((await off.inject({ method: 'POST', url: '/v1/auth/login', payload: {} })).statusCode).toBe(404);
      const token = await new SignJWT({ org_id: t.org.id, sid: randomUUID() }).setProtectedHeader({ alg: 'HS256', typ: 'at+jwt' }).setIssuer('llm-app').sign(key);
      const res = await off.inject({ method: 'GET', url: '/v1/me', headers: bearer(token) });
      expect(res.statusCode).toBe(401);
      expect(res.json().message).toContain('unknown or disabled issuer');
    } finally {
      await off.close();
    }
  });
});
