import { AppError } from '../errors.js';

/**
 * Opaque page cursors: a prefix naming the list and version, then one value (an id, a position),
 * in base64url. Clients only pass them back; anything that is not one of ours is a 400.
 */
export interface PageCursor {
  encode(value: string): string;
  /** The value, or a 400 validation_failed for anything this list did not hand out. */
  decode(cursor: string): string;
  /** The same 400, for a cursor that decodes but names nothing of this org. */
  invalid(): AppError;
}

export const UUID_VALUE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

export function pageCursor(prefix: string, value: RegExp): PageCursor {
  const invalid = () =>
    new AppError('validation_failed', 'querystring.cursor: is not a cursor returned by this API', [
      { field: 'querystring.cursor', message: 'is not a cursor returned by this API' },
    ]);
  return {
    encode: (v) => Buffer.from(prefix + v).toString('base64url'),
    decode(cursor) {
      const text = Buffer.from(cursor, 'base64url').toString('utf8');
      const v = text.slice(prefix.length);
      if (!text.startsWith(prefix) || !value.test(v)) throw invalid();
      return v;
    },
    invalid,
  };
}
