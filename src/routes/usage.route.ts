import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { Config } from '../config/env.js';
import { contextOf, requireRole } from '../middleware/authenticate.js';
import { effectiveLimits } from '../models/orgLimits.model.js';
import { utcPeriods, type RateLimiter } from '../ratelimit/index.js';
import { AUTH_ERRORS, errors } from './schemas.js';

const Bucket = z.object({
  burst: z.number().describe('Capacity; 0: no limit'),
  perSecond: z.number().describe('Refill per second'),
  remaining: z.number().nullable().describe('Whole tokens left now; null when not known'),
  resetSeconds: z.number().nullable().describe('Seconds until the bucket is full again'),
});

const Quota = z.object({
  period: z.string().describe('YYYY-MM-DD or YYYY-MM (UTC)'),
  cap: z.number().describe('0: no cap'),
  used: z.number(),
  remaining: z.number().nullable().describe('null when there is no cap'),
  resetsAt: z.string().describe('When the period turns (UTC)'),
});

const UsageSchema = z
  .object({
    orgId: z.string(),
    limiter: z.enum(['redis', 'memory', 'degraded']),
    limits: z.object({
      orgBurst: z.number(),
      orgPerSecond: z.number(),
      userBurst: z.number(),
      userPerSecond: z.number(),
      dailyCap: z.number(),
      monthlyCap: z.number(),
      maxConcurrent: z.number(),
    }),
    rate: z.object({ org: Bucket, user: Bucket.describe('Your own bucket (the caller of this request)') }),
    quota: z.object({ day: Quota, month: Quota }),
    concurrency: z.object({ max: z.number(), inFlight: z.number().nullable() }),
  })
  .meta({ id: 'OrgUsage' });

/** GET /v1/org/usage: the org's limits and where it stands, for its admins and owners. */
export const usageRoutes: FastifyPluginAsyncZod<{ config: Config; limiter: RateLimiter }> = async (
  app,
  { config, limiter },
) => {
  app.get(
    '/org/usage',
    {
      onRequest: requireRole('admin'),
      schema: {
        summary: "Your organization's limits, current usage, what remains and when it resets (admins, owners)",
        tags: ['orgs'],
        response: { 200: UsageSchema, ...errors(...AUTH_ERRORS) },
      },
    },
    async (request) => {
      const ctx = contextOf(request);
      const limits = effectiveLimits(config.rateLimit.defaults, request.orgLimitOverrides);
      // This request went through the limiter: its answer is the freshest reading there is.
      const admission = request.rateLimitAdmission;
      const d = admission?.decision ?? null;
      const nowMs = admission?.nowMs ?? Date.now();
      const periods = admission?.periods ?? utcPeriods(nowMs);
      const used = d ? { day: d.dayUsed, month: d.monthUsed } : await limiter.usageOf(ctx.orgId, periods.day, periods.month);
      const quota = (period: string, cap: number, n: number, endsMs: number) => ({
        period,
        cap,
        used: n,
        remaining: cap > 0 ? Math.max(0, cap - n) : null,
        resetsAt: new Date(endsMs).toISOString(),
      });
      return {
        orgId: ctx.orgId,
        limiter: limiter.mode,
        limits,
        rate: {
          org: {
            burst: limits.orgBurst,
            perSecond: limits.orgPerSecond,
            remaining: d ? d.org.remaining : null,
            resetSeconds: d ? d.org.resetSeconds : null,
          },
          user: {
            burst: limits.userBurst,
            perSecond: limits.userPerSecond,
            remaining: d ? d.user.remaining : null,
            resetSeconds: d ? d.user.resetSeconds : null,
          },
        },
        quota: {
          day: quota(periods.day, limits.dailyCap, used.day, periods.dayEndsMs),
          month: quota(periods.month, limits.monthlyCap, used.month, periods.monthEndsMs),
        },
        concurrency: { max: limits.maxConcurrent, inFlight: d ? d.concurrent : null },
      };
    },
  );
};
