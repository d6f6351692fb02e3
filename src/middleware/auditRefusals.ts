import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { Database } from '../infra/database.js';
import { recordAuditEvent, userActor, type AuditEvent } from '../models/audit.model.js';
import { ORG_HEADER, USER_HEADER } from './authenticate.js';
import { requestMetaOf } from './requestMeta.js';

/**
 * Records refused requests in the audit log of the org they named: failed authentication
 * (`auth.failed`: a 401, or the 403 of a user claiming another org) and refused authorization
 * (`access.denied`: a 403 to an authenticated caller). A hook of its own, after the response:
 * the refusal is not slowed down, and authentication does not know about auditing.
 *
 * Bounded so that a flood cannot bloat the table: at most `perMinute` rows per org and minute
 * on this instance; the refusals beyond are counted and the count goes into the org's next row
 * (`metadata.suppressed`). Requests that name no live org are not recorded anywhere.
 */

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const WINDOW_MS = 60_000;
// Orgs tracked at once; beyond it, the ones with nothing to carry over are forgotten first.
const MAX_TRACKED_ORGS = 10_000;

interface OrgWindow {
  startMs: number;
  written: number;
  suppressed: number;
}

export interface RefusalAudit {
  /** Resolves when every write started so far has finished (tests; shutdown). */
  settled(): Promise<void>;
}

declare module 'fastify' {
  interface FastifyInstance {
    refusalAudit: RefusalAudit;
  }
}

function claimedId(request: FastifyRequest, header: string): string | null {
  const v = request.headers[header];
  return typeof v === 'string' && UUID.test(v.trim()) ? v.trim().toLowerCase() : null;
}

/** The org a refused request named, and who it was (or claimed to be); null when there is none. */
function refusalOf(request: FastifyRequest, status: number): { orgId: string; event: Omit<AuditEvent, 'request'> } | null {
  const metadata = { status, method: request.method, route: request.routeOptions.url ?? null };
  const ctx = request.context;
  if (ctx) {
    return {
      orgId: ctx.orgId,
      event: {
        action: status === 401 ? 'auth.failed' : 'access.denied',
        actor: userActor(ctx),
        metadata,
      },
    };
  }
  // A credential that named its org before it failed (a revoked API key, a failed login...).
  const claimed = request.claimedIdentity;
  if (claimed) return { orgId: claimed.orgId, event: { action: 'auth.failed', actor: claimed.actor, metadata } };
  const orgId = claimedId(request, ORG_HEADER);
  const userId = claimedId(request, USER_HEADER);
  if (!orgId || !userId) return null;
  return { orgId, event: { action: 'auth.failed', actor: { type: 'user', id: userId, email: null }, metadata } };
}

export function registerRefusalAudit(app: FastifyInstance, db: Database, perMinute: number): RefusalAudit {
  const windows = new Map<string, OrgWindow>();
  const inFlight = new Set<Promise<unknown>>();
  /** The last write queued for each org: the next one of that org waits for it. */
  const lastWrite = new Map<string, Promise<void>>();

  const admit = (orgId: string, nowMs: number): { write: boolean; suppressed: number } => {
    let w = windows.get(orgId);
    if (!w) {
      if (windows.size >= MAX_TRACKED_ORGS) {
        for (const [k, v] of windows) if (v.suppressed === 0 || nowMs - v.startMs >= WINDOW_MS) windows.delete(k);
        if (windows.size >= MAX_TRACKED_ORGS) windows.delete(windows.keys().next().value!);
      }
      w = { startMs: nowMs, written: 0, suppressed: 0 };
      windows.set(orgId, w);
    }
    if (nowMs - w.startMs >= WINDOW_MS) {
      w.startMs = nowMs;
      w.written = 0;
    }
    if (w.written >= perMinute) {
      w.suppressed++;
      return { write: false, suppressed: 0 };
    }
    w.written++;
    const suppressed = w.suppressed;
    w.suppressed = 0;
    return { write: true, suppressed };
  };

  if (perMinute > 0) {
    app.addHook('onResponse', (request, reply, done) => {
      const status = reply.statusCode;
      const refusal = status === 401 || status === 403 ? refusalOf(request, status) : null;
      if (refusal) {
        const { write, suppressed } = admit(refusal.orgId, Date.now());
        if (write) {
          const event: AuditEvent = {
            ...refusal.event,
            request: requestMetaOf(request),
            metadata: { ...refusal.event.metadata, ...(suppressed > 0 ? { suppressed } : {}) },
          };
          // One org's refusals are written one after the other, so its log keeps their order
          // (each write is its own transaction; two at once could commit either way round).
          const orgId = refusal.orgId;
          const previous = lastWrite.get(orgId) ?? Promise.resolve();
          const p: Promise<void> = previous
            .then(() => recordAuditEvent(db, orgId, event))
            .then(
              () => undefined,
              (err: unknown) => request.log.warn({ err }, 'Cannot write the audit entry of a refused request'),
            )
            .finally(() => {
              inFlight.delete(p);
              if (lastWrite.get(orgId) === p) lastWrite.delete(orgId);
            });
          lastWrite.set(orgId, p);
          inFlight.add(p);
        }
      }
      done();
    });
    app.addHook('onClose', async () => {
      await Promise.allSettled([...inFlight]);
    });
  }

  const handle: RefusalAudit = {
    async settled() {
      while (inFlight.size > 0) await Promise.allSettled([...inFlight]);
    },
  };
  app.decorate('refusalAudit', handle);
  return handle;
}
