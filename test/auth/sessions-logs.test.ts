import { Writable } from 'node:stream';
import type { FastifyInstance } from 'fastify';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../../src/app.js';
import { createRateLimiter } from '../../src/ratelimit/index.js';
import { createTenant, testConfig, type TestTenant } from '../helpers/app.js';
import { getTestDb, silentLogger } from '../helpers/db.js';
import { bearer, newPassword, setPassword, TEST_SIGNING_KEY, type Tokens } from '../helpers/sessions.js';

/**
 * No secret in any log line: the app's logger at its most talkative (trace, access log on) is
 * captured while passwords and tokens go through every route, accepted and refused, and every
 * line is searched for them. Runs on both databases (the process suite does it over sockets, on
 * PostgreSQL).
 */

async function appWithCapturedLogs(env: Record<string, string>): Promise<{ app: FastifyInstance; lines: string[] }> {
  const lines: string[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      lines.push(chunk.toString('utf8'));
      cb();
    },
  });
  const logger = pino({ level: 'trace' }, stream);
  const config = testConfig({ ACCESS_LOG: 'true', LOG_LEVEL: 'trace', ...env });
  const db = await getTestDb();
  const limiter = createRateLimiter(config, db, silentLogger);
  const app = await buildApp({ config, db, limiter: limiter.limiter, logger });
  app.addHook('onClose', () => limiter.close());
  await app.ready();
  return { app, lines };
}

describe('secrets and the logs', () => {
  let app: FastifyInstance;
  let lines: string[];
  let t: TestTenant;

  beforeAll(async () => {
    ({ app, lines } = await appWithCapturedLogs({ JWT_SIGNING_KEY: TEST_SIGNING_KEY }));
    t = await createTenant(await getTestDb());
  });
  afterAll(() => app.close());

  it('no password, access token, refresh token or signing key in any log line, whatever happens to them', async () => {
    const db = await getTestDb();
    const password = await setPassword(db, t.member);
    const wrong = `${password}-wrong`;
    const secrets = [TEST_SIGNING_KEY, password, wrong];
    const post = (url: string, payload: unknown, headers: Record<string, string> = {}) => app.inject({ method: 'POST', url, payload: payload as Record<string, unknown>, headers });
    const slug = t.org.slug;

    expect((await post('/v1/auth/login', { orgSlug: slug, email: t.member.email, password: wrong })).statusCode).toBe(401);
    expect((await post('/v1/auth/login', { orgSlug: slug, email: t.member.email, password, extra: password })).statusCode).toBe(400);
    expect((await post('/v1/auth/login', { orgSlug: slug, email: password, password })).statusCode).toBe(400);
    const first = (await post('/v1/auth/login', { orgSlug: slug, email: t.member.email, password })).json<Tokens>();
    const second = (await post('/v1/auth/refresh', { refreshToken: first.refreshToken })).json<Tokens>();
    for (const tok of [first, second]) secrets.push(tok.accessToken, tok.accessToken.split('.')[2]!, tok.refreshToken, tok.refreshToken.slice(5));

    expect((await app.inject({ method: 'GET', url: '/v1/me', headers: bearer(second.accessToken) })).statusCode).toBe(200);
    expect((await app.inject({ method: 'GET', url: '/v1/me', headers: bearer(`${second.accessToken}x`) })).statusCode).toBe(401);
    const next = newPassword();
    secrets.push(next);
    const change = await app.inject({
      method: 'PUT',
      url: '/v1/me/password',
      headers: bearer(second.accessToken),
      payload: { currentPassword: password, newPassword: next },
    });
    expect(change.statusCode).toBe(204);
    const weak = await app.inject({ method: 'PUT', url: '/v1/me/password', headers: bearer(second.accessToken), payload: { currentPassword: next, newPassword: 'Password2024!' } });
    expect(weak.statusCode).toBe(400);
    expect((await post('/v1/auth/refresh', { refreshToken: first.refreshToken })).statusCode).toBe(401); // reuse: the session ends
    expect((await post('/v1/auth/logout', { refreshToken: second.refreshToken })).statusCode).toBe(204);
    expect((await app.inject({ method: 'GET', url: '/v1/me', headers: bearer(second.accessToken) })).statusCode).toBe(401);
    await app.refusalAudit.settled();

    // The capture works: the access log and the authentication's debug lines are there.
    const text = lines.join('');
    expect(text).toContain('"url":"/v1/auth/login"');
    expect(text).toContain('Request authenticated');
    for (const secret of secrets) {
      expect(text.includes(secret), `a log line contains a secret (${secret.slice(0, 6)}…)`).toBe(false);
    }
  });

  it('without JWT_SIGNING_KEY (outside production) the server signs with a random key, says so, and it works', async () => {
    const { app: keyless, lines: keylessLines } = await appWithCapturedLogs({});
    try {
      const warning = keylessLines.map((l) => JSON.parse(l) as { level: number; msg: string }).find((l) => l.msg.startsWith('JWT_SIGNING_KEY is not set'));
      expect(warning?.level).toBe(40);
      const db = await getTestDb();
      const u = await t.addUser('member');
      const password = await setPassword(db, u);
      const res = await keyless.inject({ method: 'POST', url: '/v1/auth/login', payload: { orgSlug: t.org.slug, email: u.email, password } });
      expect(res.statusCode).toBe(200);
      const { accessToken } = res.json<Tokens>();
      expect((await keyless.inject({ method: 'GET', url: '/v1/me', headers: bearer(accessToken) })).statusCode).toBe(200);
      // Another instance has another key: it refuses the token.
      expect((await app.inject({ method: 'GET', url: '/v1/me', headers: bearer(accessToken) })).statusCode).toBe(401);
    } finally {
      await keyless.close();
    }
  });
});
