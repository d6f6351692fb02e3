import { randomUUID } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AuthCache, parseInvalidation } from '../src/auth/cache.js';
import type { Database } from '../src/infra/database.js';
import { softDeleteOrg } from '../src/models/org.model.js';
import { setOrgLimitOverrides } from '../src/models/orgLimits.model.js';
import { findAuthIdentity, type AuthLookup } from '../src/models/user.model.js';
import { buildTestApp, createTenant, type TestTenant, type TestUser } from './helpers/app.js';
import { getTestDb } from './helpers/db.js';

/** The real lookup against the real database, counting its calls. */
function countingLoader(db: Database, gate?: () => Promise<void>) {
  const counter = {
    calls: 0,
    load: async (orgId: string, userId: string): Promise<AuthLookup> => {
      counter.calls++;
      const found = await findAuthIdentity(db, orgId, userId);
      await gate?.();
      return found;
    },
  };
  return counter;
}

const OPTS = { ttlMs: 30_000, maxEntries: 1_000, negativeMaxEntries: 1_000 };

let db: Database;
let a: TestTenant;
let b: TestTenant;

beforeAll(async () => {
  db = await getTestDb();
  [a, b] = await Promise.all([createTenant(), createTenant()]);
});

describe('AuthCache against the database', () => {
  it('answers exactly what the database answers, cold and warm, for every kind of caller', async () => {
    const deleted = await a.addUser('member');
    await db.query('UPDATE users SET deleted_at = now() WHERE id = $1', [deleted.id]);
    await setOrgLimitOverrides(db, a.org.id, { dailyCap: 77, orgBurst: 5 });
    const cases: [string, string][] = [
      [a.org.id, a.owner.id],
      [a.org.id, a.admin.id],
      [a.org.id, a.member.id],
      [b.org.id, b.member.id],
      [a.org.id, b.member.id], // a user of another org
      [a.org.id, randomUUID()], // unknown user
      [randomUUID(), a.member.id], // unknown org
      [randomUUID(), randomUUID()],
      [a.org.id, deleted.id],
    ];
    const counter = countingLoader(db);
    const cache = new AuthCache(counter.load, OPTS);
    for (const [orgId, userId] of cases) {
      const truth = await findAuthIdentity(db, orgId, userId);
      expect(cache.peek(orgId, userId)).toBeUndefined();
      expect(await cache.lookup(orgId, userId)).toEqual(truth);
      expect(cache.peek(orgId, userId)).toEqual(truth);
      expect(await cache.lookup(orgId, userId)).toEqual(truth);
    }
    expect(counter.calls).toBe(cases.length);
    expect(cache.stats()).toMatchObject({ loads: cases.length, misses: cases.length });
    expect(cache.peek(a.org.id, a.member.id)?.limitOverrides).toEqual({ dailyCap: 77, orgBurst: 5 });
  });

  it('keeps a refusal even when it is the first answer it ever stores (its LRUs are made on first use)', async () => {
    const counter = countingLoader(db);
    const cache = new AuthCache(counter.load, OPTS);
    const unknownUser = randomUUID();
    await cache.lookup(a.org.id, unknownUser);
    expect(cache.peek(a.org.id, unknownUser)).toMatchObject({ orgExists: true, user: null });
    const unknownOrg = randomUUID();
    await cache.lookup(unknownOrg, a.member.id);
    expect(cache.peek(unknownOrg, randomUUID())).toMatchObject({ orgExists: false, user: null });
    expect(counter.calls).toBe(2);
    expect(cache.stats()).toMatchObject({ size: 0, negativeSize: 2 });
  });

  it('keeps cached callers compact: timestamps as ISO strings, one shared object for "no limit overrides"', async () => {
    const t = await createTenant();
    const cache = new AuthCache(countingLoader(db).load, OPTS);
    const [owner, member] = [await cache.lookup(t.org.id, t.owner.id), await cache.lookup(t.org.id, t.member.id)];
    expect(owner.user?.createdAt).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    expect(owner.user?.updatedAt).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    expect(owner.limitOverrides).toEqual({});
    expect(owner.limitOverrides).toBe(member.limitOverrides);
    expect(Object.isFrozen(owner.limitOverrides)).toBe(true);
  });

  it('is bounded: the least recently used callers go first', async () => {
    const t = await createTenant();
    const users = [t.owner, t.admin, t.member, ...(await Promise.all([1, 2, 3, 4, 5, 6, 7].map(() => t.addUser('member'))))];
    const cache = new AuthCache(countingLoader(db).load, { ...OPTS, maxEntries: 4 });
    for (const u of users) await cache.lookup(t.org.id, u.id);
    expect(cache.stats().size).toBe(4);
    // The last four are held, the first ones were dropped.
    for (const u of users.slice(-4)) expect(cache.peek(t.org.id, u.id)).toBeDefined();
    for (const u of users.slice(0, -4)) expect(cache.peek(t.org.id, u.id)).toBeUndefined();
  });

  it('single flight: 100 concurrent lookups of one cold caller make one query', async () => {
    const counter = countingLoader(db);
    const cache = new AuthCache(counter.load, OPTS);
    const results = await Promise.all(Array.from({ length: 100 }, () => cache.lookup(a.org.id, a.member.id)));
    expect(counter.calls).toBe(1);
    expect(new Set(results.map((r) => JSON.stringify(r))).size).toBe(1);
    expect(results[0]!.user).toMatchObject({ id: a.member.id, role: 'member' });
    expect(cache.stats()).toMatchObject({ loads: 1, coalesced: 99 });
  });

  it('a failed query is shared by its waiters and not cached', async () => {
    let fail = true;
    const cache = new AuthCache(async (orgId, userId) => {
      if (fail) throw new Error('database down');
      return findAuthIdentity(db, orgId, userId);
    }, OPTS);
    const outcomes = await Promise.allSettled(Array.from({ length: 10 }, () => cache.lookup(a.org.id, a.admin.id)));
    expect(outcomes.every((o) => o.status === 'rejected')).toBe(true);
    expect(cache.stats().loads).toBe(1);
    fail = false;
    expect((await cache.lookup(a.org.id, a.admin.id)).user?.role).toBe('admin');
  });

  it('negative cache: random user ids in an unknown org cost one query; it is bounded apart from the callers', async () => {
    const counter = countingLoader(db);
    const cache = new AuthCache(counter.load, { ...OPTS, negativeMaxEntries: 50 });
    await cache.lookup(a.org.id, a.member.id);
    const unknownOrg = randomUUID();
    expect(await cache.lookup(unknownOrg, randomUUID())).toMatchObject({ orgExists: false, user: null });
    for (let i = 0; i < 300; i++) expect(await cache.lookup(unknownOrg, randomUUID())).toMatchObject({ orgExists: false });
    expect(counter.calls).toBe(2);

    // Unknown users of a real org: one query each the first time, never more than the bound kept,
    // and the real caller is still there.
    for (let i = 0; i < 200; i++) await cache.lookup(a.org.id, randomUUID());
    expect(cache.stats().negativeSize).toBeLessThanOrEqual(50);
    expect(cache.peek(a.org.id, a.member.id)?.user?.id).toBe(a.member.id);
    const repeated = randomUUID();
    const before = counter.calls;
    for (let i = 0; i < 20; i++) await cache.lookup(a.org.id, repeated);
    expect(counter.calls - before).toBe(1);
  });

  it("keeps a caller under the user id alone: it answers only for that user's own org, and only for the exact ids it stored", async () => {
    const counter = countingLoader(db);
    const cache = new AuthCache(counter.load, OPTS);
    await cache.lookup(a.org.id, a.member.id);
    expect(cache.peekPositive(a.org.id, a.member.id)?.user?.id).toBe(a.member.id);
    // The same user id asked about in another org: not this entry's answer.
    expect(cache.peekPositive(b.org.id, a.member.id)).toBeUndefined();
    expect(cache.peek(b.org.id, a.member.id)).toBeUndefined();
    const other = await cache.lookup(b.org.id, a.member.id);
    expect(other).toEqual(await findAuthIdentity(db, b.org.id, a.member.id)); // the 403 case
    expect(cache.peek(b.org.id, a.member.id)).toEqual(other); // kept as a refusal...
    expect(cache.peekPositive(a.org.id, a.member.id)?.user?.orgId).toBe(a.org.id); // ...beside the caller
    // Raw header values that only mean the same ids (case, spaces) are not found: they go
    // through validation first.
    for (const [orgId, userId] of [
      [a.org.id.toUpperCase(), a.member.id],
      [a.org.id, a.member.id.toUpperCase()],
      [` ${a.org.id}`, a.member.id],
      [a.org.id, `${a.member.id} `],
      [`${a.org.id}, ${a.org.id}`, a.member.id],
    ] as const) {
      expect(cache.peekPositive(orgId, userId)).toBeUndefined();
    }
    expect(counter.calls).toBe(2);
  });

  it('invalidation by user and by org; an org created after a cached "unknown org" is found', async () => {
    const t = await createTenant();
    const counter = countingLoader(db);
    const cache = new AuthCache(counter.load, OPTS);
    await cache.lookup(t.org.id, t.member.id);
    await cache.lookup(t.org.id, t.admin.id);
    await db.query("UPDATE users SET role = 'admin' WHERE id = $1", [t.member.id]);
    expect(cache.peek(t.org.id, t.member.id)?.user?.role).toBe('member'); // nobody told it
    cache.invalidate({ kind: 'user', id: t.member.id });
    expect(cache.peek(t.org.id, t.member.id)).toBeUndefined();
    expect(cache.peek(t.org.id, t.admin.id)).toBeDefined(); // only that user
    expect((await cache.lookup(t.org.id, t.member.id)).user?.role).toBe('admin');

    await setOrgLimitOverrides(db, t.org.id, { dailyCap: 9 });
    cache.invalidate({ kind: 'org', id: t.org.id });
    expect(cache.peek(t.org.id, t.admin.id)).toBeUndefined();
    expect((await cache.lookup(t.org.id, t.admin.id)).limitOverrides).toEqual({ dailyCap: 9 });

    const later = randomUUID();
    expect((await cache.lookup(later, t.member.id)).orgExists).toBe(false);
    await db.query("INSERT INTO orgs (id, name, slug) VALUES ($1, 'Later', $2)", [later, `later-${later.slice(0, 8)}`]);
    cache.invalidate({ kind: 'org', id: later });
    expect((await cache.lookup(later, t.member.id)).orgExists).toBe(true);
  });

  it('a lookup that read the database before a change and finished after its invalidation is not kept, nor joined', async () => {
    const t = await createTenant();
    let release: () => void = () => undefined;
    let reached: () => void = () => undefined;
    const atGate = new Promise<void>((r) => (reached = r));
    const gate = new Promise<void>((r) => (release = r));
    let gated = true;
    const counter = countingLoader(db, async () => {
      if (!gated) return;
      gated = false;
      reached();
      await gate;
    });
    const cache = new AuthCache(counter.load, OPTS);
    const early = cache.lookup(t.org.id, t.member.id);
    await atGate; // its query has read the user as a live member
    await db.query('UPDATE users SET deleted_at = now() WHERE id = $1', [t.member.id]);
    cache.invalidate({ kind: 'user', id: t.member.id });
    const late = cache.lookup(t.org.id, t.member.id); // must not join the early one
    release();
    expect((await early).user?.id).toBe(t.member.id);
    expect((await late).user).toBeNull();
    expect(counter.calls).toBe(2);
    expect(cache.peek(t.org.id, t.member.id)).toMatchObject({ user: null });
  });

  it('a lookup keyed by another id than its subject (an API key by its hash) is not joined after its subject changed', async () => {
    const t = await createTenant();
    const alias = 'hash-of-a-credential';
    let release: () => void = () => undefined;
    let reached: () => void = () => undefined;
    const atGate = new Promise<void>((r) => (reached = r));
    const gate = new Promise<void>((r) => (release = r));
    let gated = true;
    const counter = countingLoader(db, async () => {
      if (!gated) return;
      gated = false;
      reached();
      await gate;
    });
    // The key is the alias; the answer depends on the member it names.
    const cache = new AuthCache((orgId: string) => counter.load(orgId, t.member.id), OPTS);
    const early = cache.lookup(t.org.id, alias);
    await atGate;
    await db.query('UPDATE users SET deleted_at = now() WHERE id = $1', [t.member.id]);
    cache.invalidate({ kind: 'user', id: t.member.id });
    const late = cache.lookup(t.org.id, alias); // joins, then finds its answer stale and asks again
    release();
    expect((await early).user?.id).toBe(t.member.id);
    expect((await late).user).toBeNull();
    expect(counter.calls).toBe(2);
    expect(cache.peek(t.org.id, alias)).toMatchObject({ user: null });
  });

  it('without invalidation, nothing is served longer than the TTL', async () => {
    const t = await createTenant();
    const cache = new AuthCache(countingLoader(db).load, { ...OPTS, ttlMs: 300 });
    await cache.lookup(t.org.id, t.member.id);
    // Refusals too: an unknown user, and an unknown org.
    const [unknownUser, unknownOrg] = [randomUUID(), randomUUID()];
    await cache.lookup(t.org.id, unknownUser);
    await cache.lookup(unknownOrg, t.member.id);
    await db.query('UPDATE users SET deleted_at = now() WHERE id = $1', [t.member.id]);
    expect(cache.peek(t.org.id, t.member.id)?.user).not.toBeNull();
    expect(cache.peek(t.org.id, unknownUser)).toBeDefined();
    expect(cache.peek(unknownOrg, t.member.id)).toBeDefined();
    await new Promise((r) => setTimeout(r, 350));
    expect(cache.peek(t.org.id, t.member.id)).toBeUndefined();
    expect(cache.peek(t.org.id, unknownUser)).toBeUndefined();
    expect(cache.peek(unknownOrg, t.member.id)).toBeUndefined();
    expect((await cache.lookup(t.org.id, t.member.id)).user).toBeNull();
  });

  it('TTL 0 turns it off: every lookup queries', async () => {
    const counter = countingLoader(db);
    const cache = new AuthCache(counter.load, { ...OPTS, ttlMs: 0 });
    for (let i = 0; i < 3; i++) await cache.lookup(a.org.id, a.member.id);
    expect(counter.calls).toBe(3);
    expect(cache.peek(a.org.id, a.member.id)).toBeUndefined();
  });

  it('reads only well-formed invalidation messages', () => {
    const id = randomUUID();
    expect(parseInvalidation(`u:${id}`)).toEqual({ kind: 'user', id });
    expect(parseInvalidation(`o:${id}`)).toEqual({ kind: 'org', id });
    expect(parseInvalidation('*')).toEqual({ kind: 'all' });
    for (const bad of ['', 'u:', `x:${id}`, `u:${id}x`, 'u:not-a-uuid', `U:${id}`]) expect(parseInvalidation(bad)).toBeNull();
  });
});

describe('the auth cache in the app', () => {
  let app: FastifyInstance;
  const me = (u: TestUser) => app.inject({ method: 'GET', url: '/v1/me', headers: u.headers });

  beforeAll(async () => {
    app = await buildTestApp();
  });
  afterAll(async () => {
    await app?.close();
  });

  it('100 concurrent requests of one cold caller make one query', async () => {
    const t = await createTenant();
    // The new users' own notifications must not land in the middle of the burst.
    expect(await app.authenticator.sync()).toBe(true);
    const before = app.authenticator.stats().loads;
    const replies = await Promise.all(Array.from({ length: 100 }, () => me(t.member)));
    expect(replies.map((r) => r.statusCode)).toEqual(Array(100).fill(200));
    expect(app.authenticator.stats().loads - before).toBe(1);
  });

  it('a cached caller is found from its exact header values; other spellings of the ids and other orgs get what the database says', async () => {
    const t = await createTenant();
    const other = await createTenant();
    const headers = (org: string, user: string) => ({ 'x-org-id': org, 'x-user-id': user });
    const get = (h: Record<string, string>) => app.inject({ method: 'GET', url: '/v1/me', headers: h });
    expect((await get(headers(t.org.id, t.member.id))).statusCode).toBe(200);
    const hits = app.authenticator.stats().hits;
    expect((await get(headers(t.org.id, t.member.id))).json()).toMatchObject({ id: t.member.id, orgId: t.org.id });
    expect(app.authenticator.stats().hits).toBe(hits + 1);
    // Same ids, other spellings: validated and normalised, then the same caller.
    expect((await get(headers(t.org.id.toUpperCase(), ` ${t.member.id.toUpperCase()} `))).json()).toMatchObject({ id: t.member.id });
    // The cached user claimed by another org: 403, as the database says.
    expect((await get(headers(other.org.id, t.member.id))).statusCode).toBe(403);
    // Malformed values are still 400s naming the header, cached caller or not.
    const bad = await get(headers(`${t.org.id}x`, t.member.id));
    expect(bad.statusCode).toBe(400);
    expect(bad.json().message).toContain('x-org-id');
  });

  it("the app's own changes apply to the very next request", async () => {
    const t = await createTenant();
    const target = await t.addUser('member');
    expect((await me(target)).json()).toMatchObject({ role: 'member' });
    const patch = await app.inject({ method: 'PATCH', url: `/v1/users/${target.id}`, headers: t.owner.headers, payload: { role: 'admin' } });
    expect(patch.statusCode).toBe(200);
    expect((await me(target)).json()).toMatchObject({ role: 'admin' });
    expect((await app.inject({ method: 'DELETE', url: `/v1/users/${target.id}`, headers: t.owner.headers })).statusCode).toBe(204);
    expect((await me(target)).statusCode).toBe(401);
  });

  it('changes made elsewhere in the database (another instance, the CLI, psql) arrive through the channel', async () => {
    const t = await createTenant();
    const u = await t.addUser('member');
    expect((await me(u)).statusCode).toBe(200);
    expect((await me(t.admin)).statusCode).toBe(200);

    await db.query("UPDATE users SET role = 'admin' WHERE id = $1", [u.id]);
    expect(await app.authenticator.sync()).toBe(true);
    expect((await me(u)).json()).toMatchObject({ role: 'admin' });

    await db.query("UPDATE users SET name = 'Someone Else' WHERE id = $1", [u.id]);
    expect(await app.authenticator.sync()).toBe(true);
    expect((await me(u)).json()).toMatchObject({ name: 'Someone Else' }); // GET /v1/me answers from the cache

    await db.query("UPDATE users SET email = 'renamed-' || email WHERE id = $1", [u.id]);
    expect(await app.authenticator.sync()).toBe(true);
    expect((await me(u)).json()).toMatchObject({ email: `renamed-${u.email}` });

    await db.query('UPDATE users SET deleted_at = now() WHERE id = $1', [u.id]);
    expect(await app.authenticator.sync()).toBe(true);
    expect((await me(u)).statusCode).toBe(401);

    expect(await softDeleteOrg(db, t.org.id)).toBe(true);
    expect(await app.authenticator.sync()).toBe(true);
    expect((await me(t.admin)).statusCode).toBe(401);
  });

  it('a cached refusal ends when the org or user it refused comes to exist', async () => {
    const t = await createTenant();
    const claimed = randomUUID();
    const headers = { 'x-org-id': claimed, 'x-user-id': t.member.id };
    expect((await app.inject({ method: 'GET', url: '/v1/me', headers })).statusCode).toBe(401);
    await db.query("INSERT INTO orgs (id, name, slug) VALUES ($1, 'New', $2)", [claimed, `new-${claimed.slice(0, 8)}`]);
    expect(await app.authenticator.sync()).toBe(true);
    // The org exists now, and the user belongs to another one.
    expect((await app.inject({ method: 'GET', url: '/v1/me', headers })).statusCode).toBe(403);
    await db.query('UPDATE users SET org_id = $1 WHERE id = $2', [claimed, t.member.id]);
    expect(await app.authenticator.sync()).toBe(true);
    expect((await app.inject({ method: 'GET', url: '/v1/me', headers })).statusCode).toBe(200);
  });

  it('reports itself in /metrics', async () => {
    await me(a.member);
    await me(a.member);
    const text = (await app.inject({ method: 'GET', url: '/metrics' })).body;
    expect(text).toMatch(/^auth_cache_lookups_total\{result="hit"\} [1-9]/m);
    expect(text).toMatch(/^auth_cache_lookups_total\{result="query"\} [1-9]/m);
    expect(text).toMatch(/^auth_cache_entries\{kind="positive"\} [1-9]/m);
    expect(text).toMatch(/^auth_cache_invalidation_connected 1$/m);
  });
});
