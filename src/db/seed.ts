import type { Database } from '../infra/database.js';
import { withSystem } from './tenancy.js';

/**
 * Development and test data, never applied when NODE_ENV=production. Fixed ids, so the README's
 * curl examples can be pasted as they are. Idempotent: rows that exist are left alone.
 */
export const SEED = {
  orgs: [
    { id: '00000000-0000-0000-0000-000000000001', name: 'Acme Corp', slug: 'acme-corp' },
    { id: '00000000-0000-0000-0000-000000000002', name: 'Tech Startup Inc', slug: 'tech-startup' },
  ],
  users: [
    {
      id: '00000000-0000-0000-0001-000000000001',
      orgId: '00000000-0000-0000-0000-000000000001',
      email: 'admin@acme.com',
      name: 'Acme Admin',
      role: 'admin',
    },
    {
      id: '00000000-0000-0000-0001-000000000002',
      orgId: '00000000-0000-0000-0000-000000000001',
      email: 'user@acme.com',
      name: 'Acme User',
      role: 'member',
    },
    {
      id: '00000000-0000-0000-0002-000000000001',
      orgId: '00000000-0000-0000-0000-000000000002',
      email: 'founder@techstartup.com',
      name: 'Tech Startup Founder',
      role: 'owner',
    },
  ],
} as const;

export interface SeedReport {
  orgs: { id: string; name: string; slug: string }[];
  users: { id: string; email: string; role: string; org_id: string }[];
}

/** Writes rows of several orgs: the system path (row-level security applies to the owner too). */
export async function seed(db: Database): Promise<SeedReport> {
  return withSystem(db, async (tx) => {
    for (const o of SEED.orgs) {
      await tx.query('INSERT INTO orgs (id, name, slug) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING', [o.id, o.name, o.slug]);
    }
    for (const u of SEED.users) {
      // Only into an org that exists: a slug clash above may have skipped the seed org.
      await tx.query(
        `INSERT INTO users (id, org_id, email, name, role)
         SELECT $1, o.id, $3, $4, $5 FROM orgs o WHERE o.id = $2
         ON CONFLICT DO NOTHING`,
        [u.id, u.orgId, u.email, u.name, u.role],
      );
    }
    const orgs = await tx.query<SeedReport['orgs'][number]>(
      'SELECT id, name, slug FROM orgs WHERE id = ANY($1::uuid[]) AND deleted_at IS NULL ORDER BY id',
      [SEED.orgs.map((o) => o.id)],
    );
    const users = await tx.query<SeedReport['users'][number]>(
      'SELECT id, email, role, org_id FROM users WHERE id = ANY($1::uuid[]) AND deleted_at IS NULL ORDER BY id',
      [SEED.users.map((u) => u.id)],
    );
    return { orgs: orgs.rows, users: users.rows };
  });
}
