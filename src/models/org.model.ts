import type { Database, Queryable } from '../infra/database.js';

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

export async function findOrgById(db: Queryable, orgId: string): Promise<Org | null> {
  const { rows } = await db.query<OrgRow>(`SELECT ${COLUMNS} FROM orgs WHERE id = $1 AND deleted_at IS NULL`, [orgId]);
  return rows[0] ? toOrg(rows[0]) : null;
}

export async function findOrgBySlug(db: Queryable, slug: string): Promise<Org | null> {
  const { rows } = await db.query<OrgRow>(`SELECT ${COLUMNS} FROM orgs WHERE slug = $1 AND deleted_at IS NULL`, [slug]);
  return rows[0] ? toOrg(rows[0]) : null;
}

export async function createOrg(
  db: Queryable,
  input: { name: string; slug: string; metadata?: Record<string, unknown> },
): Promise<Org> {
  const { rows } = await db.query<OrgRow>(
    `INSERT INTO orgs (name, slug, metadata) VALUES ($1, $2, $3) RETURNING ${COLUMNS}`,
    [input.name, input.slug, JSON.stringify(input.metadata ?? {})],
  );
  return toOrg(rows[0]!);
}

/** Soft delete: the org and, through every query's deleted_at filter on orgs, its users vanish. */
export async function softDeleteOrg(db: Database, orgId: string): Promise<boolean> {
  const { rowCount } = await db.query('UPDATE orgs SET deleted_at = now() WHERE id = $1 AND deleted_at IS NULL', [orgId]);
  return rowCount === 1;
}
