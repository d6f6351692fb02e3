import { ServerResponse, type IncomingMessage, type OutgoingHttpHeader, type OutgoingHttpHeaders } from 'node:http';
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import { jsonSchemaTransform, jsonSchemaTransformObject, validatorCompiler, type ZodTypeProvider } from 'fastify-type-provider-zod';
import { createAuthenticator } from './auth/index.js';
import { createBearerMethods } from './auth/methods.js';
import type { Config } from './config/env.js';
import type { Database } from './infra/database.js';
import { loggerOptions } from './infra/logger.js';
import { registerRefusalAudit } from './middleware/auditRefusals.js';
import { registerErrorHandling, sendError, toAppError } from './middleware/errorHandler.js';
import { registerAuthentication, requireContext } from './middleware/authenticate.js';
import { registerMetrics } from './middleware/metrics.js';
import { genReqId, registerRequestId, REQUEST_ID_HEADER } from './middleware/requestId.js';
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

type Headers = OutgoingHttpHeaders | OutgoingHttpHeader[];

/**
 * While the app is closing, every response that starts is sent with `connection: close`, so
 * keep-alive clients (load balancers, fetch) close their connection instead of keeping it idle:
 * an idle kept-alive socket would otherwise hold app.close() open until the shutdown timeout.
 * Fastify writes a response's headers with writeHead(status, headers): the header joins that
 * object, as reply.header() would have added it; any other call (Node's implicit header of a
 * streamed body) gets it through setHeader.
 */
function closingAwareResponse(shutdown: { readonly closing: boolean }): typeof ServerResponse {
  return class ClosingAwareResponse<Request extends IncomingMessage = IncomingMessage> extends ServerResponse<Request> {
    override writeHead(statusCode: number, messageOrHeaders?: string | Headers, headers?: Headers): this {
      if (shutdown.closing) {
        const obj = typeof messageOrHeaders === 'string' ? headers : messageOrHeaders;
        if (typeof obj === 'object' && !Array.isArray(obj)) obj.connection = 'close';
        else this.setHeader('connection', 'close');
      }
      return typeof messageOrHeaders === 'string' ? super.writeHead(statusCode, messageOrHeaders, headers) : super.writeHead(statusCode, messageOrHeaders);
    }
  };
}

export interface AppDeps {
  config: Config;
  db: Database;
  limiter: RateLimiter;
  /** The process logger; when absent the app makes its own from the config. */
  logger?: FastifyBaseLogger;
}

/**
 * Builds the HTTP application: hooks in the order every request meets them (request id, metrics,
 * auth), then routes. Never listens: src/server.ts does, and tests use app.inject().
 */
export async function buildApp({ config, db, limiter, logger }: AppDeps): Promise<FastifyInstance> {
  const shutdown = { closing: false };
  const app = Fastify({
    // Node's documented hook for extending its responses (http.createServer's ServerResponse
    // option): the connection header is added while the response's headers are written, at no
    // cost while not closing. An onSend hook did the same on every request (a hook on the
    // request path costs even when it does nothing).
    http: { ServerResponse: closingAwareResponse(shutdown) },
    ...(logger ? { loggerInstance: logger } : { logger: loggerOptions(config) }),
    genReqId,
    requestIdHeader: false,
    // One access-log line per request (the onResponse hook below), not Fastify's two.
    logController: new LogController({ requestIdLogLabel: 'requestId', disableRequestLogging: true }),
    trustProxy: config.trustProxy,
    bodyLimit: config.bodyLimitBytes,
    return503OnClosing: true,
    // Long ids reach the params schema and get its 400, instead of the router's bare 414.
    routerOptions: { maxParamLength: 16_384 },
    // Malformed URLs and the like fail before any hook runs: same body shape, same header.
    frameworkErrors: (err, request, reply) => {
      void reply.header(REQUEST_ID_HEADER, request.id);
      void sendError(request, reply, toAppError(err, request));
    },
  }).withTypeProvider<ZodTypeProvider>();

  // JSON only: a text/plain body is a 415, not a string handed to the body schema.
  app.removeContentTypeParser('text/plain');

  // While shutting down, ask keep-alive clients to close (see ClosingAwareResponse).
  app.addHook('preClose', (done) => {
    shutdown.closing = true;
    done();
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
  const metrics = registerMetrics(app, limiter, auth);
  if (config.accessLog) {
    app.addHook('onResponse', (request, reply, done) => {
      request.log.info(
        { method: request.method, url: redactKeys(request.url), statusCode: reply.statusCode, ms: Math.round(reply.elapsedTime * 10) / 10 },
        'request completed',
      );
      done();
    });
  }
  registerIpLimit(app, limiter, config);
  const bearer = await createBearerMethods({ config, db, auth, log, limiter });
  app.decorate('bearerMethods', bearer);
  app.addHook('onClose', () => bearer.close());
  registerAuthentication(app, auth, config.auth, bearer.methods);
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

  return app;
}
