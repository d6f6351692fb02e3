import path from 'node:path';
import { fileURLToPath } from 'node:url';

// PostgreSQL's codes for a missing table, column or function: the database is not migrated yet.
const NOT_MIGRATED = new Set(['42P01', '42703', '42883']);

/**
 * Runs a command-line tool's `main` when its module is the program that was started, not when a
 * test imports it. A thrown error ends it with status 1 and one line on stderr, `failure` and
 * the error's message, with a hint when the database is not migrated.
 */
export async function runAsProgram(moduleUrl: string, failure: string, main: (argv: string[]) => Promise<number>): Promise<void> {
  if (!process.argv[1] || path.resolve(process.argv[1]) !== fileURLToPath(moduleUrl)) return;
  process.exitCode = await main(process.argv.slice(2)).catch((err: unknown) => {
    const code = (err as { code?: unknown }).code;
    const hint = typeof code === 'string' && NOT_MIGRATED.has(code) ? ' (is the database migrated? run npm run db:migrate)' : '';
    process.stderr.write(`${failure}: ${(err as Error).message}${hint}\n`);
    return 1;
  });
}
