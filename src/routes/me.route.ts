import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { Database } from '../infra/database.js';
import { contextOf } from '../middleware/authenticate.js';
import { notFound } from '../errors.js';
import { findApiKeyInOrg } from '../models/apiKey.model.js';
import { findOrgById } from '../models/org.model.js';
import { AUTH_ERRORS, errors, OrgSchema, role, toOrgDto, toUserDto, UserSchema } from './schemas.js';

/** GET /v1/me called with an API key: the key, which acts on its own (it has no user). */
const ApiKeyCallerSchema = z
  .object({
    type: z.literal('api_key'),
    id: z.string(),
    orgId: z.string(),
    name: z.string(),
    role,
    prefix: z.string(),
    createdAt: z.string(),
    expiresAt: z.string().nullable(),
  })
  .meta({ id: 'ApiKeyCaller' });

async function apiKeyCaller(db: Database, orgId: string, keyId: string): Promise<z.infer<typeof ApiKeyCallerSchema>> {
  const key = await findApiKeyInOrg(db, orgId, keyId);
  if (!key) throw notFound('API key');
  const { id, name, role, prefix } = key;
  return { type: 'api_key', id, orgId: key.orgId, name, role, prefix, createdAt: key.createdAt.toISOString(), expiresAt: key.expiresAt?.toISOString() ?? null };
}

/** The caller and the caller's organization. */
export const meRoutes: FastifyPluginAsyncZod<{ db: Database }> = async (app, { db }) => {
  app.get(
    '/me',
    {
      schema: {
        summary: 'The authenticated user; called with an API key, the key ({type: "api_key", id, name, role, ...})',
        tags: ['users'],
        response: { 200: z.union([UserSchema, ApiKeyCallerSchema]), ...errors(...AUTH_ERRORS, 404) },
      },
    },
    // The caller as authentication found it (the auth cache, kept current across instances by
    // the database's notifications): no second query on the busiest route. Not an async
    // function: a user is answered synchronously (Fastify sends a returned value at once; a
    // promise costs a microtask turn), only an API key waits for its row.
    (request) => {
      const ctx = contextOf(request);
      if (ctx.authMethod === 'api_key') return apiKeyCaller(db, ctx.orgId, ctx.userId);
      if (!request.caller) throw notFound('User');
      return toUserDto(request.caller);
    },
  );

  app.get(
    '/org',
    {
      schema: {
        summary: "The authenticated user's organization",
        tags: ['orgs'],
        response: { 200: OrgSchema, ...errors(...AUTH_ERRORS, 404) },
      },
    },
    async (request) => {
      const org = await findOrgById(db, contextOf(request).orgId);
      if (!org) throw notFound('Organization');
      return toOrgDto(org);
    },
  );
};
