import { randomUUID } from 'node:crypto';
import type { Database } from '../infra/database.js';
import { TENANT_ROLE } from './tenancy.js';

/**
 * What the server checks before it takes a request: that the role its tenant queries run as
 * cannot get around row-level security. Each problem is a sentence; none means isolation holds.
 *
 * - the role exists, is not a superuser and has no BYPASSRLS;
 * - it neither owns nor inherits the rights of the owner of any table in the schema (an owner
 *   skips RLS unless it is forced);
 * - every tenant table (a table with an org_id column, and orgs) has RLS enabled and forced;
 * - every policy that applies to the role limits it with `app.org_id` (no USING (true));
 * - in a transaction as that role, the session really is that role, not a superuser, and RLS is
 *   active.
 */
export async function checkTenantIsolation(db: Database, opts: { tenantRole?: string; schema?: string } = {}): Promise<string[]> {
  const role = opts.tenantRole ?? TENANT_ROLE;
  const schema = opts.schema ?? 'public';
  const problems: string[] = [];

  const { rows: roles } = await db.query<{ rolsuper: boolean; rolbypassrls: boolean }>(
    'SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = $1',
    [role],
  );
  const r = roles[0];
  if (!r) return [`role ${role} does not exist (run the migrations)`];
  if (r.rolsuper) problems.push(`role ${role} is a superuser`);
  if (r.rolbypassrls) problems.push(`role ${role} has BYPASSRLS`);

  const { rows: owned } = await db.query<{ name: string }>(
    `SELECT c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname = $2 AND c.relkind IN ('r', 'p') AND pg_has_role($1, c.relowner, 'USAGE')
      ORDER BY 1`,
    [role, schema],
  );
  for (const t of owned) problems.push(`role ${role} owns table ${t.name} (or has its owner's rights)`);

  const { rows: tables } = await db.query<{ name: string; rls: boolean; forced: boolean }>(
    `SELECT c.relname AS name, c.relrowsecurity AS rls, c.relforcerowsecurity AS forced
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')
        AND (c.relname = 'orgs' OR EXISTS (
              SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'org_id' AND NOT a.attisdropped))
      ORDER BY 1`,
    [schema],
  );
  for (const t of tables) {
    if (!t.rls) problems.push(`table ${t.name} does not have row-level security enabled`);
    else if (!t.forced) problems.push(`table ${t.name} does not force row-level security`);
  }

  const { rows: policies } = await db.query<{ table: string; name: string; qual: string | null; check: string | null }>(
    `SELECT p.tablename AS table, p.policyname AS name, p.qual, p.with_check AS check
       FROM pg_policies p
      WHERE p.schemaname = $2 AND (p.roles @> ARRAY[$1]::name[] OR p.roles @> ARRAY['public']::name[])
      ORDER BY 1, 2`,
    [role, schema],
  );
  const bound = (expr: string | null) => expr !== null && expr.includes("current_setting('app.org_id'");
  for (const p of policies) {
    if (!bound(p.qual) && !(p.qual === null && bound(p.check))) {
      problems.push(`policy ${p.name} on ${p.table} lets ${role} see rows without app.org_id`);
    } else if (p.check !== null && !bound(p.check)) {
      problems.push(`policy ${p.name} on ${p.table} lets ${role} write rows without app.org_id`);
    }
  }

  // The same switch the application makes, with an org that does not exist.
  const probe = await db.transaction(
    async (tx) => {
      const { rows } = await tx.query<{ who: string; superuser: string; rls: boolean | null }>(
        `SELECT current_user::text AS who, current_setting('is_superuser') AS superuser,
                (SELECT row_security_active(c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relname = 'users') AS rls`,
        [schema],
      );
      return rows[0];
    },
    {
      setup: {
        sql: "SELECT set_config('role', $1, true), set_config('app.org_id', $2, true)",
        params: [role, randomUUID()],
      },
    },
  );
  if (probe?.who !== role) problems.push(`a tenant transaction runs as ${probe?.who ?? 'nobody'}, not ${role}`);
  if (probe?.superuser !== 'off') problems.push(`a tenant transaction runs as a superuser`);
  if (probe?.rls !== true) problems.push('row-level security is not active on users in a tenant transaction');
  return problems;
}
