import { Ajv, type ValidateFunction } from 'ajv';
import type { FastifySerializerCompiler } from 'fastify';
import fastJsonStringify from 'fast-json-stringify';
import { serializerCompiler as zodSerializerCompiler } from 'fastify-type-provider-zod';
import { z } from 'zod';

/**
 * The response serializer: a compiled one (fast-json-stringify, which Fastify itself uses for JSON
 * Schema routes) wherever it writes exactly the bytes the zod serializer of
 * fastify-type-provider-zod writes, and that zod serializer everywhere else.
 *
 * The zod serializer runs the body through the route's schema (extra properties stripped, a body
 * that does not match is a 500) and then JSON.stringify: on GET /v1/me that was a sixth of the
 * request's CPU. The compiled path keeps both rules: a compiled validator (ajv) checks the body
 * against the same schema first, and any body it does not accept goes to the zod serializer, which
 * decides as before (the same 500 and log line). A body it accepts is one zod accepts too, and
 * fast-json-stringify writes it as JSON.stringify would write zod's output: the same properties in
 * the schema's order, extras left out. test/serializer.test.ts compares the two on every route's
 * schemas.
 *
 * Only the JSON Schema keywords below, whose meaning in ajv and fast-json-stringify is exactly the
 * zod type they come from, are compiled; a schema with anything else (records, unknown, defaults,
 * string formats and patterns, dates, transforms, unions other than a top-level one or a nullable
 * scalar, ...) keeps the zod serializer. The check is hand-written because it is a statement about
 * these two libraries together, which neither can make.
 */

type JsonSchema = Record<string, unknown>;
type Serialize = (data: unknown) => string;
/** A compiled serializer: the JSON, or undefined for a body it does not accept. */
type CompiledSerialize = (data: unknown) => string | undefined;

const SCALAR_TYPES = new Set(['string', 'number', 'integer', 'boolean', 'null']);
const SAFE_INTEGER = { minimum: Number.MIN_SAFE_INTEGER, maximum: Number.MAX_SAFE_INTEGER };

function isScalarType(type: unknown): boolean {
  if (typeof type === 'string') return SCALAR_TYPES.has(type);
  // Only a nullable scalar (`z.string().nullable()`: ["string", "null"]): with more types,
  // fast-json-stringify would choose among them by its own rules.
  return Array.isArray(type) && type.length === 2 && type.includes('null') && type.every((t) => typeof t === 'string' && SCALAR_TYPES.has(t));
}

/** Whether `schema` uses only keywords that both libraries read as zod does. */
function isExact(schema: unknown): boolean {
  if (typeof schema !== 'object' || schema === null || Array.isArray(schema)) return false;
  const s = schema as JsonSchema;
  const keys = Object.keys(s);
  if (s.type === 'object') {
    const props = s.properties;
    if (typeof props !== 'object' || props === null) return false;
    if (s.additionalProperties !== false) return false;
    if (s.required !== undefined && !(Array.isArray(s.required) && s.required.every((r) => typeof r === 'string' && r in props))) return false;
    return keys.every((k) => ['type', 'properties', 'required', 'additionalProperties'].includes(k)) && Object.values(props).every(isExact);
  }
  if (s.type === 'array') {
    return keys.every((k) => k === 'type' || k === 'items') && isExact(s.items);
  }
  if (!isScalarType(s.type)) return false;
  for (const k of keys) {
    if (k === 'type') continue;
    // z.int(): the safe-integer range zod checks, and nothing narrower.
    if ((k === 'minimum' || k === 'maximum') && s.type === 'integer' && s[k] === SAFE_INTEGER[k]) continue;
    // z.enum / z.literal of strings.
    if (k === 'enum' && s.type === 'string' && Array.isArray(s.enum) && s.enum.every((e) => typeof e === 'string')) continue;
    if (k === 'const' && s.type === 'string' && typeof s.const === 'string') continue;
    return false;
  }
  return true;
}

/** The same schema for the validator: extra properties are allowed (zod strips them, it does not refuse them). */
function allowingExtras(schema: JsonSchema): JsonSchema {
  if (schema.type === 'object') {
    const copy: JsonSchema = { ...schema };
    delete copy.additionalProperties;
    copy.properties = Object.fromEntries(Object.entries(schema.properties as Record<string, JsonSchema>).map(([k, v]) => [k, allowingExtras(v)]));
    return copy;
  }
  if (schema.type === 'array') return { ...schema, items: allowingExtras(schema.items as JsonSchema) };
  return schema;
}

/** One branch of the response: a validator for what zod accepts and a writer for what it outputs. */
interface Branch {
  accepts: ValidateFunction;
  write: Serialize;
}

// strictNumbers (ajv's default) refuses NaN and ±Infinity, as z.number() does.
const ajv = new Ajv({ strict: true, strictNumbers: true, allErrors: false });

function compileBranch(schema: JsonSchema): Branch {
  return { accepts: ajv.compile(allowingExtras(schema)), write: fastJsonStringify(schema) };
}

/**
 * The compiled serializer for a zod schema, or null where only the zod serializer is exact.
 * Exported for the test that compares the two.
 */
export function compileExactSerializer(schema: unknown): CompiledSerialize | null {
  if (!(schema instanceof z.ZodType)) return null;
  // Shared schemas (ErrorSchema, on every route and status) are compiled once per process.
  let compiled = compiledBySchema.get(schema);
  if (compiled === undefined) {
    compiled = compile(schema);
    compiledBySchema.set(schema, compiled);
  }
  return compiled;
}

const compiledBySchema = new WeakMap<z.ZodType, CompiledSerialize | null>();

function compile(schema: z.ZodType): CompiledSerialize | null {
  let json: JsonSchema;
  try {
    // An empty registry: ids (`.meta({ id })`) would become $refs, which only the OpenAPI document needs.
    json = z.toJSONSchema(schema, { io: 'output', target: 'draft-7', metadata: z.registry(), unrepresentable: 'throw' });
  } catch {
    return null; // dates, transforms, ...
  }
  const root: JsonSchema = { ...json };
  delete root.$schema;
  // A union at the top (GET /v1/me: a user or an API key): zod takes the first option that
  // accepts the body, and so does this.
  const options = Array.isArray(root.anyOf) && Object.keys(root).length === 1 ? (root.anyOf as unknown[]) : [root];
  if (!options.every(isExact)) return null;
  let branches: Branch[];
  try {
    branches = (options as JsonSchema[]).map(compileBranch);
  } catch {
    return null; // a schema either library refuses to compile: the zod serializer answers, never a 500
  }
  return (data) => {
    for (const b of branches) if (b.accepts(data)) return b.write(data);
    return undefined;
  };
}

type SerializerCompilerArgs = Parameters<FastifySerializerCompiler<unknown>>[0];

/** Fastify's serializer compiler: the compiled serializer where it is exact, else zod's. */
export const serializerCompiler = (args: SerializerCompilerArgs): Serialize => {
  const bySchema = zodSerializerCompiler(args as Parameters<typeof zodSerializerCompiler>[0]) as Serialize;
  // Compiled at the first response that uses it (a few ms each): most (route, status) pairs,
  // the error statuses above all (sendError serialises those itself), never answer through
  // their schema, and start-up and the tests' many apps do not pay for them.
  let compiled: CompiledSerialize | null | undefined;
  return (data) => {
    if (compiled === undefined) compiled = compileExactSerializer(args.schema);
    // A body the compiled validator does not accept goes to the zod serializer, which decides.
    return (compiled === null ? undefined : compiled(data)) ?? bySchema(data);
  };
};
