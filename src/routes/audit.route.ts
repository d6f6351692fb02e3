import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { Database } from '../infra/database.js';
import { contextOf, requireRole } from '../middleware/authenticate.js';
import { ACTOR_TYPES, AUDIT_ACTIONS, listAuditLogs, type AuditLogEntry } from '../models/audit.model.js';
import { AUTH_ERRORS, errors, uuid, pageQuery } from './schemas.js';

const instant = (what: string) =>
  z.iso
    .datetime({ offset: true, message: `${what} must be an ISO 8601 date-time, e.g. 2026-01-31T12:00:00Z` })
    .transform((s) => new Date(s));

const ListQuery = z.strictObject({
  ...pageQuery(50),
  action: z.enum(AUDIT_ACTIONS, { message: `must be one of ${AUDIT_ACTIONS.join(', ')}` }).optional(),
  actorType: z.enum(ACTOR_TYPES, { message: `must be one of ${ACTOR_TYPES.join(', ')}` }).optional(),
  actorId: uuid('actorId').optional(),
  since: instant('since').optional().describe('Entries at or after this instant'),
  until: instant('until').optional().describe('Entries before this instant'),
});

const AuditLogSchema = z
  .object({
    id: z.string(),
    seq: z.number().int().describe("Position in the org's hash chain: 1, 2, 3, …"),
    occurredAt: z.string(),
    actor: z.object({
      type: z.enum(ACTOR_TYPES),
      id: z.string().nullable().describe('null for the system'),
      email: z.string().nullable(),
    }),
    action: z.string(),
    target: z.object({ type: z.string(), id: z.string() }).nullable(),
    requestId: z.string().nullable(),
    ip: z.string().nullable(),
    userAgent: z.string().nullable(),
    metadata: z.record(z.string(), z.unknown()),
    hash: z.string().describe("sha256 of the previous entry's hash and this entry's canonical form"),
  })
  .meta({ id: 'AuditLog' });

const AuditLogPageSchema = z.object({
  data: z.array(AuditLogSchema),
  nextCursor: z.string().nullable().describe('Pass as ?cursor= (with the same filters) for the next page; null on the last page'),
});

const toDto = (e: AuditLogEntry): z.infer<typeof AuditLogSchema> => ({
  id: e.id,
  seq: e.seq,
  occurredAt: e.occurredAt.toISOString(),
  actor: { type: e.actor.type, id: e.actor.id, email: e.actor.email },
  action: e.action,
  target: e.target,
  requestId: e.requestId,
  ip: e.ip,
  userAgent: e.userAgent,
  metadata: e.metadata,
  hash: e.hash,
});

/** GET /v1/audit-logs: who did what in your organization, newest first (admins, owners). */
export const auditRoutes: FastifyPluginAsyncZod<{ db: Database }> = async (app, { db }) => {
  app.get(
    '/audit-logs',
    {
      onRequest: requireRole('admin'),
      schema: {
        summary: "Your organization's audit log, newest first, filtered by action, actor and time (admins, owners)",
        tags: ['audit'],
        querystring: ListQuery,
        response: { 200: AuditLogPageSchema, ...errors(...AUTH_ERRORS) },
      },
    },
    async (request) => {
      const page = await listAuditLogs(db, contextOf(request).orgId, request.query);
      return { data: page.entries.map(toDto), nextCursor: page.nextCursor };
    },
  );
};
