/**
 * The benchmark's own organisations and users, written straight into PostgreSQL with
 * generate_series (a few seconds for 50,000 users; through the API it would be minutes). Slugs
 * start with `bench-`, ids are the database's own, and a rerun finds and reuses what an earlier run
 * made: it only inserts what is missing and brings back anything soft-deleted.
 */
import pg from 'pg';
import type { Queryable } from '../src/infra/database.js';
import { setOrgLimitOverrides, type OrgLimitOverrides } from '../src/models/orgLimits.model.js';

export interface BenchUser {
  orgId: string;
  userId: string;
}

/** Groups of orgs: slug `bench-<group>-<00001..>`, user `user<j>@<slug>.example` (user1 is the owner). */
export const GROUPS = {
  /** /v1/me and a page of /v1/users. */
  main: { orgs: 1, usersPerOrg: 30 },
  /** Over its limit: every request refused. */
  refused: { orgs: 1, usersPerOrg: 1 },
  /** The noisy neighbour, far past its own limit... */
  'noisy-a': { orgs: 1, usersPerOrg: 5 },
  /** ...and the quiet org next to it. */
  'noisy-b': { orgs: 1, usersPerOrg: 5 },
  t10: { orgs: 10, usersPerOrg: 5 },
  t10k: { orgs: 10_000, usersPerOrg: 5 },
  /** The caller of the limiter benchmark (npm run bench:limiter). */
  limiter: { orgs: 1, usersPerOrg: 1 },
} as const;

export type Group = keyof typeof GROUPS;

/** Every org of a group, with its users, in org order then creation order. */
export type BenchData = Record<Group, BenchUser[]>;

// One slug per number of the series: the same expression in every statement.
const SLUG = `'bench-' || $1::text || '-' || lpad(i::text, 5, '0')`;

async function readGroup(db: Queryable, group: Group): Promise<BenchUser[]> {
  const { rows } = await db.query<{ org_id: string; user_id: string }>(
    `SELECT o.id AS org_id, u.id AS user_id
       FROM generate_series(1, $2::int) AS i
       JOIN orgs o ON o.slug = ${SLUG} AND o.deleted_at IS NULL
       JOIN users u ON u.org_id = o.id AND u.deleted_at IS NULL
      ORDER BY i, u.seq`,
    [group, GROUPS[group].orgs],
  );
  return rows.map((r) => ({ orgId: r.org_id, userId: r.user_id }));
}

/** Whether every org of the group is there with at least its number of users. */
function complete(group: Group, users: BenchUser[]): boolean {
  const counts = new Map<string, number>();
  for (const u of users) counts.set(u.orgId, (counts.get(u.orgId) ?? 0) + 1);
  const { orgs, usersPerOrg } = GROUPS[group];
  return counts.size === orgs && [...counts.values()].every((n) => n >= usersPerOrg);
}

async function createGroup(db: Queryable, group: Group): Promise<void> {
  const { orgs, usersPerOrg } = GROUPS[group];
  await db.query(
    `INSERT INTO orgs (name, slug)
     SELECT 'Bench ' || $1::text || ' ' || i, ${SLUG} FROM generate_series(1, $2::int) AS i
     ON CONFLICT (slug) DO UPDATE SET deleted_at = NULL WHERE orgs.deleted_at IS NOT NULL`,
    [group, orgs],
  );
  await db.query(
    `INSERT INTO users (org_id, email, name, role)
     SELECT o.id, 'user' || j || '@' || o.slug || '.example', 'Bench user ' || j, CASE WHEN j = 1 THEN 'owner' ELSE 'member' END
       FROM generate_series(1, $2::int) AS i
       JOIN orgs o ON o.slug = ${SLUG}
      CROSS JOIN generate_series(1, $3::int) AS j
     ON CONFLICT DO NOTHING`,
    [group, orgs, usersPerOrg],
  );
}

export interface EnsureResult<G extends Group> {
  /** The users of the groups asked for. */
  data: Pick<BenchData, G>;
  /** What was done, for the output. */
  summary: string;
}

/**
 * Makes sure every group of `groups` (default: all) exists, then gives their orgs the limits the
 * cases expect: their own values in `limits` for the named groups, none (the environment's) for
 * the others.
 */
export async function ensureBenchData<G extends Group = Group>(
  databaseUrl: string,
  limits: Partial<Record<G, OrgLimitOverrides>>,
  groups: readonly G[] = Object.keys(GROUPS) as G[],
): Promise<EnsureResult<G>> {
  const started = performance.now();
  // Bounded like every step of the run: a lock held elsewhere fails the setup instead of hanging it.
  const client = new pg.Client({ connectionString: databaseUrl, connectionTimeoutMillis: 10_000, statement_timeout: 60_000 });
  await client.connect();
  const db: Queryable = {
    query: async <R>(sql: string, params?: readonly unknown[]) => {
      const res = await client.query(sql, params ? [...params] : []);
      return { rows: res.rows as R[], rowCount: res.rowCount ?? 0 };
    },
  };
  try {
    await client.query('BEGIN');
    const data = {} as Pick<BenchData, G>;
    const created: string[] = [];
    for (const group of groups) {
      let users = await readGroup(db, group);
      if (!complete(group, users)) {
        await createGroup(db, group);
        users = await readGroup(db, group);
        if (!complete(group, users)) {
          throw new Error(`could not create the bench-${group}-* orgs and users (found ${users.length} users)`);
        }
        created.push(group);
      }
      data[group] = users;
    }
    const orgIds = groups.flatMap((g) => [...new Set(data[g].map((u) => u.orgId))]);
    // Whatever an earlier run or a person set goes; then the groups that need their own get them.
    await db.query('DELETE FROM org_limits WHERE org_id = ANY($1::uuid[])', [orgIds]);
    for (const [group, overrides] of Object.entries(limits) as [G, OrgLimitOverrides][]) {
      for (const orgId of new Set(data[group].map((u) => u.orgId))) {
        await setOrgLimitOverrides(db, orgId, overrides);
      }
    }
    await client.query('COMMIT');
    const orgCount = orgIds.length;
    const userCount = groups.reduce((n, g) => n + data[g].length, 0);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    return {
      data,
      summary:
        `bench data: ${orgCount.toLocaleString('en-US')} orgs (bench-*), ${userCount.toLocaleString('en-US')} users; ` +
        (created.length > 0 ? `created ${created.join(', ')}` : 'all there from an earlier run') +
        ` (${seconds} s)`,
    };
  } catch (err) {
    await client.query('ROLLBACK').catch(() => undefined);
    throw err;
  } finally {
    await client.end();
  }
}
