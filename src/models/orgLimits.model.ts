import type { Queryable } from '../infra/database.js';
import type { OrgLimits } from '../ratelimit/types.js';

/**
 * Per-org overrides of the default limits (org_limits). Not tenant data a tenant can change:
 * operators edit it with `npm run org:limits`; admins of the org read the effective values.
 */

/** One org's overrides: undefined/null = the default from the environment; 0 = no limit. */
export type OrgLimitOverrides = { -readonly [K in keyof OrgLimits]?: number | null };

const COLUMNS: Record<keyof OrgLimits, string> = {
  orgBurst: 'burst',
  orgPerSecond: 'per_second',
  userBurst: 'user_burst',
  userPerSecond: 'user_per_second',
  dailyCap: 'daily_request_cap',
  monthlyCap: 'monthly_request_cap',
  maxConcurrent: 'max_concurrent',
};
const FIELDS = Object.keys(COLUMNS) as (keyof OrgLimits)[];

/** SELECT list fragment for org_limits aliased `l`, shared with the authentication lookup. */
export const ORG_LIMITS_SELECT = FIELDS.map((f) => `l.${COLUMNS[f]}::float8 AS l_${COLUMNS[f]}`).join(', ');

export function overridesFromRow(row: Record<string, unknown>): OrgLimitOverrides {
  const out: OrgLimitOverrides = {};
  for (const f of FIELDS) {
    const v = row[`l_${COLUMNS[f]}`];
    if (v !== null && v !== undefined) out[f] = Number(v);
  }
  return out;
}

// The overrides object of a cached caller is the same on each of its requests: its merged limits
// (and the RateLimit-Policy built from them, cached per limits object) are made once, not per request.
const merged = new WeakMap<OrgLimitOverrides, { defaults: OrgLimits; limits: OrgLimits }>();

export function effectiveLimits(defaults: OrgLimits, overrides: OrgLimitOverrides | null | undefined): OrgLimits {
  // Most orgs have no row: hand back the defaults object itself (no copy on every request).
  if (!overrides) return defaults;
  const known = merged.get(overrides);
  if (known?.defaults === defaults) return known.limits;
  if (Object.keys(overrides).length === 0) return defaults;
  const out: { -readonly [K in keyof OrgLimits]: number } = { ...defaults };
  for (const f of FIELDS) {
    const v = overrides[f];
    if (v !== null && v !== undefined) out[f] = v;
  }
  const limits = Object.freeze(out);
  merged.set(overrides, { defaults, limits });
  return limits;
}

export async function findOrgLimitOverrides(db: Queryable, orgId: string): Promise<OrgLimitOverrides> {
  const { rows } = await db.query(`SELECT ${ORG_LIMITS_SELECT} FROM org_limits l WHERE l.org_id = $1`, [orgId]);
  return rows[0] ? overridesFromRow(rows[0]) : {};
}

/**
 * Sets the given fields (null resets a field to the default) and returns the overrides now stored.
 * Field names come from the fixed COLUMNS map, never from input, so the SQL stays parameterised.
 */
export async function setOrgLimitOverrides(
  db: Queryable,
  orgId: string,
  changes: OrgLimitOverrides,
): Promise<OrgLimitOverrides> {
  const fields = FIELDS.filter((f) => changes[f] !== undefined);
  if (fields.length > 0) {
    const cols = fields.map((f) => COLUMNS[f]);
    const params = fields.map((f) => changes[f] ?? null);
    await db.query(
      `INSERT INTO org_limits (org_id, ${cols.join(', ')})
       VALUES ($1, ${cols.map((_, i) => `$${i + 2}`).join(', ')})
       ON CONFLICT (org_id) DO UPDATE SET ${cols.map((c) => `${c} = EXCLUDED.${c}`).join(', ')}`,
      [orgId, ...params],
    );
  }
  return findOrgLimitOverrides(db, orgId);
}

export async function clearOrgLimitOverrides(db: Queryable, orgId: string): Promise<void> {
  await db.query('DELETE FROM org_limits WHERE org_id = $1', [orgId]);
}
