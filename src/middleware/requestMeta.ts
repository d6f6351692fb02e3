import type { FastifyRequest } from 'fastify';
import type { RequestMeta } from '../types/context.js';

/** The request's id, client address and user agent, for the models' audit rows. */
export function requestMetaOf(request: FastifyRequest): RequestMeta {
  const ua = request.headers['user-agent'];
  return { requestId: request.id, ip: request.ip || null, userAgent: typeof ua === 'string' && ua.length > 0 ? ua : null };
}
