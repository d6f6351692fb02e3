/**
 * Benchmark harness: real server processes on 127.0.0.1, load from autocannon (used as a
 * library, in this process), one fresh server per case, results as a table and a JSON file.
 *
 * A case file (bench/limiter.ts, ...) declares its cases and calls runBenchmark(). Everything a
 * case needs to differ in is its server environment, its request, and two optional checks that
 * say whether the setup was right (never whether it was fast enough: this is a measurement).
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
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
}

const USAGE = `Options:
  --duration N      seconds each case is measured (default 10)
  --warmup N        seconds of load before each measurement, not counted (default 1)
  --connections N   concurrent connections (default 50)
  --rounds N        run the whole sequence of cases N times and report each case's median
                    round (default 1; use 3 or 5 on a machine that is not idle)
  --quick           1 s per case and 0.5 s warm-up: proves the benchmark works (CI)
  --server MODE     auto (default): dist/server.js if it is newer than every file in src/,
                    else the sources through tsx; tsx; dist
Environment:
  BENCH_DATABASE_URL or DATABASE_URL   PostgreSQL (else the embedded PGlite in a temporary folder)
  BENCH_REDIS_URL or REDIS_URL         Redis (else the in-memory limiter)`;

export function parseOptions(argv: string[], extraHelp: string[] = []): BenchOptions {
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
        server: { type: 'string', default: 'auto' },
        help: { type: 'boolean', short: 'h', default: false },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n${[USAGE, ...extraHelp.map((l) => `  ${l}`)].join('\n')}\n`);
    process.exit(2);
  }
  if (values.help) {
    process.stdout.write(`${[USAGE, ...extraHelp.map((l) => `  ${l}`)].join('\n')}\n`);
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
    rounds: Math.round(num('rounds', values.rounds, 1, 1, 100)),
    server,
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

function makeTempDir(prefix: string): string {
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

function nonEmpty(v: string | undefined): string | undefined {
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

export function serverCommand(mode: BenchOptions['server']): ServerCommand {
  const tsx: ServerCommand = {
    mode: 'tsx',
    args: ['--import', 'tsx', 'src/server.ts'],
    display: 'node --import tsx src/server.ts',
    why: '',
  };
  const dist: ServerCommand = { mode: 'dist', args: ['dist/server.js'], display: 'node dist/server.js', why: '' };
  const distEntry = path.join(REPO_ROOT, 'dist', 'server.js');
  let distState: 'missing' | 'stale' | 'fresh' = 'missing';
  try {
    distState = statSync(distEntry).mtimeMs >= newestMtimeMs(path.join(REPO_ROOT, 'src')) ? 'fresh' : 'stale';
  } catch {
    distState = 'missing';
  }
  if (mode === 'tsx') return { ...tsx, why: 'asked for with --server tsx' };
  if (mode === 'dist') {
    if (distState === 'missing') throw new Error('--server dist: dist/server.js does not exist; run npm run build');
    return { ...dist, why: distState === 'fresh' ? 'asked for with --server dist' : 'asked for with --server dist (older than src/!)' };
  }
  if (distState === 'fresh') return { ...dist, why: 'dist/ is newer than every file in src/' };
  return { ...tsx, why: distState === 'missing' ? 'no dist/server.js (npm run build)' : 'dist/ is older than src/ (npm run build)' };
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

export async function load(baseUrl: string, req: RequestSpec, opts: { connections: number; durationS: number }): Promise<Measurement> {
  const samples = new Samples();
  let overran = false;
  const result = await new Promise<autocannon.Result>((resolve, reject) => {
    const instance = autocannon(
      {
        url: baseUrl + req.path,
        method: req.method ?? 'GET',
        headers: req.headers ?? {},
        connections: opts.connections,
        duration: opts.durationS,
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
    const guard = setTimeout(() => {
      overran = true;
      instance.stop();
    }, opts.durationS * 1000 + RUN_GRACE_MS);
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

export interface BenchCase {
  /** Short id used in the table and to name the reference ("a"). */
  id: string;
  title: string;
  /** Server environment of this case, on top of the benchmark's common environment. */
  env: Record<string, string>;
  request: RequestSpec;
  /**
   * Runs once against the fresh server, before the warm-up. Returns what is wrong with the setup
   * (empty when all is well): the case is then not measured.
   */
  probe?: (server: ServerHandle) => Promise<string[]>;
  /** Looks at the measurement; returns what shows the setup was wrong (never a speed target). */
  check?: (m: Measurement) => string[];
}

export interface CaseResult {
  id: string;
  title: string;
  env: Record<string, string>;
  request: { method: string; path: string };
  startupMs: number | null;
  limiter: string | null;
  measurement: Measurement | null;
  ratioToReference: number | null;
  /** Only in the summary of several rounds: the lowest and highest req/s, and how many rounds. */
  rounds?: { count: number; requestsPerSecondMin: number; requestsPerSecondMax: number; ratios: number[] };
  rssMb: number | null;
  peakRssMb: number | null;
  redisCalls: Record<string, number> | null;
  cpu: CpuUse | null;
  serverWarnings: string[];
  problems: string[];
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
  /** Printed after the table. */
  footer?: (results: CaseResult[], backends: Backends) => string[];
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

function log(line: string): void {
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

async function runCase(
  c: BenchCase,
  spec: BenchmarkSpec,
  cmd: ServerCommand,
  backends: Backends,
  opts: BenchOptions,
  redis: RedisCounter | null,
): Promise<CaseResult> {
  const result: CaseResult = {
    id: c.id,
    title: c.title,
    env: c.env,
    request: { method: c.request.method ?? 'GET', path: c.request.path },
    startupMs: null,
    limiter: null,
    measurement: null,
    ratioToReference: null,
    rssMb: null,
    peakRssMb: null,
    redisCalls: null,
    cpu: null,
    serverWarnings: [],
    problems: [],
    notes: [],
  };
  const expectedLimiter = backends.redisUrl ? 'redis' : 'memory';
  let server: ServerHandle;
  try {
    server = await startServer(cmd, serverEnv(spec, c, backends));
  } catch (err) {
    result.problems.push((err as Error).message);
    return result;
  }
  log(`    server pid ${server.pid}, answering after ${server.startupMs} ms`);
  try {
    result.startupMs = server.startupMs;
    result.problems.push(...((await c.probe?.(server)) ?? []));
    // The server's Redis client connects in the background: a request that comes before it is
    // connected is limited in memory and the limiter reports "degraded" until its next probe.
    const mode = await waitForLimiter(server, expectedLimiter, 5_000);
    if (mode !== expectedLimiter) result.problems.push(`the server's limiter is "${mode}", expected "${expectedLimiter}"`);
    if (result.problems.length > 0) return result;

    if (opts.warmupS > 0) await load(server.baseUrl, c.request, { connections: opts.connections, durationS: opts.warmupS });
    const before = redis ? await redis.snapshot() : null;
    const cpu = server.cpu();
    const m = await load(server.baseUrl, c.request, { connections: opts.connections, durationS: opts.durationS });
    result.cpu = cpu();
    const after = redis ? await redis.snapshot() : null;
    const mem = server.memory();
    result.measurement = m;
    result.rssMb = mem.rssMb;
    result.peakRssMb = mem.peakRssMb;
    if (before && after) result.redisCalls = diffCounts(before, after);

    result.limiter = String((await server.health()).rateLimiter);
    if (result.limiter !== expectedLimiter) {
      result.notes.push(`after the run the server's limiter was "${result.limiter}" (expected "${expectedLimiter}"): see its warnings`);
    }
    if (m.overran) result.problems.push(`the run did not end within ${RUN_GRACE_MS / 1000} s after its duration`);
    if (m.responses === 0) result.problems.push(`no response at all (${m.errors} errors, ${m.timeouts} timeouts)`);
    result.problems.push(...(c.check?.(m) ?? []));
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

// ---------------------------------------------------------------------------------------------
// Output

const fmtInt = (n: number) => Math.round(n).toLocaleString('en-US');

export function table(results: CaseResult[], roundTrips: string[] | null): string {
  const withRange = results.some((r) => r.rounds !== undefined);
  const head = ['case', 'req/s', ...(withRange ? ['range'] : []), 'vs ref', 'p50 µs', 'p99 µs', '2xx', '429', 'other', 'errors', 'RSS MB', 'server CPU', 'rest CPU'];
  if (roundTrips) head.push('Redis calls/req');
  const rows = results.map((r) => {
    const m = r.measurement;
    if (!m) return [`${r.id}. ${r.title}`, 'FAILED', ...head.slice(2).map(() => '')];
    const pct = (v: number | null | undefined) => (v === null || v === undefined ? 'n/a' : `${v.toFixed(0)}%`);
    const row = [
      `${r.id}. ${r.title}`,
      fmtInt(m.requestsPerSecond.mean),
      ...(withRange && r.rounds ? [`${fmtInt(r.rounds.requestsPerSecondMin)}–${fmtInt(r.rounds.requestsPerSecondMax)}`] : withRange ? [''] : []),
      r.ratioToReference === null ? '' : `${r.ratioToReference.toFixed(2)}x`,
      fmtInt(m.latencyUs.p50),
      fmtInt(m.latencyUs.p99),
      fmtInt(m.status['2xx']),
      fmtInt(m.status['429']),
      fmtInt(m.status.otherNon2xx),
      fmtInt(m.errors),
      r.rssMb === null ? 'n/a' : r.rssMb.toFixed(0),
      pct(r.cpu?.serverCorePct),
      pct(r.cpu?.othersCorePct),
    ];
    if (roundTrips) {
      const calls = roundTrips.reduce((sum, cmd) => sum + (r.redisCalls?.[cmd] ?? 0), 0);
      row.push(m.responses > 0 && r.redisCalls ? (calls / m.responses).toFixed(3) : 'n/a');
    }
    return row;
  });
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
 * the median (the lower of the two middle ones for an even count), its ratio replaced by the
 * median of all rounds' ratios, and every round's problems.
 */
function summarize(cases: BenchCase[], rounds: CaseResult[][]): CaseResult[] {
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
    out.push({
      ...pick,
      ratioToReference: ratios.length > 0 ? Math.round(median(ratios) * 1000) / 1000 : null,
      rounds: {
        count: all.length,
        requestsPerSecondMin: rps.length > 0 ? Math.min(...rps) : 0,
        requestsPerSecondMax: rps.length > 0 ? Math.max(...rps) : 0,
        ratios,
      },
      problems: all.flatMap((r, i) => r.problems.map((p) => `round ${i + 1}: ${p}`)),
    });
  }
  return out;
}

/** Runs every case, prints the table, writes the JSON; resolves with the process exit code. */
export async function runBenchmark(spec: BenchmarkSpec, argv = process.argv.slice(2)): Promise<number> {
  installCleanup();
  const opts = parseOptions(argv, spec.help);
  const startedAt = new Date();
  const cmd = serverCommand(opts.server);
  const backends = resolveBackends();
  const described = describeBackends(backends);
  const roundTrips = backends.redisUrl ? (spec.redisRoundTrips ?? null) : null;

  log(`${spec.title}`);
  log(`  server:    ${cmd.display} (${cmd.why})`);
  log(`  database:  ${described.database}`);
  log(`  redis:     ${described.redis}`);
  log(`  load:      autocannon, ${opts.connections} connections, ${opts.warmupS} s warm-up + ${opts.durationS} s per case`);
  const loadBefore = os.loadavg();
  if (loadBefore[0]! > 0.5) {
    log(`  WARNING:   the machine is busy before the run (load average ${loadBefore.map((l) => l.toFixed(2)).join(' ')}): expect lower, noisier numbers`);
  }

  let redis: RedisCounter | null = null;
  const rounds: CaseResult[][] = [];
  let setupError: string | null = null;
  try {
    if (backends.redisUrl) redis = await redisCounter(backends.redisUrl);
    // Migrations and seed data are applied once, before any case, so every case's server starts
    // the same way against the same database.
    log('  preparing the database (migrations, seed) ...');
    const reference = spec.cases.find((c) => c.id === spec.referenceId) ?? spec.cases[0]!;
    const prep = await startServer(cmd, serverEnv(spec, reference, backends));
    log(`  ready in ${prep.startupMs} ms`);
    await prep.stop();

    for (let round = 1; round <= opts.rounds; round++) {
      if (opts.rounds > 1) log(`  round ${round} of ${opts.rounds}`);
      const results: CaseResult[] = [];
      rounds.push(results);
      for (const c of spec.cases) {
        log(`  case ${c.id}: ${c.title} ...`);
        const r = await runCase(c, spec, cmd, backends, opts, redis);
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
      const ref = results.find((r) => r.id === spec.referenceId)?.measurement;
      for (const r of results) {
        if (ref && r.measurement && ref.requestsPerSecond.mean > 0) {
          r.ratioToReference = Math.round((r.measurement.requestsPerSecond.mean / ref.requestsPerSecond.mean) * 1000) / 1000;
        }
      }
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
    server: { command: cmd.display, why: cmd.why },
    database: described.database,
    redis: described.redis,
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
    `${cpus.length} x ${cpus[0]?.model ?? 'CPU'}, Node ${process.version}, ${cmd.display}`,
    `database: ${described.database}; limiter: ${described.redis}`,
    `autocannon: ${opts.connections} connections, ${opts.warmupS} s warm-up, ${opts.durationS} s measured per case, a fresh server per case` +
      (opts.rounds > 1 ? `, ${opts.rounds} rounds (each row: the case's median round by req/s; vs ref: median of the rounds' ratios)` : '') +
      '; ' +
      `load average before: ${loadBefore.map((l) => l.toFixed(2)).join(' ')}`,
    '',
    table(results, roundTrips),
    '',
    'req/s: mean of per-second counts, any status. p50/p99: every response, µs. other: non-2xx except 429. errors: connection errors and timeouts.',
    'RSS: the server at the end of its case. CPU: % of one core while measuring; rest = everything but the server and autocannon (database, Redis, other processes).',
    ...(roundTrips ? [`Redis calls/req: ${roundTrips.join(' + ')} per response, counted Redis-wide (INFO commandstats): other clients of the same Redis add to it.`] : []),
    ...(spec.footer?.(results, backends) ?? []),
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
