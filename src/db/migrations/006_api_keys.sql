-- 006: API keys, the credentials products use to call us from their servers.
--
-- A key belongs to its org, not to the person who made it: it keeps working when its creator is
-- deleted or demoted, until it is revoked or expires. The secret itself is never stored: only its
-- SHA-256 (the secret is 256 random bits, so a fast hash is enough: there is nothing to guess) and
-- its first characters, to tell keys apart in a list.

CREATE TABLE api_keys (
  org_id          UUID NOT NULL REFERENCES orgs (id),
  id              UUID NOT NULL DEFAULT gen_random_uuid(),
  name            VARCHAR(255) NOT NULL CHECK (length(btrim(name)) > 0),
  role            VARCHAR(50) NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
  -- The first characters of the secret ('llmk_' and a few more), shown in lists.
  prefix          VARCHAR(16) NOT NULL,
  secret_hash     BYTEA NOT NULL CHECK (octet_length(secret_hash) = 32),
  -- Who made it: a user, or another API key (exactly one of them).
  created_by      UUID,
  created_by_key  UUID,
  created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
  expires_at      TIMESTAMPTZ,
  revoked_at      TIMESTAMPTZ,
  -- Written in batches by the servers (at most every USAGE_FLUSH_INTERVAL_MS), not per request.
  last_used_at    TIMESTAMPTZ,
  -- Creation order for listing (created_at ties within a transaction and at PGlite's resolution).
  seq             BIGINT GENERATED ALWAYS AS IDENTITY,
  CONSTRAINT api_keys_pkey PRIMARY KEY (org_id, id),
  CONSTRAINT api_keys_org_id_secret_hash_key UNIQUE (org_id, secret_hash),
  CONSTRAINT api_keys_created_by_fkey FOREIGN KEY (org_id, created_by) REFERENCES users (org_id, id),
  CONSTRAINT api_keys_created_by_key_fkey FOREIGN KEY (org_id, created_by_key) REFERENCES api_keys (org_id, id),
  CONSTRAINT api_keys_creator_check CHECK (num_nonnulls(created_by, created_by_key) = 1)
);

-- Authentication looks a key up by its hash alone, before its org is known (the system path).
CREATE INDEX api_keys_secret_hash_idx ON api_keys (secret_hash);
-- Listing an org's keys, newest first.
CREATE INDEX api_keys_org_id_seq_idx ON api_keys (org_id, seq);

-- Every instance caches keys by their hash; a change that can alter what a key may do announces
-- it on the channel of migration 003 as 'k:<key id>': revoked, role or expiry changed, deleted...
-- anything but last_used_at, which the batches write all the time and which no cache holds.
CREATE FUNCTION notify_api_key_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF TG_LEVEL = 'STATEMENT' THEN
    PERFORM pg_notify('llm_app_auth', '*');
    RETURN NULL;
  END IF;
  PERFORM pg_notify('llm_app_auth', 'k:' || OLD.id::text);
  IF TG_OP = 'UPDATE' AND NEW.id IS DISTINCT FROM OLD.id THEN
    PERFORM pg_notify('llm_app_auth', 'k:' || NEW.id::text);
  END IF;
  RETURN NULL;
END;
$$;

-- A new key needs no message: its secret has never been seen, so no cache holds an answer for it.
CREATE TRIGGER api_keys_notify_auth_update AFTER UPDATE ON api_keys
  FOR EACH ROW
  WHEN ((to_jsonb(OLD) - 'last_used_at') IS DISTINCT FROM (to_jsonb(NEW) - 'last_used_at'))
  EXECUTE FUNCTION notify_api_key_change();
CREATE TRIGGER api_keys_notify_auth_delete AFTER DELETE ON api_keys
  FOR EACH ROW EXECUTE FUNCTION notify_api_key_change();
CREATE TRIGGER api_keys_notify_auth_truncate AFTER TRUNCATE ON api_keys
  FOR EACH STATEMENT EXECUTE FUNCTION notify_api_key_change();

ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON api_keys TO llm_app_tenant
  USING (org_id = NULLIF(current_setting('app.org_id', true), '')::uuid)
  WITH CHECK (org_id = NULLIF(current_setting('app.org_id', true), '')::uuid);
CREATE POLICY system_access ON api_keys TO llm_app_system
  USING (current_user = 'llm_app_system') WITH CHECK (current_user = 'llm_app_system');

-- Least privilege. A tenant lists, creates and revokes its keys (revoking is the one change it
-- may make: nothing is ever deleted); the system path reads keys to authenticate them and writes
-- their last use.
GRANT SELECT, INSERT ON api_keys TO llm_app_tenant;
GRANT UPDATE (revoked_at) ON api_keys TO llm_app_tenant;
GRANT SELECT ON api_keys TO llm_app_system;
GRANT UPDATE (last_used_at) ON api_keys TO llm_app_system;
