import pino from 'pino';
import type { Logger, LoggerOptions } from 'pino';
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
