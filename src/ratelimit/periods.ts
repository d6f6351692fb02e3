/** Calendar periods of the hard caps, in UTC. */
export interface Periods {
  /** 'YYYY-MM-DD' */
  day: string;
  /** 'YYYY-MM' */
  month: string;
  dayEndsMs: number;
  monthEndsMs: number;
}

export function utcPeriods(nowMs: number): Periods {
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
