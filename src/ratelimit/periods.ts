/** Calendar periods of the hard caps, in UTC. */
export interface Periods {
  /** 'YYYY-MM-DD' */
  day: string;
  /** 'YYYY-MM' */
  month: string;
  dayEndsMs: number;
  monthEndsMs: number;
}

// Every request asks, and the answer changes once a day: the last one is kept while `nowMs` is
// still inside its day (callers pass any clock, so both ends are checked).
let last: { periods: Periods; dayStartsMs: number } | null = null;

export function utcPeriods(nowMs: number): Periods {
  if (last && nowMs >= last.dayStartsMs && nowMs < last.periods.dayEndsMs) return last.periods;
  const d = new Date(nowMs);
  const y = d.getUTCFullYear();
  const m = d.getUTCMonth();
  const iso = d.toISOString();
  const periods: Periods = Object.freeze({
    day: iso.slice(0, 10),
    month: iso.slice(0, 7),
    dayEndsMs: Date.UTC(y, m, d.getUTCDate() + 1),
    monthEndsMs: Date.UTC(y, m + 1, 1),
  });
  last = { periods, dayStartsMs: Date.UTC(y, m, d.getUTCDate()) };
  return periods;
}
