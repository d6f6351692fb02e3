import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp, createTenant, type TestTenant } from './helpers/app.js';

/** GET /metrics (Prometheus), GET /openapi.json and GET /docs. */

let app: FastifyInstance;
let t: TestTenant;

beforeAll(async () => {
  app = await buildTestApp();
  t = await createTenant();
});
afterAll(() => app.close());

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** Parses the Prometheus text exposition format (the subset prom-client writes). */
function parseMetrics(text: string): Sample[] {
  const samples: Sample[] = [];
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    expect(m, `not a sample line: ${line}`).not.toBeNull();
    const labels: Record<string, string> = {};
    for (const l of (m![2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]!] = l[2]!;
    samples.push({ name: m![1]!, labels, value: Number(m![3]!) });
  }
  return samples;
}

describe('GET /metrics', () => {
  let text: string;
  let samples: Sample[];

  beforeAll(async () => {
    // A known mix of requests on this app's own registry.
    for (let i = 0; i < 3; i++) {
      const r = await app.inject({ method: 'GET', url: `/v1/users/${t.member.id}`, headers: t.admin.headers });
      expect(r.statusCode).toBe(200);
    }
    const missing = await app.inject({
      method: 'GET',
      url: '/v1/users/00000000-0000-4000-8000-00000000dead',
      headers: t.admin.headers,
    });
    expect(missing.statusCode).toBe(404);
    const created = await app.inject({
      method: 'POST',
      url: '/v1/users',
      headers: t.admin.headers,
      payload: { email: `metrics-${Date.now()}@example.com` },
    });
    expect(created.statusCode).toBe(201);
    for (const url of ['/no-such-route', '/v1/nothing-here', `/${t.member.id}`]) {
      expect((await app.inject({ method: 'GET', url })).statusCode).toBe(404);
    }
    const res = await app.inject({ method: 'GET', url: '/metrics' });
    expect(res.statusCode).toBe(200);
    expect(res.headers['content-type']).toMatch(/^text\/plain; version=0\.0\.4/);
    text = res.body;
    samples = parseMetrics(text);
  });

  const count = (labels: Record<string, string>) =>
    samples.find(
      (s) =>
        s.name === 'http_request_duration_seconds_count' &&
        Object.entries(labels).every(([k, v]) => s.labels[k] === v) &&
        Object.keys(s.labels).length === Object.keys(labels).length,
    )?.value;

  it('has the request duration histogram with method, route pattern and status_code labels', () => {
    expect(text).toContain('# TYPE http_request_duration_seconds histogram');
    const buckets = samples.filter((s) => s.name === 'http_request_duration_seconds_bucket');
    expect(buckets.length).toBeGreaterThan(0);
    for (const b of buckets) expect(Object.keys(b.labels).sort()).toEqual(['le', 'method', 'route', 'status_code']);

    expect(count({ method: 'GET', route: '/v1/users/:id', status_code: '200' })).toBe(3);
    expect(count({ method: 'GET', route: '/v1/users/:id', status_code: '404' })).toBe(1);
    expect(count({ method: 'POST', route: '/v1/users', status_code: '201' })).toBe(1);
    const inf = buckets.find(
      (b) => b.labels.route === '/v1/users/:id' && b.labels.status_code === '200' && b.labels.le === '+Inf',
    );
    expect(inf?.value).toBe(3);
  });

  it('writes each series as a Prometheus histogram: every bound, cumulative, +Inf equal to the count, a sum', () => {
    const series = samples.filter(
      (s) => s.name === 'http_request_duration_seconds_bucket' && s.labels.route === '/v1/users/:id' && s.labels.status_code === '200',
    );
    expect(series.map((s) => s.labels.le)).toEqual(['0.0005', '0.001', '0.0025', '0.005', '0.01', '0.025', '0.05', '0.1', '0.25', '0.5', '1', '2.5', '5', '10', '+Inf']);
    for (let i = 1; i < series.length; i++) expect(series[i]!.value).toBeGreaterThanOrEqual(series[i - 1]!.value);
    expect(series.at(-1)!.value).toBe(3);
    const sum = samples.find((s) => s.name === 'http_request_duration_seconds_sum' && s.labels.route === '/v1/users/:id' && s.labels.status_code === '200');
    expect(sum!.value).toBeGreaterThan(0);
    expect(sum!.value).toBeLessThan(30);
  });

  it('never uses a raw URL or id as a route label', () => {
    expect(text).not.toContain(t.member.id);
    expect(text).not.toContain('no-such-route');
    expect(text).not.toContain('00000000dead');
    const routes = new Set(samples.filter((s) => s.labels.route !== undefined).map((s) => s.labels.route));
    for (const r of routes) expect(['unmatched', '/v1/users', '/v1/users/:id', '/health', '/metrics', '/v1/me', '/v1/org']).toContain(r);
  });

  it('labels unknown routes route="unmatched"', () => {
    expect(count({ method: 'GET', route: 'unmatched', status_code: '404' })).toBe(3);
  });

  it('includes process metrics', () => {
    const names = new Set(samples.map((s) => s.name));
    expect(names.has('process_cpu_user_seconds_total')).toBe(true);
    expect(names.has('nodejs_eventloop_lag_seconds')).toBe(true);
    expect(names.has('process_resident_memory_bytes') || names.has('nodejs_heap_size_used_bytes')).toBe(true);
  });

  it('counts the scrape itself on the next scrape', async () => {
    const res = await app.inject({ method: 'GET', url: '/metrics' });
    const again = parseMetrics(res.body);
    const scrapes = again.find(
      (s) => s.name === 'http_request_duration_seconds_count' && s.labels.route === '/metrics' && s.labels.status_code === '200',
    );
    expect(scrapes?.value).toBeGreaterThanOrEqual(1);
  });
});

interface OpenApiDoc {
  openapi: string;
  info: { title: string; version: string };
  paths: Record<string, Record<string, OpenApiOperation>>;
  components?: { schemas?: Record<string, unknown> };
}
interface OpenApiOperation {
  responses: Record<string, { description: string; content?: Record<string, { schema: unknown }> }>;
  parameters?: { in: string; name: string; required?: boolean; schema: unknown }[];
  requestBody?: { required?: boolean; content: Record<string, { schema: Record<string, unknown> }> };
}

describe('GET /openapi.json', () => {
  let doc: OpenApiDoc;
  beforeAll(async () => {
    const res = await app.inject({ method: 'GET', url: '/openapi.json' });
    expect(res.statusCode).toBe(200);
    expect(res.headers['content-type']).toMatch(/^application\/json/);
    doc = res.json<OpenApiDoc>();
  });

  const resolve = (schema: unknown): Record<string, unknown> => {
    const ref = (schema as { $ref?: string }).$ref;
    if (!ref) return schema as Record<string, unknown>;
    expect(ref).toMatch(/^#\/components\/schemas\//);
    const target = doc.components?.schemas?.[ref.slice('#/components/schemas/'.length)];
    expect(target, `unresolved ${ref}`).toBeDefined();
    return target as Record<string, unknown>;
  };

  it('is an OpenAPI 3.1 document', () => {
    expect(doc.openapi).toMatch(/^3\.1\.\d+$/);
    expect(typeof doc.info.title).toBe('string');
    expect(typeof doc.info.version).toBe('string');
    expect(typeof doc.paths).toBe('object');
  });

  it('lists every route with its methods', () => {
    const methods = (p: string) =>
      Object.keys(doc.paths[p] ?? {})
        .filter((k) => ['get', 'put', 'post', 'patch', 'delete', 'head', 'options'].includes(k))
        .sort();
    expect(methods('/health')).toEqual(['get']);
    expect(methods('/v1/me')).toEqual(['get']);
    expect(methods('/v1/org')).toEqual(['get']);
    expect(methods('/v1/users')).toEqual(['get', 'post']);
    expect(methods('/v1/users/{id}')).toEqual(['delete', 'get', 'patch']);
    // Only documented, public API: no internal or Fastify-style paths.
    for (const p of Object.keys(doc.paths)) expect(p).not.toContain(':');
  });

  it('every operation has responses whose $refs resolve', () => {
    const walk = (node: unknown): void => {
      if (Array.isArray(node)) return node.forEach(walk);
      if (node && typeof node === 'object') {
        for (const [k, v] of Object.entries(node)) {
          if (k === '$ref') {
            expect(typeof v).toBe('string');
            resolve({ $ref: v });
          } else walk(v);
        }
      }
    };
    for (const [p, ops] of Object.entries(doc.paths)) {
      for (const [method, op] of Object.entries(ops)) {
        expect(Object.keys(op.responses ?? {}).length, `${method} ${p}`).toBeGreaterThan(0);
        for (const [status, r] of Object.entries(op.responses)) {
          expect(status, `${method} ${p}`).toMatch(/^([1-5]\d\d|default)$/);
          expect(typeof r.description, `${method} ${p} ${status}`).toBe('string');
        }
      }
    }
    walk(doc);
  });

  it('documents the id path parameter and the list query parameters', () => {
    for (const method of ['get', 'patch', 'delete']) {
      const params = doc.paths['/v1/users/{id}']![method]!.parameters ?? [];
      expect(params.find((p) => p.in === 'path' && p.name === 'id')?.required, method).toBe(true);
    }
    const list = doc.paths['/v1/users']!.get!.parameters ?? [];
    expect(list.filter((p) => p.in === 'query').map((p) => p.name).sort()).toEqual(['cursor', 'limit']);
  });

  it('has request body schemas for POST and PATCH /v1/users', () => {
    const post = doc.paths['/v1/users']!.post!.requestBody;
    expect(post).toBeDefined();
    const postSchema = resolve(post!.content['application/json']!.schema);
    expect(postSchema.type).toBe('object');
    expect(Object.keys(postSchema.properties as object).sort()).toEqual(['email', 'name', 'role']);
    expect(postSchema.required).toEqual(['email']);
    expect(postSchema.additionalProperties).toBe(false);
    const role = (postSchema.properties as Record<string, { enum?: string[] }>).role;
    expect(role?.enum?.slice().sort()).toEqual(['admin', 'member', 'owner']);

    const patch = doc.paths['/v1/users/{id}']!.patch!.requestBody;
    expect(patch).toBeDefined();
    const patchSchema = resolve(patch!.content['application/json']!.schema);
    expect(patchSchema.type).toBe('object');
    expect(Object.keys(patchSchema.properties as object).sort()).toEqual(['name', 'role']);
    expect(patchSchema.additionalProperties).toBe(false);
  });

  it('documents the success and error responses of the user routes', () => {
    const users = doc.paths['/v1/users']!;
    expect(Object.keys(users.post!.responses)).toEqual(expect.arrayContaining(['201', '400', '401', '403', '409']));
    const user = resolve(users.post!.responses['201']!.content!['application/json']!.schema);
    expect(Object.keys(user.properties as object)).toEqual(
      expect.arrayContaining(['id', 'orgId', 'email', 'name', 'role', 'createdAt', 'updatedAt']),
    );
    const err = resolve(users.post!.responses['400']!.content!['application/json']!.schema);
    expect((err.required as string[]).slice().sort()).toEqual(['code', 'error', 'message', 'requestId']);
    expect(Object.keys(doc.paths['/v1/users/{id}']!.delete!.responses)).toEqual(expect.arrayContaining(['204', '404']));
  });
});

describe('GET /docs', () => {
  it('serves the interactive HTML page', async () => {
    let res = await app.inject({ method: 'GET', url: '/docs' });
    // @fastify/swagger-ui may redirect /docs to /docs/ or serve the page directly.
    if (res.statusCode >= 300 && res.statusCode < 400) {
      const location = res.headers.location;
      expect(typeof location).toBe('string');
      res = await app.inject({ method: 'GET', url: new URL(location as string, 'http://localhost/docs').pathname });
    }
    expect(res.statusCode).toBe(200);
    expect(res.headers['content-type']).toMatch(/^text\/html/);
    expect(res.body).toMatch(/<html/i);
    expect(res.body.toLowerCase()).toContain('swagger');
  });

  it('/docs/ serves the page too', async () => {
    const res = await app.inject({ method: 'GET', url: '/docs/' });
    expect(res.statusCode).toBe(200);
    expect(res.headers['content-type']).toMatch(/^text\/html/);
  });
});
