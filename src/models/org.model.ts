import { queryAsSystem, queryAsTenant, withSystem } from '../db/tenancy.js';
import type { Database } from '../infra/database.js';
import { appendAuditLog, SYSTEM_ACTOR } from './audit.model.js';

export interface Org {
  id: string;
  name: string;
  slug: string;
  metadata: Record<string, unknown>;
  createdAt: Date;
  updatedAt: Date;
}

interface OrgRow {
  id: string;
  name: string;
  slug: string;
  metadata: Record<string, unknown>;
  created_at: Date;
  updated_at: Date;
}

const COLUMNS = 'id, name, slug, metadata, created_at, updated_at';

const toOrg = (r: OrgRow): Org => ({
  id: r.id,
  name: r.name,
  slug: r.slug,
  metadata: r.metadata,
  createdAt: r.created_at,
  updatedAt: r.updated_at,
});

/** The caller's own org (tenant path: the tenant role sees no other org row). */
export async function findOrgById(db: Database, orgId: string): Promise<Org | null> {
  const { rows } = await queryAsTenant<OrgRow>(db, orgId, `SELECT ${COLUMNS} FROM orgs WHERE id = $1 AND deleted_at IS NULL`, [
    orgId,
  ]);
  return rows[0] ? toOrg(rows[0]) : null;
}

/** Operator tools name an org by its slug before any org is known: the system path. */
export async function findOrgBySlug(db: Database, slug: string): Promise<Org | null> {
  const { rows } = await queryAsSystem<OrgRow>(db, `SELECT ${COLUMNS} FROM orgs WHERE slug = $1 AND deleted_at IS NULL`, [slug]);
  return rows[0] ? toOrg(rows[0]) : null;
}

/** A new org and the first row of its audit chain (system path: the org does not exist yet). */
export async function createOrg(
  db: Database,
  input: { name: string; slug: string; metadata?: Record<string, unknown> },
): Promise<Org> {
  return withSystem(db, async (tx) => {
    const { rows } = await tx.query<OrgRow>(
      `INSERT INTO orgs (name, slug, metadata) VALUES ($1, $2, $3) RETURNING ${COLUMNS}`,
      [input.name, input.slug, JSON.stringify(input.metadata ?? {})],
    );
    const org = toOrg(rows[0]!);
    await appendAuditLog(tx, org.id, {
      action: 'org.created',
      actor: SYSTEM_ACTOR,
      target: { type: 'org', id: org.id },
      metadata: { name: org.name, slug: org.slug },
    });
    return org;
  });
}

/** Soft delete: the org and, through every query's deleted_at filter on orgs, its users vanish. */
export async function softDeleteOrg(db: Database, orgId: string): Promise<boolean> {
  return withSystem(db, async (tx) => {
    const { rowCount } = await tx.query('UPDATE orgs SET deleted_at = now() WHERE id = $1 AND deleted_at IS NULL', [orgId]);
    if (rowCount !== 1) return false;
    await appendAuditLog(tx, orgId, { action: 'org.deleted', actor: SYSTEM_ACTOR, target: { type: 'org', id: orgId } });
    return true;
  });
}
