import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { appendFile, cp, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { MIGRATIONS_DIR, MigrationError, migrate, readMigrations } from '../src/db/migrator.js';
import type { Database } from '../src/infra/database.js';
import { onPostgres, silentLogger } from './helpers/db.js';
import { createScratchDatabase, type ScratchDatabase } from './helpers/migrationDb.js';
import { parseJsonLines, runTsScript, type LogLine, type ProcessResult } from './helpers/process.js';

const REAL_FILES = await readMigrations();
const REAL_NAMES = REAL_FILES.map((f) => f.filename);
// Versions far above any real migration, for the files these tests add.
const V1 = 9001;
const V2 = 9002;
const V3 = 9003;

const sha256 = (s: string) => createHash('sha256').update(s).digest('hex');

// ---------------------------------------------------------------------------------------------
// Scratch databases and migration folders, cleaned up after each test or block.

const scratches: ScratchDatabase[] = [];
const tempDirs: string[] = [];

async function scratch(opts: { persisted?: boolean } = {}): Promise<ScratchDatabase> {
  const s = await createScratchDatabase(opts);
  scratches.push(s);
  return s;
}

async function dropScratches(): Promise<void> {
  const all = scratches.splice(0);
  await Promise.all(all.map((s) => s.drop()));
}

/** A temp copy of the real migrations folder, plus `extra` files (name -> SQL). */
async function migrationsCopy(extra: Record<string, string> = {}): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'llm-app-migrations-'));
  tempDirs.push(dir);
  await cp(MIGRATIONS_DIR, dir, { recursive: true });
  for (const [name, sql] of Object.entries(extra)) await writeFile(path.join(dir, name), sql);
  return dir;
}

afterAll(async () => {
  await dropScratches();
  await Promise.all(tempDirs.splice(0).map((d) => rm(d, { recursive: true, force: true })));
});

// ---------------------------------------------------------------------------------------------
// Reading database state

interface MigrationRow {
  version: number;
  name: string;
  checksum: string;
  applied_at: Date;
}

async function migrationRows(db: Database): Promise<MigrationRow[]> {
  if (!(await tableExists(db, 'schema_migrations'))) return [];
  const { rows } = await db.query<MigrationRow>('SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version');
  return rows;
}

async function tableExists(db: Database, table: string): Promise<boolean> {
  const { rows } = await db.query<{ t: string | null }>('SELECT to_regclass($1)::text AS t', [`public.${table}`]);
  return rows[0]?.t != null;
}

/** Everything a migration could change in the public schema, in a comparable form. */
async function schemaSnapshot(db: Database) {
  const q = async (sql: string) => (await db.query(sql)).rows;
  return {
    relations: await q(`SELECT relname::text AS name, relkind::text AS kind FROM pg_class
                        WHERE relnamespace = 'public'::regnamespace ORDER BY relname`),
    columns: await q(`SELECT table_name::text AS t, column_name::text AS c, data_type::text AS type,
                             is_nullable::text AS nullable, column_default::text AS dflt
                      FROM information_schema.columns WHERE table_schema = 'public' ORDER BY table_name, ordinal_position`),
    constraints: await q(`SELECT conname::text AS name, pg_get_constraintdef(oid) AS def FROM pg_constraint
                          WHERE connamespace = 'public'::regnamespace ORDER BY conname`),
    indexes: await q(`SELECT indexname::text AS name, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY indexname`),
    triggers: await q(`SELECT tgname::text AS name FROM pg_trigger WHERE NOT tgisinternal ORDER BY tgname`),
    functions: await q(`SELECT proname::text AS name FROM pg_proc WHERE pronamespace = 'public'::regnamespace ORDER BY proname`),
    migrations: await migrationRows(db),
  };
}

/** The error a promise rejects with (fails the test if it resolves). */
async function rejectionOf(p: Promise<unknown>): Promise<Error> {
  try {
    await p;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected the promise to reject, it resolved');
}

/** An error's message and those of its causes. */
function messageChain(err: unknown): string {
  const parts: string[] = [];
  for (let e = err; e instanceof Error && parts.length < 5; e = e.cause) parts.push(e.message);
  return parts.join(' <- ');
}

const slug = () => `mig-${randomBytes(5).toString('hex')}`;

async function insertOrg(db: Database): Promise<string> {
  const { rows } = await db.query<{ id: string }>('INSERT INTO orgs (name, slug) VALUES ($1, $2) RETURNING id', ['Org', slug()]);
  return rows[0]!.id;
}

async function insertUser(db: Database, orgId: string, email: string, role = 'member'): Promise<string> {
  const { rows } = await db.query<{ id: string }>(
    'INSERT INTO users (org_id, email, name, role) VALUES ($1, $2, $3, $4) RETURNING id',
    [orgId, email, 'User', role],
  );
  return rows[0]!.id;
}

// ---------------------------------------------------------------------------------------------

describe('migrate() on a fresh database', () => {
  let db: Database;
  beforeAll(async () => {
    db = await (await scratch()).open();
  });
  afterAll(dropScratches);

  it('first run applies 001_initial_schema.sql and records version, name and sha256 checksum', async () => {
    expect(await tableExists(db, 'orgs')).toBe(false);
    expect(await tableExists(db, 'schema_migrations')).toBe(false);

    const started = Date.now();
    const { applied } = await migrate(db, silentLogger);

    expect(REAL_NAMES[0]).toBe('001_initial_schema.sql');
    expect(applied.map((f) => f.filename)).toEqual(REAL_NAMES);
    const rows = await migrationRows(db);
    const expected = await Promise.all(
      REAL_FILES.map(async (f) => ({
        version: f.version,
        name: f.name,
        checksum: sha256(await readFile(path.join(MIGRATIONS_DIR, f.filename), 'utf8')),
      })),
    );
    expect(rows.map(({ version, name, checksum }) => ({ version, name, checksum }))).toEqual(expected);
    expect(rows[0]).toMatchObject({ version: 1, name: 'initial_schema' });
    expect(rows[0]!.checksum).toMatch(/^[0-9a-f]{64}$/);
    for (const r of rows) {
      expect(r.applied_at).toBeInstanceOf(Date);
      expect(Math.abs(r.applied_at.getTime() - started)).toBeLessThan(60_000);
    }
    expect(await tableExists(db, 'orgs')).toBe(true);
    expect(await tableExists(db, 'users')).toBe(true);
  });

  it('second run applies nothing and changes nothing', async () => {
    const before = await schemaSnapshot(db);
    expect(before.migrations).toHaveLength(REAL_FILES.length);

    const { applied } = await migrate(db, silentLogger);

    expect(applied).toEqual([]);
    expect(await schemaSnapshot(db)).toEqual(before);
  });

  describe('the schema of issue 2', () => {
    const columnsOf = async (table: string) =>
      (
        await db.query(
          `SELECT column_name::text AS name, data_type::text AS type, character_maximum_length::int AS length,
                  is_nullable::text AS nullable
           FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1 ORDER BY column_name`,
          [table],
        )
      ).rows;
    const col = (name: string, type: string, nullable: boolean, length: number | null = null) => ({
      name,
      type,
      length,
      nullable: nullable ? 'YES' : 'NO',
    });
    const tz = 'timestamp with time zone';

    it('orgs has the required columns and types', async () => {
      // Extra columns are the schema's own business; the required ones must be there, typed as issue 2 says.
      expect(await columnsOf('orgs')).toEqual(expect.arrayContaining([
        col('created_at', tz, false),
        col('deleted_at', tz, true),
        col('id', 'uuid', false),
        col('metadata', 'jsonb', false),
        col('name', 'character varying', false, 255),
        col('slug', 'character varying', false, 100),
        col('updated_at', tz, false),
      ]));
    });

    it('users has the required columns and types', async () => {
      expect(await columnsOf('users')).toEqual(expect.arrayContaining([
        col('created_at', tz, false),
        col('deleted_at', tz, true),
        col('email', 'character varying', false, 255),
        col('id', 'uuid', false),
        col('metadata', 'jsonb', false),
        col('name', 'character varying', true, 255),
        col('org_id', 'uuid', false),
        col('role', 'character varying', false, 50),
        col('updated_at', tz, false),
      ]));
    });

    it('generates ids, timestamps and metadata {} by default', async () => {
      const org = await db.query<Record<string, unknown>>(
        'INSERT INTO orgs (name, slug) VALUES ($1, $2) RETURNING id, metadata, created_at, updated_at, deleted_at',
        ['Defaults', slug()],
      );
      const o = org.rows[0]!;
      expect(o.id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
      expect(o.metadata).toEqual({});
      expect(o.created_at).toBeInstanceOf(Date);
      expect(o.updated_at).toBeInstanceOf(Date);
      expect(o.deleted_at).toBeNull();
      const user = await db.query<Record<string, unknown>>(
        `INSERT INTO users (org_id, email, role) VALUES ($1, 'd@example.test', 'member')
         RETURNING id, metadata, name, created_at, updated_at, deleted_at`,
        [o.id],
      );
      const u = user.rows[0]!;
      expect(u.id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
      expect(u.metadata).toEqual({});
      expect(u.name).toBeNull();
      expect(u.created_at).toBeInstanceOf(Date);
      expect(u.deleted_at).toBeNull();
    });

    it('metadata is NOT NULL on both tables', async () => {
      await expect(
        db.query('INSERT INTO orgs (name, slug, metadata) VALUES ($1, $2, NULL)', ['N', slug()]),
      ).rejects.toMatchObject({ code: '23502' });
      const orgId = await insertOrg(db);
      await expect(
        db.query(`INSERT INTO users (org_id, email, role, metadata) VALUES ($1, 'n@example.test', 'member', NULL)`, [orgId]),
      ).rejects.toMatchObject({ code: '23502' });
    });

    it.each(['Bad Slug', 'UPPER', 'under_score', '-leading', 'trailing-', ''])('slug CHECK rejects %j', async (bad) => {
      await expect(db.query('INSERT INTO orgs (name, slug) VALUES ($1, $2)', ['X', bad])).rejects.toMatchObject({
        code: '23514',
      });
    });

    it('slug accepts lowercase letters, digits and dashes, is unique and at most 100 characters', async () => {
      const good = `a-1-${randomBytes(4).toString('hex')}`;
      await db.query('INSERT INTO orgs (name, slug) VALUES ($1, $2)', ['Good', good]);
      await expect(db.query('INSERT INTO orgs (name, slug) VALUES ($1, $2)', ['Again', good])).rejects.toMatchObject({
        code: '23505',
      });
      await expect(db.query('INSERT INTO orgs (name, slug) VALUES ($1, $2)', ['Long', 'a'.repeat(101)])).rejects.toMatchObject({
        code: '22001',
      });
      await db.query('INSERT INTO orgs (name, slug) VALUES ($1, $2)', ['Max', `${'b'.repeat(90)}${randomBytes(5).toString('hex')}`]);
    });

    it('role CHECK accepts owner, admin, member and rejects anything else', async () => {
      const orgId = await insertOrg(db);
      for (const role of ['owner', 'admin', 'member']) await insertUser(db, orgId, `${role}@example.test`, role);
      for (const bad of ['superuser', 'Owner', '']) {
        await expect(insertUser(db, orgId, `x-${randomBytes(3).toString('hex')}@example.test`, bad)).rejects.toMatchObject({
          code: '23514',
        });
      }
    });

    it('users.org_id references orgs', async () => {
      await expect(insertUser(db, randomUUID(), 'orphan@example.test')).rejects.toMatchObject({ code: '23503' });
    });

    it('the trigger sets updated_at on every UPDATE of orgs and users', async () => {
      const old = '2000-01-01T00:00:00.000Z';
      const org = await db.query<{ id: string }>(
        'INSERT INTO orgs (name, slug, created_at, updated_at) VALUES ($1, $2, $3, $3) RETURNING id',
        ['Old', slug(), old],
      );
      const orgId = org.rows[0]!.id;
      const user = await db.query<{ id: string }>(
        `INSERT INTO users (org_id, email, role, created_at, updated_at) VALUES ($1, 'old@example.test', 'member', $2, $2)
         RETURNING id`,
        [orgId, old],
      );
      const userId = user.rows[0]!.id;

      // Even an UPDATE that sets updated_at itself gets the current time.
      const o = await db.query<{ created_at: Date; updated_at: Date }>(
        'UPDATE orgs SET name = $2, updated_at = $3 WHERE id = $1 RETURNING created_at, updated_at',
        [orgId, 'New', old],
      );
      const u = await db.query<{ created_at: Date; updated_at: Date }>(
        'UPDATE users SET name = $2 WHERE id = $1 RETURNING created_at, updated_at',
        [userId, 'New'],
      );
      for (const row of [o.rows[0]!, u.rows[0]!]) {
        expect(row.created_at.toISOString()).toBe(old);
        expect(Math.abs(row.updated_at.getTime() - Date.now())).toBeLessThan(60_000);
      }
    });

    it('has (org_id, id) as a key of users (the primary key since 004), usable by a composite foreign key', async () => {
      const { rows } = await db.query<{ cols: string }>(
        `SELECT string_agg(a.attname::text, ',' ORDER BY k.ord) AS cols
         FROM pg_constraint c
         CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)
         JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
         WHERE c.conrelid = 'public.users'::regclass AND c.contype = 'p'
         GROUP BY c.oid`,
      );
      expect(rows.map((r) => r.cols)).toEqual(['org_id,id']);

      // What it is for: a tenant table referencing (org_id, user_id) cannot point at another org's user.
      const orgA = await insertOrg(db);
      const orgB = await insertOrg(db);
      const userA = await insertUser(db, orgA, 'fk@example.test');
      const rollback = new Error('rollback');
      const err = await rejectionOf(
        db.transaction(async (tx) => {
          await tx.exec(`CREATE TABLE probe_refs (org_id uuid NOT NULL, user_id uuid NOT NULL,
                           FOREIGN KEY (org_id, user_id) REFERENCES users (org_id, id))`);
          await tx.query('INSERT INTO probe_refs VALUES ($1, $2)', [orgA, userA]);
          const cross = await rejectionOf(tx.query('INSERT INTO probe_refs VALUES ($1, $2)', [orgB, userA]));
          expect(cross).toMatchObject({ code: '23503' });
          throw rollback;
        }),
      );
      expect(err).toBe(rollback);
      expect(await tableExists(db, 'probe_refs')).toBe(false);
    });

    it('has an index led by users.org_id', async () => {
      const { rows } = await db.query<{ name: string; partial: boolean }>(
        `SELECT i.indexrelid::regclass::text AS name, i.indpred IS NOT NULL AS partial
         FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
         WHERE i.indrelid = 'public.users'::regclass AND a.attname = 'org_id'`,
      );
      expect(rows.filter((r) => !r.partial).length).toBeGreaterThanOrEqual(1);
    });

    it('the same email may exist in two orgs, but only once among the live users of one org', async () => {
      const orgA = await insertOrg(db);
      const orgB = await insertOrg(db);
      const email = `same-${randomBytes(4).toString('hex')}@example.test`;
      const first = await insertUser(db, orgA, email);
      await insertUser(db, orgB, email);

      await expect(insertUser(db, orgA, email)).rejects.toMatchObject({ code: '23505' });
      // Stored lower-cased (the application lower-cases): an upper-case spelling cannot get in at all,
      // so equality on the column is case-insensitive equality on the address.
      await expect(insertUser(db, orgA, email.toUpperCase())).rejects.toMatchObject({ code: '23514' });
      await expect(insertUser(db, orgB, `Other-${email}`)).rejects.toMatchObject({ code: '23514' });

      // A soft-deleted user's address can be used again in the same org.
      await db.query('UPDATE users SET deleted_at = now() WHERE id = $1', [first]);
      await insertUser(db, orgA, email);
      const live = await db.query('SELECT id FROM users WHERE org_id = $1 AND email = $2 AND deleted_at IS NULL', [
        orgA,
        email,
      ]);
      expect(live.rowCount).toBe(1);
    });
  });

  // The same database again: these tests take their own snapshot first, so they do not depend on
  // what the tests above added (a fresh PGlite costs a second and hundreds of MB).
  describe('an applied file that was edited', () => {
    it('stops the run with a MigrationError naming the file, and applies nothing new', async () => {
      const dir = await migrationsCopy();
      expect((await migrate(db, silentLogger, dir)).applied).toEqual([]);
      const before = await schemaSnapshot(db);

      await appendFile(path.join(dir, '001_initial_schema.sql'), '\n-- an edit after the fact\n');
      await writeFile(path.join(dir, `${V3}_after_edit.sql`), 'CREATE TABLE after_edit (id integer);\n');

      const err = await rejectionOf(migrate(db, silentLogger, dir));
      expect(err).toBeInstanceOf(MigrationError);
      expect(err.message).toContain('001_initial_schema.sql');
      expect(err.message).toMatch(/changed|edited|checksum/i);
      expect(await tableExists(db, 'after_edit')).toBe(false);
      expect(await schemaSnapshot(db)).toEqual(before);

      // Restoring the file lets the run continue with the new one.
      await cp(path.join(MIGRATIONS_DIR, '001_initial_schema.sql'), path.join(dir, '001_initial_schema.sql'));
      const { applied } = await migrate(db, silentLogger, dir);
      expect(applied.map((f) => f.filename)).toEqual([`${V3}_after_edit.sql`]);
      expect(await tableExists(db, 'after_edit')).toBe(true);
    });

    it('does not count CRLF line endings (a Windows checkout) as an edit', async () => {
      const dir = await migrationsCopy();
      const file = path.join(dir, '001_initial_schema.sql');
      await writeFile(file, (await readFile(file, 'utf8')).replace(/\n/g, '\r\n'));
      const before = await schemaSnapshot(db);

      expect((await migrate(db, silentLogger, dir)).applied).toEqual([]);
      expect(await schemaSnapshot(db)).toEqual(before);
    });
  });

  describe('invalid migration folders', () => {
    const goodExtra = { [`${V2}_good.sql`]: 'CREATE TABLE must_not_exist (id integer);\n' };

    it.each(['2_too_short.sql', '002_Upper_Case.sql', '002-dashes.sql', '002_has-dash.sql', 'add_users.sql', '002_.sql'])(
      'rejects the file name %s with a MigrationError and applies nothing',
      async (bad) => {
        const before = await schemaSnapshot(db);
        const dir = await migrationsCopy({ ...goodExtra, [bad]: 'CREATE TABLE must_not_exist_either (id integer);\n' });
        const err = await rejectionOf(migrate(db, silentLogger, dir));
        expect(err).toBeInstanceOf(MigrationError);
        expect(err.message).toContain(bad);
        expect(await schemaSnapshot(db)).toEqual(before);
      },
    );

    it.each([
      [`${V1}_first.sql`, `${V1}_second.sql`],
      [`${V1}_padded.sql`, `0${V1}_more_padded.sql`],
    ])('rejects two files with one version (%s, %s) with a MigrationError naming both', async (a, b) => {
      const before = await schemaSnapshot(db);
      const dir = await migrationsCopy({ ...goodExtra, [a]: 'SELECT 1;\n', [b]: 'SELECT 2;\n' });
      const err = await rejectionOf(migrate(db, silentLogger, dir));
      expect(err).toBeInstanceOf(MigrationError);
      expect(err.message).toContain(a);
      expect(err.message).toContain(b);
      expect(err.message).toContain(String(V1));
      expect(await schemaSnapshot(db)).toEqual(before);
    });
  });

  describe('a failing migration file', () => {
    it('rolls back entirely and stops the run; once fixed, a later run applies it', async () => {
      const versionsBefore = (await migrationRows(db)).map((r) => r.version);
      const before = await schemaSnapshot(db);
      const broken = `${V1}_broken.sql`;
      const dir = await migrationsCopy({
        [broken]: 'CREATE TABLE half_done (id integer);\nINSERT INTO half_done VALUES (1);\nSELEC this_is_a_syntax_error;\n',
        [`${V2}_after_broken.sql`]: 'CREATE TABLE after_broken (id integer);\n',
      });

      const err = await rejectionOf(migrate(db, silentLogger, dir));
      // The runner names the file and keeps the database's own error as the cause.
      expect(err).toBeInstanceOf(MigrationError);
      expect((err).message).toContain(broken);
      expect(messageChain(err)).toMatch(/syntax error/i);
      expect(await tableExists(db, 'half_done')).toBe(false);
      expect(await tableExists(db, 'after_broken')).toBe(false);
      expect(await schemaSnapshot(db)).toEqual(before);

      await writeFile(path.join(dir, broken), 'CREATE TABLE half_done (id integer);\nINSERT INTO half_done VALUES (1);\n');
      const { applied } = await migrate(db, silentLogger, dir);
      expect(applied.map((f) => f.filename)).toEqual([broken, `${V2}_after_broken.sql`]);
      expect((await db.query('SELECT id FROM half_done')).rows).toEqual([{ id: 1 }]);
      expect(await tableExists(db, 'after_broken')).toBe(true);
      expect((await migrationRows(db)).map((r) => r.version)).toEqual([...versionsBefore, V1, V2].sort((a, b) => a - b));
    });
  });
});

describe('several runners at once', () => {
  afterEach(dropScratches);

  it(
    onPostgres
      ? '4 separate pools migrating one fresh database apply every file exactly once'
      : 'concurrent migrate() calls on one PGlite instance apply every file exactly once',
    async () => {
      // Not idempotent on purpose: a second application would fail (CREATE TABLE) or add a row.
      const extra = {
        [`${V1}_concurrency_a.sql`]: 'CREATE TABLE concurrency_log (n integer NOT NULL);\nINSERT INTO concurrency_log VALUES (1);\n',
        [`${V2}_concurrency_b.sql`]: 'INSERT INTO concurrency_log VALUES (2);\n',
        [`${V3}_concurrency_c.sql`]: 'INSERT INTO concurrency_log VALUES (3);\n',
      };
      const dir = await migrationsCopy(extra);
      const s = await scratch();
      const dbs = await Promise.all([s.open(), s.open(), s.open(), s.open()]);
      if (onPostgres) expect(new Set(dbs).size).toBe(4);

      const results = await Promise.all(dbs.map((db) => migrate(db, silentLogger, dir)));

      const appliedNames = results.flatMap((r) => r.applied.map((f) => f.filename));
      expect([...appliedNames].sort()).toEqual([...REAL_NAMES, ...Object.keys(extra)].sort());
      const db = dbs[0];
      expect((await migrationRows(db)).map((r) => r.version)).toEqual([...REAL_FILES.map((f) => f.version), V1, V2, V3]);
      const log = await db.query<{ n: number }>('SELECT n FROM concurrency_log ORDER BY n');
      expect(log.rows).toEqual([{ n: 1 }, { n: 2 }, { n: 3 }]);
    },
  );
});

// ---------------------------------------------------------------------------------------------

const SEEDED_ORGS = [
  { id: '00000000-0000-0000-0000-000000000001', name: 'Acme Corp', slug: 'acme-corp' },
  { id: '00000000-0000-0000-0000-000000000002', name: 'Tech Startup Inc', slug: 'tech-startup' },
];
const SEEDED_USERS = [
  { id: '00000000-0000-0000-0001-000000000001', email: 'admin@acme.com', role: 'admin', org_id: SEEDED_ORGS[0]!.id },
  { id: '00000000-0000-0000-0001-000000000002', email: 'user@acme.com', role: 'member', org_id: SEEDED_ORGS[0]!.id },
  { id: '00000000-0000-0000-0002-000000000001', email: 'founder@techstartup.com', role: 'owner', org_id: SEEDED_ORGS[1]!.id },
];
const CLI = 'src/db/migrate.ts';
// Generous: the embedded database initialises its folder on the first run, and CI machines are busy.
const CLI_TIMEOUT_MS = 45_000;
const CLI_STEPS = ['Starting database migration...', 'Database connection established', 'Migration completed successfully'];

/** The messages, in order, must contain `expected` as a subsequence. */
function expectInOrder(lines: LogLine[], expected: string[]): void {
  const msgs = lines.map((l) => l.msg);
  let from = 0;
  for (const m of expected) {
    const at = msgs.indexOf(m, from);
    expect(at, `"${m}" after position ${from} in ${JSON.stringify(msgs)}`).toBeGreaterThanOrEqual(0);
    from = at + 1;
  }
}

/** Started without awaiting: the processes run side by side, and each test awaits its own. */
function started<T>(p: Promise<T>): Promise<T> {
  p.catch(() => undefined);
  return p;
}

describe('npm run db:migrate (src/db/migrate.ts as a process)', { timeout: 100_000 }, () => {
  let dev: ScratchDatabase;
  let prod: ScratchDatabase;
  let devFirstRun: Promise<ProcessResult>;
  let devSecondRun: Promise<{ res: ProcessResult; startedAt: number }>;
  let prodRun: Promise<ProcessResult>;
  let unreachableRun: Promise<ProcessResult>;

  beforeAll(async () => {
    [dev, prod] = await Promise.all([scratch({ persisted: true }), scratch({ persisted: true })]);
    const devEnv = { NODE_ENV: 'development', LOG_FORMAT: 'json', ...dev.env };
    devFirstRun = started(runTsScript(CLI, devEnv, { timeoutMs: CLI_TIMEOUT_MS }));
    devSecondRun = started(
      devFirstRun.then(async () => {
        const startedAt = Date.now();
        return { res: await runTsScript(CLI, devEnv, { timeoutMs: CLI_TIMEOUT_MS }), startedAt };
      }),
    );
    prodRun = started(runTsScript(CLI, { NODE_ENV: 'production', LOG_FORMAT: 'json', ...prod.env }, { timeoutMs: CLI_TIMEOUT_MS }));
    unreachableRun = started(
      runTsScript(
        CLI,
        { NODE_ENV: 'development', LOG_FORMAT: 'json', DATABASE_URL: 'postgres://postgres:pw@127.0.0.1:1/llm_app' },
        { timeoutMs: 15_000 },
      ),
    );
  });
  afterAll(async () => {
    // Never leave a child writing into a folder that is being deleted.
    await Promise.allSettled([devFirstRun, devSecondRun, prodRun, unreachableRun]);
    await dropScratches();
  });

  it('first run in development: migrates, logs the steps in order, seeds and prints the seeded orgs and users', async () => {
    const res = await devFirstRun;
    expect(res.timedOut).toBe(false);
    expect(res.stderr).toBe('');
    expect(res.code).toBe(0);
    const lines = parseJsonLines(res.stdout);
    expectInOrder(lines, [...CLI_STEPS, 'Database seeded']);
    expect(lines.filter((l) => l.msg === 'Applied migration').map((l) => l.migration)).toEqual(REAL_NAMES);
    expect(lines.find((l) => l.msg === 'Migration completed successfully')?.applied).toEqual(REAL_NAMES);
    const seeded = lines.find((l) => l.msg === 'Database seeded')!;
    expect(seeded.orgs).toEqual(SEEDED_ORGS);
    expect(seeded.users).toEqual(SEEDED_USERS);
    expect(lines.filter((l) => l.level >= 40)).toEqual([]);
  });

  it('second run exits 0, applies nothing and leaves the database as it was', async () => {
    const { res, startedAt: secondStartedAt } = await devSecondRun;
    expect(res.timedOut).toBe(false);
    expect(res.stderr).toBe('');
    expect(res.code).toBe(0);
    const lines = parseJsonLines(res.stdout);
    expectInOrder(lines, [...CLI_STEPS, 'Database seeded']);
    expect(lines.filter((l) => l.msg === 'Applied migration')).toEqual([]);
    expect(lines.find((l) => l.msg === 'Migration completed successfully')?.applied).toEqual([]);
    const seeded = lines.find((l) => l.msg === 'Database seeded')!;
    expect(seeded.orgs).toEqual(SEEDED_ORGS);
    expect(seeded.users).toEqual(SEEDED_USERS);

    const db = await dev.open();
    try {
      const rows = await migrationRows(db);
      expect(rows.map((r) => r.version)).toEqual(REAL_FILES.map((f) => f.version));
      // Every row is from the first run.
      for (const r of rows) expect(r.applied_at.getTime()).toBeLessThan(secondStartedAt);
      expect((await db.query('SELECT id, name, slug FROM orgs ORDER BY id')).rows).toEqual(SEEDED_ORGS);
      expect((await db.query('SELECT id, email, role, org_id FROM users ORDER BY id')).rows).toEqual(SEEDED_USERS);
    } finally {
      await dev.closeConnections();
    }
  });

  it('with NODE_ENV=production migrates but does not seed', async () => {
    const res = await prodRun;
    expect(res.timedOut).toBe(false);
    expect(res.stderr).toBe('');
    expect(res.code).toBe(0);
    const lines = parseJsonLines(res.stdout);
    expectInOrder(lines, CLI_STEPS);
    expect(lines.some((l) => l.msg === 'Database seeded')).toBe(false);

    const db = await prod.open();
    try {
      expect((await migrationRows(db)).map((r) => r.version)).toEqual(REAL_FILES.map((f) => f.version));
      expect((await db.query('SELECT count(*)::int AS n FROM orgs')).rows).toEqual([{ n: 0 }]);
      expect((await db.query('SELECT count(*)::int AS n FROM users')).rows).toEqual([{ n: 0 }]);
    } finally {
      await prod.closeConnections();
    }
  });

  it('exits 1 quickly with a clear error when PostgreSQL cannot be reached', async () => {
    const res = await unreachableRun;
    expect(res.timedOut).toBe(false);
    expect(res.code).toBe(1);
    expect(res.durationMs).toBeLessThan(10_000);
    const lines = parseJsonLines(res.stdout);
    expectInOrder(lines, ['Starting database migration...']);
    const errors = lines.filter((l) => l.level >= 50);
    expect(errors.length).toBeGreaterThanOrEqual(1);
    expect(errors.map((l) => l.msg).join(' ')).toMatch(/connect/i);
    expect(lines.some((l) => CLI_STEPS.slice(1).includes(l.msg))).toBe(false);
    // The password in DATABASE_URL never reaches the output.
    expect(res.stdout + res.stderr).not.toContain(':pw@');
  });
});
