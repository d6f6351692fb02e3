/**
 * The benchmark's reference: bare Fastify (the version the app depends on, default options, no
 * plugins, no logger) answering a small JSON object. `npm run bench` starts it the way it starts the
 * app, as a child `node` process on 127.0.0.1, and compares every case with it.
 *
 *   GET /        {"hello":"world","service":"reference"}
 *   GET /health  {"status":"ok"} (what the benchmark polls to know the server is up)
 */
import Fastify from 'fastify';

const app = Fastify();

app.get('/', async () => ({ hello: 'world', service: 'reference' }));
app.get('/health', async () => ({ status: 'ok' }));

for (const signal of ['SIGTERM', 'SIGINT'] as const) {
  process.once(signal, () => {
    app.close().then(
      () => process.exit(0),
      () => process.exit(1),
    );
  });
}

await app.listen({ host: process.env.HOST ?? '127.0.0.1', port: Number(process.env.PORT ?? 3000) });
