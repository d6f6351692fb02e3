import { queryAsSystem, queryAsTenant } from '../db/tenancy.js';
import type { Database } from '../infra/database.js';

/**
 * Durable usage toward the hard caps (org_usage). Instances add their admitted requests in
 * batches, many orgs in one statement: cross-tenant batch work, so the system path. Reading one
 * org's usage is that org's business: the tenant path.
 */

/** Admitted requests to add, as parallel arrays: one entry per org and UTC day. */
export interface UsageBatch {
  orgIds: string[];
  /** 'YYYY-MM-DD' (UTC). */
  days: string[];
  requests: number[];
}

/**
 * `{a,b,c}`: PostgreSQL's array literal of values that need no quoting (UUIDs, ISO dates and
 * whole numbers: what a usage batch holds). Written here rather than left to pg's array
 * conversion, which escapes every element on its own: 10,000 orgs made 30,000 strings per write.
 */
const arrayLiteral = (values: readonly (string | number)[]): string => `{${values.join(',')}}`;

/** Adds every entry to its day's and its month's rows, in one statement. */
export async function addUsage(db: Database, batch: UsageBatch): Promise<void> {
  if (batch.orgIds.length === 0) return;
  // Unnest of parallel arrays: one round trip whatever the batch size. Each entry counts toward
  // its day and its month; GROUP BY merges the rows of one key first (an upsert may not touch the
  // same row twice in one statement).
  await queryAsSystem(
    db,
    `INSERT INTO org_usage (org_id, period, period_start, requests)
     SELECT t.org_id, p.period, p.period_start, sum(t.requests)
       FROM unnest($1::uuid[], $2::date[], $3::bigint[]) AS t(org_id, day, requests)
      CROSS JOIN LATERAL (VALUES ('day', t.day), ('month', date_trunc('month', t.day::timestamp)::date)) AS p(period, period_start)
      GROUP BY t.org_id, p.period, p.period_start
     ON CONFLICT (org_id, period, period_start)
     DO UPDATE SET requests = org_usage.requests + EXCLUDED.requests, updated_at = now()`,
    [arrayLiteral(batch.orgIds), arrayLiteral(batch.days), arrayLiteral(batch.requests)],
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
