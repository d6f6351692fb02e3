import type { IncomingHttpHeaders } from 'node:http';
import type { FastifyInstance, FastifyReply, FastifyRequest, HookHandlerDoneFunction } from 'fastify';
import { decodeJwt } from 'jose';
import type { Authenticator, AuthLookup } from '../auth/index.js';
import type { AuthConfig } from '../config/env.js';
import { AppError } from '../errors.js';
import type { AuditActor } from '../models/audit.model.js';
import type { OrgLimitOverrides } from '../models/orgLimits.model.js';
import type { User } from '../models/user.model.js';
import type { AuthMethod } from '../types/authMethods.js';
import type { CallerMemo, RequestContext, Role } from '../types/context.js';

/**
 * Who is calling. Every method ends in the same `request.context` { userId, orgId, role, email,
 * authMethod, credentialId }, so routes, limits, isolation and audit do not depend on the method:
 *
 *   Authorization: Bearer llmk_...        -> an API key (api_key)
 *   Authorization: Bearer <JWT, our iss>  -> an access token of a password session (password)
 *   Authorization: Bearer <JWT, IdP iss>  -> a token of the OpenID Connect provider (oidc)
 *   x-org-id + x-user-id headers          -> the development stand-in (fake)
 *   none of these                         -> anonymous (request.context = null)
 *
 * A credential that is malformed, unknown, expired, revoked or of a method that is not enabled is
 * a 401 (with WWW-Authenticate); both kinds of credential at once is a 400. The fake headers:
 * one header alone or a value that is not a UUID is a 400 naming the header, an unknown org or
 * user a 401, a user of another org a 403.
 */

export const ORG_HEADER = 'x-org-id';
export const USER_HEADER = 'x-user-id';
export const API_KEY_PREFIX = 'llmk_';

/** What a method found: the caller, their user record (null for an API key) and their org's limits. */
export interface ResolvedCaller {
  readonly context: RequestContext;
  readonly caller: User | null;
  readonly limitOverrides: OrgLimitOverrides;
  /** The memo of the cached answer, when the caller came from a cache that keeps one. */
  readonly memo?: CallerMemo | undefined;
}

/**
 * Verifies one bearer token. Throws an AppError (401) for a credential that does not
 * authenticate; may set `request.claimedIdentity` first, so the refusal is audited in that org.
 * Synchronous when the answer is cached.
 */
export type BearerResolver = (token: string, request: FastifyRequest) => ResolvedCaller | Promise<ResolvedCaller>;

/** The bearer methods the server runs, each present only when enabled. */
export interface BearerMethods {
  /** Tokens starting with `llmk_`. */
  apiKey?: BearerResolver;
  /** The caller of an API key answered from cache, without a refusal; undefined otherwise. */
  cachedApiKey?: (token: string) => ResolvedCaller | undefined;
  /** JWTs whose `iss` is ours (JWT_ISSUER). */
  session?: { issuer: string; resolve: BearerResolver };
  /** JWTs whose `iss` is the OpenID Connect provider's (OIDC_ISSUER). */
  oidc?: { issuer: string; resolve: BearerResolver };
}

/** Who a refused request claimed to be, for the audit log of that org (null: nobody known). */
export interface ClaimedIdentity {
  orgId: string;
  actor: AuditActor;
}

declare module 'fastify' {
  interface FastifyRequest {
    claimedIdentity: ClaimedIdentity | null;
  }
  interface FastifyContextConfig {
    /**
     * The route takes its credential in the body (sign-in, refresh, sign-out): an Authorization
     * header sent along (an expired access token, say) is not looked at.
     */
    credentialInBody?: boolean;
  }
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
// RFC 6750 b64token, then three base64url segments for a JWT.
const BEARER = /^Bearer +([A-Za-z0-9\-._~+/]+=*) *$/i;
const JWT_SHAPE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/;

export const invalidToken = (message = 'Invalid or expired credentials') => new AppError('unauthorized', message);

function readIdHeader(request: FastifyRequest, name: string): string | undefined {
  const value = request.headers[name];
  if (value === undefined) return undefined;
  const id = typeof value === 'string' ? value.trim() : '';
  if (!UUID.test(id)) {
    throw new AppError('bad_request', `Header ${name} must be a single UUID`, [
      { field: `headers.${name}`, message: 'must be a UUID' },
    ]);
  }
  return id.toLowerCase();
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

function apply(request: FastifyRequest, resolved: ResolvedCaller): void {
  const { context } = resolved;
  request.context = context;
  request.caller = resolved.caller;
  request.orgLimitOverrides = resolved.limitOverrides;
  request.callerMemo = resolved.memo ?? null;
  // Checked first: the line's object is not even built when debug is off (production).
  if (DEBUG_LEVELS.has(request.log.level)) {
    request.log.debug({ userId: context.userId, orgId: context.orgId, role: context.role, authMethod: context.authMethod }, 'Request authenticated');
  }
}

/**
 * The caller a user lookup (by org and user id) describes, or the refusal: 401 for an unknown or
 * deleted org or user, 403 for a user of another org. Shared by every method that names a user.
 */
export function callerFromLookup(orgId: string, found: AuthLookup, authMethod: AuthMethod, credentialId: string | null = null): ResolvedCaller {
  if (!found.orgExists || !found.user) throw new AppError('unauthorized', 'Unknown organization or user');
  if (found.user.orgId !== orgId) throw new AppError('forbidden', 'User does not belong to specified organization');
  // The cached user's own strings (equal to the request's): whatever keeps the context, a
  // lease say, then holds no copy of its own.
  const { id: userId, orgId: userOrgId, role, email } = found.user;
  return {
    context: { userId, orgId: userOrgId, role, email, authMethod, credentialId },
    caller: found.user,
    limitOverrides: found.limitOverrides,
    memo: found,
  };
}

/** The method a bearer token belongs to, by its shape and, for a JWT, its (unverified) issuer. */
function bearerResolver(token: string, methods: BearerMethods): BearerResolver {
  if (token.startsWith(API_KEY_PREFIX)) {
    if (!methods.apiKey) throw invalidToken('API keys are not enabled on this server (AUTH_METHODS)');
    return methods.apiKey;
  }
  if (!JWT_SHAPE.test(token)) throw invalidToken('Malformed bearer token');
  let iss: unknown;
  try {
    // Only to choose the verifier: nothing in the token is trusted before it is verified.
    iss = decodeJwt(token).iss;
  } catch {
    throw invalidToken('Malformed bearer token');
  }
  if (methods.session && iss === methods.session.issuer) return methods.session.resolve;
  if (methods.oidc && iss === methods.oidc.issuer) return methods.oidc.resolve;
  throw invalidToken('Token from an unknown or disabled issuer');
}

/**
 * The caller these headers name, when a cache answers it without a refusal; undefined for
 * anything the authentication hook must decide: no credential, an uncached, unknown, refused or
 * malformed one, a JWT (its signature is checked on every request), both kinds at once.
 */
export type CachedCaller = (headers: IncomingHttpHeaders) => ResolvedCaller | undefined;

/** Registers the authentication hook; returns the cached-caller check of the same methods (for the refusal gate). */
export function registerAuthentication(app: FastifyInstance, auth: Authenticator, config: AuthConfig, methods: BearerMethods): CachedCaller {
  app.decorateRequest('context', null);
  app.decorateRequest('caller', null);
  app.decorateRequest('orgLimitOverrides', null);
  app.decorateRequest('callerMemo', null);
  app.decorateRequest('claimedIdentity', null);
  const fake = config.methods.includes('fake');

  // A callback hook, not an async one: a caller found in the cache costs no promise at all.
  app.addHook('onRequest', (request, _reply, done) => {
    if (request.routeOptions.config.credentialInBody === true) return done();
    let pending: Promise<ResolvedCaller>;
    try {
      const authorization = request.headers.authorization;
      if (authorization !== undefined) {
        if (request.headers[ORG_HEADER] !== undefined || request.headers[USER_HEADER] !== undefined) {
          throw new AppError('bad_request', `Send either an Authorization header or the ${ORG_HEADER} and ${USER_HEADER} headers, not both`);
        }
        const match = BEARER.exec(authorization);
        if (!match) throw invalidToken('The Authorization header must be "Bearer <token>"');
        const token = match[1]!;
        const result = bearerResolver(token, methods)(token, request);
        if (!(result instanceof Promise)) {
          apply(request, result);
          return done();
        }
        pending = result;
      } else {
        if (fake) {
          // The raw header values first: a hit means both are exactly the ids of a cached caller
          // (only validated ids are stored), so the checks below have nothing left to find.
          const rawOrg = request.headers[ORG_HEADER];
          const rawUser = request.headers[USER_HEADER];
          const hit = typeof rawOrg === 'string' && typeof rawUser === 'string' ? auth.peekCaller(rawOrg, rawUser) : undefined;
          if (hit !== undefined) {
            apply(request, callerFromLookup(hit.user!.orgId, hit, 'fake'));
            return done();
          }
        }
        const ids = readCallerIds(request);
        if (ids === null) return done();
        if (!fake) throw invalidToken(`Header authentication (${ORG_HEADER}, ${USER_HEADER}) is not enabled on this server (AUTH_METHODS)`);
        const cached = auth.peek(ids.orgId, ids.userId);
        if (cached) {
          apply(request, callerFromLookup(ids.orgId, cached, 'fake'));
          return done();
        }
        const { orgId } = ids;
        pending = auth.lookup(orgId, ids.userId).then((found) => callerFromLookup(orgId, found, 'fake'));
      }
    } catch (err) {
      return done(err as Error);
    }
    pending.then(
      (resolved) => {
        apply(request, resolved);
        done();
      },
      (err: unknown) => done(err as Error),
    );
  });

  return (headers) => {
    const authorization = headers.authorization;
    if (authorization !== undefined) {
      if (headers[ORG_HEADER] !== undefined || headers[USER_HEADER] !== undefined || !methods.cachedApiKey) return undefined;
      const token = BEARER.exec(authorization)?.[1];
      return token?.startsWith(API_KEY_PREFIX) === true ? methods.cachedApiKey(token) : undefined;
    }
    if (!fake) return undefined;
    const rawOrg = headers[ORG_HEADER];
    const rawUser = headers[USER_HEADER];
    if (typeof rawOrg !== 'string' || typeof rawUser !== 'string') return undefined;
    const hit = auth.peekCaller(rawOrg, rawUser);
    return hit === undefined ? undefined : callerFromLookup(hit.user!.orgId, hit, 'fake');
  };
}

const authenticationRequired = () =>
  new AppError('unauthorized', 'Authentication required: send Authorization: Bearer <API key or access token>');

/** The caller of a tenant route; anonymous requests get 401. */
export function contextOf(request: FastifyRequest): RequestContext {
  if (!request.context) throw authenticationRequired();
  return request.context;
}

/**
 * onRequest hook for tenant routes: refuse anonymous callers before any body is read. A callback
 * hook: an async one would cost every tenant request a promise.
 */
export function requireContext(request: FastifyRequest, _reply: FastifyReply, done: HookHandlerDoneFunction): void {
  done(request.context ? undefined : authenticationRequired());
}

const RANK: Record<Role, number> = { member: 0, admin: 1, owner: 2 };

/** Whether `role` is at least `min`. */
export const roleAtLeast = (role: Role, min: Role): boolean => RANK[role] >= RANK[min];

/**
 * Route-level guard: callers below `min` get 403 before their body is even parsed. The models
 * check again, under a lock, with the caller's current role; this only answers early.
 */
export function requireRole(min: Role): (request: FastifyRequest) => Promise<void> {
  return async (request) => {
    if (!roleAtLeast(contextOf(request).role, min)) {
      throw new AppError('forbidden', `This requires the ${min} role or higher`);
    }
  };
}
