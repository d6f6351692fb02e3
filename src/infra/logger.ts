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

  readonly fatal: LogFn = (...args: Parameters<LogFn>) => {
    if (this.enabled('fatal')) this.logger.fatal(...args);
  };
  readonly error: LogFn = (...args: Parameters<LogFn>) => {
    if (this.enabled('error')) this.logger.error(...args);
  };
  readonly warn: LogFn = (...args: Parameters<LogFn>) => {
    if (this.enabled('warn')) this.logger.warn(...args);
  };
  readonly info: LogFn = (...args: Parameters<LogFn>) => {
    if (this.enabled('info')) this.logger.info(...args);
  };
  readonly debug: LogFn = (...args: Parameters<LogFn>) => {
    if (this.enabled('debug')) this.logger.debug(...args);
  };
  readonly trace: LogFn = (...args: Parameters<LogFn>) => {
    if (this.enabled('trace')) this.logger.trace(...args);
  };
  readonly silent: LogFn = () => undefined;

  child(bindings: Bindings, opts?: ChildLoggerOptions): FastifyBaseLogger {
    return this.logger.child(bindings, opts);
  }

  isLevelEnabled(level: string): boolean {
    return levelEnabled(this.real ?? (this.opts.level !== undefined ? this.logger : this.parent), level);
  }
}

/** Fastify's childLoggerFactory option: a LazyRequestLogger per request. */
export function lazyChildLoggerFactory(logger: FastifyBaseLogger, bindings: Bindings, opts: ChildLoggerOptions): FastifyBaseLogger {
  return new LazyRequestLogger(logger, bindings, opts);
}
