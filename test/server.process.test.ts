import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SEED } from '../src/db/seed.js';
import { createTenant } from './helpers/app.js';
import { onPostgres, testDatabaseUrl } from './helpers/db.js';
import { startServer, type ServerProcess } from './helpers/serverProcess.js';

/**
 * The real server process over a real socket: start-up (migrations), request ids and the access
 * log, and shutdown — in-flight requests finish, new connections are refused, exit 0; a second
 * signal exits at once.
 */

const seededAdmin = SEED.users.find((u) => u.email === 'admin@acme.com')!;
const seededAdminHeaders = { 'x-org-id': seededAdmin.orgId, 'x-user-id': seededAdmin.id };

const tempDirs: string[] = [];
async function freshDataDir(): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'llm-app-server-'));
  tempDirs.push(dir);
  return dir;
}

async function databaseFor(dataDir?: string): Promise<{ url: string } | { dataDir: string }> {
  return onPostgres ? { url: testDatabaseUrl! } : { dataDir: dataDir ?? (await freshDataDir()) };
}

/**
 * Auth headers of an admin who may create users. On PostgreSQL the server shares the test
 * database, so a fresh tenant is made with SQL; on the embedded database the server owns a
 * private data folder that no other test reads, and the seeded admin is used.
 */
async function adminHeaders(): Promise<Record<string, string>> {
  if (!onPostgres) return seededAdminHeaders;
  const t = await createTenant();
  return t.admin.headers;
}

interface RawResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

/** A POST whose body is sent in two halves, so the request can be held in flight. */
function openPost(
  baseUrl: string,
  urlPath: string,
  headers: Record<string, string>,
  body: string,
  agent: http.Agent | false = false,
): { sendRest: () => void; response: Promise<RawResponse>; req: http.ClientRequest } {
  const url = new URL(urlPath, baseUrl);
  const buf = Buffer.from(body);
  const half = Math.floor(buf.length / 2);
  const req = http.request({
    host: url.hostname,
    port: url.port,
    path: url.pathname,
    method: 'POST',
    agent,
    headers: { ...headers, 'content-type': 'application/json', 'content-length': String(buf.length) },
  });
  const response = new Promise<RawResponse>((resolve, reject) => {
    req.on('response', (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (text += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: text }));
      res.on('error', reject);
    });
    req.on('error', reject);
  });
  req.flushHeaders();
  req.write(buf.subarray(0, half));
  return { sendRest: () => req.end(buf.subarray(half)), response, req };
}

/** A GET on a brand-new connection (no keep-alive pool): refused, or answered. */
function freshGet(baseUrl: string, urlPath: string): Promise<{ refused: true; code: string } | ({ refused: false } & RawResponse)> {
  return new Promise((resolve) => {
    const req = http.get(new URL(urlPath, baseUrl), { agent: false, timeout: 3_000 }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (text += d));
      res.on('end', () => resolve({ refused: false, status: res.statusCode ?? 0, headers: res.headers, body: text }));
    });
    req.on('timeout', () => req.destroy(Object.assign(new Error('timeout'), { code: 'ETIMEDOUT' })));
    req.on('error', (err: NodeJS.ErrnoException) => resolve({ refused: true, code: err.code ?? err.message }));
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// The servers start together: start-up (tsx, the embedded database, migrations) is most of the
// time this file takes.
let mainServer: Promise<ServerProcess>;
let secondSignalServer: Promise<ServerProcess>;
let keepAliveServer: Promise<ServerProcess>;
let mainDataDir: string | undefined;
beforeAll(async () => {
  mainDataDir = onPostgres ? undefined : await freshDataDir();
  const mainDb = await databaseFor(mainDataDir);
  const otherDb = await databaseFor();
  mainServer = startServer({ database: mainDb });
  secondSignalServer = startServer({ database: otherDb, env: { SHUTDOWN_TIMEOUT_MS: '20000' } });
  keepAliveServer = startServer({ database: await databaseFor(), env: { SHUTDOWN_TIMEOUT_MS: '8000' } });
  // All settle here, so a failed start fails the tests rather than going unhandled.
  await Promise.allSettled([mainServer, secondSignalServer, keepAliveServer]);
}, 120_000);
afterAll(async () => {
  await Promise.allSettled([mainServer, secondSignalServer, keepAliveServer].map((p) => p?.then((s) => s.kill())));
  await Promise.all(tempDirs.map((d) => rm(d, { recursive: true, force: true })));
});

describe('the server process', () => {
  let server: ServerProcess;
  let dataDir: string | undefined;
  let createdDuringShutdown: { id: string; email: string } | undefined;

  beforeAll(async () => {
    dataDir = mainDataDir;
    server = await mainServer;
  });
  afterAll(async () => {
    await server?.kill();
  });

  it('applied the migrations at start-up on a fresh data folder', async () => {
    const listening = await server.waitForLog((l) => l.msg?.startsWith('llm-app listening') ?? false);
    expect(listening).toMatchObject({ database: onPostgres ? 'postgres' : 'pglite', env: 'test', port: server.port });
    if (!onPostgres) {
      const applied = await server.waitForLog((l) => l.msg === 'Migrations applied');
      expect(applied.applied).toEqual(expect.arrayContaining(['001_initial_schema.sql']));
    }
  });

  it.skipIf(onPostgres)('does not keep the memory of creating the embedded database', async () => {
    // PGlite's initdb leaves over 600 MB of WebAssembly memory in the process that runs it; the
    // server runs it in a child process (resident size about 300 MB here, over 850 MB if not).
    const status = await readFile(`/proc/${server.pid}/status`, 'utf8');
    const rssKb = Number(/^VmRSS:\s+(\d+) kB$/m.exec(status)?.[1]);
    expect(rssKb).toBeGreaterThan(0);
    expect(rssKb).toBeLessThan(550 * 1024);
  });

  it('GET /health over HTTP answers 200 with an x-request-id', async () => {
    const res = await fetch(`${server.baseUrl}/health`);
    expect(res.status).toBe(200);
    const id = res.headers.get('x-request-id');
    expect(id).toMatch(/^[0-9a-f-]{36}$/);
    expect(await res.json()).toMatchObject({ status: 'ok', env: 'test', database: 'connected', requestId: id });
  });

  it('the seeded admin headers work on /v1/me over the socket', async () => {
    const res = await fetch(`${server.baseUrl}/v1/me`, { headers: seededAdminHeaders });
    expect(res.status).toBe(200);
    expect(await res.json()).toMatchObject({ id: seededAdmin.id, orgId: seededAdmin.orgId, email: 'admin@acme.com', role: 'admin' });
    const health = await fetch(`${server.baseUrl}/health`, { headers: seededAdminHeaders });
    expect(await health.json()).toMatchObject({
      org: seededAdmin.orgId,
      user: { id: seededAdmin.id, email: 'admin@acme.com', role: 'admin' },
    });
  });

  it('writes one access-log line per request, carrying the request id', async () => {
    const tag = randomBytes(4).toString('hex');
    const requests: { id: string; url: string; status: number; headers?: Record<string, string> }[] = [
      { id: `acc-${tag}-1`, url: '/health', status: 200 },
      { id: `acc-${tag}-2`, url: '/v1/me', status: 200, headers: seededAdminHeaders },
      { id: `acc-${tag}-3`, url: '/v1/me', status: 401 },
      { id: `acc-${tag}-4`, url: '/v1/users/not-a-uuid', status: 400, headers: seededAdminHeaders },
      { id: `acc-${tag}-5`, url: '/nowhere', status: 404 },
    ];
    for (const r of requests) {
      const res = await fetch(`${server.baseUrl}${r.url}`, { headers: { ...r.headers, 'x-request-id': r.id } });
      expect(res.status, r.url).toBe(r.status);
      expect(res.headers.get('x-request-id')).toBe(r.id);
      await res.arrayBuffer();
    }
    for (const r of requests) {
      const line = await server.waitForLog((l) => l.requestId === r.id && l.msg === 'request completed');
      expect(line).toMatchObject({ level: 30, method: 'GET', url: r.url, statusCode: r.status });
      expect(typeof line.ms).toBe('number');
    }
    // Give a stray second line the chance to arrive, then count.
    await sleep(100);
    for (const r of requests) {
      const lines = server.logs.filter((l) => l.requestId === r.id);
      expect(lines.map((l) => l.msg), r.id).toEqual(['request completed']);
    }
    // The auth headers are not logged.
    expect(JSON.stringify(server.logs)).not.toContain(seededAdmin.id);
  });

  it('on SIGTERM finishes the request in flight, refuses new connections, and exits 0', async () => {
    const headers = await adminHeaders();
    const email = `inflight-${randomBytes(5).toString('hex')}@example.com`;
    const held = openPost(server.baseUrl, '/v1/users', headers, JSON.stringify({ email, name: 'In Flight', role: 'member' }));
    // Let the server receive the headers and the first half of the body.
    await sleep(300);
    expect(server.exited).toBeNull();

    server.signal('SIGTERM');
    await server.waitForLog((l) => l.msg?.startsWith('Shutting down') ?? false);
    await sleep(200);
    expect(server.exited, 'the server must wait for the request in flight').toBeNull();

    const fresh = await freshGet(server.baseUrl, '/health');
    if (fresh.refused) expect(fresh.code).toBe('ECONNREFUSED');
    else expect(fresh.status).toBe(503);

    held.sendRest();
    const res = await held.response;
    expect(res.status, res.body).toBe(201);
    const user = JSON.parse(res.body) as { id: string; email: string; role: string };
    expect(user).toMatchObject({ email, role: 'member', name: 'In Flight' });
    createdDuringShutdown = { id: user.id, email };

    const exit = await server.waitForExit(12_000);
    expect(exit).toEqual({ code: 0, signal: null });
    expect(server.logs.some((l) => l.msg === 'Shutdown complete')).toBe(true);
    // A clean shutdown logs nothing at error level or above.
    expect(server.logs.filter((l) => l.level >= 50)).toEqual([]);
  });

  // The embedded database persists in DATA_DIR; on PostgreSQL there is no folder to reuse.
  it.skipIf(onPostgres)('starts again on the same data folder: nothing to migrate, the data is still there', async () => {
    expect(createdDuringShutdown).toBeDefined();
    const again = await startServer({ database: { dataDir: dataDir! } });
    try {
      expect(again.logs.some((l) => l.msg === 'Migrations applied')).toBe(false);
      const res = await fetch(`${again.baseUrl}/v1/users/${createdDuringShutdown!.id}`, { headers: seededAdminHeaders });
      expect(res.status).toBe(200);
      expect(await res.json()).toMatchObject({ id: createdDuringShutdown!.id, email: createdDuringShutdown!.email });
      const me = await fetch(`${again.baseUrl}/v1/me`, { headers: seededAdminHeaders });
      expect(me.status).toBe(200);
      again.signal('SIGTERM');
      expect(await again.waitForExit(10_000)).toEqual({ code: 0, signal: null });
    } finally {
      await again.kill();
    }
  });
});

describe('a second signal during a long shutdown', () => {
  let server: ServerProcess;
  beforeAll(async () => {
    server = await secondSignalServer;
  });
  afterAll(async () => {
    await server?.kill();
  });

  it('exits at once with code 1 (close-with-grace), without waiting for the request held open', async () => {
    const headers = await adminHeaders();
    const held = openPost(
      server.baseUrl,
      '/v1/users',
      headers,
      JSON.stringify({ email: `held-${randomBytes(5).toString('hex')}@example.com` }),
    );
    const outcome = held.response.then(
      (r) => ({ ok: true as const, status: r.status }),
      (err: NodeJS.ErrnoException) => ({ ok: false as const, code: err.code ?? err.message }),
    );
    await sleep(300);

    server.signal('SIGTERM');
    await server.waitForLog((l) => l.msg?.startsWith('Shutting down') ?? false);
    await sleep(300);
    expect(server.exited, 'the first signal waits for the request in flight').toBeNull();

    const start = performance.now();
    server.signal('SIGINT');
    const exit = await server.waitForExit(5_000);
    const ms = performance.now() - start;
    // close-with-grace answers a second signal with process.exit(1).
    expect(exit).toEqual({ code: 1, signal: null });
    expect(ms).toBeLessThan(2_000);
    expect(server.logs.some((l) => typeof l.msg === 'string' && l.msg.includes('second SIGINT'))).toBe(true);

    // The held request was cut, not answered.
    const result = await outcome;
    expect(result.ok).toBe(false);
  });
});

describe('shutdown with keep-alive clients (load balancers, fetch)', () => {
  let server: ServerProcess;
  beforeAll(async () => {
    server = await keepAliveServer;
  });
  afterAll(async () => {
    await server?.kill();
  });

  it('an in-flight request on a keep-alive connection completes and the process exits 0 without waiting for the timeout', async () => {
    const agent = new http.Agent({ keepAlive: true, maxSockets: 4 });
    try {
      // An idle keep-alive connection, and a request in flight on another (or the same) one.
      const warm = await new Promise<number>((resolve, reject) => {
        http
          .get(`${server.baseUrl}/health`, { agent }, (res) => {
            res.resume();
            res.on('end', () => resolve(res.statusCode ?? 0));
          })
          .on('error', reject);
      });
      expect(warm).toBe(200);
      const headers = await adminHeaders();
      const email = `keepalive-${randomBytes(5).toString('hex')}@example.com`;
      const held = openPost(server.baseUrl, '/v1/users', headers, JSON.stringify({ email }), agent);
      await sleep(300);

      const start = performance.now();
      server.signal('SIGTERM');
      await server.waitForLog((l) => l.msg?.startsWith('Shutting down') ?? false);
      await sleep(200);
      held.sendRest();
      const res = await held.response;
      expect(res.status, res.body).toBe(201);

      // SHUTDOWN_TIMEOUT_MS is 8 s here: an exit after it would be "killed by timeout", code 1.
      const exit = await server.waitForExit(12_000);
      const ms = performance.now() - start;
      expect(server.logs.filter((l) => l.level >= 50).map((l) => l.msg)).toEqual([]);
      expect(exit).toEqual({ code: 0, signal: null });
      expect(ms).toBeLessThan(5_000);
    } finally {
      agent.destroy();
    }
  });
});
