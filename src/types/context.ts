import type { Authenticator } from '../auth/index.js';
import type { AuthMethod } from './authMethods.js';
import type { OrgLimitOverrides } from '../models/orgLimits.model.js';
import type { User } from '../models/user.model.js';

export const ROLES = ['owner', 'admin', 'member'] as const;
export type Role = (typeof ROLES)[number];

/** Who is calling: built once per request by the auth hook, passed down as a plain argument. */
export interface RequestContext {
  /** The acting principal: a user's id, or for an API key the key's id. */
  readonly userId: string;
  readonly orgId: string;
  /** The user's current role, or the API key's. */
  readonly role: Role;
  /** The user's email; null for an API key. */
  readonly email: string | null;
  /** How the caller authenticated. */
  readonly authMethod: AuthMethod;
  /** The API key's or the session's id; null for the other methods. */
  readonly credentialId: string | null;
}

/**
 * What lives as long as one answer about a caller (the cached lookup's answer itself, new whenever
 * the caller is looked up again). Modules that keep state per caller (the rate limiter's lease)
 * leave a reference to it here, so a request finds it together with its caller rather than by a
 * lookup of its own. Whatever is kept here must be checked before use: it is a shortcut, never
 * the record.
 */
export interface CallerMemo {
  lease?: object;
  /**
   * The rate limiter's keys of this caller's remembered refusals (org, then user). A key built per
   * request is a new string whose hash the lookup computes each time; a refused flood makes
   * every request look them up.
   */
  blockKeys?: { readonly orgId: string; readonly userId: string; readonly org: string; readonly user: string };
}

/**
 * Where a request came from, for the audit log. Built from the request by the route layer and
 * handed to the models as a plain object: models never see the HTTP request.
 */
export interface RequestMeta {
  readonly requestId: string;
  readonly ip: string | null;
  readonly userAgent: string | null;
}

declare module 'fastify' {
  interface FastifyInstance {
    /** Who callers are (the auth cache); tests use its sync() after changing the database directly. */
    authenticator: Authenticator;
  }
  interface FastifyRequest {
    /** Null for anonymous requests (public routes only); tenant routes require it. */
    context: RequestContext | null;
    /** The caller's user record as authentication found it (with `context`; null when anonymous). */
    caller: User | null;
    /** The caller's org's limit overrides (org_limits), read with the authentication lookup. */
    orgLimitOverrides: OrgLimitOverrides | null;
    /** The memo of the cached answer that authenticated the caller; null when there is none. */
    callerMemo: CallerMemo | null;
  }
}
