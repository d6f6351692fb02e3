-- 007: passwords and sessions (POST /v1/auth/login, /refresh, /logout; PUT /v1/me/password).
--
-- A user may have a password, stored as its argon2id hash in PHC form ($argon2id$v=19$m=...).
-- A session is a family of refresh tokens: signing in starts one, each refresh replaces its token
-- with a new one (the old one is marked used), and presenting a used token again revokes the
-- whole family. One row per refresh token; only the SHA-256 of the token is stored (the token is
-- 256 random bits, so a slow hash would add nothing).

ALTER TABLE users
  ADD COLUMN password_hash TEXT,
  ADD CONSTRAINT users_password_hash_check CHECK (password_hash IS NULL OR left(password_hash, 10) = '$argon2id$');

CREATE TABLE sessions (
  org_id          UUID NOT NULL REFERENCES orgs (id),
  -- This refresh token.
  id              UUID NOT NULL DEFAULT gen_random_uuid(),
  -- The family: the session every token of one sign-in belongs to (the access token's sid).
  session_id      UUID NOT NULL,
  user_id         UUID NOT NULL,
  token_hash      BYTEA NOT NULL CHECK (octet_length(token_hash) = 32),
  created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
  expires_at      TIMESTAMPTZ NOT NULL,
  -- Set together when the token is exchanged for its successor.
  used_at         TIMESTAMPTZ,
  replaced_by     UUID,
  -- Set on every token of the family when the session ends, with why.
  revoked_at      TIMESTAMPTZ,
  revoked_reason  VARCHAR(32),
  ip              VARCHAR(64),
  user_agent      VARCHAR(512),
  CONSTRAINT sessions_pkey PRIMARY KEY (org_id, id),
  CONSTRAINT sessions_org_id_token_hash_key UNIQUE (org_id, token_hash),
  CONSTRAINT sessions_user_fkey FOREIGN KEY (org_id, user_id) REFERENCES users (org_id, id),
  CONSTRAINT sessions_replaced_by_fkey FOREIGN KEY (org_id, replaced_by) REFERENCES sessions (org_id, id),
  CONSTRAINT sessions_used_check CHECK ((used_at IS NULL) = (replaced_by IS NULL)),
  CONSTRAINT sessions_revoked_check CHECK ((revoked_at IS NULL) = (revoked_reason IS NULL)),
  CONSTRAINT sessions_revoked_reason_check CHECK (revoked_reason IN (
    'logout', 'reuse_detected', 'password_changed', 'password_reset', 'user_deleted', 'role_changed'))
);

-- A refresh token is presented without its org: the one lookup by hash alone (the system path).
CREATE INDEX sessions_token_hash_idx ON sessions (token_hash);
CREATE INDEX sessions_org_id_session_id_idx ON sessions (org_id, session_id);
CREATE INDEX sessions_org_id_user_id_live_idx ON sessions (org_id, user_id) WHERE revoked_at IS NULL;

-- A session that ends announces itself on the auth channel ('s:<session id>'), so every instance
-- drops it from its cache and its access tokens stop working there within milliseconds. Revoking
-- a family updates each of its rows; PostgreSQL folds the identical notifications of one
-- transaction into one.
CREATE FUNCTION notify_session_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF TG_LEVEL = 'STATEMENT' THEN
    PERFORM pg_notify('llm_app_auth', '*');
    RETURN NULL;
  END IF;
  IF TG_OP <> 'INSERT' THEN PERFORM pg_notify('llm_app_auth', 's:' || OLD.session_id::text); END IF;
  IF TG_OP = 'UPDATE' AND NEW.session_id IS DISTINCT FROM OLD.session_id THEN
    PERFORM pg_notify('llm_app_auth', 's:' || NEW.session_id::text);
  END IF;
  RETURN NULL;
END;
$$;

CREATE TRIGGER sessions_notify_auth_update AFTER UPDATE ON sessions
  FOR EACH ROW
  WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at OR OLD.session_id IS DISTINCT FROM NEW.session_id
        OR OLD.user_id IS DISTINCT FROM NEW.user_id OR OLD.org_id IS DISTINCT FROM NEW.org_id)
  EXECUTE FUNCTION notify_session_change();
CREATE TRIGGER sessions_notify_auth_delete AFTER DELETE ON sessions
  FOR EACH ROW EXECUTE FUNCTION notify_session_change();
CREATE TRIGGER sessions_notify_auth_truncate AFTER TRUNCATE ON sessions
  FOR EACH STATEMENT EXECUTE FUNCTION notify_session_change();

-- Deleting a user or changing their role ends their sessions, in the transaction that makes the
-- change, whoever makes it (the API, an operator in psql). It runs as the role that changed the
-- user, under its row-level security: a tenant changing its own user reaches that user's sessions.
CREATE FUNCTION end_sessions_of_changed_user() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  UPDATE sessions
     SET revoked_at = now(),
         revoked_reason = CASE WHEN NEW.deleted_at IS NOT NULL THEN 'user_deleted' ELSE 'role_changed' END
   WHERE org_id = NEW.org_id AND user_id = NEW.id AND revoked_at IS NULL;
  RETURN NULL;
END;
$$;

CREATE TRIGGER users_end_sessions AFTER UPDATE OF role, deleted_at ON users
  FOR EACH ROW
  WHEN (OLD.role IS DISTINCT FROM NEW.role OR (OLD.deleted_at IS NULL AND NEW.deleted_at IS NOT NULL))
  EXECUTE FUNCTION end_sessions_of_changed_user();

ALTER TABLE sessions ENABLE ROW LEVEL SECURITY;
ALTER TABLE sessions FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON sessions TO llm_app_tenant
  USING (org_id = NULLIF(current_setting('app.org_id', true), '')::uuid)
  WITH CHECK (org_id = NULLIF(current_setting('app.org_id', true), '')::uuid);
CREATE POLICY system_access ON sessions TO llm_app_system
  USING (current_user = 'llm_app_system') WITH CHECK (current_user = 'llm_app_system');

-- Sessions are ended, never deleted, by the application.
GRANT SELECT, INSERT, UPDATE ON sessions TO llm_app_tenant, llm_app_system;
