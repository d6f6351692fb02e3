import type { Logger } from 'pino';
import type { Database } from '../infra/database.js';
import { addUsage, findUsage, type UsageBatch } from '../models/usage.model.js';

/**
 * Admitted usage, batched into PostgreSQL: one statement per interval (at most 5 s) instead of a
 * write per request. If PostgreSQL is down the counts are kept and retried, so nothing is lost
 * while the process lives; shutdown flushes what is left.
 */
/**
 * One org's admitted requests of one day, not yet written. A caller on the hot path may keep it
 * and add to `requests` directly while `isCurrent` says so: no key string and no lookup per
 * request. A tally outlives the batches: a write takes its count and leaves the object in place,
 * so an org that keeps sending requests allocates nothing here between writes (with 10,000 orgs,
 * a new object per org per batch was most of what the old generation took in).
 */
export interface UsageTally {
  readonly orgId: string;
  /** 'YYYY-MM-DD' (UTC). */
  readonly day: string;
  /** 'YYYY-MM' (UTC), the day's month. */
  readonly month: string;
  /** Admitted and not yet in a write. */
  requests: number;
  /** In the write under way. */
  writing: number;
  /** Forgotten (idle through a whole interval, or dropped from a full table): fetch a new one. */
  dropped: boolean;
}

export class UsageRecorder {
  private readonly tallies = new Map<string, UsageTally>();
  private inFlight: Promise<void> | null = null;
  private timer: NodeJS.Timeout | null = null;
  private failing = false;

  constructor(
    private readonly db: Database,
    private readonly logger: Logger,
    private readonly intervalMs: number,
    /** Beyond this many org-days kept, the oldest are dropped (and logged): memory stays bounded. */
    private readonly maxPending = 100_000,
  ) {}

  start(): void {
    this.timer ??= setInterval(() => void this.flush(), this.intervalMs);
    this.timer.unref();
  }

  record(orgId: string, day: string, month: string, requests: number): void {
    this.tally(orgId, day, month).requests += requests;
  }

  /** The running count of `orgId`'s requests on `day`, made if needed. */
  tally(orgId: string, day: string, month: string): UsageTally {
    const key = `${orgId}|${day}`;
    const cur = this.tallies.get(key);
    if (cur) return cur;
    if (this.tallies.size >= this.maxPending) {
      const oldest = this.tallies.keys().next().value;
      if (oldest !== undefined) {
        this.tallies.get(oldest)!.dropped = true;
        this.tallies.delete(oldest);
      }
      this.logger.error({ maxPending: this.maxPending }, 'Usage batch full: dropping the oldest entry');
    }
    const created: UsageTally = { orgId, day, month, requests: 0, writing: 0, dropped: false };
    this.tallies.set(key, created);
    return created;
  }

  /** Whether adding to `t` still counts. */
  isCurrent(t: UsageTally): boolean {
    return !t.dropped;
  }

  /** What this process admitted and has not written yet, for one org and period. */
  unflushed(orgId: string, day: string, month: string): { day: number; month: number } {
    let dayCount = 0;
    let monthCount = 0;
    for (const t of this.tallies.values()) {
      if (t.orgId !== orgId || t.month !== month) continue;
      const n = t.requests + t.writing;
      monthCount += n;
      if (t.day === day) dayCount += n;
    }
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

  async flush(): Promise<void> {
    if (this.inFlight) return this.inFlight;
    if (this.tallies.size === 0) return;
    this.inFlight = (async () => {
      // Let reads in progress finish first (new ones wait for this write).
      while (this.readers > 0) await new Promise<void>((r) => (this.readersDrained = r));
      this.readersDrained = null;
      const batch: UsageBatch = { orgIds: [], days: [], requests: [] };
      for (const [key, t] of this.tallies) {
        if (t.requests === 0) {
          // Nothing since the last write (and none under way: only this write runs): an idle org,
          // or a day that is over, is forgotten; whoever holds the tally fetches a new one.
          this.tallies.delete(key);
          t.dropped = true;
          continue;
        }
        batch.orgIds.push(t.orgId);
        batch.days.push(t.day);
        batch.requests.push(t.requests);
        t.writing = t.requests;
        t.requests = 0;
      }
      if (batch.orgIds.length === 0) return;
      let written = false;
      try {
        await addUsage(this.db, batch);
        written = true;
        if (this.failing) this.logger.info('Usage is being written to the database again');
        this.failing = false;
      } catch (err) {
        if (!this.failing) this.logger.error({ err }, 'Cannot write usage to the database; keeping it to retry');
        this.failing = true;
      } finally {
        // A failed write's counts are put back, to go with the next one together with what was
        // added meanwhile. (A tally dropped from a full table meanwhile is gone, counts and all.)
        for (const t of this.tallies.values()) {
          if (!written) t.requests += t.writing;
          t.writing = 0;
        }
      }
    })().finally(() => {
      this.inFlight = null;
    });
    return this.inFlight;
  }

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    await this.inFlight;
    await this.flush();
  }
}
