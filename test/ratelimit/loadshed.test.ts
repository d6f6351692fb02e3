import { afterAll, describe, expect, it } from 'vitest';
import type { FastifyInstance } from 'fastify';
import { buildTestApp } from '../helpers/app.js';

/** Holds the event loop the way a CPU-bound burst would. */
function blockEventLoop(ms: number): void {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    // busy
  }
}

describe('load shedding', () => {
  let app: FastifyInstance;
  afterAll(() => app.close());

  it('answers 503 with Retry-After in the common error shape while the event loop lags, and recovers', async () => {
    app = await buildTestApp({ env: { LOAD_SHED_MAX_EVENT_LOOP_DELAY_MS: '50' } });
    expect((await app.inject('/health')).statusCode).toBe(200);
    let shed: Awaited<ReturnType<FastifyInstance['inject']>> | undefined;
    for (let i = 0; i < 20 && !shed; i++) {
      blockEventLoop(300);
      // Let the sampler (a timer) measure the lag, then ask.
      await new Promise((r) => setTimeout(r, 20));
      const res = await app.inject('/health');
      if (res.statusCode === 503) shed = res;
    }
    expect(shed, 'the server never shed load').toBeDefined();
    expect(shed!.headers['retry-after']).toBe('1');
    expect(shed!.json()).toEqual({
      error: 'Service Unavailable',
      message: 'The server is overloaded, please retry',
      code: 'service_unavailable',
      requestId: shed!.headers['x-request-id'],
    });
    await expect
      .poll(async () => (await app.inject('/health')).statusCode, { timeout: 10_000, interval: 200 })
      .toBe(200);
  });
});
