import { createHash } from 'node:crypto';
import type { RateLimitConfig } from '../config/env.js';
import { AppError } from '../errors.js';
import type { RateLimiter } from '../ratelimit/index.js';

/**
 * Password attempts (sign-in, and the current password of a password change), limited per
 * account and per client address through the rate limiter: token buckets shared by every
 * instance (Redis) or kept in memory, each of LOGIN_ATTEMPTS_PER_ACCOUNT / LOGIN_ATTEMPTS_PER_IP
 * attempts refilled over 15 minutes.
 *
 * Every attempt is charged BEFORE the password is checked, successful ones included: charged
 * after a failure only, a burst of concurrent guesses would all pass the check before the first
 * failure was counted, and each would cost an argon2 verification (19 MiB, tens of ms). Charged
 * first, a locked-out attempt is a 429 that costs no lookup and no verification, and the bound
 * holds across instances. A person who signs in successfully uses one attempt; the budget is
 * far above what people need.
 */

export const LOGIN_WINDOW_SECONDS = 15 * 60;

export interface LoginThrottle {
  /**
   * Charges one attempt to the client address and then to the account (any string naming it: it
   * is hashed, so no email reaches the limiter's keys). Throws 429 with Retry-After when either
   * is used up; the account is not charged when the address is.
   */
  attempt(account: string, ip: string): Promise<void>;
}

const tooMany = (retryAfterSeconds: number) =>
  new AppError('rate_limited', 'Too many password attempts; retry later', undefined, retryAfterSeconds);

export function createLoginThrottle(limiter: RateLimiter, limits: RateLimitConfig['login']): LoginThrottle {
  const bucket = (n: number) => ({ burst: n, perSecond: n / LOGIN_WINDOW_SECONDS });
  return {
    async attempt(account, ip) {
      if (limits.perIp > 0) {
        const r = await limiter.acquireKey(`login:ip:${ip}`, bucket(limits.perIp));
        if (!r.allowed) throw tooMany(r.retryAfterSeconds);
      }
      if (limits.perAccount > 0) {
        const key = createHash('sha256').update(account, 'utf8').digest('hex').slice(0, 32);
        const r = await limiter.acquireKey(`login:acct:${key}`, bucket(limits.perAccount));
        if (!r.allowed) throw tooMany(r.retryAfterSeconds);
      }
    },
  };
}
