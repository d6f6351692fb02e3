import { z } from 'zod';
import type { Org } from '../models/org.model.js';
import type { User } from '../models/user.model.js';
import { ROLES } from '../types/context.js';

/** Schemas shared by routes: they validate input, shape output and produce /openapi.json. */

export const uuid = (what: string) => z.guid({ message: `${what} must be a UUID` });

// Printable text only: control characters in names end up in logs, CSVs and e-mails; a lone
// surrogate cannot be stored as sent (it would come back as U+FFFD).
const NO_CONTROL_CHARS = /^[^\p{Cc}\p{Cs}]*$/u;
export const personName = z
  .string()
  .trim()
  .min(1, 'must not be empty')
  .max(255, 'must be at most 255 characters')
  .regex(NO_CONTROL_CHARS, 'must not contain control characters');

export const email = z
  .string()
  .trim()
  .max(255, 'must be at most 255 characters')
  .pipe(z.email({ message: 'must be an email address' }));

export const role = z.enum(ROLES, { message: `must be one of ${ROLES.join(', ')}` });

/** `?limit=&cursor=` of a paginated list: the fields every list route shares. */
export const pageQuery = (defaultLimit: number) => ({
  limit: z.coerce
    .number({ message: 'must be a number' })
    .int('must be an integer')
    .min(1, 'must be at least 1')
    .max(100, 'must be at most 100')
    .default(defaultLimit),
  cursor: z.string().min(1).max(512, 'must be at most 512 characters').optional(),
});

export const UserSchema = z
  .object({
    id: z.string(),
    orgId: z.string(),
    email: z.string(),
    name: z.string().nullable(),
    role,
    createdAt: z.string(),
    updatedAt: z.string(),
  })
  .meta({ id: 'User' });

export const OrgSchema = z
  .object({
    id: z.string(),
    name: z.string(),
    slug: z.string(),
    metadata: z.record(z.string(), z.unknown()),
    createdAt: z.string(),
    updatedAt: z.string(),
  })
  .meta({ id: 'Org' });

export const toUserDto = (u: User): z.infer<typeof UserSchema> => ({
  id: u.id,
  orgId: u.orgId,
  email: u.email,
  name: u.name,
  role: u.role,
  createdAt: u.createdAt,
  updatedAt: u.updatedAt,
});

export const toOrgDto = (o: Org): z.infer<typeof OrgSchema> => ({
  id: o.id,
  name: o.name,
  slug: o.slug,
  metadata: o.metadata,
  createdAt: o.createdAt.toISOString(),
  updatedAt: o.updatedAt.toISOString(),
});

export const ErrorSchema = z
  .object({
    error: z.string(),
    message: z.string(),
    code: z.string(),
    requestId: z.string(),
    details: z.array(z.object({ field: z.string(), message: z.string() })).optional(),
  })
  .meta({ id: 'Error' });

/** Response schemas for the error statuses a route can answer with. */
export function errors<const S extends readonly number[]>(...statuses: S): { [K in S[number]]: typeof ErrorSchema } {
  return Object.fromEntries(statuses.map((s) => [s, ErrorSchema])) as { [K in S[number]]: typeof ErrorSchema };
}

/** Every tenant route needs the auth headers; documenting them once. */
export const AUTH_ERRORS = [400, 401, 403, 429, 503] as const;
