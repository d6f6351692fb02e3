import type { Logger } from 'pino';
import type { Database } from '../infra/database.js';
import { addUsage, findUsage, type UsageDelta } from '../models/usage.model.js';

/**
 * Admitted usage, batched into PostgreSQL: one statement per interval (at most 5 s) instead of a
 * write per request. If PostgreSQL is down the batch is kept and retried, so nothing is lost
 * while the process lives; shutdown flushes what is left.
 */
export class UsageRecorder {
  private pending = new Map<string, UsageDelta>();
  private inFlight: Promise<void> | null = null;
  private timer: NodeJS.Timeout | null = null;
  private failing = false;

  constructor(
    private readonly db: Database,
    private readonly logger: Logger,
    private readonly intervalMs: number,
    /** Beyond this many org-periods waiting, the oldest are dropped (and logged): memory stays bounded. */
    private readonly maxPending = 100_000,
  ) {}

  start(): void {
    this.timer ??= setInterval(() => void this.flush(), this.intervalMs);
    this.timer.unref();
  }

  record(orgId: string, day: string, month: string, requests: number): void {
    const key = `${orgId}|${day}`;
    const cur = this.pending.get(key);
    if (cur) {
      cur.requests += requests;
      return;
    }
    if (this.pending.size >= this.maxPending) {
      const oldest = this.pending.keys().next().value;
      if (oldest !== undefined) this.pending.delete(oldest);
      this.logger.error({ maxPending: this.maxPending }, 'Usage batch full: dropping the oldest entry');
    }
    this.pending.set(key, { orgId, day, month, requests });
  }

  /** What this process admitted and has not written yet, for one org and period. */
  unflushed(orgId: string, day: string, month: string): { day: number; month: number } {
    let dayCount = 0;
    let monthCount = 0;
    const add = (m: Map<string, UsageDelta>) => {
      for (const d of m.values()) {
        if (d.orgId !== orgId || d.month !== month) continue;
        monthCount += d.requests;
        if (d.day === day) dayCount += d.requests;
      }
    };
    add(this.pending);
    if (this.flushing) add(this.flushing);
    return { day: dayCount, month: monthCount };
  }

  /** Durable usage plus this process's unflushed part: where a lost counter restarts from. */
  async load(orgId: string, day: string, month: string): Promise<{ day: number; month: number }> {
    // Never read while a batch is being written: the table may or may not include it yet.
    while (this.inFlight) await this.inFlight;
    this.readers++;
    try {
      const stored = await findUsage(this.db, orgId, day, month);
      const local = this.unflushed(orgId, day, month);
      return { day: stored.day + local.day, month: stored.month + local.month };
    } finally {
      if (--this.readers === 0) this.readersDrained?.();
    }
  }

  private readers = 0;
  private readersDrained: (() => void) | null = null;

  private flushing: Map<string, UsageDelta> | null = null;

  async flush(): Promise<void> {
    if (this.inFlight) return this.inFlight;
    if (this.pending.size === 0) return;
    this.inFlight = (async () => {
      // Let reads in progress finish first (new ones wait for this write).
      while (this.readers > 0) await new Promise<void>((r) => (this.readersDrained = r));
      this.readersDrained = null;
      const batch = this.pending;
      this.pending = new Map();
      this.flushing = batch;
      try {
        await addUsage(this.db, [...batch.values()]);
        if (this.failing) this.logger.info('Usage is being written to the database again');
        this.failing = false;
      } catch (err) {
        // Put the batch back in front of anything newer, to retry on the next tick.
        for (const [k, d] of batch) {
          const newer = this.pending.get(k);
          if (newer) d.requests += newer.requests;
        }
        this.pending = new Map([...batch, ...[...this.pending].filter(([k]) => !batch.has(k))]);
        if (!this.failing) this.logger.error({ err }, 'Cannot write usage to the database; keeping it to retry');
        this.failing = true;
      } finally {
        this.flushing = null;
        this.inFlight = null;
      }
    })();
    return this.inFlight;
  }

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    await this.inFlight;
    await this.flush();
  }
}
