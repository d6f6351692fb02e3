/**
 * The bearer methods this server runs (AUTH_METHODS), built once at start. The header stand-in
 * (fake) needs nothing here: src/middleware/authenticate.ts reads the headers itself.
 */
import type { FastifyBaseLogger } from 'fastify';
import type { Config } from '../config/env.js';
import type { Database } from '../infra/database.js';
import type { BearerMethods } from '../middleware/authenticate.js';
import type { RateLimiter } from '../ratelimit/index.js';
import type { Authenticator } from './index.js';
import { createSessionAuth, type SessionAuth } from './sessions.js';

export interface AuthMethodDeps {
  config: Config;
  db: Database;
  auth: Authenticator;
  log: FastifyBaseLogger;
  /** Password attempts are limited through it. */
  limiter: RateLimiter;
}

export interface RunningMethods {
  methods: BearerMethods;
  /** Password sign-in and its sessions (the routes of /v1/auth); null when `password` is off. */
  sessions: SessionAuth | null;
  /** Stops what the methods run in the background (batched writes, key refreshes). */
  close(): Promise<void>;
}

export async function createBearerMethods(deps: AuthMethodDeps): Promise<RunningMethods> {
  const methods: BearerMethods = {};
  const closers: (() => Promise<void>)[] = [];
  let sessions: SessionAuth | null = null;
  if (deps.config.auth.methods.includes('password') && deps.config.auth.jwt) {
    sessions = createSessionAuth(deps);
    methods.session = { issuer: sessions.issuer, resolve: sessions.resolve };
  }
  return {
    methods,
    sessions,
    async close() {
      await Promise.allSettled(closers.map((c) => c()));
    },
  };
}
