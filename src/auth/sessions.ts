/**
 * Password sign-in and its sessions: the `password` method of AUTH_METHODS.
 *
 *   POST /v1/auth/login    {orgSlug, email, password} -> access token (JWT) + refresh token
 *   POST /v1/auth/refresh  {refreshToken}             -> a new pair; the old refresh token is used up
 *   POST /v1/auth/logout   {refreshToken}             -> the session ends
 *   PUT  /v1/me/password   {currentPassword, newPassword} -> other sessions end
 *   Authorization: Bearer <access token>              -> the caller (methods.session)
 *
 * An access token is accepted while its signature, claims and lifetime hold AND its session is
 * live AND its user and org are: the last three come from the auth cache (keyed by org and
 * session id), which the database's notifications keep current on every instance, so an ended
 * session, a deleted user or a changed role stops its access tokens everywhere within a second.
 * The role a request acts with is the user's current one, not the token's.
 */
import { LRUCache } from 'lru-cache';
import type { FastifyRequest } from 'fastify';
import { AppError } from '../errors.js';
import { callerFromLookup, invalidToken, type BearerResolver, type ResolvedCaller } from '../middleware/authenticate.js';
import { requestMetaOf } from '../middleware/requestMeta.js';
import { changeOwnPassword, findLoginCandidate, findOwnPasswordHash } from '../models/password.model.js';
import { createSession, endSessionByRefreshToken, findSessionCaller, pruneEndedSessions, rotateRefreshToken, type SessionLookup } from '../models/session.model.js';
import { normaliseEmail, type User } from '../models/user.model.js';
import type { RequestContext } from '../types/context.js';
import type { AuthMethodDeps } from './methods.js';
import type { CachePolicy } from './cache.js';
import { createLoginThrottle, type LoginThrottle } from './loginThrottle.js';
import { NO_USER_ID } from '../models/audit.model.js';
import { hashPassword, passwordProblem, verifyPassword, warmPasswordHashing } from './passwords.js';
import {
  CLOCK_TOLERANCE_SECONDS,
  createAccessTokens,
  hashRefreshToken,
  InvalidAccessToken,
  isRefreshTokenShape,
  newRefreshToken,
  type AccessClaims,
} from './tokens.js';

export interface TokenPair {
  accessToken: string;
  refreshToken: string;
  tokenType: 'Bearer';
  /** Seconds the access token lives. */
  expiresIn: number;
}

export interface SessionAuth {
  /** `iss` of our access tokens: the dispatcher sends tokens with it here. */
  readonly issuer: string;
  readonly resolve: BearerResolver;
  readonly throttle: LoginThrottle;
  login(input: { orgSlug: string; email: string; password: string }, request: FastifyRequest): Promise<TokenPair>;
  refresh(refreshToken: string, request: FastifyRequest): Promise<TokenPair>;
  logout(refreshToken: string, request: FastifyRequest): Promise<void>;
  changePassword(ctx: RequestContext, input: { currentPassword?: string | undefined; newPassword: string }, request: FastifyRequest): Promise<void>;
  /** Deletes the rows of tokens that ended more than a week ago; runs by itself every 15 minutes. */
  prune(): Promise<number>;
  close(): Promise<void>;
}

/** Ended tokens are kept this long (the audit log keeps the story for good), then deleted. */
const PRUNE_GRACE_SECONDS = 7 * 86_400;
const PRUNE_INTERVAL_MS = 15 * 60_000;
const PRUNE_BATCH = 1_000;
const PRUNE_MAX_BATCHES = 100;

/** One body for every failed sign-in: wrong org, unknown email, wrong password, no password, deleted user. */
const LOGIN_FAILED = 'Invalid organization, email or password';
const REFRESH_REFUSED = 'Invalid, expired or revoked refresh token';
const SESSION_ENDED = 'Session has ended: sign in again';

const SESSION_POLICY: CachePolicy<SessionLookup> = {
  classify: (v) => (v.user ? 'positive' : v.orgExists ? 'negative' : 'unknown_org'),
  // The key is (org, session id): a message for the session, its user or its org makes it stale.
  dependsOn: (v) => ({ subject: v.user?.id }),
  unknownOrg: Object.freeze({ orgExists: false, user: null, limitOverrides: Object.freeze({}) }),
  freeze: (v) => Object.freeze(v.limitOverrides),
};

// Verified tokens are remembered until they expire, so a token seen before costs no signature
// check and no promise: the hot path answers synchronously from two in-memory maps.
const VERIFIED_TOKENS_MAX = 10_000;

export function createSessionAuth(deps: AuthMethodDeps): SessionAuth {
  const { config, db, auth, log } = deps;
  const jwt = config.auth.jwt!;
  const tokens = createAccessTokens(jwt);
  if (tokens.ephemeralKey) {
    log.warn(
      'JWT_SIGNING_KEY is not set: access tokens are signed with a random key made at start, so they stop working when this process stops and other instances do not accept them',
    );
  }
  // The dummy hash for unknown users is made now, not during the first failed sign-in.
  warmPasswordHashing().catch((err: unknown) => log.error({ err }, 'Cannot prepare password hashing'));
  const throttle = createLoginThrottle(deps.limiter, config.rateLimit.login);
  const sessions = auth.createCache<SessionLookup>((orgId, sessionId) => findSessionCaller(db, orgId, sessionId), SESSION_POLICY);
  const verified =
    config.authCache.ttlMs > 0 ? new LRUCache<string, AccessClaims>({ max: Math.min(VERIFIED_TOKENS_MAX, config.authCache.maxEntries) }) : null;

  function callerOf(claims: AccessClaims, found: SessionLookup, request: FastifyRequest): ResolvedCaller {
    if (!found.user || found.user.id !== claims.sub) {
      // The token is ours (its signature holds), so its org is known: the refusal is audited there.
      request.claimedIdentity = { orgId: claims.orgId, actor: { type: 'user', id: claims.sub, email: found.user?.email ?? null } };
      throw invalidToken(SESSION_ENDED);
    }
    return callerFromLookup(claims.orgId, found, 'password', claims.sessionId);
  }

  function withSession(claims: AccessClaims, request: FastifyRequest): ResolvedCaller | Promise<ResolvedCaller> {
    const cached = sessions.peek(claims.orgId, claims.sessionId);
    if (cached) return callerOf(claims, cached, request);
    return sessions.lookup(claims.orgId, claims.sessionId).then((found) => callerOf(claims, found, request));
  }

  const resolve: BearerResolver = (token, request) => {
    const known = verified?.get(token);
    if (known) {
      if ((known.exp + CLOCK_TOLERANCE_SECONDS) * 1000 > Date.now()) return withSession(known, request);
      verified!.delete(token);
      throw invalidToken('Access token expired');
    }
    return tokens.verify(token).then(
      (claims) => {
        const ttl = (claims.exp + CLOCK_TOLERANCE_SECONDS) * 1000 - Date.now();
        if (verified && ttl > 0) verified.set(token, claims, { ttl: Math.ceil(ttl) });
        return withSession(claims, request);
      },
      (err: unknown) => {
        throw invalidToken(err instanceof InvalidAccessToken ? err.message : 'Invalid access token');
      },
    );
  };

  const pair = async (user: User, sessionId: string, refreshToken: string): Promise<TokenPair> => ({
    accessToken: await tokens.sign({ userId: user.id, orgId: user.orgId, role: user.role, sessionId }),
    refreshToken,
    tokenType: 'Bearer',
    expiresIn: tokens.ttlSeconds,
  });

  const nextToken = () => {
    const refreshToken = newRefreshToken();
    return { refreshToken, input: { tokenHash: hashRefreshToken(refreshToken).toString('hex'), ttlSeconds: jwt.refreshTokenTtlSeconds } };
  };

  const prune = () => pruneEndedSessions(db, { graceSeconds: PRUNE_GRACE_SECONDS, batchSize: PRUNE_BATCH, maxBatches: PRUNE_MAX_BATCHES });
  // Every instance prunes; the deletes are idempotent, so several at once only repeat work.
  let pruning: Promise<unknown> | null = null;
  const pruner = setInterval(() => {
    if (pruning) return;
    pruning = prune()
      .then((n) => {
        if (n > 0) log.info({ deleted: n }, 'Deleted the rows of sessions that ended more than a week ago');
      })
      .catch((err: unknown) => log.warn({ err }, 'Cannot prune ended sessions; retrying at the next interval'))
      .finally(() => {
        pruning = null;
      });
  }, PRUNE_INTERVAL_MS);
  pruner.unref();

  return {
    prune,
    async close() {
      clearInterval(pruner);
      await pruning;
    },
    issuer: tokens.issuer,
    resolve,
    throttle,

    async login({ orgSlug, email, password }, request) {
      // Before anything else: a refused attempt costs no lookup and no argon2 verification.
      await throttle.attempt(`slug:${orgSlug}:${normaliseEmail(email)}`, request.ip);
      const candidate = await findLoginCandidate(db, orgSlug, email);
      const user = candidate?.user ?? null;
      const storedHash = user ? (candidate?.passwordHash ?? null) : null;
      // Exactly one argon2 verification whatever was found (against a dummy hash when nothing).
      const matches = await verifyPassword(storedHash, password);
      if (candidate && user && storedHash !== null && matches) {
        const { refreshToken, input } = nextToken();
        const created = await createSession(db, candidate.orgId, user.id, storedHash, input, requestMetaOf(request));
        if (created) return pair(created.user, created.sessionId, refreshToken);
      }
      if (candidate) {
        // An email that is no user's gets the placeholder id the identity-provider method uses.
        request.claimedIdentity = { orgId: candidate.orgId, actor: { type: 'user', id: user?.id ?? NO_USER_ID, email: normaliseEmail(email) } };
      }
      throw new AppError('unauthorized', LOGIN_FAILED);
    },

    async refresh(refreshToken, request) {
      if (!isRefreshTokenShape(refreshToken)) throw new AppError('unauthorized', REFRESH_REFUSED);
      const { refreshToken: next, input } = nextToken();
      const hash = hashRefreshToken(refreshToken).toString('hex');
      const outcome = await rotateRefreshToken(db, hash, input, requestMetaOf(request));
      switch (outcome.kind) {
        case 'rotated':
          return pair(outcome.user, outcome.sessionId, next);
        case 'reused':
          // Audited as session.reuse_detected already; the session is gone on this instance now.
          auth.forgetUser(outcome.sessionId);
          throw new AppError('unauthorized', REFRESH_REFUSED);
        case 'refused':
          if (outcome.orgId) request.claimedIdentity = { orgId: outcome.orgId, actor: { type: 'user', id: outcome.userId, email: null } };
          throw new AppError('unauthorized', REFRESH_REFUSED);
      }
    },

    async logout(refreshToken, request) {
      if (!isRefreshTokenShape(refreshToken)) throw new AppError('unauthorized', REFRESH_REFUSED);
      const outcome = await endSessionByRefreshToken(db, hashRefreshToken(refreshToken).toString('hex'), requestMetaOf(request));
      if (outcome.kind === 'unknown') throw new AppError('unauthorized', REFRESH_REFUSED);
      auth.forgetUser(outcome.sessionId);
    },

    async changePassword(ctx, { currentPassword, newPassword }, request) {
      if (ctx.authMethod === 'api_key') throw new AppError('forbidden', 'An API key has no password: sign in as a user');
      const own = await findOwnPasswordHash(db, ctx);
      if (!own) throw new AppError('unauthorized', 'Unknown organization or user');
      const problem = passwordProblem(newPassword, own.user.email);
      if (problem) {
        throw new AppError('validation_failed', `body.newPassword: ${problem}`, [{ field: 'body.newPassword', message: problem }]);
      }
      if (own.passwordHash !== null) {
        if (currentPassword === undefined) {
          const message = 'is required to change a password';
          throw new AppError('validation_failed', `body.currentPassword: ${message}`, [{ field: 'body.currentPassword', message }]);
        }
        await throttle.attempt(`id:${ctx.orgId}:${ctx.userId}`, request.ip);
        if (!(await verifyPassword(own.passwordHash, currentPassword))) {
          throw new AppError('forbidden', 'currentPassword: does not match your password');
        }
      }
      await changeOwnPassword(db, ctx, own.passwordHash, await hashPassword(newPassword), requestMetaOf(request));
      // The other sessions end in the database (and its notifications); this instance forgets at once.
      auth.forgetUser(ctx.userId);
    },
  };
}
