import { randomBytes, randomUUID } from 'node:crypto';
import { beforeAll, describe, expect, it } from 'vitest';
import { AUTH_CHANNEL } from '../../src/auth/index.js';
import type { Database } from '../../src/infra/database.js';
import { pruneEndedSessions } from '../../src/models/session.model.js';
import { createTenant, type TestTenant } from '../helpers/app.js';
import { getTestDb } from '../helpers/db.js';

/**
 * Ended sessions are deleted a week after they end (migration 008, pruneEndedSessions): rows are
 * written straight into the table with the ages each case needs.
 */

const DAY = 86_400;
const WEEK = 7 * DAY;

let db: Database;
let t: TestTenant;

beforeAll(async () => {
  db = await getTestDb();
  t = await createTenant(db);
});

interface Row {
  id: string;
  sessionId: string;
  /** Days from now (negative: in the past). */
  created: number;
  expires: number;
  revoked?: number;
  replacedBy?: string;
}

/** Inserts the rows in reverse order (a row points at its successor, which must exist first). */
async function insertRows(rows: Row[]): Promise<void> {
  for (const r of [...rows].reverse()) {
    await db.query(
      `INSERT INTO sessions (org_id, id, session_id, user_id, token_hash, created_at, expires_at, used_at, replaced_by, revoked_at, revoked_reason)
       VALUES ($1, $2, $3, $4, $5,
               now() + make_interval(secs => $6), now() + make_interval(secs => $7),
               CASE WHEN $8::uuid IS NULL THEN NULL ELSE now() + make_interval(secs => $6 + 60) END, $8::uuid,
               CASE WHEN $9::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => $9::float8) END,
               CASE WHEN $9::float8 IS NULL THEN NULL ELSE 'logout' END)`,
      [t.org.id, r.id, r.sessionId, t.member.id, randomBytes(32), r.created * DAY, r.expires * DAY, r.replacedBy ?? null, r.revoked === undefined ? null : r.revoked * DAY],
    );
  }
}

async function remaining(ids: string[]): Promise<string[]> {
  const { rows } = await db.query<{ id: string }>('SELECT id FROM sessions WHERE id = ANY($1::uuid[])', [ids]);
  const left = new Set(rows.map((r) => r.id));
  return ids.filter((id) => left.has(id));
}

const prune = (batchSize = 1_000) => pruneEndedSessions(db, { graceSeconds: WEEK, batchSize, maxBatches: 1_000 });

describe('pruning ended sessions', () => {
  it('deletes what ended more than a week ago and keeps the rest, chains and all', async () => {
    const live = randomUUID();
    const [z, a, b] = [randomUUID(), randomUUID(), randomUUID()];
    const revokedLongAgo = randomUUID();
    const [r1, r2] = [randomUUID(), randomUUID()];
    const revokedYesterday = randomUUID();
    const [y1] = [randomUUID()];
    const recentlyExpired = randomUUID();
    const [e1] = [randomUUID()];
    const mixed = randomUUID();
    const [older, newer] = [randomUUID(), randomUUID()];
    await insertRows([
      // A live session: its oldest token expired 10 days ago; the one after it is used but valid.
      { id: z, sessionId: live, created: -40, expires: -10, replacedBy: a },
      { id: a, sessionId: live, created: -20, expires: 10, replacedBy: b },
      { id: b, sessionId: live, created: -1, expires: 29 },
      // Signed out 10 days ago, and yesterday.
      { id: r1, sessionId: revokedLongAgo, created: -12, expires: 18, revoked: -10, replacedBy: r2 },
      { id: r2, sessionId: revokedLongAgo, created: -11, expires: 19, revoked: -10 },
      { id: y1, sessionId: revokedYesterday, created: -3, expires: 27, revoked: -1 },
      // Expired three days ago: inside the grace period.
      { id: e1, sessionId: recentlyExpired, created: -33, expires: -3 },
      // A newer token that expired long ago (its lifetime was shorter), still pointed at by an
      // older one that is valid: it must stay, or the older row would point at nothing.
      { id: older, sessionId: mixed, created: -40, expires: 20, replacedBy: newer },
      { id: newer, sessionId: mixed, created: -35, expires: -10 },
    ]);
    const all = [z, a, b, r1, r2, y1, e1, older, newer];

    expect(await prune()).toBeGreaterThanOrEqual(3);
    expect(await remaining(all)).toEqual([a, b, y1, e1, older, newer]);
    // Nothing more to do: a second run deletes none of these.
    await prune();
    expect(await remaining(all)).toEqual([a, b, y1, e1, older, newer]);
  });

  it('works through a chain in batches of one, older links first, without breaking a reference', async () => {
    const session = randomUUID();
    const ids = [randomUUID(), randomUUID(), randomUUID(), randomUUID()];
    await insertRows(
      ids.map((id, i) => ({
        id,
        sessionId: session,
        created: -60 + i,
        expires: -30 + i,
        ...(i < ids.length - 1 ? { replacedBy: ids[i + 1]! } : {}),
      })),
    );
    await prune(1);
    expect(await remaining(ids)).toEqual([]);
  });

  it('announces the deletion of a live token, and not of ended ones', async () => {
    const messages: string[] = [];
    const sub = db.subscribe(AUTH_CHANNEL, { onMessage: (p) => messages.push(p), onConnected: () => undefined, onDisconnected: () => undefined });
    try {
      for (let i = 0; i < 50 && !sub.connected; i++) await new Promise((r) => setTimeout(r, 20));
      expect(sub.connected).toBe(true);
      const [ended, live] = [randomUUID(), randomUUID()];
      await insertRows([
        { id: randomUUID(), sessionId: ended, created: -50, expires: -20 },
        { id: randomUUID(), sessionId: live, created: -1, expires: 29 },
      ]);
      await prune();
      await db.query('DELETE FROM sessions WHERE session_id = $1', [live]);
      const done = `done:${randomUUID()}`;
      await db.query('SELECT pg_notify($1, $2)', [AUTH_CHANNEL, done]);
      for (let i = 0; i < 100 && !messages.includes(done); i++) await new Promise((r) => setTimeout(r, 20));
      expect(messages.filter((m) => m === `s:${ended}` || m === `s:${live}`)).toEqual([`s:${live}`]);
    } finally {
      await sub.close();
    }
  });
});
