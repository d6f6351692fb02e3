import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checkTenantIsolation } from '../src/db/isolationCheck.js';
import { TENANT_ROLE } from '../src/db/tenancy.js';
import type { Database } from '../src/infra/database.js';
import { schemaViolations, tenantTables } from './helpers/catalog.js';
import { getTestDb } from './helpers/db.js';

/**
 * The schema rules of tenancy, read from PostgreSQL's catalog (composite keys, forced RLS), and
 * the start-up check that refuses a tenant role able to get around row-level security. Each is
 * run on the migrated database (no problem) and on a scratch schema built to break every rule
 * (each problem found), so neither can pass by finding nothing.
 */

let db: Database;
beforeAll(async () => {
  db = await getTestDb();
});

describe('the migrated schema', () => {
  it('has the tenant tables the isolation suites cover', async () => {
    expect(await tenantTables(db)).toEqual(['api_keys', 'audit_logs', 'org_limits', 'org_usage', 'sessions', 'users']);
  });

  it('breaks no tenancy rule: org_id in every key and foreign key, RLS forced with an app.org_id policy everywhere', async () => {
    expect(await schemaViolations(db)).toEqual([]);
  });

  it('passes the start-up isolation check', async () => {
    expect(await checkTenantIsolation(db)).toEqual([]);
  });
});

describe('a schema that breaks every rule', () => {
  const schema = `rls_probe_${randomBytes(5).toString('hex')}`;
  const probeRole = `llm_app_rls_probe_${randomBytes(5).toString('hex')}`;
  const policy = (table: string, role: string) =>
    `CREATE POLICY iso_${role} ON ${schema}.${table} TO ${role}
       USING (org_id = NULLIF(current_setting('app.org_id', true), '')::uuid)`;

  beforeAll(async () => {
    // Names are made here from hex digits only.
    await db.query(`CREATE ROLE ${probeRole} NOLOGIN BYPASSRLS`);
    await db.transaction(async (tx) => {
      await tx.exec(`
        CREATE SCHEMA ${schema};
        CREATE TABLE ${schema}.orgs (id uuid PRIMARY KEY);
        CREATE TABLE ${schema}.good (org_id uuid NOT NULL, id uuid NOT NULL, PRIMARY KEY (org_id, id));
        CREATE TABLE ${schema}.pk_no_org (org_id uuid NOT NULL, id uuid PRIMARY KEY);
        CREATE TABLE ${schema}.unique_no_org (org_id uuid NOT NULL, id uuid NOT NULL, code text UNIQUE, PRIMARY KEY (org_id, id));
        CREATE TABLE ${schema}.index_no_org (org_id uuid NOT NULL, id uuid NOT NULL, code text, PRIMARY KEY (org_id, id));
        CREATE UNIQUE INDEX index_no_org_code ON ${schema}.index_no_org (code) WHERE code IS NOT NULL;
        CREATE TABLE ${schema}.fk_no_org (org_id uuid NOT NULL, id uuid NOT NULL, ref uuid REFERENCES ${schema}.pk_no_org (id),
                                          PRIMARY KEY (org_id, id));
        CREATE TABLE ${schema}.fk_crossed (org_id uuid NOT NULL, id uuid NOT NULL, ref uuid NOT NULL, PRIMARY KEY (org_id, id),
                                           FOREIGN KEY (ref, org_id) REFERENCES ${schema}.good (org_id, id));
        CREATE TABLE ${schema}.no_org (id uuid PRIMARY KEY);
        CREATE TABLE ${schema}.not_forced (org_id uuid NOT NULL, id uuid NOT NULL, PRIMARY KEY (org_id, id));
        ALTER TABLE ${schema}.not_forced ENABLE ROW LEVEL SECURITY;
      `);
      for (const t of ['good', 'pk_no_org', 'unique_no_org', 'index_no_org', 'fk_no_org', 'fk_crossed']) {
        await tx.exec(`ALTER TABLE ${schema}.${t} ENABLE ROW LEVEL SECURITY; ALTER TABLE ${schema}.${t} FORCE ROW LEVEL SECURITY;
                       ${policy(t, TENANT_ROLE)}; ${policy(t, probeRole)};`);
      }
      await tx.exec(`${policy('not_forced', TENANT_ROLE)}; ${policy('not_forced', probeRole)};`);
      // A policy that lets the role see everything, and a table the role owns.
      await tx.exec(`CREATE POLICY leak ON ${schema}.good TO ${probeRole} USING (true);
                     ALTER TABLE ${schema}.index_no_org OWNER TO ${probeRole};`);
    });
  });

  afterAll(async () => {
    await db.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE`);
    await db.query(`DROP ROLE IF EXISTS ${probeRole}`);
  });

  it('the catalog test names each broken rule', async () => {
    const problems = await schemaViolations(db, { schema });
    expect(problems).toEqual(
      expect.arrayContaining([
        'orgs: row-level security is not enabled',
        'orgs: no policy for llm_app_tenant bound to app.org_id',
        'pk_no_org: primary key pk_no_org_pkey (id) leaves out org_id',
        'unique_no_org: unique constraint unique_no_org_code_key (code) leaves out org_id',
        'index_no_org: unique index index_no_org_code (code) leaves out org_id',
        'fk_no_org: foreign key fk_no_org_ref_fkey (ref) leaves out org_id',
        'fk_crossed: foreign key fk_crossed_ref_org_id_fkey does not match org_id with good.org_id',
        'no_org: no org_id column and not a known non-tenant table',
        'not_forced: row-level security is not forced',
      ]),
    );
    expect(problems.filter((p) => p.startsWith('good:'))).toEqual([]);
    expect(problems).toHaveLength(9);
  });

  it('the start-up check refuses a role with BYPASSRLS, one that owns a table, an unforced table and a policy without app.org_id', async () => {
    const problems = await checkTenantIsolation(db, { tenantRole: probeRole, schema });
    expect(problems).toEqual(
      expect.arrayContaining([
        `role ${probeRole} has BYPASSRLS`,
        `role ${probeRole} owns table index_no_org (or has its owner's rights)`,
        'table not_forced does not force row-level security',
        'table orgs does not have row-level security enabled',
        `policy leak on good lets ${probeRole} see rows without app.org_id`,
      ]),
    );
  });
});
