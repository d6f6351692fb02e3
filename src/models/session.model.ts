import { queryAsSystem, queryAsTenant, withTenant, type TenantTx } from '../db/tenancy.js';
import type { Database } from '../infra/database.js';
import type { RequestMeta } from '../types/context.js';
import { appendAuditLog, type AuditActor } from './audit.model.js';
import { ORG_LIMITS_SELECT, type OrgLimitOverrides } from './orgLimits.model.js';
import { authLookupOf, toUser, type AuthLookupRow, type User, type UserRow } from './user.model.js';
import { userColumns } from './userColumns.js';

/**
 * Sessions (migration 007): one row per refresh token, grouped by session (the family of tokens
 * of one sign-in). Tokens arrive hashed (SHA-256, hex); nothing here sees a token.
 *
 * Every transaction that changes a user's sessions takes, in this order, the org's lock (the one
 * every change of an org's users and audit chain takes first: lock_org) and the user's row (FOR
 * NO KEY UPDATE), as a role change or deletion does: changes to one user's sessions happen one
 * after the other, each statement after the locks sees every token the previous holder created
 * (that is what makes a family revocation reach the token a concurrent refresh has just issued),
 * and the same order everywhere leaves no room for a deadlock.
 */

const U_COLUMNS = userColumns('u');
const LIVE_ORG = 'EXISTS (SELECT 1 FROM orgs o WHERE o.id = u.org_id AND o.deleted_at IS NULL)';

export interface SessionTokenInput {
  /** SHA-256 of the new refresh token, hex. */
  tokenHash: string;
  ttlSeconds: number;
}

const sessionTarget = (id: string) => ({ type: 'session', id });
const actorOf = (u: Pick<User, 'id' | 'email'>): AuditActor => ({ type: 'user', id: u.id, email: u.email });

const clip = (s: string | null, max: number) => (s ? s.slice(0, max) : null);

async function insertToken(tx: TenantTx, orgId: string, sessionId: string, userId: string, token: SessionTokenInput, meta: RequestMeta): Promise<string> {
  const { rows } = await tx.query<{ id: string }>(
    `INSERT INTO sessions (org_id, session_id, user_id, token_hash, expires_at, ip, user_agent)
     VALUES ($1, $2, $3, decode($4, 'hex'), now() + make_interval(secs => $5), $6, $7)
     RETURNING id`,
    [orgId, sessionId, userId, token.tokenHash, token.ttlSeconds, clip(meta.ip, 64), clip(meta.userAgent, 512)],
  );
  return rows[0]!.id;
}

/** Takes the org's lock, then the live user's row (see the note at the top); null when there is no such user. */
async function lockLiveUser(tx: TenantTx, orgId: string, userId: string, passwordHash?: string): Promise<User | null> {
  await tx.query('SELECT lock_org($1)', [orgId]);
  const { rows } = await tx.query<UserRow>(
    `SELECT ${U_COLUMNS} FROM users u
      WHERE u.org_id = $1 AND u.id = $2 AND u.deleted_at IS NULL AND ${LIVE_ORG}
        AND ($3::text IS NULL OR u.password_hash = $3::text)
      FOR NO KEY UPDATE OF u`,
    [orgId, userId, passwordHash ?? null],
  );
  return rows[0] ? toUser(rows[0]) : null;
}

/**
 * Starts a session for a user who has just proved their password: null when, meanwhile, the user
 * was deleted or their password changed (then the proof no longer holds).
 */
export async function createSession(
  db: Database,
  orgId: string,
  userId: string,
  verifiedHash: string,
  token: SessionTokenInput,
  meta: RequestMeta,
): Promise<{ sessionId: string; user: User } | null> {
  return withTenant(db, orgId, async (tx) => {
    const user = await lockLiveUser(tx, orgId, userId, verifiedHash);
    if (!user) return null;
    const { rows } = await tx.query<{ id: string }>('SELECT gen_random_uuid() AS id');
    const sessionId = rows[0]!.id;
    await insertToken(tx, orgId, sessionId, userId, token, meta);
    await appendAuditLog(tx, orgId, { action: 'session.created', actor: actorOf(user), target: sessionTarget(sessionId), request: meta });
    return { sessionId, user };
  });
}

/** The org of a refresh token, by its hash: the one lookup made before the org is known. */
async function orgOfToken(db: Database, tokenHash: string): Promise<{ orgId: string; userId: string } | null> {
  const { rows } = await queryAsSystem<{ org_id: string; user_id: string }>(
    db,
    `SELECT org_id, user_id FROM sessions WHERE token_hash = decode($1, 'hex')`,
    [tokenHash],
    'session_token_org',
  );
  return rows[0] ? { orgId: rows[0].org_id, userId: rows[0].user_id } : null;
}

interface TokenState {
  id: string;
  session_id: string;
  user_id: string;
  used: boolean;
  revoked: boolean;
  expired: boolean;
}

async function tokenState(tx: TenantTx, orgId: string, tokenHash: string): Promise<TokenState | null> {
  const { rows } = await tx.query<TokenState>(
    `SELECT id, session_id, user_id, used_at IS NOT NULL AS used, revoked_at IS NOT NULL AS revoked, expires_at <= now() AS expired
       FROM sessions WHERE org_id = $1 AND token_hash = decode($2, 'hex')`,
    [orgId, tokenHash],
  );
  return rows[0] ?? null;
}

/** Ends every live token of a session; returns whether any was live. */
async function revokeFamily(tx: TenantTx, orgId: string, sessionId: string, reason: string): Promise<boolean> {
  const { rowCount } = await tx.query(
    `UPDATE sessions SET revoked_at = now(), revoked_reason = $3
      WHERE org_id = $1 AND session_id = $2 AND revoked_at IS NULL`,
    [orgId, sessionId, reason],
  );
  return rowCount > 0;
}

export type RefreshOutcome =
  | { kind: 'rotated'; orgId: string; sessionId: string; user: User }
  /** A token already exchanged: the whole session has just been revoked. */
  | { kind: 'reused'; orgId: string; sessionId: string; userId: string }
  /** Unknown, expired, revoked, or its user or org is gone. `orgId` when the token was ours. */
  | { kind: 'refused'; orgId: string | null; userId: string | null };

/**
 * Exchanges a refresh token for a new one of the same session. The old one is marked used (and
 * replaced_by the new one); presenting it again revokes the whole session (RFC 9700, refresh
 * token rotation): of two parties holding the same token, one is not its owner.
 */
export async function rotateRefreshToken(db: Database, oldTokenHash: string, next: SessionTokenInput, meta: RequestMeta): Promise<RefreshOutcome> {
  const found = await orgOfToken(db, oldTokenHash);
  if (!found) return { kind: 'refused', orgId: null, userId: null };
  const { orgId } = found;
  const refused: RefreshOutcome = { kind: 'refused', orgId, userId: found.userId };
  return withTenant(db, orgId, async (tx) => {
    const user = await lockLiveUser(tx, orgId, found.userId);
    const state = await tokenState(tx, orgId, oldTokenHash);
    if (!state || state.revoked) return refused;
    if (state.used) {
      await revokeFamily(tx, orgId, state.session_id, 'reuse_detected');
      await appendAuditLog(tx, orgId, {
        action: 'session.reuse_detected',
        actor: { type: 'user', id: state.user_id, email: user?.email ?? null },
        target: sessionTarget(state.session_id),
        request: meta,
        metadata: { reason: 'a refresh token was presented again after it had been exchanged; the session is revoked' },
      });
      return { kind: 'reused', orgId, sessionId: state.session_id, userId: state.user_id };
    }
    if (state.expired || !user) return refused;
    const newId = await insertToken(tx, orgId, state.session_id, user.id, next, meta);
    await tx.query('UPDATE sessions SET used_at = now(), replaced_by = $3 WHERE org_id = $1 AND id = $2', [orgId, state.id, newId]);
    await appendAuditLog(tx, orgId, { action: 'session.refreshed', actor: actorOf(user), target: sessionTarget(state.session_id), request: meta });
    return { kind: 'rotated', orgId, sessionId: state.session_id, user };
  });
}

export type LogoutOutcome =
  | { kind: 'ended'; orgId: string; sessionId: string }
  | { kind: 'already_ended'; orgId: string; sessionId: string }
  | { kind: 'unknown' };

/**
 * Ends the session a refresh token belongs to, whichever of its tokens it is (the current one,
 * or one already exchanged: its holder wants the session gone, and so would its owner).
 */
export async function endSessionByRefreshToken(db: Database, tokenHash: string, meta: RequestMeta): Promise<LogoutOutcome> {
  const found = await orgOfToken(db, tokenHash);
  if (!found) return { kind: 'unknown' };
  const { orgId } = found;
  return withTenant(db, orgId, async (tx) => {
    const user = await lockLiveUser(tx, orgId, found.userId);
    const state = await tokenState(tx, orgId, tokenHash);
    if (!state) return { kind: 'unknown' };
    const sessionId = state.session_id;
    if (!(await revokeFamily(tx, orgId, sessionId, 'logout'))) return { kind: 'already_ended', orgId, sessionId };
    await appendAuditLog(tx, orgId, {
      action: 'session.revoked',
      actor: { type: 'user', id: state.user_id, email: user?.email ?? null },
      target: sessionTarget(sessionId),
      request: meta,
      metadata: { reason: 'logout' },
    });
    return { kind: 'ended', orgId, sessionId };
  });
}

/**
 * Ends every session of a user but `keepSessionId` (null: all of them), inside the caller's
 * transaction, which must hold the user's row. Returns the sessions ended.
 */
export async function endSessionsOfUser(
  tx: TenantTx,
  orgId: string,
  userId: string,
  keepSessionId: string | null,
  reason: 'password_changed' | 'password_reset',
): Promise<string[]> {
  const { rows } = await tx.query<{ session_id: string }>(
    `UPDATE sessions SET revoked_at = now(), revoked_reason = $4
      WHERE org_id = $1 AND user_id = $2 AND revoked_at IS NULL AND session_id IS DISTINCT FROM $3::uuid
      RETURNING session_id`,
    [orgId, userId, keepSessionId, reason],
  );
  return [...new Set(rows.map((r) => r.session_id))];
}

/** Whether a session is live, inside a transaction of its org (the models' re-check under the lock). */
export async function isSessionLive(tx: TenantTx, orgId: string, sessionId: string): Promise<boolean> {
  const { rowCount } = await tx.query('SELECT 1 FROM sessions WHERE org_id = $1 AND session_id = $2 AND revoked_at IS NULL LIMIT 1', [
    orgId,
    sessionId,
  ]);
  return rowCount > 0;
}

// ---------------------------------------------------------------------------------------------
// Authentication lookup of an access token

export interface SessionLookup {
  orgExists: boolean;
  /** The user of the session, when the session is live and the user and org are too. */
  user: User | null;
  limitOverrides: OrgLimitOverrides;
}

// The org comes from a token we signed: the tenant path, scoped to it.
const SESSION_CALLER_SQL = `SELECT EXISTS (SELECT 1 FROM orgs WHERE id = $1 AND deleted_at IS NULL) AS org_exists,
            ${U_COLUMNS}, ${ORG_LIMITS_SELECT}
       FROM (SELECT 1) AS one
       LEFT JOIN LATERAL (
         SELECT s.user_id FROM sessions s
          WHERE s.org_id = $1 AND s.session_id = $2 AND s.revoked_at IS NULL
          LIMIT 1
       ) s ON true
       LEFT JOIN users u ON u.org_id = $1 AND u.id = s.user_id AND u.deleted_at IS NULL
       LEFT JOIN org_limits l ON l.org_id = $1`;

export async function findSessionCaller(db: Database, orgId: string, sessionId: string): Promise<SessionLookup> {
  const { rows } = await queryAsTenant<AuthLookupRow>(db, orgId, SESSION_CALLER_SQL, [orgId, sessionId], 'session_caller');
  return authLookupOf(rows[0]);
}

// ---------------------------------------------------------------------------------------------
// Pruning

/**
 * Deletes the rows of tokens that ended more than `graceSeconds` ago (expired, or revoked with
 * their session), in batches of `batchSize`, oldest first; returns how many went. Cross-tenant
 * housekeeping, so the system path.
 *
 * A used token points at its successor (replaced_by), so a row goes only when no row that stays
 * points at it; taking the oldest first deletes a chain's older links with (or before) the newer
 * ones. Rows of live sessions that are still valid are never touched: neither are their used
 * tokens, whose reuse must still be recognised until they expire.
 */
export async function pruneEndedSessions(db: Database, opts: { graceSeconds: number; batchSize: number; maxBatches: number }): Promise<number> {
  let total = 0;
  for (let i = 0; i < opts.maxBatches; i++) {
    const { rowCount } = await queryAsSystem(
      db,
      `WITH ended AS (
         SELECT s.org_id, s.id FROM sessions s
          WHERE (s.expires_at < now() - make_interval(secs => $1) OR s.revoked_at < now() - make_interval(secs => $1))
            AND NOT EXISTS (
              SELECT 1 FROM sessions r
               WHERE r.org_id = s.org_id AND r.replaced_by = s.id
                 AND r.expires_at >= now() - make_interval(secs => $1)
                 AND (r.revoked_at IS NULL OR r.revoked_at >= now() - make_interval(secs => $1)))
          ORDER BY s.created_at
          LIMIT $2)
       DELETE FROM sessions d USING ended e WHERE d.org_id = e.org_id AND d.id = e.id`,
      [opts.graceSeconds, opts.batchSize],
    );
    total += rowCount;
    if (rowCount < opts.batchSize) break;
  }
  return total;
}
