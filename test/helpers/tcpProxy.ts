import net from 'node:net';

/**
 * A TCP proxy on 127.0.0.1 in front of a real server, so a test can cut the network between the
 * app and its database (stop) and restore it (start) without touching the database itself.
 */
export interface TcpProxy {
  readonly port: number;
  /** Rewrites a URL's host:port to point at the proxy. */
  urlFor(target: string): string;
  /** Closes the listening socket and destroys every live connection (both sides). */
  stop(): Promise<void>;
  /** Listens again on the same port (and ends a blackhole: held connections are dropped). */
  start(): Promise<void>;
  /**
   * A network that drops packets instead of refusing: connections stay open, nothing flows,
   * new connections are accepted and never answered. start() ends it.
   */
  blackhole(): void;
  /** Connections currently open through the proxy. */
  readonly liveConnections: number;
  close(): Promise<void>;
}

export async function startTcpProxy(targetHost: string, targetPort: number): Promise<TcpProxy> {
  const sockets = new Set<net.Socket>();
  const track = (s: net.Socket) => {
    sockets.add(s);
    s.once('close', () => sockets.delete(s));
  };

  let blackholed = false;
  const pairs = new Set<{ client: net.Socket; upstream: net.Socket }>();

  const makeServer = () =>
    net.createServer((client) => {
      track(client);
      if (blackholed) {
        client.on('error', () => client.destroy());
        return;
      }
      const upstream = net.connect({ host: targetHost, port: targetPort });
      const pair = { client, upstream };
      pairs.add(pair);
      client.once('close', () => pairs.delete(pair));
      track(upstream);
      // Either side failing or closing ends both: the app sees what a dropped network looks like.
      const end = () => {
        client.destroy();
        upstream.destroy();
      };
      client.on('error', end).on('close', end);
      upstream.on('error', end).on('close', end);
      client.pipe(upstream);
      upstream.pipe(client);
    });

  let server: net.Server | undefined;
  let port = 0;

  const listen = async () => {
    const s = makeServer();
    await new Promise<void>((resolve, reject) => {
      s.once('error', reject);
      s.listen({ host: '127.0.0.1', port, exclusive: true }, () => {
        s.off('error', reject);
        resolve();
      });
    });
    server = s;
    const address = s.address();
    if (!address || typeof address !== 'object') throw new Error('proxy has no address');
    port = address.port;
  };

  const stop = async () => {
    const s = server;
    server = undefined;
    blackholed = false;
    for (const sock of sockets) sock.destroy();
    sockets.clear();
    if (s) await new Promise<void>((resolve) => s.close(() => resolve()));
  };

  await listen();

  return {
    get port() {
      return port;
    },
    get liveConnections() {
      return sockets.size;
    },
    urlFor(target: string) {
      const u = new URL(target);
      u.hostname = '127.0.0.1';
      u.port = String(port);
      return u.toString();
    },
    stop,
    async start() {
      if (blackholed) {
        blackholed = false;
        for (const sock of sockets) sock.destroy();
        sockets.clear();
      }
      if (server) return;
      await listen();
    },
    blackhole() {
      blackholed = true;
      for (const { client, upstream } of pairs) {
        client.unpipe(upstream);
        upstream.unpipe(client);
        client.pause();
        upstream.pause();
      }
    },
    close: stop,
  };
}
