import { pageCursor, UUID_VALUE } from './cursor.js';
import { createHash, randomBytes } from 'node:crypto';
import { AppError, notFound } from '../errors.js';
import { queryAsSystem, queryAsTenant, withTenant } from '../db/tenancy.js';
import type { Database } from '../infra/database.js';
import { API_KEY_PREFIX, roleAtLeast } from '../middleware/authenticate.js';
import type { RequestContext, RequestMeta, Role } from '../types/context.js';
import { appendAuditLog, userActor } from './audit.model.js';
import { lookupOverridesFromRow, NO_OVERRIDES, ORG_LIMITS_SELECT, type OrgLimitOverrides } from './orgLimits.model.js';
import { lockOrgAsCaller } from './user.model.js';

/**
 * API keys (api_keys, migration 006): the credentials an org's servers call us with. A key
 * belongs to the org, not to its creator, and acts with its own role. The secret is shown once,
 * at creation; the table keeps only its SHA-256 and its first characters.
 *
 * Tenant work (create, list, revoke) runs as the tenant of the caller's org; the lookup by hash
 * (authentication, before the org is known) and the batched last-use writes take the system path.
 */

// ---------------------------------------------------------------------------------------------
// The secret: 'llmk_' + 256 random bits in base62 (43 characters), so it is recognisable (secret
// scanners, logs) and survives any URL, header or shell without quoting.

const BASE62 = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz';
const SECRET_BYTES = 32;
/** ceil(256 / log2(62)): every 32-byte value fits. */
const SECRET_CHARS = 43;
/** What is stored and shown to tell keys apart: 'llmk_' and the first 7 characters of the random part. */
export const API_KEY_DISPLAY_LENGTH = 12;
/** The exact shape of a key this server issues; anything else is refused without a lookup. */
export const API_KEY_FORMAT = new RegExp(`^${API_KEY_PREFIX}[0-9A-Za-z]{${SECRET_CHARS}}$`);

function base62(bytes: Buffer): string {
  let n = BigInt(`0x${bytes.toString('hex')}`);
  let out = '';
  while (n > 0n) {
    out = BASE62[Number(n % 62n)]! + out;
    n /= 62n;
  }
  return out.padStart(SECRET_CHARS, '0');
}

/** A new secret from the operating system's CSPRNG. */
export function newApiKeySecret(): string {
  return API_KEY_PREFIX + base62(randomBytes(SECRET_BYTES));
}

/** What the table stores instead of the secret. */
export function hashApiKeySecret(secret: string): Buffer {
  return createHash('sha256').update(secret, 'utf8').digest();
}

// ---------------------------------------------------------------------------------------------
// The key as the API describes it (never with its secret or hash).

export interface ApiKey {
  id: string;
  orgId: string;
  name: string;
  role: Role;
  /** The first characters of the secret, to recognise it. */
  prefix: string;
  createdBy: { type: 'user' | 'api_key'; id: string };
  createdAt: Date;
  expiresAt: Date | null;
  revokedAt: Date | null;
  lastUsedAt: Date | null;
}

// A type, not an interface: org_limits columns ride along in the same row (Record<string, unknown>).
type ApiKeyRow = {
  id: string;
  org_id: string;
  name: string;
  role: Role;
  prefix: string;
  created_by: string | null;
  created_by_key: string | null;
  created_at: Date;
  expires_at: Date | null;
  revoked_at: Date | null;
  last_used_at: Date | null;
};

const COLUMNS = 'id, org_id, name, role, prefix, created_by, created_by_key, created_at, expires_at, revoked_at, last_used_at';

const toApiKey = (r: ApiKeyRow): ApiKey => ({
  id: r.id,
  orgId: r.org_id,
  name: r.name,
  role: r.role,
  prefix: r.prefix,
  createdBy: r.created_by_key ? { type: 'api_key', id: r.created_by_key } : { type: 'user', id: r.created_by! },
  createdAt: r.created_at,
  expiresAt: r.expires_at,
  revokedAt: r.revoked_at,
  lastUsedAt: r.last_used_at,
});

/** Whether a key authenticates at `nowMs`: not revoked, not expired. */
export const isKeyLive = (k: Pick<ApiKey, 'revokedAt' | 'expiresAt'>, nowMs: number): boolean =>
  k.revokedAt === null && (k.expiresAt === null || k.expiresAt.getTime() > nowMs);

// ---------------------------------------------------------------------------------------------
// Authentication lookup: by the secret's hash alone, whatever the org.

export interface ApiKeyLookup {
  /** The key with this hash, revoked and expired ones included (their refusal is audited in their org); null when unknown. */
  key: ApiKey | null;
  /** Whether the key's org exists and is not deleted. */
  orgLive: boolean;
  /** The key's org's limit overrides, read in the same round trip (as the user lookup does). */
  limitOverrides: OrgLimitOverrides;
}

const AUTH_KEY_SQL = `SELECT k.id, k.org_id, k.name, k.role, k.prefix, k.created_by, k.created_by_key, k.created_at,
            k.expires_at, k.revoked_at, k.last_used_at, o.deleted_at IS NULL AS org_live, ${ORG_LIMITS_SELECT}
       FROM api_keys k
       JOIN orgs o ON o.id = k.org_id
       LEFT JOIN org_limits l ON l.org_id = k.org_id
      WHERE k.secret_hash = $1
      LIMIT 1`;

/** Cross-tenant by nature (the key names its org), so the named system path. */
export async function findApiKeyByHash(db: Database, secretHash: Buffer): Promise<ApiKeyLookup> {
  const { rows } = await queryAsSystem<ApiKeyRow & { org_live: boolean }>(db, AUTH_KEY_SQL, [secretHash], 'api_key_by_hash');
  const r = rows[0];
  if (!r) return { key: null, orgLive: false, limitOverrides: NO_OVERRIDES };
  return { key: toApiKey(r), orgLive: r.org_live, limitOverrides: lookupOverridesFromRow(r) };
}

/**
 * Writes the last use of many keys in one statement (cross-tenant batch work: the system path).
 * Never moves a time backwards, so two instances' batches may land in any order.
 */
export async function recordApiKeysLastUsed(db: Database, uses: readonly { orgId: string; keyId: string; at: Date }[]): Promise<void> {
  if (uses.length === 0) return;
  await queryAsSystem(
    db,
    `UPDATE api_keys k SET last_used_at = t.at
       FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[]) AS t(org_id, id, at)
      WHERE k.org_id = t.org_id AND k.id = t.id AND (k.last_used_at IS NULL OR k.last_used_at < t.at)`,
    [uses.map((u) => u.orgId), uses.map((u) => u.keyId), uses.map((u) => u.at.toISOString())],
  );
}

// ---------------------------------------------------------------------------------------------
// Reads

export async function findApiKeyInOrg(db: Database, orgId: string, keyId: string): Promise<ApiKey | null> {
  const { rows } = await queryAsTenant<ApiKeyRow>(
    db,
    orgId,
    `SELECT ${COLUMNS} FROM api_keys WHERE org_id = $1 AND id = $2`,
    [orgId, keyId],
    'api_key_in_org',
  );
  return rows[0] ? toApiKey(rows[0]) : null;
}

export interface ApiKeyPage {
  keys: ApiKey[];
  nextCursor: string | null;
}

const pages = pageCursor('k1:', UUID_VALUE);

/**
 * Newest first, revoked and expired keys included (with their dates), keyset pagination. The
 * cursor names the last key of the previous page, nothing that would count other tenants' keys.
 */
export async function listApiKeysInOrg(db: Database, orgId: string, opts: { limit: number; cursor?: string | undefined }): Promise<ApiKeyPage> {
  const beforeId = opts.cursor ? pages.decode(opts.cursor) : null;
  const { rows } = await queryAsTenant<ApiKeyRow>(
    db,
    orgId,
    `SELECT ${COLUMNS} FROM api_keys
      WHERE org_id = $1
        AND ($2::uuid IS NULL OR seq < (SELECT a.seq FROM api_keys a WHERE a.org_id = $1 AND a.id = $2::uuid))
      ORDER BY seq DESC
      LIMIT $3`,
    [orgId, beforeId, opts.limit + 1],
    'api_keys_page',
  );
  // An empty page after a cursor: the end, or a cursor naming no key of this org (seq < NULL).
  if (beforeId && rows.length === 0) {
    const anchor = await queryAsTenant(db, orgId, 'SELECT 1 FROM api_keys WHERE org_id = $1 AND id = $2', [orgId, beforeId]);
    if (anchor.rowCount === 0) throw pages.invalid();
  }
  const page = rows.slice(0, opts.limit);
  const last = page[page.length - 1];
  return { keys: page.map(toApiKey), nextCursor: rows.length > opts.limit && last ? pages.encode(last.id) : null };
}

// ---------------------------------------------------------------------------------------------
// Writes: admins and owners; a key's role is never above its creator's (an admin cannot mint an
// owner key); only owners revoke owner keys. The caller's role is re-read under the org's lock.

const insufficientRole = (what: string) => new AppError('forbidden', `Your role does not allow you to ${what}`);
const keyTarget = (id: string) => ({ type: 'api_key', id });

export interface CreatedApiKey {
  key: ApiKey;
  /** The secret: returned to the creator once, never stored, never logged. */
  secret: string;
}

export async function createApiKey(
  db: Database,
  ctx: RequestContext,
  input: { name: string; role: Role; expiresAt?: Date | null | undefined },
  request: RequestMeta,
): Promise<CreatedApiKey> {
  if (!roleAtLeast(ctx.role, 'admin')) throw insufficientRole('create API keys');
  return withTenant(db, ctx.orgId, async (tx) => {
    const callerRole = await lockOrgAsCaller(tx, ctx);
    if (!roleAtLeast(callerRole, 'admin')) throw insufficientRole('create API keys');
    if (!roleAtLeast(callerRole, input.role)) throw insufficientRole(`create a key with the ${input.role} role (above your own)`);
    const secret = newApiKeySecret();
    const byKey = ctx.authMethod === 'api_key';
    const { rows } = await tx.query<ApiKeyRow>(
      `INSERT INTO api_keys (org_id, name, role, prefix, secret_hash, created_by, created_by_key, expires_at)
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
       RETURNING ${COLUMNS}`,
      [
        ctx.orgId,
        input.name,
        input.role,
        secret.slice(0, API_KEY_DISPLAY_LENGTH),
        hashApiKeySecret(secret),
        byKey ? null : ctx.userId,
        byKey ? ctx.userId : null,
        input.expiresAt?.toISOString() ?? null,
      ],
    );
    const key = toApiKey(rows[0]!);
    await appendAuditLog(tx, ctx.orgId, {
      action: 'api_key.created',
      actor: userActor(ctx),
      target: keyTarget(key.id),
      request,
      metadata: { name: key.name, role: key.role, prefix: key.prefix, expiresAt: key.expiresAt?.toISOString() ?? null },
    });
    return { key, secret };
  });
}

/**
 * Revokes a key of the caller's org: it stops authenticating at once here (the route tells the
 * auth cache) and on every other instance within a second (the trigger's message). Revoking a
 * revoked key changes nothing and records nothing. Another org's key is a 404, like a random id.
 */
export async function revokeApiKey(db: Database, ctx: RequestContext, keyId: string, request: RequestMeta): Promise<ApiKey> {
  if (!roleAtLeast(ctx.role, 'admin')) throw insufficientRole('revoke API keys');
  return withTenant(db, ctx.orgId, async (tx) => {
    const callerRole = await lockOrgAsCaller(tx, ctx);
    if (!roleAtLeast(callerRole, 'admin')) throw insufficientRole('revoke API keys');
    const { rows } = await tx.query<ApiKeyRow>(`SELECT ${COLUMNS} FROM api_keys WHERE org_id = $1 AND id = $2 FOR UPDATE`, [
      ctx.orgId,
      keyId,
    ]);
    if (!rows[0]) throw notFound('API key');
    const key = toApiKey(rows[0]);
    if (key.role === 'owner' && callerRole !== 'owner') throw insufficientRole('revoke owner keys');
    if (key.revokedAt !== null) return key;
    const updated = await tx.query<ApiKeyRow>(
      `UPDATE api_keys SET revoked_at = now() WHERE org_id = $1 AND id = $2 RETURNING ${COLUMNS}`,
      [ctx.orgId, keyId],
    );
    await appendAuditLog(tx, ctx.orgId, {
      action: 'api_key.revoked',
      actor: userActor(ctx),
      target: keyTarget(keyId),
      request,
      metadata: { name: key.name, role: key.role, prefix: key.prefix },
    });
    return toApiKey(updated.rows[0]!);
  });
}
