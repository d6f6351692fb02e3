-- 005: the audit log. Append-only, one hash chain per org.
--
-- Each row stores hash = sha256_hex(previous row's hash || canonical form of this row), the
-- first row of an org chaining from ''. The canonical form is audit_log_canonical() below. seq
-- numbers an org's rows 1, 2, 3, … with no gap; a BEFORE INSERT trigger assigns seq, the time and
-- the hash under a per-org transaction lock, so concurrent writers of one org queue up and the
-- chain stays linear whatever code path inserts. `npm run audit:verify` walks the chains.

CREATE TABLE audit_logs (
  org_id       UUID NOT NULL REFERENCES orgs (id),
  id           UUID NOT NULL DEFAULT gen_random_uuid(),
  seq          BIGINT NOT NULL CHECK (seq > 0),
  occurred_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
  actor_type   VARCHAR(16) NOT NULL CHECK (actor_type IN ('user', 'api_key', 'system')),
  actor_id     UUID,
  actor_email  VARCHAR(255),
  action       VARCHAR(64) NOT NULL CHECK (action ~ '^[a-z][a-z_]*(\.[a-z][a-z_]*)+$'),
  target_type  VARCHAR(32),
  target_id    UUID,
  request_id   VARCHAR(128),
  ip           VARCHAR(64),
  user_agent   VARCHAR(512),
  metadata     JSONB NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object'),
  hash         TEXT NOT NULL CHECK (hash ~ '^[0-9a-f]{64}$'),
  CONSTRAINT audit_logs_pkey PRIMARY KEY (org_id, id),
  CONSTRAINT audit_logs_org_id_seq_key UNIQUE (org_id, seq),
  -- The system acts without an id; a user or an API key always has one.
  CONSTRAINT audit_logs_actor_check CHECK ((actor_type = 'system') = (actor_id IS NULL)),
  CONSTRAINT audit_logs_target_check CHECK ((target_type IS NULL) = (target_id IS NULL))
);

-- GET /v1/audit-logs: newest first (the unique (org_id, seq) index), by action, by actor, by time.
CREATE INDEX audit_logs_org_id_action_seq_idx ON audit_logs (org_id, action, seq);
CREATE INDEX audit_logs_org_id_actor_id_seq_idx ON audit_logs (org_id, actor_id, seq);
CREATE INDEX audit_logs_org_id_occurred_at_idx ON audit_logs (org_id, occurred_at);

-- Serialises everything that changes one org: user changes take it first, and every audit insert
-- takes it (again) before reading the chain's head. A transaction-level advisory lock, so it
-- needs no privilege on any table and ends with the transaction. Key space (4242005, hash of
-- the org id): different orgs may share a key, which only makes them wait for each other.
CREATE FUNCTION lock_org(p_org_id uuid) RETURNS void
LANGUAGE sql AS $$
  SELECT pg_advisory_xact_lock(4242005, hashtext(p_org_id::text));
$$;

-- The canonical form of a row: a JSON array of every column but the hash, in this order, as
-- PostgreSQL prints jsonb (object keys sorted, one space after ',' and ':'), the time in UTC with
-- microseconds. Fixed here once; verification reads it from the same function.
CREATE FUNCTION audit_log_canonical(r audit_logs) RETURNS text
LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_array(
    r.org_id, r.id, r.seq,
    to_char(r.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    r.actor_type, r.actor_id, r.actor_email,
    r.action, r.target_type, r.target_id,
    r.request_id, r.ip, r.user_agent, r.metadata
  )::text;
$$;

-- Runs as the inserting role, under its row-level security: a tenant inserting into its own org
-- sees its own org's chain. Each statement of a plpgsql function takes a fresh snapshot, so the
-- head read after the lock includes whatever the previous holder committed.
CREATE FUNCTION audit_logs_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  last_seq bigint;
  last_hash text;
BEGIN
  PERFORM lock_org(NEW.org_id);
  SELECT a.seq, a.hash INTO last_seq, last_hash
    FROM audit_logs a WHERE a.org_id = NEW.org_id ORDER BY a.seq DESC LIMIT 1;
  NEW.seq := coalesce(last_seq, 0) + 1;
  NEW.occurred_at := clock_timestamp();
  NEW.hash := encode(sha256(convert_to(coalesce(last_hash, '') || audit_log_canonical(NEW), 'UTF8')), 'hex');
  RETURN NEW;
END;
$$;

CREATE TRIGGER audit_logs_chain BEFORE INSERT ON audit_logs
  FOR EACH ROW EXECUTE FUNCTION audit_logs_chain();

-- Nobody changes or removes an audit row, the owner included (a superuser can still switch
-- triggers off; the hash chain is what shows it).
CREATE FUNCTION audit_logs_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'audit_logs is append-only: % is not allowed', TG_OP USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_logs_append_only BEFORE UPDATE OR DELETE ON audit_logs
  FOR EACH ROW EXECUTE FUNCTION audit_logs_append_only();
CREATE TRIGGER audit_logs_no_truncate BEFORE TRUNCATE ON audit_logs
  FOR EACH STATEMENT EXECUTE FUNCTION audit_logs_append_only();

ALTER TABLE audit_logs ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_logs FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON audit_logs TO llm_app_tenant
  USING (org_id = NULLIF(current_setting('app.org_id', true), '')::uuid)
  WITH CHECK (org_id = NULLIF(current_setting('app.org_id', true), '')::uuid);
CREATE POLICY system_access ON audit_logs TO llm_app_system
  USING (current_user = 'llm_app_system') WITH CHECK (current_user = 'llm_app_system');

-- Read and append, never UPDATE or DELETE.
GRANT SELECT, INSERT ON audit_logs TO llm_app_tenant, llm_app_system;
