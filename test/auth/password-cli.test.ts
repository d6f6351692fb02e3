import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { verifyPassword } from '../../src/auth/passwords.js';
import { migrate } from '../../src/db/migrator.js';
import { createOrg } from '../../src/models/org.model.js';
import { createSession } from '../../src/models/session.model.js';
import { addUser, randomSlug, type TestUser } from '../helpers/app.js';
import { silentLogger } from '../helpers/db.js';
import { createScratchDatabase, type ScratchDatabase } from '../helpers/migrationDb.js';
import { runTsScript } from '../helpers/process.js';
import { newPassword, setPassword } from '../helpers/sessions.js';

/** `npm run user:password -- <org-slug> <email>`, the password on standard input. */

describe('user:password', () => {
  let scratch: ScratchDatabase;
  let slug: string;
  let user: TestUser;

  beforeAll(async () => {
    scratch = await createScratchDatabase({ persisted: true });
    const db = await scratch.open();
    await migrate(db, silentLogger);
    slug = randomSlug('cli');
    const org = await createOrg(db, { name: 'CLI', slug });
    user = await addUser(db, org.id, 'admin');
    // A session to be ended by the reset.
    await setPassword(db, user);
    const { rows } = await db.query<{ h: string }>('SELECT password_hash AS h FROM users WHERE id = $1', [user.id]);
    const hash = rows[0]!.h;
    const meta = { requestId: 'cli-test', ip: null, userAgent: null };
    expect(await createSession(db, org.id, user.id, hash, { tokenHash: randomBytes(32).toString('hex'), ttlSeconds: 60 }, meta)).not.toBeNull();
    await scratch.closeConnections();
  });
  afterAll(() => scratch?.drop());

  const run = (args: string[], input?: string) =>
    runTsScript('src/cli/userPassword.ts', { ...scratch.env, LOG_LEVEL: 'silent' }, { timeoutMs: 30_000, args, ...(input === undefined ? {} : { input }) });

  it('sets the password read from standard input, ends the sessions, audits it as the system', async () => {
    const password = newPassword();
    const res = await run([slug, user.email.toUpperCase()], `${password}\n`);
    expect({ code: res.code, stderr: res.stderr }).toEqual({ code: 0, stderr: '' });
    expect(res.stdout).toBe(`Password set for ${user.email} in ${slug}; sessions ended: 1\n`);
    expect(res.stdout + res.stderr).not.toContain(password);
    const db = await scratch.open();
    try {
      const { rows } = await db.query<{ h: string }>('SELECT password_hash AS h FROM users WHERE id = $1', [user.id]);
      expect(rows[0]!.h.startsWith('$argon2id$v=19$m=19456,t=2,p=1$')).toBe(true);
      expect(await verifyPassword(rows[0]!.h, password)).toBe(true);
      const sessions = await db.query('SELECT DISTINCT revoked_reason FROM sessions WHERE user_id = $1', [user.id]);
      expect(sessions.rows).toEqual([{ revoked_reason: 'password_reset' }]);
      const audit = await db.query<{ actor_type: string; metadata: unknown }>(
        "SELECT actor_type, metadata FROM audit_logs WHERE org_id = $1 AND action = 'user.password_changed'",
        [user.orgId],
      );
      expect(audit.rows).toEqual([{ actor_type: 'system', metadata: { by: 'operator', sessionsEnded: 1 } }]);
    } finally {
      await scratch.closeConnections();
    }
  });

  it('refuses a password that breaks the rules (exit 1), an unknown user (1), and a password on the command line (2)', async () => {
    const weak = await run([slug, user.email], 'Password2024!\n');
    expect(weak.code).toBe(1);
    expect(weak.stderr).toContain('too common');
    const short = await run([slug, user.email], 'short\n');
    expect(short.code).toBe(1);
    expect(short.stderr).toContain('at least 12');
    expect((await run([slug, 'nobody@example.test'], `${newPassword()}\n`)).code).toBe(1);
    expect((await run(['no-such-org', user.email], `${newPassword()}\n`)).code).toBe(1);
    expect((await run([slug, user.email, 'the-password-itself'], '')).code).toBe(2);
    expect((await run([slug], '')).code).toBe(2);
  });
});
