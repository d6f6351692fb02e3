/**
 * The columns of a user row as the models select them. A module of its own, without imports:
 * the models that select users import each other, and a constant built at load time must not
 * depend on the order in which they load.
 */

/**
 * A timestamp as ISO 8601 in UTC with milliseconds, what Date#toISOString writes (to_char's MS
 * truncates the microseconds, as a Date does). Formatted by PostgreSQL rather than parsed into a
 * Date by the driver and formatted back: that was 8 % of a `GET /v1/users` page's server time.
 */
const isoTime = (column: string, as: string) => `to_char(${column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS ${as}`;

/** The columns of a UserRow, of table alias `t` (none: unqualified). */
export const userColumns = (t?: string): string => {
  const c = (name: string) => (t ? `${t}.${name}` : name);
  return `${c('id')}, ${c('org_id')}, ${c('email')}, ${c('name')}, ${c('role')}, ${isoTime(c('created_at'), 'created_at')}, ${isoTime(c('updated_at'), 'updated_at')}`;
};
