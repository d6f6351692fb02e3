-- 003: every change that can alter who a caller is, or what limits apply to them, announces itself
-- on the channel llm_app_auth, so each server's in-process auth cache drops what it held.
--
-- NOTIFY is transactional: the message is delivered when, and only if, the change commits, to
-- every session listening at that moment, in commit order. Whoever makes the change (the app, the
-- limits CLI, an operator in psql) cannot forget to send it.
--
-- Payloads: 'u:<user id>', 'o:<org id>', or '*' (everything, after a TRUNCATE).

CREATE FUNCTION notify_auth_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF TG_LEVEL = 'STATEMENT' THEN
    PERFORM pg_notify('llm_app_auth', '*');
    RETURN NULL;
  END IF;
  IF TG_TABLE_NAME = 'users' THEN
    IF TG_OP <> 'INSERT' THEN PERFORM pg_notify('llm_app_auth', 'u:' || OLD.id::text); END IF;
    IF TG_OP <> 'DELETE' THEN PERFORM pg_notify('llm_app_auth', 'u:' || NEW.id::text); END IF;
  ELSIF TG_TABLE_NAME = 'orgs' THEN
    IF TG_OP <> 'INSERT' THEN PERFORM pg_notify('llm_app_auth', 'o:' || OLD.id::text); END IF;
    IF TG_OP <> 'DELETE' THEN PERFORM pg_notify('llm_app_auth', 'o:' || NEW.id::text); END IF;
  ELSE
    IF TG_OP <> 'INSERT' THEN PERFORM pg_notify('llm_app_auth', 'o:' || OLD.org_id::text); END IF;
    IF TG_OP <> 'DELETE' THEN PERFORM pg_notify('llm_app_auth', 'o:' || NEW.org_id::text); END IF;
  END IF;
  RETURN NULL;
END;
$$;

-- Users: any change. The cache holds the whole user (GET /v1/me answers from it), and a new user
-- must end a cached "unknown user".
CREATE TRIGGER users_notify_auth AFTER INSERT OR UPDATE OR DELETE ON users
  FOR EACH ROW EXECUTE FUNCTION notify_auth_change();
CREATE TRIGGER users_notify_auth_truncate AFTER TRUNCATE ON users
  FOR EACH STATEMENT EXECUTE FUNCTION notify_auth_change();

-- Orgs: created (a cached "unknown org" must go), deleted, or soft-deleted.
CREATE TRIGGER orgs_notify_auth_insert_delete AFTER INSERT OR DELETE ON orgs
  FOR EACH ROW EXECUTE FUNCTION notify_auth_change();
CREATE TRIGGER orgs_notify_auth_update AFTER UPDATE ON orgs
  FOR EACH ROW
  WHEN (OLD.deleted_at IS DISTINCT FROM NEW.deleted_at OR OLD.id IS DISTINCT FROM NEW.id)
  EXECUTE FUNCTION notify_auth_change();
CREATE TRIGGER orgs_notify_auth_truncate AFTER TRUNCATE ON orgs
  FOR EACH STATEMENT EXECUTE FUNCTION notify_auth_change();

-- An org's own limits travel with its cached callers.
CREATE TRIGGER org_limits_notify_auth AFTER INSERT OR UPDATE OR DELETE ON org_limits
  FOR EACH ROW EXECUTE FUNCTION notify_auth_change();
CREATE TRIGGER org_limits_notify_auth_truncate AFTER TRUNCATE ON org_limits
  FOR EACH STATEMENT EXECUTE FUNCTION notify_auth_change();
