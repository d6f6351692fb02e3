import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { hasZodFastifySchemaValidationErrors } from 'fastify-type-provider-zod';
import { AppError, errorBody, type ErrorDetail } from '../errors.js';
import { DatabaseUnavailableError } from '../infra/database.js';

/**
 * One error handler and one body shape for every failure. 4xx messages say what to fix;
 * 5xx messages are generic, and the full error is logged under the request id.
 */

const DB_RETRY_AFTER_SECONDS = 5;

// During an outage every request fails the same way: one line per interval says so, with the
// number of requests answered 503 since the last line, instead of one line per request.
const OUTAGE_LOG_INTERVAL_MS = 10_000;
let lastOutageLogMs = 0;
let unloggedOutageRequests = 0;

function validationError(err: FastifyError): AppError {
  const where = err.validationContext ?? 'request';
  const details: ErrorDetail[] = (err.validation ?? []).map((v) => {
    const pathPart = v.instancePath.replace(/^\//, '').replace(/\//g, '.');
    return { field: pathPart ? `${where}.${pathPart}` : where, message: v.message ?? 'is invalid' };
  });
  const first = details[0];
  const message = first ? `${first.field}: ${first.message}` : 'Invalid request';
  return new AppError('validation_failed', message, details);
}

export function toAppError(err: unknown, request: FastifyRequest): AppError {
  if (err instanceof AppError) return err;
  if (err instanceof DatabaseUnavailableError) {
    const now = Date.now();
    if (now - lastOutageLogMs >= OUTAGE_LOG_INTERVAL_MS) {
      request.log.warn({ err: err.cause, suppressed: unloggedOutageRequests }, 'Database unavailable');
      lastOutageLogMs = now;
      unloggedOutageRequests = 0;
    } else {
      unloggedOutageRequests++;
    }
    return new AppError(
      'service_unavailable',
      'The service is temporarily unavailable, please retry',
      undefined,
      DB_RETRY_AFTER_SECONDS,
    );
  }
  const fe = err as FastifyError;
  if (hasZodFastifySchemaValidationErrors(fe) || Array.isArray(fe.validation)) return validationError(fe);
  // Fastify's own client errors (bad JSON, wrong content type, body too large) carry a status
  // and a message written for the client; anything else is ours and is not shown.
  const status = typeof fe.statusCode === 'number' ? fe.statusCode : 500;
  if (status === 413) return new AppError('payload_too_large', 'Request body is too large');
  if (status === 415) return new AppError('unsupported_media_type', fe.message || 'Unsupported media type');
  if (status >= 400 && status < 500) return new AppError('bad_request', fe.message || 'Bad request');
  request.log.error({ err }, 'Unhandled error');
  return new AppError('internal_error', 'Internal server error');
}

// A request id made of these characters needs no escaping in JSON (ours are UUIDs; one sent by a
// caller is kept only if it matches src/middleware/requestId.ts's stricter pattern).
const JSON_PLAIN_ID = /^[A-Za-z0-9._~:-]*$/;

/**
 * The JSON body of `err` for request `requestId` as one string: the error's cached prefix and the
 * id. Null when it has details or the id would need escaping (then JSON.stringify writes the
 * body). Exported for its test.
 */
export function plainErrorJson(err: AppError, requestId: string): string | null {
  if (err.details !== undefined || !JSON_PLAIN_ID.test(requestId)) return null;
  return withRequestId(err.bodyJsonPrefix(), requestId);
}

/** A plain error body from its prefix (AppError.bodyJsonPrefix) and a request id that needs no escaping. */
export const withRequestId = (prefix: string, requestId: string): string => `${prefix}${requestId}"}`;

/** The content type of every error body (also written by the refusal gate). */
export const JSON_TYPE = 'application/json; charset=utf-8';

export function sendError(request: FastifyRequest, reply: FastifyReply, err: AppError): FastifyReply {
  if (err.retryAfter !== undefined) void reply.header('retry-after', String(err.retryAfter));
  // RFC 6750: say which scheme is expected, and that a presented token was refused.
  if (err.statusCode === 401) {
    void reply.header('www-authenticate', request.headers.authorization === undefined ? 'Bearer realm="llm-app"' : 'Bearer realm="llm-app", error="invalid_token"');
  }
  // Serialised here, not by the route's response schema: an error (a 503 from the auth hook on
  // /health, say) must never be forced into the shape of that route's success body.
  void reply.code(err.statusCode).type(JSON_TYPE);
  // A string with a JSON content type is sent as it is.
  const json = plainErrorJson(err, request.id);
  return json !== null ? reply.send(json) : reply.serializer(JSON.stringify).send(errorBody(err, request.id));
}

export function registerErrorHandling(app: FastifyInstance): void {
  app.setErrorHandler((err, request, reply) => sendError(request, reply, toAppError(err, request)));
  app.setNotFoundHandler((request, reply) =>
    sendError(request, reply, new AppError('route_not_found', `Route ${request.method} ${(request.url.split('?')[0] ?? '').slice(0, 200)} not found`)),
  );
}
