import v8 from 'node:v8';
import vm from 'node:vm';
import type { FastifyRequest } from 'fastify';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { createAuthenticator, type Authenticator } from '../../src/auth/index.js';
import { createOidcMethod, discoveryUrl, type OidcMethod, type OidcTimings } from '../../src/auth/oidc.js';
import type { ResolvedCaller } from '../../src/middleware/authenticate.js';
import { AppError } from '../../src/errors.js';
import { createTenant, testConfig, type TestTenant } from '../helpers/app.js';
import { getTestDb, silentLogger } from '../helpers/db.js';
import { makeKey, OIDC_AUDIENCE, startProvider, type ProviderMode, type TestKey, type TestProvider } from '../helpers/oidcProvider.js';

/**
 * The OIDC method on its own, with the provider's timings shortened: what it does while the
 * provider hangs, fails for a while, or moves its keys.
 */

const realNow = Date.now.bind(Date);
let frozenAt: number | null = null;
function freezeClock(): void {
  frozenAt = realNow();
  vi.spyOn(Date, 'now').mockImplementation(() => frozenAt!);
}
afterEach(() => {
  vi.restoreAllMocks();
  frozenAt = null;
});

const request = () => ({ claimedIdentity: null }) as unknown as FastifyRequest;

async function outcome(method: OidcMethod, token: string): Promise<{ status: number; retryAfter?: number | undefined; caller?: ResolvedCaller }> {
  try {
    return { status: 200, caller: await method.resolve(token, request()) };
  } catch (err) {
    if (!(err instanceof AppError)) throw err;
    return { status: err.statusCode, retryAfter: err.retryAfter };
  }
}

describe('the OIDC method and its provider', () => {
  let auth: Authenticator;
  let t: TestTenant;
  let key: TestKey;
  const methods: OidcMethod[] = [];
  const providers: TestProvider[] = [];

  /** A provider (in `mode`, its discovery document changed by `discovery`, a path for jwks_uri) and the method. */
  async function setUp(
    timings: Partial<OidcTimings>,
    mode: ProviderMode = 'ok',
    discovery: { jwks_uri?: string } = {},
  ): Promise<{ provider: TestProvider; method: OidcMethod; token: () => Promise<string> }> {
    const provider = await startProvider({ keys: [key] });
    providers.push(provider);
    provider.mode = mode;
    if (discovery.jwks_uri) provider.discovery = { jwks_uri: `http://127.0.0.1:${provider.port}${discovery.jwks_uri}` };
    const config = testConfig({ AUTH_METHODS: 'oidc', OIDC_ISSUER: provider.issuer, OIDC_AUDIENCE }).auth.oidc!;
    const method = createOidcMethod({ config, db: await getTestDb(), auth, log: silentLogger }, timings);
    methods.push(method);
    const token = () => provider.sign(key, { email: t.member.email, org_id: t.org.slug });
    return { provider, method, token };
  }

  beforeAll(async () => {
    const db = await getTestDb();
    auth = createAuthenticator(testConfig().authCache, db, silentLogger);
    t = await createTenant(db);
    key = await makeKey('RS256');
  });
  afterAll(async () => {
    await Promise.all(methods.map((m) => m.close()));
    await Promise.all(providers.map((p) => p.close()));
    await auth?.close();
  });

  it('finds the discovery document under the issuer, without its terminating slash', () => {
    expect(discoveryUrl('https://idp.example')).toBe('https://idp.example/.well-known/openid-configuration');
    expect(discoveryUrl('https://tenant.eu.auth0.com/')).toBe('https://tenant.eu.auth0.com/.well-known/openid-configuration');
    expect(discoveryUrl('https://sso.example/realms/acme')).toBe('https://sso.example/realms/acme/.well-known/openid-configuration');
  });

  it('a provider that accepts the connection and never answers: 503 once the fetch times out', async () => {
    const { provider, method, token } = await setUp({ fetchTimeoutMs: 200, retryMinMs: 0 }, 'hang');
    expect(await outcome(method, await token())).toMatchObject({ status: 503, retryAfter: 1 });
    expect(provider.hitsOf('discovery')).toBeGreaterThanOrEqual(1);
    // Once it answers again, so do we.
    provider.mode = 'ok';
    expect((await outcome(method, await token())).status).toBe(200);
  });

  it('times out even when the garbage collector runs while it waits (a collected timeout signal never fires)', async () => {
    v8.setFlagsFromString('--expose-gc');
    const gc = vm.runInNewContext('gc') as () => void;
    const { method, token } = await setUp({ fetchTimeoutMs: 300, retryMinMs: 0 }, 'hang');
    const collecting = setInterval(gc, 20);
    try {
      const pending = Symbol('still waiting');
      const first = await Promise.race([outcome(method, await token()), new Promise((r) => setTimeout(() => r(pending), 10_000))]);
      expect(first).toMatchObject({ status: 503 });
    } finally {
      clearInterval(collecting);
    }
  });

  it('a key set that never answers: 503 once the fetch times out', async () => {
    const { provider, method, token } = await setUp({ fetchTimeoutMs: 200, retryMinMs: 0 }, 'ok', { jwks_uri: '/slow-keys' });
    await vi.waitUntil(() => provider.hitsOf('discovery') >= 1);
    provider.mode = 'hang';
    expect(await outcome(method, await token())).toMatchObject({ status: 503 });
    expect(provider.hits.get('/slow-keys')).toBeGreaterThanOrEqual(1);
  });

  it('closing the server ends a request to the provider in flight', async () => {
    const { provider, method } = await setUp({ fetchTimeoutMs: 60_000 }, 'hang');
    await vi.waitUntil(() => provider.hitsOf('discovery') >= 1);
    // Would wait for the minute-long timeout (beyond the test's) if the request were not aborted.
    await method.close();
  });

  it('waits longer after each failure (1, 2, 4... s, at most 30 s), and starts again from 1 s after a success', async () => {
    freezeClock();
    const { provider, method, token } = await setUp({});
    provider.mode = 'error';
    const waits: number[] = [];
    for (let i = 0; i < 7; i++) {
      const r = await outcome(method, await token());
      expect(r.status).toBe(503);
      waits.push(r.retryAfter!);
      frozenAt! += r.retryAfter! * 1_000;
    }
    expect(waits).toEqual([1, 2, 4, 8, 16, 30, 30]);
    expect(provider.hitsOf('discovery')).toBe(7);
    provider.mode = 'ok';
    expect((await outcome(method, await token())).status).toBe(200);
  });

  it('keys older than the stale limit are not used while the provider is down', async () => {
    freezeClock();
    const { provider, method, token } = await setUp({ keysMaxAgeMs: 0, staleKeysMaxAgeMs: 0 });
    expect((await outcome(method, await token())).status).toBe(200);
    await provider.stop();
    frozenAt! += 1;
    expect((await outcome(method, await token())).status).toBe(503);
  });

  it('with the default stale limit, the same keys keep verifying while the provider is down', async () => {
    const { provider, method, token } = await setUp({ keysMaxAgeMs: 0 });
    expect((await outcome(method, await token())).status).toBe(200);
    await provider.stop();
    const r = await outcome(method, await token());
    expect(r.status).toBe(200);
    expect(r.caller?.context).toMatchObject({ userId: t.member.id, authMethod: 'oidc' });
  });

  it('discovers again when the document is old, and follows a new jwks_uri', async () => {
    const { provider, method, token } = await setUp({ discoveryMaxAgeMs: 0 });
    expect((await outcome(method, await token())).status).toBe(200);
    const next = await makeKey('ES256');
    provider.keys = [next];
    provider.discovery = { jwks_uri: `http://127.0.0.1:${provider.port}${provider.jwksPath}?v=2` };
    const signed = await provider.sign(next, { email: t.member.email, org_id: t.org.id });
    // The document is refreshed in the background: the new key set is used once it has arrived.
    await vi.waitUntil(async () => (await outcome(method, signed)).status === 200, { timeout: 5_000, interval: 20 });
    expect(provider.hits.get(provider.jwksPath)).toBeGreaterThanOrEqual(2);
  });
});
