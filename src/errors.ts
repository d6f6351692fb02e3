import { STATUS_CODES } from 'node:http';

/**
 * The closed set of error codes the API returns. Clients switch on `code`, not on the message.
 * Adding a code means adding its status below; the switch is checked for exhaustiveness.
 */
export type ErrorCode =
  | 'validation_failed'
  | 'bad_request'
  | 'unauthorized'
  | 'forbidden'
  | 'not_found'
  | 'route_not_found'
  | 'email_taken'
  | 'last_owner'
  | 'rate_limited'
  | 'quota_exceeded'
  | 'payload_too_large'
  | 'unsupported_media_type'
  | 'service_unavailable'
  | 'internal_error';

export function statusOf(code: ErrorCode): number {
  switch (code) {
    case 'validation_failed':
    case 'bad_request':
      return 400;
    case 'unauthorized':
      return 401;
    case 'forbidden':
      return 403;
    case 'not_found':
    case 'route_not_found':
      return 404;
    case 'email_taken':
    case 'last_owner':
      return 409;
    case 'payload_too_large':
      return 413;
    case 'rate_limited':
    case 'quota_exceeded':
      return 429;
    case 'unsupported_media_type':
      return 415;
    case 'service_unavailable':
      return 503;
    case 'internal_error':
      return 500;
  }
}

export interface ErrorDetail {
  /** Where the problem is, e.g. "body.email" or "headers.x-org-id". */
  field: string;
  message: string;
}

export class AppError extends Error {
  readonly statusCode: number;
  constructor(
    readonly code: ErrorCode,
    message: string,
    readonly details?: ErrorDetail[],
    /** Seconds, sent as Retry-After. */
    readonly retryAfter?: number,
  ) {
    // A 4xx is an answer to the client, not a fault: its stack is never logged, and capturing one
    // was the most expensive step of refusing a flood (5 % of the server's time in a profile).
    const status = statusOf(code);
    const limit = Error.stackTraceLimit;
    if (status < 500) Error.stackTraceLimit = 0;
    super(message); // Error's constructor does not throw: the limit is always restored
    Error.stackTraceLimit = limit;
    this.name = 'AppError';
    this.statusCode = status;
  }

  #bodyPrefix: string | undefined;

  /**
   * The JSON of its body (errorBody, without details) up to the request id's value: the same for
   * every request it answers, made once. Refusals are cached AppErrors, so a refused flood writes
   * only the id.
   */
  bodyJsonPrefix(): string {
    if (this.#bodyPrefix === undefined) {
      // Without details, requestId is the body's last field: cut its empty value's `"}`.
      this.#bodyPrefix = JSON.stringify(errorBody(this, '')).slice(0, -2);
    }
    return this.#bodyPrefix;
  }
}

export interface ErrorBody {
  error: string;
  message: string;
  code: ErrorCode;
  requestId: string;
  details?: ErrorDetail[];
}

export function errorBody(err: AppError, requestId: string): ErrorBody {
  const body: ErrorBody = { error: STATUS_CODES[err.statusCode] ?? 'Error', message: err.message, code: err.code, requestId };
  if (err.details) body.details = err.details;
  return body;
}

export const notFound = (what = 'Resource') => new AppError('not_found', `${what} not found`);
