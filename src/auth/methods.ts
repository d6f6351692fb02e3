/**
 * The bearer methods this server runs (AUTH_METHODS), built once at start. The header stand-in
 * (fake) needs nothing here: src/middleware/authenticate.ts reads the headers itself.
 */
import type { FastifyBaseLogger } from 'fastify';
import type { Config } from '../config/env.js';
import type { Database } from '../infra/database.js';
import type { BearerMethods } from '../middleware/authenticate.js';
import type { Authenticator } from './index.js';
import { createOidcMethod } from './oidc.js';

export interface AuthMethodDeps {
  config: Config;
  db: Database;
  auth: Authenticator;
  log: FastifyBaseLogger;
}

export interface RunningMethods {
  methods: BearerMethods;
  /** Stops what the methods run in the background (batched writes, key refreshes). */
  close(): Promise<void>;
}

export async function createBearerMethods(deps: AuthMethodDeps): Promise<RunningMethods> {
  const methods: BearerMethods = {};
  const closers: (() => Promise<void>)[] = [];
  const { config } = deps;
  if (config.auth.methods.includes('oidc') && config.auth.oidc) {
    const oidc = createOidcMethod({ config: config.auth.oidc, db: deps.db, auth: deps.auth, log: deps.log });
    methods.oidc = { issuer: oidc.issuer, resolve: oidc.resolve };
    closers.push(() => oidc.close());
  }
  return {
    methods,
    async close() {
      await Promise.allSettled(closers.map((c) => c()));
    },
  };
}
