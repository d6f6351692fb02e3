import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import type { Database } from '../infra/database.js';
import { contextOf } from '../middleware/authenticate.js';
import { notFound } from '../errors.js';
import { findOrgById } from '../models/org.model.js';
import { AUTH_ERRORS, errors, OrgSchema, toOrgDto, toUserDto, UserSchema } from './schemas.js';

/** The caller and the caller's organization. */
export const meRoutes: FastifyPluginAsyncZod<{ db: Database }> = async (app, { db }) => {
  app.get(
    '/me',
    {
      schema: {
        summary: 'The authenticated user',
        tags: ['users'],
        response: { 200: UserSchema, ...errors(...AUTH_ERRORS, 404) },
      },
    },
    // The caller as authentication found it (the auth cache, kept current across instances by
    // the database's notifications): no second query on the busiest route.
    async (request) => {
      contextOf(request);
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
