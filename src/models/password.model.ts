import { AppError } from '../errors.js';
import { queryAsSystem, queryAsTenant, withTenant } from '../db/tenancy.js';
import type { Database } from '../infra/database.js';
import type { RequestContext, RequestMeta } from '../types/context.js';
import { appendAuditLog, SYSTEM_ACTOR, userActor } from './audit.model.js';
import { endSessionsOfUser, isSessionLive } from './session.model.js';
import { normaliseEmail, toUser, type User, type UserRow } from './user.model.js';
import { userColumns } from './userColumns.js';

/**
 * Users' passwords (users.password_hash, migration 007): the argon2id hash in PHC form, or null
 * for a user who signs in another way. Hashing and verifying happen in src/auth/passwords.ts;
 * this module only reads and writes hashes. A hash never leaves the server.
 */

const U_COLUMNS = userColumns('u');

export interface LoginCandidate {
  orgId: string;
  /** The live user with this email in the org, or null. */
  user: User | null;
  passwordHash: string | null;
}

/**
 * The org (live, by slug) and, in it, the live user with this email and their password hash.
 * Null when there is no such org. One statement, the same whether or not the user exists, so the
 * two cases take the same time. Before sign-in the org is not known: the system path.
 */
export async function findLoginCandidate(db: Database, orgSlug: string, email: string): Promise<LoginCandidate | null> {
  const { rows } = await queryAsSystem<{ org: string } & { [K in keyof UserRow]: UserRow[K] | null } & { password_hash: string | null }>(
    db,
    `SELECT o.id AS org, ${U_COLUMNS}, u.password_hash
       FROM orgs o
       LEFT JOIN users u ON u.org_id = o.id AND u.email = $2 AND u.deleted_at IS NULL
      WHERE o.slug = $1 AND o.deleted_at IS NULL`,
    [orgSlug, normaliseEmail(email)],
    'login_candidate',
  );
  const r = rows[0];
  if (!r) return null;
  return { orgId: r.org, user: r.id ? toUser(r as UserRow) : null, passwordHash: r.id ? r.password_hash : null };
}

/** The caller's current password hash (null: none set). The caller must be a user, not an API key. */
export async function findOwnPasswordHash(db: Database, ctx: RequestContext): Promise<{ user: User; passwordHash: string | null } | null> {
  const { rows } = await queryAsTenant<UserRow & { password_hash: string | null }>(
    db,
    ctx.orgId,
    `SELECT ${U_COLUMNS}, u.password_hash FROM users u WHERE u.org_id = $1 AND u.id = $2 AND u.deleted_at IS NULL`,
    [ctx.orgId, ctx.userId],
  );
  const r = rows[0];
  return r ? { user: toUser(r), passwordHash: r.password_hash } : null;
}

/**
 * Replaces the caller's password, provided it is still `expectedHash` (what the caller proved to
 * know, or null for a first password): a concurrent change wins and this one is refused (403, as
a wrong current password is).
 * Every session of the user but the caller's own ends, in the same transaction; one audit entry.
 */
export async function changeOwnPassword(
  db: Database,
  ctx: RequestContext,
  expectedHash: string | null,
  newHash: string,
  meta: RequestMeta,
): Promise<{ sessionsEnded: number }> {
  return withTenant(db, ctx.orgId, async (tx) => {
    await tx.query('SELECT lock_org($1)', [ctx.orgId]);
    // A session ended while the request was on its way changes nothing.
    if (ctx.authMethod === 'password' && ctx.credentialId && !(await isSessionLive(tx, ctx.orgId, ctx.credentialId))) {
      throw new AppError('unauthorized', 'Session has ended');
    }
    const { rowCount } = await tx.query(
      `UPDATE users SET password_hash = $3
        WHERE org_id = $1 AND id = $2 AND deleted_at IS NULL AND password_hash IS NOT DISTINCT FROM $4::text`,
      [ctx.orgId, ctx.userId, newHash, expectedHash],
    );
    if (rowCount !== 1) throw new AppError('forbidden', 'currentPassword: does not match your password (it was changed meanwhile)');
    const keep = ctx.authMethod === 'password' ? ctx.credentialId : null;
    const ended = await endSessionsOfUser(tx, ctx.orgId, ctx.userId, keep, 'password_changed');
    await appendAuditLog(tx, ctx.orgId, {
      action: 'user.password_changed',
      actor: userActor(ctx),
      target: { type: 'user', id: ctx.userId },
      request: meta,
      metadata: { firstPassword: expectedHash === null, sessionsEnded: ended.length },
    });
    return { sessionsEnded: ended.length };
  });
}

/**
 * An operator sets a user's password (npm run user:password): every session of the user ends.
 * Audited as the system. Null when the org or user does not exist.
 */
export async function setPasswordAsOperator(
  db: Database,
  orgSlug: string,
  email: string,
  newHash: string,
): Promise<{ orgId: string; userId: string; sessionsEnded: number } | null> {
  const { rows } = await queryAsSystem<{ org_id: string; id: string }>(
    db,
    `SELECT u.org_id, u.id FROM users u JOIN orgs o ON o.id = u.org_id
      WHERE o.slug = $1 AND o.deleted_at IS NULL AND u.email = $2 AND u.deleted_at IS NULL`,
    [orgSlug, normaliseEmail(email)],
  );
  const found = rows[0];
  if (!found) return null;
  const { org_id: orgId, id: userId } = found;
  return withTenant(db, orgId, async (tx) => {
    await tx.query('SELECT lock_org($1)', [orgId]);
    const { rowCount } = await tx.query('UPDATE users SET password_hash = $3 WHERE org_id = $1 AND id = $2 AND deleted_at IS NULL', [
      orgId,
      userId,
      newHash,
    ]);
    if (rowCount !== 1) return null;
    const ended = await endSessionsOfUser(tx, orgId, userId, null, 'password_reset');
    await appendAuditLog(tx, orgId, {
      action: 'user.password_changed',
      actor: SYSTEM_ACTOR,
      target: { type: 'user', id: userId },
      metadata: { by: 'operator', sessionsEnded: ended.length },
    });
    return { orgId, userId, sessionsEnded: ended.length };
  });
}
