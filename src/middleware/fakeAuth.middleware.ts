import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { Authenticator, AuthLookup } from '../auth/index.js';
import { AppError } from '../errors.js';
import type { RequestContext, Role } from '../types/context.js';

/**
 * Development stand-in for authentication: the caller says who it is in two headers.
 * Anyone who can reach the server can act as any user, which is why the server refuses to
 * start with it in production unless ALLOW_FAKE_AUTH=true (src/config/env.ts).
 *
 *   no headers                     -> anonymous (request.context = null)
 *   one header, or not a UUID      -> 400 naming the header
 *   unknown/deleted org or user    -> 401
 *   user of another org            -> 403 "User does not belong to specified organization"
 *   otherwise                      -> request.context = { userId, orgId, role, email }
 */

export const ORG_HEADER = 'x-org-id';
export const USER_HEADER = 'x-user-id';

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

function readIdHeader(request: FastifyRequest, name: string): string | undefined {
  const value = request.headers[name];
  if (value === undefined) return undefined;
  if (typeof value !== 'string' || !UUID.test(value.trim())) {
    throw new AppError('bad_request', `Header ${name} must be a single UUID`, [
      { field: `headers.${name}`, message: 'must be a UUID' },
    ]);
  }
  return value.trim().toLowerCase();
}

function readCallerIds(request: FastifyRequest): { orgId: string; userId: string } | null {
  const orgId = readIdHeader(request, ORG_HEADER);
  const userId = readIdHeader(request, USER_HEADER);
  if (orgId === undefined && userId === undefined) return null;
  if (orgId === undefined || userId === undefined) {
    const missing = orgId === undefined ? ORG_HEADER : USER_HEADER;
    throw new AppError('bad_request', `Header ${missing} is required together with ${missing === ORG_HEADER ? USER_HEADER : ORG_HEADER}`, [
      { field: `headers.${missing}`, message: 'is required' },
    ]);
  }
  return { orgId, userId };
}

const DEBUG_LEVELS = new Set(['debug', 'trace']);

function applyIdentity(request: FastifyRequest, orgId: string, found: AuthLookup): void {
  if (!found.orgExists || !found.user) {
    throw new AppError('unauthorized', 'Unknown organization or user');
  }
  if (found.user.orgId !== orgId) {
    throw new AppError('forbidden', 'User does not belong to specified organization');
  }
  const { id: userId, role, email } = found.user;
  request.context = { userId, orgId, role, email };
  request.caller = found.user;
  request.orgLimitOverrides = found.limitOverrides;
  // Checked first: the line's object is not even built when debug is off (production).
  if (DEBUG_LEVELS.has(request.log.level)) request.log.debug({ userId, orgId, role }, 'Request authenticated');
}

export function registerFakeAuth(app: FastifyInstance, auth: Authenticator): void {
  app.decorateRequest('context', null);
  app.decorateRequest('caller', null);
  app.decorateRequest('orgLimitOverrides', null);
  // A callback hook, not an async one: a caller found in the cache costs no promise at all.
  app.addHook('onRequest', (request, _reply, done) => {
    let ids: { orgId: string; userId: string } | null;
    let cached: AuthLookup | undefined;
    try {
      ids = readCallerIds(request);
      if (ids === null) return done();
      cached = auth.peek(ids.orgId, ids.userId);
      if (cached) applyIdentity(request, ids.orgId, cached);
    } catch (err) {
      return done(err as Error);
    }
    if (cached) return done();
    const { orgId, userId } = ids;
    auth.lookup(orgId, userId).then(
      (found) => {
        try {
          applyIdentity(request, orgId, found);
        } catch (err) {
          return done(err as Error);
        }
        done();
      },
      (err: unknown) => done(err as Error),
    );
  });
}

/** The caller of a tenant route; anonymous requests get 401. */
export function contextOf(request: FastifyRequest): RequestContext {
  if (!request.context) {
    throw new AppError('unauthorized', `Authentication required: send the ${ORG_HEADER} and ${USER_HEADER} headers`);
  }
  return request.context;
}

/** onRequest hook for tenant routes: refuse anonymous callers before any body is read. */
export async function requireContext(request: FastifyRequest): Promise<void> {
  contextOf(request);
}

const RANK: Record<Role, number> = { member: 0, admin: 1, owner: 2 };

/**
 * Route-level guard: callers below `min` get 403 before their body is even parsed. The models
 * check again, under a lock, with the caller's current role; this only answers early.
 */
export function requireRole(min: Role): (request: FastifyRequest) => Promise<void> {
  return async (request) => {
    if (RANK[contextOf(request).role] < RANK[min]) {
      throw new AppError('forbidden', `This requires the ${min} role or higher`);
    }
  };
}
