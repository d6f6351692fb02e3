import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { FastifyInstance } from 'fastify';
import { afterEach, describe, expect, it } from 'vitest';
import { buildTestApp, createTenant, type TestTenant } from './helpers/app.js';
import { insertApiKey } from './helpers/apiKeys.js';
import { getTestDb } from './helpers/db.js';

/**
 * The refusal gate (src/middleware/refusalGate.ts) answers a remembered refusal before Fastify
 * sees the request. These tests run real servers (app.inject() does not go through the server's
 * request event) and compare its answers with the full path's, from a second app without it.
 */

const apps: FastifyInstance[] = [];
afterEach(async () => {
  await Promise.all(apps.splice(0).map((a) => a.close()));
});

// One request, then a refill slow enough that nothing comes back during a test.
const ONE_REQUEST = { ORG_RATE_LIMIT_BURST: '1', ORG_RATE_LIMIT_PER_SECOND: '0.001' };

interface Served {
  app: FastifyInstance;
  port: number;
}

async function serve(gate: boolean, env: Record<string, string> = ONE_REQUEST): Promise<Served> {
  const app = await buildTestApp({ env, refusalGate: gate });
  apps.push(app);
  await app.listen({ host: '127.0.0.1', port: 0 });
  return { app, port: (app.server.address() as AddressInfo).port };
}

/** rate_limit_gate_refusals_total: the refusals the gate answered. */
async function gateAnswered(s: Served): Promise<number> {
  const { body } = await send(s.port, '/metrics', {});
  const m = /^rate_limit_gate_refusals_total (\d+)$/m.exec(body);
  expect(m).not.toBeNull();
  return Number(m![1]);
}

interface Answer {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

function send(port: number, path: string, headers: Record<string, string>, method = 'GET'): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, path, method, headers, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** What must be equal in two answers: every header but the per-response ones, and the body but its id. */
function comparable(a: Answer): unknown {
  const { 'x-request-id': id, ...headers } = a.headers;
  delete headers.date;
  expect(id).toMatch(/^[0-9a-f-]{36}$/);
  const body = JSON.parse(a.body) as { requestId: string };
  expect(body.requestId).toBe(id);
  return { status: a.status, headers, body: { ...body, requestId: '<id>' } };
}

/** The member's first request is admitted, the second refused by the limiter (and remembered). */
async function refusedTenant(s: Served): Promise<TestTenant> {
  const t = await createTenant();
  expect((await send(s.port, '/v1/me', t.member.headers)).status).toBe(200);
  expect((await send(s.port, '/v1/me', t.member.headers)).status).toBe(429);
  return t;
}

describe('the refusal gate', () => {
  it('answers a remembered refusal as the full path does, header for header, without reaching Fastify', async () => {
    const withGate = await serve(true);
    const without = await serve(false);
    const a = await refusedTenant(withGate);
    const b = await refusedTenant(without);

    expect(await gateAnswered(withGate)).toBe(0); // the first refusal was the limiter's, in the full path
    const gated = await send(withGate.port, '/v1/me', a.member.headers);
    expect(await gateAnswered(withGate)).toBe(1);
    const full = await send(without.port, '/v1/me', b.member.headers);
    expect(await gateAnswered(without)).toBe(0);
    expect(gated.status).toBe(429);
    expect(comparable(gated)).toEqual(comparable(full));
    expect(gated.headers['ratelimit-policy']).toBe('"org";q=1;w=1000');
    expect(Number(gated.headers['content-length'])).toBe(Buffer.byteLength(gated.body));

    // Another user of the refused org, once cached, is refused the same way; a route with a parameter too.
    await send(withGate.port, '/v1/me', a.admin.headers); // cached by this request (refused by the full path)
    const admin = await send(withGate.port, `/v1/users/${a.member.id}`, a.admin.headers);
    expect(admin.status).toBe(429);
    expect(await gateAnswered(withGate)).toBe(2);
    // A query string does not hide the route.
    expect((await send(withGate.port, '/v1/me?page=2', a.member.headers)).status).toBe(429);
    expect(await gateAnswered(withGate)).toBe(3);
    // A caller's own x-request-id is kept, as Fastify keeps it.
    const own = await send(withGate.port, '/v1/me', { ...a.member.headers, 'x-request-id': 'trace-42' });
    expect(own.headers['x-request-id']).toBe('trace-42');
    expect(JSON.parse(own.body).requestId).toBe('trace-42');
    expect(Number(own.headers['content-length'])).toBe(Buffer.byteLength(own.body));
  });

  it('leaves everything else to Fastify: other orgs, unknown routes, HEAD, uncached or conflicting credentials', async () => {
    const s = await serve(true);
    const t = await refusedTenant(s);
    const other = await createTenant();
    const through = async (path: string, headers: Record<string, string>, method = 'GET') => {
      const res = await send(s.port, path, headers, method);
      expect(await gateAnswered(s), `${method} ${path}`).toBe(0);
      return res.status;
    };
    expect(await through('/v1/me', other.member.headers)).toBe(200);
    expect(await through('/v1/no-such-route', t.member.headers)).toBe(404);
    expect(await through('/v1/me/', t.member.headers)).toBe(404); // no trailing-slash match, as in Fastify
    expect(await through('/v1/users/%E0%A4%A', t.member.headers)).toBe(400);
    expect(await through('/health', t.member.headers)).toBe(200);
    expect(await through('/v1/me', t.member.headers, 'HEAD')).toBe(429);
    // Not in the cache yet: authenticated (and refused) by the full path.
    expect(await through('/v1/me', t.owner.headers)).toBe(429);
    // Spellings the cache did not store go through validation.
    expect(await through('/v1/me', { 'x-org-id': t.member.orgId.toUpperCase(), 'x-user-id': t.member.id })).toBe(429);
    expect(await through('/v1/me', { ...t.member.headers, authorization: 'Bearer llmk_x' })).toBe(400);
    expect(await through('/v1/me', { 'x-org-id': t.member.orgId })).toBe(400);
  });

  it('finds each request its own route when URLs and methods alternate (it keeps the last one found)', async () => {
    const s = await serve(true);
    const t = await refusedTenant(s);
    const steps: [string, string, number, number][] = [
      // method, path, status, answers of the gate so far
      ['GET', '/v1/me', 429, 1],
      ['GET', '/v1/no-such-route', 404, 1],
      ['GET', '/v1/me', 429, 2],
      ['POST', '/v1/me', 404, 2],
      ['GET', '/v1/me', 429, 3],
      ['GET', '/v1/users', 429, 4],
      ['GET', '/v1/me/', 404, 4],
    ];
    for (const [method, path, status, answered] of steps) {
      expect((await send(s.port, path, t.member.headers, method)).status, `${method} ${path}`).toBe(status);
      expect(await gateAnswered(s), `${method} ${path}`).toBe(answered);
    }
  });

  it('leaves the refusal of an address that failed authentication too often to Fastify: it comes first', async () => {
    const s = await serve(true, { ...ONE_REQUEST, IP_RATE_LIMIT_PER_MINUTE: '3' });
    const t = await refusedTenant(s);
    const unknownUser = { 'x-org-id': t.org.id, 'x-user-id': '00000000-0000-4000-8000-000000000000' };
    for (let i = 0; i < 3; i++) expect((await send(s.port, '/v1/me', unknownUser)).status).toBe(401);
    await new Promise((r) => setTimeout(r, 50)); // failures are charged after their responses
    const res = await send(s.port, '/v1/me', t.member.headers);
    expect(res.status).toBe(429);
    expect(JSON.parse(res.body).message).toBe('Too many failed requests from this address');
  });

  it('answers for a cached API key of a refused org too', async () => {
    const s = await serve(true);
    const t = await createTenant();
    const key = await insertApiKey(await getTestDb(), t.org.id, 'member', t.owner.id);
    expect((await send(s.port, '/v1/me', key.headers)).status).toBe(200);
    expect((await send(s.port, '/v1/me', key.headers)).status).toBe(429);
    const gated = await send(s.port, '/v1/me', key.headers);
    expect(gated.status).toBe(429);
    expect(await gateAnswered(s)).toBe(1);
    // A revoked key is the full path's to refuse (401), even in a refused org.
    const revoked = await insertApiKey(await getTestDb(), t.org.id, 'member', t.owner.id, { revoked: true });
    expect((await send(s.port, '/v1/me', revoked.headers)).status).toBe(401);
  });

  it('counts its answers in the duration histogram and the decision counter', async () => {
    const s = await serve(true);
    const t = await refusedTenant(s);
    for (let i = 0; i < 3; i++) expect((await send(s.port, '/v1/me', t.member.headers)).status).toBe(429);
    const metrics = (await send(s.port, '/metrics', {})).body;
    expect(metrics).toMatch(/^http_request_duration_seconds_count\{method="GET",route="\/v1\/me",status_code="429"\} 4$/m);
    expect(metrics).toMatch(/^rate_limit_decisions_total\{result="refused",reason="org_rate"\} 4$/m);
    expect(metrics).toMatch(/^rate_limit_gate_refusals_total 3$/m);
  });
});
