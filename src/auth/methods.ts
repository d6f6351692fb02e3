/**
 * The bearer methods this server runs (AUTH_METHODS), built once at start. The header stand-in
 * (fake) needs nothing here: src/middleware/authenticate.ts reads the headers itself.
 */
import type { FastifyBaseLogger } from 'fastify';
import type { Config } from '../config/env.js';
import type { Database } from '../infra/database.js';
import type { BearerMethods } from '../middleware/authenticate.js';
import type { RateLimiter } from '../ratelimit/index.js';
import type { AuthMethod } from '../types/authMethods.js';
import { createApiKeyMethod } from './apiKeys.js';
import type { Authenticator } from './index.js';
import { createOidcMethod, type OidcMethod } from './oidc.js';
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
  /** Whether the OpenID Connect provider answered its last fetch; null when `oidc` is off. */
  identityProvider(): 'ok' | 'unreachable' | null;
  /** Writes now what the methods batch in memory (API keys' last use). */
  flush(): Promise<void>;
  /** Stops what the methods run in the background (batched writes, key refreshes). */
  close(): Promise<void>;
}

declare module 'fastify' {
  interface FastifyInstance {
    /** The running bearer methods (tests flush their batches through it). */
    bearerMethods: RunningMethods;
  }
}

export async function createBearerMethods(deps: AuthMethodDeps): Promise<RunningMethods> {
  const methods: BearerMethods = {};
  const closers: (() => Promise<void>)[] = [];
  const flushers: (() => Promise<void>)[] = [];
  const on = (m: AuthMethod) => deps.config.auth.methods.includes(m);

  if (on('api_key')) {
    const apiKeys = createApiKeyMethod({ ...deps, flushIntervalMs: deps.config.rateLimit.usageFlushIntervalMs });
    methods.apiKey = apiKeys.resolve;
    methods.cachedApiKey = apiKeys.cached;
    flushers.push(() => apiKeys.flush());
    closers.push(() => apiKeys.close());
  }

  let sessions: SessionAuth | null = null;
  if (on('password') && deps.config.auth.jwt) {
    const created = createSessionAuth(deps);
    sessions = created;
    methods.session = { issuer: created.issuer, resolve: created.resolve };
    closers.push(() => created.close());
  }

  const oidcConfig = deps.config.auth.oidc;
  let oidc: OidcMethod | null = null;
  if (on('oidc') && oidcConfig) {
    const created = createOidcMethod({ config: oidcConfig, db: deps.db, auth: deps.auth, log: deps.log });
    oidc = created;
    methods.oidc = { issuer: created.issuer, resolve: created.resolve };
    closers.push(() => created.close());
  }

  return {
    methods,
    sessions,
    identityProvider: () => (oidc ? (oidc.reachable ? 'ok' : 'unreachable') : null),
    async flush() {
      await Promise.all(flushers.map((f) => f()));
    },
    async close() {
      await Promise.allSettled(closers.map((c) => c()));
    },
  };
}
