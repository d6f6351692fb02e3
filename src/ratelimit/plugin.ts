import type { FastifyInstance, FastifyReply, FastifyRequest, HookHandlerDoneFunction } from 'fastify';
import type { Config } from '../config/env.js';
import { AppError } from '../errors.js';
import { sendError } from '../middleware/errorHandler.js';
import { effectiveLimits } from '../models/orgLimits.model.js';
import { rateLimitPolicy, rateLimitState } from './headers.js';
import type { Admission, RateLimiter } from './limiter.js';
import type { OrgLimits, Refusal } from './types.js';

type HookDone = HookHandlerDoneFunction;

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

// A refused flood gets the same few answers over and over: an AppError is immutable, so each
// (reason, wait) is built once. Bounded: the daily cap's wait counts down every second.
const refusals = new Map<string, AppError>();
/** The error of a refusal: shared by the org limit hook and the refusal gate. */
export function refusal(refusedBy: Refusal, retryAfterSeconds: number): AppError {
  const key = `${refusedBy}:${retryAfterSeconds}`;
  let err = refusals.get(key);
  if (err === undefined) {
    if (refusals.size >= 1_000) refusals.clear();
    err = buildRefusal(refusedBy, retryAfterSeconds);
    refusals.set(key, err);
  }
  return err;
}

function buildRefusal(refusedBy: Refusal, retryAfterSeconds: number): AppError {
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
  // Callback style: a request with a credential (most) is checked against memory only, and an
  // async hook would cost it a promise and a microtask turn.
  app.addHook('onRequest', (request, _reply, done) => {
    if (hasAuthHeaders(request)) {
      const retryAfter = limiter.isIpBlocked(request.ip);
      done(retryAfter > 0 ? new AppError('rate_limited', 'Too many failed requests from this address', undefined, retryAfter) : undefined);
      return;
    }
    limiter.acquireIp(request.ip, perMinute).then(
      (r) => done(r.allowed ? undefined : new AppError('rate_limited', 'Too many requests from this address', undefined, r.retryAfterSeconds)),
      (err: Error) => done(err),
    );
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
  const admitted = (request: FastifyRequest, reply: FastifyReply, limits: OrgLimits, admission: Admission, done: HookDone): void => {
    setHeaders(reply, limits, admission);
    // Answered here rather than thrown: a refused flood skips the error handler's work. A hook
    // that replies does not call done().
    if (!admission.allowed) {
      void sendError(request, reply, refusal(admission.refusedBy ?? 'org_rate', admission.retryAfterSeconds));
      return;
    }
    // The client may have gone while we waited: onRequestAbort has run already, and no response
    // will ever finish, so nothing else would free the slot.
    if (request.raw.destroyed) {
      admission.release();
      done();
      return;
    }
    request.releaseRateLimitSlot = admission.release;
    request.rateLimitAdmission = admission;
    done();
  };
  // Callback style: most requests (a lease, a remembered refusal) are admitted synchronously, and
  // an async hook would cost each of them a promise and a microtask turn.
  scope.addHook('onRequest', (request, reply, done) => {
    const ctx = request.context;
    if (!ctx) {
      done(); // requireContext, registered before, has refused it already
      return;
    }
    const limits = effectiveLimits(config.rateLimit.defaults, request.orgLimitOverrides);
    let answer: Admission | Promise<Admission>;
    try {
      answer = limiter.admit({ orgId: ctx.orgId, userId: ctx.userId, limits, memo: request.callerMemo });
    } catch (err) {
      done(err as Error);
      return;
    }
    if (answer instanceof Promise) {
      answer.then(
        (admission) => admitted(request, reply, limits, admission, done),
        (err: Error) => done(err),
      );
    } else {
      admitted(request, reply, limits, answer, done);
    }
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
