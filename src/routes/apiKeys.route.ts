import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { Authenticator } from '../auth/index.js';
import type { Database } from '../infra/database.js';
import { contextOf, requireRole } from '../middleware/authenticate.js';
import { requestMetaOf } from '../middleware/requestMeta.js';
import { createApiKey, listApiKeysInOrg, revokeApiKey, type ApiKey } from '../models/apiKey.model.js';
import { AUTH_ERRORS, errors, pageQuery, personName, role, uuid } from './schemas.js';

const KeyParams = z.strictObject({ id: uuid('id') });

const ListQuery = z.strictObject({ ...pageQuery(20) });

const CreateKeyBody = z.strictObject({
  name: personName.describe('What the key is for, e.g. "billing service (production)"'),
  role: role.default('member').describe('The role the key acts with: not above your own'),
  expiresAt: z.iso
    .datetime({ offset: true, message: 'must be an ISO 8601 date-time, e.g. 2027-01-31T12:00:00Z' })
    .transform((s) => new Date(s))
    .refine((d) => d.getTime() > Date.now(), 'must be in the future')
    .nullable()
    .optional()
    .describe('When the key stops working; absent or null: never (until revoked)'),
});

export const ApiKeySchema = z
  .object({
    id: z.string(),
    orgId: z.string(),
    name: z.string(),
    role,
    prefix: z.string().describe('The first characters of the secret, to recognise the key'),
    createdBy: z.object({ type: z.enum(['user', 'api_key']), id: z.string() }).describe('The user or API key that created it'),
    createdAt: z.string(),
    expiresAt: z.string().nullable(),
    revokedAt: z.string().nullable(),
    lastUsedAt: z.string().nullable().describe('Written in batches: up to a few seconds late'),
  })
  .meta({ id: 'ApiKey' });

const CreatedApiKeySchema = ApiKeySchema.extend({
  secret: z.string().describe('The key itself (llmk_...): shown this once, never again. Send it as Authorization: Bearer <secret>'),
}).meta({ id: 'CreatedApiKey' });

const ApiKeyPageSchema = z.object({
  data: z.array(ApiKeySchema),
  nextCursor: z.string().nullable().describe('Pass as ?cursor= for the next page; null on the last page'),
});

export const toApiKeyDto = (k: ApiKey): z.infer<typeof ApiKeySchema> => ({
  id: k.id,
  orgId: k.orgId,
  name: k.name,
  role: k.role,
  prefix: k.prefix,
  createdBy: k.createdBy,
  createdAt: k.createdAt.toISOString(),
  expiresAt: k.expiresAt?.toISOString() ?? null,
  revokedAt: k.revokedAt?.toISOString() ?? null,
  lastUsedAt: k.lastUsedAt?.toISOString() ?? null,
});

/**
 * API keys of the caller's organization (admins and owners). The secret is in the creation
 * response only. A revoked key is forgotten by this instance's auth cache before the answer, and
 * by the others through the database's message (migration 006).
 */
export const apiKeyRoutes: FastifyPluginAsyncZod<{ db: Database; auth: Pick<Authenticator, 'forgetUser'> }> = async (app, { db, auth }) => {
  app.post(
    '/api-keys',
    {
      onRequest: requireRole('admin'),
      schema: {
        summary: 'Create an API key (admins, owners; its role not above yours): the secret is in this response only',
        tags: ['api-keys'],
        body: CreateKeyBody,
        response: { 201: CreatedApiKeySchema, ...errors(...AUTH_ERRORS) },
      },
    },
    async (request, reply) => {
      const { key, secret } = await createApiKey(db, contextOf(request), request.body, requestMetaOf(request));
      // No cache, proxy or browser may keep the one copy of the secret.
      return reply.code(201).header('cache-control', 'no-store').send({ ...toApiKeyDto(key), secret });
    },
  );

  app.get(
    '/api-keys',
    {
      onRequest: requireRole('admin'),
      schema: {
        summary: "Your organization's API keys, newest first, revoked and expired ones included (admins, owners; no secrets)",
        tags: ['api-keys'],
        querystring: ListQuery,
        response: { 200: ApiKeyPageSchema, ...errors(...AUTH_ERRORS) },
      },
    },
    async (request) => {
      const page = await listApiKeysInOrg(db, contextOf(request).orgId, request.query);
      return { data: page.keys.map(toApiKeyDto), nextCursor: page.nextCursor };
    },
  );

  app.delete(
    '/api-keys/:id',
    {
      onRequest: requireRole('admin'),
      schema: {
        summary: 'Revoke an API key: it stops working everywhere within a second (admins, owners; only owners revoke owner keys)',
        tags: ['api-keys'],
        params: KeyParams,
        response: { 204: z.null().describe('Revoked (or already revoked)'), ...errors(...AUTH_ERRORS, 404) },
      },
    },
    async (request, reply) => {
      const key = await revokeApiKey(db, contextOf(request), request.params.id, requestMetaOf(request));
      auth.forgetUser(key.id);
      return reply.code(204).send(null);
    },
  );
};
