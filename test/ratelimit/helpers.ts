import { randomUUID } from 'node:crypto';
import type { AcquireRequest, Decision, OrgLimits } from '../../src/ratelimit/types.js';

/** Every limit off. */
export const OFF: OrgLimits = {
  orgBurst: 0,
  orgPerSecond: 0,
  userBurst: 0,
  userPerSecond: 0,
  dailyCap: 0,
  monthlyCap: 0,
  maxConcurrent: 0,
};

/** An admission with nothing counted: what a backend answers when every limit is off. */
export const ALLOWED_OFF: Decision = {
  allowed: true,
  retryAfterSeconds: 0,
  needsSeed: false,
  org: { remaining: 0, resetSeconds: 0 },
  user: { remaining: 0, resetSeconds: 0 },
  dayUsed: 0,
  monthUsed: 0,
  concurrent: 0,
};

export function limits(partial: Partial<OrgLimits>): OrgLimits {
  return { ...OFF, ...partial };
}

/** A simulated "now" well inside a day and a month (backends take the caller's clock). */
export const T0 = Date.UTC(2031, 0, 15, 12, 0, 0);

export const NO_USAGE = { day: 0, month: 0 } as const;

export interface Period {
  readonly day: string;
  readonly month: string;
  readonly dayEndsMs: number;
  readonly monthEndsMs: number;
}

/**
 * The UTC calendar periods of an instant, as the caller computes them. Written again here on
 * purpose, not imported from src/ratelimit/periods.ts: an independent oracle for the boundaries.
 */
export function periodOf(nowMs: number): Period {
  const d = new Date(nowMs);
  const y = d.getUTCFullYear();
  const m = d.getUTCMonth();
  const iso = d.toISOString();
  return {
    day: iso.slice(0, 10),
    month: iso.slice(0, 7),
    dayEndsMs: Date.UTC(y, m, d.getUTCDate() + 1),
    monthEndsMs: Date.UTC(y, m + 1, 1),
  };
}

export interface RequestOptions {
  readonly cost?: number;
  readonly slotId?: string;
  readonly slotTtlMs?: number;
  readonly seed?: { readonly day: number; readonly month: number };
  /** Concurrency slots to take at once (a lease); default 1. */
  readonly slots?: number;
}

export function request(orgId: string, userId: string, lim: OrgLimits, nowMs: number, opts: RequestOptions = {}): AcquireRequest {
  return {
    orgId,
    userId,
    limits: lim,
    cost: opts.cost ?? 1,
    nowMs,
    ...periodOf(nowMs),
    slotId: opts.slotId ?? randomUUID(),
    slotTtlMs: opts.slotTtlMs ?? 60_000,
    ...(opts.seed === undefined ? {} : { seed: opts.seed }),
    ...(opts.slots === undefined ? {} : { slots: opts.slots }),
  };
}

export function newOrgId(): string {
  return randomUUID();
}
