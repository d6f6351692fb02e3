import type { FastifyBaseLogger } from 'fastify';
import pino from 'pino';
import type { Bindings, ChildLoggerOptions, LogFn, Logger, LoggerOptions } from 'pino';
import type { Config } from '../config/env.js';

/** pino options: JSON lines for machines, pino-pretty in a terminal. Secrets never reach a line. */
export function loggerOptions(config: Pick<Config, 'logLevel' | 'logFormat'>): LoggerOptions {
  return {
    level: config.logLevel,
    // Headers that carry credentials are cut out of any logged request object.
    redact: {
      paths: [
        'req.headers.authorization',
        'req.headers.cookie',
        'req.headers["x-api-key"]',
        // Headers logged under another name (a request's headers, a client's options...).
        'headers.authorization',
        '*.headers.authorization',
        '*.password',
        '*.token',
      ],
      censor: '[redacted]',
    },
    ...(config.logFormat === 'pretty'
      ? {
          transport: {
            target: 'pino-pretty',
            options: { colorize: true, translateTime: 'HH:MM:ss.l', ignore: 'pid,hostname' },
          },
        }
      : {}),
  };
}

export function createLogger(config: Pick<Config, 'logLevel' | 'logFormat'>): Logger {
  return pino(loggerOptions(config));
}

type LogLevel = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace';

/** pino's isLevelEnabled where the logger has it (Fastify's logger type does not promise it). */
const levelEnabled = (logger: FastifyBaseLogger, level: string): boolean => {
  const check = (logger as Partial<Pick<Logger, 'isLevelEnabled'>>).isLevelEnabled;
  return typeof check === 'function' ? check.call(logger, level) : true;
};

/**
 * Fastify's request logger (`request.log`), made only when something is logged. Fastify calls its
 * child logger factory for every request, and a pino child (bound to the request id, its bindings
 * passed through the redaction above) was 1.5–2 % of the server's time on a request that logs
 * nothing, which is almost every request. This stands in with the same methods; the first line
 * at an enabled level makes the real child, so every line still carries the request id. Written
 * here because neither pino nor Fastify has a lazy child.
 */
class LazyRequestLogger {
  private real: FastifyBaseLogger | null = null;

  constructor(
    private readonly parent: FastifyBaseLogger,
    private readonly bindings: Bindings,
    private readonly opts: ChildLoggerOptions,
  ) {}

  private get logger(): FastifyBaseLogger {
    this.real ??= this.parent.child(this.bindings, this.opts);
    return this.real;
  }

  private enabled(level: LogLevel): boolean {
    // A level of the request's own (a route's logLevel) decides in the real child.
    return this.real !== null || this.opts.level !== undefined || levelEnabled(this.parent, level);
  }

  get level(): string {
    return this.real?.level ?? this.opts.level ?? this.parent.level;
  }

  set level(level: string) {
    this.logger.level = level;
  }

  // Set on the prototype below; `declare` makes no field on each instance.
  declare readonly fatal: LogFn;
  declare readonly error: LogFn;
  declare readonly warn: LogFn;
  declare readonly info: LogFn;
  declare readonly debug: LogFn;
  declare readonly trace: LogFn;
  declare readonly silent: LogFn;

  /** A line at `level`: dropped at once when the level is off, else written by the real child. */
  write(level: LogLevel, args: Parameters<LogFn>): void {
    if (this.enabled(level)) this.logger[level](...args);
  }

  child(bindings: Bindings, opts?: ChildLoggerOptions): FastifyBaseLogger {
    return this.logger.child(bindings, opts);
  }

  isLevelEnabled(level: string): boolean {
    return levelEnabled(this.real ?? (this.opts.level !== undefined ? this.logger : this.parent), level);
  }
}

// The level methods live on the prototype, made once: as instance fields (arrow functions) they
// were seven closures allocated per request.
for (const level of ['fatal', 'error', 'warn', 'info', 'debug', 'trace'] as const) {
  Object.defineProperty(LazyRequestLogger.prototype, level, {
    value: function (this: LazyRequestLogger, ...args: Parameters<LogFn>) {
      this.write(level, args);
    },
    writable: true,
    configurable: true,
  });
}
Object.defineProperty(LazyRequestLogger.prototype, 'silent', { value: () => undefined, writable: true, configurable: true });

/** Fastify's childLoggerFactory option: a LazyRequestLogger per request. */
export function lazyChildLoggerFactory(logger: FastifyBaseLogger, bindings: Bindings, opts: ChildLoggerOptions): FastifyBaseLogger {
  return new LazyRequestLogger(logger, bindings, opts);
}
