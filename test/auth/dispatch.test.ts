import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp, createTenant, type TestTenant } from '../helpers/app.js';

/**
 * How a request's credential is routed to its method, whatever methods exist: the refusals that
 * happen before any method runs.
 */

describe('choosing the authentication method', () => {
  let app: FastifyInstance;
  let headersOnly: FastifyInstance;
  let t: TestTenant;
  beforeAll(async () => {
    app = await buildTestApp();
    headersOnly = await buildTestApp({ env: { AUTH_METHODS: 'api_key' } });
    t = await createTenant();
  });
  afterAll(async () => {
    await app.close();
    await headersOnly.close();
  });

  it('answers 401 with WWW-Authenticate to an anonymous call of a tenant route', async () => {
    const res = await app.inject({ method: 'GET', url: '/v1/me' });
    expect(res.statusCode).toBe(401);
    expect(res.headers['www-authenticate']).toBe('Bearer realm="llm-app"');
    expect(res.json()).toMatchObject({ error: 'Unauthorized', message: expect.stringContaining('Bearer') });
  });

  it.each([
    ['Basic dXNlcjpwYXNz', 'Bearer'],
    ['Bearer', 'Bearer'],
    ['Bearer two words', 'Bearer'],
    ['Bearer not-a-jwt', 'Malformed'],
    ['Bearer a.b', 'Malformed'],
    ['Bearer e30.e30.', 'unknown or disabled issuer'],
    ['Bearer !!!.???.***', 'Bearer'],
  ])('refuses %j with 401 invalid_token', async (authorization, message) => {
    const res = await app.inject({ method: 'GET', url: '/v1/me', headers: { authorization } });
    expect(res.statusCode).toBe(401);
    expect(res.headers['www-authenticate']).toBe('Bearer realm="llm-app", error="invalid_token"');
    expect(res.json().message).toContain(message);
  });

  it('refuses a request that sends both an Authorization header and the development headers', async () => {
    const res = await app.inject({ method: 'GET', url: '/v1/me', headers: { ...t.admin.headers, authorization: 'Bearer llmk_x' } });
    expect(res.statusCode).toBe(400);
    expect(res.json().message).toContain('not both');
  });

  it('refuses the development headers with 401 when fake is not among AUTH_METHODS', async () => {
    const res = await headersOnly.inject({ method: 'GET', url: '/v1/me', headers: t.admin.headers });
    expect(res.statusCode).toBe(401);
    expect(res.json().message).toContain('not enabled');
    // Still fine where they are enabled.
    expect((await app.inject({ method: 'GET', url: '/v1/me', headers: t.admin.headers })).statusCode).toBe(200);
  });

  it('says which method is off when a token of that method arrives', async () => {
    const noKeys = await buildTestApp({ env: { AUTH_METHODS: 'fake' } });
    try {
      const res = await noKeys.inject({ method: 'GET', url: '/v1/me', headers: { authorization: 'Bearer llmk_abc' } });
      expect(res.statusCode).toBe(401);
      expect(res.json().message).toContain('API keys are not enabled');
    } finally {
      await noKeys.close();
    }
  });

  it('shows a header caller on /health', async () => {
    const res = await app.inject({ method: 'GET', url: '/health', headers: t.member.headers });
    expect(res.statusCode).toBe(200);
    expect(res.json().user).toEqual({ id: t.member.id, email: t.member.email, role: 'member' });
  });
});
