import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { SessionAuth } from '../auth/sessions.js';
import { PASSWORD_INPUT_MAX_LENGTH, PASSWORD_MAX_LENGTH, PASSWORD_MIN_LENGTH } from '../auth/passwords.js';
import { contextOf } from '../middleware/authenticate.js';
import { AUTH_ERRORS, errors } from './schemas.js';

const passwordInput = z.string({ message: 'must be a string' }).max(PASSWORD_INPUT_MAX_LENGTH, `must be at most ${PASSWORD_INPUT_MAX_LENGTH} characters`);

const ChangePasswordBody = z.strictObject({
  currentPassword: passwordInput.min(1, 'must not be empty').optional().describe('Required when you have a password already'),
  newPassword: passwordInput.describe(
    `${PASSWORD_MIN_LENGTH}-${PASSWORD_MAX_LENGTH} characters, not a common password, not your email address`,
  ),
});

/** PUT /v1/me/password: the caller's own password (a tenant route). */
export const passwordRoutes: FastifyPluginAsyncZod<{ sessions: SessionAuth }> = async (app, { sessions }) => {
  app.put(
    '/me/password',
    {
      bodyLimit: 16 * 1024,
      schema: {
        summary: 'Set or change your password; your other sessions end',
        description:
          'With a password already: send currentPassword too (a wrong one is a 403; attempts are limited like sign-ins). ' +
          'Without one yet (you signed in another way): newPassword alone sets it. Every session of yours but the one ' +
          'making the request ends. API keys have no password (403).',
        tags: ['auth'],
        body: ChangePasswordBody,
        response: { 204: z.null().describe('Changed'), ...errors(...AUTH_ERRORS) },
      },
    },
    async (request, reply) => {
      await sessions.changePassword(contextOf(request), request.body, request);
      return reply.code(204).send(null);
    },
  );
};
