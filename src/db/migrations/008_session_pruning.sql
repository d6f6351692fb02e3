-- 008: ended sessions are deleted after a grace period (src/models/session.model.ts,
-- pruneEndedSessions), so the table does not grow by a row per refresh forever.
--
-- The system role may delete session rows (it is the only path that does). A deleted row still
-- announces itself on the invalidation channel, but only while it was live: pruning thousands of
-- long-ended tokens must not send thousands of messages to every instance.

GRANT DELETE ON sessions TO llm_app_system;

DROP TRIGGER sessions_notify_auth_delete ON sessions;
CREATE TRIGGER sessions_notify_auth_delete AFTER DELETE ON sessions
  FOR EACH ROW
  WHEN (OLD.revoked_at IS NULL AND OLD.expires_at > now())
  EXECUTE FUNCTION notify_session_change();

-- Finding ended rows without reading the whole table.
CREATE INDEX sessions_expires_at_idx ON sessions (expires_at);
CREATE INDEX sessions_revoked_at_idx ON sessions (revoked_at) WHERE revoked_at IS NOT NULL;
