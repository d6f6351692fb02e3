import type { Logger } from 'pino';
import type { Database } from '../infra/database.js';
import { addUsage, findUsage, type UsageDelta } from '../models/usage.model.js';

/**
 * Admitted usage, batched into PostgreSQL: one statement per interval (at most 5 s) instead of a
 * write per request. If PostgreSQL is down the batch is kept and retried, so nothing is lost
 * while the process lives; shutdown flushes what is left.
 */
/**
 * One org's admitted requests of one day, in the batch being gathered. A caller on the hot path
 * may keep it and add to `requests` directly while `isCurrent` says so: no key string and no
 * lookup per request.
 */
export interface UsageTally extends UsageDelta {
  /** The batch it belongs to; -1 once dropped. */
  batch: number;
}

export class UsageRecorder {
  private pending = new Map<string, UsageTally>();
  /** Numbers the batches: a tally of an earlier one is no longer counted. */
  private batch = 0;
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
    this.tally(orgId, day, month).requests += requests;
  }

  /** The running count of `orgId`'s requests on `day` in this batch, made if needed. */
  tally(orgId: string, day: string, month: string): UsageTally {
    const key = `${orgId}|${day}`;
    const cur = this.pending.get(key);
    if (cur) return cur;
    if (this.pending.size >= this.maxPending) {
      const oldest = this.pending.keys().next().value;
      if (oldest !== undefined) {
        this.pending.get(oldest)!.batch = -1;
        this.pending.delete(oldest);
      }
      this.logger.error({ maxPending: this.maxPending }, 'Usage batch full: dropping the oldest entry');
    }
    const created: UsageTally = { orgId, day, month, requests: 0, batch: this.batch };
    this.pending.set(key, created);
    return created;
  }

  /** Whether adding to `t` still counts (it belongs to the batch being gathered). */
  isCurrent(t: UsageTally): boolean {
    return t.batch === this.batch;
  }

  /** What this process admitted and has not written yet, for one org and period. */
  unflushed(orgId: string, day: string, month: string): { day: number; month: number } {
    let dayCount = 0;
    let monthCount = 0;
    const add = (m: Map<string, UsageTally>) => {
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

  private flushing: Map<string, UsageTally> | null = null;

  async flush(): Promise<void> {
    if (this.inFlight) return this.inFlight;
    if (this.pending.size === 0) return;
    this.inFlight = (async () => {
      // Let reads in progress finish first (new ones wait for this write).
      while (this.readers > 0) await new Promise<void>((r) => (this.readersDrained = r));
      this.readersDrained = null;
      const batch = this.pending;
      this.pending = new Map();
      this.batch++;
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
        // Every tally held elsewhere is now either merged or back from the failed batch: all
        // are renumbered, so holders fetch the one that counts.
        this.batch++;
        for (const d of this.pending.values()) d.batch = this.batch;
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
