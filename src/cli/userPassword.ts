/**
 * `npm run user:password -- <org-slug> <email>`
 *
 * Sets a user's password, read from standard input (never from the command line, where it would
 * stay in the shell's history and in the process list): typed at a prompt without echo on a
 * terminal, or the first line of what is piped in. Every session of the user ends. Audited as
 * the system (`user.password_changed`). Exit 0 when set, 1 when refused (rules, no such user),
 * 2 on bad arguments.
 *
 *   printf '%s\n' "$NEW_PASSWORD" | npm run user:password -- acme-corp admin@acme.com
 */
import { hashPassword, passwordProblem } from '../auth/passwords.js';
import { loadCliConfig } from '../config/env.js';
import { createDatabase } from '../infra/database.js';
import { createLogger } from '../infra/logger.js';
import { setPasswordAsOperator } from '../models/password.model.js';
import { runAsProgram } from './run.js';

const USAGE = 'usage: npm run user:password -- <org-slug> <email>   (the password is read from standard input)';

/** The first line of a piped standard input, without its line ending. */
async function readPipedLine(input: NodeJS.ReadStream): Promise<string> {
  let text = '';
  input.setEncoding('utf8');
  for await (const chunk of input) {
    text += chunk as string;
    if (text.includes('\n')) break;
  }
  return text.split(/\r?\n/)[0] ?? '';
}

/** A line typed at the terminal, not echoed. */
function readHidden(prompt: string): Promise<string> {
  const input = process.stdin;
  return new Promise((resolve, reject) => {
    process.stderr.write(prompt);
    let text = '';
    input.setRawMode(true);
    input.setEncoding('utf8');
    const done = (err?: Error) => {
      input.setRawMode(false);
      input.pause();
      input.off('data', onData);
      process.stderr.write('\n');
      if (err) reject(err);
      else resolve(text);
    };
    const onData = (chunk: string) => {
      for (const c of chunk) {
        if (c === '\r' || c === '\n') return done();
        if (c === '\u0003') return done(new Error('interrupted'));
        if (c === '\u007f' || c === '\b') text = [...text].slice(0, -1).join('');
        else text += c;
      }
    };
    input.on('data', onData);
    input.resume();
  });
}

async function readPassword(): Promise<string> {
  if (!process.stdin.isTTY) return readPipedLine(process.stdin);
  const first = await readHidden('New password: ');
  const again = await readHidden('Again: ');
  if (first !== again) throw new UsageError('the two passwords differ');
  return first;
}

class UsageError extends Error {}

async function main(argv: string[]): Promise<number> {
  if (argv.length !== 2 || argv.some((a) => a.startsWith('-'))) {
    process.stderr.write(`${USAGE}\n`);
    return 2;
  }
  const [slug, email] = argv as [string, string];
  const config = loadCliConfig();
  if (!config) return 1;
  let password: string;
  try {
    password = await readPassword();
  } catch (err) {
    process.stderr.write(`No password set: ${(err as Error).message}\n`);
    return 1;
  }
  const problem = passwordProblem(password, email);
  if (problem) {
    process.stderr.write(`No password set: the password ${problem}\n`);
    return 1;
  }
  const logger = createLogger({ ...config, logLevel: 'warn' });
  const db = await createDatabase(config.database, logger);
  try {
    const done = await setPasswordAsOperator(db, slug, email, await hashPassword(password));
    if (!done) {
      process.stderr.write(`No live user ${email} in a live organization "${slug}"\n`);
      return 1;
    }
    process.stdout.write(`Password set for ${email.trim().toLowerCase()} in ${slug}; sessions ended: ${done.sessionsEnded}\n`);
    return 0;
  } finally {
    await db.close();
  }
}

await runAsProgram(import.meta.url, 'Cannot set the password', main);
