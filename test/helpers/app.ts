import { randomBytes } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import { buildApp } from '../../src/app.js';
import { createRateLimiter } from '../../src/ratelimit/index.js';
import { loadConfig, type Config } from '../../src/config/env.js';
import type { Database } from '../../src/infra/database.js';
import { createOrg, type Org } from '../../src/models/org.model.js';
import type { Role } from '../../src/types/context.js';
import { getTestDb, silentLogger } from './db.js';

/** Limits are off unless a test turns them on: other suites send many requests from one address. */
export const LIMITS_OFF: Record<string, string> = {
  ORG_RATE_LIMIT_BURST: '0',
  USER_RATE_LIMIT_BURST: '0',
  ORG_DAILY_REQUEST_CAP: '0',
  ORG_MONTHLY_REQUEST_CAP: '0',
  ORG_MAX_CONCURRENT_REQUESTS: '0',
  IP_RATE_LIMIT_PER_MINUTE: '0',
  LOGIN_ATTEMPTS_PER_ACCOUNT: '0',
  LOGIN_ATTEMPTS_PER_IP: '0',
  LOAD_SHED_MAX_EVENT_LOOP_DELAY_MS: '0',
};

export function testConfig(env: Record<string, string> = {}): Config {
  return loadConfig({ NODE_ENV: 'test', LOG_LEVEL: 'silent', ACCESS_LOG: 'false', ...LIMITS_OFF, ...env }, { isTty: false });
}

/** The app on the shared test database, for app.inject(). Close it in afterAll. */
export async function buildTestApp(
  opts: {
    db?: Database;
    env?: Record<string, string>;
    /** False: without the refusal gate (tests compare its answers with the full path's). */
    refusalGate?: boolean;
    /** Runs before app.ready(), to add a test's own hooks. */
    beforeReady?: (app: FastifyInstance) => void;
  } = {},
): Promise<FastifyInstance> {
  const db = opts.db ?? (await getTestDb());
  const config = testConfig(opts.env);
  const rateLimiter = createRateLimiter(config, db, silentLogger);
  await rateLimiter.ready(5_000);
  const app = await buildApp({ config, db, limiter: rateLimiter.limiter, logger: silentLogger, refusalGate: opts.refusalGate ?? true });
  app.addHook('onClose', () => rateLimiter.close());
  opts.beforeReady?.(app);
  await app.ready();
  return app;
}

export const randomSlug = (prefix = 'org') => `${prefix}-${randomBytes(6).toString('hex')}`;

export interface TestUser {
  id: string;
  orgId: string;
  email: string;
  role: Role;
  headers: { 'x-org-id': string; 'x-user-id': string };
}

export interface TestTenant {
  org: Org;
  owner: TestUser;
  admin: TestUser;
  member: TestUser;
  addUser(role: Role, email?: string): Promise<TestUser>;
}

export async function addUser(db: Database, orgId: string, role: Role, email?: string): Promise<TestUser> {
  const address = email ?? `${role}-${randomBytes(5).toString('hex')}@example.test`;
  const { rows } = await db.query<{ id: string }>(
    'INSERT INTO users (org_id, email, name, role) VALUES ($1, $2, $3, $4) RETURNING id',
    [orgId, address.toLowerCase(), `Test ${role}`, role],
  );
  const id = rows[0]!.id;
  return { id, orgId, email: address.toLowerCase(), role, headers: { 'x-org-id': orgId, 'x-user-id': id } };
}

/** A fresh organization with one owner, one admin and one member. */
export async function createTenant(db?: Database): Promise<TestTenant> {
  const database = db ?? (await getTestDb());
  const org = await createOrg(database, { name: 'Test Org', slug: randomSlug() });
  const [owner, admin, member] = [
    await addUser(database, org.id, 'owner'),
    await addUser(database, org.id, 'admin'),
    await addUser(database, org.id, 'member'),
  ];
  return { org, owner, admin, member, addUser: (role, email) => addUser(database, org.id, role, email) };
}
