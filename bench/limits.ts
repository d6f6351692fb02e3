/**
 * Limit settings shared by the benchmarks: the server environment that turns every limit off, and
 * the one that turns every limit on without ever refusing.
 */
import type { OrgLimits } from '../src/ratelimit/types.js';

export const OFF: OrgLimits = {
  orgBurst: 0,
  orgPerSecond: 0,
  userBurst: 0,
  userPerSecond: 0,
  dailyCap: 0,
  monthlyCap: 0,
  maxConcurrent: 0,
};

/** Every limit on, each far beyond what one run can reach: every check runs, none refuses. */
export const NEVER_REFUSES: OrgLimits = {
  orgBurst: 1_000_000_000,
  orgPerSecond: 1_000_000_000,
  userBurst: 1_000_000_000,
  userPerSecond: 1_000_000_000,
  dailyCap: 1_000_000_000_000_000,
  monthlyCap: 1_000_000_000_000_000,
  maxConcurrent: 1_000_000,
};

/** The server environment that makes `l` every org's default limits. */
export function limitEnv(l: OrgLimits): Record<string, string> {
  return {
    ORG_RATE_LIMIT_BURST: String(l.orgBurst),
    ORG_RATE_LIMIT_PER_SECOND: String(l.orgPerSecond),
    USER_RATE_LIMIT_BURST: String(l.userBurst),
    USER_RATE_LIMIT_PER_SECOND: String(l.userPerSecond),
    ORG_DAILY_REQUEST_CAP: String(l.dailyCap),
    ORG_MONTHLY_REQUEST_CAP: String(l.monthlyCap),
    ORG_MAX_CONCURRENT_REQUESTS: String(l.maxConcurrent),
  };
}

/**
 * What every benchmark's server runs with: quiet logs, no access log, and neither the per-address
 * limit (every request comes from 127.0.0.1) nor load shedding, so the cases measure the org limiter.
 */
export const BENCH_SERVER_ENV: Record<string, string> = {
  NODE_ENV: 'development',
  LOG_LEVEL: 'warn',
  LOG_FORMAT: 'json',
  ACCESS_LOG: 'false',
  SHUTDOWN_TIMEOUT_MS: '5000',
  IP_RATE_LIMIT_PER_MINUTE: '0',
  LOAD_SHED_MAX_EVENT_LOOP_DELAY_MS: '0',
};
