import { readFileSync } from 'node:fs';
import { z } from 'zod';
import type { OrgLimits } from '../ratelimit/types.js';
import { AUTH_METHODS, type AuthMethod } from '../types/authMethods.js';

/**
 * The only place that reads process.env. Every variable is declared here with its default;
 * .env.example lists the same set. An invalid configuration stops the process with one message
 * that names every bad variable (values are not echoed: some of them are secrets).
 */

const bool = (defaultValue: boolean) =>
  z
    .enum(['true', 'false', '1', '0'], { message: 'must be true or false' })
    .default(defaultValue ? 'true' : 'false')
    .transform((v) => v === 'true' || v === '1');

const int = (defaultValue: number, min: number, max: number) =>
  z
    .string()
    .default(String(defaultValue))
    .transform((v, ctx) => {
      const n = Number(v);
      if (!/^-?\d+$/.test(v.trim()) || !Number.isSafeInteger(n) || n < min || n > max) {
        ctx.addIssue({ code: 'custom', message: `must be an integer between ${min} and ${max}` });
        return z.NEVER;
      }
      return n;
    });

const num = (defaultValue: number, min: number, max: number) =>
  z
    .string()
    .default(String(defaultValue))
    .transform((v, ctx) => {
      const n = Number(v);
      if (!/^\s*\d+(\.\d+)?\s*$/.test(v) || !Number.isFinite(n) || n < min || n > max) {
        ctx.addIssue({ code: 'custom', message: `must be a number between ${min} and ${max}` });
        return z.NEVER;
      }
      return n;
    });

/** A URL with one of these schemes and a host. */
const urlOf = (schemes: readonly string[]) =>
  z
    .string()
    .refine(
      (v) => {
        try {
          const u = new URL(v);
          return schemes.includes(u.protocol.slice(0, -1)) && u.hostname !== '';
        } catch {
          return false;
        }
      },
      { message: `must be a ${schemes.map((s) => `${s}://`).join(' or ')} URL with a host` },
    )
    .optional();

const redisUrl = urlOf(['redis', 'rediss']);
const postgresUrl = urlOf(['postgres', 'postgresql']);

const schema = z.object({
    NODE_ENV: z
      .enum(['development', 'test', 'production'], { message: 'must be development, test or production' })
      .default('development'),
    HOST: z.string().trim().min(1, 'must not be empty').default('127.0.0.1'),
    PORT: int(3000, 0, 65535),
    LOG_LEVEL: z
      .enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'], {
        message: 'must be one of fatal, error, warn, info, debug, trace, silent',
      })
      .optional(),
    LOG_FORMAT: z.enum(['auto', 'json', 'pretty'], { message: 'must be auto, json or pretty' }).default('auto'),
    ACCESS_LOG: bool(true),

    DATABASE_URL: postgresUrl,
    DATABASE_LISTEN_URL: postgresUrl,
    DATA_DIR: z.string().trim().min(1, 'must not be empty').default('./.data'),
    DATABASE_POOL_MAX: int(10, 1, 1000),
    DATABASE_IDLE_TIMEOUT_MS: int(10_000, 0, 3_600_000),
    DATABASE_CONNECTION_TIMEOUT_MS: int(2_000, 100, 60_000),
    DATABASE_STATEMENT_TIMEOUT_MS: int(5_000, 0, 3_600_000),
    MIGRATE_ON_START: bool(true),

    AUTH_METHODS: z.string().optional(),
    ALLOW_FAKE_AUTH: bool(false),
    JWT_SIGNING_KEY: z.string().optional(),
    JWT_SIGNING_KEY_FILE: z.string().trim().min(1, 'must not be empty').optional(),
    JWT_ISSUER: z.string().trim().min(1, 'must not be empty').default('llm-app'),
    JWT_AUDIENCE: z.string().trim().min(1, 'must not be empty').default('llm-app'),
    ACCESS_TOKEN_TTL_SECONDS: int(900, 30, 86_400),
    REFRESH_TOKEN_TTL_SECONDS: int(30 * 86_400, 60, 365 * 86_400),
    OIDC_ISSUER: urlOf(['https', 'http']),
    OIDC_AUDIENCE: z.string().trim().min(1, 'must not be empty').optional(),
    OIDC_ORG_CLAIM: z.string().trim().min(1, 'must not be empty').default('org_id'),
    OIDC_EMAIL_CLAIM: z.string().trim().min(1, 'must not be empty').default('email'),
    OIDC_ALGORITHMS: z.string().default('RS256,PS256,ES256,EdDSA'),
    OIDC_TOKEN_TYPES: z.string().default('JWT,at+jwt'),
    OIDC_CLOCK_TOLERANCE_SECONDS: int(30, 0, 300),
    AUTH_CACHE_TTL_MS: int(30_000, 0, 600_000),
    AUTH_CACHE_MAX_ENTRIES: int(100_000, 1, 10_000_000),
    AUTH_CACHE_NEGATIVE_MAX_ENTRIES: int(10_000, 1, 10_000_000),
    TRUST_PROXY: bool(false),
    BODY_LIMIT_BYTES: int(1_048_576, 1_024, 100 * 1_048_576),
    SHUTDOWN_TIMEOUT_MS: int(10_000, 0, 600_000),

    REDIS_URL: redisUrl,
    REDIS_CLUSTER: bool(false),
    REDIS_COMMAND_TIMEOUT_MS: int(250, 10, 10_000),
    ORG_RATE_LIMIT_BURST: int(200, 0, 1_000_000_000),
    ORG_RATE_LIMIT_PER_SECOND: num(100, 0, 1_000_000_000),
    USER_RATE_LIMIT_BURST: int(50, 0, 1_000_000_000),
    USER_RATE_LIMIT_PER_SECOND: num(20, 0, 1_000_000_000),
    ORG_DAILY_REQUEST_CAP: int(100_000, 0, Number.MAX_SAFE_INTEGER),
    ORG_MONTHLY_REQUEST_CAP: int(2_000_000, 0, Number.MAX_SAFE_INTEGER),
    ORG_MAX_CONCURRENT_REQUESTS: int(50, 0, 1_000_000),
    IP_RATE_LIMIT_PER_MINUTE: int(600, 0, 1_000_000_000),
    LOGIN_ATTEMPTS_PER_ACCOUNT: int(10, 0, 1_000_000),
    LOGIN_ATTEMPTS_PER_IP: int(100, 0, 1_000_000),
    RATE_LIMIT_FALLBACK_SHARE: num(1, 0.001, 1),
    RATE_LIMIT_MEMORY_MAX_KEYS: int(100_000, 100, 100_000_000),
    RATE_LIMIT_SLOT_TTL_MS: int(600_000, 1_000, 86_400_000),
    RATE_LIMIT_LEASE_MAX: int(1024, 0, 1_000_000),
    RATE_LIMIT_LEASE_IDLE_MS: int(60_000, 100, 3_600_000),
    USAGE_FLUSH_INTERVAL_MS: int(2_000, 50, 5_000),
    LOAD_SHED_MAX_EVENT_LOOP_DELAY_MS: int(1_000, 0, 60_000),

    AUDIT_REFUSALS_PER_MINUTE: int(30, 0, 1_000_000),
});

type Parsed = z.infer<typeof schema>;

/** Every variable the server reads (what .env.example must list). */
export const CONFIG_VARIABLES: readonly string[] = Object.keys(schema.shape);

export interface Config {
  readonly env: Parsed['NODE_ENV'];
  readonly host: string;
  readonly port: number;
  readonly logLevel: NonNullable<Parsed['LOG_LEVEL']>;
  readonly logFormat: 'json' | 'pretty';
  readonly accessLog: boolean;
  readonly database: DatabaseConfig;
  readonly migrateOnStart: boolean;
  readonly auth: AuthConfig;
  readonly authCache: AuthCacheConfig;
  readonly trustProxy: boolean;
  readonly bodyLimitBytes: number;
  readonly shutdownTimeoutMs: number;
  /** Null: no Redis, the limiter runs in memory (one instance). */
  readonly redis: { readonly url: string; readonly cluster: boolean; readonly commandTimeoutMs: number } | null;
  readonly rateLimit: RateLimitConfig;
  /** 0 turns load shedding off. */
  readonly loadShedMaxEventLoopDelayMs: number;
  /** Refused requests (401/403) recorded in an org's audit log per minute and instance; 0: none. */
  readonly auditRefusalsPerMinute: number;
}

export interface RateLimitConfig {
  /** Limits of an org without its own row in org_limits. 0 means no limit. */
  readonly defaults: OrgLimits;
  /** Anonymous and failed-auth requests per client IP and minute. */
  readonly ipPerMinute: number;
  /** Password attempts (sign-in, password change): each bucket holds this many, refilled over 15 minutes; 0 turns it off. */
  readonly login: { readonly perAccount: number; readonly perIp: number };
  /** While Redis is unreachable, each instance enforces this fraction of every limit in memory. */
  readonly fallbackShare: number;
  readonly memoryMaxKeys: number;
  readonly slotTtlMs: number;
  /** Largest lease of requests admitted locally (src/ratelimit/leases.ts); 0: every request asks the backend. */
  readonly leaseMax: number;
  /** A lease unused this long is given back. */
  readonly leaseIdleMs: number;
  readonly usageFlushIntervalMs: number;
}

export interface AuthConfig {
  /** The enabled methods (AUTH_METHODS), in a fixed order. */
  readonly methods: readonly AuthMethod[];
  /** Our own access tokens (the password method's sessions); null when that method is off. */
  readonly jwt: JwtConfig | null;
  /** Tokens of an external OpenID Connect provider; null when that method is off. */
  readonly oidc: OidcConfig | null;
}

export interface JwtConfig {
  /**
   * HS256 key. Never logged. Null when none is configured (allowed outside production only): the
   * server then makes a random one at start, so sessions end when it stops and are not shared
   * between instances.
   */
  readonly signingKey: string | null;
  readonly issuer: string;
  readonly audience: string;
  readonly accessTokenTtlSeconds: number;
  readonly refreshTokenTtlSeconds: number;
}

export interface OidcConfig {
  readonly issuer: string;
  readonly audience: string;
  /** Claim naming the org: its slug or its id. */
  readonly orgClaim: string;
  readonly emailClaim: string;
  /** Asymmetric algorithms only: a symmetric key would be shared with the provider. */
  readonly algorithms: readonly string[];
  /** Accepted `typ` header values (compared case-insensitively, without "application/"). */
  readonly tokenTypes: readonly string[];
  readonly clockToleranceSeconds: number;
}

export interface AuthCacheConfig {
  /** How long a looked-up caller is trusted without asking the database; 0 turns the cache off. */
  readonly ttlMs: number;
  /** Callers that authenticated (LRU beyond this). */
  readonly maxEntries: number;
  /** Lookups that failed (unknown org or user, user of another org): a separate, smaller LRU. */
  readonly negativeMaxEntries: number;
}

export type DatabaseConfig =
  | {
      readonly kind: 'postgres';
      readonly url: string;
      readonly poolMax: number;
      readonly idleTimeoutMs: number;
      readonly connectionTimeoutMs: number;
      readonly statementTimeoutMs: number;
      /**
       * The session that LISTENs for cache invalidations: DATABASE_URL unless it goes through a
       * pooler in transaction mode (PgBouncer), where LISTEN does not work. Default: `url`.
       */
      readonly listenUrl?: string;
    }
  | { readonly kind: 'pglite'; readonly dataDir: string };

/**
 * For command-line tools: the configuration, or null after printing every bad variable to stderr
 * (the caller exits 1).
 */
export function loadCliConfig(env: NodeJS.ProcessEnv = process.env): Config | null {
  try {
    return loadConfig(env, { forServer: false });
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`${err.message}\n`);
      return null;
    }
    throw err;
  }
}

export class ConfigError extends Error {
  constructor(readonly problems: readonly string[]) {
    super(`Invalid configuration:\n${problems.map((p) => `  - ${p}`).join('\n')}`);
    this.name = 'ConfigError';
  }
}

/**
 * Parses an environment (process.env by default) into a frozen Config, or throws ConfigError.
 * `forServer: false` (the CLIs) skips the checks that only matter to a server taking requests.
 */
export function loadConfig(
  env: NodeJS.ProcessEnv = process.env,
  opts: { isTty?: boolean; forServer?: boolean } = {},
): Config {
  // Empty strings count as unset, as in most .env tooling.
  const input = Object.fromEntries(Object.entries(env).filter(([, v]) => v !== undefined && v !== ''));
  const result = schema.safeParse(input);
  const problems = result.success
    ? []
    : result.error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`);
  const isProduction = input.NODE_ENV === 'production';
  const auth = parseAuth(input, isProduction, opts.forServer ?? true, problems);
  if (input.DATABASE_LISTEN_URL !== undefined && input.DATABASE_URL === undefined) {
    problems.push('DATABASE_LISTEN_URL: only used with DATABASE_URL (the embedded database needs no listener connection)');
  }
  if (!result.success || problems.length > 0) throw new ConfigError([...new Set(problems)].sort());
  const c = result.data;
  const isTty = opts.isTty ?? Boolean(process.stdout.isTTY);
  return deepFreeze({
    env: c.NODE_ENV,
    host: c.HOST,
    port: c.PORT,
    logLevel: c.LOG_LEVEL ?? defaultLogLevel(c.NODE_ENV),
    logFormat: c.LOG_FORMAT === 'auto' ? (isTty && c.NODE_ENV !== 'production' ? 'pretty' : 'json') : c.LOG_FORMAT,
    accessLog: c.ACCESS_LOG,
    database: c.DATABASE_URL
      ? {
          kind: 'postgres',
          url: c.DATABASE_URL,
          poolMax: c.DATABASE_POOL_MAX,
          idleTimeoutMs: c.DATABASE_IDLE_TIMEOUT_MS,
          connectionTimeoutMs: c.DATABASE_CONNECTION_TIMEOUT_MS,
          statementTimeoutMs: c.DATABASE_STATEMENT_TIMEOUT_MS,
          listenUrl: c.DATABASE_LISTEN_URL ?? c.DATABASE_URL,
        }
      : { kind: 'pglite', dataDir: c.DATA_DIR },
    migrateOnStart: c.MIGRATE_ON_START,
    auth: auth!,
    authCache: {
      ttlMs: c.AUTH_CACHE_TTL_MS,
      maxEntries: c.AUTH_CACHE_MAX_ENTRIES,
      negativeMaxEntries: c.AUTH_CACHE_NEGATIVE_MAX_ENTRIES,
    },
    trustProxy: c.TRUST_PROXY,
    bodyLimitBytes: c.BODY_LIMIT_BYTES,
    shutdownTimeoutMs: c.SHUTDOWN_TIMEOUT_MS,
    redis: c.REDIS_URL ? { url: c.REDIS_URL, cluster: c.REDIS_CLUSTER, commandTimeoutMs: c.REDIS_COMMAND_TIMEOUT_MS } : null,
    rateLimit: {
      defaults: {
        orgBurst: c.ORG_RATE_LIMIT_BURST,
        orgPerSecond: c.ORG_RATE_LIMIT_PER_SECOND,
        userBurst: c.USER_RATE_LIMIT_BURST,
        userPerSecond: c.USER_RATE_LIMIT_PER_SECOND,
        dailyCap: c.ORG_DAILY_REQUEST_CAP,
        monthlyCap: c.ORG_MONTHLY_REQUEST_CAP,
        maxConcurrent: c.ORG_MAX_CONCURRENT_REQUESTS,
      },
      ipPerMinute: c.IP_RATE_LIMIT_PER_MINUTE,
      login: { perAccount: c.LOGIN_ATTEMPTS_PER_ACCOUNT, perIp: c.LOGIN_ATTEMPTS_PER_IP },
      fallbackShare: c.RATE_LIMIT_FALLBACK_SHARE,
      memoryMaxKeys: c.RATE_LIMIT_MEMORY_MAX_KEYS,
      slotTtlMs: c.RATE_LIMIT_SLOT_TTL_MS,
      leaseMax: c.RATE_LIMIT_LEASE_MAX,
      leaseIdleMs: c.RATE_LIMIT_LEASE_IDLE_MS,
      usageFlushIntervalMs: c.USAGE_FLUSH_INTERVAL_MS,
    },
    loadShedMaxEventLoopDelayMs: c.LOAD_SHED_MAX_EVENT_LOOP_DELAY_MS,
    auditRefusalsPerMinute: c.AUDIT_REFUSALS_PER_MINUTE,
  } satisfies Config);
}

const OIDC_ASYMMETRIC = new Set(['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512', 'EdDSA', 'Ed25519']);
/** Keys that are examples, placeholders or patterns, whatever their length. */
const WEAK_KEYS = /^(.)\1*$|^((change[-_ ]?me|changeit|secret|password|example|test|dev|development|default|jwt|key|signing|llm-app)[-_. 0-9]*)+$/i;
export const MIN_SIGNING_KEY_BYTES = 32;

const list = (v: string | undefined) =>
  (v ?? '')
    .split(',')
    .map((x) => x.trim())
    .filter((x) => x !== '');

/**
 * AUTH_METHODS and what each method needs. Problems are pushed, naming the variable; the result is
 * only used when there are none.
 */
function parseAuth(input: Record<string, string | undefined>, isProduction: boolean, forServer: boolean, problems: string[]): AuthConfig | null {
  const before = problems.length;
  let methods: AuthMethod[];
  if (input.AUTH_METHODS === undefined) {
    // Everything that needs no outside configuration, plus OIDC once an issuer is named; the
    // header stand-in outside production, or in production with ALLOW_FAKE_AUTH=true.
    const fake = !isProduction || ['true', '1'].includes(input.ALLOW_FAKE_AUTH ?? '');
    methods = ['api_key', 'password', ...(input.OIDC_ISSUER ? (['oidc'] as const) : []), ...(fake ? (['fake'] as const) : [])];
  } else {
    const named = list(input.AUTH_METHODS);
    const unknown = named.filter((m) => !(AUTH_METHODS as readonly string[]).includes(m));
    if (unknown.length > 0) problems.push(`AUTH_METHODS: unknown method(s) ${unknown.join(', ')}; use ${AUTH_METHODS.join(', ')}`);
    else if (named.length === 0) problems.push(`AUTH_METHODS: must name at least one of ${AUTH_METHODS.join(', ')}`);
    methods = AUTH_METHODS.filter((m) => named.includes(m));
  }
  const on = (m: AuthMethod) => methods.includes(m);

  // The header stand-in lets anyone act as anyone: it must never ship by accident.
  if (forServer && isProduction && on('fake') && !['true', '1'].includes(input.ALLOW_FAKE_AUTH ?? '')) {
    problems.push(
      'ALLOW_FAKE_AUTH: AUTH_METHODS includes fake (x-org-id / x-user-id header authentication), which is refused when ' +
        'NODE_ENV=production; remove it from AUTH_METHODS, or set ALLOW_FAKE_AUTH=true to run it anyway (anyone can act as any user)',
    );
  }

  let jwt: JwtConfig | null = null;
  if (on('password')) {
    let key = input.JWT_SIGNING_KEY;
    if (key !== undefined && input.JWT_SIGNING_KEY_FILE !== undefined) {
      problems.push('JWT_SIGNING_KEY_FILE: set either JWT_SIGNING_KEY or JWT_SIGNING_KEY_FILE, not both');
    } else if (input.JWT_SIGNING_KEY_FILE !== undefined) {
      try {
        key = readFileSync(input.JWT_SIGNING_KEY_FILE, 'utf8').trim();
      } catch (err) {
        problems.push(`JWT_SIGNING_KEY_FILE: cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
      }
    }
    const keyVar = input.JWT_SIGNING_KEY_FILE !== undefined ? 'JWT_SIGNING_KEY_FILE' : 'JWT_SIGNING_KEY';
    if (key === undefined || key === '') {
      if (isProduction && forServer && input.JWT_SIGNING_KEY_FILE === undefined) {
        problems.push(
          `JWT_SIGNING_KEY: required when NODE_ENV=production and AUTH_METHODS includes password (at least ${MIN_SIGNING_KEY_BYTES} random bytes, e.g. \`openssl rand -base64 48\`), or set JWT_SIGNING_KEY_FILE`,
        );
      } else if (input.JWT_SIGNING_KEY_FILE !== undefined) {
        if (problems.every((p) => !p.startsWith('JWT_SIGNING_KEY_FILE'))) problems.push('JWT_SIGNING_KEY_FILE: the file is empty');
      }
      key = undefined;
    } else if (Buffer.byteLength(key, 'utf8') < MIN_SIGNING_KEY_BYTES) {
      problems.push(`${keyVar}: too short, at least ${MIN_SIGNING_KEY_BYTES} bytes (e.g. \`openssl rand -base64 48\`)`);
    } else if (WEAK_KEYS.test(key) || new Set(key).size < 8) {
      problems.push(`${keyVar}: too weak (a placeholder or a repeated pattern); use random bytes, e.g. \`openssl rand -base64 48\``);
    }
    jwt = {
      signingKey: key ?? null,
      issuer: input.JWT_ISSUER?.trim() ?? 'llm-app',
      audience: input.JWT_AUDIENCE?.trim() ?? 'llm-app',
      accessTokenTtlSeconds: Number(input.ACCESS_TOKEN_TTL_SECONDS ?? 900),
      refreshTokenTtlSeconds: Number(input.REFRESH_TOKEN_TTL_SECONDS ?? 30 * 86_400),
    };
  }

  let oidc: OidcConfig | null = null;
  if (on('oidc')) {
    if (input.OIDC_ISSUER === undefined) problems.push('OIDC_ISSUER: required when AUTH_METHODS includes oidc');
    else if (isProduction && !input.OIDC_ISSUER.startsWith('https://')) problems.push('OIDC_ISSUER: must be an https:// URL when NODE_ENV=production');
    if (input.OIDC_AUDIENCE === undefined) problems.push('OIDC_AUDIENCE: required when AUTH_METHODS includes oidc');
    const algorithms = list(input.OIDC_ALGORITHMS ?? 'RS256,PS256,ES256,EdDSA');
    const refused = algorithms.filter((a) => !OIDC_ASYMMETRIC.has(a));
    if (refused.length > 0 || algorithms.length === 0) {
      problems.push(`OIDC_ALGORITHMS: only asymmetric algorithms are accepted (${[...OIDC_ASYMMETRIC].join(', ')})${refused.length ? `; not ${refused.join(', ')}` : ''}`);
    }
    const tokenTypes = list(input.OIDC_TOKEN_TYPES ?? 'JWT,at+jwt');
    if (tokenTypes.length === 0) problems.push('OIDC_TOKEN_TYPES: must name at least one typ, e.g. JWT');
    oidc = {
      issuer: input.OIDC_ISSUER ?? '',
      audience: input.OIDC_AUDIENCE?.trim() ?? '',
      orgClaim: input.OIDC_ORG_CLAIM?.trim() ?? 'org_id',
      emailClaim: input.OIDC_EMAIL_CLAIM?.trim() ?? 'email',
      algorithms,
      tokenTypes,
      clockToleranceSeconds: Number(input.OIDC_CLOCK_TOLERANCE_SECONDS ?? 30),
    };
  }
  return problems.length > before ? null : { methods, jwt, oidc };
}

function defaultLogLevel(env: Parsed['NODE_ENV']): NonNullable<Parsed['LOG_LEVEL']> {
  // Development shows the per-request "Request authenticated" debug line, as the brief describes.
  if (env === 'development') return 'debug';
  if (env === 'test') return 'warn';
  return 'info';
}

function deepFreeze<T extends object>(o: T): T {
  for (const v of Object.values(o)) if (v && typeof v === 'object') deepFreeze(v as object);
  return Object.freeze(o);
}
