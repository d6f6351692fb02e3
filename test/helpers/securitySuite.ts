import { randomUUID } from 'node:crypto';
import { STATUS_CODES } from 'node:http';
import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ErrorCode } from '../../src/errors.js';
import type { AuthMethod } from '../../src/types/authMethods.js';
import type { Database } from '../../src/infra/database.js';
import { softDeleteOrg } from '../../src/models/org.model.js';
import { ROLES, type Role } from '../../src/types/context.js';
import { buildTestApp, createTenant, type TestTenant, type TestUser } from './app.js';
import { getTestDb } from './db.js';

/**
 * The security suite every tenant route runs through: one call per route generates the tests for
 * every way a caller can be refused (no auth, half or malformed auth, unknown or deleted user or
 * org, wrong org, too low a role, another tenant's object) and checks the exact status, code and
 * error body of each, plus that a refused request changed nothing in the database.
 *
 *   describeTenantRouteSecurity({ method: 'DELETE', url: ({ id }) => `/v1/users/${id}`, takesId: true,
 *                                 minRole: 'admin', okStatus: 204 });
 */

export type HttpMethod = 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';

export interface RouteIds {
  /** The object the route acts on (its :id), made fresh for each test by `makeTarget`. */
  id: string;
}

export interface TenantRouteSpec {
  method: HttpMethod;
  /** Builds the request path (with query string if any). */
  url: (ids: RouteIds) => string;
  /** The route takes an object id in its path: adds the "another tenant's id is a 404" tests. */
  takesId?: boolean;
  /** A valid body, built afresh for every request (unique emails and the like). */
  body?: () => Record<string, unknown>;
  /** The lowest role allowed to call the route; every lower role must get 403. Default 'member'. */
  minRole?: Role;
  /** What a caller with exactly `minRole` gets with valid input: proves the refusals are not vacuous. */
  okStatus: number;
  /**
   * Makes the object the route acts on, in the given tenant, and returns its id. Default: a new
   * member, so destructive routes never consume the tenant's own owner/admin/member.
   */
  makeTarget?: (tenant: TestTenant) => Promise<string>;
  /** Test title; default "METHOD path-with-:id". */
  title?: string;
}

const ERROR_KEYS = new Set(['error', 'message', 'code', 'requestId', 'details']);

export interface ErrorResponseBody {
  error: string;
  message: string;
  code: ErrorCode;
  requestId: string;
  details?: { field: string; message: string }[];
}

/**
 * Asserts an error response: the status, the JSON content type, the body shape of every error
 * (error = HTTP reason phrase, message, code, requestId equal to the x-request-id header, optional
 * details) with nothing else in it. Returns the body for further checks.
 */
export function expectError(res: LightMyRequestResponse, status: number, code: ErrorCode): ErrorResponseBody {
  expect({ status: res.statusCode, body: res.body }).toMatchObject({ status });
  expect(res.headers['content-type']).toMatch(/^application\/json/);
  const body = res.json<ErrorResponseBody>();
  for (const key of Object.keys(body)) expect(ERROR_KEYS, `unexpected key "${key}" in error body`).toContain(key);
  expect(body.error).toBe(STATUS_CODES[status]);
  expect(body.code).toBe(code);
  expect(typeof body.message).toBe('string');
  expect(body.message.length).toBeGreaterThan(0);
  const requestId = res.headers['x-request-id'];
  expect(typeof requestId === 'string' && requestId.length > 0).toBe(true);
  expect(body.requestId).toBe(requestId);
  if (body.details !== undefined) {
    expect(Array.isArray(body.details)).toBe(true);
    for (const d of body.details) expect(d).toEqual({ field: expect.any(String), message: expect.any(String) });
  }
  // Nothing of the server's insides.
  expect(res.body).not.toMatch(/\bat .+\.(ts|js):\d+|node_modules|SELECT |INSERT |UPDATE /);
  return body;
}

/** The body without its requestId, to compare two responses to different requests. */
export function withoutRequestId(body: ErrorResponseBody): Omit<ErrorResponseBody, 'requestId'> {
  const rest: Partial<ErrorResponseBody> = { ...body };
  delete rest.requestId;
  return rest as Omit<ErrorResponseBody, 'requestId'>;
}

/** Every column of every user row of an org (deleted ones included), to prove nothing changed. */
export async function snapshotOrgUsers(db: Database, orgId: string): Promise<Record<string, unknown>[]> {
  const { rows } = await db.query(
    `SELECT id, org_id, email, name, role, metadata, created_at, updated_at, deleted_at
       FROM users WHERE org_id = $1 ORDER BY id`,
    [orgId],
  );
  return rows;
}

export async function snapshotOrg(db: Database, orgId: string): Promise<Record<string, unknown> | undefined> {
  const { rows } = await db.query('SELECT * FROM orgs WHERE id = $1', [orgId]);
  return rows[0];
}

export type Headers = Record<string, string | string[]>;

/**
 * One way of authenticating, as the suite sees it: how to call as a given user, which credentials
 * of this method must be refused, and how to make a working credential stop working. The suite
 * runs once per scheme (test/security.test.ts), so every route is refused the same way whatever
 * the method.
 */
export interface AuthScheme {
  readonly method: AuthMethod;
  /** Server environment for this scheme (AUTH_METHODS and what the method needs). */
  env?(): Record<string, string>;
  /** Headers that authenticate as `user` (for API keys: a key of the user's org with the user's role). */
  as(user: TestUser, db: Database): Promise<Headers>;
  /** Credentials of this method that must get 401: unknown, malformed, expired, wrongly signed... */
  refused(tenant: TestTenant, db: Database): Promise<{ what: string; headers: Headers }[]>;
  /** Makes a credential made by `as(user)` stop working (revoked key, deleted user, ended session). */
  revoke(user: TestUser, headers: Headers, db: Database): Promise<void>;
  /** Called once after the suite (servers the scheme started...). */
  close?(): Promise<void>;
}

/** The development headers: x-org-id and x-user-id. */
export const FAKE_SCHEME: AuthScheme = {
  method: 'fake',
  as: async (user) => user.headers,
  refused: async (t) => [
    { what: 'unknown user id in a real org', headers: { 'x-org-id': t.org.id, 'x-user-id': randomUUID() } },
    { what: 'unknown org id with a real user', headers: { 'x-org-id': randomUUID(), 'x-user-id': t.owner.id } },
    { what: 'unknown org and unknown user', headers: { 'x-org-id': randomUUID(), 'x-user-id': randomUUID() } },
  ],
  revoke: async (user, _headers, db) => {
    await db.query('UPDATE users SET deleted_at = now() WHERE id = $1', [user.id]);
  },
};

const roleRank = (r: Role) => ROLES.length - ROLES.indexOf(r); // owner 3, admin 2, member 1

export function describeTenantRouteSecurity(route: TenantRouteSpec, scheme: AuthScheme = FAKE_SCHEME): void {
  const minRole = route.minRole ?? 'member';
  const title = route.title ?? `${route.method} ${route.url({ id: ':id' })}`;
  const fake = scheme.method === 'fake';

  describe(`security (${scheme.method}): ${title}`, () => {
    let app: FastifyInstance;
    let db: Database;
    /** The caller's tenant. */
    let a: TestTenant;
    /** Another tenant, whose objects A must not reach. */
    let b: TestTenant;
    /** A tenant that is soft-deleted before the tests run. */
    let gone: TestTenant;
    let goneTarget: string;

    const makeTarget = (t: TestTenant) => (route.makeTarget ? route.makeTarget(t) : t.addUser('member').then((u) => u.id));

    const send = (headers: Headers, id: string) =>
      app.inject({
        method: route.method,
        url: route.url({ id }),
        headers,
        ...(route.body ? { payload: route.body() } : {}),
      });

    /**
     * Sends the request as `headers` to an object of tenant A and expects it refused with
     * `status`/`code`, with neither tenant's rows changed.
     */
    async function expectRefused(headers: Headers, status: number, code: ErrorCode): Promise<ErrorResponseBody> {
      const id = await makeTarget(a);
      const before = [await snapshotOrgUsers(db, a.org.id), await snapshotOrgUsers(db, b.org.id), await snapshotOrg(db, a.org.id)];
      const res = await send(headers, id);
      const body = expectError(res, status, code);
      const after = [await snapshotOrgUsers(db, a.org.id), await snapshotOrgUsers(db, b.org.id), await snapshotOrg(db, a.org.id)];
      expect(after).toEqual(before);
      return body;
    }

    /** Credentials of every role of a tenant, made once. */
    const credentials = new Map<TestUser, Headers>();
    const as = async (user: TestUser): Promise<Headers> => {
      let h = credentials.get(user);
      if (!h) {
        h = await scheme.as(user, db);
        credentials.set(user, h);
      }
      return h;
    };

    beforeAll(async () => {
      db = await getTestDb();
      app = await buildTestApp({ db, env: scheme.env?.() ?? {} });
      a = await createTenant(db);
      b = await createTenant(db);
      gone = await createTenant(db);
      goneTarget = await makeTarget(gone);
      // Made while the org is live: a credential must stop working when its org goes.
      for (const t of [a, b, gone]) for (const user of [t.owner, t.admin, t.member]) await as(user);
      expect(await softDeleteOrg(db, gone.org.id)).toBe(true);
    });
    afterAll(async () => {
      await app.close();
      await scheme.close?.();
    });

    it(`lets ${minRole === 'admin' ? 'an' : 'a'} ${minRole} through (${route.okStatus}), so the refusals below are not vacuous`, async () => {
      const res = await send(await as(a[minRole]), await makeTarget(a));
      expect({ status: res.statusCode, body: res.body }).toMatchObject({ status: route.okStatus });
    });

    it('no credentials: 401 unauthorized', async () => {
      const body = await expectRefused({}, 401, 'unauthorized');
      expect(body.message).toContain('Authentication required');
    });

    it('refused credentials of this method: 401 unauthorized, with WWW-Authenticate', async () => {
      const cases = await scheme.refused(a, db);
      expect(cases.length).toBeGreaterThan(0);
      for (const { what, headers } of cases) {
        const id = await makeTarget(a);
        const res = await send(headers, id);
        expect({ what, status: res.statusCode }).toEqual({ what, status: 401 });
        expectError(res, 401, 'unauthorized');
        expect(res.headers['www-authenticate']).toMatch(/^Bearer realm="llm-app"/);
      }
    });

    it('a credential that stopped working (revoked, deleted user, ended session): 401 unauthorized', async () => {
      const user = await a.addUser(minRole);
      const headers = await scheme.as(user, db);
      expect((await send(headers, await makeTarget(a))).statusCode).toBe(route.okStatus);
      await scheme.revoke(user, headers, db);
      await app.authenticator.sync();
      await expectRefused(headers, 401, 'unauthorized');
    });

    if (fake) describeHeaderRefusals();

    /** The development headers' own refusals: half, malformed or duplicated headers, another org. */
    function describeHeaderRefusals(): void {
      it('only x-org-id: 400 bad_request naming x-user-id', async () => {
        const body = await expectRefused({ 'x-org-id': a.org.id }, 400, 'bad_request');
        expect(body.message).toContain('x-user-id');
        expect(body.details).toEqual([{ field: 'headers.x-user-id', message: expect.any(String) }]);
      });

      it('only x-user-id: 400 bad_request naming x-org-id', async () => {
        const body = await expectRefused({ 'x-user-id': a.owner.id }, 400, 'bad_request');
        expect(body.message).toContain('x-org-id');
        expect(body.details).toEqual([{ field: 'headers.x-org-id', message: expect.any(String) }]);
      });

      const malformed = [
        ['not a UUID', 'not-a-uuid'],
        ['empty', ''],
        ['too short', '00000000-0000-0000-0000-00000000001'],
        ['one character too many', '00000000-0000-0000-0000-0000000000011'],
        ['a UUID without dashes', '00000000000000000000000000000001'],
        ['SQL-looking', "' OR '1'='1"],
        ['braced', '{00000000-0000-0000-0000-000000000001}'],
      ] as const;
      for (const header of ['x-org-id', 'x-user-id'] as const) {
        for (const [what, value] of malformed) {
          it(`malformed ${header} (${what}): 400 bad_request naming ${header}`, async () => {
            const headers = { ...a.owner.headers, [header]: value };
            const body = await expectRefused(headers, 400, 'bad_request');
            expect(body.message).toContain(header);
            expect(body.details).toEqual([{ field: `headers.${header}`, message: expect.any(String) }]);
          });
        }

        it(`duplicated ${header} (two header lines): 400 bad_request naming ${header}`, async () => {
          const value = a.owner.headers[header];
          const body = await expectRefused({ ...a.owner.headers, [header]: [value, value] }, 400, 'bad_request');
          expect(body.details).toEqual([{ field: `headers.${header}`, message: expect.any(String) }]);
        });

        it(`duplicated ${header} (comma-joined, as Node joins repeated headers): 400 bad_request`, async () => {
          const value = a.owner.headers[header];
          const body = await expectRefused({ ...a.owner.headers, [header]: `${value}, ${value}` }, 400, 'bad_request');
          expect(body.details).toEqual([{ field: `headers.${header}`, message: expect.any(String) }]);
        });
      }

      it('user of org A claiming org B: 403 with exactly the brief\'s error and message', async () => {
        for (const caller of [a.owner, a.admin, a.member]) {
          const body = await expectRefused({ 'x-org-id': b.org.id, 'x-user-id': caller.id }, 403, 'forbidden');
          expect(body).toEqual({
            error: 'Forbidden',
            message: 'User does not belong to specified organization',
            code: 'forbidden',
            requestId: expect.any(String),
          });
        }
      });
    }

    it('soft-deleted org (its owner, with an object of that org): 401 unauthorized', async () => {
      for (const caller of [gone.owner, gone.admin, gone.member]) {
        const before = await snapshotOrgUsers(db, gone.org.id);
        const res = await send(await as(caller), goneTarget);
        expectError(res, 401, 'unauthorized');
        expect(await snapshotOrgUsers(db, gone.org.id)).toEqual(before);
      }
    });

    const lowerRoles = ROLES.filter((r) => roleRank(r) < roleRank(minRole));
    if (lowerRoles.length > 0) {
      for (const role of lowerRoles) {
        it(`${role} (below ${minRole}): 403 forbidden`, async () => {
          await expectRefused(await as(a[role]), 403, 'forbidden');
        });
      }
    }

    if (route.takesId) {
      it("another tenant's object id: 404, the same body as a random id's, and nothing changed", async () => {
        // The owner can do anything in its own org, so only the org boundary can refuse it.
        for (const caller of [a.owner, a[minRole]]) {
          const foreignId = await makeTarget(b);
          const beforeB = await snapshotOrgUsers(db, b.org.id);
          const foreign = expectError(await send(await as(caller), foreignId), 404, 'not_found');
          expect(await snapshotOrgUsers(db, b.org.id)).toEqual(beforeB);

          const random = expectError(await send(await as(caller), randomUUID()), 404, 'not_found');
          expect(withoutRequestId(foreign)).toEqual(withoutRequestId(random));
          expect(foreign.requestId).not.toBe(random.requestId);
        }
      });

      // User routes only: an owner is the one target a lower role may not touch, so a route that
      // checked the role before the org would answer 403 here and confirm the user exists.
      it.skipIf(route.makeTarget !== undefined)("another tenant's owner id: 404 (not a 403 that would confirm it exists)", async () => {
        for (const caller of [a.owner, a[minRole]]) {
          const beforeB = await snapshotOrgUsers(db, b.org.id);
          const foreign = expectError(await send(await as(caller), b.owner.id), 404, 'not_found');
          expect(await snapshotOrgUsers(db, b.org.id)).toEqual(beforeB);
          const random = expectError(await send(await as(caller), randomUUID()), 404, 'not_found');
          expect(withoutRequestId(foreign)).toEqual(withoutRequestId(random));
        }
      });

      it("an object of a soft-deleted org, asked for by a live tenant: 404 like a random id", async () => {
        const foreign = expectError(await send(await as(a.owner), goneTarget), 404, 'not_found');
        const random = expectError(await send(await as(a.owner), randomUUID()), 404, 'not_found');
        expect(withoutRequestId(foreign)).toEqual(withoutRequestId(random));
      });
    }
  });
}
