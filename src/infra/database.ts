import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';
import type { PGlite as PGliteType, Transaction as PGliteTransaction } from '@electric-sql/pglite';
import type { Logger } from 'pino';
import type { DatabaseConfig } from '../config/env.js';

/**
 * The one door to SQL. Two implementations: PostgreSQL through pg.Pool, and embedded PGlite
 * (WASM PostgreSQL in this process) so the server runs on a machine with no database server.
 * Both speak the same SQL dialect, so models and migrations do not know which one they talk to.
 */

export interface QueryResult<R> {
  rows: R[];
  rowCount: number;
}

export interface Queryable {
  /**
   * One parameterised statement. Never build `sql` from input: pass values in `params`.
   * `name` makes it a named prepared statement on PostgreSQL, parsed and planned once per
   * connection instead of on every call: for the statements on the request path. A name must
   * always go with the same `sql`.
   */
  query<R = Record<string, unknown>>(sql: string, params?: readonly unknown[], name?: string): Promise<QueryResult<R>>;
}

export interface Transaction extends Queryable {
  /** Runs a script of several statements with no parameters (migrations). */
  exec(sql: string): Promise<void>;
}

/** One parameterised statement; `name` makes it a prepared statement on PostgreSQL (parsed once per connection). */
export interface Statement {
  readonly sql: string;
  readonly params?: readonly unknown[];
  readonly name?: string;
}

export interface TransactionOptions {
  /**
   * A statement that opens the transaction (settings such as the role): sent together with BEGIN,
   * so it costs no round trip of its own. If it fails, `fn` never runs.
   */
  readonly setup?: Statement;
}

export interface SubscriptionHandlers {
  onMessage(payload: string): void;
  /** Listening (again). Whatever was sent while it was not is lost. */
  onConnected(): void;
  /** Not listening any more; it keeps trying to reconnect until closed. */
  onDisconnected(err: Error): void;
}

export interface Subscription {
  readonly connected: boolean;
  close(): Promise<void>;
}

export interface Database extends Queryable {
  readonly kind: 'postgres' | 'pglite';
  /**
   * LISTEN on a channel, on a connection of its own that outlives failures: it reconnects with
   * backoff and checks itself with a ping, so a silently dead network is noticed.
   */
  subscribe(channel: string, handlers: SubscriptionHandlers): Subscription;
  /** BEGIN … COMMIT around `fn`; ROLLBACK if it throws. */
  transaction<T>(fn: (tx: Transaction) => Promise<T>, options?: TransactionOptions): Promise<T>;
  /**
   * `setup` then one statement, in one transaction of their own: the setup's transaction-local
   * settings apply to the statement and end with it; if the setup fails the statement does not
   * run; a failure rolls back both. On PostgreSQL: one round trip, two statements (no BEGIN or
   * COMMIT). `name` as for query().
   */
  queryInTransaction<R = Record<string, unknown>>(
    setup: Statement,
    sql: string,
    params?: readonly unknown[],
    name?: string,
  ): Promise<QueryResult<R>>;
  /** True when a trivial query answers within `timeoutMs`; never throws, never hangs longer. */
  health(timeoutMs: number): Promise<boolean>;
  close(): Promise<void>;
}

/** The database cannot be reached or is too slow: a 503 for the client, never a 500. */
export class DatabaseUnavailableError extends Error {
  constructor(override readonly cause: unknown) {
    super('Database unavailable', { cause });
    this.name = 'DatabaseUnavailableError';
  }
}

// SQLSTATE classes and codes that mean "the database is not there right now" rather than "your
// query is wrong": connection exceptions (08), shutdown (57P0x), too many connections, and a
// statement cancelled by statement_timeout.
const UNAVAILABLE_SQLSTATES = new Set(['57P01', '57P02', '57P03', '53300', '57014']);
const UNAVAILABLE_NODE_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ETIMEDOUT',
  'EPIPE',
  'ENOTFOUND',
  'EAI_AGAIN',
  'EHOSTUNREACH',
  'ENETUNREACH',
]);

export function isUnavailableError(err: unknown): boolean {
  if (!(err instanceof Error)) return false;
  const code = (err as { code?: unknown }).code;
  if (typeof code === 'string') {
    if (code.startsWith('08') || UNAVAILABLE_SQLSTATES.has(code) || UNAVAILABLE_NODE_CODES.has(code)) return true;
  }
  // pg reports pool/connection timeouts and dropped sockets as plain Errors without a code.
  return /timeout exceeded when trying to connect|Connection terminated|Query read timeout|connection timeout/i.test(
    err.message,
  );
}

function translate(err: unknown): unknown {
  return isUnavailableError(err) ? new DatabaseUnavailableError(err) : err;
}

// ---------------------------------------------------------------------------------------------
// Two statements under one Sync

/**
 * The setup statement and the statement itself, sent as one extended-protocol batch ended by a
 * single Sync. PostgreSQL runs everything up to a Sync as one implicit transaction: the setup's
 * transaction-local settings (role, org) apply to the statement and end at the Sync, with no
 * BEGIN or COMMIT; if the setup fails, the server skips the statement; if the statement fails,
 * both roll back. Half the statements, and a quarter of the server's answers, of BEGIN, setup,
 * statement, COMMIT.
 *
 * Written here because pg has no API for it: every query it sends ends with its own Sync. This
 * extends pg's Query and uses the same connection calls Query itself makes (parse, bind, describe,
 * execute, and the per-connection list of parsed statement names); every tenant read goes through
 * it, so the whole test suite exercises it.
 */
interface WireConnection {
  parsedStatements: Record<string, string | undefined>;
  submittedNamedStatements: Record<string, string | undefined>;
  parse(msg: { text: string; name?: string; types: unknown[] }): void;
  bind(msg: { portal: string; statement?: string; values: unknown[]; valueMapper: (v: unknown) => unknown }): void;
  describe(msg: { type: 'P'; name: string }): void;
  execute(msg: { portal: string; rows: number }): void;
  readonly stream: { readonly destroyed: boolean; destroy(err?: Error): void };
}

interface PgQueryInternals {
  prepare(connection: WireConnection): void;
  submit(connection: WireConnection): Error | null;
  handleError(err: Error, connection: WireConnection): void;
  handleReadyForQuery(connection: WireConnection): void;
}

const require = createRequire(import.meta.url);
const execFileAsync = promisify(execFile);
// pg's own conversion of JavaScript values to parameters (dates, arrays, JSON, buffers).
const { prepareValue } = require('pg/lib/utils.js') as { prepareValue: (v: unknown) => unknown };
const PgQuery = pg.Query as unknown as new (config: pg.QueryConfig & { queryMode?: 'extended' }) => PgQueryInternals;

/**
 * The client-side bound on a statement, for a server that stops answering without closing the
 * socket (a network that drops packets, a host that froze): its queries would otherwise wait
 * forever, and so would their requests.
 *
 * pg's own `query_timeout` does this with a timer per query. Measured with V8's GC trace, those
 * timers kept their queries, the parsed answers and everything they point to alive until V8's next
 * full collection: for 60,000 auth lookups, 194 of 1,002 MB allocated were promoted to the old
 * generation, 15 MB without the option; in the 10,000-tenant benchmark about 20 MB more RSS
 * (bench/README.md). A Set of the waiting queries, tried first, did the same (113 MB). So the
 * bound is kept per connection, in a map entered once per connection: a connection with queries
 * sent and no answer for the bound is destroyed by a sweep, which fails every query on it (a 503
 * for their requests) and makes the pool replace it, as pg's option does with a connection in
 * pipeline mode. A statement that runs longer than the bound is stopped the same way; the
 * server's statement_timeout, a second shorter, stops it first.
 */
class StatementWatch {
  /** Every connection a query went out on, until it is closed. Entered once per connection. */
  private readonly connections = new Map<WireConnection, ConnectionWatch>();
  private readonly timer: NodeJS.Timeout;

  constructor(readonly boundMs: number) {
    // A tenth of the bound between sweeps (at least 50 ms, at most 1 s): a connection is failed at
    // most that late.
    this.timer = setInterval(() => this.sweep(performance.now()), Math.min(1_000, Math.max(50, boundMs / 10)));
    this.timer.unref();
  }

  /** A query went out on `connection` (performance.now() `now`). */
  sent(connection: WireConnection, now: number): ConnectionWatch {
    let watched = this.connections.get(connection);
    if (watched === undefined) {
      watched = { connection, waiting: 0, since: now };
      this.connections.set(connection, watched);
    }
    if (watched.waiting === 0) watched.since = now;
    watched.waiting++;
    return watched;
  }

  /** A query on the connection was answered (or failed). */
  answered(watched: ConnectionWatch, now: number): void {
    watched.waiting--;
    watched.since = now;
  }

  /** Destroys the connections with a query waiting and no answer since `boundMs` before `now`; forgets closed ones. */
  sweep(now: number): void {
    for (const watched of this.connections.values()) {
      const { connection } = watched;
      if (watched.waiting > 0 && now - watched.since >= this.boundMs) {
        this.connections.delete(connection);
        // pg fails every query of the connection with this error, and the pool discards it.
        connection.stream.destroy(new Error(`Query read timeout: no answer from PostgreSQL within ${this.boundMs} ms`));
      } else if (connection.stream.destroyed) {
        this.connections.delete(connection);
      }
    }
  }

  close(): void {
    clearInterval(this.timer);
    this.connections.clear();
  }
}

/** What the watch knows of one connection. */
interface ConnectionWatch {
  readonly connection: WireConnection;
  /** Queries sent on it and not answered yet. */
  waiting: number;
  /** When it last answered, or when a query went out while none was waiting (performance.now()). */
  since: number;
}

/** A query the watch bounds (see StatementWatch); without a watch, pg's Query as it is. */
class WatchedQuery extends PgQuery {
  /** The connection's watch while this query waits for its answer. */
  private waitingOn: ConnectionWatch | null = null;

  constructor(
    private readonly watch: StatementWatch | null,
    config: pg.QueryConfig & { queryMode?: 'extended' },
  ) {
    super(config);
  }

  override submit(connection: WireConnection): Error | null {
    const refused = super.submit(connection);
    if (refused === null && this.watch !== null) this.waitingOn = this.watch.sent(connection, performance.now());
    return refused;
  }

  override handleError(err: Error, connection: WireConnection): void {
    this.done();
    super.handleError(err, connection);
  }

  override handleReadyForQuery(connection: WireConnection): void {
    this.done();
    super.handleReadyForQuery(connection);
  }

  // pg may report one query's end twice (an error, then the ready that follows it): counted once.
  private done(): void {
    if (this.waitingOn === null) return;
    this.watch?.answered(this.waitingOn, performance.now());
    this.waitingOn = null;
  }
}

class ScopedQuery extends WatchedQuery {
  constructor(
    watch: StatementWatch | null,
    private readonly setup: Statement,
    config: pg.QueryConfig,
  ) {
    // Always the extended protocol, even without parameters: the simple one would skip prepare().
    super(watch, { ...config, queryMode: 'extended' });
  }

  override prepare(connection: WireConnection): void {
    const { sql, params, name } = this.setup;
    if (!name || (connection.parsedStatements[name] === undefined && connection.submittedNamedStatements[name] === undefined)) {
      connection.parse({ text: sql, ...(name ? { name } : {}), types: [] });
      // Remembered as sent: later batches on this connection bind it without parsing it again.
      if (name) connection.submittedNamedStatements[name] = sql;
    }
    connection.bind({ portal: '', ...(name ? { statement: name } : {}), values: [...(params ?? [])], valueMapper: prepareValue });
    connection.describe({ type: 'P', name: '' });
    connection.execute({ portal: '', rows: 0 });
    // The statement itself, as pg sends any query, ending with the one Sync.
    super.prepare(connection);
  }
}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

export async function createDatabase(config: DatabaseConfig, logger: Logger): Promise<Database> {
  return config.kind === 'postgres' ? createPostgresDatabase(config, logger) : createPgliteDatabase(config.dataDir);
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL (pg.Pool)

export function createPostgresDatabase(
  config: Extract<DatabaseConfig, { kind: 'postgres' }>,
  logger: Logger,
): Database {
  const pool = new pg.Pool({
    connectionString: config.url,
    max: config.poolMax,
    idleTimeoutMillis: config.idleTimeoutMs,
    connectionTimeoutMillis: config.connectionTimeoutMs,
    application_name: 'llm-app',
    keepAlive: true,
    // Statements of one transaction are sent without waiting for the previous answer where the
    // code allows it (BEGIN with its setup statement in transaction()), saving a round trip.
    pipeline: true,
    ...(config.statementTimeoutMs > 0 ? { statement_timeout: config.statementTimeoutMs } : {}),
  });
  // A client-side bound too, a second after the server's own: see StatementWatch.
  const watch = config.statementTimeoutMs > 0 ? new StatementWatch(config.statementTimeoutMs + 1_000) : null;
  /** One query through the watch, on the pool (a connection for that query alone) or on a checked-out client. */
  const send = (on: pg.Pool | pg.PoolClient, query: WatchedQuery): Promise<pg.QueryResult | pg.QueryResult[]> =>
    new Promise((resolve, reject) => {
      // pg types a submittable query as returning itself; with a callback it answers through it.
      (on.query as unknown as (q: WatchedQuery, cb: (err: Error | undefined, res: pg.QueryResult | pg.QueryResult[]) => void) => void).call(
        on,
        query,
        (err, res) => (err ? reject(err) : resolve(res)),
      );
    });
  const statement = (sql: string, params?: readonly unknown[], name?: string): WatchedQuery =>
    new WatchedQuery(watch, { text: sql, ...(params ? { values: params as unknown[] } : {}), ...(name ? { name } : {}) });
  /** The answer of a single statement (pg answers a script of several with one result each). */
  const single = (res: pg.QueryResult | pg.QueryResult[]): pg.QueryResult => (Array.isArray(res) ? res[res.length - 1]! : res);
  // An idle client losing its connection (server restart, network) emits here; without a
  // listener Node would crash the process. The pool discards the client and makes a new one.
  pool.on('error', (err) => {
    logger.error({ err: { message: err.message, code: (err as { code?: string }).code } }, 'PostgreSQL pool error');
  });

  let closed = false;
  // A checked-out client whose socket dies emits 'error' (writes of pipelined statements can meet
  // the dead socket before any answer does); the pool listens only while the client is idle.
  // Its queries fail with the error anyway, so while it is checked out the event is only absorbed.
  const absorb = (): void => undefined;
  const connect = async (): Promise<pg.PoolClient> => {
    if (closed) throw new DatabaseUnavailableError(new Error('database closed'));
    let client: pg.PoolClient;
    try {
      client = await pool.connect();
    } catch (err) {
      throw translate(err);
    }
    client.on('error', absorb);
    return client;
  };
  const release = (client: pg.PoolClient, err?: Error): void => {
    client.off('error', absorb);
    client.release(err);
  };
  const query = async <R>(sql: string, params?: readonly unknown[], name?: string): Promise<QueryResult<R>> => {
    if (closed) throw new DatabaseUnavailableError(new Error('database closed'));
    try {
      const res = single(await send(pool, statement(sql, params, name)));
      return { rows: res.rows as R[], rowCount: res.rowCount ?? 0 };
    } catch (err) {
      throw translate(err);
    }
  };

  const subscriptions = new Set<Subscription>();
  return {
    kind: 'postgres',
    query,
    subscribe(channel, handlers) {
      const sub = subscribePostgres(config, channel, handlers, () => subscriptions.delete(sub));
      subscriptions.add(sub);
      return sub;
    },
    async transaction<T>(fn: (tx: Transaction) => Promise<T>, options?: TransactionOptions): Promise<T> {
      const client = await connect();
      const tx: Transaction = {
        async query<R>(sql: string, params?: readonly unknown[], name?: string) {
          const res = single(await send(client, statement(sql, params, name)));
          return { rows: res.rows as R[], rowCount: res.rowCount ?? 0 };
        },
        async exec(sql: string) {
          await send(client, statement(sql));
        },
      };
      let broken: Error | undefined;
      try {
        // Pipelined: BEGIN and the setup travel together. `fn` starts only once both have
        // succeeded, so nothing of it can run outside the transaction or without its setup.
        const setup = options?.setup;
        await Promise.all([send(client, statement('BEGIN')), ...(setup ? [send(client, statement(setup.sql, setup.params, setup.name))] : [])]);
        const result = await fn(tx);
        await send(client, statement('COMMIT'));
        return result;
      } catch (err) {
        try {
          await send(client, statement('ROLLBACK'));
        } catch (rollbackErr) {
          // The connection is unusable: release it with an error so the pool destroys it.
          broken = rollbackErr instanceof Error ? rollbackErr : new Error(String(rollbackErr));
        }
        throw translate(err);
      } finally {
        release(client, broken);
      }
    },
    async queryInTransaction<R>(setup: Statement, sql: string, params?: readonly unknown[], name?: string): Promise<QueryResult<R>> {
      if (closed) throw new DatabaseUnavailableError(new Error('database closed'));
      try {
        const query = new ScopedQuery(watch, setup, { text: sql, values: (params ?? []) as unknown[], ...(name ? { name } : {}) });
        // Two statements, two results: the setup's, then the statement's.
        const out = single(await send(pool, query));
        return { rows: out.rows as R[], rowCount: out.rowCount ?? 0 };
      } catch (err) {
        throw translate(err);
      }
    },
    async health(timeoutMs: number) {
      if (closed) return false;
      try {
        await withTimeout(send(pool, statement('SELECT 1')), timeoutMs);
        return true;
      } catch {
        return false;
      }
    },
    async close() {
      if (closed) return;
      closed = true;
      await Promise.all([...subscriptions].map((sub) => sub.close()));
      await pool.end();
      watch?.close();
    },
  };
}

const CHANNEL_NAME = /^[a-z_][a-z0-9_]{0,62}$/;
const LISTEN_PING_INTERVAL_MS = 5_000;
const LISTEN_RECONNECT_MIN_MS = 200;
const LISTEN_RECONNECT_MAX_MS = 5_000;

/**
 * pg's Pool hands out connections per query, and LISTEN needs one session that stays: a Client of
 * its own. pg has no reconnecting listener (pg-listen does, but is unmaintained since 2021), so the
 * loop is here: connect, LISTEN, ping every few seconds; on any failure, drop the connection, tell
 * the handlers, and try again with a doubling delay.
 */
function subscribePostgres(
  config: Extract<DatabaseConfig, { kind: 'postgres' }>,
  channel: string,
  handlers: SubscriptionHandlers,
  onClosed: () => void,
): Subscription {
  if (!CHANNEL_NAME.test(channel)) throw new Error(`invalid channel name: ${channel}`);
  let client: pg.Client | null = null;
  let connected = false;
  let closed = false;
  let attempt = 0;
  let retryTimer: NodeJS.Timeout | undefined;
  let pingTimer: NodeJS.Timeout | undefined;

  const drop = (c: pg.Client, err: Error) => {
    if (client !== c) return;
    client = null;
    clearInterval(pingTimer);
    c.removeAllListeners('notification');
    c.end().catch(() => undefined);
    if (connected) {
      connected = false;
      handlers.onDisconnected(err);
    }
    if (!closed) {
      const delay = Math.min(LISTEN_RECONNECT_MAX_MS, LISTEN_RECONNECT_MIN_MS * 2 ** attempt++);
      retryTimer = setTimeout(() => void connect(), delay);
    }
  };

  const connect = async () => {
    const c = new pg.Client({
      connectionString: config.listenUrl ?? config.url,
      application_name: 'llm-app-listen',
      keepAlive: true,
      connectionTimeoutMillis: config.connectionTimeoutMs,
      // Bounds the ping: a network that swallows packets fails it instead of hanging it.
      query_timeout: Math.max(1_000, config.connectionTimeoutMs),
    });
    client = c;
    c.on('error', (err) => drop(c, err));
    c.on('end', () => drop(c, new Error('connection ended')));
    c.on('notification', (msg) => {
      if (msg.channel === channel) handlers.onMessage(msg.payload ?? '');
    });
    try {
      await c.connect();
      await c.query(`LISTEN ${channel}`);
    } catch (err) {
      drop(c, err instanceof Error ? err : new Error(String(err)));
      return;
    }
    if (closed || client !== c) {
      await c.end().catch(() => undefined);
      return;
    }
    attempt = 0;
    connected = true;
    handlers.onConnected();
    pingTimer = setInterval(() => {
      c.query('SELECT 1').catch((err: unknown) => drop(c, err instanceof Error ? err : new Error(String(err))));
    }, LISTEN_PING_INTERVAL_MS);
    pingTimer.unref();
  };

  void connect();
  return {
    get connected() {
      return connected;
    },
    async close() {
      if (closed) return;
      closed = true;
      clearTimeout(retryTimer);
      clearInterval(pingTimer);
      const c = client;
      client = null;
      connected = false;
      onClosed();
      if (c) await c.end().catch(() => undefined);
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Embedded PGlite

/**
 * PostgreSQL's default buffer pool (128 MB) is allocated and touched in full when PGlite starts.
 * An embedded database of one process needs far less: with 32 MB a started server takes about
 * 110 MB less memory. PGlite.defaultStartParams is the list PGlite uses when given none.
 */
const PGLITE_SHARED_BUFFERS = '32MB';
const pgliteStartParams = (defaults: readonly string[]): string[] => [...defaults, '-c', `shared_buffers=${PGLITE_SHARED_BUFFERS}`];

/**
 * Creates a new data directory in a child process. PGlite's initdb runs in WebAssembly instances
 * of its own whose memory (over 600 MB) the process keeps once they are done; in a child it is
 * returned to the system when the child exits. Costs the child's start (about a second on a
 * 2-core machine), on the first start only.
 */
async function initPgliteDataDir(dir: string, startParams: readonly string[]): Promise<void> {
  // The package's CommonJS entry, so that the child needs no loader whatever runs this module.
  const entry = require.resolve('@electric-sql/pglite');
  const script = [
    "const { PGlite } = require(process.argv[1]);",
    'PGlite.create(process.argv[2], { startParams: JSON.parse(process.argv[3]) })',
    '  .then((db) => db.close())',
    // PGlite's file system errors are not Errors (ErrnoError { errno }): shown whole.
    "  .then(() => process.exit(0), (err) => { process.stderr.write(typeof err?.message === 'string' ? err.message : require('node:util').inspect(err)); process.exit(1); });",
  ].join('\n');
  try {
    await execFileAsync(process.execPath, ['-e', script, entry, dir, JSON.stringify(startParams)], { maxBuffer: 1 << 20 });
  } catch (err) {
    const stderr = (err as { stderr?: string }).stderr?.trim();
    throw new Error(`Could not create the embedded database in ${dir}: ${stderr || (err as Error).message}`);
  }
}

/**
 * `dataDir` is a folder to persist in, or 'memory://' for a throwaway database (tests).
 * PGlite is a single connection: statements are serialised, and a transaction holds it exclusively.
 */
export async function createPgliteDatabase(dataDir: string): Promise<Database> {
  // Imported lazily: the WASM module costs ~1 s and over 100 MB, only when it is the one in use.
  const { PGlite } = await import('@electric-sql/pglite');
  const options = { startParams: pgliteStartParams(PGlite.defaultStartParams) };
  let db: PGliteType;
  if (dataDir.startsWith('memory://')) {
    db = await PGlite.create(dataDir, options);
  } else {
    const dir = path.resolve(dataDir, 'pglite');
    await mkdir(dir, { recursive: true });
    if (!existsSync(path.join(dir, 'PG_VERSION'))) await initPgliteDataDir(dir, options.startParams);
    db = await PGlite.create(dir, options);
  }
  const wrap = (q: PGliteType | PGliteTransaction): Transaction => ({
    async query<R>(sql: string, params?: readonly unknown[]) {
      const res = await q.query<R>(sql, params as unknown[] | undefined);
      // Like pg: a statement that returns rows counts them; otherwise the rows it changed.
      return { rows: res.rows, rowCount: res.fields.length > 0 ? res.rows.length : (res.affectedRows ?? 0) };
    },
    async exec(sql: string) {
      await q.exec(sql);
    },
  });
  const root = wrap(db);
  let closed = false;
  const unlisteners = new Set<() => Promise<void>>();
  return {
    kind: 'pglite',
    // One process, one connection: a notification never travels over a network, so it is never lost.
    subscribe(channel, handlers) {
      if (!CHANNEL_NAME.test(channel)) throw new Error(`invalid channel name: ${channel}`);
      let connected = false;
      let unlisten: (() => Promise<void>) | null = null;
      let closedSub = false;
      const listening = db.listen(channel, (payload) => handlers.onMessage(payload)).then((fn) => {
        unlisten = fn;
        unlisteners.add(fn);
        if (closedSub) return;
        connected = true;
        handlers.onConnected();
      });
      return {
        get connected() {
          return connected;
        },
        async close() {
          if (closedSub) return;
          closedSub = true;
          connected = false;
          await listening.catch(() => undefined);
          if (unlisten && !closed) {
            unlisteners.delete(unlisten);
            await unlisten().catch(() => undefined);
          }
        },
      };
    },
    query: async (sql, params) => {
      if (closed) throw new DatabaseUnavailableError(new Error('database closed'));
      return root.query(sql, params);
    },
    transaction: async (fn, options) => {
      if (closed) throw new DatabaseUnavailableError(new Error('database closed'));
      return db.transaction(async (tx) => {
        const w = wrap(tx);
        if (options?.setup) await w.query(options.setup.sql, options.setup.params);
        return fn(w);
      });
    },
    // Names are for PostgreSQL's plan cache; PGlite parses each statement anyway.
    queryInTransaction: async <R>(setup: Statement, sql: string, params?: readonly unknown[]) => {
      if (closed) throw new DatabaseUnavailableError(new Error('database closed'));
      return db.transaction(async (tx) => {
        const w = wrap(tx);
        await w.query(setup.sql, setup.params);
        return w.query<R>(sql, params);
      });
    },
    async health(timeoutMs: number) {
      if (closed) return false;
      try {
        await withTimeout(db.query('SELECT 1'), timeoutMs);
        return true;
      } catch {
        return false;
      }
    },
    async close() {
      if (closed) return;
      await Promise.all([...unlisteners].map((fn) => fn().catch(() => undefined)));
      closed = true;
      await db.close();
    },
  };
}
