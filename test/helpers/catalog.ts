import type { Queryable } from '../../src/infra/database.js';

/**
 * Reads PostgreSQL's catalog and lists every way the schema breaks the tenancy rules:
 *
 * - a tenant table is a table with an org_id column; every other table must be one of the known
 *   non-tenant tables (orgs, the root of tenancy, and schema_migrations);
 * - a tenant table's primary key, every unique constraint and every unique index include org_id;
 * - every foreign key of a tenant table includes org_id, and when it references another tenant
 *   table, org_id references org_id (so a row cannot point at another org's row);
 * - every tenant table, and orgs, has row-level security enabled and forced, with a policy for
 *   the tenant role that compares against app.org_id.
 *
 * These are also the rules a distributed (Citus) schema keyed by org_id needs.
 */

export const NON_TENANT_TABLES = ['orgs', 'schema_migrations'];

interface TableRow {
  name: string;
  has_org_id: boolean;
  rls: boolean;
  forced: boolean;
}

interface KeyRow {
  table: string;
  name: string;
  kind: 'p' | 'u' | 'i';
  cols: string[];
}

interface FkRow {
  table: string;
  name: string;
  cols: string[];
  ref_table: string;
  ref_cols: string[];
}

export async function tenantTables(db: Queryable, schema = 'public'): Promise<string[]> {
  const { rows } = await db.query<{ name: string }>(
    `SELECT c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')
        AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'org_id' AND NOT a.attisdropped)
      ORDER BY 1`,
    [schema],
  );
  return rows.map((r) => r.name);
}

export async function schemaViolations(
  db: Queryable,
  opts: { schema?: string; tenantRole?: string; nonTenantTables?: readonly string[] } = {},
): Promise<string[]> {
  const schema = opts.schema ?? 'public';
  const tenantRole = opts.tenantRole ?? 'llm_app_tenant';
  const nonTenant = opts.nonTenantTables ?? NON_TENANT_TABLES;
  const problems: string[] = [];

  const { rows: tables } = await db.query<TableRow>(
    `SELECT c.relname AS name, c.relrowsecurity AS rls, c.relforcerowsecurity AS forced,
            EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'org_id' AND NOT a.attisdropped) AS has_org_id
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')
      ORDER BY 1`,
    [schema],
  );
  const tenant = new Set(tables.filter((t) => t.has_org_id).map((t) => t.name));

  for (const t of tables) {
    if (!t.has_org_id && !nonTenant.includes(t.name)) problems.push(`${t.name}: no org_id column and not a known non-tenant table`);
    if (t.has_org_id || t.name === 'orgs') {
      if (!t.rls || !t.forced) problems.push(`${t.name}: row-level security is not ${t.rls ? 'forced' : 'enabled'}`);
    }
  }

  // Primary keys, unique constraints and unique indexes (partial ones too).
  const { rows: keys } = await db.query<KeyRow>(
    `SELECT t.relname AS table, i.relname AS name,
            CASE WHEN x.indisprimary THEN 'p' WHEN con.oid IS NOT NULL THEN 'u' ELSE 'i' END AS kind,
            ARRAY(SELECT a.attname::text FROM unnest(x.indkey) WITH ORDINALITY k(attnum, ord)
                    JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum ORDER BY k.ord) AS cols
       FROM pg_index x
       JOIN pg_class t ON t.oid = x.indrelid
       JOIN pg_class i ON i.oid = x.indexrelid
       JOIN pg_namespace n ON n.oid = t.relnamespace
       LEFT JOIN pg_constraint con ON con.conindid = x.indexrelid AND con.contype IN ('p', 'u')
      WHERE n.nspname = $1 AND x.indisunique
      ORDER BY 1, 2`,
    [schema],
  );
  for (const name of tenant) {
    if (!keys.some((k) => k.table === name && k.kind === 'p')) problems.push(`${name}: no primary key`);
  }
  for (const k of keys) {
    if (!tenant.has(k.table) || k.cols.includes('org_id')) continue;
    const what = k.kind === 'p' ? 'primary key' : k.kind === 'u' ? 'unique constraint' : 'unique index';
    problems.push(`${k.table}: ${what} ${k.name} (${k.cols.join(', ')}) leaves out org_id`);
  }

  const { rows: fks } = await db.query<FkRow>(
    `SELECT t.relname AS table, c.conname AS name, r.relname AS ref_table,
            ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(attnum, ord)
                    JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum ORDER BY k.ord) AS cols,
            ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(attnum, ord)
                    JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.attnum ORDER BY k.ord) AS ref_cols
       FROM pg_constraint c
       JOIN pg_class t ON t.oid = c.conrelid
       JOIN pg_class r ON r.oid = c.confrelid
       JOIN pg_namespace n ON n.oid = t.relnamespace
      WHERE n.nspname = $1 AND c.contype = 'f'
      ORDER BY 1, 2`,
    [schema],
  );
  for (const fk of fks) {
    if (!tenant.has(fk.table)) continue;
    const at = fk.cols.indexOf('org_id');
    if (at < 0) {
      problems.push(`${fk.table}: foreign key ${fk.name} (${fk.cols.join(', ')}) leaves out org_id`);
    } else if (tenant.has(fk.ref_table) && fk.ref_cols[at] !== 'org_id') {
      problems.push(`${fk.table}: foreign key ${fk.name} does not match org_id with ${fk.ref_table}.org_id`);
    }
  }

  const { rows: policies } = await db.query<{ table: string; qual: string | null }>(
    `SELECT tablename AS table, qual FROM pg_policies WHERE schemaname = $1 AND roles @> ARRAY[$2]::name[]`,
    [schema, tenantRole],
  );
  for (const name of [...tenant, ...(tables.some((t) => t.name === 'orgs') ? ['orgs'] : [])]) {
    const bound = policies.some((p) => p.table === name && p.qual?.includes("current_setting('app.org_id'"));
    if (!bound) problems.push(`${name}: no policy for ${tenantRole} bound to app.org_id`);
  }
  return problems;
}
