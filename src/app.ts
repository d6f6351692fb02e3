import { createServer } from 'node:http';
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import { jsonSchemaTransform, jsonSchemaTransformObject, validatorCompiler, type ZodTypeProvider } from 'fastify-type-provider-zod';
import { createAuthenticator } from './auth/index.js';
import { createBearerMethods } from './auth/methods.js';
import type { Config } from './config/env.js';
import type { Database } from './infra/database.js';
import { lazyChildLoggerFactory, loggerOptions } from './infra/logger.js';
import { registerRefusalAudit } from './middleware/auditRefusals.js';
import { registerErrorHandling, sendError, toAppError } from './middleware/errorHandler.js';
import { registerAuthentication, requireContext } from './middleware/authenticate.js';
import { registerMetrics } from './middleware/metrics.js';
import { genReqId, registerRequestId, REQUEST_ID_HEADER } from './middleware/requestId.js';
import { createRefusalGate, type RefusalGate } from './middleware/refusalGate.js';
import { apiKeyRoutes } from './routes/apiKeys.route.js';
import { auditRoutes } from './routes/audit.route.js';
import { authRoutes } from './routes/auth.route.js';
import { healthRoutes } from './routes/health.route.js';
import { meRoutes } from './routes/me.route.js';
import { passwordRoutes } from './routes/password.route.js';
import { userRoutes } from './routes/users.route.js';
import { usageRoutes } from './routes/usage.route.js';
import { serializerCompiler } from './routes/serializer.js';
import { registerIpLimit, registerOrgLimit, type RateLimiter } from './ratelimit/index.js';
import { AppError } from './errors.js';
import underPressure from '@fastify/under-pressure';
import './types/context.js';

// An API key a client put in a URL by mistake does not reach the access log either.
const KEY_IN_URL = /llmk_[0-9A-Za-z]*/g;
const redactKeys = (url: string): string => (url.includes('llmk_') ? url.replace(KEY_IN_URL, 'llmk_[redacted]') : url);

// Long ids reach the params schema and get its 400, instead of the router's bare 414.
const MAX_PARAM_LENGTH = 16_384;

export interface AppDeps {
  config: Config;
  db: Database;
  limiter: RateLimiter;
  /** The process logger; when absent the app makes its own from the config. */
  logger?: FastifyBaseLogger;
  /** The refusal gate (src/middleware/refusalGate.ts); on unless false (tests compare both paths). */
  refusalGate?: boolean;
}

/**
 * Builds the HTTP application: hooks in the order every request meets them (request id, metrics,
 * auth), then routes. Never listens: src/server.ts does, and tests use app.inject().
 */
export async function buildApp({ config, db, limiter, logger, refusalGate = true }: AppDeps): Promise<FastifyInstance> {
  // Set below, once the app's pieces exist; the server only takes requests after that.
  let gate: RefusalGate | null = null;
  let closing = false;
  const app = Fastify({
    // Fastify's server, with the refusal gate in front of its handler. The four settings are
    // what Fastify applies to a server it makes itself (lib/server.js).
    serverFactory: (handler, opts) => {
      const server = createServer((req, res) => {
        if (gate === null || closing || !gate(req, res)) handler(req, res);
      });
      server.keepAliveTimeout = opts.keepAliveTimeout as number;
      server.requestTimeout = opts.requestTimeout as number;
      server.setTimeout(opts.connectionTimeout as number);
      if ((opts.maxRequestsPerSocket as number) > 0) server.maxRequestsPerSocket = opts.maxRequestsPerSocket as number;
      return server;
    },
    ...(logger ? { loggerInstance: logger } : { logger: loggerOptions(config) }),
    genReqId,
    requestIdHeader: false,
    // request.log made only when a request logs something (src/infra/logger.ts).
    childLoggerFactory: lazyChildLoggerFactory,
    // One access-log line per request (the onResponse hook below), not Fastify's two.
    logController: new LogController({ requestIdLogLabel: 'requestId', disableRequestLogging: true }),
    trustProxy: config.trustProxy,
    bodyLimit: config.bodyLimitBytes,
    return503OnClosing: true,
    routerOptions: { maxParamLength: MAX_PARAM_LENGTH },
    // Malformed URLs and the like fail before any hook runs: same body shape, same header.
    frameworkErrors: (err, request, reply) => {
      void reply.header(REQUEST_ID_HEADER, request.id);
      void sendError(request, reply, toAppError(err, request));
    },
  }).withTypeProvider<ZodTypeProvider>();

  // JSON only: a text/plain body is a 415, not a string handed to the body schema.
  app.removeContentTypeParser('text/plain');

  // While shutting down, ask keep-alive clients to close: an idle kept-alive socket would
  // otherwise hold app.close() open until the shutdown timeout.
  app.addHook('preClose', (done) => {
    closing = true;
    done();
  });
  app.addHook('onSend', (_request, reply, payload, done) => {
    if (closing) void reply.header('connection', 'close');
    done(null, payload);
  });

  const log = app.log;
  const auth = createAuthenticator(config.authCache, db, log);
  app.decorate('authenticator', auth);
  app.addHook('onClose', () => auth.close());
  if (!(await auth.ready(2_000))) {
    log.warn('Auth cache invalidation channel not connected yet: changes made elsewhere wait for the TTL until it is');
  }

  app.setValidatorCompiler(validatorCompiler);
  app.setSerializerCompiler(serializerCompiler);

  registerRequestId(app);
  if (config.loadShedMaxEventLoopDelayMs > 0) {
    // Answer 503 at once while the event loop lags, rather than queueing work we cannot do.
    await app.register(underPressure, {
      maxEventLoopDelay: config.loadShedMaxEventLoopDelayMs,
      pressureHandler: (request, reply) => {
        void sendError(request, reply, new AppError('service_unavailable', 'The server is overloaded, please retry', undefined, 1));
      },
    });
  }
  const metrics = registerMetrics(app, limiter, auth, () => refusals?.answered() ?? 0);
  const accessLine = (method: string, url: string, statusCode: number, ms: number) => ({
    method,
    url: redactKeys(url),
    statusCode,
    ms: Math.round(ms * 10) / 10,
  });
  if (config.accessLog) {
    app.addHook('onResponse', (request, reply, done) => {
      request.log.info(accessLine(request.method, request.url, reply.statusCode, reply.elapsedTime), 'request completed');
      done();
    });
  }
  registerIpLimit(app, limiter, config);
  const bearer = await createBearerMethods({ config, db, auth, log, limiter });
  app.decorate('bearerMethods', bearer);
  app.addHook('onClose', () => bearer.close());
  const cachedCaller = registerAuthentication(app, auth, config.auth, bearer.methods);
  const refusals = refusalGate
    ? createRefusalGate({
        cachedCaller,
        limiter,
        defaults: config.rateLimit.defaults,
        observe: metrics.observe,
        trustProxy: config.trustProxy,
        ipLimit: config.rateLimit.ipPerMinute > 0,
        // The access log's line, with the request id a request's own logger would add.
        accessLog: config.accessLog
          ? (requestId, method, url, statusCode, ms) => log.info({ requestId, ...accessLine(method, url, statusCode, ms) }, 'request completed')
          : null,
        maxParamLength: MAX_PARAM_LENGTH,
      })
    : null;
  registerRefusalAudit(app, db, config.auditRefusalsPerMinute);
  registerErrorHandling(app);

  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: {
        title: 'llm-app',
        version: '0.1.0',
        description:
          'Multi-tenant backend for LLM applications. Tenant routes (/v1) need a credential: ' +
          '`Authorization: Bearer <token>` with an API key (llmk_...), an access token from /v1/auth/login, or a token ' +
          'of the configured OpenID Connect provider; or, where enabled (development), the x-org-id and x-user-id headers.',
      },
      components: {
        securitySchemes: {
          bearer: { type: 'http', scheme: 'bearer', description: 'An API key (llmk_...), an access token, or an OIDC token' },
          orgId: { type: 'apiKey', in: 'header', name: 'x-org-id' },
          userId: { type: 'apiKey', in: 'header', name: 'x-user-id' },
        },
      },
    },
    transform: jsonSchemaTransform,
    transformObject: jsonSchemaTransformObject,
  });
  await app.register(swaggerUi, { routePrefix: '/docs' });

  await app.register(healthRoutes, { config, db, limiter, auth, identityProvider: () => bearer.identityProvider() });
  app.get('/metrics', { schema: { hide: true } }, async (_request, reply) => {
    const { contentType, body } = await metrics.scrape();
    return reply.type(contentType).send(body);
  });
  app.get('/openapi.json', { schema: { hide: true } }, async () => app.swagger());

  await app.register(
    async (v1) => {
      // Routes that take credentials instead of requiring them (sign-in) go here, outside the
      // tenant scope below.
      if (bearer.sessions) await v1.register(authRoutes, { sessions: bearer.sessions });
      await v1.register(async (tenant) => {
        // Every tenant route is one the refusal gate may answer for.
        if (refusals) tenant.addHook('onRoute', (route) => refusals.routes.add(route.method, route.url));
        tenant.addHook('onRequest', requireContext);
        registerOrgLimit(tenant, limiter, config);
        await tenant.register(meRoutes, { db });
        await tenant.register(userRoutes, { db, auth });
        await tenant.register(usageRoutes, { config, limiter });
        await tenant.register(auditRoutes, { db });
        await tenant.register(apiKeyRoutes, { db, auth });
        if (bearer.sessions) await tenant.register(passwordRoutes, { sessions: bearer.sessions });
      });
    },
    { prefix: '/v1' },
  );

  gate = refusals?.gate ?? null;
  return app;
}
