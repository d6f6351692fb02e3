import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError, loadConfig, type Config } from '../src/config/env.js';
import { runTsScript } from './helpers/process.js';

/** The ConfigError that loading `env` throws (fails the test if it loads). */
function configError(env: Record<string, string>, opts: { forServer?: boolean } = {}): ConfigError {
  try {
    loadConfig(env, { isTty: false, ...opts });
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return err as ConfigError;
  }
  throw new Error(`expected ${JSON.stringify(env)} to be refused`);
}

/** The variables a ConfigError names, from its problems ("VAR: why"). */
const namedVariables = (err: ConfigError) => err.problems.map((p) => p.split(':')[0]);

describe('loadConfig defaults', () => {
  it('uses the documented defaults and the embedded database when DATABASE_URL is unset', () => {
    const config = loadConfig({}, { isTty: false });
    expect(config).toMatchObject({
      env: 'development',
      host: '127.0.0.1',
      port: 3000,
      logLevel: 'debug',
      logFormat: 'json',
      accessLog: true,
      database: { kind: 'pglite', dataDir: './.data' },
      migrateOnStart: true,
      auth: { methods: ['api_key', 'password', 'fake'], oidc: null },
      trustProxy: false,
      bodyLimitBytes: 1_048_576,
      shutdownTimeoutMs: 10_000,
    });
    expect(config.database).toEqual({ kind: 'pglite', dataDir: './.data' });
  });

  it('ignores variables it does not know and treats empty strings as unset', () => {
    const config = loadConfig({ PORT: '', HOST: '', DATABASE_URL: '', SOMETHING_ELSE: 'x' }, { isTty: false });
    expect(config).toMatchObject({ port: 3000, host: '127.0.0.1', database: { kind: 'pglite', dataDir: './.data' } });
  });

  it('uses PostgreSQL with the default pool settings when DATABASE_URL is set', () => {
    const url = 'postgres://app:pw@127.0.0.1:5432/llm_app';
    expect(loadConfig({ DATABASE_URL: url }, { isTty: false }).database).toEqual({
      kind: 'postgres',
      url,
      poolMax: 10,
      idleTimeoutMs: 10_000,
      connectionTimeoutMs: 2_000,
      statementTimeoutMs: 5_000,
      listenUrl: url,
    });
  });

  it('reads every pool setting and accepts postgresql:// URLs', () => {
    const url = 'postgresql://app@db.internal/llm_app';
    const config = loadConfig(
      {
        DATABASE_URL: url,
        DATABASE_POOL_MAX: '25',
        DATABASE_IDLE_TIMEOUT_MS: '0',
        DATABASE_CONNECTION_TIMEOUT_MS: '750',
        DATABASE_STATEMENT_TIMEOUT_MS: '30000',
        DATABASE_LISTEN_URL: 'postgres://app@db-direct.internal/llm_app',
      },
      { isTty: false },
    );
    expect(config.database).toEqual({
      kind: 'postgres',
      url,
      poolMax: 25,
      idleTimeoutMs: 0,
      connectionTimeoutMs: 750,
      statementTimeoutMs: 30_000,
      listenUrl: 'postgres://app@db-direct.internal/llm_app',
    });
  });

  it('refuses DATABASE_LISTEN_URL without DATABASE_URL, and a listen URL that is not PostgreSQL', () => {
    expect(() => loadConfig({ DATABASE_LISTEN_URL: 'postgres://app@db/llm_app' }, { isTty: false })).toThrow(
      /DATABASE_LISTEN_URL: only used with DATABASE_URL/,
    );
    expect(() =>
      loadConfig({ DATABASE_URL: 'postgres://app@db/llm_app', DATABASE_LISTEN_URL: 'redis://db:6379' }, { isTty: false }),
    ).toThrow(/DATABASE_LISTEN_URL/);
  });

  it('reads the auth cache settings, 0 turning the cache off, and refuses nonsense', () => {
    expect(loadConfig({}, { isTty: false }).authCache).toEqual({ ttlMs: 30_000, maxEntries: 100_000, negativeMaxEntries: 10_000 });
    expect(
      loadConfig({ AUTH_CACHE_TTL_MS: '0', AUTH_CACHE_MAX_ENTRIES: '5', AUTH_CACHE_NEGATIVE_MAX_ENTRIES: '2' }, { isTty: false }).authCache,
    ).toEqual({ ttlMs: 0, maxEntries: 5, negativeMaxEntries: 2 });
    let message = '';
    try {
      loadConfig({ AUTH_CACHE_TTL_MS: '-1', AUTH_CACHE_MAX_ENTRIES: '0', AUTH_CACHE_NEGATIVE_MAX_ENTRIES: 'lots' }, { isTty: false });
    } catch (err) {
      message = (err as Error).message;
    }
    for (const name of ['AUTH_CACHE_TTL_MS', 'AUTH_CACHE_MAX_ENTRIES', 'AUTH_CACHE_NEGATIVE_MAX_ENTRIES']) expect(message).toContain(name);
  });

  it('reads every other variable', () => {
    const config = loadConfig(
      {
        NODE_ENV: 'test',
        HOST: '0.0.0.0',
        PORT: '8080',
        LOG_LEVEL: 'error',
        LOG_FORMAT: 'pretty',
        ACCESS_LOG: 'false',
        DATA_DIR: '/var/lib/llm-app',
        MIGRATE_ON_START: '0',
        TRUST_PROXY: '1',
        BODY_LIMIT_BYTES: '2048',
        SHUTDOWN_TIMEOUT_MS: '500',
      },
      { isTty: false },
    );
    expect(config).toMatchObject({
      env: 'test',
      host: '0.0.0.0',
      port: 8080,
      logLevel: 'error',
      logFormat: 'pretty',
      accessLog: false,
      database: { kind: 'pglite', dataDir: '/var/lib/llm-app' },
      migrateOnStart: false,
      trustProxy: true,
      bodyLimitBytes: 2048,
      shutdownTimeoutMs: 500,
    });
  });

  it('picks the log level by environment and pretty logs only in a terminal outside production', () => {
    expect(loadConfig({ NODE_ENV: 'test' }, { isTty: false }).logLevel).toBe('warn');
    expect(loadConfig({ NODE_ENV: 'production', AUTH_METHODS: 'api_key' }, { isTty: false }).logLevel).toBe('info');
    expect(loadConfig({}, { isTty: true }).logFormat).toBe('pretty');
    expect(loadConfig({ NODE_ENV: 'production', AUTH_METHODS: 'api_key' }, { isTty: true }).logFormat).toBe('json');
  });

  it('returns a frozen config, nested objects included', () => {
    const config = loadConfig({ DATABASE_URL: 'postgres://app@127.0.0.1/llm_app' }, { isTty: false });
    expect(Object.isFrozen(config)).toBe(true);
    expect(Object.isFrozen(config.database)).toBe(true);
    expect(Object.isFrozen(config.auth.methods)).toBe(true);
    expect(() => {
      (config as { port: number }).port = 1;
    }).toThrow(TypeError);
    expect(() => {
      (config.database as { url: string }).url = 'postgres://evil@127.0.0.1/x';
    }).toThrow(TypeError);
    expect(config.port).toBe(3000);
  });
});

describe('loadConfig refuses bad values', () => {
  it.each([
    ['PORT', 'abc'],
    ['PORT', '70000'],
    ['PORT', '-1'],
    ['PORT', '3.5'],
    ['PORT', '0x50'],
    ['NODE_ENV', 'staging'],
    ['HOST', ' '],
    ['LOG_LEVEL', 'loud'],
    ['LOG_FORMAT', 'xml'],
    ['ACCESS_LOG', 'yes'],
    ['DATABASE_URL', 'mysql://x'],
    ['DATABASE_URL', 'not a url'],
    ['DATABASE_URL', 'postgres://'],
    ['DATABASE_POOL_MAX', '0'],
    ['DATABASE_POOL_MAX', 'ten'],
    ['DATABASE_IDLE_TIMEOUT_MS', '-5'],
    ['DATABASE_CONNECTION_TIMEOUT_MS', '10'],
    ['DATABASE_STATEMENT_TIMEOUT_MS', '1.5'],
    ['MIGRATE_ON_START', 'maybe'],
    ['ALLOW_FAKE_AUTH', 'yes'],
    ['TRUST_PROXY', 'on'],
    ['BODY_LIMIT_BYTES', '10'],
    ['SHUTDOWN_TIMEOUT_MS', 'forever'],
  ])('%s=%j is a ConfigError naming that variable', (name, value) => {
    const err = configError({ [name]: value });
    expect(namedVariables(err)).toEqual([name]);
    expect(err.message).toContain(name);
    expect(err.message).toMatch(/^Invalid configuration/);
  });

  it('names every bad variable in one error', () => {
    const err = configError({
      PORT: 'abc',
      NODE_ENV: 'staging',
      LOG_LEVEL: 'loud',
      DATABASE_URL: 'mysql://x',
      DATABASE_POOL_MAX: '0',
      MIGRATE_ON_START: 'maybe',
      ACCESS_LOG: 'yes',
    });
    const expected = ['ACCESS_LOG', 'DATABASE_POOL_MAX', 'DATABASE_URL', 'LOG_LEVEL', 'MIGRATE_ON_START', 'NODE_ENV', 'PORT'];
    expect([...namedVariables(err)].sort()).toEqual(expected);
    for (const name of expected) expect(err.message).toContain(`${name}:`);
  });

  it('never echoes the DATABASE_URL password', () => {
    const secret = 's3cret';
    const errors = [
      // Invalid itself (port "bad").
      configError({ DATABASE_URL: `postgres://u:${secret}@h:bad/db` }),
      // Valid, next to another bad variable.
      configError({ DATABASE_URL: `postgres://u:${secret}@127.0.0.1:5432/db`, PORT: 'abc' }),
      // Wrong scheme.
      configError({ DATABASE_URL: `mysql://u:${secret}@127.0.0.1/db` }),
    ];
    expect(namedVariables(errors[0]!)).toEqual(['DATABASE_URL']);
    expect(namedVariables(errors[1]!)).toEqual(['PORT']);
    expect(namedVariables(errors[2]!)).toEqual(['DATABASE_URL']);
    for (const err of errors) {
      expect(err.message).not.toContain(secret);
      expect(err.problems.join('\n')).not.toContain(secret);
      expect(String(err.stack)).not.toContain(secret);
      expect(JSON.stringify(err)).not.toContain(secret);
    }
  });

  it('does not echo bad values either', () => {
    const err = configError({ LOG_LEVEL: 'very-loud-value', NODE_ENV: 'stage-value-xyz', PORT: 'port-value-xyz' });
    for (const value of ['very-loud-value', 'stage-value-xyz', 'port-value-xyz']) expect(err.message).not.toContain(value);
  });
});

const STRONG_KEY = 'n3Vq8ZkY2pLr7tWx0cHs5dJf9gAb4eMu1iOy6QRS';

describe('authentication methods', () => {
  it('default to api_key, password and fake outside production, with oidc once an issuer is named', () => {
    expect(loadConfig({}, { isTty: false }).auth.methods).toEqual(['api_key', 'password', 'fake']);
    const withOidc = loadConfig({ OIDC_ISSUER: 'http://127.0.0.1:9/', OIDC_AUDIENCE: 'llm-app' }, { isTty: false });
    expect(withOidc.auth.methods).toEqual(['api_key', 'password', 'oidc', 'fake']);
    expect(withOidc.auth.oidc).toMatchObject({ issuer: 'http://127.0.0.1:9/', audience: 'llm-app', orgClaim: 'org_id', emailClaim: 'email' });
  });

  it('default to api_key and password in production, which then needs JWT_SIGNING_KEY', () => {
    const config = loadConfig({ NODE_ENV: 'production', JWT_SIGNING_KEY: STRONG_KEY }, { isTty: false });
    expect(config.auth.methods).toEqual(['api_key', 'password']);
    expect(config.auth.jwt).toMatchObject({ signingKey: STRONG_KEY, issuer: 'llm-app', audience: 'llm-app', accessTokenTtlSeconds: 900 });
    const err = configError({ NODE_ENV: 'production' });
    expect(namedVariables(err)).toEqual(['JWT_SIGNING_KEY']);
  });

  it('are taken from AUTH_METHODS, and an unknown or empty list is refused', () => {
    expect(loadConfig({ AUTH_METHODS: 'fake, api_key' }, { isTty: false }).auth.methods).toEqual(['api_key', 'fake']);
    expect(loadConfig({ AUTH_METHODS: 'api_key' }, { isTty: false }).auth).toEqual({ methods: ['api_key'], jwt: null, oidc: null });
    expect(namedVariables(configError({ AUTH_METHODS: 'api_key,magic' }))).toEqual(['AUTH_METHODS']);
    expect(configError({ AUTH_METHODS: 'api_key,magic' }).message).toContain('magic');
    expect(namedVariables(configError({ AUTH_METHODS: ' , ' }))).toEqual(['AUTH_METHODS']);
  });

  it('refuse a short or weak signing key everywhere, and leave it null outside production when unset', () => {
    expect(loadConfig({}, { isTty: false }).auth.jwt?.signingKey).toBeNull();
    for (const weak of ['xK9#q', 'changeme-changeme-changeme-changeme', 'a'.repeat(64), 'abababababababababababababababababab']) {
      const err = configError({ JWT_SIGNING_KEY: weak });
      expect(namedVariables(err)).toEqual(['JWT_SIGNING_KEY']);
      expect(err.message).not.toContain(weak);
    }
  });

  it('read the key from JWT_SIGNING_KEY_FILE, naming that variable when it cannot', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'llm-app-key-'));
    try {
      const file = path.join(dir, 'key');
      await writeFile(file, `${STRONG_KEY}\n`);
      expect(loadConfig({ NODE_ENV: 'production', JWT_SIGNING_KEY_FILE: file }, { isTty: false }).auth.jwt?.signingKey).toBe(STRONG_KEY);
      expect(namedVariables(configError({ NODE_ENV: 'production', JWT_SIGNING_KEY_FILE: path.join(dir, 'missing') }))).toEqual([
        'JWT_SIGNING_KEY_FILE',
      ]);
      expect(namedVariables(configError({ JWT_SIGNING_KEY_FILE: file, JWT_SIGNING_KEY: STRONG_KEY }))).toEqual(['JWT_SIGNING_KEY_FILE']);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('refuse oidc without issuer and audience, with a symmetric algorithm, or over http in production', () => {
    expect([...namedVariables(configError({ AUTH_METHODS: 'oidc' }))].sort()).toEqual(['OIDC_AUDIENCE', 'OIDC_ISSUER']);
    const base = { AUTH_METHODS: 'oidc', OIDC_ISSUER: 'https://id.example.com/', OIDC_AUDIENCE: 'api' };
    expect(namedVariables(configError({ ...base, OIDC_ALGORITHMS: 'RS256,HS256' }))).toEqual(['OIDC_ALGORITHMS']);
    expect(namedVariables(configError({ ...base, OIDC_ALGORITHMS: 'none' }))).toEqual(['OIDC_ALGORITHMS']);
    expect(namedVariables(configError({ ...base, NODE_ENV: 'production', OIDC_ISSUER: 'http://id.example.com/' }))).toEqual(['OIDC_ISSUER']);
    expect(loadConfig({ ...base, NODE_ENV: 'production' }, { isTty: false }).auth.methods).toEqual(['oidc']);
  });
});

describe('fake authentication in production', () => {
  it('is refused without ALLOW_FAKE_AUTH=true, naming ALLOW_FAKE_AUTH', () => {
    const envs: Record<string, string>[] = [
      { NODE_ENV: 'production', AUTH_METHODS: 'fake' },
      { NODE_ENV: 'production', AUTH_METHODS: 'api_key,fake', ALLOW_FAKE_AUTH: 'false' },
    ];
    for (const env of envs) {
      const err = configError(env);
      expect(namedVariables(err)).toEqual(['ALLOW_FAKE_AUTH']);
      expect(err.message).toContain('ALLOW_FAKE_AUTH=true');
      expect(err.message).toMatch(/production/);
    }
  });

  it('is named together with other bad variables', () => {
    const err = configError({ NODE_ENV: 'production', AUTH_METHODS: 'fake,password', PORT: 'abc' });
    expect([...namedVariables(err)].sort()).toEqual(['ALLOW_FAKE_AUTH', 'JWT_SIGNING_KEY', 'PORT']);
  });

  it('is accepted with ALLOW_FAKE_AUTH=true, which also puts it among the default methods', () => {
    const config: Config = loadConfig({ NODE_ENV: 'production', AUTH_METHODS: 'fake', ALLOW_FAKE_AUTH: 'true' }, { isTty: false });
    expect(config.env).toBe('production');
    expect(config.auth.methods).toEqual(['fake']);
    const byDefault = loadConfig({ NODE_ENV: 'production', ALLOW_FAKE_AUTH: 'true', JWT_SIGNING_KEY: STRONG_KEY }, { isTty: false });
    expect(byDefault.auth.methods).toEqual(['api_key', 'password', 'fake']);
  });

  it('is not a concern of the CLIs (forServer: false)', () => {
    const config = loadConfig({ NODE_ENV: 'production', AUTH_METHODS: 'fake' }, { isTty: false, forServer: false });
    expect(config.env).toBe('production');
  });

  it('only applies to production', () => {
    for (const NODE_ENV of ['development', 'test']) expect(loadConfig({ NODE_ENV, AUTH_METHODS: 'fake' }, { isTty: false }).env).toBe(NODE_ENV);
  });
});

describe('the server process with a bad configuration', () => {
  // If a bad configuration were accepted by mistake, the server must not touch ./.data or port 3000.
  let dataDir: string;
  beforeAll(async () => {
    dataDir = await mkdtemp(path.join(os.tmpdir(), 'llm-app-config-'));
  });
  afterAll(async () => {
    await rm(dataDir, { recursive: true, force: true });
  });
  const safety = () => ({ DATA_DIR: dataDir, MIGRATE_ON_START: 'false', LOG_FORMAT: 'json' });

  it('exits 1 within seconds, naming PORT and NODE_ENV on stderr', async () => {
    const res = await runTsScript('src/server.ts', { ...safety(), PORT: 'abc', NODE_ENV: 'staging' }, { timeoutMs: 15_000 });
    expect(res.timedOut).toBe(false);
    expect(res.code).toBe(1);
    expect(res.durationMs).toBeLessThan(10_000);
    expect(res.stderr).toContain('PORT');
    expect(res.stderr).toContain('NODE_ENV');
    expect(res.stderr).not.toMatch(/\n\s+at /);
    expect(res.stdout).not.toMatch(/listening/i);
    expect(await readdir(dataDir)).toEqual([]);
  });

  it('exits 1 in production without a signing key, naming it', async () => {
    const res = await runTsScript('src/server.ts', { ...safety(), PORT: '0', NODE_ENV: 'production' }, { timeoutMs: 15_000 });
    expect(res.timedOut).toBe(false);
    expect(res.code).toBe(1);
    expect(res.durationMs).toBeLessThan(10_000);
    expect(res.stderr).toContain('JWT_SIGNING_KEY');
    expect(res.stderr).not.toMatch(/\n\s+at /);
    expect(res.stdout).not.toMatch(/listening/i);
    expect(await readdir(dataDir)).toEqual([]);
  });
});
