import type { Database, QueryResult, Queryable, Statement } from '../infra/database.js';

/**
 * The only doors from model code to tenant tables. PostgreSQL row-level security is the second
 * wall behind every query's own `org_id = $n`: each tenant table has a policy that lets the
 * tenant role see and write only the rows of the org named by the transaction-local setting
 * `app.org_id` (migrations 004 and 005).
 *
 * - withTenant / queryAsTenant: the role `llm_app_tenant` (not superuser, no BYPASSRLS, owns
 *   nothing) with `app.org_id` set for this transaction only. Every request's data goes here.
 * - withSystem / queryAsSystem: the role `llm_app_system`, whose policies let it see every org.
 *   Only for work that is cross-tenant by nature: the authentication lookup before the org is
 *   trusted, operator tools (limits, audit verification), usage batches, creating orgs.
 *
 * Both switch role with `set_config('role', …, true)`, i.e. SET LOCAL ROLE: the role and the org
 * end with the transaction, so a pooled connection never carries them to its next user. The
 * setup statement travels with BEGIN (src/infra/database.ts), so a scope costs no round trip.
 */

export const TENANT_ROLE = 'llm_app_tenant';
export const SYSTEM_ROLE = 'llm_app_system';

declare const scope: unique symbol;

/** A transaction as the tenant role, inside one org. Only withTenant makes one. */
export interface TenantTx extends Queryable {
  readonly orgId: string;
  readonly [scope]: 'tenant';
}

/** A transaction as the system role (every org). Only withSystem makes one. */
export interface SystemTx extends Queryable {
  readonly [scope]: 'system';
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

// Prepared (named) statements: parsed once per connection, then only bound and executed.
const systemSetup: Statement = {
  name: 'llm_app_system_scope',
  sql: `SELECT set_config('role', '${SYSTEM_ROLE}', true)`,
};

function tenantSetup(orgId: string): Statement {
  // A programming error, not a client's: request ids are validated long before this.
  if (!UUID.test(orgId)) throw new TypeError('withTenant needs an org id that is a UUID');
  return {
    name: 'llm_app_tenant_scope',
    sql: `SELECT set_config('role', '${TENANT_ROLE}', true), set_config('app.org_id', $1, true)`,
    params: [orgId],
  };
}

export function withTenant<T>(db: Database, orgId: string, fn: (tx: TenantTx) => Promise<T>): Promise<T> {
  const setup = tenantSetup(orgId);
  return db.transaction((tx) => fn(Object.assign(tx, { orgId }) as unknown as TenantTx), { setup });
}

/**
 * One statement as the tenant of `orgId`, in its own transaction: one round trip on PostgreSQL.
 * `name` makes it a prepared statement (for the request path; one name, one SQL text).
 */
export function queryAsTenant<R = Record<string, unknown>>(
  db: Database,
  orgId: string,
  sql: string,
  params?: readonly unknown[],
  name?: string,
): Promise<QueryResult<R>> {
  return db.queryInTransaction<R>(tenantSetup(orgId), sql, params, name);
}

export function withSystem<T>(db: Database, fn: (tx: SystemTx) => Promise<T>): Promise<T> {
  return db.transaction((tx) => fn(tx as unknown as SystemTx), { setup: systemSetup });
}

/** One statement as the system role, in its own transaction: one round trip on PostgreSQL. */
export function queryAsSystem<R = Record<string, unknown>>(
  db: Database,
  sql: string,
  params?: readonly unknown[],
  name?: string,
): Promise<QueryResult<R>> {
  return db.queryInTransaction<R>(systemSetup, sql, params, name);
}
