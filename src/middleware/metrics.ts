import type { FastifyInstance } from 'fastify';
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { Authenticator } from '../auth/index.js';
import type { RateLimiter } from '../ratelimit/index.js';

// Process metrics (CPU, memory, event loop lag, GC) describe the process, not one app instance:
// collected once per process into their own registry and merged into every scrape.
let processRegistry: Registry | undefined;
function getProcessRegistry(): Registry {
  if (!processRegistry) {
    processRegistry = new Registry();
    collectDefaultMetrics({ register: processRegistry });
  }
  return processRegistry;
}

export interface Metrics {
  /** The text exposition of every metric, for GET /metrics. */
  scrape(): Promise<{ contentType: string; body: string }>;
}

/**
 * Times every request into a histogram labelled by method, route pattern (never the raw URL,
 * whose ids would explode the series count) and status code.
 */
export function registerMetrics(app: FastifyInstance, limiter: RateLimiter, auth: Authenticator): Metrics {
  const registry = new Registry();
  const duration = new Histogram({
    name: 'http_request_duration_seconds',
    help: 'Duration of HTTP requests in seconds',
    labelNames: ['method', 'route', 'status_code'] as const,
    buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [registry],
  });
  // Read from the limiter at scrape time: nothing is added to the request path.
  new Gauge({
    name: 'rate_limiter_degraded',
    help: '1 while Redis is unreachable and this instance limits in memory',
    registers: [registry],
    collect() {
      this.set(limiter.mode === 'degraded' ? 1 : 0);
    },
  });
  new Counter({
    name: 'rate_limit_decisions_total',
    help: 'Org rate limit decisions since start, by result and the limit that refused',
    labelNames: ['result', 'reason'] as const,
    registers: [registry],
    collect() {
      this.reset();
      this.inc({ result: 'allowed', reason: 'none' }, limiter.stats.allowed);
      for (const [reason, n] of Object.entries(limiter.stats.refused)) this.inc({ result: 'refused', reason }, n);
    },
  });
  new Counter({
    name: 'rate_limit_lease_events_total',
    help: 'Leases since start: granted, given back, and requests admitted from one without a backend call',
    labelNames: ['event'] as const,
    registers: [registry],
    collect() {
      const s = limiter.leaseStats;
      this.reset();
      this.inc({ event: 'granted' }, s.granted);
      this.inc({ event: 'given_back' }, s.refunded);
      this.inc({ event: 'admitted' }, s.admitted);
    },
  });
  new Gauge({
    name: 'rate_limit_leases',
    help: 'Leases this instance holds (callers far from their limits, admitted locally)',
    registers: [registry],
    collect() {
      this.set(limiter.leaseStats.held);
    },
  });
  new Counter({
    name: 'auth_cache_lookups_total',
    help: 'Caller lookups since start: hit, negative_hit (a cached refusal), coalesced (joined a query in flight), query',
    labelNames: ['result'] as const,
    registers: [registry],
    collect() {
      const s = auth.stats();
      this.reset();
      this.inc({ result: 'hit' }, s.hits);
      this.inc({ result: 'negative_hit' }, s.negativeHits);
      this.inc({ result: 'coalesced' }, s.coalesced);
      this.inc({ result: 'query' }, s.loads);
    },
  });
  new Gauge({
    name: 'auth_cache_entries',
    help: 'Callers held in the auth cache, by kind',
    labelNames: ['kind'] as const,
    registers: [registry],
    collect() {
      const s = auth.stats();
      this.set({ kind: 'positive' }, s.size);
      this.set({ kind: 'negative' }, s.negativeSize);
    },
  });
  new Gauge({
    name: 'auth_cache_invalidation_connected',
    help: '1 while this instance hears of changes made elsewhere; 0 while cached callers only expire by TTL',
    registers: [registry],
    collect() {
      this.set(auth.invalidationConnected ? 1 : 0);
    },
  });
  app.addHook('onResponse', (request, reply, done) => {
    duration.observe(
      { method: request.method, route: request.routeOptions.url ?? 'unmatched', status_code: reply.statusCode },
      reply.elapsedTime / 1000,
    );
    done();
  });
  return {
    async scrape() {
      const merged = Registry.merge([getProcessRegistry(), registry]);
      return { contentType: merged.contentType, body: await merged.metrics() };
    },
  };
}
