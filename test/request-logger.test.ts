import pino, { type Logger } from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import type { FastifyInstance } from 'fastify';
import { buildApp } from '../src/app.js';
import { loggerOptions } from '../src/infra/logger.js';
import { createRateLimiter } from '../src/ratelimit/index.js';
import { createTenant, testConfig } from './helpers/app.js';
import { getTestDb, silentLogger } from './helpers/db.js';

/**
 * request.log is made only when a request logs something (src/infra/logger.ts): a request that
 * logs nothing costs no pino child, and every line that is written still carries its request id.
 */

const apps: FastifyInstance[] = [];
afterEach(async () => {
  await Promise.all(apps.splice(0).map((a) => a.close()));
});

/** A JSON logger into `lines`, counting the children made of it. */
function countingLogger(level: string): { logger: Logger; lines: string[]; children: () => number } {
  const lines: string[] = [];
  const logger = pino({ ...loggerOptions({ logLevel: 'info', logFormat: 'json' }), level }, { write: (l: string) => void lines.push(l) });
  let made = 0;
  const child = logger.child.bind(logger);
  logger.child = ((...args: Parameters<Logger['child']>) => {
    made++;
    return child(...args);
  }) as Logger['child'];
  return { logger, lines, children: () => made };
}

async function appWith(logger: Logger, env: Record<string, string>): Promise<FastifyInstance> {
  const config = testConfig(env);
  const limiter = createRateLimiter(config, await getTestDb(), silentLogger);
  await limiter.ready(5_000);
  const app = await buildApp({ config, db: await getTestDb(), limiter: limiter.limiter, logger });
  app.addHook('onClose', () => limiter.close());
  await app.ready();
  apps.push(app);
  return app;
}

describe('the request logger', () => {
  it('is not made for requests that log nothing', async () => {
    const { logger, children } = countingLogger('warn');
    const app = await appWith(logger, { ACCESS_LOG: 'false', LOG_LEVEL: 'warn' });
    const t = await createTenant();
    const before = children();
    for (let i = 0; i < 20; i++) {
      expect((await app.inject({ method: 'GET', url: '/v1/me', headers: t.member.headers })).statusCode).toBe(200);
      expect((await app.inject({ method: 'GET', url: '/health' })).statusCode).toBe(200);
    }
    expect(children()).toBe(before);
  });

  it('writes every line of a request with its request id, at the levels that are on', async () => {
    const { logger, lines, children } = countingLogger('debug');
    const app = await appWith(logger, { ACCESS_LOG: 'true', LOG_LEVEL: 'debug' });
    const t = await createTenant();
    const before = children();
    const res = await app.inject({ method: 'GET', url: '/v1/me', headers: t.member.headers });
    expect(res.statusCode).toBe(200);
    const id = res.headers['x-request-id'] as string;
    const mine = lines.map((l) => JSON.parse(l) as { requestId?: string; msg: string; level: number }).filter((l) => l.requestId === id);
    // The debug line of the authentication and the access log line, both bound to the request.
    expect(mine.map((l) => l.msg)).toEqual(expect.arrayContaining(['Request authenticated', 'request completed']));
    expect(children()).toBe(before + 1);
  });
});
