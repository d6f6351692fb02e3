import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import pg from 'pg';
import pino from 'pino';
import { afterAll, describe, expect, it } from 'vitest';
import {
  createPgliteDatabase,
  createPostgresDatabase,
  DatabaseUnavailableError,
  type Database,
} from '../src/infra/database.js';
import { getTestDb, onPostgres, openTestDatabase, testDatabaseUrl } from './helpers/db.js';
import { startTcpProxy, type TcpProxy } from './helpers/tcpProxy.js';

function capturingLogger() {
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      lines.push(JSON.parse(chunk.toString()) as Record<string, unknown>);
      cb();
    },
  });
  return { logger: pino({ level: 'info' }, stream), lines };
}

describe('Database (either implementation)', () => {
  it('runs parameterised queries and keeps values out of the SQL text', async () => {
    const db = await getTestDb();
    const hostile = "x'); DROP TABLE users; --";
    const { rows } = await db.query<{ v: string }>('SELECT $1::text AS v', [hostile]);
    expect(rows).toEqual([{ v: hostile }]);
    const users = await db.query('SELECT 1 FROM users LIMIT 1');
    expect(users.rowCount).toBe(1);
  });

  it('commits a transaction, and rolls it back whole when the function throws', async () => {
    const db = await getTestDb();
    const slugA = `tx-${Date.now()}-a`;
    const slugB = `tx-${Date.now()}-b`;
    await db.transaction(async (tx) => {
      await tx.query("INSERT INTO orgs (name, slug) VALUES ('A', $1)", [slugA]);
    });
    await expect(
      db.transaction(async (tx) => {
        await tx.query("INSERT INTO orgs (name, slug) VALUES ('B', $1)", [slugB]);
        throw new Error('boom');
      }),
    ).rejects.toThrow('boom');
    const { rows } = await db.query<{ slug: string }>('SELECT slug FROM orgs WHERE slug = ANY($1::text[]) ORDER BY slug', [
      [slugA, slugB],
    ]);
    expect(rows.map((r) => r.slug)).toEqual([slugA]);
  });

  it('reports health, and is unavailable (not an unknown error) once closed', async () => {
    const db = await openTestDatabase();
    expect(await db.health(1_000)).toBe(true);
    await db.close();
    expect(await db.health(1_000)).toBe(false);
    await expect(db.query('SELECT 1')).rejects.toBeInstanceOf(DatabaseUnavailableError);
  });
});

describe('Embedded PGlite', () => {
  it('creates a new data directory, keeps its data across a restart, and uses the smaller buffer pool', async () => {
    const dataDir = await mkdtemp(path.join(os.tmpdir(), 'llm-app-pglite-'));
    try {
      // Created in a child process: test/server.process.test.ts checks what that saves.
      let db = await createPgliteDatabase(dataDir);
      await db.query('CREATE TABLE kept (v text)');
      await db.query('INSERT INTO kept (v) VALUES ($1)', ['still here']);
      // The default pool of PostgreSQL is 128MB; the embedded database starts with less.
      expect((await db.query<{ shared_buffers: string }>('SHOW shared_buffers')).rows).toEqual([{ shared_buffers: '32MB' }]);
      await db.close();

      db = await createPgliteDatabase(dataDir);
      expect((await db.query<{ v: string }>('SELECT v FROM kept')).rows).toEqual([{ v: 'still here' }]);
      expect((await db.query<{ shared_buffers: string }>('SHOW shared_buffers')).rows).toEqual([{ shared_buffers: '32MB' }]);
      await db.close();
    } finally {
      await rm(dataDir, { recursive: true, force: true });
    }
  });

  it('a data directory that cannot be made fails the start with an error naming it and the reason', async () => {
    const dataDir = await mkdtemp(path.join(os.tmpdir(), 'llm-app-pglite-'));
    try {
      // Files where initdb needs folders.
      await mkdir(path.join(dataDir, 'pglite'));
      await writeFile(path.join(dataDir, 'pglite', 'base'), 'x');
      await writeFile(path.join(dataDir, 'pglite', 'global'), 'x');
      await expect(createPgliteDatabase(dataDir)).rejects.toThrow(
        new RegExp(`^Could not create the embedded database in ${path.join(dataDir, 'pglite')}: ErrnoError`),
      );
    } finally {
      await rm(dataDir, { recursive: true, force: true });
    }
  });
});

describe.skipIf(!onPostgres)('PostgreSQL pool', () => {
  const opened: Database[] = [];
  afterAll(async () => {
    await Promise.all(opened.map((d) => d.close()));
  });

  const open = (overrides: Partial<{ url: string; statementTimeoutMs: number; connectionTimeoutMs: number }> = {}) => {
    const { logger, lines } = capturingLogger();
    const db = createPostgresDatabase(
      {
        kind: 'postgres',
        url: overrides.url ?? testDatabaseUrl!,
        poolMax: 1,
        idleTimeoutMs: 30_000,
        connectionTimeoutMs: overrides.connectionTimeoutMs ?? 2_000,
        statementTimeoutMs: overrides.statementTimeoutMs ?? 5_000,
      },
      logger,
    );
    opened.push(db);
    return { db, lines };
  };

  it('logs an idle connection killed by the server, does not crash, and serves the next query', async () => {
    const { db, lines } = open();
    const { rows } = await db.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
    const admin = new pg.Client({ connectionString: testDatabaseUrl });
    await admin.connect();
    try {
      await admin.query('SELECT pg_terminate_backend($1)', [rows[0]!.pid]);
    } finally {
      await admin.end();
    }
    await expect.poll(() => lines.some((l) => l.msg === 'PostgreSQL pool error'), { timeout: 5_000 }).toBe(true);
    const after = await db.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
    expect(after.rows[0]!.pid).not.toBe(rows[0]!.pid);
  });

  it('turns a statement timeout into DatabaseUnavailableError', async () => {
    const { db } = open({ statementTimeoutMs: 200 });
    await expect(db.query('SELECT pg_sleep(2)')).rejects.toBeInstanceOf(DatabaseUnavailableError);
  });

  it('turns an unreachable server into DatabaseUnavailableError, quickly, and health false', async () => {
    const { db } = open({ url: 'postgres://postgres@127.0.0.1:1/none', connectionTimeoutMs: 500 });
    const started = Date.now();
    await expect(db.query('SELECT 1')).rejects.toBeInstanceOf(DatabaseUnavailableError);
    await expect(db.transaction(async () => 1)).rejects.toBeInstanceOf(DatabaseUnavailableError);
    expect(await db.health(1_000)).toBe(false);
    expect(Date.now() - started).toBeLessThan(5_000);
  });

  describe('a server that stops answering without closing the connection', () => {
    // The bound is the statement timeout plus 1 s, checked every tenth of it (StatementWatch).
    const STATEMENT_TIMEOUT_MS = 300;
    const BOUND_MS = STATEMENT_TIMEOUT_MS + 1_000;
    let proxy: TcpProxy;
    afterAll(async () => {
      await proxy?.close();
    });

    it('fails the waiting query as unavailable soon after the bound, and the pool serves again once the network is back', async () => {
      const target = new URL(testDatabaseUrl!);
      proxy = await startTcpProxy(target.hostname, Number(target.port || 5432));
      const { db } = open({ url: proxy.urlFor(testDatabaseUrl!), statementTimeoutMs: STATEMENT_TIMEOUT_MS });
      // The pool's one connection is open and used once before the network goes quiet.
      const before = await db.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
      proxy.blackhole();
      const started = performance.now();
      const err: unknown = await db.query('SELECT 1').catch((e: unknown) => e);
      const waited = performance.now() - started;
      expect(err).toBeInstanceOf(DatabaseUnavailableError);
      expect(String((err as DatabaseUnavailableError).cause)).toMatch(/Query read timeout/);
      expect(waited).toBeGreaterThanOrEqual(BOUND_MS - 50);
      expect(waited).toBeLessThan(BOUND_MS + 1_000);

      await proxy.start();
      const after = await db.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
      // The stuck connection was dropped: the answer comes on a new one.
      expect(after.rows[0]!.pid).not.toBe(before.rows[0]!.pid);
    });

    it('leaves alone statements that answer within the bound, however long their transaction takes', async () => {
      const { db } = open({ statementTimeoutMs: STATEMENT_TIMEOUT_MS });
      const started = performance.now();
      // Six statements of 0.25 s each, in one transaction on one connection: 1.5 s in all, longer
      // than the bound, each of them well within it.
      const pids = await db.transaction(async (tx) => {
        const seen: number[] = [];
        for (let i = 0; i < 6; i++) {
          const { rows } = await tx.query<{ pid: number }>('SELECT pg_backend_pid() AS pid, pg_sleep(0.25)');
          seen.push(rows[0]!.pid);
        }
        return seen;
      });
      expect(performance.now() - started).toBeGreaterThan(BOUND_MS);
      expect(new Set(pids).size).toBe(1);
    });
  });

  it('keeps syntax errors as they are (a bug, not an outage)', async () => {
    const { db } = open();
    const err: unknown = await db.query('SELEC 1').catch((e: unknown) => e);
    expect(err).not.toBeInstanceOf(DatabaseUnavailableError);
    expect((err as { code?: string }).code).toBe('42601');
  });
});
