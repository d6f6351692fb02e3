import { randomUUID } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import type { FastifyInstance } from 'fastify';

export const REQUEST_ID_HEADER = 'x-request-id';

// An incoming id is honoured (it ties our logs to a caller's or a proxy's) only when it is short
// and made of characters that cannot forge log lines or headers.
const SAFE_REQUEST_ID = /^[A-Za-z0-9._~:-]{1,128}$/;

/** Fastify's genReqId: the caller's well-formed x-request-id, else a new UUID. */
export function genReqId(req: IncomingMessage): string {
  const incoming = req.headers[REQUEST_ID_HEADER];
  return typeof incoming === 'string' && SAFE_REQUEST_ID.test(incoming) ? incoming : randomUUID();
}

/** Echoes the id on every response, errors and 404s included. */
export function registerRequestId(app: FastifyInstance): void {
  app.addHook('onRequest', (request, reply, done) => {
    void reply.header(REQUEST_ID_HEADER, request.id);
    done();
  });
}
