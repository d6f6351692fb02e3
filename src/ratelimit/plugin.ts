import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Config } from '../config/env.js';
import { AppError } from '../errors.js';
import { sendError } from '../middleware/errorHandler.js';
import { effectiveLimits } from '../models/orgLimits.model.js';
import { rateLimitPolicy, rateLimitState } from './headers.js';
import type { Admission, RateLimiter } from './limiter.js';
import type { OrgLimits, Refusal } from './types.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** Frees this request's concurrency slot (set when the org limiter admitted it). */
    releaseRateLimitSlot: (() => void) | null;
    /** The org limiter's answer for this request: current usage for GET /v1/org/usage. */
    rateLimitAdmission: Admission | null;
  }
}

// Requests that carry a credential: charged to their address only when it fails (any method).
const AUTH_HEADERS = ['authorization', 'x-org-id', 'x-user-id'] as const;
const hasAuthHeaders = (r: FastifyRequest) => AUTH_HEADERS.some((h) => r.headers[h] !== undefined);

function refusal(refusedBy: Refusal, retryAfterSeconds: number): AppError {
  switch (refusedBy) {
    case 'org_rate':
      return new AppError('rate_limited', 'Too many requests for this organization; retry later', undefined, retryAfterSeconds);
    case 'user_rate':
      return new AppError('rate_limited', 'Too many requests for this user; retry later', undefined, retryAfterSeconds);
    case 'concurrency':
      return new AppError('rate_limited', 'Too many requests in flight for this organization', undefined, retryAfterSeconds);
    case 'daily_cap':
      return new AppError('quota_exceeded', 'Daily request quota of this organization is used up', undefined, retryAfterSeconds);
    case 'monthly_cap':
      return new AppError('quota_exceeded', 'Monthly request quota of this organization is used up', undefined, retryAfterSeconds);
  }
}

/**
 * Per client address, before authentication: anonymous requests are charged; a request with
 * auth headers from an address that failed too often is refused without a database lookup; a
 * failed authentication is charged when its response goes out.
 */
export function registerIpLimit(app: FastifyInstance, limiter: RateLimiter, config: Config): void {
  const perMinute = config.rateLimit.ipPerMinute;
  if (perMinute === 0) return;
  app.addHook('onRequest', async (request) => {
    if (hasAuthHeaders(request)) {
      const retryAfter = limiter.isIpBlocked(request.ip);
      if (retryAfter > 0) throw new AppError('rate_limited', 'Too many failed requests from this address', undefined, retryAfter);
      return;
    }
    const r = await limiter.acquireIp(request.ip, perMinute);
    if (!r.allowed) throw new AppError('rate_limited', 'Too many requests from this address', undefined, r.retryAfterSeconds);
  });
  app.addHook('onResponse', (request, reply, done) => {
    const failedAuth =
      request.context === null && hasAuthHeaders(request) && [400, 401, 403].includes(reply.statusCode);
    if (failedAuth) limiter.acquireIp(request.ip, perMinute).catch(() => undefined);
    done();
  });
}

function setHeaders(reply: FastifyReply, limits: OrgLimits, admission: Admission): void {
  const policy = rateLimitPolicy(limits);
  if (!policy) return;
  void reply.header('ratelimit-policy', policy);
  if (admission.decision) {
    void reply.header('ratelimit', rateLimitState(limits, admission.decision, admission.nowMs, admission.periods));
  }
}

/**
 * Per org and user, after authentication, on every /v1 route: buckets, caps and the concurrency
 * slot in one atomic step; the slot is freed when the response is sent or the client goes away.
 */
export function registerOrgLimit(scope: FastifyInstance, limiter: RateLimiter, config: Config): void {
  scope.decorateRequest('releaseRateLimitSlot', null);
  scope.decorateRequest('rateLimitAdmission', null);
  scope.addHook('onRequest', async (request, reply) => {
    const ctx = request.context;
    if (!ctx) return; // requireContext, registered before, has refused it already
    const limits = effectiveLimits(config.rateLimit.defaults, request.orgLimitOverrides);
    const admission = await limiter.acquireOrg({ orgId: ctx.orgId, userId: ctx.userId, limits });
    setHeaders(reply, limits, admission);
    // Answered here rather than thrown: a refused flood skips the error handler's work.
    if (!admission.allowed) return sendError(request, reply, refusal(admission.refusedBy ?? 'org_rate', admission.retryAfterSeconds));
    // The client may have gone while we waited: onRequestAbort has run already, and no response
    // will ever finish, so nothing else would free the slot.
    if (request.raw.destroyed) {
      admission.release();
      return;
    }
    request.releaseRateLimitSlot = admission.release;
    request.rateLimitAdmission = admission;
  });
  const release = (request: FastifyRequest) => {
    request.releaseRateLimitSlot?.();
    request.releaseRateLimitSlot = null;
  };
  scope.addHook('onResponse', (request, _reply, done) => {
    release(request);
    done();
  });
  scope.addHook('onRequestAbort', (request, done) => {
    release(request);
    done();
  });
}
