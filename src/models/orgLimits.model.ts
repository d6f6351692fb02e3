import { queryAsSystem, withSystem, type SystemTx } from '../db/tenancy.js';
import type { Database, Queryable } from '../infra/database.js';
import type { OrgLimits } from '../ratelimit/types.js';
import { appendAuditLog, SYSTEM_ACTOR, type AuditActor } from './audit.model.js';

/**
 * Per-org overrides of the default limits (org_limits). Not tenant data a tenant can change:
 * operators edit it with `npm run org:limits` (the system path, audited as the system); admins
 * of the org read the effective values, which the authentication lookup brings along.
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

/**
 * The overrides of an org that has none (most orgs), in an authentication lookup: one frozen
 * object shared by every cached caller instead of an empty object each. Frozen, as the auth
 * caches freeze every overrides object they keep.
 */
export const NO_OVERRIDES: OrgLimitOverrides = Object.freeze({});

/** overridesFromRow for an authentication lookup: NO_OVERRIDES when the org has none. */
export function lookupOverridesFromRow(row: Record<string, unknown>): OrgLimitOverrides {
  const out = overridesFromRow(row);
  return Object.keys(out).length > 0 ? out : NO_OVERRIDES;
}

// The overrides object of a cached caller is the same on each of its requests: its merged limits
// (and the RateLimit-Policy built from them, cached per limits object) are made once, not per request.
const merged = new WeakMap<OrgLimitOverrides, { defaults: OrgLimits; limits: OrgLimits }>();

export function effectiveLimits(defaults: OrgLimits, overrides: OrgLimitOverrides | null | undefined): OrgLimits {
  // Most orgs have no row: hand back the defaults object itself (no copy on every request).
  if (!overrides || overrides === NO_OVERRIDES) return defaults;
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

const SELECT_OVERRIDES = `SELECT ${ORG_LIMITS_SELECT} FROM org_limits l WHERE l.org_id = $1`;

async function readOverrides(tx: SystemTx, orgId: string): Promise<OrgLimitOverrides> {
  const { rows } = await tx.query(SELECT_OVERRIDES, [orgId]);
  return rows[0] ? overridesFromRow(rows[0]) : {};
}

/** Operator read (the limits CLI): the system path. */
export async function findOrgLimitOverrides(db: Database, orgId: string): Promise<OrgLimitOverrides> {
  const { rows } = await queryAsSystem(db, SELECT_OVERRIDES, [orgId]);
  return rows[0] ? overridesFromRow(rows[0]) : {};
}

const sameOverrides = (a: OrgLimitOverrides, b: OrgLimitOverrides) => FIELDS.every((f) => (a[f] ?? null) === (b[f] ?? null));

/**
 * Runs `write` under the org's lock and records `org_limits.changed` (before and after) in the
 * same transaction when the overrides did change. Returns the overrides now stored.
 */
async function changeOverrides(
  db: Database | Queryable,
  orgId: string,
  actor: AuditActor,
  write: (tx: SystemTx) => Promise<void>,
): Promise<OrgLimitOverrides> {
  // A Database: the system path, in a transaction of its own. Anything else is a transaction the
  // caller already holds and answers for (the tools that prepare data in bulk, as a superuser).
  const inScope = <T>(fn: (tx: SystemTx) => Promise<T>): Promise<T> =>
    'queryInTransaction' in db ? withSystem(db, fn) : fn(db as SystemTx);
  return inScope(async (tx) => {
    await tx.query('SELECT lock_org($1)', [orgId]);
    const before = await readOverrides(tx, orgId);
    await write(tx);
    const after = await readOverrides(tx, orgId);
    if (!sameOverrides(before, after)) {
      await appendAuditLog(tx, orgId, {
        action: 'org_limits.changed',
        actor,
        target: { type: 'org_limits', id: orgId },
        metadata: { before, after },
      });
    }
    return after;
  });
}

/**
 * Sets the given fields (null resets a field to the default) and returns the overrides now stored.
 * Field names come from the fixed COLUMNS map, never from input, so the SQL stays parameterised.
 */
export async function setOrgLimitOverrides(
  db: Database | Queryable,
  orgId: string,
  changes: OrgLimitOverrides,
  actor: AuditActor = SYSTEM_ACTOR,
): Promise<OrgLimitOverrides> {
  const fields = FIELDS.filter((f) => changes[f] !== undefined);
  return changeOverrides(db, orgId, actor, async (tx) => {
    if (fields.length === 0) return;
    const cols = fields.map((f) => COLUMNS[f]);
    const params = fields.map((f) => changes[f] ?? null);
    await tx.query(
      `INSERT INTO org_limits (org_id, ${cols.join(', ')})
       VALUES ($1, ${cols.map((_, i) => `$${i + 2}`).join(', ')})
       ON CONFLICT (org_id) DO UPDATE SET ${cols.map((c) => `${c} = EXCLUDED.${c}`).join(', ')}`,
      [orgId, ...params],
    );
  });
}

export async function clearOrgLimitOverrides(db: Database, orgId: string, actor: AuditActor = SYSTEM_ACTOR): Promise<void> {
  await changeOverrides(db, orgId, actor, async (tx) => {
    await tx.query('DELETE FROM org_limits WHERE org_id = $1', [orgId]);
  });
}
