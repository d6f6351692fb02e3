import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createConnection, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import { afterAll } from 'vitest';

/**
 * A private redis-server per suite, on 127.0.0.1 and a free port: a suite can kill, restart and
 * flush it without disturbing any other suite. Nothing is persisted (`--save '' --appendonly no`),
 * so a restart comes back empty, like a Redis that lost its memory.
 *
 * Suites that need one use `describe.skipIf(!hasRedisServer)` and get servers from
 * `redisServers()`, which stops every process it started (and removes its folder) in afterAll,
 * whatever the tests did; a worker that dies without running afterAll still kills them on exit.
 */

export const hasRedisServer = spawnSync('redis-server', ['--version'], { stdio: 'ignore' }).status === 0;

const START_TIMEOUT_MS = 5_000;

export interface RedisServer {
  readonly port: number;
  readonly url: string;
  /** Pid of the current redis-server process (changes on restart); null while stopped. */
  readonly pid: number | null;
  /** SIGKILL: the way a crashed Redis goes, without a goodbye to its clients. */
  stop(): Promise<void>;
  /** A fresh, empty redis-server on the same port. */
  restart(): Promise<void>;
  flushAll(): Promise<void>;
  /**
   * One client for the test's own commands and assertions (it reconnects by itself across
   * restarts), disconnected at cleanup. Never shared with a server under test.
   */
  client(): Redis;
}

function freePort(): Promise<number> {
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

/**
 * The pid of the redis-server answering on `port` (INFO server, over a raw socket), or null when
 * none answers yet. Checking the pid, not just PONG, makes sure the server is ours: another
 * process may have taken the port between the probe and redis's bind.
 */
function answeringPid(port: number): Promise<number | null> {
  return new Promise((resolve) => {
    const socket = createConnection({ host: '127.0.0.1', port });
    let reply = '';
    const finish = (pid: number | null) => {
      socket.destroy();
      resolve(pid);
    };
    socket.setTimeout(500, () => finish(null));
    socket.once('error', () => finish(null));
    socket.on('connect', () => socket.write('*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n'));
    socket.on('data', (d) => {
      reply += d.toString('latin1');
      // A bulk string: "$<length>\r\n<body>\r\n"; anything else (-LOADING, -NOAUTH...) is "not yet".
      if (!reply.startsWith('$')) return finish(null);
      const header = /^\$(\d+)\r\n/.exec(reply);
      if (!header || reply.length < header[0].length + Number(header[1])) return;
      const pid = /process_id:(\d+)/.exec(reply);
      finish(pid ? Number(pid[1]) : null);
    });
  });
}

/** Every redis-server still running in this worker, killed synchronously if the worker exits. */
const running = new Set<ChildProcess>();
process.once('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

function spawnRedis(port: number, dir: string): { child: ChildProcess; output: () => string } {
  const child = spawn(
    'redis-server',
    [
      '--port', String(port),
      '--bind', '127.0.0.1',
      '--save', '',
      '--appendonly', 'no',
      '--daemonize', 'no',
      '--dir', dir,
      '--loglevel', 'warning',
    ],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let output = '';
  child.stdout?.setEncoding('utf8').on('data', (d: string) => (output += d));
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (output += d));
  running.add(child);
  child.once('exit', () => running.delete(child));
  return { child, output: () => output };
}

function exitOf(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => child.once('exit', () => resolve()));
}

/** Waits until this process answers; rejects (with redis's own output) if the process exits or the time runs out. */
async function waitReady(port: number, child: ChildProcess, output: () => string): Promise<void> {
  const deadline = Date.now() + START_TIMEOUT_MS;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`redis-server on port ${port} exited before answering:\n${output()}`);
    }
    if ((await answeringPid(port)) === child.pid) return;
    if (Date.now() > deadline) throw new Error(`redis-server on port ${port} did not answer within ${START_TIMEOUT_MS} ms:\n${output()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function killAndWait(child: ChildProcess): Promise<void> {
  if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  await exitOf(child);
}

interface ManagedRedis extends RedisServer {
  /** Stops the process, disconnects the client, removes the folder. */
  dispose(): Promise<void>;
}

async function startRedisServer(): Promise<ManagedRedis> {
  const dir = mkdtempSync(join(tmpdir(), 'llm-app-redis-'));
  let port = 0;
  let current: ChildProcess | null = null;
  // A free port can be taken between the probe and redis's bind: try a few.
  for (let attempt = 1; ; attempt++) {
    port = await freePort();
    const { child, output } = spawnRedis(port, dir);
    try {
      await waitReady(port, child, output);
      current = child;
      break;
    } catch (err) {
      await killAndWait(child);
      if (attempt >= 3) {
        rmSync(dir, { recursive: true, force: true });
        throw err;
      }
    }
  }
  let assertions: Redis | null = null;
  const url = `redis://127.0.0.1:${port}`;

  const server: ManagedRedis = {
    port,
    url,
    get pid() {
      return current?.pid ?? null;
    },
    async stop() {
      if (current) await killAndWait(current);
      current = null;
    },
    async restart() {
      if (current) await killAndWait(current);
      current = null;
      const { child, output } = spawnRedis(port, dir);
      try {
        await waitReady(port, child, output);
      } catch (err) {
        await killAndWait(child);
        throw err;
      }
      current = child;
    },
    async flushAll() {
      await server.client().flushall();
    },
    client() {
      if (!assertions) {
        assertions = new Redis(url, { maxRetriesPerRequest: 1 });
        assertions.on('error', () => undefined); // reconnects by itself; a test asserts on its replies
      }
      return assertions;
    },
    async dispose() {
      assertions?.disconnect();
      assertions = null;
      await server.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
  return server;
}

/**
 * Call at the top of a suite (module or describe level): `start()` launches a redis-server, and
 * every server started is stopped in afterAll, even when a test or a hook failed.
 */
export function redisServers(): { start(): Promise<RedisServer> } {
  const started: ManagedRedis[] = [];
  afterAll(async () => {
    await Promise.allSettled(started.splice(0).map((s) => s.dispose()));
  });
  return {
    async start() {
      const s = await startRedisServer();
      started.push(s);
      return s;
    },
  };
}
