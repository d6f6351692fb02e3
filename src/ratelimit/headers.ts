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

/** The RateLimit field of a decision; which items it lists depends only on the limits. */
export function rateLimitState(
  limits: OrgLimits,
  d: Decision,
  nowMs: number,
  periods: { dayEndsMs: number; monthEndsMs: number },
): string {
  let at = 0;
  if (limits.orgBurst > 0 && limits.orgPerSecond > 0) {
    at = putBytes(at, ORG_R);
    at = putInt(at, d.org.remaining);
    at = putBytes(at, T);
    at = putInt(at, d.org.resetSeconds);
  }
  if (limits.userBurst > 0 && limits.userPerSecond > 0) {
    at = putBytes(at, at === 0 ? USER_R : NEXT_USER_R);
    at = putInt(at, d.user.remaining);
    at = putBytes(at, T);
    at = putInt(at, d.user.resetSeconds);
  }
  if (limits.dailyCap > 0) {
    at = putBytes(at, at === 0 ? DAY_R : NEXT_DAY_R);
    at = putInt(at, Math.max(0, limits.dailyCap - d.dayUsed));
    at = putBytes(at, T);
    at = putInt(at, Math.ceil((periods.dayEndsMs - nowMs) / 1000));
  }
  if (limits.monthlyCap > 0) {
    at = putBytes(at, at === 0 ? MONTH_R : NEXT_MONTH_R);
    at = putInt(at, Math.max(0, limits.monthlyCap - d.monthUsed));
    at = putBytes(at, T);
    at = putInt(at, Math.ceil((periods.monthEndsMs - nowMs) / 1000));
  }
  return field.toString('latin1', 0, at);
}

/*
 * The field is written byte by byte into one buffer and read back as one string, rather than
 * joined from its numbers' texts, because it is on every response and its numbers change on
 * every request:
 * - V8 caches the text of each number it converts, and a new entry stays referenced from that
 *   cache until a later number takes its slot. At four new numbers a request, those texts lived
 *   long enough to be copied out of the young generation (about 80 bytes a request), so they
 *   made most of the young collections' work and all of the old generation's growth under load.
 * - A string joined from pieces is a tree of them; Node checks each header's characters with a
 *   regular expression, which first flattens such a string in V8's runtime.
 * - From 2^30 up (a large daily or monthly cap) a number is a heap number, and its text takes
 *   V8's general double-to-text path.
 * Four items of at most 12 + 24 + 3 + 24 characters (no number is written longer than 24) fit.
 */
const field = Buffer.alloc(512);
const ascii = (text: string): Uint8Array => Buffer.from(text, 'latin1');
const ORG_R = ascii('"org";r=');
const USER_R = ascii('"user";r=');
const NEXT_USER_R = ascii(', "user";r=');
const DAY_R = ascii('"day";r=');
const NEXT_DAY_R = ascii(', "day";r=');
const MONTH_R = ascii('"month";r=');
const NEXT_MONTH_R = ascii(', "month";r=');
const T = ascii(';t=');

function putBytes(at: number, bytes: Uint8Array): number {
  for (let i = 0; i < bytes.length; i++) field[at + i] = bytes[i]!;
  return at + bytes.length;
}

/** Writes a whole number 0 ≤ n ≤ 2^53 - 1 in decimal; anything else (never expected) as String() writes it. */
function putInt(at: number, n: number): number {
  if (n >= 0 && n < 2 ** 31 && (n | 0) === n) {
    let end = at + 1;
    for (let p = 10; p <= n; p *= 10) end++;
    let i = end - 1;
    while (n >= 10) {
      const rest = (n / 10) | 0;
      field[i--] = 48 + n - rest * 10; // '0' + the last digit
      n = rest;
    }
    field[i] = 48 + n;
    return end;
  }
  if (!(n >= 0 && n <= Number.MAX_SAFE_INTEGER && Number.isInteger(n))) return putBytes(at, ascii(String(n)));
  // Larger: the digits above 10^8, then the eight below, each part a small integer. n / 1e8 is
  // rounded to a double, so its floor can be one off; the low part shows it.
  let high = Math.floor(n / 1e8);
  let low = n - high * 1e8;
  if (low < 0) {
    high--;
    low += 1e8;
  } else if (low >= 1e8) {
    high++;
    low -= 1e8;
  }
  const end = putInt(at, high) + 8;
  for (let i = end - 1; i >= end - 8; i--) {
    const rest = (low / 10) | 0;
    field[i] = 48 + low - rest * 10;
    low = rest;
  }
  return end;
}
