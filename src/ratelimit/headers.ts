import type { Decision, OrgLimits } from './types.js';

/**
 * The RateLimit-Policy and RateLimit fields of draft-ietf-httpapi-ratelimit-headers (structured
 * field lists: one item per policy, `q` quota and `w` window in the policy, `r` remaining and `t`
 * seconds to reset in the current state). Only the limits that are on are listed. A token bucket
 * is described as its burst over the time it takes to refill completely.
 */

const seconds = (burst: number, perSecond: number) => Math.max(1, Math.ceil(burst / perSecond));

// The policy only changes with the limits: built once per limits object (the defaults object is
// shared by every org without its own row).
const policyCache = new WeakMap<OrgLimits, string>();

export function rateLimitPolicy(limits: OrgLimits): string {
  let policy = policyCache.get(limits);
  if (policy === undefined) {
    policy = buildPolicy(limits);
    policyCache.set(limits, policy);
  }
  return policy;
}

function buildPolicy(limits: OrgLimits): string {
  const items: string[] = [];
  if (limits.orgBurst > 0 && limits.orgPerSecond > 0) items.push(`"org";q=${limits.orgBurst};w=${seconds(limits.orgBurst, limits.orgPerSecond)}`);
  if (limits.userBurst > 0 && limits.userPerSecond > 0)
    items.push(`"user";q=${limits.userBurst};w=${seconds(limits.userBurst, limits.userPerSecond)}`);
  if (limits.dailyCap > 0) items.push(`"day";q=${limits.dailyCap};w=86400`);
  if (limits.monthlyCap > 0) items.push(`"month";q=${limits.monthlyCap};w=2592000`);
  return items.join(', ');
}

export function rateLimitState(
  limits: OrgLimits,
  d: Decision,
  nowMs: number,
  periods: { dayEndsMs: number; monthEndsMs: number },
): string {
  const items: string[] = [];
  if (limits.orgBurst > 0 && limits.orgPerSecond > 0) items.push(`"org";r=${d.org.remaining};t=${d.org.resetSeconds}`);
  if (limits.userBurst > 0 && limits.userPerSecond > 0) items.push(`"user";r=${d.user.remaining};t=${d.user.resetSeconds}`);
  if (limits.dailyCap > 0)
    items.push(`"day";r=${Math.max(0, limits.dailyCap - d.dayUsed)};t=${Math.ceil((periods.dayEndsMs - nowMs) / 1000)}`);
  if (limits.monthlyCap > 0)
    items.push(`"month";r=${Math.max(0, limits.monthlyCap - d.monthUsed)};t=${Math.ceil((periods.monthEndsMs - nowMs) / 1000)}`);
  return items.join(', ');
}
