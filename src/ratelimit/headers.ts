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

type StateWriter = (d: Decision, nowMs: number, periods: { dayEndsMs: number; monthEndsMs: number }) => string;

// The state is written for every admitted request: which items it has only changes with the
// limits, so the writer (plain concatenation, no array) is made once per limits object.
const stateWriters = new WeakMap<OrgLimits, StateWriter>();

export function rateLimitState(
  limits: OrgLimits,
  d: Decision,
  nowMs: number,
  periods: { dayEndsMs: number; monthEndsMs: number },
): string {
  let write = stateWriters.get(limits);
  if (write === undefined) {
    write = stateWriter(limits);
    stateWriters.set(limits, write);
  }
  return write(d, nowMs, periods);
}

// A whole number from 2^30 up is a heap number in V8, and `'' + n` then takes the general
// double-to-text path, several times slower than for a small integer. A daily or monthly cap can
// be that large, and this field is written on every response: such a number is written as its
// two halves around 10^8, each a small integer.
const SMALL_INT = 2 ** 30;
export function intText(n: number): string {
  if (n < SMALL_INT || !Number.isSafeInteger(n)) return '' + n;
  const high = Math.floor(n / 1e8);
  return '' + high + ('' + (n - high * 1e8 + 1e8)).slice(1);
}

function stateWriter(limits: OrgLimits): StateWriter {
  const org = limits.orgBurst > 0 && limits.orgPerSecond > 0;
  const user = limits.userBurst > 0 && limits.userPerSecond > 0;
  const { dailyCap, monthlyCap } = limits;
  return (d, nowMs, periods) => {
    let out = '';
    if (org) out = '"org";r=' + intText(d.org.remaining) + ';t=' + d.org.resetSeconds;
    if (user) out += (out === '' ? '"user";r=' : ', "user";r=') + intText(d.user.remaining) + ';t=' + d.user.resetSeconds;
    if (dailyCap > 0) {
      out +=
        (out === '' ? '"day";r=' : ', "day";r=') + intText(Math.max(0, dailyCap - d.dayUsed)) + ';t=' + Math.ceil((periods.dayEndsMs - nowMs) / 1000);
    }
    if (monthlyCap > 0) {
      out +=
        (out === '' ? '"month";r=' : ', "month";r=') +
        intText(Math.max(0, monthlyCap - d.monthUsed)) +
        ';t=' +
        Math.ceil((periods.monthEndsMs - nowMs) / 1000);
    }
    return out;
  };
}
