import { randomBytes, randomUUID } from 'node:crypto';
import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { generateKeyPair, SignJWT, type JWTPayload } from 'jose';
import { hashPassword } from '../../src/auth/passwords.js';
import { createAccessTokens } from '../../src/auth/tokens.js';
import { SEED } from '../../src/db/seed.js';
import type { Database } from '../../src/infra/database.js';
import { createSession } from '../../src/models/session.model.js';
import type { TestTenant, TestUser } from './app.js';
import type { AuthScheme } from './securitySuite.js';

/** Password sign-in in tests: passwords set straight in the database, sign-in through HTTP. */

/** A signing key the tests know, so they can forge tokens with the real key (expired, wrong audience...). */
export const TEST_SIGNING_KEY = randomBytes(48).toString('base64');
export const SESSION_ENV: Record<string, string> = { JWT_SIGNING_KEY: TEST_SIGNING_KEY };

export const newPassword = () => `pw-${randomBytes(9).toString('base64url')}-${randomBytes(3).toString('hex')}`;

/** Gives `user` a password (hashed as the server does) and returns it. */
export async function setPassword(db: Database, user: Pick<TestUser, 'id' | 'orgId'>, password = newPassword()): Promise<string> {
  await db.query('UPDATE users SET password_hash = $3 WHERE org_id = $1 AND id = $2', [user.orgId, user.id, await hashPassword(password)]);
  return password;
}

export interface Tokens {
  accessToken: string;
  refreshToken: string;
  tokenType: string;
  expiresIn: number;
}

export function loginRequest(
  app: FastifyInstance,
  body: { orgSlug: string; email: string; password: string },
  opts: { remoteAddress?: string; headers?: Record<string, string> } = {},
): Promise<LightMyRequestResponse> {
  return app.inject({
    method: 'POST',
    url: '/v1/auth/login',
    payload: body,
    ...(opts.remoteAddress ? { remoteAddress: opts.remoteAddress } : {}),
    ...(opts.headers ? { headers: opts.headers } : {}),
  });
}

/** Signs `user` of `t` in with `password`; fails the test unless it answers 200. */
export async function login(app: FastifyInstance, t: TestTenant, user: TestUser, password: string): Promise<Tokens> {
  const res = await loginRequest(app, { orgSlug: t.org.slug, email: user.email, password });
  if (res.statusCode !== 200) throw new Error(`login answered ${res.statusCode}: ${res.body}`);
  return res.json<Tokens>();
}

export const bearer = (token: string) => ({ authorization: `Bearer ${token}` });

export const refresh = (app: FastifyInstance, refreshToken: string) =>
  app.inject({ method: 'POST', url: '/v1/auth/refresh', payload: { refreshToken } });

export const logout = (app: FastifyInstance, refreshToken: string) =>
  app.inject({ method: 'POST', url: '/v1/auth/logout', payload: { refreshToken } });

export const me = (app: FastifyInstance, accessToken: string) => app.inject({ method: 'GET', url: '/v1/me', headers: bearer(accessToken) });

// ---------------------------------------------------------------------------------------------
// The security suite's scheme: access tokens of password sessions.

const KEY = new TextEncoder().encode(TEST_SIGNING_KEY);
const ISSUER = 'llm-app';
const accessTokens = createAccessTokens({ signingKey: TEST_SIGNING_KEY, issuer: ISSUER, audience: ISSUER, accessTokenTtlSeconds: 900, refreshTokenTtlSeconds: 3_600 });
// Any argon2id hash will do for a session made in the database (no sign-in, so no verification):
// one made ahead of time costs no hashing per user.
const READY_HASH = SEED.users[0].passwordHash;

/** A live session of `user` written through the model (as a sign-in does), and an access token for it. */
export async function sessionToken(db: Database, user: Pick<TestUser, 'id' | 'orgId' | 'role'>): Promise<string> {
  await db.query('UPDATE users SET password_hash = $3 WHERE org_id = $1 AND id = $2', [user.orgId, user.id, READY_HASH]);
  const meta = { requestId: 'security-suite', ip: null, userAgent: null };
  const session = await createSession(db, user.orgId, user.id, READY_HASH, { tokenHash: randomBytes(32).toString('hex'), ttlSeconds: 3_600 }, meta);
  if (!session) throw new Error('no session: the user is not live');
  return accessTokens.sign({ userId: user.id, orgId: user.orgId, role: user.role, sessionId: session.sessionId });
}

const sign = (payload: JWTPayload, header: { alg?: string; typ?: string } = {}, key: Uint8Array = KEY) =>
  new SignJWT(payload).setProtectedHeader({ alg: 'HS256', typ: 'at+jwt', ...header }).sign(key);
const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');

export const SESSION_SCHEME: AuthScheme = {
  method: 'password',
  env: () => SESSION_ENV,
  as: async (user, db) => bearer(await sessionToken(db, user)),
  refused: async (t, db) => {
    const now = Math.floor(Date.now() / 1000);
    const live = await sessionToken(db, t.owner);
    const [, payload] = live.split('.');
    const claims = JSON.parse(Buffer.from(payload!, 'base64url').toString('utf8')) as JWTPayload;
    const { privateKey } = await generateKeyPair('RS256');
    return [
      { what: 'a token for a session that does not exist', headers: bearer(await sign({ ...claims, sid: randomUUID(), jti: randomUUID() })) },
      { what: 'an expired token', headers: bearer(await sign({ ...claims, iat: now - 4_000, exp: now - 3_600 })) },
      { what: 'a token not valid yet', headers: bearer(await sign({ ...claims, nbf: now + 3_600 })) },
      { what: 'another audience', headers: bearer(await sign({ ...claims, aud: 'another-service' })) },
      { what: 'alg none', headers: bearer(`${b64({ alg: 'none', typ: 'at+jwt' })}.${b64(claims)}.`) },
      { what: 'RS256 with our issuer', headers: bearer(await new SignJWT(claims).setProtectedHeader({ alg: 'RS256', typ: 'at+jwt' }).sign(privateKey)) },
      { what: 'HS256 with another key', headers: bearer(await sign(claims, {}, randomBytes(48))) },
      { what: 'typ JWT', headers: bearer(await sign(claims, { typ: 'JWT' })) },
      { what: 'the payload changed under the signature', headers: bearer(`${live.split('.')[0]}.${b64({ ...claims, role: 'owner', sub: randomUUID() })}.${live.split('.')[2]}`) },
      { what: 'a truncated token', headers: bearer(live.slice(0, -3)) },
    ];
  },
  revoke: async (user, _headers, db) => {
    // As a sign-out does.
    await db.query("UPDATE sessions SET revoked_at = now(), revoked_reason = 'logout' WHERE org_id = $1 AND user_id = $2 AND revoked_at IS NULL", [
      user.orgId,
      user.id,
    ]);
  },
};
