-- 004: tenant isolation enforced by PostgreSQL (row-level security).
--
-- Two roles, both NOLOGIN, owning nothing, neither superuser nor BYPASSRLS:
--   llm_app_tenant  every request's queries: sees the rows of the org in `app.org_id` only;
--   llm_app_system  cross-tenant work (auth lookup, operator tools, usage batches): sees all orgs.
-- The application connects as the user that ran the migrations (the owner of the tables) and
-- enters one of them per transaction with SET LOCAL ROLE (src/db/tenancy.ts). FORCE ROW LEVEL
-- SECURITY makes the owner itself subject to the policies, and it has none: the owner's own
-- connection sees no tenant rows unless it is a superuser.

-- Roles belong to the whole cluster, not to this database: another database of the same server
-- may have created them already, or be creating them at this moment.
DO $$
DECLARE
  r text;
  can_set boolean;
BEGIN
  FOREACH r IN ARRAY ARRAY['llm_app_tenant', 'llm_app_system'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
      BEGIN
        EXECUTE format('CREATE ROLE %I NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT', r);
      EXCEPTION WHEN duplicate_object OR unique_violation THEN
        NULL;
      END;
    END IF;
    -- The connecting user must be allowed to SET ROLE to it (PostgreSQL 16 separates that right
    -- from membership). Superusers always are.
    IF current_setting('server_version_num')::int >= 160000 THEN
      EXECUTE 'SELECT pg_has_role(current_user, $1, ''SET'')' INTO can_set USING r;
    ELSE
      can_set := pg_has_role(current_user, r, 'MEMBER');
    END IF;
    IF NOT can_set THEN
      EXECUTE format('GRANT %I TO %I', r, current_user);
    END IF;
  END LOOP;
END
$$;

-- Composite keys: a user is identified within its org. The primary key (org_id, id) replaces both
-- the key on id alone and UNIQUE (org_id, id), so nothing unique on a tenant table leaves out
-- org_id (a distributed table on Citus needs exactly that). Ids stay random UUIDs; the plain
-- index serves the one lookup by id alone, authentication, which then checks the org.
ALTER TABLE users
  DROP CONSTRAINT users_pkey,
  DROP CONSTRAINT users_org_id_id_key,
  ADD CONSTRAINT users_pkey PRIMARY KEY (org_id, id);
CREATE INDEX users_id_idx ON users (id);

-- The system policies name current_user on purpose: the connecting user is a member of
-- llm_app_system (it must be, to SET ROLE) and on PostgreSQL 15 inherits the role's rights, so a
-- policy for the role alone would also let that user, outside any scope, see every row.

-- orgs is the root of the tenancy: a tenant sees its own org row only.
ALTER TABLE orgs ENABLE ROW LEVEL SECURITY;
ALTER TABLE orgs FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON orgs TO llm_app_tenant
  USING (id = NULLIF(current_setting('app.org_id', true), '')::uuid)
  WITH CHECK (id = NULLIF(current_setting('app.org_id', true), '')::uuid);
CREATE POLICY system_access ON orgs TO llm_app_system
  USING (current_user = 'llm_app_system') WITH CHECK (current_user = 'llm_app_system');

ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON users TO llm_app_tenant
  USING (org_id = NULLIF(current_setting('app.org_id', true), '')::uuid)
  WITH CHECK (org_id = NULLIF(current_setting('app.org_id', true), '')::uuid);
CREATE POLICY system_access ON users TO llm_app_system
  USING (current_user = 'llm_app_system') WITH CHECK (current_user = 'llm_app_system');

ALTER TABLE org_limits ENABLE ROW LEVEL SECURITY;
ALTER TABLE org_limits FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON org_limits TO llm_app_tenant
  USING (org_id = NULLIF(current_setting('app.org_id', true), '')::uuid)
  WITH CHECK (org_id = NULLIF(current_setting('app.org_id', true), '')::uuid);
CREATE POLICY system_access ON org_limits TO llm_app_system
  USING (current_user = 'llm_app_system') WITH CHECK (current_user = 'llm_app_system');

ALTER TABLE org_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE org_usage FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON org_usage TO llm_app_tenant
  USING (org_id = NULLIF(current_setting('app.org_id', true), '')::uuid)
  WITH CHECK (org_id = NULLIF(current_setting('app.org_id', true), '')::uuid);
CREATE POLICY system_access ON org_usage TO llm_app_system
  USING (current_user = 'llm_app_system') WITH CHECK (current_user = 'llm_app_system');

-- Least privilege. A tenant reads its org, manages its users (soft delete is an UPDATE, nothing
-- is ever deleted), reads its limits and usage; limits change only through the operator CLI and
-- usage only through the batches, both on the system path.
GRANT SELECT ON orgs TO llm_app_tenant;
GRANT SELECT, INSERT, UPDATE ON users TO llm_app_tenant;
GRANT SELECT ON org_limits, org_usage TO llm_app_tenant;

GRANT SELECT, INSERT, UPDATE ON orgs, users, org_usage TO llm_app_system;
GRANT SELECT, INSERT, UPDATE, DELETE ON org_limits TO llm_app_system;
