import type { Database } from '../infra/database.js';
import { withSystem } from './tenancy.js';

/**
 * Development and test data, never applied when NODE_ENV=production. Fixed ids, so the README's
 * curl examples can be pasted as they are. Idempotent: rows that exist are left alone.
 *
 * The users get development passwords (published in the README, so never for production), stored
 * as their argon2id hashes made once with src/auth/passwords.ts: seeding costs no hashing. A
 * seed user who has a password already keeps it.
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
      password: 'acme-admin-dev-password',
      passwordHash: '$argon2id$v=19$m=19456,t=2,p=1$ZXIlVk+yan09rR/m2wv0mA$T2SZU43jGLJc0+JJnAVcICsLYqi+UyYBNd3gGsHwfnc',
    },
    {
      id: '00000000-0000-0000-0001-000000000002',
      orgId: '00000000-0000-0000-0000-000000000001',
      email: 'user@acme.com',
      name: 'Acme User',
      role: 'member',
      password: 'acme-user-dev-password',
      passwordHash: '$argon2id$v=19$m=19456,t=2,p=1$ieWFUru57AYC8ME29XfgvA$zqGEu9O2ze7OG1DZEWwQh7YmIxRTW5pKkQ1n96eAwYk',
    },
    {
      id: '00000000-0000-0000-0002-000000000001',
      orgId: '00000000-0000-0000-0000-000000000002',
      email: 'founder@techstartup.com',
      name: 'Tech Startup Founder',
      role: 'owner',
      password: 'tech-founder-dev-password',
      passwordHash: '$argon2id$v=19$m=19456,t=2,p=1$wYJQ/oC3PcZKOap2Vn9jZA$Kcv+JV6sr4njTiKTFGbrPfC9/NYs21dx5bkx+m8G17Y',
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
      await tx.query('UPDATE users SET password_hash = $3 WHERE org_id = $1 AND id = $2 AND password_hash IS NULL', [
        u.orgId,
        u.id,
        u.passwordHash,
      ]);
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
