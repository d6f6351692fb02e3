/**
 * Benchmark harness: real server processes on 127.0.0.1, load from autocannon (used as a
 * library, in this process), one fresh server per case, results as a table and a JSON file.
 *
 * A case file (bench/limiter.ts, ...) declares its cases and calls runBenchmark(). Everything a
 * case needs to differ in is its server environment, its request, and two optional checks that
 * say whether the setup was right (never whether it was fast enough: this is a measurement).
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import autocannon from 'autocannon';
import { Redis } from 'ioredis';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const RESULTS_DIR = path.join(REPO_ROOT, 'bench', 'results');

const SERVER_START_TIMEOUT_MS = 60_000;
const SERVER_STOP_TIMEOUT_MS = 10_000;
/** A run that has not finished this long after its duration is stopped and reported as failed. */
const RUN_GRACE_MS = 20_000;
const REQUEST_TIMEOUT_S = 10;

// ---------------------------------------------------------------------------------------------
// Options

export interface BenchOptions {
  durationS: number;
  warmupS: number;
  connections: number;
  /** Every case is run this many times (a b c a b c ...); the table shows each case's median. */
  rounds: number;
  quick: boolean;
  server: 'auto' | 'tsx' | 'dist';
  /** Ids of the cases to run (the reference always runs); null: all. */
  only: string[] | null;
}

function usage(buildIfStale: boolean): string {
  return `Options:
  --duration N      seconds each case is measured (default 10)
  --warmup N        seconds of load before each measurement, not counted (default 1)
  --connections N   concurrent connections (default 50)
  --rounds N        run the whole sequence of cases N times and report each case's median
                    round (default 3: a single run of a case moves by 10-15 %, from one server
                    process to the next; use 5 on a machine that is not idle, 1 for one pass)
  --quick           1 s per case, 0.5 s warm-up and one round: proves the benchmark works (CI)
  --only ID,ID      run only these cases (and the reference), e.g. --only me,refused
  --server MODE     auto (default): dist/server.js if it is newer than every file in src/,
                    else ${buildIfStale ? 'npm run build first' : 'the sources through tsx'}; tsx; dist`;
}

const ENV_HELP = `Environment:
  BENCH_DATABASE_URL or DATABASE_URL   PostgreSQL (else the embedded PGlite in a temporary folder)
  BENCH_REDIS_URL or REDIS_URL         Redis (else the in-memory limiter)`;

/** `envHelp`: replaces the default description of the environment in --help. */
export function parseOptions(argv: string[], extraHelp: string[] = [], buildIfStale = false, envHelp = ENV_HELP): BenchOptions {
  const help = [usage(buildIfStale), envHelp, ...extraHelp.map((l) => `  ${l}`)].join('\n');
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        duration: { type: 'string' },
        warmup: { type: 'string' },
        connections: { type: 'string' },
        rounds: { type: 'string' },
        quick: { type: 'boolean', default: false },
        only: { type: 'string' },
        server: { type: 'string', default: 'auto' },
        help: { type: 'boolean', short: 'h', default: false },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n${help}\n`);
    process.exit(2);
  }
  if (values.help) {
    process.stdout.write(`${help}\n`);
    process.exit(0);
  }
  const num = (name: string, raw: string | undefined, fallback: number, min: number, max: number): number => {
    if (raw === undefined) return fallback;
    const n = Number(raw);
    if (!Number.isFinite(n) || n < min || n > max) {
      process.stderr.write(`--${name} must be a number between ${min} and ${max}, got ${raw}\n`);
      process.exit(2);
    }
    return n;
  };
  const quick = values.quick;
  const server = values.server;
  if (server !== 'auto' && server !== 'tsx' && server !== 'dist') {
    process.stderr.write(`--server must be auto, tsx or dist, got ${server}\n`);
    process.exit(2);
  }
  return {
    quick,
    durationS: Math.round(num('duration', values.duration, quick ? 1 : 10, 1, 600)),
    warmupS: num('warmup', values.warmup, quick ? 0.5 : 1, 0, 60),
    connections: Math.round(num('connections', values.connections, 50, 1, 10_000)),
    rounds: Math.round(num('rounds', values.rounds, quick ? 1 : 3, 1, 100)),
    server,
    only: values.only ? values.only.split(',').map((id) => id.trim()).filter((id) => id !== '') : null,
  };
}

// ---------------------------------------------------------------------------------------------
// Cleanup: every child process and temporary folder goes away however the run ends.

const children = new Set<ChildProcess>();
const tempDirs = new Set<string>();
let cleanupInstalled = false;

function cleanupSync(): void {
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
  children.clear();
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
  tempDirs.clear();
}

function installCleanup(): void {
  if (cleanupInstalled) return;
  cleanupInstalled = true;
  process.on('exit', cleanupSync);
  for (const [signal, code] of [
    ['SIGINT', 130],
    ['SIGTERM', 143],
    ['SIGHUP', 129],
  ] as const) {
    process.on(signal, () => {
      process.stderr.write(`\n${signal}: stopping the servers\n`);
      cleanupSync();
      process.exit(code);
    });
  }
}

export function makeTempDir(prefix: string): string {
  const dir = mkdtempSync(path.join(os.tmpdir(), prefix));
  tempDirs.add(dir);
  return dir;
}

// ---------------------------------------------------------------------------------------------
// Backends: PostgreSQL or PGlite, Redis or memory

export interface Backends {
  database: { kind: 'postgres'; url: string } | { kind: 'pglite'; dataDir: string };
  redisUrl: string | null;
}

/** A URL for printing: the password replaced. */
export function redact(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return '(unparseable URL)';
  }
}

export function nonEmpty(v: string | undefined): string | undefined {
  return v === undefined || v.trim() === '' ? undefined : v;
}

export function resolveBackends(): Backends {
  const dbUrl = nonEmpty(process.env.BENCH_DATABASE_URL) ?? nonEmpty(process.env.DATABASE_URL);
  const redisUrl = nonEmpty(process.env.BENCH_REDIS_URL) ?? nonEmpty(process.env.REDIS_URL) ?? null;
  return {
    database: dbUrl ? { kind: 'postgres', url: dbUrl } : { kind: 'pglite', dataDir: makeTempDir('llm-app-bench-pglite-') },
    redisUrl,
  };
}

function describeBackends(b: Backends): { database: string; redis: string } {
  return {
    database: b.database.kind === 'postgres' ? `PostgreSQL ${redact(b.database.url)}` : `embedded PGlite (temporary DATA_DIR)`,
    redis: b.redisUrl ? `Redis ${redact(b.redisUrl)}` : 'none: in-memory limiter',
  };
}

// ---------------------------------------------------------------------------------------------
// Server processes

export interface ServerCommand {
  mode: 'tsx' | 'dist';
  args: string[];
  display: string;
  why: string;
}

function newestMtimeMs(dir: string): number {
  let newest = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    newest = Math.max(newest, entry.isDirectory() ? newestMtimeMs(p) : statSync(p).mtimeMs);
  }
  return newest;
}

function distState(): 'missing' | 'stale' | 'fresh' {
  try {
    const built = statSync(path.join(REPO_ROOT, 'dist', 'server.js')).mtimeMs;
    return built >= newestMtimeMs(path.join(REPO_ROOT, 'src')) ? 'fresh' : 'stale';
  } catch {
    return 'missing';
  }
}

/**
 * How the app is started. `auto`: dist/server.js when it is newer than every file in src/; when it
 * is not, the sources through tsx, or with `buildIfStale` a fresh `npm run build` first.
 */
export function serverCommand(mode: BenchOptions['server'], buildIfStale = false): ServerCommand {
  const tsx: ServerCommand = {
    mode: 'tsx',
    args: ['--import', 'tsx', 'src/server.ts'],
    display: 'node --import tsx src/server.ts',
    why: '',
  };
  const dist: ServerCommand = { mode: 'dist', args: ['dist/server.js'], display: 'node dist/server.js', why: '' };
  let state = distState();
  if (mode === 'tsx') return { ...tsx, why: 'asked for with --server tsx' };
  if (mode === 'dist') {
    if (state === 'missing') throw new Error('--server dist: dist/server.js does not exist; run npm run build');
    return { ...dist, why: state === 'fresh' ? 'asked for with --server dist' : 'asked for with --server dist (older than src/!)' };
  }
  if (state === 'fresh') return { ...dist, why: 'dist/ is newer than every file in src/' };
  if (buildIfStale) {
    const before = state;
    log(`  building dist/ (npm run build): ${before === 'missing' ? 'there is no dist/server.js' : 'dist/ is older than src/'}`);
    // The build's output goes to stderr: stdout carries only the results.
    const built = spawnSync('npm', ['run', 'build'], { cwd: REPO_ROOT, stdio: ['ignore', 2, 2] });
    state = distState();
    if (built.status !== 0 || state !== 'fresh') throw new Error(`npm run build failed (status ${built.status ?? built.signal})`);
    return { ...dist, why: `built by this run (${before === 'missing' ? 'there was no dist/' : 'dist/ was older than src/'})` };
  }
  return { ...tsx, why: state === 'missing' ? 'no dist/server.js (npm run build)' : 'dist/ is older than src/ (npm run build)' };
}

/**
 * The reference server (bench/reference-server.ts), started the way `app` is: through tsx when the
 * app runs from its sources, else as plain JavaScript, compiled from the TypeScript source by the
 * same compiler that builds dist/ (one file, so its transpileModule is enough).
 */
export async function referenceCommand(app: ServerCommand): Promise<ServerCommand> {
  const source = 'bench/reference-server.ts';
  if (app.mode === 'tsx') {
    return { mode: 'tsx', args: ['--import', 'tsx', source], display: `node --import tsx ${source}`, why: 'like the app: from its sources through tsx' };
  }
  const { default: ts } = await import('typescript');
  const out = ts.transpileModule(readFileSync(path.join(REPO_ROOT, source), 'utf8'), {
    compilerOptions: { target: ts.ScriptTarget.ES2023, module: ts.ModuleKind.ESNext },
    fileName: source,
  });
  // Inside node_modules/ so that its `import 'fastify'` finds the same Fastify as the app's.
  const dir = path.join(REPO_ROOT, 'node_modules', '.cache', 'llm-app-bench');
  mkdirSync(dir, { recursive: true });
  const file = path.join(dir, 'reference-server.mjs');
  writeFileSync(file, out.outputText);
  const rel = path.relative(REPO_ROOT, file);
  return { mode: 'dist', args: [rel], display: `node ${rel}`, why: `like the app: compiled JavaScript (from ${source})` };
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

export interface ServerHandle {
  readonly pid: number;
  readonly baseUrl: string;
  /** Milliseconds from spawn to the first 200 on /health. */
  readonly startupMs: number;
  /** The last lines of its stdout and stderr. */
  output(): string;
  /** Log lines at warn or above since start (the server runs with LOG_LEVEL=warn). */
  warnings(): string[];
  memory(): { rssMb: number | null; peakRssMb: number | null };
  /** Starts measuring CPU use; call the result to read it. */
  cpu(): () => CpuUse;
  health(): Promise<Record<string, unknown>>;
  stop(): Promise<void>;
}

function readProcStatusKb(pid: number, field: string): number | null {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const m = new RegExp(`^${field}:\\s+(\\d+)\\s+kB`, 'm').exec(status);
    return m ? Number(m[1]) : null;
  } catch {
    return null; // not Linux, or the process is gone
  }
}

/** Clock ticks per second of /proc/<pid>/stat and /proc/stat: 100 on every Linux this runs on. */
const CLK_TCK = 100;

/** CPU seconds a process has used (user + system, all threads), or null off Linux. */
function processCpuSeconds(pid: number): number | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name (which may contain spaces) start at state (field 3).
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
  } catch {
    return null;
  }
}

/** Busy and total CPU seconds of the whole machine (all cores), or null off Linux. */
function machineCpuSeconds(): { busy: number; total: number } | null {
  try {
    const line = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0]!;
    const v = line.trim().split(/\s+/).slice(1).map(Number);
    const total = v.slice(0, 8).reduce((a, b) => a + b, 0); // user..steal; guest is inside user
    const idle = (v[3] ?? 0) + (v[4] ?? 0); // idle + iowait
    return { busy: (total - idle) / CLK_TCK, total: total / CLK_TCK };
  } catch {
    return null;
  }
}

/** Processes whose CPU use is reported on their own (the database and Redis servers on this machine). */
const WATCHED_COMMANDS = ['postgres', 'redis-server'];

/** CPU seconds used so far by all processes of each watched command name (Linux only). */
function cpuSecondsByCommand(): Record<string, number> {
  const out: Record<string, number> = {};
  let pids: string[];
  try {
    pids = readdirSync('/proc').filter((d) => /^\d+$/.test(d));
  } catch {
    return out;
  }
  for (const pid of pids) {
    let stat: string;
    try {
      stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    } catch {
      continue; // exited meanwhile
    }
    const comm = stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'));
    if (!WATCHED_COMMANDS.includes(comm)) continue;
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    out[comm] = (out[comm] ?? 0) + (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
  }
  return out;
}

export interface CpuUse {
  /** CPU of the server process during the measurement, in % of one core. */
  serverCorePct: number | null;
  /** CPU of this process (autocannon), in % of one core. */
  loadGeneratorCorePct: number;
  /** Everything else (database, Redis, any other process), in % of one core. */
  othersCorePct: number | null;
  /** The whole machine, in % of all its cores. */
  machineBusyPct: number | null;
  /**
   * Part of "others": every process named postgres or redis-server on this machine, in % of one
   * core (including the work they do for anything else that uses them meanwhile).
   */
  byCommand: Record<string, number>;
}

function cpuMeter(serverPid: number): () => CpuUse {
  const wall0 = performance.now();
  const server0 = processCpuSeconds(serverPid);
  const self0 = process.cpuUsage();
  const machine0 = machineCpuSeconds();
  const commands0 = cpuSecondsByCommand();
  return () => {
    const commands1 = cpuSecondsByCommand();
    const wallS = (performance.now() - wall0) / 1000;
    const server1 = processCpuSeconds(serverPid);
    const self = process.cpuUsage(self0);
    const machine1 = machineCpuSeconds();
    const pct = (s: number) => Math.round((s / wallS) * 1000) / 10;
    const serverS = server0 !== null && server1 !== null ? server1 - server0 : null;
    const selfS = (self.user + self.system) / 1e6;
    const busyS = machine0 && machine1 ? machine1.busy - machine0.busy : null;
    const totalS = machine0 && machine1 ? machine1.total - machine0.total : null;
    return {
      serverCorePct: serverS === null ? null : pct(serverS),
      loadGeneratorCorePct: pct(selfS),
      othersCorePct: busyS === null || serverS === null ? null : Math.max(0, pct(busyS - serverS - selfS)),
      machineBusyPct: busyS === null || !totalS ? null : Math.round((busyS / totalS) * 1000) / 10,
      byCommand: Object.fromEntries(
        Object.entries(commands1).map(([name, secs]) => [name, Math.max(0, pct(secs - (commands0[name] ?? 0)))]),
      ),
    };
  };
}

const mb = (kb: number | null) => (kb === null ? null : Math.round(kb / 102.4) / 10);

export async function startServer(cmd: ServerCommand, env: Record<string, string>): Promise<ServerHandle> {
  installCleanup();
  const port = await freePort();
  const childEnv: Record<string, string> = {
    // Only what the server needs: nothing leaks in from the shell running the benchmark.
    PATH: process.env.PATH ?? '/usr/bin:/bin',
    ...(process.env.HOME ? { HOME: process.env.HOME } : {}),
    ...(process.env.TMPDIR ? { TMPDIR: process.env.TMPDIR } : {}),
    HOST: '127.0.0.1',
    PORT: String(port),
    ...env,
  };
  const started = performance.now();
  const child = spawn(process.execPath, cmd.args, { cwd: REPO_ROOT, env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  void exited.then(() => children.delete(child));

  let tail = '';
  let partial = '';
  const warnings: string[] = [];
  child.stdout.setEncoding('utf8').on('data', (chunk: string) => {
    tail = (tail + chunk).slice(-8_000);
    const lines = (partial + chunk).split('\n');
    partial = lines.pop() ?? '';
    for (const line of lines) {
      // pino's JSON lines: 40 is warn, 50 error, 60 fatal.
      const m = /"level":(\d+)/.exec(line);
      if (m && Number(m[1]) >= 40 && warnings.length < 100) warnings.push(line.slice(0, 500));
    }
  });
  child.stderr.setEncoding('utf8').on('data', (chunk: string) => {
    tail = (tail + chunk).slice(-8_000);
  });

  const baseUrl = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + SERVER_START_TIMEOUT_MS;
  let startupMs: number | null = null;
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) break;
    try {
      const res = await fetch(`${baseUrl}/health`, { signal: AbortSignal.timeout(2_000) });
      await res.arrayBuffer();
      if (res.status === 200) {
        startupMs = Math.round(performance.now() - started);
        break;
      }
    } catch {
      // not listening yet
    }
    await sleep(50);
  }
  const handle: ServerHandle = {
    pid: child.pid!,
    baseUrl,
    startupMs: startupMs ?? -1,
    output: () => tail,
    warnings: () => [...warnings],
    memory: () => ({ rssMb: mb(readProcStatusKb(child.pid!, 'VmRSS')), peakRssMb: mb(readProcStatusKb(child.pid!, 'VmHWM')) }),
    cpu: () => cpuMeter(child.pid!),
    async health() {
      const res = await fetch(`${baseUrl}/health`, { signal: AbortSignal.timeout(5_000) });
      return (await res.json()) as Record<string, unknown>;
    },
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), SERVER_STOP_TIMEOUT_MS);
      await exited;
      clearTimeout(timer);
    },
  };
  if (startupMs === null) {
    const why = child.exitCode !== null || child.signalCode !== null ? `exited (${child.exitCode ?? child.signalCode})` : 'timed out';
    await handle.stop();
    throw new Error(`server did not answer 200 on /health: ${why}\n--- server output ---\n${tail}`);
  }
  return handle;
}

// ---------------------------------------------------------------------------------------------
// Load

export interface RequestSpec {
  method?: 'GET';
  path: string;
  headers?: Record<string, string>;
  /**
   * Called as each request is built (once per request sent): headers added to `headers` for that
   * request only, e.g. a different user each time.
   */
  headersPerRequest?: () => Record<string, string>;
}

export interface LoadOptions {
  connections: number;
  /** Seconds of load. Without it, `amount` requests in all. */
  durationS?: number;
  /** Exactly this many requests in all (over every connection), then stop. */
  amount?: number;
  /** Requests per second over all connections (autocannon's overallRate); unset: as fast as answered. */
  overallRate?: number;
  /** With `amount`: a run still going after this many seconds is stopped and marked `overran`. */
  timeLimitS?: number;
}

export interface Measurement {
  /** autocannon's mean of the per-second request counts (every response, whatever its status). */
  requestsPerSecond: { mean: number; stddev: number; min: number; max: number };
  responses: number;
  durationS: number;
  /**
   * Every response's latency, from autocannon's own timer (process.hrtime, per response),
   * in microseconds. autocannon's latency histogram stores whole milliseconds, too coarse here.
   */
  latencyUs: { mean: number; p50: number; p90: number; p99: number; p999: number; max: number };
  /** autocannon's histogram figures (whole milliseconds), for comparison. */
  autocannonLatencyMs: { p50: number; p99: number; mean: number };
  status: { '2xx': number; '429': number; otherNon2xx: number; byCode: Record<string, number> };
  errors: number;
  timeouts: number;
  /** The run was stopped by the harness because it did not end on time. */
  overran: boolean;
}

/** Float64Array that grows: one slot per response, no per-response allocation. */
class Samples {
  private data = new Float64Array(1 << 16);
  private n = 0;
  add(v: number): void {
    if (this.n === this.data.length) {
      const next = new Float64Array(this.data.length * 2);
      next.set(this.data);
      this.data = next;
    }
    this.data[this.n++] = v;
  }
  summary(): Measurement['latencyUs'] {
    const sorted = this.data.subarray(0, this.n).sort();
    const n = sorted.length;
    if (n === 0) return { mean: 0, p50: 0, p90: 0, p99: 0, p999: 0, max: 0 };
    // Nearest rank: the smallest value with at least p% of the samples at or below it.
    const at = (p: number) => Math.round(sorted[Math.min(n - 1, Math.max(0, Math.ceil((p / 100) * n) - 1))]!);
    let sum = 0;
    for (let i = 0; i < n; i++) sum += sorted[i]!;
    return { mean: Math.round(sum / n), p50: at(50), p90: at(90), p99: at(99), p999: at(99.9), max: Math.round(sorted[n - 1]!) };
  }
}

export async function load(baseUrl: string, req: RequestSpec, opts: LoadOptions): Promise<Measurement> {
  const samples = new Samples();
  let overran = false;
  const perRequest = req.headersPerRequest;
  // autocannon calls setupRequest once for every request it sends (the first one of each
  // connection included), so each call is one request on the wire.
  const requests = perRequest
    ? [{ setupRequest: (r: autocannon.Request) => ({ ...r, headers: { ...r.headers, ...perRequest() } }) }]
    : undefined;
  const limitS = opts.durationS ?? opts.timeLimitS ?? 60;
  const result = await new Promise<autocannon.Result>((resolve, reject) => {
    const instance = autocannon(
      {
        url: baseUrl + req.path,
        method: req.method ?? 'GET',
        headers: req.headers ?? {},
        // autocannon refuses more connections than requests.
        connections: opts.amount ? Math.min(opts.connections, opts.amount) : opts.connections,
        ...(opts.amount ? { amount: opts.amount } : { duration: opts.durationS ?? limitS }),
        ...(opts.overallRate ? { overallRate: opts.overallRate } : {}),
        ...(requests ? { requests } : {}),
        timeout: REQUEST_TIMEOUT_S,
      },
      (err, res) => {
        clearTimeout(guard);
        if (err) reject(err instanceof Error ? err : new Error(String(err)));
        else resolve(res);
      },
    );
    // responseTime: milliseconds as a float, from process.hrtime around each request.
    instance.on('response', (_client, _status, _bytes, responseTime) => samples.add(responseTime * 1000));
    const guard = setTimeout(
      () => {
        overran = true;
        instance.stop();
      },
      opts.amount ? limitS * 1000 : limitS * 1000 + RUN_GRACE_MS,
    );
  });
  const byCode: Record<string, number> = {};
  for (const [code, stat] of Object.entries(result.statusCodeStats ?? {})) byCode[code] = stat.count ?? 0;
  const count2xx = result['2xx'];
  const count429 = byCode['429'] ?? 0;
  return {
    requestsPerSecond: {
      mean: result.requests.mean,
      stddev: result.requests.stddev,
      min: result.requests.min,
      max: result.requests.max,
    },
    responses: Object.values(byCode).reduce((a, b) => a + b, 0),
    durationS: result.duration,
    latencyUs: samples.summary(),
    autocannonLatencyMs: { p50: result.latency.p50, p99: result.latency.p99, mean: result.latency.mean },
    status: { '2xx': count2xx, '429': count429, otherNon2xx: result.non2xx - count429, byCode },
    errors: result.errors,
    timeouts: result.timeouts,
    overran,
  };
}

// ---------------------------------------------------------------------------------------------
// Redis command counts (INFO commandstats): how many calls a case made per request

export interface RedisCounter {
  snapshot(): Promise<Record<string, number>>;
  close(): Promise<void>;
}

export async function redisCounter(url: string): Promise<RedisCounter> {
  const client = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1, connectTimeout: 3_000, enableOfflineQueue: false });
  client.on('error', () => undefined);
  try {
    await client.connect();
    await client.ping();
  } catch (err) {
    client.disconnect();
    throw new Error(`Redis at ${redact(url)} does not answer: ${(err as Error).message}`);
  }
  return {
    async snapshot() {
      const text = await client.info('commandstats');
      const calls: Record<string, number> = {};
      for (const m of text.matchAll(/^cmdstat_([^:]+):calls=(\d+)/gm)) calls[m[1]!] = Number(m[2]);
      return calls;
    },
    async close() {
      await client.quit().catch(() => client.disconnect());
    },
  };
}

function diffCounts(before: Record<string, number>, after: Record<string, number>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [k, v] of Object.entries(after)) {
    const d = v - (before[k] ?? 0);
    if (d > 0) out[k] = d;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Cases and the run

/** What a case's own phases get. */
export interface CaseContext {
  server: ServerHandle;
  opts: BenchOptions;
  /** Progress on stderr, indented under the case. */
  log: (line: string) => void;
}

/** What a phase found wrong (the case then counts as failed) or worth saying. */
export interface PhaseOutcome {
  problems?: string[];
  notes?: string[];
}

/** Another load measured in the same case at the same time: one more row, under the case's own. */
export interface MeasuredPart {
  label: string;
  measurement: Measurement;
  /** Sent at a fixed rate: its req/s is that rate, so it gets no ratio to the reference. */
  fixedRate?: boolean;
}

export interface CaseRun extends PhaseOutcome {
  /** The case's row. */
  measurement: Measurement;
  parts?: MeasuredPart[];
}

export interface BenchCase {
  /** Short id: names the reference and the case in the JSON. */
  id: string;
  title: string;
  /** The app (default), or the bare Fastify reference server (bench/reference-server.ts). */
  program?: 'app' | 'reference';
  /** Server environment of this case, on top of the benchmark's common environment. */
  env: Record<string, string>;
  /** This case's database and Redis, asked for each time it runs (default: the run's). */
  backends?: () => Backends;
  /** What the default warm-up and measurement send; a function when it depends on data made at run time. */
  request: RequestSpec | (() => RequestSpec);
  /** The measured requests go at a fixed rate: no req/s ratio to the reference. */
  fixedRate?: boolean;
  /**
   * Runs once against the fresh server, before the warm-up. Returns what is wrong with the setup
   * (empty when all is well): the case is then not measured.
   */
  probe?: (server: ServerHandle) => Promise<string[]>;
  /** Instead of the default warm-up (`request` for --warmup seconds); never counted. */
  warmup?: (ctx: CaseContext) => Promise<PhaseOutcome>;
  /** Instead of the default measurement (`request` for --duration seconds). CPU and Redis calls are counted around it. */
  measure?: (ctx: CaseContext) => Promise<CaseRun>;
  /** Looks at the measurement; returns what shows the setup was wrong (never a speed target). */
  check?: (m: Measurement, run: CaseRun) => string[];
}

export interface PartResult extends MeasuredPart {
  fixedRate: boolean;
  ratioToReference: number | null;
  p99RatioToReference: number | null;
}

export interface CaseResult {
  id: string;
  title: string;
  program: 'app' | 'reference';
  command: string;
  env: Record<string, string>;
  request: { method: string; path: string; headersPerRequest: boolean };
  startupMs: number | null;
  limiter: string | null;
  measurement: Measurement | null;
  fixedRate: boolean;
  /** req/s over the reference's req/s in the same round. */
  ratioToReference: number | null;
  /** p99 over the reference's p99 in the same round. */
  p99RatioToReference: number | null;
  parts: PartResult[];
  /**
   * Only in the summary of several rounds: the lowest and highest req/s, every round's ratios, and
   * the worst of every round where a target reads one: the highest RSS, and the 429s and errors
   * (connection errors, timeouts, other non-2xx) of all rounds together.
   */
  rounds?: {
    count: number;
    requestsPerSecondMin: number;
    requestsPerSecondMax: number;
    ratios: number[];
    p99Ratios: number[];
    rssMbMax: number | null;
    status429: number;
    errors: number;
  };
  rssMb: number | null;
  peakRssMb: number | null;
  redisCalls: Record<string, number> | null;
  cpu: CpuUse | null;
  serverWarnings: string[];
  problems: string[];
  notes: string[];
}

export interface ResolvedBackends {
  backends: Backends;
  /** Where they came from, when that needs saying (printed and kept in the JSON). */
  notes: string[];
}

export interface BenchmarkSpec {
  name: string;
  title: string;
  /** Environment of every case's server (the case adds its own). */
  commonEnv: Record<string, string>;
  cases: BenchCase[];
  /** Id of the case every other is compared with. */
  referenceId: string;
  /** Redis commands that are round trips from the app (not the ones a script runs inside Redis). */
  redisRoundTrips?: string[];
  /** More lines for --help (environment variables of this benchmark). */
  help?: string[];
  /** Replaces the description of where the database and Redis come from in --help. */
  envHelp?: string;
  /** Where the database and Redis come from (default: resolveBackends()). */
  backends?: () => Promise<ResolvedBackends>;
  /** `--server auto` builds dist/ when it is missing or older than src/ (default: the sources through tsx). */
  buildIfStale?: boolean;
  /**
   * Runs once the database is migrated and seeded, before any case: creates what the cases need.
   * Returns lines to print. A throw stops the run (a setup failure).
   */
  prepare?: (backends: Backends) => Promise<string[]>;
  /** The first cell of a case's row (default: "<id>. <title>"). */
  rowLabel?: (r: CaseResult) => string;
  /** Printed after the table. */
  footer?: (results: CaseResult[], backends: Backends, opts: BenchOptions) => string[];
}

function gitInfo(): { commit: string | null; dirty: boolean | null } {
  try {
    const commit = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: REPO_ROOT, encoding: 'utf8' }).trim();
    const dirty = execFileSync('git', ['status', '--porcelain', '--', 'src'], { cwd: REPO_ROOT, encoding: 'utf8' }).trim() !== '';
    return { commit, dirty };
  } catch {
    return { commit: null, dirty: null };
  }
}

/** Progress: on stderr, so that stdout carries only the results. */
export function log(line: string): void {
  process.stderr.write(`${line}\n`);
}

async function waitForLimiter(server: ServerHandle, wanted: string, timeoutMs: number): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  let mode = '';
  do {
    mode = String((await server.health()).rateLimiter);
    if (mode === wanted) return mode;
    await sleep(100);
  } while (Date.now() < deadline);
  return mode;
}

/** What shows that a load did not run as it should (labelled when it is a part). */
function loadProblems(m: Measurement, label: string): string[] {
  const who = label ? `${label}: ` : '';
  const out: string[] = [];
  if (m.overran) out.push(`${who}the load did not end in time and was stopped`);
  if (m.responses === 0) out.push(`${who}no response at all (${m.errors} errors, ${m.timeouts} timeouts)`);
  return out;
}

interface Commands {
  app: ServerCommand;
  reference: ServerCommand | null;
}

async function runCase(
  c: BenchCase,
  spec: BenchmarkSpec,
  commands: Commands,
  runBackends: Backends,
  opts: BenchOptions,
  redis: RedisCounter | null,
): Promise<CaseResult> {
  const program = c.program ?? 'app';
  const cmd = program === 'reference' ? commands.reference : commands.app;
  const backends = c.backends?.() ?? runBackends;
  const request = typeof c.request === 'function' ? c.request() : c.request;
  const result: CaseResult = {
    id: c.id,
    title: c.title,
    program,
    command: cmd?.display ?? '',
    env: c.env,
    request: { method: request.method ?? 'GET', path: request.path, headersPerRequest: Boolean(request.headersPerRequest) },
    startupMs: null,
    limiter: null,
    measurement: null,
    fixedRate: c.fixedRate ?? false,
    ratioToReference: null,
    p99RatioToReference: null,
    parts: [],
    rssMb: null,
    peakRssMb: null,
    redisCalls: null,
    cpu: null,
    serverWarnings: [],
    problems: [],
    notes: [],
  };
  if (!cmd) {
    result.problems.push('no command for the reference server');
    return result;
  }
  // The reference server has no limiter; the app's must be the one its backends call for.
  const expectedLimiter = program === 'app' ? (backends.redisUrl ? 'redis' : 'memory') : null;
  let server: ServerHandle;
  try {
    server = await startServer(cmd, program === 'app' ? serverEnv(spec, c, backends) : { ...spec.commonEnv, ...c.env });
  } catch (err) {
    result.problems.push((err as Error).message);
    return result;
  }
  log(`    server pid ${server.pid}, answering after ${server.startupMs} ms`);
  const ctx: CaseContext = { server, opts, log: (line) => log(`    ${line}`) };
  try {
    result.startupMs = server.startupMs;
    result.problems.push(...((await c.probe?.(server)) ?? []));
    if (expectedLimiter) {
      // The server's Redis client connects in the background: a request that comes before it is
      // connected is limited in memory and the limiter reports "degraded" until its next probe.
      const mode = await waitForLimiter(server, expectedLimiter, 5_000);
      if (mode !== expectedLimiter) result.problems.push(`the server's limiter is "${mode}", expected "${expectedLimiter}"`);
    }
    if (result.problems.length > 0) return result;

    const warm = c.warmup
      ? await c.warmup(ctx)
      : opts.warmupS > 0
        ? (await load(server.baseUrl, request, { connections: opts.connections, durationS: opts.warmupS }), {})
        : {};
    result.notes.push(...(warm.notes ?? []));
    result.problems.push(...(warm.problems ?? []));
    if (result.problems.length > 0) return result;

    const before = redis ? await redis.snapshot() : null;
    const cpu = server.cpu();
    const run: CaseRun = c.measure
      ? await c.measure(ctx)
      : { measurement: await load(server.baseUrl, request, { connections: opts.connections, durationS: opts.durationS }) };
    result.cpu = cpu();
    const after = redis ? await redis.snapshot() : null;
    const mem = server.memory();
    const m = run.measurement;
    result.measurement = m;
    result.parts = (run.parts ?? []).map((p) => ({ ...p, fixedRate: p.fixedRate ?? false, ratioToReference: null, p99RatioToReference: null }));
    result.rssMb = mem.rssMb;
    result.peakRssMb = mem.peakRssMb;
    if (before && after) result.redisCalls = diffCounts(before, after);
    result.notes.push(...(run.notes ?? []));
    result.problems.push(...(run.problems ?? []));

    if (expectedLimiter) {
      result.limiter = String((await server.health()).rateLimiter);
      if (result.limiter !== expectedLimiter) {
        result.notes.push(`after the run the server's limiter was "${result.limiter}" (expected "${expectedLimiter}"): see its warnings`);
      }
    }
    result.problems.push(...loadProblems(m, ''), ...result.parts.flatMap((p) => loadProblems(p.measurement, p.label)));
    result.problems.push(...(c.check?.(m, run) ?? []));
  } catch (err) {
    result.problems.push((err as Error).message);
  } finally {
    result.serverWarnings = server.warnings();
    await server.stop();
  }
  return result;
}

function serverEnv(spec: BenchmarkSpec, c: BenchCase, backends: Backends): Record<string, string> {
  return {
    ...spec.commonEnv,
    ...(backends.database.kind === 'postgres' ? { DATABASE_URL: backends.database.url } : { DATA_DIR: backends.database.dataDir }),
    ...(backends.redisUrl ? { REDIS_URL: backends.redisUrl } : {}),
    ...c.env,
  };
}

const ratio = (value: number, reference: number) => (reference > 0 ? Math.round((value / reference) * 1000) / 1000 : null);

/** Fills in every row's ratios to the reference of the same round. */
export function applyRatios(results: CaseResult[], referenceId: string): void {
  const ref = results.find((r) => r.id === referenceId)?.measurement;
  if (!ref) return;
  const rows: { measurement: Measurement | null; fixedRate: boolean; ratioToReference: number | null; p99RatioToReference: number | null }[] = [
    ...results,
    ...results.flatMap((r) => r.parts),
  ];
  for (const row of rows) {
    if (!row.measurement) continue;
    row.ratioToReference = row.fixedRate ? null : ratio(row.measurement.requestsPerSecond.mean, ref.requestsPerSecond.mean);
    row.p99RatioToReference = ratio(row.measurement.latencyUs.p99, ref.latencyUs.p99);
  }
}

// ---------------------------------------------------------------------------------------------
// Output

const fmtInt = (n: number) => Math.round(n).toLocaleString('en-US');
const fmtRatio = (r: number | null) => (r === null ? '' : `${r.toFixed(2)}x`);

export function table(results: CaseResult[], roundTrips: string[] | null, rowLabel: (r: CaseResult) => string = (r) => `${r.id}. ${r.title}`): string {
  const withRange = results.some((r) => r.rounds !== undefined);
  const head = [
    'case',
    'req/s',
    ...(withRange ? ['range'] : []),
    'vs ref',
    'p50 µs',
    'p99 µs',
    'p99 vs ref',
    '2xx',
    '429',
    'other',
    'errors',
    'RSS MB',
    'server CPU',
    'rest CPU',
  ];
  if (roundTrips) head.push('Redis calls/req');
  const measurementCells = (m: Measurement, fixedRate: boolean, rps: number | null, p99: number | null) => [
    fmtInt(m.requestsPerSecond.mean),
    ...(withRange ? [''] : []),
    fixedRate ? 'fixed' : fmtRatio(rps),
    fmtInt(m.latencyUs.p50),
    fmtInt(m.latencyUs.p99),
    fmtRatio(p99),
    fmtInt(m.status['2xx']),
    fmtInt(m.status['429']),
    fmtInt(m.status.otherNon2xx),
    fmtInt(m.errors),
  ];
  const rows: string[][] = [];
  for (const r of results) {
    const m = r.measurement;
    if (!m) {
      rows.push([rowLabel(r), 'FAILED', ...head.slice(2).map(() => '')]);
      continue;
    }
    const pct = (v: number | null | undefined) => (v === null || v === undefined ? 'n/a' : `${v.toFixed(0)}%`);
    const row = [
      rowLabel(r),
      ...measurementCells(m, r.fixedRate, r.ratioToReference, r.p99RatioToReference),
      r.rssMb === null ? 'n/a' : r.rssMb.toFixed(0),
      pct(r.cpu?.serverCorePct),
      pct(r.cpu?.othersCorePct),
    ];
    if (withRange && r.rounds) row[2] = `${fmtInt(r.rounds.requestsPerSecondMin)}–${fmtInt(r.rounds.requestsPerSecondMax)}`;
    if (roundTrips) {
      const calls = roundTrips.reduce((sum, cmd) => sum + (r.redisCalls?.[cmd] ?? 0), 0);
      const responses = m.responses + r.parts.reduce((sum, p) => sum + p.measurement.responses, 0);
      row.push(responses > 0 && r.redisCalls ? (calls / responses).toFixed(3) : 'n/a');
    }
    rows.push(row);
    // A part shares the case's server: its RSS, CPU and Redis calls are the case's.
    for (const p of r.parts) {
      const cells = [`  ↳ ${p.label}`, ...measurementCells(p.measurement, p.fixedRate, p.ratioToReference, p.p99RatioToReference)];
      rows.push([...cells, ...head.slice(cells.length).map(() => '')]);
    }
  }
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)));
  const line = (cells: string[]) =>
    `| ${cells.map((cell, i) => (i === 0 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))).join(' | ')} |`;
  const sep = `| ${widths.map((w, i) => (i === 0 ? '-'.repeat(w) : `${'-'.repeat(w - 1)}:`)).join(' | ')} |`;
  return [line(head), sep, ...rows.map(line)].join('\n');
}

function stamp(d: Date): string {
  return d.toISOString().replace(/\.\d+Z$/, 'Z').replace(/:/g, '-');
}

function median(values: number[]): number {
  const v = [...values].sort((a, b) => a - b);
  const mid = Math.floor(v.length / 2);
  return v.length % 2 === 1 ? v[mid]! : (v[mid - 1]! + v[mid]!) / 2;
}

/**
 * One row per case. With one round, that round's result. With several, the round whose req/s is
 * the median (the lower of the two middle ones for an even count), its ratios replaced by the
 * medians of all rounds' ratios, and every round's problems.
 */
export function summarize(cases: Pick<BenchCase, 'id'>[], rounds: CaseResult[][]): CaseResult[] {
  const out: CaseResult[] = [];
  for (const c of cases) {
    const all = rounds.map((round) => round.find((r) => r.id === c.id)).filter((r): r is CaseResult => r !== undefined);
    if (all.length === 0) continue;
    if (rounds.length === 1) {
      out.push(all[0]!);
      continue;
    }
    const measured = all.filter((r) => r.measurement !== null).sort((a, b) => a.measurement!.requestsPerSecond.mean - b.measurement!.requestsPerSecond.mean);
    const pick = measured[Math.floor((measured.length - 1) / 2)] ?? all[0]!;
    const rps = measured.map((r) => r.measurement!.requestsPerSecond.mean);
    const ratios = all.map((r) => r.ratioToReference).filter((x): x is number => x !== null);
    const p99Ratios = all.map((r) => r.p99RatioToReference).filter((x): x is number => x !== null);
    const rss = all.map((r) => r.rssMb).filter((x): x is number => x !== null);
    const sum = (f: (m: Measurement) => number) => measured.reduce((n, r) => n + f(r.measurement!), 0);
    out.push({
      ...pick,
      ratioToReference: ratios.length > 0 ? Math.round(median(ratios) * 1000) / 1000 : null,
      p99RatioToReference: p99Ratios.length > 0 ? Math.round(median(p99Ratios) * 1000) / 1000 : null,
      rounds: {
        count: all.length,
        requestsPerSecondMin: rps.length > 0 ? Math.min(...rps) : 0,
        requestsPerSecondMax: rps.length > 0 ? Math.max(...rps) : 0,
        ratios,
        p99Ratios,
        rssMbMax: rss.length > 0 ? Math.max(...rss) : null,
        status429: sum((m) => m.status['429']),
        errors: sum((m) => m.errors + m.status.otherNon2xx),
      },
      problems: all.flatMap((r, i) => r.problems.map((p) => `round ${i + 1}: ${p}`)),
    });
  }
  return out;
}

/** Runs every case, prints the table, writes the JSON; resolves with the process exit code. */
export async function runBenchmark(spec: BenchmarkSpec, argv = process.argv.slice(2)): Promise<number> {
  installCleanup();
  const opts = parseOptions(argv, spec.help, spec.buildIfStale, spec.envHelp);
  if (opts.only) {
    const unknown = opts.only.filter((id) => !spec.cases.some((c) => c.id === id));
    if (unknown.length > 0) {
      log(`--only: no case ${unknown.join(', ')} (cases: ${spec.cases.map((c) => c.id).join(', ')})`);
      return 2;
    }
    const wanted = new Set([...opts.only, spec.referenceId]);
    spec = { ...spec, cases: spec.cases.filter((c) => wanted.has(c.id)) };
  }
  const startedAt = new Date();
  log(`${spec.title}`);

  let commands: Commands;
  let resolved: ResolvedBackends;
  try {
    const app = serverCommand(opts.server, spec.buildIfStale);
    commands = { app, reference: spec.cases.some((c) => c.program === 'reference') ? await referenceCommand(app) : null };
    resolved = spec.backends ? await spec.backends() : { backends: resolveBackends(), notes: [] };
  } catch (err) {
    log(`FAILED: ${(err as Error).message}`);
    cleanupSync();
    return 1;
  }
  const backends = resolved.backends;
  const described = describeBackends(backends);
  const roundTrips = backends.redisUrl ? (spec.redisRoundTrips ?? null) : null;

  log(`  server:    ${commands.app.display} (${commands.app.why})`);
  if (commands.reference) log(`  reference: ${commands.reference.display} (${commands.reference.why})`);
  log(`  database:  ${described.database}`);
  log(`  redis:     ${described.redis}`);
  for (const note of resolved.notes) log(`             ${note}`);
  log(`  load:      autocannon, ${opts.connections} connections, ${opts.warmupS} s warm-up + ${opts.durationS} s per case`);
  const loadBefore = os.loadavg();
  if (loadBefore[0]! > 0.5) {
    log(`  WARNING:   the machine is busy before the run (load average ${loadBefore.map((l) => l.toFixed(2)).join(' ')}): expect lower, noisier numbers`);
  }

  let redis: RedisCounter | null = null;
  const rounds: CaseResult[][] = [];
  let setupError: string | null = null;
  let prepared: string[] = [];
  try {
    if (backends.redisUrl) redis = await redisCounter(backends.redisUrl);
    // Migrations and seed data are applied once, before any case, so every case's server starts
    // the same way against the same database.
    const first = spec.cases.find((c) => (c.program ?? 'app') === 'app' && !c.backends);
    if (first) {
      log('  preparing the database (migrations, seed) ...');
      const prep = await startServer(commands.app, serverEnv(spec, first, backends));
      log(`  ready in ${prep.startupMs} ms`);
      await prep.stop();
    }
    if (spec.prepare) {
      prepared = await spec.prepare(backends);
      for (const line of prepared) log(`  ${line}`);
    }

    for (let round = 1; round <= opts.rounds; round++) {
      if (opts.rounds > 1) log(`  round ${round} of ${opts.rounds}`);
      const results: CaseResult[] = [];
      rounds.push(results);
      for (const c of spec.cases) {
        log(`  case ${c.id}: ${c.title} ...`);
        const r = await runCase(c, spec, commands, backends, opts, redis);
        results.push(r);
        if (r.measurement) {
          const cpu = r.cpu;
          log(
            `    ${fmtInt(r.measurement.requestsPerSecond.mean)} req/s, p99 ${fmtInt(r.measurement.latencyUs.p99)} µs; CPU (% of a core): ` +
              `server ${cpu?.serverCorePct ?? 'n/a'}, autocannon ${cpu?.loadGeneratorCorePct ?? 'n/a'}, rest ${cpu?.othersCorePct ?? 'n/a'}` +
              Object.entries(cpu?.byCommand ?? {})
                .map(([name, v]) => `, of which ${name} ${v}`)
                .join(''),
          );
        }
        for (const p of r.problems) log(`    PROBLEM: ${p}`);
        for (const n of r.notes) log(`    note: ${n}`);
      }
      applyRatios(results, spec.referenceId);
    }
  } catch (err) {
    setupError = (err as Error).message;
    log(`FAILED: ${setupError}`);
  } finally {
    await redis?.close();
  }
  const results = summarize(spec.cases, rounds);
  const finishedAt = new Date();
  const ok =
    setupError === null &&
    rounds.length === opts.rounds &&
    rounds.every((round) => round.length === spec.cases.length && round.every((r) => r.problems.length === 0));

  const cpus = os.cpus();
  const report = {
    benchmark: spec.name,
    title: spec.title,
    ok,
    setupError,
    startedAt: startedAt.toISOString(),
    finishedAt: finishedAt.toISOString(),
    machine: {
      cpus: cpus.length,
      cpuModel: cpus[0]?.model ?? null,
      memoryMb: Math.round(os.totalmem() / 1_048_576),
      platform: `${os.platform()} ${os.release()}`,
    },
    node: process.version,
    loadAverageBefore: loadBefore,
    loadAverageAfter: os.loadavg(),
    git: gitInfo(),
    options: opts,
    server: { command: commands.app.display, why: commands.app.why },
    reference: commands.reference ? { command: commands.reference.display, why: commands.reference.why } : undefined,
    database: described.database,
    redis: described.redis,
    backendNotes: resolved.notes,
    prepared,
    limiterBackend: backends.redisUrl ? 'redis' : 'memory',
    commonEnv: spec.commonEnv,
    referenceId: spec.referenceId,
    /** One row per case: the only round, or the median round (by req/s) of several. */
    cases: results,
    rounds: opts.rounds > 1 ? rounds : undefined,
  };

  mkdirSync(RESULTS_DIR, { recursive: true });
  const file = path.join(RESULTS_DIR, `${spec.name}-${stamp(startedAt)}.json`);
  writeFileSync(file, `${JSON.stringify(report, null, 2)}\n`);

  const out: string[] = [
    '',
    `${spec.title} — ${startedAt.toISOString()}`,
    `${cpus.length} x ${cpus[0]?.model ?? 'CPU'}, ${Math.round(os.totalmem() / 1_073_741_824)} GB, Node ${process.version}, ${commands.app.display}` +
      (commands.reference ? `; reference: ${commands.reference.display}` : ''),
    `database: ${described.database}; limiter: ${described.redis}`,
    `autocannon: ${opts.connections} connections, ${opts.warmupS} s warm-up, ${opts.durationS} s measured per case, a fresh server per case` +
      (opts.rounds > 1 ? `, ${opts.rounds} rounds (each row: the case's median round by req/s; vs ref: median of the rounds' ratios)` : '') +
      '; ' +
      `load average before: ${loadBefore.map((l) => l.toFixed(2)).join(' ')}`,
    '',
    table(results, roundTrips, spec.rowLabel),
    '',
    'req/s: mean of per-second counts, any status. vs ref: req/s over the reference\'s in the same run (fixed: sent at a fixed rate).',
    'p50/p99: every response, µs; p99 vs ref: over the reference\'s p99. other: non-2xx except 429. errors: connection errors and timeouts.',
    'RSS: the server at the end of its case. CPU: % of one core while measuring; rest = everything but the server and autocannon (database, Redis, other processes).',
    ...(roundTrips ? [`Redis calls/req: ${roundTrips.join(' + ')} per response, counted Redis-wide (INFO commandstats): other clients of the same Redis add to it.`] : []),
    ...(spec.footer?.(results, backends, opts) ?? []),
    `JSON: ${path.relative(REPO_ROOT, file)}`,
  ];
  process.stdout.write(`${out.join('\n')}\n`);
  if (!ok) {
    process.stderr.write('\nThe benchmark could not run as set up:\n');
    if (setupError) process.stderr.write(`  - ${setupError}\n`);
    for (const r of results) for (const p of r.problems) process.stderr.write(`  - case ${r.id}: ${p}\n`);
    for (const r of rounds.flat()) {
      if (r.problems.length > 0 && r.serverWarnings.length > 0) {
        process.stderr.write(`  server warnings of case ${r.id}:\n${r.serverWarnings.slice(0, 10).map((w) => `    ${w}`).join('\n')}\n`);
      }
    }
  }
  cleanupSync();
  return ok ? 0 : 1;
}
