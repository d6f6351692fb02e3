import type { Database } from '../../src/infra/database.js';
import { API_KEY_DISPLAY_LENGTH, hashApiKeySecret, newApiKeySecret } from '../../src/models/apiKey.model.js';
import type { Role } from '../../src/types/context.js';
import type { AuthScheme, Headers } from './securitySuite.js';

export interface TestApiKey {
  id: string;
  orgId: string;
  role: Role;
  secret: string;
  headers: { authorization: string };
}

export const bearer = (secret: string) => ({ authorization: `Bearer ${secret}` });

/**
 * A key written straight into the database (the connection's own role, as addUser does), with the
 * same secret format and hash the API uses: for tests that need keys of any state quickly.
 */
export async function insertApiKey(
  db: Database,
  orgId: string,
  role: Role,
  createdBy: string,
  opts: { expiresAt?: Date; revoked?: boolean; name?: string } = {},
): Promise<TestApiKey> {
  const secret = newApiKeySecret();
  const { rows } = await db.query<{ id: string }>(
    `INSERT INTO api_keys (org_id, name, role, prefix, secret_hash, created_by, expires_at, revoked_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $8::boolean THEN now() END) RETURNING id`,
    [orgId, opts.name ?? `test ${role} key`, role, secret.slice(0, API_KEY_DISPLAY_LENGTH), hashApiKeySecret(secret), createdBy, opts.expiresAt?.toISOString() ?? null, opts.revoked ?? false],
  );
  return { id: rows[0]!.id, orgId, role, secret, headers: bearer(secret) };
}

const secretOf = (headers: Headers): string => String(headers.authorization).replace(/^Bearer /, '');

/** API keys for the security suite: a key of the user's org with the user's role. */
export const API_KEY_SCHEME: AuthScheme = {
  method: 'api_key',
  env: () => ({ AUTH_METHODS: 'api_key,fake' }),
  as: async (user, db) => (await insertApiKey(db, user.orgId, user.role, user.id)).headers,
  refused: async (t, db) => [
    { what: 'a well-formed key that was never issued', headers: bearer(newApiKeySecret()) },
    { what: 'a key one character short', headers: bearer(newApiKeySecret().slice(0, -1)) },
    { what: 'a key with a character outside base62', headers: bearer(`${newApiKeySecret().slice(0, -1)}_`) },
    { what: 'the prefix alone', headers: bearer('llmk_') },
    { what: 'a revoked key', headers: (await insertApiKey(db, t.org.id, 'owner', t.owner.id, { revoked: true })).headers },
    { what: 'an expired key', headers: (await insertApiKey(db, t.org.id, 'owner', t.owner.id, { expiresAt: new Date(Date.now() - 1_000) })).headers },
    { what: 'a key with a different case', headers: bearer(secretOf((await insertApiKey(db, t.org.id, 'owner', t.owner.id)).headers).toUpperCase()) },
  ],
  revoke: async (_user, headers, db) => {
    await db.query('UPDATE api_keys SET revoked_at = now() WHERE secret_hash = $1', [hashApiKeySecret(secretOf(headers))]);
  },
};
