import { randomBytes } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { exportJWK, exportSPKI, generateKeyPair, SignJWT, type CryptoKey, type JWK } from 'jose';
import pino, { type Logger } from 'pino';
import type { FastifyInstance } from 'fastify';
import { buildApp } from '../../src/app.js';
import { createRateLimiter } from '../../src/ratelimit/index.js';
import { testConfig, type TestUser } from './app.js';
import type { AuthScheme } from './securitySuite.js';
import { getTestDb, silentLogger } from './db.js';

/**
 * A stand-in OpenID Connect provider on 127.0.0.1 (node:http, a free port): its discovery
 * document and its key set, with keys made in the test. It can publish other keys (rotation),
 * answer errors, hang, or stop listening, and counts what it was asked.
 */

export const OIDC_AUDIENCE = 'llm-app-tests';

export interface TestKey {
  readonly alg: 'RS256' | 'ES256' | 'PS256' | 'EdDSA';
  readonly kid: string;
  readonly privateKey: CryptoKey;
  readonly publicKey: CryptoKey;
  /** The public key as the provider publishes it. */
  readonly publicJwk: JWK;
}

export async function makeKey(alg: TestKey['alg'], kid = `${alg.toLowerCase()}-${randomBytes(4).toString('hex')}`): Promise<TestKey> {
  const { privateKey, publicKey } = await generateKeyPair(alg, { extractable: true });
  const publicJwk = { ...(await exportJWK(publicKey)), kid, alg, use: 'sig' };
  return { alg, kid, privateKey, publicKey, publicJwk };
}

export type ProviderMode = 'ok' | 'error' | 'hang';

export interface TestProvider {
  readonly issuer: string;
  readonly port: number;
  /** Published in the key set, in this order. */
  keys: TestKey[];
  mode: ProviderMode;
  /** Replaces fields of the discovery document (issuer, jwks_uri...). */
  discovery: Record<string, unknown>;
  /** Requests received per path. */
  readonly hits: Map<string, number>;
  hitsOf(path: 'discovery' | 'jwks'): number;
  readonly discoveryPath: string;
  readonly jwksPath: string;
  /**
   * A signed token: iss, aud, iat, exp (5 minutes) and the given claims (undefined removes one);
   * header alg and kid from the key, typ JWT, then `header`.
   */
  sign(key: TestKey, claims?: Record<string, unknown>, header?: Record<string, unknown>): Promise<string>;
  /** Stops listening (connections refused) and drops open connections. */
  stop(): Promise<void>;
  /** Listens again on the same port. */
  start(): Promise<void>;
  close(): Promise<void>;
}

export const nowSeconds = () => Math.floor(new Date().getTime() / 1_000);

/** `issuerPath`: the issuer's path after the host, e.g. '/tenant/' (a trailing slash is kept in the issuer). */
export async function startProvider(opts: { keys?: TestKey[]; issuerPath?: string } = {}): Promise<TestProvider> {
  const hits = new Map<string, number>();
  const hanging = new Set<ServerResponse>();
  const base = (opts.issuerPath ?? '').replace(/\/$/, '');
  const discoveryPath = `${base}/.well-known/openid-configuration`;
  const jwksPath = `${base}/keys`;
  let port = 0;
  let issuer = '';

  const handler = (req: IncomingMessage, res: ServerResponse) => {
    const path = (req.url ?? '').split('?')[0]!;
    hits.set(path, (hits.get(path) ?? 0) + 1);
    if (provider.mode === 'hang') {
      hanging.add(res);
      return;
    }
    const send = (status: number, body: unknown) => {
      res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
    };
    if (provider.mode === 'error') return send(500, { error: 'internal' });
    if (path === discoveryPath) {
      return send(200, {
        issuer,
        jwks_uri: `http://127.0.0.1:${port}${jwksPath}`,
        id_token_signing_alg_values_supported: ['RS256', 'ES256'],
        ...provider.discovery,
      });
    }
    if (path === jwksPath) return send(200, { keys: provider.keys.map((k) => k.publicJwk) });
    send(404, { error: 'not found' });
  };

  let server: Server = createServer(handler);
  const listen = (p: number) =>
    new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(p, '127.0.0.1', () => {
        server.off('error', reject);
        resolve();
      });
    });
  await listen(0);
  port = (server.address() as AddressInfo).port;
  issuer = `http://127.0.0.1:${port}${opts.issuerPath ?? ''}`;

  const provider: TestProvider = {
    issuer,
    port,
    keys: opts.keys ?? [],
    mode: 'ok',
    discovery: {},
    hits,
    hitsOf: (what) => hits.get(what === 'discovery' ? discoveryPath : jwksPath) ?? 0,
    discoveryPath,
    jwksPath,
    async sign(key, claims = {}, header = {}) {
      const now = nowSeconds();
      const payload: Record<string, unknown> = { iss: issuer, aud: OIDC_AUDIENCE, iat: now, exp: now + 300, ...claims };
      for (const [k, v] of Object.entries(payload)) if (v === undefined) delete payload[k];
      return new SignJWT(payload).setProtectedHeader({ alg: key.alg, kid: key.kid, typ: 'JWT', ...header }).sign(key.privateKey);
    },
    async stop() {
      for (const res of hanging) res.destroy();
      hanging.clear();
      if (!server.listening) return;
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      server.closeAllConnections();
      await closed;
    },
    async start() {
      if (server.listening) return;
      server = createServer(handler);
      await listen(port);
    },
    close() {
      return provider.stop();
    },
  };
  return provider;
}

const b64 = (v: unknown) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');

/** A compact JWS assembled by hand: any header, any payload, any signature bytes. */
export const rawToken = (header: unknown, payload: unknown, signature = ''): string => `${b64(header)}.${b64(payload)}.${signature}`;

/** Log lines written by an app, to search them for secrets. */
export function captureLogger(): { logger: Logger; lines: string[] } {
  const lines: string[] = [];
  return { logger: pino({ level: 'trace' }, { write: (line: string) => void lines.push(line) }), lines };
}

/**
 * The app with the oidc method (and the development headers, to act as an org's owner) against
 * `provider`, on the shared test database; `logger` to capture its logs.
 */
export async function buildOidcApp(
  provider: TestProvider,
  opts: { env?: Record<string, string>; logger?: Logger; beforeReady?: (app: FastifyInstance) => void } = {},
): Promise<FastifyInstance> {
  const db = await getTestDb();
  const config = testConfig({ AUTH_METHODS: 'oidc,fake', OIDC_ISSUER: provider.issuer, OIDC_AUDIENCE, ...opts.env });
  const logger = opts.logger ?? silentLogger;
  const rateLimiter = createRateLimiter(config, db, logger);
  await rateLimiter.ready(5_000);
  const app = await buildApp({ config, db, limiter: rateLimiter.limiter, logger });
  app.addHook('onClose', () => rateLimiter.close());
  opts.beforeReady?.(app);
  await app.ready();
  return app;
}

/**
 * The provider's tokens as a scheme of the security suite: a provider of its own (stop it after
 * the suites that use the scheme), tokens naming the user's org by slug and their email.
 */
export async function createOidcScheme(): Promise<AuthScheme & { stop(): Promise<void> }> {
  const [key, stranger] = await Promise.all([makeKey('RS256'), makeKey('RS256')]);
  const provider = await startProvider({ keys: [key] });
  const bearer = (token: string) => ({ authorization: `Bearer ${token}` });
  const claimsOf = (user: TestUser, t: { org: { slug: string } }) => ({ email: user.email, email_verified: true, org_id: t.org.slug });
  return {
    method: 'oidc',
    env: () => ({ AUTH_METHODS: 'oidc', OIDC_ISSUER: provider.issuer, OIDC_AUDIENCE }),
    async as(user, db) {
      const { rows } = await db.query<{ slug: string }>('SELECT slug FROM orgs WHERE id = $1', [user.orgId]);
      return bearer(await provider.sign(key, claimsOf(user, { org: rows[0]! })));
    },
    async refused(t) {
      const claims = claimsOf(t.owner, t);
      const now = nowSeconds();
      const pem = await exportSPKI(key.publicKey);
      const hs256 = await new SignJWT({ ...claims, iss: provider.issuer, aud: OIDC_AUDIENCE, exp: now + 300 })
        .setProtectedHeader({ alg: 'HS256', typ: 'JWT', kid: key.kid })
        .sign(new TextEncoder().encode(pem));
      const cases: [string, Promise<string> | string][] = [
        ['expired', provider.sign(key, { ...claims, iat: now - 3_600, exp: now - 600 })],
        ['not valid yet', provider.sign(key, { ...claims, nbf: now + 600 })],
        ['for another audience', provider.sign(key, { ...claims, aud: 'another-service' })],
        ['from another issuer', provider.sign(key, { ...claims, iss: 'https://idp.invalid' })],
        ['signed by a key the provider does not publish', provider.sign(stranger, claims)],
        ['signed by another key under a published kid', provider.sign({ ...stranger, kid: key.kid }, claims)],
        ['alg none', rawToken({ alg: 'none', typ: 'JWT' }, { ...claims, iss: provider.issuer, aud: OIDC_AUDIENCE, exp: now + 300 })],
        ["HS256 with the provider's public key as the secret", hs256],
        ['a typ that is not accepted', provider.sign(key, claims, { typ: 'dpop+jwt' })],
        ['email_verified false', provider.sign(key, { ...claims, email_verified: false })],
        ['an email that is no user of the org', provider.sign(key, { ...claims, email: 'nobody@example.test' })],
        ['an org that does not exist', provider.sign(key, { ...claims, org_id: 'no-such-org-here' })],
        ['no org claim', provider.sign(key, { ...claims, org_id: undefined })],
        ['malformed (a header that is not JSON)', rawToken('{not json', { ...claims, iss: provider.issuer, aud: OIDC_AUDIENCE, exp: now + 300 }, 'c2ln')],
      ];
      return Promise.all(cases.map(async ([what, token]) => ({ what, headers: bearer(await token) })));
    },
    async revoke(user, _headers, db) {
      await db.query('UPDATE users SET deleted_at = now() WHERE id = $1', [user.id]);
    },
    stop: () => provider.close(),
  };
}
