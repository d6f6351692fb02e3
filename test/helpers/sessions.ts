import { randomBytes } from 'node:crypto';
import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { hashPassword } from '../../src/auth/passwords.js';
import type { Database } from '../../src/infra/database.js';
import type { TestTenant, TestUser } from './app.js';

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
