import type { Authenticator } from '../auth/index.js';
import type { OrgLimitOverrides } from '../models/orgLimits.model.js';
import type { User } from '../models/user.model.js';

export const ROLES = ['owner', 'admin', 'member'] as const;
export type Role = (typeof ROLES)[number];

/** Who is calling: built once per request by the auth hook, passed down as a plain argument. */
export interface RequestContext {
  readonly userId: string;
  readonly orgId: string;
  readonly role: Role;
  readonly email: string;
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
  }
}
