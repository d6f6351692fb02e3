import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { Authenticator } from '../auth/index.js';
import type { Config } from '../config/env.js';
import type { Database } from '../infra/database.js';
import type { RateLimiter } from '../ratelimit/index.js';
import { errors, role } from './schemas.js';

// Load balancers give up after a few seconds: answer "disconnected" well before that.
export const DB_HEALTH_TIMEOUT_MS = 1_500;

const HealthSchema = z.object({
  status: z.enum(['ok', 'unavailable']),
  env: z.string(),
  timestamp: z.string(),
  requestId: z.string(),
  database: z.enum(['connected', 'disconnected']),
  rateLimiter: z
    .enum(['redis', 'memory', 'degraded'])
    .describe('redis: shared limits; memory: this instance only (no REDIS_URL); degraded: Redis unreachable, limiting in memory'),
  authCache: z
    .enum(['ok', 'degraded'])
    .describe('degraded: the invalidation channel is down; changes made on other instances apply when cached callers expire'),
  identityProvider: z
    .enum(['ok', 'unreachable'])
    .optional()
    .describe('With the oidc method on: unreachable while the provider\'s discovery document or key set cannot be fetched (its tokens get 503)'),
  org: z.string().optional().describe('With valid auth headers: the caller\'s org id'),
  user: z.object({ id: z.string(), email: z.string().nullable(), role }).optional(),
});

export const healthRoutes: FastifyPluginAsyncZod<{
  config: Config;
  db: Database;
  limiter: RateLimiter;
  auth: Pick<Authenticator, 'invalidationConnected'>;
  /** The OIDC provider's state; null when that method is off. */
  identityProvider?: () => 'ok' | 'unreachable' | null;
}> = async (app, { config, db, limiter, auth, identityProvider }) => {
  app.get(
    '/health',
    {
      schema: {
        summary: 'Liveness and database health; with auth headers, who you are',
        tags: ['health'],
        response: { 200: HealthSchema, 503: HealthSchema, ...errors(400, 401, 403) },
      },
    },
    async (request, reply) => {
      const connected = await db.health(DB_HEALTH_TIMEOUT_MS);
      const ctx = request.context;
      const idp = identityProvider?.() ?? null;
      return reply.code(connected ? 200 : 503).send({
        status: connected ? 'ok' : 'unavailable',
        env: config.env,
        timestamp: new Date().toISOString(),
        requestId: request.id,
        database: connected ? 'connected' : 'disconnected',
        rateLimiter: limiter.mode,
        authCache: auth.invalidationConnected ? 'ok' : 'degraded',
        ...(idp ? { identityProvider: idp } : {}),
        ...(ctx ? { org: ctx.orgId, user: { id: ctx.userId, email: ctx.email, role: ctx.role } } : {}),
      });
    },
  );
};
