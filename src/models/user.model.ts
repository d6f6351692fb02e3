import { pageCursor, UUID_VALUE } from './cursor.js';
import { userColumns } from './userColumns.js';
import { AppError, notFound } from '../errors.js';
import { queryAsSystem, queryAsTenant, withTenant, type TenantTx } from '../db/tenancy.js';
import type { Database } from '../infra/database.js';
import { ROLES, type CallerMemo, type RequestContext, type RequestMeta, type Role } from '../types/context.js';
import { appendAuditLog, userActor } from './audit.model.js';
import { lookupOverridesFromRow, NO_OVERRIDES, ORG_LIMITS_SELECT, type OrgLimitOverrides } from './orgLimits.model.js';
import { isSessionLive } from './session.model.js';

/**
 * Users always live inside an org: every function takes the org id (or the caller's context),
 * runs as the tenant of that org (src/db/tenancy.ts) and every statement filters on it as well.
 * Soft-deleted users do not exist for any of them. Every change is audited in its transaction.
 */

export interface User {
  id: string;
  orgId: string;
  email: string;
  name: string | null;
  role: Role;
  /**
   * ISO 8601 (UTC, milliseconds), as the API shows it. A string rather than a Date: the auth
   * cache holds one User per cached caller, a Date costs three times the memory of the string,
   * and GET /v1/me would otherwise format both on every request.
   */
  createdAt: string;
  updatedAt: string;
}

export interface UserRow {
  id: string;
  org_id: string;
  email: string;
  name: string | null;
  role: Role;
  /** Written by PostgreSQL as the API shows it (userColumns). */
  created_at: string;
  updated_at: string;
}

const COLUMNS = userColumns();

// The driver makes a new string of every value it reads: a User takes the role from these
// constants instead, one string for all users rather than one each (cached users add up).
const ROLE_CONSTANTS = new Map<string, Role>(ROLES.map((r) => [r, r]));

export const toUser = (r: UserRow): User => {
  const createdAt = r.created_at;
  const updatedAt = r.updated_at;
  return {
    id: r.id,
    orgId: r.org_id,
    email: r.email,
    name: r.name,
    role: ROLE_CONSTANTS.get(r.role) ?? r.role,
    createdAt,
    // A user never changed since creation (most of them) shares one string for both.
    updatedAt: updatedAt === createdAt ? createdAt : updatedAt,
  };
};

export const normaliseEmail = (email: string): string => email.trim().toLowerCase();

// ---------------------------------------------------------------------------------------------
// Authentication lookup: the one query that runs before the org is trusted.

/**
 * An authentication lookup's answer. It is also the caller's memo (CallerMemo): it lives exactly
 * as long as one answer about the caller is used, so what a module keeps per caller (the rate
 * limiter's lease) goes in its `lease` field rather than in an object of its own.
 */
export interface AuthLookup extends CallerMemo {
  orgExists: boolean;
  /**
   * The live user with this id in a live org, whichever org that is; null when the claimed org
   * does not exist (the answer is then 401 whoever the user is). The whole user, so that what a
   * request needs to know about its caller (GET /v1/me) costs no second query.
   */
  user: User | null;
  /**
   * The claimed org's limit overrides, read in the same round trip so a change made with the
   * limits CLI applies to the very next request.
   */
  limitOverrides: OrgLimitOverrides;
}

// User ids are unique only within an org; should two orgs ever hold the same id, the claimed
// org's user is the one found.
const AUTH_IDENTITY_SQL = `SELECT EXISTS (SELECT 1 FROM orgs WHERE id = $1 AND deleted_at IS NULL) AS org_exists,
            u.id, u.org_id, u.email, u.name, u.role, u.created_at, u.updated_at, ${ORG_LIMITS_SELECT}
       FROM (SELECT 1) AS one
       LEFT JOIN LATERAL (
         SELECT ${COLUMNS} FROM users u
          WHERE u.id = $2 AND u.deleted_at IS NULL
            AND EXISTS (SELECT 1 FROM orgs uo WHERE uo.id = u.org_id AND uo.deleted_at IS NULL)
          ORDER BY u.org_id = $1 DESC
          LIMIT 1
       ) u ON true
       LEFT JOIN org_limits l ON l.org_id = $1`;

/** A row of an authentication lookup: whether the org exists, the user's columns (null when none), the org's limits. */
export type AuthLookupRow = { org_exists: boolean } & { [K in keyof UserRow]: UserRow[K] | null };

/** The AuthLookup one such row (or none) describes. */
export function authLookupOf(r: AuthLookupRow | undefined): AuthLookup {
  const orgExists = Boolean(r?.org_exists);
  const user = orgExists && r?.id ? toUser(r as UserRow) : null;
  return {
    orgExists,
    user,
    limitOverrides: r ? lookupOverridesFromRow(r) : NO_OVERRIDES,
    lease: undefined,
  };
}

/** Cross-tenant by nature (the org is not trusted yet), so it takes the named system path. */
export async function findAuthIdentity(db: Database, orgId: string, userId: string): Promise<AuthLookup> {
  const { rows } = await queryAsSystem<AuthLookupRow>(db, AUTH_IDENTITY_SQL, [orgId, userId], 'auth_identity');
  return authLookupOf(rows[0]);
}

/** An authentication lookup by org (id or slug) and email: an identity provider's token names no user id. */
export interface EmailAuthLookup extends AuthLookup {
  /** The org's id when it exists and is live, else null. */
  orgId: string | null;
}

const authByEmailSql = (orgIs: string) => `SELECT o.id AS found_org_id,
            ${userColumns('u')}, ${ORG_LIMITS_SELECT}
       FROM orgs o
       LEFT JOIN users u ON u.org_id = o.id AND u.email = $2 AND u.deleted_at IS NULL
       LEFT JOIN org_limits l ON l.org_id = o.id
      WHERE ${orgIs} AND o.deleted_at IS NULL`;
const AUTH_BY_EMAIL_ORG_ID_SQL = authByEmailSql('o.id = $1::uuid');
const AUTH_BY_EMAIL_ORG_SLUG_SQL = authByEmailSql('o.slug = $1');

/**
 * The live user with this email in the live org named by its id or slug (system path: the org is
 * not trusted yet). `email` must be normalised (normaliseEmail), as stored.
 */
export async function findAuthIdentityByEmail(db: Database, org: { id: string } | { slug: string }, email: string): Promise<EmailAuthLookup> {
  const byId = 'id' in org;
  const { rows } = await queryAsSystem<{ found_org_id: string } & { [K in keyof UserRow]: UserRow[K] | null }>(
    db,
    byId ? AUTH_BY_EMAIL_ORG_ID_SQL : AUTH_BY_EMAIL_ORG_SLUG_SQL,
    [byId ? org.id : org.slug, email],
    byId ? 'auth_identity_email_org_id' : 'auth_identity_email_org_slug',
  );
  const r = rows[0];
  return {
    orgExists: r !== undefined,
    orgId: r?.found_org_id ?? null,
    user: r?.id ? toUser(r as UserRow) : null,
    limitOverrides: r ? lookupOverridesFromRow(r) : NO_OVERRIDES,
  };
}

// ---------------------------------------------------------------------------------------------
// Reads

export async function findUserInOrg(db: Database, orgId: string, userId: string): Promise<User | null> {
  const { rows } = await queryAsTenant<UserRow>(
    db,
    orgId,
    `SELECT ${COLUMNS} FROM users WHERE org_id = $1 AND id = $2 AND deleted_at IS NULL`,
    [orgId, userId],
    'user_in_org',
  );
  return rows[0] ? toUser(rows[0]) : null;
}

export interface UserPage {
  users: User[];
  nextCursor: string | null;
}

/** A page of an org's live users after an optional anchor ($2), in creation order. Exported for bench/rls.ts. */
export const USERS_PAGE_SQL = `SELECT ${COLUMNS} FROM users
      WHERE org_id = $1 AND deleted_at IS NULL
        AND ($2::uuid IS NULL OR seq > (SELECT a.seq FROM users a WHERE a.org_id = $1 AND a.id = $2::uuid))
      ORDER BY seq
      LIMIT $3`;

/**
 * Keyset pagination in creation order. The cursor is opaque to clients; it names the last user
 * of the previous page (and nothing else: not a count or a sequence number that would say how
 * many users other tenants have).
 */
export async function listUsersInOrg(
  db: Database,
  orgId: string,
  opts: { limit: number; cursor?: string | undefined },
): Promise<UserPage> {
  const afterId = opts.cursor ? pages.decode(opts.cursor) : null;
  // Deleted users still anchor a cursor: deleting a user must not break a client mid-listing.
  const { rows } = await queryAsTenant<UserRow>(db, orgId, USERS_PAGE_SQL, [orgId, afterId, opts.limit + 1], 'users_page');
  // An empty page after a cursor: the end of the list, or a cursor that names no user of this
  // org (seq > NULL matches nothing). Only then is a second look needed.
  if (afterId && rows.length === 0) {
    const anchor = await queryAsTenant(db, orgId, 'SELECT 1 FROM users WHERE org_id = $1 AND id = $2', [orgId, afterId]);
    if (anchor.rowCount === 0) throw pages.invalid();
  }
  const page = rows.slice(0, opts.limit);
  const last = page[page.length - 1];
  return {
    users: page.map(toUser),
    nextCursor: rows.length > opts.limit && last ? pages.encode(last.id) : null,
  };
}

const pages = pageCursor('u1:', UUID_VALUE);

// ---------------------------------------------------------------------------------------------
// Writes, with the role rules: members read; admins manage members and admins; only owners
// manage owners; an org always keeps at least one owner.

const canManageUsers = (role: Role) => role === 'owner' || role === 'admin';
const insufficientRole = (what: string) => new AppError('forbidden', `Your role does not allow you to ${what}`);

/**
 * Serialises changes within one org (so two concurrent demotions cannot remove both owners, and
 * the audit chain gets one writer at a time) and returns the caller's role as it is now, under
 * the lock: a caller demoted or deleted while the request was on its way acts with what they
 * have now, not what they had at authentication. An API key caller acts with its key's role,
 * while the key is neither revoked nor expired.
 */
export async function lockOrgAsCaller(tx: TenantTx, ctx: RequestContext): Promise<Role> {
  await tx.query('SELECT lock_org($1)', [ctx.orgId]);
  // A separate statement on purpose: under READ COMMITTED it takes a new snapshot, so it sees
  // what a transaction that held the lock before us committed.
  const { rows } = await tx.query<{ role: Role }>(
    ctx.authMethod === 'api_key'
      ? `SELECT k.role FROM api_keys k
          WHERE k.org_id = $1 AND k.id = $2 AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())
            AND EXISTS (SELECT 1 FROM orgs o WHERE o.id = k.org_id AND o.deleted_at IS NULL)`
      : `SELECT u.role FROM users u
          WHERE u.org_id = $1 AND u.id = $2 AND u.deleted_at IS NULL
            AND EXISTS (SELECT 1 FROM orgs o WHERE o.id = u.org_id AND o.deleted_at IS NULL)`,
    [ctx.orgId, ctx.userId],
  );
  const role = rows[0]?.role;
  if (!role) throw new AppError('unauthorized', 'Unknown organization or user');
  // A session ended while the request was on its way acts no more.
  if (ctx.authMethod === 'password' && ctx.credentialId && !(await isSessionLive(tx, ctx.orgId, ctx.credentialId))) {
    throw new AppError('unauthorized', 'Session has ended');
  }
  return role;
}

async function lockUserInOrg(tx: TenantTx, orgId: string, userId: string): Promise<User> {
  const { rows } = await tx.query<UserRow>(
    `SELECT ${COLUMNS} FROM users WHERE org_id = $1 AND id = $2 AND deleted_at IS NULL FOR UPDATE`,
    [orgId, userId],
  );
  if (!rows[0]) throw notFound('User');
  return toUser(rows[0]);
}

async function assertAnotherOwner(tx: TenantTx, orgId: string, exceptUserId: string): Promise<void> {
  const { rows } = await tx.query<{ n: number }>(
    `SELECT count(*)::int AS n FROM users
      WHERE org_id = $1 AND role = 'owner' AND deleted_at IS NULL AND id <> $2`,
    [orgId, exceptUserId],
  );
  if ((rows[0]?.n ?? 0) === 0) {
    throw new AppError('last_owner', 'An organization must keep at least one owner');
  }
}

function isUniqueViolation(err: unknown): boolean {
  return typeof err === 'object' && err !== null && (err as { code?: unknown }).code === '23505';
}

const userTarget = (id: string) => ({ type: 'user', id });

export async function createUserInOrg(
  db: Database,
  ctx: RequestContext,
  input: { email: string; name?: string | null | undefined; role: Role },
  request: RequestMeta,
): Promise<User> {
  if (!canManageUsers(ctx.role)) throw insufficientRole('create users');
  try {
    return await withTenant(db, ctx.orgId, async (tx) => {
      const callerRole = await lockOrgAsCaller(tx, ctx);
      if (!canManageUsers(callerRole)) throw insufficientRole('create users');
      if (input.role === 'owner' && callerRole !== 'owner') throw insufficientRole('create owners');
      const { rows } = await tx.query<UserRow>(
        `INSERT INTO users (org_id, email, name, role) VALUES ($1, $2, $3, $4) RETURNING ${COLUMNS}`,
        [ctx.orgId, normaliseEmail(input.email), input.name ?? null, input.role],
      );
      const user = toUser(rows[0]!);
      await appendAuditLog(tx, ctx.orgId, {
        action: 'user.created',
        actor: userActor(ctx),
        target: userTarget(user.id),
        request,
        metadata: { email: user.email, role: user.role },
      });
      return user;
    });
  } catch (err) {
    if (isUniqueViolation(err)) {
      throw new AppError('email_taken', 'A user with this email already exists in this organization');
    }
    throw err;
  }
}

/**
 * One audit row per change: `user.role_changed` when the role changes (with the old and new
 * role), else `user.updated`; the names of the changed fields are listed, not their values.
 */
export async function updateUserInOrg(
  db: Database,
  ctx: RequestContext,
  userId: string,
  patch: { name?: string | null | undefined; role?: Role | undefined },
  request: RequestMeta,
): Promise<User> {
  if (!canManageUsers(ctx.role)) throw insufficientRole('change users');
  return withTenant(db, ctx.orgId, async (tx) => {
    const callerRole = await lockOrgAsCaller(tx, ctx);
    if (!canManageUsers(callerRole)) throw insufficientRole('change users');
    const target = await lockUserInOrg(tx, ctx.orgId, userId);
    if ((target.role === 'owner' || patch.role === 'owner') && callerRole !== 'owner') {
      throw insufficientRole('change owners');
    }
    if (target.role === 'owner' && patch.role !== undefined && patch.role !== 'owner') {
      await assertAnotherOwner(tx, ctx.orgId, target.id);
    }
    const { rows } = await tx.query<UserRow>(
      `UPDATE users
          SET name = CASE WHEN $3::boolean THEN $4::varchar ELSE name END,
              role = COALESCE($5::varchar, role)
        WHERE org_id = $1 AND id = $2 AND deleted_at IS NULL
        RETURNING ${COLUMNS}`,
      [ctx.orgId, userId, patch.name !== undefined, patch.name ?? null, patch.role ?? null],
    );
    const user = toUser(rows[0]!);
    const changed = [...(user.name !== target.name ? ['name'] : []), ...(user.role !== target.role ? ['role'] : [])];
    await appendAuditLog(tx, ctx.orgId, {
      action: user.role !== target.role ? 'user.role_changed' : 'user.updated',
      actor: userActor(ctx),
      target: userTarget(user.id),
      request,
      metadata: { changed, ...(user.role !== target.role ? { from: target.role, to: user.role } : {}) },
    });
    return user;
  });
}

export async function softDeleteUserInOrg(db: Database, ctx: RequestContext, userId: string, request: RequestMeta): Promise<void> {
  if (!canManageUsers(ctx.role)) throw insufficientRole('delete users');
  await withTenant(db, ctx.orgId, async (tx) => {
    const callerRole = await lockOrgAsCaller(tx, ctx);
    if (!canManageUsers(callerRole)) throw insufficientRole('delete users');
    const target = await lockUserInOrg(tx, ctx.orgId, userId);
    if (target.role === 'owner') {
      if (callerRole !== 'owner') throw insufficientRole('delete owners');
      await assertAnotherOwner(tx, ctx.orgId, target.id);
    }
    await tx.query('UPDATE users SET deleted_at = now() WHERE org_id = $1 AND id = $2 AND deleted_at IS NULL', [
      ctx.orgId,
      userId,
    ]);
    await appendAuditLog(tx, ctx.orgId, {
      action: 'user.deleted',
      actor: userActor(ctx),
      target: userTarget(userId),
      request,
      metadata: { email: target.email, role: target.role },
    });
  });
}
