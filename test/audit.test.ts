import { randomBytes, randomUUID } from 'node:crypto';
import type { FastifyInstance, InjectOptions, LightMyRequestResponse } from 'fastify';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { migrate } from '../src/db/migrator.js';
import type { Database, Queryable } from '../src/infra/database.js';
import { recordAuditEvent, SYSTEM_ACTOR, verifyAuditChain } from '../src/models/audit.model.js';
import { createOrg, softDeleteOrg } from '../src/models/org.model.js';
import { clearOrgLimitOverrides, setOrgLimitOverrides } from '../src/models/orgLimits.model.js';
import { buildTestApp, createTenant, randomSlug, type TestTenant, type TestUser } from './helpers/app.js';
import { getTestDb, onPostgres, openTestDatabase, silentLogger, testDatabaseUrl } from './helpers/db.js';
import { createScratchDatabase, type ScratchDatabase } from './helpers/migrationDb.js';
import { runTsScript } from './helpers/process.js';
import { expectError } from './helpers/securitySuite.js';

/**
 * The audit log: one entry per change, in the change's transaction, with who, what, which object
 * and where from; refusals recorded within a bound; the per-org hash chain that `audit:verify`
 * walks, tampering found at the row it happened, and a chain that stays linear under concurrency.
 */

let app: FastifyInstance;
let db: Database;

interface EntryRow {
  id: string;
  seq: string;
  actor_type: string;
  actor_id: string | null;
  actor_email: string | null;
  action: string;
  target_type: string | null;
  target_id: string | null;
  request_id: string | null;
  ip: string | null;
  user_agent: string | null;
  metadata: Record<string, unknown>;
  hash: string;
}

async function entries(orgId: string, afterSeq = 0, q: Queryable = db): Promise<EntryRow[]> {
  const { rows } = await q.query<EntryRow>(
    `SELECT id, seq::text AS seq, actor_type, actor_id, actor_email, action, target_type, target_id,
            request_id, ip, user_agent, metadata, hash
       FROM audit_logs a WHERE org_id = $1 AND a.seq > $2 ORDER BY a.seq`,
    [orgId, afterSeq],
  );
  return rows;
}

async function headSeq(orgId: string): Promise<number> {
  const { rows } = await db.query<{ n: string | null }>('SELECT max(seq)::text AS n FROM audit_logs WHERE org_id = $1', [orgId]);
  return Number(rows[0]?.n ?? 0);
}

/** The entries a request (or several) added to the org's log, once refusal writes have landed. */
async function addedBy<T>(orgId: string, fn: () => Promise<T>, theApp = app): Promise<{ result: T; added: EntryRow[] }> {
  const before = await headSeq(orgId);
  const result = await fn();
  await theApp.refusalAudit.settled();
  return { result, added: await entries(orgId, before) };
}

const send = (caller: TestUser, opts: Omit<InjectOptions, 'headers'> & { headers?: Record<string, string> }) =>
  app.inject({ ...opts, headers: { ...caller.headers, 'user-agent': 'audit-test/1.0', ...opts.headers } });

const newEmail = () => `audit-${randomBytes(5).toString('hex')}@example.test`;

/** Changes one stored entry the way only a superuser can: with the append-only triggers off. */
async function tamper(q: Database, orgId: string, seq: number, set: string): Promise<void> {
  await q.transaction(async (tx) => {
    await tx.query("SET LOCAL session_replication_role = 'replica'");
    await tx.query(`UPDATE audit_logs SET ${set} WHERE org_id = $1 AND seq = $2`, [orgId, seq]);
  });
}

async function removeEntry(q: Database, orgId: string, seq: number): Promise<void> {
  await q.transaction(async (tx) => {
    await tx.query("SET LOCAL session_replication_role = 'replica'");
    await tx.query('DELETE FROM audit_logs WHERE org_id = $1 AND seq = $2', [orgId, seq]);
  });
}

beforeAll(async () => {
  db = await getTestDb();
  app = await buildTestApp({ db });
});
afterAll(() => app.close());

describe('each change writes exactly one entry, with its actor, target and request', () => {
  let t: TestTenant;
  beforeAll(async () => {
    t = await createTenant(db);
  });

  it('a new org starts its chain with org.created by the system', async () => {
    const org = await createOrg(db, { name: 'Chain Start', slug: randomSlug('chain') });
    const rows = await entries(org.id);
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({
      seq: '1',
      action: 'org.created',
      actor_type: 'system',
      actor_id: null,
      target_type: 'org',
      target_id: org.id,
      metadata: { name: 'Chain Start', slug: org.slug },
    });
  });

  it('POST /v1/users: user.created by the caller, with the request id, address and user agent', async () => {
    const email = newEmail();
    const { result: res, added } = await addedBy(t.org.id, () =>
      send(t.admin, { method: 'POST', url: '/v1/users', payload: { email, role: 'member' }, headers: { 'x-request-id': 'audit-create-1' } }),
    );
    expect(res.statusCode).toBe(201);
    const created = res.json<{ id: string }>();
    expect(added).toHaveLength(1);
    expect(added[0]).toMatchObject({
      action: 'user.created',
      actor_type: 'user',
      actor_id: t.admin.id,
      actor_email: t.admin.email,
      target_type: 'user',
      target_id: created.id,
      request_id: 'audit-create-1',
      ip: '127.0.0.1',
      user_agent: 'audit-test/1.0',
      metadata: { email, role: 'member' },
    });
  });

  it('PATCH a role: user.role_changed with the old and the new role', async () => {
    const target = await t.addUser('member');
    const { result: res, added } = await addedBy(t.org.id, () =>
      send(t.owner, { method: 'PATCH', url: `/v1/users/${target.id}`, payload: { role: 'admin', name: 'Promoted' } }),
    );
    expect(res.statusCode).toBe(200);
    expect(added).toHaveLength(1);
    expect(added[0]).toMatchObject({
      action: 'user.role_changed',
      actor_id: t.owner.id,
      actor_email: t.owner.email,
      target_id: target.id,
      request_id: res.headers['x-request-id'],
      metadata: { changed: ['name', 'role'], from: 'member', to: 'admin' },
    });
  });

  it('PATCH a name only: user.updated naming the field, not its value', async () => {
    const target = await t.addUser('member');
    const { added } = await addedBy(t.org.id, () => send(t.admin, { method: 'PATCH', url: `/v1/users/${target.id}`, payload: { name: 'Renamed' } }));
    expect(added).toHaveLength(1);
    expect(added[0]).toMatchObject({ action: 'user.updated', actor_id: t.admin.id, target_id: target.id, metadata: { changed: ['name'] } });
    expect(JSON.stringify(added[0]!.metadata)).not.toContain('Renamed');
  });

  it('DELETE: user.deleted', async () => {
    const target = await t.addUser('member');
    const { result: res, added } = await addedBy(t.org.id, () => send(t.admin, { method: 'DELETE', url: `/v1/users/${target.id}` }));
    expect(res.statusCode).toBe(204);
    expect(added).toHaveLength(1);
    expect(added[0]).toMatchObject({
      action: 'user.deleted',
      actor_id: t.admin.id,
      target_type: 'user',
      target_id: target.id,
      metadata: { email: target.email, role: 'member' },
    });
  });

  it('limits set by the operator: org_limits.changed by the system, before and after; an unchanged value writes nothing', async () => {
    const set = await addedBy(t.org.id, () => setOrgLimitOverrides(db, t.org.id, { orgBurst: 9, dailyCap: 100 }));
    expect(set.added).toHaveLength(1);
    expect(set.added[0]).toMatchObject({
      action: 'org_limits.changed',
      actor_type: 'system',
      actor_id: null,
      target_type: 'org_limits',
      target_id: t.org.id,
      metadata: { before: {}, after: { orgBurst: 9, dailyCap: 100 } },
    });
    const same = await addedBy(t.org.id, () => setOrgLimitOverrides(db, t.org.id, { orgBurst: 9 }));
    expect(same.added).toEqual([]);
    const cleared = await addedBy(t.org.id, () => clearOrgLimitOverrides(db, t.org.id));
    expect(cleared.added.map((e) => [e.action, e.metadata])).toEqual([
      ['org_limits.changed', { before: { orgBurst: 9, dailyCap: 100 }, after: {} }],
    ]);
  });

  it('an org deleted by the system: org.deleted', async () => {
    const gone = await createTenant(db);
    const { added } = await addedBy(gone.org.id, () => softDeleteOrg(db, gone.org.id));
    expect(added.map((e) => [e.action, e.actor_type, e.target_id])).toEqual([['org.deleted', 'system', gone.org.id]]);
  });
});

describe('a change that fails writes no entry', () => {
  let t: TestTenant;
  let other: TestTenant;
  beforeAll(async () => {
    t = await createTenant(db);
    other = await createTenant(db);
  });

  const cases: [string, () => Promise<LightMyRequestResponse>, number][] = [
    ['a taken email (409)', () => send(t.admin, { method: 'POST', url: '/v1/users', payload: { email: t.member.email } }), 409],
    ['demoting the last owner (409)', () => send(t.owner, { method: 'PATCH', url: `/v1/users/${t.owner.id}`, payload: { role: 'admin' } }), 409],
    ['deleting the last owner (409)', () => send(t.owner, { method: 'DELETE', url: `/v1/users/${t.owner.id}` }), 409],
    ["another tenant's user (404)", () => send(t.owner, { method: 'DELETE', url: `/v1/users/${other.member.id}` }), 404],
    ['an unknown user (404)', () => send(t.owner, { method: 'PATCH', url: `/v1/users/${randomUUID()}`, payload: { name: 'X' } }), 404],
    ['an invalid body (400)', () => send(t.owner, { method: 'POST', url: '/v1/users', payload: { email: 'not-an-email' } }), 400],
  ];
  for (const [what, call, status] of cases) {
    it(what, async () => {
      const { result: res, added } = await addedBy(t.org.id, call);
      expect(res.statusCode).toBe(status);
      expect(added).toEqual([]);
      expect(await entries(other.org.id, 1)).toEqual([]);
    });
  }

  it('an audit entry that cannot be written undoes the change it records (both or neither)', async () => {
    // A user whose audit entry is refused by the table (an action the CHECK does not accept):
    // the INSERT into users must be rolled back with it.
    const email = newEmail();
    const { withTenant } = await import('../src/db/tenancy.js');
    const { appendAuditLog } = await import('../src/models/audit.model.js');
    await expect(
      withTenant(db, t.org.id, async (tx) => {
        await tx.query(`INSERT INTO users (org_id, email, role) VALUES ($1, $2, 'member')`, [t.org.id, email]);
        await appendAuditLog(tx, t.org.id, { action: 'Not An Action' as 'user.created', actor: SYSTEM_ACTOR });
      }),
    ).rejects.toMatchObject({ code: '23514' });
    const { rowCount } = await db.query('SELECT 1 FROM users WHERE org_id = $1 AND email = $2', [t.org.id, email]);
    expect(rowCount).toBe(0);
  });
});

describe('refused requests', () => {
  let t: TestTenant;
  let other: TestTenant;
  beforeAll(async () => {
    t = await createTenant(db);
    other = await createTenant(db);
  });

  it('a role too low (403): access.denied by the caller, with the route', async () => {
    const { result: res, added } = await addedBy(t.org.id, () => send(t.member, { method: 'POST', url: '/v1/users', payload: { email: newEmail() } }));
    expectError(res, 403, 'forbidden');
    expect(added).toHaveLength(1);
    expect(added[0]).toMatchObject({
      action: 'access.denied',
      actor_type: 'user',
      actor_id: t.member.id,
      actor_email: t.member.email,
      request_id: res.headers['x-request-id'],
      user_agent: 'audit-test/1.0',
      metadata: { status: 403, method: 'POST', route: '/v1/users' },
    });
  });

  it("a user claiming another org (403): auth.failed in the org it claimed, without the user's email", async () => {
    const { result: res, added } = await addedBy(t.org.id, () =>
      app.inject({ method: 'GET', url: '/v1/users', headers: { 'x-org-id': t.org.id, 'x-user-id': other.owner.id } }),
    );
    expectError(res, 403, 'forbidden');
    expect(added).toHaveLength(1);
    expect(added[0]).toMatchObject({ action: 'auth.failed', actor_id: other.owner.id, actor_email: null, metadata: { status: 403 } });
    expect(await entries(other.org.id, 1)).toEqual([]);
  });

  it('an unknown user in a real org (401): auth.failed', async () => {
    const ghost = randomUUID();
    const { result: res, added } = await addedBy(t.org.id, () =>
      app.inject({ method: 'GET', url: '/v1/me', headers: { 'x-org-id': t.org.id, 'x-user-id': ghost } }),
    );
    expectError(res, 401, 'unauthorized');
    expect(added.map((e) => [e.action, e.actor_id, e.metadata.status])).toEqual([['auth.failed', ghost, 401]]);
  });

  it('an org that does not exist, or no credentials at all: nothing is written anywhere', async () => {
    for (const headers of [{ 'x-org-id': randomUUID(), 'x-user-id': t.owner.id }, {}] as Record<string, string>[]) {
      const res = await app.inject({ method: 'GET', url: '/v1/users', headers });
      expect(res.statusCode).toBe(401);
      await app.refusalAudit.settled();
      const { rowCount } = await db.query('SELECT 1 FROM audit_logs WHERE request_id = $1', [res.headers['x-request-id']]);
      expect(rowCount).toBe(0);
    }
  });

  describe('bounded per org and minute', () => {
    let limited: FastifyInstance;
    beforeAll(async () => {
      limited = await buildTestApp({ db, env: { AUDIT_REFUSALS_PER_MINUTE: '3' } });
    });
    afterAll(() => limited.close());
    afterEach(() => {
      vi.useRealTimers();
    });

    it('writes the first 3 of a flood, then the next minute one entry that counts the ones left out', async () => {
      const flooded = await createTenant(db);
      const refused = () =>
        limited.inject({ method: 'POST', url: '/v1/users', headers: flooded.member.headers, payload: { email: newEmail() } });
      // Only Date is faked, and only moved a minute on, so timers of the rest keep their sense.
      const t0 = Date.now();
      vi.useFakeTimers({ toFake: ['Date'] });
      vi.setSystemTime(t0);
      const flood = await addedBy(flooded.org.id, async () => {
        for (let i = 0; i < 10; i++) expect((await refused()).statusCode).toBe(403);
      }, limited);
      expect(flood.added.map((e) => e.action)).toEqual(['access.denied', 'access.denied', 'access.denied']);
      expect(flood.added.every((e) => e.metadata.suppressed === undefined)).toBe(true);

      vi.setSystemTime(t0 + 61_000);
      const next = await addedBy(flooded.org.id, refused, limited);
      expect(next.added).toHaveLength(1);
      expect(next.added[0]!.metadata).toMatchObject({ status: 403, suppressed: 7 });
    });

    it('the bound is per org: another org still gets its entries', async () => {
      const quiet = await createTenant(db);
      const { added } = await addedBy(
        quiet.org.id,
        () => limited.inject({ method: 'POST', url: '/v1/users', headers: quiet.member.headers, payload: { email: newEmail() } }),
        limited,
      );
      expect(added).toHaveLength(1);
    });
  });

  it('AUDIT_REFUSALS_PER_MINUTE=0 records none', async () => {
    const off = await buildTestApp({ db, env: { AUDIT_REFUSALS_PER_MINUTE: '0' } });
    try {
      const { added } = await addedBy(
        t.org.id,
        () => off.inject({ method: 'POST', url: '/v1/users', headers: t.member.headers, payload: { email: newEmail() } }),
        off,
      );
      expect(added).toEqual([]);
    } finally {
      await off.close();
    }
  });
});

describe('GET /v1/audit-logs', () => {
  let t: TestTenant;
  let all: { id: string; seq: number; action: string; actor: { type: string; id: string | null }; occurredAt: string }[];

  beforeAll(async () => {
    t = await createTenant(db);
    for (let i = 0; i < 3; i++) {
      expect((await send(t.admin, { method: 'POST', url: '/v1/users', payload: { email: newEmail() } })).statusCode).toBe(201);
    }
    await setOrgLimitOverrides(db, t.org.id, { orgBurst: 1000 });
    expect((await send(t.member, { method: 'POST', url: '/v1/users', payload: { email: newEmail() } })).statusCode).toBe(403);
    await app.refusalAudit.settled();
    const res = await send(t.owner, { method: 'GET', url: '/v1/audit-logs?limit=100' });
    expect(res.statusCode).toBe(200);
    all = res.json<{ data: typeof all }>().data;
  });

  it("lists the org's entries newest first, exactly as stored", async () => {
    const stored = await entries(t.org.id);
    expect(all.map((e) => e.id)).toEqual(stored.map((e) => e.id).reverse());
    expect(all.map((e) => e.seq)).toEqual(stored.map((e) => Number(e.seq)).reverse());
    expect(all.map((e) => e.action)).toEqual(['access.denied', 'org_limits.changed', 'user.created', 'user.created', 'user.created', 'org.created']);
    const newest = (await send(t.owner, { method: 'GET', url: '/v1/audit-logs?limit=1' })).json<{ data: unknown[] }>().data[0];
    expect(newest).toEqual({
      id: stored[5]!.id,
      seq: 6,
      occurredAt: expect.stringMatching(/^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/),
      actor: { type: 'user', id: t.member.id, email: t.member.email },
      action: 'access.denied',
      target: null,
      requestId: stored[5]!.request_id,
      ip: '127.0.0.1',
      userAgent: 'audit-test/1.0',
      metadata: { status: 403, method: 'POST', route: '/v1/users' },
      hash: stored[5]!.hash,
    });
  });

  it('pages with a cursor through every entry once', async () => {
    const seen: string[] = [];
    let url = '/v1/audit-logs?limit=2';
    for (let pages = 0; pages < 10; pages++) {
      const page = (await send(t.admin, { method: 'GET', url })).json<{ data: { id: string }[]; nextCursor: string | null }>();
      seen.push(...page.data.map((e) => e.id));
      if (!page.nextCursor) break;
      url = `/v1/audit-logs?limit=2&cursor=${page.nextCursor}`;
    }
    expect(seen).toEqual(all.map((e) => e.id));
  });

  it('pages in seq order past ten entries (numbers, not text)', async () => {
    const long = await createTenant(db);
    for (let i = 0; i < 24; i++) await recordAuditEvent(db, long.org.id, { action: 'auth.failed', actor: SYSTEM_ACTOR });
    const seqs: number[] = [];
    let url = '/v1/audit-logs?limit=7';
    for (let pages = 0; pages < 10; pages++) {
      const page = (await send(long.owner, { method: 'GET', url })).json<{ data: { seq: number }[]; nextCursor: string | null }>();
      seqs.push(...page.data.map((e) => e.seq));
      if (!page.nextCursor) break;
      url = `/v1/audit-logs?limit=7&cursor=${page.nextCursor}`;
    }
    expect(seqs).toEqual(Array.from({ length: 25 }, (_, i) => 25 - i));
  });

  it('filters by action, actor and actor type', async () => {
    const q = async (query: string) =>
      (await send(t.admin, { method: 'GET', url: `/v1/audit-logs?${query}` })).json<{ data: { id: string }[] }>().data.map((e) => e.id);
    expect(await q('action=user.created')).toEqual(all.filter((e) => e.action === 'user.created').map((e) => e.id));
    expect(await q(`actorId=${t.admin.id}`)).toEqual(all.filter((e) => e.actor.id === t.admin.id).map((e) => e.id));
    expect(await q('actorType=system')).toEqual(all.filter((e) => e.actor.type === 'system').map((e) => e.id));
    expect(await q(`actorType=user&action=access.denied&actorId=${t.member.id}`)).toEqual([all[0]!.id]);
    expect(await q('action=user.deleted')).toEqual([]);
  });

  it('filters by time: since is inclusive, until exclusive', async () => {
    const pivot = all[2]!; // the newest user.created
    const q = async (query: string) =>
      (await send(t.admin, { method: 'GET', url: `/v1/audit-logs?${query}` })).json<{ data: { id: string; occurredAt: string }[] }>().data;
    const since = await q(`since=${pivot.occurredAt}`);
    expect(since.every((e) => e.occurredAt >= pivot.occurredAt)).toBe(true);
    expect(since.map((e) => e.id)).toContain(pivot.id);
    const until = await q(`until=${pivot.occurredAt}`);
    expect(until.every((e) => e.occurredAt < pivot.occurredAt)).toBe(true);
    expect(until.map((e) => e.id)).not.toContain(pivot.id);
    expect(await q('since=2100-01-01T00:00:00Z')).toEqual([]);
  });

  it.each([
    ['action=user.exploded', 'querystring.action'],
    ['actorType=robot', 'querystring.actorType'],
    ['actorId=nope', 'querystring.actorId'],
    ['since=yesterday', 'querystring.since'],
    ['limit=101', 'querystring.limit'],
    ['cursor=bm90LWEtY3Vyc29y', 'querystring.cursor'],
    ['unknown=1', 'querystring'],
  ])('%s: 400 naming %s', async (query, field) => {
    const res = await send(t.admin, { method: 'GET', url: `/v1/audit-logs?${query}` });
    const body = expectError(res, 400, 'validation_failed');
    expect(body.details?.[0]?.field).toBe(field);
  });
});

describe('the hash chain', () => {
  async function tenantWithEntries(n: number): Promise<TestTenant> {
    const t = await createTenant(db);
    for (let i = 0; i < n; i++) await recordAuditEvent(db, t.org.id, { action: 'auth.failed', actor: SYSTEM_ACTOR, metadata: { i } });
    return t;
  }

  it('is whole after normal use, and its head is the last hash', async () => {
    const t = await tenantWithEntries(4);
    const stored = await entries(t.org.id);
    expect(await verifyAuditChain(db, t.org.id)).toEqual({ orgId: t.org.id, rows: 5, head: stored[4]!.hash, broken: null });
  });

  it('an entry changed in place (triggers off, as a superuser) breaks the chain at that entry', async () => {
    const t = await tenantWithEntries(4);
    await tamper(db, t.org.id, 3, `metadata = '{"i": 99}'`);
    const report = await verifyAuditChain(db, t.org.id);
    expect(report.broken).toMatchObject({ seq: 3, reason: 'hash_mismatch' });
    expect(report.rows).toBe(2);
  });

  it('an entry changed and its hash recomputed breaks the chain at the next entry', async () => {
    const t = await tenantWithEntries(4);
    // The forger changes entry 2, then gives it the hash its new content chains to; entry 3
    // still chains from the old hash.
    await tamper(db, t.org.id, 2, `actor_email = 'forged@example.test'`);
    await tamper(
      db,
      t.org.id,
      2,
      `hash = encode(sha256(convert_to((SELECT p.hash FROM audit_logs p WHERE p.org_id = audit_logs.org_id AND p.seq = 1)
                                       || audit_log_canonical(audit_logs), 'UTF8')), 'hex')`,
    );
    const stored = await entries(t.org.id);
    expect(stored[1]!.actor_email).toBe('forged@example.test');
    const report = await verifyAuditChain(db, t.org.id);
    expect(report.broken).toMatchObject({ seq: 3, reason: 'hash_mismatch' });
    expect(report.rows).toBe(2);
  });

  it('a removed entry breaks the chain where it was missing', async () => {
    const t = await tenantWithEntries(4);
    await removeEntry(db, t.org.id, 3);
    expect((await verifyAuditChain(db, t.org.id)).broken).toMatchObject({ seq: 4, reason: 'sequence_gap', expected: 'seq 3' });
  });

  it('stays linear when 50 changes of one org run at once', async () => {
    const t = await createTenant(db);
    const results = await Promise.all(
      Array.from({ length: 50 }, () => send(t.owner, { method: 'POST', url: '/v1/users', payload: { email: newEmail() } })),
    );
    expect(results.map((r) => r.statusCode)).toEqual(Array(50).fill(201));
    const stored = await entries(t.org.id);
    expect(stored.map((e) => Number(e.seq))).toEqual(Array.from({ length: 51 }, (_, i) => i + 1));
    expect(stored.filter((e) => e.action === 'user.created')).toHaveLength(50);
    expect(new Set(stored.filter((e) => e.action === 'user.created').map((e) => e.target_id))).toEqual(
      new Set(results.map((r) => r.json<{ id: string }>().id)),
    );
    expect((await verifyAuditChain(db, t.org.id)).broken).toBeNull();
  });

  it.skipIf(!onPostgres)('stays linear with writers on separate connection pools (several instances)', async () => {
    const t = await createTenant(db);
    const pools = await Promise.all([1, 2, 3].map(() => openTestDatabase(testDatabaseUrl, 4)));
    try {
      await Promise.all(
        pools.flatMap((p, i) =>
          Array.from({ length: 17 }, (_, j) => recordAuditEvent(p, t.org.id, { action: 'auth.failed', actor: SYSTEM_ACTOR, metadata: { i, j } })),
        ),
      );
    } finally {
      await Promise.all(pools.map((p) => p.close()));
    }
    const report = await verifyAuditChain(db, t.org.id);
    expect(report).toMatchObject({ rows: 52, broken: null });
  });
});

describe('npm run audit:verify and npm run org:limits (processes, on a database of their own)', () => {
  let scratch: ScratchDatabase;
  let slug: string;
  let orgId: string;

  beforeAll(async () => {
    scratch = await createScratchDatabase({ persisted: true });
    const sdb = await scratch.open();
    await migrate(sdb, silentLogger);
    slug = randomSlug('verify');
    orgId = (await createOrg(sdb, { name: 'Verify Me', slug })).id;
    for (let i = 0; i < 3; i++) await recordAuditEvent(sdb, orgId, { action: 'auth.failed', actor: SYSTEM_ACTOR, metadata: { i } });
    await createOrg(sdb, { name: 'Second', slug: randomSlug('second') });
    await scratch.closeConnections();
  });
  afterAll(() => scratch?.drop());

  const run = (script: string, args: string[]) => runTsScript(script, { ...scratch.env, LOG_LEVEL: 'silent' }, { timeoutMs: 30_000, args });

  it('a whole chain: exit 0, the entry count and the head hash', async () => {
    const res = await run('src/cli/auditVerify.ts', [slug]);
    expect({ code: res.code, stderr: res.stderr }).toEqual({ code: 0, stderr: '' });
    expect(res.stdout).toMatch(new RegExp(`^ok +${slug}: 4 entries, head [0-9a-f]{64}\\n$`));
  });

  it('org:limits changes the limits and the log says the system did it', async () => {
    const res = await run('src/cli/orgLimits.ts', [slug, '--burst', '5']);
    expect(res.code).toBe(0);
    const sdb = await scratch.open();
    try {
      const rows = await entries(orgId, 4, sdb);
      expect(rows.map((e) => [e.action, e.actor_type, e.metadata])).toEqual([
        ['org_limits.changed', 'system', { before: {}, after: { orgBurst: 5 } }],
      ]);
    } finally {
      await scratch.closeConnections();
    }
  });

  it('every org without a slug; an unknown slug exits 1; bad arguments exit 2', async () => {
    const all = await run('src/cli/auditVerify.ts', []);
    expect(all.code).toBe(0);
    expect(all.stdout.trim().split('\n')).toHaveLength(2);
    expect((await run('src/cli/auditVerify.ts', ['no-such-org'])).code).toBe(1);
    expect((await run('src/cli/auditVerify.ts', ['a', 'b'])).code).toBe(2);
  });

  it('a tampered entry: exit 1, naming the first broken link', async () => {
    const sdb = await scratch.open();
    try {
      await tamper(sdb, orgId, 3, `ip = '203.0.113.7'`);
    } finally {
      await scratch.closeConnections();
    }
    const res = await run('src/cli/auditVerify.ts', [slug]);
    expect(res.code).toBe(1);
    expect(res.stdout).toContain(`BROKEN  ${slug}: first broken link at seq 3`);
    expect(res.stderr).toContain('1 of 1 audit chains are broken');
    const all = await run('src/cli/auditVerify.ts', []);
    expect(all.code).toBe(1);
    expect(all.stdout).toMatch(/^ok /m);
  });
});
