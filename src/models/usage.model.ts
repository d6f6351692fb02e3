import { queryAsSystem, queryAsTenant } from '../db/tenancy.js';
import type { Database } from '../infra/database.js';

/**
 * Durable usage toward the hard caps (org_usage). Instances add their admitted requests in
 * batches, many orgs in one statement: cross-tenant batch work, so the system path. Reading one
 * org's usage is that org's business: the tenant path.
 */

export interface UsageDelta {
  orgId: string;
  /** 'YYYY-MM-DD' (UTC). */
  day: string;
  /** 'YYYY-MM' (UTC). */
  month: string;
  requests: number;
}

/** Adds every delta to its day and month rows, in one statement. */
export async function addUsage(db: Database, deltas: readonly UsageDelta[]): Promise<void> {
  if (deltas.length === 0) return;
  const orgIds: string[] = [];
  const periods: string[] = [];
  const starts: string[] = [];
  const counts: number[] = [];
  for (const d of deltas) {
    orgIds.push(d.orgId, d.orgId);
    periods.push('day', 'month');
    starts.push(d.day, `${d.month}-01`);
    counts.push(d.requests, d.requests);
  }
  // Unnest of parallel arrays: one round trip whatever the batch size. GROUP BY merges the rows
  // of one key first (an upsert may not touch the same row twice in one statement).
  await queryAsSystem(
    db,
    `INSERT INTO org_usage (org_id, period, period_start, requests)
     SELECT org_id, period, period_start, sum(requests)
       FROM unnest($1::uuid[], $2::text[], $3::date[], $4::bigint[]) AS t(org_id, period, period_start, requests)
      GROUP BY org_id, period, period_start
     ON CONFLICT (org_id, period, period_start)
     DO UPDATE SET requests = org_usage.requests + EXCLUDED.requests, updated_at = now()`,
    [orgIds, periods, starts, counts],
  );
}

export async function findUsage(
  db: Database,
  orgId: string,
  day: string,
  month: string,
): Promise<{ day: number; month: number }> {
  const { rows } = await queryAsTenant<{ period: string; requests: string }>(
    db,
    orgId,
    `SELECT period, requests::text AS requests FROM org_usage
      WHERE org_id = $1 AND ((period = 'day' AND period_start = $2::date) OR (period = 'month' AND period_start = $3::date))`,
    [orgId, day, `${month}-01`],
  );
  const byPeriod = new Map(rows.map((r) => [r.period, Number(r.requests)]));
  return { day: byPeriod.get('day') ?? 0, month: byPeriod.get('month') ?? 0 };
}
