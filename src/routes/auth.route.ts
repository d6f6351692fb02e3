import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { SessionAuth } from '../auth/sessions.js';
import { PASSWORD_INPUT_MAX_LENGTH } from '../auth/passwords.js';
import { email, errors } from './schemas.js';

/**
 * Sign-in with a password, and the session it starts (src/auth/sessions.ts). Public routes: they
 * take a credential in the body instead of requiring one, so they sit outside the tenant scope,
 * and an Authorization header sent along (an expired access token) is not looked at.
 */

const refreshToken = z
  .string({ message: 'must be a string' })
  .min(1, 'must not be empty')
  .max(256, 'must be at most 256 characters')
  .describe('The refresh token (llmr_...) of the last sign-in or refresh');

const LoginBody = z.strictObject({
  orgSlug: z
    .string({ message: 'must be a string' })
    .trim()
    .toLowerCase()
    .min(1, 'must not be empty')
    .max(100, 'must be at most 100 characters')
    .describe("The organization's slug, e.g. acme-corp"),
  email,
  password: z
    .string({ message: 'must be a string' })
    .min(1, 'must not be empty')
    .max(PASSWORD_INPUT_MAX_LENGTH, `must be at most ${PASSWORD_INPUT_MAX_LENGTH} characters`),
});

const RefreshBody = z.strictObject({ refreshToken });

const TokenPairSchema = z
  .object({
    accessToken: z.string().describe('A JWT for `Authorization: Bearer <accessToken>`'),
    refreshToken: z.string().describe('Exchange it at POST /v1/auth/refresh for a new pair; usable once'),
    tokenType: z.literal('Bearer'),
    expiresIn: z.number().int().describe('Seconds the access token is valid'),
  })
  .meta({ id: 'TokenPair' });

// Small bodies only: a credential and an email fit in far less.
const BODY_LIMIT_BYTES = 16 * 1024;

export const authRoutes: FastifyPluginAsyncZod<{ sessions: SessionAuth }> = async (app, { sessions }) => {
  // Token responses must not be stored by any cache on the way (RFC 6749, 5.1).
  app.addHook('onSend', (_request, reply, payload, done) => {
    void reply.header('cache-control', 'no-store');
    done(null, payload);
  });

  app.post(
    '/auth/login',
    {
      bodyLimit: BODY_LIMIT_BYTES,
      config: { credentialInBody: true },
      schema: {
        summary: 'Sign in with a password: an access token (15 min) and a refresh token (30 days)',
        description:
          'Wrong organization, unknown email, wrong password and a user without a password all answer the same 401. ' +
          'Attempts are limited per account and per client address (429 with Retry-After).',
        tags: ['auth'],
        security: [],
        body: LoginBody,
        response: { 200: TokenPairSchema, ...errors(400, 401, 429, 503) },
      },
    },
    async (request) => sessions.login(request.body, request),
  );

  app.post(
    '/auth/refresh',
    {
      bodyLimit: BODY_LIMIT_BYTES,
      config: { credentialInBody: true },
      schema: {
        summary: 'Exchange a refresh token for a new access token and refresh token',
        description:
          'The refresh token presented is used up. Presenting a refresh token that was already exchanged ends the whole session ' +
          '(every refresh token and access token of it) and answers 401.',
        tags: ['auth'],
        security: [],
        body: RefreshBody,
        response: { 200: TokenPairSchema, ...errors(400, 401, 503) },
      },
    },
    async (request) => sessions.refresh(request.body.refreshToken, request),
  );

  app.post(
    '/auth/logout',
    {
      bodyLimit: BODY_LIMIT_BYTES,
      config: { credentialInBody: true },
      schema: {
        summary: 'Sign out: end the session of a refresh token',
        description:
          'Ends the session the refresh token belongs to (any of its tokens, even one already exchanged): its refresh tokens ' +
          'and access tokens stop working on every instance within a second. Signing out of an ended session is a 204 too.',
        tags: ['auth'],
        security: [],
        body: RefreshBody,
        response: { 204: z.null().describe('The session has ended'), ...errors(400, 401, 503) },
      },
    },
    async (request, reply) => {
      await sessions.logout(request.body.refreshToken, request);
      return reply.code(204).send(null);
    },
  );
};
