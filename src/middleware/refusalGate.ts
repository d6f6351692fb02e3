import type { IncomingMessage, ServerResponse } from 'node:http';
import proxyAddr from '@fastify/proxy-addr';
import FindMyWay, { type HTTPMethod } from 'find-my-way';
import type { AppError } from '../errors.js';
import { effectiveLimits } from '../models/orgLimits.model.js';
import { rateLimitPolicy, rateLimitState } from '../ratelimit/headers.js';
import type { Decision, OrgLimits } from '../ratelimit/types.js';
import type { Admission, RateLimiter } from '../ratelimit/limiter.js';
import { refusal } from '../ratelimit/plugin.js';
import type { CachedCaller } from './authenticate.js';
import { JSON_TYPE, withRequestId } from './errorHandler.js';
import { genReqId, REQUEST_ID_HEADER } from './requestId.js';

/**
 * The refusal gate: a request whose caller this instance already knows to be refused is answered
 * 429 from Node's request event, before Fastify sees it.
 *
 * A refused org may flood, and its refusals must cost almost nothing next to the requests of the
 * orgs still within their limits. In the full path most of a remembered refusal's cost is the
 * framework's per-request work (request and reply objects, six hooks in, four out, the reply
 * pipeline), not the decision. No library answers from below a framework's router, so this is
 * written here; it reuses the full path's own pieces (the cached-caller check, the limiter's
 * memory, the refusal errors, the header and body writers, the duration histogram).
 *
 * It answers only what the full path would answer the same way: a tenant route (by its pattern,
 * in a router with Fastify's options), a credential a cache answers without a refusal (an API key
 * or the header stand-in), no refusal of the client address pending, and a refusal the limiter
 * repeats from memory (`rememberedRefusal`). Everything else goes on to Fastify untouched: an
 * unknown route, a JWT, an uncached or refused credential, a lease, an expired block (its probe is
 * the full path's to send), HEAD, a server shutting down. Load shedding does not apply: a
 * remembered refusal costs less than its 503. test/refusalGate.test.ts compares the two answers.
 */
export type RefusalGate = (req: IncomingMessage, res: ServerResponse) => boolean;

export interface RefusalGateDeps {
  cachedCaller: CachedCaller;
  limiter: RateLimiter;
  defaults: OrgLimits;
  /** Counts an answer in the request duration histogram. */
  observe: (method: string, route: string, status: number, seconds: number) => void;
  trustProxy: boolean;
  /** Whether client addresses are limited (IP_RATE_LIMIT_PER_MINUTE > 0): only then can one be refused. */
  ipLimit: boolean;
  /** Set when ACCESS_LOG is on: the gate's answers get the same line. */
  accessLog: ((requestId: string, method: string, url: string, statusCode: number, ms: number) => void) | null;
  /** Fastify's router option that differs from find-my-way's default. */
  maxParamLength: number;
}

export interface RefusalGateRoutes {
  /** Adds a tenant route (from an onRoute hook of the tenant scope). */
  add(method: string | string[], url: string): void;
}

const TRUST_ALL = () => true;

/** What a refusal's answer holds besides the request id, kept while none of it changes. */
interface Prepared {
  readonly limits: OrgLimits;
  readonly retryAfterSeconds: number;
  /** The second (of the clock) it was made in: the RateLimit field's day and month resets count seconds. */
  readonly second: number;
  readonly error: AppError;
  /** Its headers but the request id and the length, as name, value, name, value... */
  readonly headers: readonly string[];
  /** The body's JSON up to the request id's value (AppError.bodyJsonPrefix), and its size in bytes. */
  readonly bodyPrefix: string;
  readonly bodyPrefixBytes: number;
}

// A flood repeats one remembered decision many times a second: its answer is made once per
// second (per decision), not per request. Kept with the decision, which the limiter drops with
// its block.
const preparedOf = new WeakMap<Decision, Prepared>();

function prepare(limits: OrgLimits, refused: Admission): Prepared {
  const second = Math.floor(refused.nowMs / 1000);
  const decision = refused.decision;
  const known = decision === null ? undefined : preparedOf.get(decision);
  if (known !== undefined && known.second === second && known.limits === limits && known.retryAfterSeconds === refused.retryAfterSeconds) {
    return known;
  }
  const headers: string[] = [];
  const policy = rateLimitPolicy(limits);
  if (policy) {
    headers.push('ratelimit-policy', policy);
    if (decision !== null) headers.push('ratelimit', rateLimitState(limits, decision, refused.nowMs, refused.periods));
  }
  headers.push('retry-after', String(refused.retryAfterSeconds), 'content-type', JSON_TYPE);
  const error = refusal(refused.refusedBy ?? 'org_rate', refused.retryAfterSeconds);
  const bodyPrefix = error.bodyJsonPrefix();
  const made: Prepared = {
    limits,
    retryAfterSeconds: refused.retryAfterSeconds,
    second,
    error,
    headers,
    bodyPrefix,
    bodyPrefixBytes: Buffer.byteLength(bodyPrefix),
  };
  if (decision !== null) preparedOf.set(decision, made);
  return made;
}

export interface RefusalGateHandle {
  gate: RefusalGate;
  routes: RefusalGateRoutes;
  /** Refusals it has answered since start (metrics). */
  answered(): number;
}

export function createRefusalGate(deps: RefusalGateDeps): RefusalGateHandle {
  let answered = 0;
  const router = FindMyWay<FindMyWay.HTTPVersion.V1>({ maxParamLength: deps.maxParamLength });
  const noop = () => undefined;
  const { cachedCaller, limiter, defaults } = deps;
  const ipOf = deps.trustProxy
    ? (req: IncomingMessage) => {
        const addrs = proxyAddr.all(req, TRUST_ALL);
        return addrs[addrs.length - 1];
      }
    : (req: IncomingMessage) => req.socket.remoteAddress;

  let lastUrl: string | null = null;
  let lastMethod: string | null = null;
  let lastFound: ReturnType<typeof router.find> | undefined;
  const gate: RefusalGate = (req, res) => {
    const method = req.method;
    if (method === undefined || method === 'HEAD' || !limiter.remembersRefusals) return false;
    const start = performance.now();
    // Cheapest first: a request that is not refused (most are) costs the caller's cache lookup
    // and the limiter's, which its authentication and admission then repeat.
    const caller = cachedCaller(req.headers);
    if (caller === undefined) return false;
    const { context } = caller;
    const limits = effectiveLimits(defaults, caller.limitOverrides);
    const refused = limiter.rememberedRefusal({ orgId: context.orgId, userId: context.userId, limits, memo: caller.memo ?? null });
    if (refused === null) return false;
    const url = req.url ?? '';
    let found = url === lastUrl && method === lastMethod ? lastFound : undefined;
    if (found === undefined) {
      try {
        found = router.find(method as HTTPMethod, url);
      } catch {
        return false; // a URL the router cannot read: Fastify answers it
      }
      // A flood repeats one URL: the last answer is kept for the next request.
      lastUrl = url;
      lastMethod = method;
      lastFound = found;
    }
    if (found === null) return false; // not a tenant route: Fastify answers (a 404, say)
    if (deps.ipLimit) {
      const ip = ipOf(req);
      if (ip !== undefined && limiter.isIpBlocked(ip) > 0) return false; // the address's refusal comes first
    }

    const answer = prepare(limits, refused);
    const id = genReqId(req);
    // The body sendError writes (plainErrorJson): genReqId's ids are ASCII that JSON does not
    // escape, so all after the prefix is one byte a character. The headers of the full path's
    // refusal (the org limit hook's, then sendError's), as a flat list: Node writes it without
    // walking an object.
    const body = withRequestId(answer.bodyPrefix, id);
    const bytes = answer.bodyPrefixBytes + body.length - answer.bodyPrefix.length;
    const headers = [REQUEST_ID_HEADER, id, ...answer.headers, 'content-length', String(bytes)];
    res.writeHead(answer.error.statusCode, headers);
    res.end(body);
    limiter.countRefusal(refused.refusedBy ?? 'org_rate');
    answered++;
    const ms = performance.now() - start;
    deps.observe(method, (found.store as { route: string }).route, answer.error.statusCode, ms / 1000);
    deps.accessLog?.(id, method, req.url ?? '', answer.error.statusCode, ms);
    return true;
  };

  return {
    gate,
    answered: () => answered,
    routes: {
      add(method, url) {
        lastUrl = null; // the kept answer may be another now
        for (const m of Array.isArray(method) ? method : [method]) {
          if (m === 'HEAD') continue;
          if (!router.hasRoute(m as HTTPMethod, url)) router.on(m as HTTPMethod, url, noop, { route: url });
        }
      },
    },
  };
}
