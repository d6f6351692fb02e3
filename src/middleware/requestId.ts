import { randomFillSync } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import type { FastifyInstance } from 'fastify';

export const REQUEST_ID_HEADER = 'x-request-id';

// An incoming id is honoured (it ties our logs to a caller's or a proxy's) only when it is short
// and made of characters that cannot forge log lines or headers.
const SAFE_REQUEST_ID = /^[A-Za-z0-9._~:-]{1,128}$/;

/** Fastify's genReqId: the caller's well-formed x-request-id, else a new UUID. */
export function genReqId(req: IncomingMessage): string {
  const incoming = req.headers[REQUEST_ID_HEADER];
  return typeof incoming === 'string' && SAFE_REQUEST_ID.test(incoming) ? incoming : newRequestId();
}

// Random bytes drawn for 128 ids at a time, as crypto.randomUUID() draws them.
const POOL_IDS = 128;
const pool = Buffer.alloc(16 * POOL_IDS);
let poolAt = pool.length;
const text = Buffer.alloc(36);
const HEX = Buffer.from('0123456789abcdef', 'latin1');

/**
 * A random (version 4) UUID, the same as crypto.randomUUID() makes, read as one flat string.
 * randomUUID() returns 20 pieces joined, which V8 keeps as a tree of pieces until something needs
 * it whole; the id is a response header on every request, and Node checks each header's characters
 * with a regular expression that has to call into the runtime to flatten such a string first.
 * Written into a buffer and read back as latin1 instead: about half the cost in all.
 */
export function newRequestId(): string {
  if (poolAt === pool.length) {
    randomFillSync(pool);
    poolAt = 0;
  }
  let at = 0;
  for (let i = 0; i < 16; i++) {
    let byte = pool[poolAt + i]!;
    if (i === 6) byte = (byte & 0x0f) | 0x40; // version 4
    else if (i === 8) byte = (byte & 0x3f) | 0x80; // variant 10
    text[at++] = HEX[byte >> 4]!;
    text[at++] = HEX[byte & 0x0f]!;
    if (i === 3 || i === 5 || i === 7 || i === 9) text[at++] = 0x2d; // '-'
  }
  poolAt += 16;
  return text.toString('latin1', 0, 36);
}

/** Echoes the id on every response, errors and 404s included. */
export function registerRequestId(app: FastifyInstance): void {
  app.addHook('onRequest', (request, reply, done) => {
    void reply.header(REQUEST_ID_HEADER, request.id);
    done();
  });
}
