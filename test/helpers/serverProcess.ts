import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * The real server (`node --import tsx src/server.ts`) as a child process listening on a real
 * socket, the way users and load balancers meet it. Logs are JSON lines on stdout, parsed as
 * they arrive; the port comes from the "llm-app listening" line (PORT=0 picks a free one).
 */

const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

export interface LogLine {
  level: number;
  msg?: string;
  requestId?: string;
  [key: string]: unknown;
}

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface ServerProcess {
  readonly baseUrl: string;
  readonly port: number;
  readonly pid: number;
  /** Every JSON log line so far, in order. */
  readonly logs: LogLine[];
  /** stdout lines that were not JSON, and all of stderr. */
  readonly rawOutput: () => string;
  signal(sig: NodeJS.Signals): void;
  /** Resolves when the process has exited; rejects after `timeoutMs`. */
  waitForExit(timeoutMs?: number): Promise<Exit>;
  /** Resolves with the first log line (already seen or future) matching `pred`. */
  waitForLog(pred: (l: LogLine) => boolean, timeoutMs?: number): Promise<LogLine>;
  readonly exited: Exit | null;
  /** SIGKILL if still running, and wait for the exit. */
  kill(): Promise<void>;
}

export interface StartOptions {
  /** Either a PostgreSQL URL or a data folder for the embedded database. */
  database: { url: string } | { dataDir: string };
  env?: Record<string, string>;
  startTimeoutMs?: number;
}

export async function startServer(opts: StartOptions): Promise<ServerProcess> {
  const env: Record<string, string> = {
    // Only what the server needs: nothing leaks in from the test runner's environment.
    PATH: process.env.PATH ?? '/usr/bin:/bin',
    ...(process.env.HOME ? { HOME: process.env.HOME } : {}),
    ...(process.env.TMPDIR ? { TMPDIR: process.env.TMPDIR } : {}),
    NODE_ENV: 'test',
    HOST: '127.0.0.1',
    PORT: '0',
    LOG_FORMAT: 'json',
    LOG_LEVEL: 'info',
    ...('url' in opts.database ? { DATABASE_URL: opts.database.url } : { DATA_DIR: opts.database.dataDir }),
    ...opts.env,
  };
  const child: ChildProcessWithoutNullStreams = spawn(process.execPath, ['--import', 'tsx', 'src/server.ts'], {
    cwd: REPO_ROOT,
    env,
    stdio: ['pipe', 'pipe', 'pipe'],
  });

  const logs: LogLine[] = [];
  let raw = '';
  let exited: Exit | null = null;
  const waiters = new Set<() => void>();
  const notify = () => waiters.forEach((w) => w());

  let pending = '';
  child.stdout.setEncoding('utf8').on('data', (chunk: string) => {
    pending += chunk;
    let nl: number;
    while ((nl = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, nl);
      pending = pending.slice(nl + 1);
      if (line.trim() === '') continue;
      try {
        const parsed = JSON.parse(line) as unknown;
        if (parsed && typeof parsed === 'object' && !Array.isArray(parsed)) logs.push(parsed as LogLine);
        else raw += `${line}\n`;
      } catch {
        raw += `${line}\n`;
      }
    }
    notify();
  });
  child.stderr.setEncoding('utf8').on('data', (chunk: string) => {
    raw += chunk;
  });
  const exitPromise = new Promise<Exit>((resolve) => {
    child.once('exit', (code, signal) => {
      exited = { code, signal };
      notify();
      resolve(exited);
    });
  });

  const waitFor = <T>(check: () => T | undefined, timeoutMs: number, what: string): Promise<T> =>
    new Promise<T>((resolve, reject) => {
      const tryNow = () => {
        let v: T | undefined;
        try {
          v = check();
        } catch (err) {
          done();
          reject(err instanceof Error ? err : new Error(String(err)));
          return;
        }
        if (v !== undefined) {
          done();
          resolve(v);
        }
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}\n${describe()}`));
      }, timeoutMs);
      const done = () => {
        clearTimeout(timer);
        waiters.delete(listener);
      };
      const listener = () => tryNow();
      waiters.add(listener);
      tryNow();
    });

  const describe = () =>
    `exit: ${JSON.stringify(exited)}\nlogs:\n${logs.map((l) => JSON.stringify(l)).join('\n')}\nother output:\n${raw}`;

  const waitForLog = (pred: (l: LogLine) => boolean, timeoutMs = 5_000) =>
    waitFor(() => logs.find(pred), timeoutMs, 'a log line');

  const listening = await waitFor(
    () => {
      if (exited) throw new Error(`server exited before listening\n${describe()}`);
      return logs.find((l) => typeof l.msg === 'string' && l.msg.startsWith('llm-app listening'));
    },
    // An embedded-database server starting while the rest of the suite runs in parallel on two
    // cores can take tens of seconds (WASM PostgreSQL created, migrated, seeded): a generous bound.
    opts.startTimeoutMs ?? 90_000,
    'the "llm-app listening" line',
  ).catch(async (err: unknown) => {
    child.kill('SIGKILL');
    await exitPromise;
    throw err;
  });
  const port = listening.port;
  if (typeof port !== 'number' || port <= 0) throw new Error(`no port in ${JSON.stringify(listening)}`);

  return {
    baseUrl: `http://127.0.0.1:${port}`,
    port,
    pid: child.pid!,
    logs,
    rawOutput: () => raw,
    signal: (sig) => {
      child.kill(sig);
    },
    waitForExit: (timeoutMs = 15_000) => waitFor(() => exited ?? undefined, timeoutMs, 'the process to exit'),
    waitForLog,
    get exited() {
      return exited;
    },
    kill: async () => {
      if (!exited) child.kill('SIGKILL');
      await exitPromise;
    },
  };
}

/** Milliseconds from now until `check` holds (polled every 10 ms); throws after `limitMs`. */
export async function msUntil(check: () => Promise<boolean>, limitMs: number): Promise<number> {
  const start = performance.now();
  while (performance.now() - start < limitMs) {
    if (await check()) return performance.now() - start;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`not within ${limitMs} ms`);
}
