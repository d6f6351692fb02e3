import { pageCursor } from './cursor.js';
import { createHash } from 'node:crypto';
import { queryAsSystem, queryAsTenant, withTenant, type SystemTx, type TenantTx } from '../db/tenancy.js';
import type { Database } from '../infra/database.js';
import type { RequestContext, RequestMeta } from '../types/context.js';

/**
 * The audit log (audit_logs, migration 005): who did what to which object of an org, appended in
 * the same transaction as the change it records. The database numbers and chains the rows (a
 * trigger); this module writes, lists and verifies them.
 */

export const AUDIT_ACTIONS = [
  'org.created',
  'org.deleted',
  'user.created',
  'user.updated',
  'user.role_changed',
  'user.deleted',
  'user.password_changed',
  'session.created',
  'session.refreshed',
  'session.revoked',
  'session.reuse_detected',
  'org_limits.changed',
  'api_key.created',
  'api_key.revoked',
  'auth.failed',
  'access.denied',
] as const;
export type AuditAction = (typeof AUDIT_ACTIONS)[number];

export const ACTOR_TYPES = ['user', 'api_key', 'system'] as const;
export type ActorType = (typeof ACTOR_TYPES)[number];

export interface AuditActor {
  readonly type: ActorType;
  /** null for the system. */
  readonly id: string | null;
  readonly email: string | null;
}

export const SYSTEM_ACTOR: AuditActor = { type: 'system', id: null, email: null };

/**
 * The actor id of a refused credential that named an email which is no user of the org (an OIDC
 * token, a sign-in attempt): the column needs one, and this one is nobody's.
 */
export const NO_USER_ID = '00000000-0000-0000-0000-000000000000';

/** The caller as an audit actor: the user, or the API key it authenticated with. */
export const userActor = (ctx: RequestContext): AuditActor =>
  ctx.authMethod === 'api_key' ? { type: 'api_key', id: ctx.userId, email: null } : { type: 'user', id: ctx.userId, email: ctx.email };

export interface AuditTarget {
  readonly type: string;
  readonly id: string;
}

export interface AuditEvent {
  readonly action: AuditAction;
  readonly actor: AuditActor;
  readonly target?: AuditTarget | null;
  readonly request?: RequestMeta | null;
  readonly metadata?: Record<string, unknown>;
}

const clip = (s: string | null | undefined, max: number): string | null => (s ? s.slice(0, max) : null);

/**
 * Appends one row to the org's chain, inside the caller's transaction: the change and its record
 * commit together or not at all. The trigger takes the org's lock and sets seq, time and hash.
 */
export async function appendAuditLog(tx: TenantTx | SystemTx, orgId: string, event: AuditEvent): Promise<void> {
  await tx.query(
    `INSERT INTO audit_logs (org_id, actor_type, actor_id, actor_email, action, target_type, target_id,
                             request_id, ip, user_agent, metadata)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)`,
    [
      orgId,
      event.actor.type,
      event.actor.id,
      clip(event.actor.email, 255),
      event.action,
      event.target?.type ?? null,
      event.target?.id ?? null,
      clip(event.request?.requestId, 128),
      clip(event.request?.ip, 64),
      clip(event.request?.userAgent, 512),
      JSON.stringify(event.metadata ?? {}),
    ],
  );
}

/**
 * An event that changes nothing else (a refused request), in a transaction of its own as the
 * tenant of `orgId`. Written only while the org exists and is live; returns whether it was.
 */
export async function recordAuditEvent(db: Database, orgId: string, event: AuditEvent): Promise<boolean> {
  return withTenant(db, orgId, async (tx) => {
    const { rowCount } = await tx.query('SELECT 1 FROM orgs WHERE id = $1 AND deleted_at IS NULL', [orgId]);
    if (rowCount !== 1) return false;
    await appendAuditLog(tx, orgId, event);
    return true;
  });
}

// ---------------------------------------------------------------------------------------------
// Listing

export interface AuditLogEntry {
  id: string;
  seq: number;
  occurredAt: Date;
  actor: AuditActor;
  action: string;
  target: AuditTarget | null;
  requestId: string | null;
  ip: string | null;
  userAgent: string | null;
  metadata: Record<string, unknown>;
  hash: string;
}

interface AuditRow {
  id: string;
  seq: string;
  occurred_at: Date;
  actor_type: ActorType;
  actor_id: string | null;
  actor_email: string | null;
  action: string;
  target_type: string | null;
  target_id: string | null;
  request_id: string | null;
  ip: string | null;
  user_agent: string | null;
  metadata: Record<string, unknown>;
  hash: string;
}

const toEntry = (r: AuditRow): AuditLogEntry => ({
  id: r.id,
  seq: Number(r.seq),
  occurredAt: r.occurred_at,
  actor: { type: r.actor_type, id: r.actor_id, email: r.actor_email },
  action: r.action,
  target: r.target_type && r.target_id ? { type: r.target_type, id: r.target_id } : null,
  requestId: r.request_id,
  ip: r.ip,
  userAgent: r.user_agent,
  metadata: r.metadata,
  hash: r.hash,
});

export interface AuditLogFilter {
  limit: number;
  cursor?: string | undefined;
  action?: string | undefined;
  actorType?: ActorType | undefined;
  actorId?: string | undefined;
  /** Inclusive. */
  since?: Date | undefined;
  /** Exclusive. */
  until?: Date | undefined;
}

export interface AuditLogPage {
  entries: AuditLogEntry[];
  nextCursor: string | null;
}

// The cursor names the position (seq) of the last entry shown. seq counts this org's own entries
// only, so it says nothing about other tenants.
const pages = pageCursor('a1:', /^[1-9]\d{0,17}$/);

/** Newest first, keyset pagination on seq; one statement. */
export async function listAuditLogs(db: Database, orgId: string, filter: AuditLogFilter): Promise<AuditLogPage> {
  const beforeSeq = filter.cursor ? pages.decode(filter.cursor) : null;
  const { rows } = await queryAsTenant<AuditRow>(
    db,
    orgId,
    `SELECT id, seq::text AS seq, occurred_at, actor_type, actor_id, actor_email, action, target_type, target_id,
            request_id, ip, user_agent, metadata, hash
       FROM audit_logs a
      WHERE org_id = $1
        AND ($2::bigint IS NULL OR a.seq < $2::bigint)
        AND ($3::text IS NULL OR action = $3::text)
        AND ($4::text IS NULL OR actor_type = $4::text)
        AND ($5::uuid IS NULL OR actor_id = $5::uuid)
        AND ($6::timestamptz IS NULL OR occurred_at >= $6::timestamptz)
        AND ($7::timestamptz IS NULL OR occurred_at < $7::timestamptz)
      ORDER BY a.seq DESC
      LIMIT $8`,
    [
      orgId,
      beforeSeq,
      filter.action ?? null,
      filter.actorType ?? null,
      filter.actorId ?? null,
      filter.since?.toISOString() ?? null,
      filter.until?.toISOString() ?? null,
      filter.limit + 1,
    ],
  );
  const page = rows.slice(0, filter.limit);
  const last = page[page.length - 1];
  return {
    entries: page.map(toEntry),
    nextCursor: rows.length > filter.limit && last ? pages.encode(last.seq) : null,
  };
}

// ---------------------------------------------------------------------------------------------
// Verification

export interface ChainReport {
  orgId: string;
  /** Rows checked. */
  rows: number;
  /** The hash of the last row checked: record it elsewhere to detect a truncated tail later. */
  head: string | null;
  /** The first broken link, or null when the chain is whole. */
  broken: { seq: number; id: string; reason: 'hash_mismatch' | 'sequence_gap'; expected: string; found: string } | null;
}

const VERIFY_PAGE = 1_000;

/** The orgs whose chains to verify: one slug, or all (deleted orgs too: their history stays). */
export async function orgsToVerify(db: Database, slug?: string): Promise<{ id: string; slug: string }[]> {
  const { rows } = await queryAsSystem<{ id: string; slug: string }>(
    db,
    'SELECT id, slug FROM orgs WHERE $1::text IS NULL OR slug = $1::text ORDER BY slug',
    [slug ?? null],
  );
  return rows;
}

/**
 * Walks an org's chain from its first row: every seq follows the previous one by exactly 1 and
 * every hash is sha256(previous hash + canonical form). The canonical form comes from the
 * database's own function; the hashing is redone here, independently of the trigger.
 * Cross-tenant operator work: the system path.
 */
export async function verifyAuditChain(db: Database, orgId: string): Promise<ChainReport> {
  let prevHash = '';
  let prevSeq = 0;
  let checked = 0;
  for (;;) {
    const { rows } = await queryAsSystem<{ id: string; seq: string; hash: string; canonical: string }>(
      db,
      `SELECT a.id, a.seq::text AS seq, a.hash, audit_log_canonical(a) AS canonical
         FROM audit_logs a
        WHERE a.org_id = $1 AND a.seq > $2::bigint
        ORDER BY a.seq
        LIMIT $3`,
      [orgId, String(prevSeq), VERIFY_PAGE],
    );
    for (const r of rows) {
      const seq = Number(r.seq);
      if (seq !== prevSeq + 1) {
        return {
          orgId,
          rows: checked,
          head: prevHash || null,
          broken: { seq, id: r.id, reason: 'sequence_gap', expected: `seq ${prevSeq + 1}`, found: `seq ${seq}` },
        };
      }
      const expected = createHash('sha256').update(prevHash + r.canonical, 'utf8').digest('hex');
      if (expected !== r.hash) {
        return { orgId, rows: checked, head: prevHash || null, broken: { seq, id: r.id, reason: 'hash_mismatch', expected, found: r.hash } };
      }
      prevHash = r.hash;
      prevSeq = seq;
      checked++;
    }
    if (rows.length < VERIFY_PAGE) return { orgId, rows: checked, head: prevHash || null, broken: null };
  }
}
