import { exportSPKI, generateKeyPair, SignJWT } from 'jose';
import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { NO_USER_ID } from '../../src/models/audit.model.js';
import { createOrg, softDeleteOrg } from '../../src/models/org.model.js';
import { setOrgLimitOverrides } from '../../src/models/orgLimits.model.js';
import type { RequestContext } from '../../src/types/context.js';
import { addUser, buildTestApp, createTenant, randomSlug, type TestTenant, type TestUser } from '../helpers/app.js';
import { getTestDb } from '../helpers/db.js';
import {
  buildOidcApp,
  captureLogger,
  makeKey,
  nowSeconds,
  OIDC_AUDIENCE,
  rawToken,
  startProvider,
  type TestKey,
  type TestProvider,
} from '../helpers/oidcProvider.js';
import { expectError } from '../helpers/securitySuite.js';

/**
 * Tokens of an OpenID Connect provider, against a provider started by the test on 127.0.0.1
 * (keys made here, no network). Where a test depends on a cooldown or a backoff, it stops the clock
 * they read (Date.now) and moves it forward itself; token times use the real clock.
 */

const realNow = Date.now.bind(Date);
let frozenAt: number | null = null;
/** Stops the clock jose's key-set cache and the provider backoff read; only advanceClock moves it. */
function freezeClock(): void {
  frozenAt = realNow();
  vi.spyOn(Date, 'now').mockImplementation(() => frozenAt!);
}
function advanceClock(ms: number): void {
  frozenAt! += ms;
}
afterEach(() => {
  vi.restoreAllMocks();
  frozenAt = null;
});

const bearer = (token: string) => ({ authorization: `Bearer ${token}` });
const get = (app: FastifyInstance, token: string, url = '/v1/me') => app.inject({ method: 'GET', url, headers: bearer(token) });

/** Claims naming a user of a tenant: the org by slug unless told otherwise. */
const claimsOf = (u: TestUser, t: TestTenant, org: 'slug' | 'id' = 'slug') => ({
  sub: `idp|${u.id}`,
  email: u.email,
  email_verified: true,
  org_id: org === 'slug' ? t.org.slug : t.org.id,
});

function expect401(res: LightMyRequestResponse, message: string | RegExp): void {
  const body = expectError(res, 401, 'unauthorized');
  expect(res.headers['www-authenticate']).toBe('Bearer realm="llm-app", error="invalid_token"');
  if (typeof message === 'string') expect(body.message).toContain(message);
  else expect(body.message).toMatch(message);
}

describe('OIDC tokens', () => {
  let provider: TestProvider;
  let app: FastifyInstance;
  let rsa: TestKey;
  let ec: TestKey;
  let a: TestTenant;
  let b: TestTenant;
  const contexts = new Map<string, RequestContext | null>();
  const contextOf = (res: LightMyRequestResponse) => contexts.get(res.headers['x-request-id'] as string);

  beforeAll(async () => {
    [rsa, ec] = await Promise.all([makeKey('RS256'), makeKey('ES256')]);
    provider = await startProvider({ keys: [rsa, ec] });
    app = await buildOidcApp(provider, {
      beforeReady: (instance) =>
        instance.addHook('onResponse', (request, _reply, done) => {
          contexts.set(request.id, request.context);
          done();
        }),
    });
    [a, b] = await Promise.all([createTenant(), createTenant()]);
  });
  afterAll(async () => {
    await app?.close();
    await provider?.close();
  });

  describe('a verified token of a user of the org', () => {
    it('RS256, org by slug: authenticates as that user, with their role here', async () => {
      const res = await get(app, await provider.sign(rsa, claimsOf(a.admin, a)));
      expect(res.statusCode).toBe(200);
      expect(res.json()).toMatchObject({ id: a.admin.id, orgId: a.org.id, email: a.admin.email, role: 'admin' });
      expect(contextOf(res)).toEqual({
        userId: a.admin.id,
        orgId: a.org.id,
        role: 'admin',
        email: a.admin.email,
        authMethod: 'oidc',
        credentialId: null,
      });
    });

    it('ES256, org by id (in capitals too), email in another case', async () => {
      for (const orgId of [a.org.id, a.org.id.toUpperCase()]) {
        const token = await provider.sign(ec, { ...claimsOf(a.member, a, 'id'), org_id: orgId, email: a.member.email.toUpperCase() });
        const res = await get(app, token);
        expect(res.statusCode).toBe(200);
        expect(res.json()).toMatchObject({ id: a.member.id, role: 'member' });
      }
    });

    it('accepts the typ values of OIDC_TOKEN_TYPES, case-insensitively, with or without application/', async () => {
      for (const typ of ['JWT', 'jwt', 'at+jwt', 'application/at+JWT', 'application/jwt']) {
        const res = await get(app, await provider.sign(rsa, claimsOf(a.member, a), { typ }));
        expect({ typ, status: res.statusCode }).toEqual({ typ, status: 200 });
      }
    });

    it('acts with its role: a member is refused an admin route (403); an admin creates a user, audited as them', async () => {
      expectError(await get(app, await provider.sign(rsa, claimsOf(a.member, a)), '/v1/audit-logs'), 403, 'forbidden');
      const token = await provider.sign(rsa, claimsOf(a.admin, a));
      const email = `${randomSlug('new')}@example.test`;
      const created = await app.inject({ method: 'POST', url: '/v1/users', headers: bearer(token), payload: { email } });
      expect(created.statusCode).toBe(201);
      const log = await app.inject({ method: 'GET', url: '/v1/audit-logs?action=user.created&limit=1', headers: bearer(token) });
      expect(log.json().data[0]).toMatchObject({ actor: { type: 'user', id: a.admin.id, email: a.admin.email }, metadata: { email } });
    });

    it("a token of org A asking for org B's user: 404, the same as a random id", async () => {
      const token = await provider.sign(rsa, claimsOf(a.owner, a));
      const foreign = expectError(await get(app, token, `/v1/users/${b.member.id}`), 404, 'not_found');
      const random = expectError(await get(app, token, `/v1/users/${crypto.randomUUID()}`), 404, 'not_found');
      expect(foreign.message).toBe(random.message);
      expect((await get(app, token, `/v1/users/${a.member.id}`)).statusCode).toBe(200);
    });

    it('accepts nbf and exp just within the clock tolerance (30 s)', async () => {
      const now = nowSeconds();
      expect((await get(app, await provider.sign(rsa, { ...claimsOf(a.member, a), nbf: now + 20 }))).statusCode).toBe(200);
      expect((await get(app, await provider.sign(rsa, { ...claimsOf(a.member, a), exp: now - 20 }))).statusCode).toBe(200);
    });
  });

  describe('refused with 401', () => {
    it('expired beyond the tolerance', async () => {
      const now = nowSeconds();
      const res = await get(app, await provider.sign(rsa, { ...claimsOf(a.member, a), iat: now - 3_600, exp: now - 60 }));
      expect401(res, 'expired');
    });

    it('not valid yet (nbf) beyond the tolerance', async () => {
      expect401(await get(app, await provider.sign(rsa, { ...claimsOf(a.member, a), nbf: nowSeconds() + 120 })), 'not valid yet');
    });

    it('without exp', async () => {
      expect401(await get(app, await provider.sign(rsa, { ...claimsOf(a.member, a), exp: undefined })), 'no exp');
    });

    it('for another audience', async () => {
      expect401(await get(app, await provider.sign(rsa, { ...claimsOf(a.member, a), aud: 'someone-else' })), '(aud)');
      expect401(await get(app, await provider.sign(rsa, { ...claimsOf(a.member, a), aud: undefined })), '(aud)');
    });

    it('from another issuer (the same keys, another iss; the issuer with a trailing slash)', async () => {
      for (const iss of ['https://evil.example', `${provider.issuer}/`]) {
        expect401(await get(app, await provider.sign(rsa, { ...claimsOf(a.member, a), iss })), 'unknown or disabled issuer');
      }
    });

    it('alg none, made by hand', async () => {
      const payload = { ...claimsOf(a.owner, a), iss: provider.issuer, aud: OIDC_AUDIENCE, exp: nowSeconds() + 300 };
      for (const header of [{ alg: 'none', typ: 'JWT' }, { alg: 'none', typ: 'JWT', kid: rsa.kid }, { alg: 'None' }]) {
        expect401(await get(app, rawToken(header, payload)), 'algorithm is not accepted');
        expect401(await get(app, rawToken(header, payload, 'c2lnbmF0dXJl')), 'algorithm is not accepted');
      }
    });

    it("HS256 signed with the provider's public key material (JWK JSON or PEM) as the HMAC secret", async () => {
      const pem = await exportSPKI(rsa.publicKey);
      for (const secret of [JSON.stringify(rsa.publicJwk), pem, pem.trim()]) {
        const token = await new SignJWT({ ...claimsOf(a.owner, a), iss: provider.issuer, aud: OIDC_AUDIENCE })
          .setProtectedHeader({ alg: 'HS256', typ: 'JWT', kid: rsa.kid })
          .setIssuedAt()
          .setExpirationTime('5m')
          .sign(new TextEncoder().encode(secret));
        expect401(await get(app, token), 'algorithm is not accepted');
      }
    });

    it('an algorithm outside OIDC_ALGORITHMS even when asymmetric (RS512)', async () => {
      const { privateKey } = await generateKeyPair('RS512');
      const token = await new SignJWT({ ...claimsOf(a.owner, a), iss: provider.issuer, aud: OIDC_AUDIENCE })
        .setProtectedHeader({ alg: 'RS512', typ: 'JWT', kid: rsa.kid })
        .setExpirationTime('5m')
        .sign(privateKey);
      expect401(await get(app, token), 'algorithm is not accepted');
    });

    it('signed by a key the provider does not publish (unknown kid; a published kid with another key)', async () => {
      const stranger = await makeKey('RS256');
      expect401(await get(app, await provider.sign(stranger, claimsOf(a.owner, a))), 'does not publish');
      const impostor = { ...stranger, kid: rsa.kid };
      expect401(await get(app, await provider.sign(impostor, claimsOf(a.owner, a))), 'signature is invalid');
    });

    it('malformed: a header that is not JSON, a signature that is not the token\'s, a payload changed after signing', async () => {
      const good = await provider.sign(rsa, claimsOf(a.owner, a));
      const [h, p, s] = good.split('.') as [string, string, string];
      expect401(await get(app, `${Buffer.from('{not json').toString('base64url')}.${p}.${s}`), 'Malformed');
      expect401(await get(app, `${h}.${p}.${s.slice(0, -4)}AAAA`), 'signature is invalid');
      const forged = Buffer.from(JSON.stringify({ ...JSON.parse(Buffer.from(p, 'base64url').toString()), org_id: b.org.slug })).toString('base64url');
      expect401(await get(app, `${h}.${forged}.${s}`), 'signature is invalid');
    });

    it('a typ outside OIDC_TOKEN_TYPES, or none', async () => {
      for (const typ of ['dpop+jwt', 'JOSE', 'application/secevent+jwt', undefined]) {
        expect401(await get(app, await provider.sign(rsa, claimsOf(a.member, a), { typ })), 'typ header must be one of JWT, at+jwt');
      }
    });

    it('missing or mistyped org and email claims', async () => {
      const base = claimsOf(a.member, a);
      const cases: [Record<string, unknown>, string][] = [
        [{ org_id: undefined }, 'no org_id claim'],
        [{ org_id: 42 }, 'org_id claim must be the slug or the id'],
        [{ org_id: [a.org.slug] }, 'org_id claim must be the slug or the id'],
        [{ org_id: 'Not A Slug!' }, 'org_id claim must be the slug or the id'],
        [{ org_id: 'org_2abcDEF' }, 'org_id claim must be the slug or the id'],
        [{ email: undefined }, 'no email claim'],
        [{ email: 7 }, 'email claim must be an email address'],
        [{ email: 'nobody' }, 'email claim must be an email address'],
        [{ email: `${'x'.repeat(250)}@example.test` }, 'email claim must be an email address'],
      ];
      for (const [change, message] of cases) {
        expect401(await get(app, await provider.sign(rsa, { ...base, ...change })), message);
      }
    });

    it('email_verified false (or "false"); true or absent is fine', async () => {
      for (const v of [false, 'false']) {
        expect401(await get(app, await provider.sign(rsa, { ...claimsOf(a.member, a), email_verified: v })), 'email_verified is false');
      }
      for (const v of [true, undefined]) {
        expect((await get(app, await provider.sign(rsa, { ...claimsOf(a.member, a), email_verified: v }))).statusCode).toBe(200);
      }
    });

    it('an org that does not exist (slug or id), or is deleted', async () => {
      for (const org_id of [randomSlug('nope'), crypto.randomUUID()]) {
        expect401(await get(app, await provider.sign(rsa, { ...claimsOf(a.member, a), org_id })), 'does not exist');
      }
      const gone = await createTenant();
      expect((await get(app, await provider.sign(rsa, claimsOf(gone.member, gone)))).statusCode).toBe(200);
      expect(await softDeleteOrg(await getTestDb(), gone.org.id)).toBe(true);
      expect(await app.authenticator.sync()).toBe(true);
      expect401(await get(app, await provider.sign(rsa, claimsOf(gone.member, gone, 'id'))), 'does not exist');
      expect401(await get(app, await provider.sign(rsa, claimsOf(gone.member, gone))), 'does not exist');
    });

    it("an email that is no user of the org (nobody's; another org's user's), audited in that org", async () => {
      const owner = { headers: a.owner.headers };
      for (const email of [`${randomSlug('stranger')}@example.test`, b.member.email]) {
        const res = await get(app, await provider.sign(rsa, { ...claimsOf(a.member, a), email }), '/v1/users');
        expect401(res, 'not a user of its organization');
        await app.refusalAudit.settled();
        const log = await app.inject({ method: 'GET', url: '/v1/audit-logs?action=auth.failed&limit=1', ...owner });
        expect(log.json().data[0]).toMatchObject({
          actor: { type: 'user', id: NO_USER_ID, email },
          requestId: res.headers['x-request-id'],
          metadata: { status: 401, route: '/v1/users' },
        });
      }
      // And nothing in the org of the other user.
      const other = await app.inject({ method: 'GET', url: '/v1/audit-logs?action=auth.failed', headers: b.owner.headers });
      expect(other.json().data).toEqual([]);
    });

    it('a refused email becomes a user: the next token works at once (refusals are not cached)', async () => {
      const email = `${randomSlug('later')}@example.test`;
      const token = await provider.sign(rsa, { ...claimsOf(a.member, a), email });
      expect401(await get(app, token), 'not a user');
      const created = await app.inject({ method: 'POST', url: '/v1/users', headers: a.owner.headers, payload: { email } });
      expect(created.statusCode).toBe(201);
      expect((await get(app, token)).json()).toMatchObject({ id: created.json().id, role: 'member' });
    });

    it('an org refused as unknown is not remembered as such: once created, its users sign in at once', async () => {
      const slug = randomSlug('soon');
      const email = `${randomSlug('first')}@example.test`;
      const token = await provider.sign(rsa, { email, org_id: slug });
      expect401(await get(app, token), 'does not exist');
      const db = await getTestDb();
      const org = await createOrg(db, { name: 'Soon', slug });
      const u = await addUser(db, org.id, 'owner', email);
      expect((await get(app, token)).json()).toMatchObject({ id: u.id, orgId: org.id, role: 'owner' });
      // And the other orgs' callers were not disturbed by either answer.
      expect((await get(app, await provider.sign(rsa, claimsOf(a.member, a)))).statusCode).toBe(200);
    });
  });

  describe('a change to the user reaches a cached caller', () => {
    it('deleted in the database: refused once the notification arrives', async () => {
      const u = await a.addUser('member');
      const token = await provider.sign(rsa, claimsOf(u, a));
      expect((await get(app, token)).statusCode).toBe(200);
      expect((await get(app, token)).statusCode).toBe(200); // from the cache now
      await (await getTestDb()).query('UPDATE users SET deleted_at = now() WHERE id = $1', [u.id]);
      expect(await app.authenticator.sync()).toBe(true);
      expect401(await get(app, token), 'not a user');
    });

    it('role changed in the database: the next request has the new role', async () => {
      const u = await a.addUser('admin');
      const token = await provider.sign(ec, claimsOf(u, a, 'id'));
      expect((await get(app, token)).json().role).toBe('admin');
      await (await getTestDb()).query("UPDATE users SET role = 'member' WHERE id = $1", [u.id]);
      expect(await app.authenticator.sync()).toBe(true);
      const res = await get(app, token);
      expect(res.json().role).toBe('member');
      expect(contextOf(res)?.role).toBe('member');
      expectError(await get(app, token, '/v1/audit-logs'), 403, 'forbidden');
    });

    it('deleted through the API by an owner signed in with the provider: refused at once', async () => {
      const u = await a.addUser('member');
      const token = await provider.sign(rsa, claimsOf(u, a));
      expect((await get(app, token)).statusCode).toBe(200);
      const owner = await provider.sign(rsa, claimsOf(a.owner, a));
      const del = await app.inject({ method: 'DELETE', url: `/v1/users/${u.id}`, headers: bearer(owner) });
      expect(del.statusCode).toBe(204);
      expect401(await get(app, token), 'not a user');
    });

    it('new org limits apply to the next request', async () => {
      const t = await createTenant();
      const token = await provider.sign(rsa, claimsOf(t.member, t));
      expect((await get(app, token, '/v1/org/usage')).statusCode).toBe(403); // a member; limits are read with the caller
      const admin = await provider.sign(rsa, claimsOf(t.admin, t));
      expect((await get(app, admin, '/v1/org/usage')).json().limits.dailyCap).not.toBe(7);
      await setOrgLimitOverrides(await getTestDb(), t.org.id, { dailyCap: 7 });
      expect(await app.authenticator.sync()).toBe(true);
      expect((await get(app, admin, '/v1/org/usage')).json().limits.dailyCap).toBe(7);
    });
  });
});

describe('the provider', () => {
  it('rotates its keys: a token with a new kid fetches the key set again (after the cooldown)', async () => {
    const [old, next] = await Promise.all([makeKey('RS256'), makeKey('ES256')]);
    freezeClock();
    const provider = await startProvider({ keys: [old] });
    const app = await buildOidcApp(provider);
    try {
      const t = await createTenant();
      expect((await get(app, await provider.sign(old, claimsOf(t.member, t)))).statusCode).toBe(200);
      provider.keys = [next];
      const fresh = await provider.sign(next, claimsOf(t.member, t));
      // Right after a fetch a new kid is not fetched again (jose's cooldown): the key is unknown.
      expect401(await get(app, fresh), 'does not publish');
      advanceClock(31_000);
      const before = provider.hitsOf('jwks');
      expect((await get(app, fresh)).statusCode).toBe(200);
      expect(provider.hitsOf('jwks')).toBe(before + 1);
      // The retired key is gone with the old set.
      expect401(await get(app, await provider.sign(old, claimsOf(t.member, t))), 'does not publish');
    } finally {
      await app.close();
      await provider.close();
    }
  });

  it('unreachable at start: the server starts, its tokens get 503 with Retry-After, and work once it is back', async () => {
    const key = await makeKey('RS256');
    const provider = await startProvider({ keys: [key] });
    await provider.stop();
    freezeClock();
    const { logger, lines } = captureLogger();
    const app = await buildOidcApp(provider, { logger });
    try {
      const t = await createTenant();
      const token = await provider.sign(key, claimsOf(t.member, t));
      const res = await get(app, token);
      const body = expectError(res, 503, 'service_unavailable');
      expect(body.message).toContain('identity provider');
      const retryAfter = Number(res.headers['retry-after']);
      expect(retryAfter).toBeGreaterThanOrEqual(1);
      // Other methods are unaffected.
      expect((await app.inject({ method: 'GET', url: '/v1/me', headers: t.member.headers })).statusCode).toBe(200);
      expect(lines.some((l) => l.includes('OIDC provider discovery') && l.includes('failed'))).toBe(true);

      await provider.start();
      // Within the backoff the provider is not asked again.
      expect((await get(app, token)).statusCode).toBe(503);
      expect(provider.hitsOf('discovery')).toBe(0);
      advanceClock(retryAfter * 1_000);
      expect((await get(app, token)).statusCode).toBe(200);
      expect(provider.hitsOf('discovery')).toBe(1);
      expect(lines.some((l) => l.includes('OIDC provider discovery available again'))).toBe(true);
    } finally {
      await app.close();
      await provider.close();
    }
  });

  it('/health says whether the provider answers, and stays 200 while it does not', async () => {
    const key = await makeKey('RS256');
    const provider = await startProvider({ keys: [key] });
    provider.mode = 'error';
    freezeClock();
    const app = await buildOidcApp(provider);
    const health = async () => {
      const res = await app.inject({ method: 'GET', url: '/health' });
      return { status: res.statusCode, identityProvider: res.json<{ identityProvider?: string }>().identityProvider };
    };
    try {
      expect(await health()).toEqual({ status: 200, identityProvider: 'unreachable' });
      provider.mode = 'ok';
      advanceClock(60_000);
      const t = await createTenant();
      expect((await get(app, await provider.sign(key, claimsOf(t.member, t)))).statusCode).toBe(200);
      expect(await health()).toEqual({ status: 200, identityProvider: 'ok' });
    } finally {
      await app.close();
      await provider.close();
    }
    // Without the oidc method there is no such field.
    const plain = await buildTestApp();
    try {
      expect((await plain.inject({ method: 'GET', url: '/health' })).json()).not.toHaveProperty('identityProvider');
    } finally {
      await plain.close();
    }
  });

  it('failing: one request per backoff, not one per token; errors of the key set are 503 too', async () => {
    const key = await makeKey('ES256');
    const provider = await startProvider({ keys: [key] });
    provider.mode = 'error';
    freezeClock();
    const app = await buildOidcApp(provider);
    try {
      const t = await createTenant();
      const token = await provider.sign(key, claimsOf(t.member, t));
      const responses = await Promise.all(Array.from({ length: 20 }, () => get(app, token)));
      for (const res of responses) expectError(res, 503, 'service_unavailable');
      expect(provider.hitsOf('discovery')).toBe(1); // at start, and not again within the backoff

      // Discovery answers, the key set does not.
      provider.mode = 'ok';
      provider.discovery = { jwks_uri: `http://127.0.0.1:${provider.port}/missing` };
      advanceClock(60_000);
      const res = await get(app, token);
      expectError(res, 503, 'service_unavailable');
      expect(Number(res.headers['retry-after'])).toBeGreaterThanOrEqual(1);
      expect(provider.hits.get('/missing')).toBe(1);
      expect((await get(app, token)).statusCode).toBe(503);
      expect(provider.hits.get('/missing')).toBe(1);
    } finally {
      await app.close();
      await provider.close();
    }
  });

  it('down after its keys were fetched: known keys still verify (even past their max age), an unknown key is a 503, not a 401', async () => {
    const [key, later] = await Promise.all([makeKey('RS256'), makeKey('RS256')]);
    freezeClock();
    const provider = await startProvider({ keys: [key] });
    const app = await buildOidcApp(provider);
    try {
      const t = await createTenant();
      expect((await get(app, await provider.sign(key, claimsOf(t.member, t)))).statusCode).toBe(200);
      await provider.stop();
      advanceClock(11 * 60_000); // the keys are due to be fetched again, and cannot be
      expect((await get(app, await provider.sign(key, claimsOf(t.admin, t)))).json().role).toBe('admin');
      const res = await get(app, await provider.sign(later, claimsOf(t.member, t)));
      expectError(res, 503, 'service_unavailable');
      expect(Number(res.headers['retry-after'])).toBeGreaterThanOrEqual(1);
      // Back, with the new key: found once the backoff is over.
      provider.keys = [key, later];
      await provider.start();
      advanceClock(60_000);
      expect((await get(app, await provider.sign(later, claimsOf(t.member, t)))).statusCode).toBe(200);
    } finally {
      await app.close();
      await provider.close();
    }
  });

  it("a discovery document naming another issuer: 503, and an error log naming OIDC_ISSUER", async () => {
    const key = await makeKey('RS256');
    const provider = await startProvider({ keys: [key] });
    provider.discovery = { issuer: `${provider.issuer}/` };
    const { logger, lines } = captureLogger();
    const app = await buildOidcApp(provider, { logger });
    try {
      const t = await createTenant();
      expectError(await get(app, await provider.sign(key, claimsOf(t.member, t))), 503, 'service_unavailable');
      const line = lines.map((l) => JSON.parse(l) as Record<string, unknown>).find((l) => typeof l.reason === 'string' && l.reason.includes('OIDC_ISSUER'));
      expect(line).toMatchObject({ level: 50, issuer: provider.issuer });
    } finally {
      await app.close();
      await provider.close();
    }
  });

  it('an issuer with a path and a trailing slash: discovery drops the slash, iss must keep it', async () => {
    const key = await makeKey('ES256');
    const provider = await startProvider({ keys: [key], issuerPath: '/tenants/acme/' });
    expect(provider.issuer.endsWith('/tenants/acme/')).toBe(true);
    expect(provider.discoveryPath).toBe('/tenants/acme/.well-known/openid-configuration');
    const app = await buildOidcApp(provider);
    try {
      const t = await createTenant();
      expect((await get(app, await provider.sign(key, claimsOf(t.owner, t)))).json().role).toBe('owner');
      expect(provider.hitsOf('discovery')).toBe(1);
      const withoutSlash = provider.issuer.replace(/\/$/, '');
      expect401(await get(app, await provider.sign(key, { ...claimsOf(t.owner, t), iss: withoutSlash })), 'unknown or disabled issuer');
    } finally {
      await app.close();
      await provider.close();
    }
  });

  it('never writes a token to the logs, whatever happens to it', async () => {
    const [key, stranger] = await Promise.all([makeKey('RS256'), makeKey('RS256')]);
    freezeClock();
    const provider = await startProvider({ keys: [key] });
    const { logger, lines } = captureLogger();
    const app = await buildOidcApp(provider, { logger, env: { ACCESS_LOG: 'true', LOG_LEVEL: 'trace' } });
    const tokens: string[] = [];
    try {
      const t = await createTenant();
      const send = async (token: string, url = '/v1/me') => {
        tokens.push(token);
        return (await get(app, token, url)).statusCode;
      };
      expect(await send(await provider.sign(key, claimsOf(t.admin, t)))).toBe(200);
      expect(await send(await provider.sign(key, claimsOf(t.admin, t)), '/v1/users?limit=1')).toBe(200);
      expect(await send(await provider.sign(key, { ...claimsOf(t.admin, t), exp: nowSeconds() - 3_600 }))).toBe(401);
      expect(await send(await provider.sign(stranger, claimsOf(t.admin, t)))).toBe(401);
      expect(await send(await provider.sign(key, { ...claimsOf(t.admin, t), email: 'who@example.test' }))).toBe(401);
      expect(await send(await provider.sign(key, { ...claimsOf(t.admin, t), aud: 'x' }))).toBe(401);
      await provider.stop();
      advanceClock(11 * 60_000);
      expect(await send(await provider.sign(stranger, claimsOf(t.admin, t)))).toBe(503);
      await app.refusalAudit.settled();
    } finally {
      await app.close();
      await provider.close();
    }
    expect(lines.some((l) => l.includes('request completed'))).toBe(true);
    expect(lines.some((l) => l.includes('Request authenticated'))).toBe(true);
    const all = lines.join('\n');
    for (const token of tokens) {
      expect(all).not.toContain(token);
      expect(all).not.toContain(token.split('.')[2]);
      expect(all).not.toContain(token.split('.')[1]);
    }
  });
});
