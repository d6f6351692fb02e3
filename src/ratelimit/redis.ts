/**
 * Redis limiter backend: one Lua script per acquire (limit.lua) and one per lease refund
 * (refund.lua), shared by every instance, so the check-then-charge is atomic across all of them.
 * Works on a single Redis and, unchanged, on a Redis Cluster: every key of an org carries the hash
 * tag `{org:<id>}` and all keys are passed in KEYS, so a script touches one slot only.
 */
import { readFileSync } from 'node:fs';
import type { Cluster, Redis } from 'ioredis';
import {
  BUCKET_TTL_MARGIN_SECONDS,
  DAY_COUNTER_TTL_SECONDS,
  MAX_BUCKET_TTL_SECONDS,
  MONTH_COUNTER_TTL_SECONDS,
  REFUSAL_CODES,
  limiterKeys,
  slotsKey,
  validateAcquireRequest,
} from './memory.js';
import type { AcquireRequest, Decision, LimiterBackend, RefundRequest } from './types.js';

/** Name of the script's command on the ioredis client. */
const ACQUIRE_COMMAND = 'llmAppRateLimitAcquire';
const REFUND_COMMAND = 'llmAppRateLimitRefund';
const KEY_COUNT = 5;
const REPLY_LENGTH = 11;

type ScriptCommand = (...keysAndArgs: string[]) => Promise<unknown>;

const scriptSources = new Map<string, string>();

/**
 * The scripts ship as files next to this module (src/ under tsx, dist/ once built, where the
 * build copies them), read once on first use so that an app without Redis never needs them.
 */
function loadScript(file: 'limit.lua' | 'refund.lua'): string {
  let source = scriptSources.get(file);
  if (source === undefined) {
    source = readFileSync(new URL(`./${file}`, import.meta.url), 'utf8');
    scriptSources.set(file, source);
  }
  return source;
}

/**
 * Registers the script on the client. ioredis then sends EVALSHA and falls back to EVAL on
 * NOSCRIPT (Redis restarted, flushed its script cache, or a cluster node seen for the first time),
 * so the script body crosses the network only when a node does not know it yet.
 */
function defineScript(client: Redis | Cluster, name: string, file: 'limit.lua' | 'refund.lua'): ScriptCommand {
  client.defineCommand(name, { lua: loadScript(file), numberOfKeys: KEY_COUNT });
  // defineCommand adds the method at run time; ioredis cannot type it without augmenting its module.
  const command = (client as unknown as Record<string, unknown>)[name];
  if (typeof command !== 'function') throw new Error(`rate limiter: ioredis did not define the ${file} command`);
  return (...keysAndArgs) => (command as ScriptCommand).apply(client, keysAndArgs);
}

/** KEYS of both scripts, in their order. */
function scriptKeys(req: Pick<AcquireRequest, 'orgId' | 'userId' | 'day' | 'month'>): string[] {
  const keys = limiterKeys(req);
  return [keys.orgBucket, keys.userBucket, keys.day, keys.month, keys.slots];
}

function refundArgs(req: RefundRequest): string[] {
  const { limits } = req;
  return [
    ...scriptKeys(req),
    String(req.nowMs),
    String(req.tokens),
    String(limits.orgBurst),
    String(limits.orgPerSecond),
    String(limits.userBurst),
    String(limits.userPerSecond),
    req.slotId,
    String(req.slots),
    String(BUCKET_TTL_MARGIN_SECONDS),
    String(MAX_BUCKET_TTL_SECONDS),
  ];
}

function scriptArgs(req: AcquireRequest): string[] {
  const { limits } = req;
  // String() of a JS number is the shortest text that parses back to the same double, so Lua's
  // tonumber() sees exactly the caller's values.
  return [
    ...scriptKeys(req),
    String(req.nowMs),
    String(req.cost),
    String(limits.orgBurst),
    String(limits.orgPerSecond),
    String(limits.userBurst),
    String(limits.userPerSecond),
    String(limits.dailyCap),
    String(limits.monthlyCap),
    String(limits.maxConcurrent),
    req.slotId,
    String(req.slotTtlMs),
    req.seed === undefined ? '0' : '1',
    String(req.seed?.day ?? 0),
    String(req.seed?.month ?? 0),
    String(req.dayEndsMs),
    String(req.monthEndsMs),
    String(DAY_COUNTER_TTL_SECONDS),
    String(MONTH_COUNTER_TTL_SECONDS),
    String(BUCKET_TTL_MARGIN_SECONDS),
    String(MAX_BUCKET_TTL_SECONDS),
    String(req.slots ?? 1),
  ];
}

function isReply(raw: unknown): raw is number[] {
  return Array.isArray(raw) && raw.length === REPLY_LENGTH && raw.every((n) => typeof n === 'number');
}

function toDecision(raw: unknown): Decision {
  if (!isReply(raw)) throw new Error('rate limiter: unexpected reply from the acquire script');
  const [allowed, refusal, retryAfterSeconds, needsSeed, orgRemaining, orgReset, userRemaining, userReset, dayUsed, monthUsed, concurrent] =
    raw as [number, number, number, number, number, number, number, number, number, number, number];
  const refusedBy = REFUSAL_CODES[refusal];
  return {
    allowed: allowed === 1,
    ...(refusedBy === undefined ? {} : { refusedBy }),
    retryAfterSeconds,
    needsSeed: needsSeed === 1,
    org: { remaining: orgRemaining, resetSeconds: orgReset },
    user: { remaining: userRemaining, resetSeconds: userReset },
    dayUsed,
    monthUsed,
    concurrent,
  };
}

export interface RedisBackend extends LimiterBackend {
  readonly kind: 'redis';
}

/**
 * The client belongs to the caller (its connection options — command timeout, no offline queue —
 * decide how a Redis outage surfaces, and it may be shared), so close() leaves it open: whoever
 * created it quits it. Errors from Redis propagate; falling back to memory is the caller's job.
 */
export function createRedisBackend(client: Redis | Cluster): RedisBackend {
  const acquireScript = defineScript(client, ACQUIRE_COMMAND, 'limit.lua');
  const refundScript = defineScript(client, REFUND_COMMAND, 'refund.lua');
  return {
    kind: 'redis',
    async acquire(req) {
      validateAcquireRequest(req);
      return toDecision(await acquireScript(...scriptArgs(req)));
    },
    async release(orgId, slotId) {
      await client.zrem(slotsKey(orgId), slotId);
    },
    async refund(req) {
      await refundScript(...refundArgs(req));
    },
    async close() {
      // Nothing of our own to free; see above.
    },
  };
}
