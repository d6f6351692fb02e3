import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { notFound } from '../errors.js';
import type { Authenticator } from '../auth/index.js';
import type { Database } from '../infra/database.js';
import { contextOf, requireRole } from '../middleware/authenticate.js';
import { requestMetaOf } from '../middleware/requestMeta.js';
import {
  createUserInOrg,
  findUserInOrg,
  listUsersInOrg,
  softDeleteUserInOrg,
  updateUserInOrg,
} from '../models/user.model.js';
import { AUTH_ERRORS, email, errors, personName, role, toUserDto, UserSchema, uuid, pageQuery } from './schemas.js';

const UserParams = z.strictObject({ id: uuid('id') });

const ListQuery = z.strictObject({
  ...pageQuery(20),
});

const CreateUserBody = z.strictObject({
  email,
  name: personName.nullable().optional(),
  role: role.default('member'),
});

const UpdateUserBody = z
  .strictObject({
    name: personName.nullable().optional(),
    role: role.optional(),
  })
  .refine((b) => b.name !== undefined || b.role !== undefined, { message: 'must change at least one of name, role' });

const UserPageSchema = z.object({
  data: z.array(UserSchema),
  nextCursor: z.string().nullable().describe('Pass as ?cursor= for the next page; null on the last page'),
});

/**
 * Users of the caller's organization. The org always comes from the auth context, never from
 * the path or body; a user of another org is a 404, exactly like an id that does not exist.
 * A change to a user is forgotten by this instance's auth cache at once; other instances hear of
 * it through the database (migration 003).
 */
export const userRoutes: FastifyPluginAsyncZod<{ db: Database; auth: Pick<Authenticator, 'forgetUser'> }> = async (
  app,
  { db, auth },
) => {
  app.get(
    '/users',
    {
      schema: {
        summary: 'List users of your organization (creation order, cursor pagination)',
        tags: ['users'],
        querystring: ListQuery,
        response: { 200: UserPageSchema, ...errors(...AUTH_ERRORS) },
      },
    },
    async (request) => {
      const page = await listUsersInOrg(db, contextOf(request).orgId, request.query);
      return { data: page.users.map(toUserDto), nextCursor: page.nextCursor };
    },
  );

  app.get(
    '/users/:id',
    {
      schema: {
        summary: 'One user of your organization',
        tags: ['users'],
        params: UserParams,
        response: { 200: UserSchema, ...errors(...AUTH_ERRORS, 404) },
      },
    },
    async (request) => {
      const user = await findUserInOrg(db, contextOf(request).orgId, request.params.id);
      if (!user) throw notFound('User');
      return toUserDto(user);
    },
  );

  app.post(
    '/users',
    {
      onRequest: requireRole('admin'),
      schema: {
        summary: 'Create a user (admins: members and admins; owners: anyone)',
        tags: ['users'],
        body: CreateUserBody,
        response: { 201: UserSchema, ...errors(...AUTH_ERRORS, 409) },
      },
    },
    async (request, reply) => {
      const user = await createUserInOrg(db, contextOf(request), request.body, requestMetaOf(request));
      return reply.code(201).send(toUserDto(user));
    },
  );

  app.patch(
    '/users/:id',
    {
      onRequest: requireRole('admin'),
      schema: {
        summary: "Change a user's name or role (only owners touch owners; the last owner stays)",
        tags: ['users'],
        params: UserParams,
        body: UpdateUserBody,
        response: { 200: UserSchema, ...errors(...AUTH_ERRORS, 404, 409) },
      },
    },
    async (request) => {
      const user = await updateUserInOrg(db, contextOf(request), request.params.id, request.body, requestMetaOf(request));
      auth.forgetUser(user.id);
      return toUserDto(user);
    },
  );

  app.delete(
    '/users/:id',
    {
      onRequest: requireRole('admin'),
      schema: {
        summary: 'Delete (soft) a user (only owners delete owners; the last owner stays)',
        tags: ['users'],
        params: UserParams,
        response: { 204: z.null().describe('Deleted'), ...errors(...AUTH_ERRORS, 404, 409) },
      },
    },
    async (request, reply) => {
      await softDeleteUserInOrg(db, contextOf(request), request.params.id, requestMetaOf(request));
      auth.forgetUser(request.params.id);
      return reply.code(204).send(null);
    },
  );
};
