/**
 * Tokens of an external OpenID Connect provider (OIDC_ISSUER): Auth0, Clerk, WorkOS, Keycloak...
 *
 * - The provider is found through its discovery document; its signing keys through jose's remote
 *   key set (cached; a token signed with a key not seen yet fetches the set again, at most once per
 *   cooldown, so the provider can rotate its keys).
 * - Every token is verified (jose): allowed algorithms (asymmetric only), issuer, audience,
 *   exp (required) and nbf with a small clock tolerance, and its `typ` header. Nothing about a
 *   verified token is cached: every request is verified again, so `exp` holds to the second.
 * - A verified token names an org (OIDC_ORG_CLAIM: our slug or id) and an email
 *   (OIDC_EMAIL_CLAIM). The caller is the live user with that email in that live org, with the role
 *   they have here (never one from the token). That lookup is cached like every other caller:
 *   the database's notifications about the user or the org drop it.
 * - The provider is a dependency. While it cannot be reached, or answers nonsense, its tokens are
 *   answered 503 with Retry-After (never 401, which would tell a client to sign in again, and
 *   never 500), and it is asked again on demand after a backoff, not on every request. Keys fetched
 *   before the outage keep verifying tokens meanwhile.
 */
import type { FastifyBaseLogger } from 'fastify';
import {
  createLocalJWKSet,
  createRemoteJWKSet,
  customFetch,
  errors,
  jwksCache,
  jwtVerify,
  type CryptoKey,
  type ExportedJWKSCache,
  type FetchImplementation,
  type FlattenedJWSInput,
  type JWSHeaderParameters,
  type JWTPayload,
  type JWTVerifyGetKey,
  type JWTVerifyOptions,
  type RemoteJWKSet,
} from 'jose';
import type { OidcConfig } from '../config/env.js';
import { AppError } from '../errors.js';
import type { Database } from '../infra/database.js';
import { callerFromLookup, invalidToken, type BearerResolver } from '../middleware/authenticate.js';
import { NO_USER_ID } from '../models/audit.model.js';
import { findAuthIdentityByEmail, normaliseEmail } from '../models/user.model.js';
import type { AuthLookup, Authenticator, CachePolicy } from './index.js';

export interface OidcTimings {
  /** Bound of every request to the provider (discovery, keys), its body included. */
  fetchTimeoutMs: number;
  /** After a successful key fetch, how long before a token with an unknown key may fetch again. */
  keysCooldownMs: number;
  /** How long fetched keys are used before they are fetched again. */
  keysMaxAgeMs: number;
  /** While the provider cannot be reached, keys fetched at most this long ago still verify tokens. */
  staleKeysMaxAgeMs: number;
  /** The discovery document is fetched again, in the background, once it is this old. */
  discoveryMaxAgeMs: number;
  /** After a failed request to the provider, none before this; doubled per failure up to the max. */
  retryMinMs: number;
  retryMaxMs: number;
}

export const OIDC_TIMINGS: Readonly<OidcTimings> = Object.freeze({
  fetchTimeoutMs: 5_000,
  keysCooldownMs: 30_000,
  keysMaxAgeMs: 10 * 60_000,
  staleKeysMaxAgeMs: 24 * 3_600_000,
  discoveryMaxAgeMs: 24 * 3_600_000,
  retryMinMs: 1_000,
  retryMaxMs: 30_000,
});

export interface OidcMethodDeps {
  config: OidcConfig;
  db: Database;
  auth: Authenticator;
  log: FastifyBaseLogger;
}

export interface OidcMethod {
  readonly issuer: string;
  readonly resolve: BearerResolver;
  /** False while the last attempt to fetch the discovery document or the key set failed. */
  readonly reachable: boolean;
  close(): Promise<void>;
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
// As the orgs table's CHECK has it.
const SLUG = /^[a-z0-9]([a-z0-9-]*[a-z0-9])?$/;
const SLUG_MAX = 100;
const EMAIL = /^[^\s@]+@[^\s@]+$/;
const EMAIL_MAX = 255;
const MAX_DOCUMENT_CHARS = 1 << 20;

const providerUnavailable = (retryAfterSeconds: number) =>
  new AppError('service_unavailable', 'The identity provider cannot be reached to verify this token; retry later', undefined, Math.max(1, retryAfterSeconds));

/** `application/at+JWT` and `at+jwt` are the same type (RFC 7515, 4.1.9). */
const normaliseTyp = (typ: string) => typ.toLowerCase().replace(/^application\//, '');

export function createOidcMethod(deps: OidcMethodDeps, timings: Partial<OidcTimings> = {}): OidcMethod {
  const { config, db, auth, log } = deps;
  const keys = new ProviderKeys(config.issuer, { ...OIDC_TIMINGS, ...timings }, log);
  const types = new Set(config.tokenTypes.map(normaliseTyp));

  // Checked before the key is looked for: a token of the wrong type costs no request to the provider.
  const getKey: JWTVerifyGetKey = (header, token) => {
    if (typeof header.typ !== 'string' || !types.has(normaliseTyp(header.typ))) {
      throw invalidToken(`The token's typ header must be one of ${config.tokenTypes.join(', ')}`);
    }
    return keys.getKey(header, token);
  };
  const verifyOptions: JWTVerifyOptions = {
    issuer: config.issuer,
    audience: config.audience,
    algorithms: [...config.algorithms],
    clockTolerance: config.clockToleranceSeconds,
    requiredClaims: ['exp'],
  };

  const refusal = (err: unknown): AppError => {
    if (err instanceof AppError) return err;
    if (err instanceof errors.JWTExpired) return invalidToken('The token has expired');
    if (err instanceof errors.JWTClaimValidationFailed) {
      switch (err.claim) {
        case 'nbf':
          return invalidToken(err.reason === 'check_failed' ? 'The token is not valid yet (nbf)' : 'The token has an invalid nbf claim');
        case 'aud':
          return invalidToken('The token is not meant for this service (aud)');
        case 'iss':
          return invalidToken('The token is not from the configured identity provider (iss)');
        case 'exp':
          return invalidToken(err.reason === 'missing' ? 'The token has no exp claim' : 'The token has an invalid exp claim');
        default:
          return invalidToken(`The token has an invalid ${err.claim} claim`);
      }
    }
    if (err instanceof errors.JOSEAlgNotAllowed) return invalidToken(`The token's algorithm is not accepted; accepted: ${config.algorithms.join(', ')}`);
    if (err instanceof errors.JWSSignatureVerificationFailed) return invalidToken("The token's signature is invalid");
    if (err instanceof errors.JWKSNoMatchingKey) return invalidToken('The token is signed with a key the identity provider does not publish');
    if (err instanceof errors.JWKSMultipleMatchingKeys) return invalidToken("The token names no key (kid) and several of the identity provider's keys fit");
    if (err instanceof errors.JOSEError) return invalidToken('Malformed token');
    // Not the token's fault: a key the provider publishes cannot be used (an RSA key under 2048
    // bits, say). The message names the key's problem, never the token.
    log.warn({ issuer: config.issuer, reason: describe(err) }, "A token could not be verified with the identity provider's key");
    return providerUnavailable(Math.ceil(OIDC_TIMINGS.retryMaxMs / 1_000));
  };

  const orgRefOf = (claims: JWTPayload): string => {
    const v = claims[config.orgClaim];
    if (v === undefined) throw invalidToken(`The token has no ${config.orgClaim} claim (the organization's slug or id)`);
    if (typeof v === 'string' && UUID.test(v)) return v.toLowerCase();
    if (typeof v !== 'string' || v.length > SLUG_MAX || !SLUG.test(v)) {
      throw invalidToken(`The token's ${config.orgClaim} claim must be the slug or the id of an organization`);
    }
    return v;
  };
  const emailOf = (claims: JWTPayload): string => {
    const v = claims[config.emailClaim];
    if (v === undefined) throw invalidToken(`The token has no ${config.emailClaim} claim`);
    if (typeof v !== 'string' || v.length > EMAIL_MAX || !EMAIL.test(v.trim())) {
      throw invalidToken(`The token's ${config.emailClaim} claim must be an email address`);
    }
    if (claims.email_verified === false || claims.email_verified === 'false') {
      throw invalidToken('The identity provider has not verified the email of this token (email_verified is false)');
    }
    return normaliseEmail(v);
  };

  // Keyed by (org claim, email). Only users found are kept: a miss is thrown, not cached, so a
  // user created after a refused attempt can sign in at once (the database announces a new user
  // by its id, which no email-keyed miss could be matched with).
  const users = auth.createCache<AuthLookup>(async (orgRef, email) => {
    const found = await findAuthIdentityByEmail(db, UUID.test(orgRef) ? { id: orgRef } : { slug: orgRef }, email);
    if (!found.user) throw new NotAUser(found.orgId);
    return found;
  }, FOUND_USERS);

  const resolve: BearerResolver = async (token, request) => {
    let claims: JWTPayload;
    try {
      claims = (await jwtVerify(token, getKey, verifyOptions)).payload;
    } catch (err) {
      throw refusal(err);
    }
    const orgRef = orgRefOf(claims);
    const email = emailOf(claims);
    let found: AuthLookup;
    try {
      found = await users.lookup(orgRef, email);
    } catch (err) {
      if (!(err instanceof NotAUser)) throw err;
      if (err.orgId === null) throw invalidToken(`The organization named by the token's ${config.orgClaim} claim does not exist`);
      // A genuine token of the provider for someone who is not a user here: that org's business.
      request.claimedIdentity = { orgId: err.orgId, actor: { type: 'user', id: NO_USER_ID, email } };
      throw invalidToken("The token's email is not a user of its organization");
    }
    return callerFromLookup(found.user!.orgId, found, 'oidc', null);
  };

  keys.warmUp();
  return {
    issuer: config.issuer,
    resolve,
    get reachable() {
      return keys.reachable;
    },
    close: () => keys.close(),
  };
}

/** What the user loader throws when there is no such user (orgId: null when no such org either). */
class NotAUser extends Error {
  constructor(readonly orgId: string | null) {
    super('No such user');
  }
}

const FOUND_USERS: CachePolicy<AuthLookup> = {
  classify: () => 'positive',
  // The key names the org by its slug, perhaps: its notifications come by id, and the user's by theirs.
  dependsOn: (v) => ({ subject: v.user?.id, org: v.user?.orgId }),
  unknownOrg: Object.freeze({ orgExists: false, user: null, limitOverrides: Object.freeze({}) }),
  freeze: (v) => Object.freeze(v.limitOverrides),
};

// ---------------------------------------------------------------------------------------------
// The provider: discovery, keys, and what to do while it cannot be reached.

/** A failure of the provider itself; `misconfigured` when retrying cannot help until someone acts. */
class ProviderError extends Error {
  constructor(
    message: string,
    readonly misconfigured = false,
  ) {
    super(message);
  }
}

/** Retry later, doubling the wait per failure. Time is Date.now(), as jose's key-set cache reads it. */
class Backoff {
  private failures = 0;
  private retryAt = 0;

  constructor(
    private readonly minMs: number,
    private readonly maxMs: number,
  ) {}

  get failing(): boolean {
    return this.failures > 0;
  }

  /** Whole seconds until the next attempt may be made; 0: now. */
  wait(now = Date.now()): number {
    return now < this.retryAt ? Math.ceil((this.retryAt - now) / 1_000) : 0;
  }

  /** Records a failed attempt; false when a concurrent one (the same fetch) was recorded already. */
  fail(now = Date.now()): boolean {
    if (now < this.retryAt) return false;
    this.failures++;
    this.retryAt = now + Math.min(this.maxMs, this.minMs * 2 ** Math.min(this.failures - 1, 20));
    return true;
  }

  succeed(): void {
    this.failures = 0;
    this.retryAt = 0;
  }
}

interface Discovered {
  readonly jwksUri: string;
  readonly remote: RemoteJWKSet;
  /** What jose last fetched ({ jwks, uat }, written by jose): the keys to fall back on. */
  readonly saved: Partial<ExportedJWKSCache>;
  fetchedAt: number;
  stale?: { uat: number; keys: ReturnType<typeof createLocalJWKSet> };
}

/** `<issuer>/.well-known/openid-configuration`, the issuer's terminating "/" removed (OpenID Connect Discovery 1.0, 4). */
export const discoveryUrl = (issuer: string): string => `${issuer.replace(/\/$/, '')}/.well-known/openid-configuration`;

function describe(err: unknown): string {
  if (!(err instanceof Error)) return String(err).slice(0, 300);
  if (err.name === 'TimeoutError' || err instanceof errors.JWKSTimeout) return 'timed out';
  const code = (err.cause as { code?: unknown } | undefined)?.code;
  return `${err.message}${typeof code === 'string' ? ` (${code})` : ''}`.slice(0, 300);
}

class ProviderKeys {
  private current: Discovered | null = null;
  private discovering: Promise<Discovered> | null = null;
  private readonly discoveryRetry: Backoff;
  private readonly keysRetry: Backoff;
  private closed = false;
  private warming: Promise<void> = Promise.resolve();
  /** Requests to the provider of the last fetchTimeoutMs, to abort at close. */
  private readonly inFlight = new Set<AbortController>();
  private readonly fetch: FetchImplementation = (url, init) => this.request(url, init);

  constructor(
    private readonly issuer: string,
    private readonly timings: OidcTimings,
    private readonly log: FastifyBaseLogger,
  ) {
    this.discoveryRetry = new Backoff(timings.retryMinMs, timings.retryMaxMs);
    this.keysRetry = new Backoff(timings.retryMinMs, timings.retryMaxMs);
  }

  /** For jwtVerify: the provider's key for this token's header, or a 503 when it cannot be known. */
  readonly getKey = async (header: JWSHeaderParameters, token: FlattenedJWSInput): Promise<CryptoKey> => {
    const p = await this.provider();
    if (this.keysRetry.wait() === 0) {
      try {
        const key = await p.remote(header, token);
        this.recovered(this.keysRetry, 'keys');
        return key;
      } catch (err) {
        // The set was fetched and this token's key is not in it: the token's fault.
        if (err instanceof errors.JWKSNoMatchingKey || err instanceof errors.JWKSMultipleMatchingKeys) {
          this.recovered(this.keysRetry, 'keys');
          throw err;
        }
        this.failed(this.keysRetry, `key set (${p.jwksUri})`, err);
      }
    }
    return this.staleKey(p, header, token);
  };

  /** False while the last fetch of the discovery document or of the key set failed. */
  get reachable(): boolean {
    return !this.discoveryRetry.failing && !this.keysRetry.failing;
  }

  /** Discovery and keys fetched at start, so the first token does not wait; failures are retried on demand. */
  warmUp(): void {
    this.warming = (async () => {
      const p = await this.provider();
      if (this.keysRetry.wait() > 0 || this.closed) return;
      try {
        await p.remote.reload();
        this.recovered(this.keysRetry, 'keys');
      } catch (err) {
        this.failed(this.keysRetry, `key set (${p.jwksUri})`, err);
      }
    })().catch(() => undefined);
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const controller of this.inFlight) controller.abort();
    await this.warming;
    await this.discovering?.catch(() => undefined);
  }

  /**
   * Every request to the provider (jose's for the keys, ours for discovery): aborted by the
   * caller's signal, after fetchTimeoutMs (the body included), or when the server closes. The
   * timeout is a timer of ours holding the controller: a signal combined with AbortSignal.any()
   * from a timeout signal can be garbage-collected before it fires (Node 20), and the request
   * would then hang for as long as the provider does.
   */
  private request(url: string, init: { headers: Headers; method: 'GET'; redirect: 'manual'; signal?: AbortSignal }): Promise<Response> {
    const controller = new AbortController();
    this.inFlight.add(controller);
    const timeoutMs = this.timings.fetchTimeoutMs;
    setTimeout(() => {
      this.inFlight.delete(controller);
      controller.abort(new DOMException(`No answer within ${timeoutMs} ms`, 'TimeoutError'));
    }, timeoutMs).unref();
    const { signal } = init;
    if (signal?.aborted || this.closed) controller.abort(signal?.reason);
    else signal?.addEventListener('abort', () => controller.abort(signal.reason), { once: true });
    return fetch(url, { ...init, signal: controller.signal });
  }

  /** The keys fetched before the provider became unreachable, or a 503. */
  private async staleKey(p: Discovered, header: JWSHeaderParameters, token: FlattenedJWSInput): Promise<CryptoKey> {
    const retryAfter = this.keysRetry.wait();
    const { jwks, uat } = p.saved;
    if (!jwks || uat === undefined || Date.now() - uat > this.timings.staleKeysMaxAgeMs) throw providerUnavailable(retryAfter);
    if (p.stale?.uat !== uat) p.stale = { uat, keys: createLocalJWKSet(jwks) };
    try {
      return await p.stale.keys(header, token);
    } catch {
      // Perhaps a key published since: only the provider can tell.
      throw providerUnavailable(retryAfter);
    }
  }

  private async provider(): Promise<Discovered> {
    const p = this.current;
    if (p) {
      if (Date.now() - p.fetchedAt > this.timings.discoveryMaxAgeMs && !this.discovering && this.discoveryRetry.wait() === 0) {
        void this.discover().catch(() => undefined);
      }
      return p;
    }
    if (this.discovering) return this.discovering;
    const wait = this.discoveryRetry.wait();
    if (wait > 0) throw providerUnavailable(wait);
    return this.discover();
  }

  /** One discovery at a time; on failure the previous result (if any) stays in use. */
  private discover(): Promise<Discovered> {
    const attempt: Promise<Discovered> = this.fetchDiscovery()
      .then(
        (jwksUri) => {
          this.recovered(this.discoveryRetry, 'discovery');
          const cur = this.current;
          if (cur?.jwksUri === jwksUri) {
            cur.fetchedAt = Date.now();
            return cur;
          }
          this.log.info({ issuer: this.issuer, jwksUri, previous: cur?.jwksUri }, 'OIDC provider discovered');
          const saved: Partial<ExportedJWKSCache> = {};
          const remote = createRemoteJWKSet(new URL(jwksUri), {
            timeoutDuration: this.timings.fetchTimeoutMs,
            cooldownDuration: this.timings.keysCooldownMs,
            cacheMaxAge: this.timings.keysMaxAgeMs,
            [jwksCache]: saved as Record<string, never>,
            [customFetch]: this.fetch,
          });
          this.current = { jwksUri, remote, saved, fetchedAt: Date.now() };
          return this.current;
        },
        (err: unknown) => {
          this.failed(this.discoveryRetry, `discovery (${discoveryUrl(this.issuer)})`, err);
          if (this.current) return this.current;
          throw providerUnavailable(this.discoveryRetry.wait());
        },
      )
      .finally(() => {
        if (this.discovering === attempt) this.discovering = null;
      });
    this.discovering = attempt;
    return attempt;
  }

  /** The key set's URL from the discovery document, whose issuer must be OIDC_ISSUER exactly. */
  private async fetchDiscovery(): Promise<string> {
    const url = discoveryUrl(this.issuer);
    const res = await this.request(url, { method: 'GET', redirect: 'manual', headers: new Headers({ accept: 'application/json' }) });
    if (res.status !== 200) {
      await res.body?.cancel().catch(() => undefined);
      throw new ProviderError(`answered HTTP ${res.status}`);
    }
    if (Number(res.headers.get('content-length') ?? 0) > MAX_DOCUMENT_CHARS) {
      await res.body?.cancel().catch(() => undefined);
      throw new ProviderError('the discovery document is too large');
    }
    const text = await res.text();
    let doc: unknown;
    try {
      if (text.length > MAX_DOCUMENT_CHARS) throw new Error('too large');
      doc = JSON.parse(text);
    } catch {
      throw new ProviderError('the discovery document is not a JSON object');
    }
    if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) throw new ProviderError('the discovery document is not a JSON object');
    const { issuer, jwks_uri: jwksUri } = doc as Record<string, unknown>;
    if (issuer !== this.issuer) {
      throw new ProviderError(
        `the discovery document names the issuer ${JSON.stringify(issuer)?.slice(0, 200)}, not OIDC_ISSUER (${this.issuer}): set OIDC_ISSUER to the provider's issuer exactly, trailing slash included`,
        true,
      );
    }
    let keysUrl: URL;
    try {
      keysUrl = new URL(typeof jwksUri === 'string' ? jwksUri : '');
    } catch {
      throw new ProviderError('the discovery document has no valid jwks_uri', true);
    }
    // Keys over plain http only from a provider that is itself on http (allowed outside production).
    if (keysUrl.protocol !== 'https:' && !(keysUrl.protocol === 'http:' && this.issuer.startsWith('http:'))) {
      throw new ProviderError(`the discovery document's jwks_uri must be an https URL, not ${keysUrl.protocol}`, true);
    }
    return keysUrl.href;
  }

  private failed(backoff: Backoff, what: string, err: unknown): void {
    if (this.closed) return;
    const first = !backoff.failing;
    if (!backoff.fail() || !first) return; // one line per outage, not per request
    const line = { issuer: this.issuer, reason: describe(err) };
    const msg = `OIDC provider ${what} failed; retried with backoff. Its tokens get 503 while no keys are known`;
    if (err instanceof ProviderError && err.misconfigured) this.log.error(line, msg);
    else this.log.warn(line, msg);
  }

  private recovered(backoff: Backoff, what: string): void {
    if (!backoff.failing) return;
    backoff.succeed();
    this.log.info({ issuer: this.issuer }, `OIDC provider ${what} available again`);
  }
}
