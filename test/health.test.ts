import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp, createTenant, type TestTenant } from './helpers/app.js';

describe('GET /health', () => {
  let app: FastifyInstance;
  let t: TestTenant;
  beforeAll(async () => {
    app = await buildTestApp();
    t = await createTenant();
  });
  afterAll(() => app.close());

  it('answers without auth: status, env, timestamp, requestId, database', async () => {
    const res = await app.inject({ method: 'GET', url: '/health' });
    expect(res.statusCode).toBe(200);
    const body = res.json();
    expect(body).toEqual({
      status: 'ok',
      env: 'test',
      timestamp: expect.stringMatching(/^\d{4}-\d{2}-\d{2}T/),
      requestId: res.headers['x-request-id'],
      database: 'connected',
      rateLimiter: 'memory',
      authCache: 'ok',
    });
  });

  it('adds org and user with valid auth headers', async () => {
    const res = await app.inject({ method: 'GET', url: '/health', headers: t.admin.headers });
    expect(res.statusCode).toBe(200);
    expect(res.json()).toMatchObject({
      status: 'ok',
      database: 'connected',
      org: t.org.id,
      user: { id: t.admin.id, email: t.admin.email, role: 'admin' },
    });
  });
});
