import { readdirSync } from 'node:fs';
import Fastify, { type FastifyPluginAsync } from 'fastify';
import { serializerCompiler as zodSerializerCompiler, validatorCompiler } from 'fastify-type-provider-zod';
import { describe, expect, it } from 'vitest';
import { z } from 'zod';
import { AppError, errorBody } from '../src/errors.js';
import { plainErrorJson } from '../src/middleware/errorHandler.js';
import { compileExactSerializer, serializerCompiler } from '../src/routes/serializer.js';
import { ErrorSchema, UserSchema } from '../src/routes/schemas.js';

/**
 * The compiled serializer against the zod serializer it replaces, on every response schema of
 * every route file: for bodies the schema accepts (with tricky strings, numbers, nulls, missing
 * optionals and extra properties) the same bytes, and for bodies it refuses the same error.
 */

interface RouteSchema {
  route: string;
  schema: z.ZodType;
}

/** Every response schema of every src/routes/*.route.ts, as Fastify sees them. */
async function routeSchemas(): Promise<RouteSchema[]> {
  const app = Fastify();
  app.setValidatorCompiler(validatorCompiler);
  app.setSerializerCompiler(zodSerializerCompiler);
  const found: RouteSchema[] = [];
  app.addHook('onRoute', (route) => {
    const response = (route.schema?.response ?? {}) as Record<string, unknown>;
    for (const [status, schema] of Object.entries(response)) {
      if (schema instanceof z.ZodType) found.push({ route: `${String(route.method)} ${route.url} ${status}`, schema });
    }
  });
  const dir = new URL('../src/routes/', import.meta.url);
  for (const file of readdirSync(dir).filter((f) => f.endsWith('.route.ts'))) {
    const mod = (await import(new URL(file, dir).href)) as Record<string, unknown>;
    for (const [name, plugin] of Object.entries(mod)) {
      // The plugins use their options only inside handlers, which never run here.
      if (name.endsWith('Routes') && typeof plugin === 'function') await app.register(plugin as FastifyPluginAsync<never>, {} as never);
    }
  }
  await app.ready();
  await app.close();
  return found;
}

type Json = Record<string, unknown>;

const STRINGS = [
  '',
  'plain',
  'quote " backslash \\ slash /',
  'controls \u0000 \u0001 \u001f \n \r \t \b \f',
  'unicode é 日本語 😀',
  'lone surrogates \ud800 \udfff x\ud83d',
  'line separators \u2028 \u2029 </script>',
  'x'.repeat(300) + '"',
];
const INTEGERS = [0, -7, 42, Number.MAX_SAFE_INTEGER, Number.MIN_SAFE_INTEGER];
const NUMBERS = [0, -0, 1.5, -3.25, 1e21, 5e-7, 123456789.123, 0.1 + 0.2];

/** Values a schema accepts (zod's JSON Schema of it, `draft-7`). */
function validValues(s: Json): unknown[] {
  if (Array.isArray(s.anyOf)) return (s.anyOf as Json[]).flatMap(validValues);
  if (s.const !== undefined) return [s.const];
  if (Array.isArray(s.enum)) return s.enum as unknown[];
  const types = Array.isArray(s.type) ? (s.type as string[]) : [s.type as string];
  return types.flatMap((t): unknown[] => {
    switch (t) {
      case 'string':
        return STRINGS;
      case 'integer':
        return INTEGERS;
      case 'number':
        return NUMBERS;
      case 'boolean':
        return [true, false];
      case 'null':
        return [null];
      case 'array': {
        const items = s.items ? validValues(s.items as Json) : ['any'];
        return [[], items.slice(0, 1), items.slice(0, 3)];
      }
      case 'object':
        return validObjects(s);
      default:
        return [{ any: 'thing' }, 'text', 3];
    }
  });
}

function validObjects(s: Json): Json[] {
  const props = (s.properties ?? {}) as Record<string, Json>;
  const required = new Set((s.required ?? []) as string[]);
  const base: Json = {};
  for (const [k, p] of Object.entries(props)) base[k] = validValues(p)[0];
  const out: Json[] = [base, { ...base, extra: 'stripped', nested: { a: 1 } }, { extra: 1, ...base }];
  for (const [k, p] of Object.entries(props)) {
    for (const v of validValues(p)) out.push({ ...base, [k]: v });
    if (!required.has(k)) {
      const without = { ...base };
      delete without[k];
      out.push(without, { ...base, [k]: undefined });
    }
  }
  return out;
}

const WRONG = [undefined, null, 12, 'text', true, Number.NaN, Number.POSITIVE_INFINITY, new Date(0), [], {}];

/** Bodies a schema may refuse: a property missing or of the wrong kind, or the wrong root. */
function invalidValues(s: Json): unknown[] {
  const out: unknown[] = [null, 'text', 42, [], undefined];
  for (const branch of Array.isArray(s.anyOf) ? (s.anyOf as Json[]) : [s]) {
    const props = (branch.properties ?? {}) as Record<string, Json>;
    const base = validObjects(branch)[0]!;
    for (const k of Object.keys(props)) {
      const without = { ...base };
      delete without[k];
      out.push(without);
      for (const v of WRONG) out.push({ ...base, [k]: v });
    }
  }
  return out;
}

type Outcome = { json: string } | { error: string };
function outcome(serialize: (data: unknown) => string, data: unknown): Outcome {
  try {
    return { json: serialize(data) };
  } catch (err) {
    return { error: (err as Error).name };
  }
}

type Compiler = (args: { schema: z.ZodType; method: string; url: string; httpStatus: string }) => (data: unknown) => string;
/** The serializer a compiler makes for one route's schema (both compilers take Fastify's arguments). */
const compile = (compiler: unknown, schema: z.ZodType) => (compiler as Compiler)({ schema, method: 'GET', url: '/test', httpStatus: '200' });

describe('compiled response serializer', () => {
  it('writes what the zod serializer writes, for every route and status, valid bodies and invalid ones', async () => {
    const schemas = await routeSchemas();
    expect(schemas.length).toBeGreaterThan(50);
    let compared = 0;
    for (const { route, schema } of schemas) {
      const ours = compile(serializerCompiler, schema);
      const zods = compile(zodSerializerCompiler, schema);
      let json: Json;
      try {
        json = z.toJSONSchema(schema, { io: 'output', target: 'draft-7', metadata: z.registry() });
      } catch {
        json = {}; // not representable: the zod serializer serves it, and any body is compared below
      }
      const samples = [...validValues(json), ...invalidValues(json)];
      for (const data of samples) {
        expect(outcome(ours, data), `${route}: ${JSON.stringify(data)}`).toEqual(outcome(zods, data));
        compared++;
      }
    }
    expect(compared).toBeGreaterThan(1000);
  });

  it('is compiled for the hot routes: GET /v1/me (a user or an API key) and the error body', async () => {
    const schemas = await routeSchemas();
    const me = schemas.find((s) => s.route === 'GET /me 200');
    expect(me).toBeDefined();
    expect(compileExactSerializer(me!.schema)).not.toBeNull();
    expect(compileExactSerializer(ErrorSchema)).not.toBeNull();
    expect(compileExactSerializer(UserSchema)).not.toBeNull();
  });

  it('keeps the zod serializer for what the compiled one cannot write exactly', () => {
    expect(compileExactSerializer(z.object({ at: z.date() }))).toBeNull();
    expect(compileExactSerializer(z.object({ n: z.string().transform((s) => s.length) }))).toBeNull();
    expect(compileExactSerializer(z.object({ metadata: z.record(z.string(), z.unknown()) }))).toBeNull();
    expect(compileExactSerializer(z.object({ name: z.string().default('x') }))).toBeNull();
    expect(compileExactSerializer(z.object({ email: z.email() }))).toBeNull();
    expect(compileExactSerializer(z.object({ n: z.number().min(1) }))).toBeNull();
    expect(compileExactSerializer(z.object({ u: z.union([z.string(), z.object({ a: z.string() })]) }))).toBeNull();
    expect(compileExactSerializer(z.object({ o: z.object({ a: z.string() }).nullable() }))).toBeNull();
    expect(compileExactSerializer(z.object({ v: z.union([z.string(), z.number(), z.null()]) }))).toBeNull();
  });

  it('strips extra properties and keeps the schema order, as zod does', () => {
    const schema = z.object({ b: z.string(), a: z.int(), c: z.string().nullable(), d: z.boolean().optional() });
    const ours = compile(serializerCompiler, schema);
    expect(ours({ a: 1, x: 'no', c: null, b: 'y\u2028"' })).toBe('{"b":"y\u2028\\"","a":1,"c":null}');
  });

  it('refuses what zod refuses in numbers (NaN, infinities, unsafe or fractional integers) and writes the rest as JSON.stringify', () => {
    const schema = z.object({ n: z.number(), i: z.int(), m: z.number().nullable() });
    const ours = compile(serializerCompiler, schema);
    const zods = compile(zodSerializerCompiler, schema);
    expect(compileExactSerializer(schema)).not.toBeNull();
    const values = [0, -0, 1.5, 1e21, 5e-7, Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY, 2 ** 53, 0.5, null, '1'];
    for (const v of values) {
      for (const data of [{ n: v, i: 1, m: null }, { n: 1, i: v, m: 1 }, { n: 1, i: 1, m: v }]) {
        expect(outcome(ours, data), JSON.stringify(data)).toEqual(outcome(zods, data));
      }
    }
  });

  it('writes error bodies (sendError) exactly as JSON.stringify does: the cached prefix and the id, or null for the generic path', () => {
    const details = [{ field: 'body.email', message: 'must be an email address' }];
    for (const message of STRINGS) {
      for (const requestId of ['94732ceb-93e0-4df7-a6eb-de556209d64e', 'caller.id:1~x', message]) {
        for (const err of [
          new AppError('rate_limited', message, undefined, 3),
          new AppError('validation_failed', message, details),
          new AppError('bad_request', message, [{ field: message, message, extra: 1 } as never]),
          new AppError('internal_error', message),
        ]) {
          const body = errorBody(err, requestId);
          // The one-string path: the same bytes as JSON.stringify, or null where it does not apply.
          const plain = plainErrorJson(err, requestId);
          if (err.details === undefined && /^[A-Za-z0-9._~:-]*$/.test(requestId)) expect(plain).toBe(JSON.stringify(body));
          else expect(plain).toBeNull();
        }
      }
    }
  });
});
