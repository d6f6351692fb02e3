/**
 * The two tokens of a password session.
 *
 * - Access token: a JWT (HS256, header typ `at+jwt` as RFC 9068 names access tokens) signed with
 *   JWT_SIGNING_KEY, with sub (user id), org_id, role, sid (session id), jti, iat, exp, iss, aud.
 *   Verified with jose: HS256 only, our issuer and audience, typ at+jwt, every claim present, 5 s
 *   of clock tolerance. Its role claim is informative: requests act with the user's current role.
 * - Refresh token: `llmr_` + 256 random bits in base62, opaque; only its SHA-256 is stored.
 */
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { errors, jwtVerify, SignJWT, type JWTPayload } from 'jose';
import type { JwtConfig } from '../config/env.js';
import type { Role } from '../types/context.js';

export const REFRESH_TOKEN_PREFIX = 'llmr_';
const BASE62 = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz';
// 62^43 > 2^256: every 256-bit value fits in 43 digits.
const REFRESH_DIGITS = 43;
const REFRESH_TOKEN_SHAPE = new RegExp(`^${REFRESH_TOKEN_PREFIX}[0-9A-Za-z]{${REFRESH_DIGITS}}$`);

function base62(bytes: Buffer, digits: number): string {
  let n = BigInt(`0x${bytes.toString('hex')}`);
  let out = '';
  for (let i = 0; i < digits; i++) {
    out = BASE62[Number(n % 62n)]! + out;
    n /= 62n;
  }
  return out;
}

export function newRefreshToken(): string {
  return REFRESH_TOKEN_PREFIX + base62(randomBytes(32), REFRESH_DIGITS);
}

export const isRefreshTokenShape = (token: string): boolean => REFRESH_TOKEN_SHAPE.test(token);

export function hashRefreshToken(token: string): Buffer {
  return createHash('sha256').update(token, 'utf8').digest();
}

// ---------------------------------------------------------------------------------------------

export const ACCESS_TOKEN_TYPE = 'at+jwt';
const ALGORITHM = 'HS256';
export const CLOCK_TOLERANCE_SECONDS = 5;

/** The claims of a verified access token that the server uses. */
export interface AccessClaims {
  readonly sub: string;
  readonly orgId: string;
  readonly sessionId: string;
  /** Seconds since the epoch. */
  readonly exp: number;
}

export interface AccessTokens {
  readonly issuer: string;
  readonly ttlSeconds: number;
  /** Whether the key was made at start because none was configured. */
  readonly ephemeralKey: boolean;
  sign(claims: { userId: string; orgId: string; role: Role; sessionId: string }): Promise<string>;
  /** The claims of a valid token; throws InvalidAccessToken otherwise. */
  verify(token: string): Promise<AccessClaims>;
}

export class InvalidAccessToken extends Error {
  constructor(readonly expired: boolean) {
    super(expired ? 'Access token expired' : 'Invalid access token');
    this.name = 'InvalidAccessToken';
  }
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const isUuid = (v: unknown): v is string => typeof v === 'string' && UUID.test(v);

function claimsOf(payload: JWTPayload): AccessClaims {
  const { sub, org_id: orgId, sid, exp } = payload;
  if (!isUuid(sub) || !isUuid(orgId) || !isUuid(sid) || typeof exp !== 'number') throw new InvalidAccessToken(false);
  return { sub, orgId, sessionId: sid, exp };
}

export function createAccessTokens(config: JwtConfig): AccessTokens {
  const ephemeralKey = config.signingKey === null;
  // Never logged, never returned: it lives in this closure only.
  const key: Uint8Array = config.signingKey === null ? randomBytes(32) : new TextEncoder().encode(config.signingKey);
  const { issuer, audience, accessTokenTtlSeconds: ttlSeconds } = config;

  return {
    issuer,
    ttlSeconds,
    ephemeralKey,
    sign({ userId, orgId, role, sessionId }) {
      return new SignJWT({ org_id: orgId, role, sid: sessionId })
        .setProtectedHeader({ alg: ALGORITHM, typ: ACCESS_TOKEN_TYPE })
        .setSubject(userId)
        .setIssuer(issuer)
        .setAudience(audience)
        .setJti(randomUUID())
        .setIssuedAt()
        .setExpirationTime(`${ttlSeconds}s`)
        .sign(key);
    },
    async verify(token) {
      try {
        const { payload } = await jwtVerify(token, key, {
          algorithms: [ALGORITHM],
          issuer,
          audience,
          typ: ACCESS_TOKEN_TYPE,
          requiredClaims: ['sub', 'org_id', 'sid', 'jti', 'iat', 'exp'],
          clockTolerance: CLOCK_TOLERANCE_SECONDS,
        });
        return claimsOf(payload);
      } catch (err) {
        if (err instanceof InvalidAccessToken) throw err;
        throw new InvalidAccessToken(err instanceof errors.JWTExpired);
      }
    },
  };
}
