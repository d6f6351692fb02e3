import type { FastifyInstance } from 'fastify';
import { collectDefaultMetrics, Counter, Gauge, Registry, type Metric, type MetricValueWithName } from 'prom-client';
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

const DURATION_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10] as const;

type DurationLabels = { method: string; route: string; status_code: number };
interface Series {
  readonly labels: DurationLabels;
  /** Responses per bucket (not cumulative), the last one past the highest bound. */
  readonly counts: Float64Array;
  sum: number;
}

/**
 * http_request_duration_seconds, counted here rather than by prom-client's Histogram: its
 * observe() validates the labels and builds a string key from them on every call, 0.6–0.9 µs per
 * response. Here a label set is found through three Map lookups on the values themselves and
 * counted in an array. prom-client still writes the exposition: this object has the shape its
 * registry reads (name, help, type, get()), and get() answers in the shape a Histogram's does.
 */
class RequestDurations {
  readonly name = 'http_request_duration_seconds';
  readonly help = 'Duration of HTTP requests in seconds';
  readonly type = 'histogram';
  readonly aggregator = 'sum';
  /** route -> method -> status -> counts */
  private readonly series = new Map<string, Map<string, Map<number, Series>>>();

  constructor(private readonly bounds: readonly number[]) {}

  observe(method: string, route: string, status: number, seconds: number): void {
    let byMethod = this.series.get(route);
    if (byMethod === undefined) this.series.set(route, (byMethod = new Map<string, Map<number, Series>>()));
    let byStatus = byMethod.get(method);
    if (byStatus === undefined) byMethod.set(method, (byStatus = new Map<number, Series>()));
    let s = byStatus.get(status);
    if (s === undefined) {
      s = { labels: { method, route, status_code: status }, counts: new Float64Array(this.bounds.length + 1), sum: 0 };
      byStatus.set(status, s);
    }
    let i = 0;
    while (i < this.bounds.length && seconds > this.bounds[i]!) i++;
    s.counts[i]!++;
    s.sum += seconds;
  }

  get(): Promise<{ name: string; help: string; type: 'histogram'; aggregator: 'sum'; values: MetricValueWithName<string>[] }> {
    const values: MetricValueWithName<string>[] = [];
    const bucket = `${this.name}_bucket`;
    for (const byMethod of this.series.values()) {
      for (const byStatus of byMethod.values()) {
        for (const s of byStatus.values()) {
          let acc = 0;
          this.bounds.forEach((le, i) => {
            acc += s.counts[i]!;
            values.push({ metricName: bucket, labels: { le, ...s.labels }, value: acc });
          });
          const count = acc + s.counts[this.bounds.length]!;
          values.push({ metricName: bucket, labels: { le: '+Inf', ...s.labels }, value: count });
          values.push({ metricName: `${this.name}_sum`, labels: { ...s.labels }, value: s.sum });
          values.push({ metricName: `${this.name}_count`, labels: { ...s.labels }, value: count });
        }
      }
    }
    return Promise.resolve({ name: this.name, help: this.help, type: this.type, aggregator: this.aggregator, values });
  }

  reset(): void {
    this.series.clear();
  }
}

export interface Metrics {
  /** The text exposition of every metric, for GET /metrics. */
  scrape(): Promise<{ contentType: string; body: string }>;
  /** Counts one response in http_request_duration_seconds (for answers given outside Fastify's hooks). */
  observe: (method: string, route: string, status: number, seconds: number) => void;
}

/**
 * Times every request into a histogram labelled by method, route pattern (never the raw URL,
 * whose ids would explode the series count) and status code.
 */
export function registerMetrics(
  app: FastifyInstance,
  limiter: RateLimiter,
  auth: Authenticator,
  /** Refusals the refusal gate answered (read at scrape time; the gate is made after the metrics). */
  gateRefusals: () => number,
): Metrics {
  const registry = new Registry();
  const duration = new RequestDurations(DURATION_BUCKETS);
  registry.registerMetric(duration as unknown as Metric);
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
    help: 'Leases since start: granted, topped up in place, given back, and requests admitted from one without a backend call',
    labelNames: ['event'] as const,
    registers: [registry],
    collect() {
      const s = limiter.leaseStats;
      this.reset();
      this.inc({ event: 'granted' }, s.granted);
      this.inc({ event: 'renewed' }, s.renewed);
      this.inc({ event: 'given_back' }, s.refunded);
      this.inc({ event: 'admitted' }, s.admitted);
    },
  });
  new Counter({
    name: 'rate_limit_gate_refusals_total',
    help: 'Refusals answered before routing, from memory, by the refusal gate (also counted in rate_limit_decisions_total)',
    registers: [registry],
    collect() {
      this.reset();
      this.inc(gateRefusals());
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
    duration.observe(request.method, request.routeOptions.url ?? 'unmatched', reply.statusCode, reply.elapsedTime / 1000);
    done();
  });
  return {
    observe: (method, route, status, seconds) => duration.observe(method, route, status, seconds),
    async scrape() {
      const merged = Registry.merge([getProcessRegistry(), registry]);
      return { contentType: merged.contentType, body: await merged.metrics() };
    },
  };
}
