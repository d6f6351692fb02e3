import { Writable } from 'node:stream';
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import { buildApp } from '../src/app.js';
import { createRateLimiter } from '../src/ratelimit/index.js';
import { testConfig } from './helpers/app.js';
import { openTestDatabase } from './helpers/db.js';

describe('a database outage in the log', () => {
  it('is one line per interval, not one line per request', async () => {
    const lines: { msg?: string; suppressed?: number }[] = [];
    const logger = pino(
      { level: 'warn' },
      new Writable({
        write(chunk: Buffer, _enc, cb) {
          lines.push(JSON.parse(chunk.toString()) as { msg?: string });
          cb();
        },
      }),
    );
    const db = await openTestDatabase();
    const config = testConfig();
    const limiter = createRateLimiter(config, db, logger);
    const app = await buildApp({ config, db, limiter: limiter.limiter, logger });
    await db.close(); // every query now fails as "unavailable"
    try {
      const headers = { 'x-org-id': '00000000-0000-0000-0000-000000000001', 'x-user-id': '00000000-0000-0000-0001-000000000001' };
      const codes: number[] = [];
      for (let i = 0; i < 20; i++) codes.push((await app.inject({ method: 'GET', url: '/v1/me', headers })).statusCode);
      expect(codes.every((c) => c === 503)).toBe(true);
      const outage = lines.filter((l) => l.msg === 'Database unavailable');
      // One line per 10 s interval (this file's modules are its own, so the interval starts here).
      expect(outage).toHaveLength(1);
      expect(outage[0]!.suppressed).toBe(0);
    } finally {
      await app.close();
      await limiter.close().catch(() => undefined);
    }
  });
});
