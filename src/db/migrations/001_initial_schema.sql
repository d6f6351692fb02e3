-- 001: organisations (tenants) and their users.
-- Append-only: once applied anywhere, this file never changes. Fix forward with 002_....
-- Seed data is not here: it is development/test only and lives in src/db/seed.ts.

-- Keeps updated_at current on every UPDATE, whatever code path wrote the row.
CREATE FUNCTION set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  NEW.updated_at := now();
  RETURN NEW;
END;
$$;

CREATE TABLE orgs (
  id          UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  name        VARCHAR(255) NOT NULL CHECK (length(btrim(name)) > 0),
  slug        VARCHAR(100) NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9]([a-z0-9-]*[a-z0-9])?$'),
  created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
  updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
  deleted_at  TIMESTAMPTZ,
  metadata    JSONB NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object')
);

CREATE TRIGGER orgs_set_updated_at BEFORE UPDATE ON orgs
  FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE TABLE users (
  id          UUID NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
  org_id      UUID NOT NULL REFERENCES orgs (id),
  -- Stored lower-cased by the application; the CHECK makes sure nothing else slips in,
  -- so equality on this column is case-insensitive equality on the address.
  email       VARCHAR(255) NOT NULL CHECK (email = lower(email) AND position('@' IN email) > 1),
  name        VARCHAR(255),
  role        VARCHAR(50) NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
  created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
  updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
  deleted_at  TIMESTAMPTZ,
  metadata    JSONB NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object'),
  -- Insertion order, for listing in creation order: created_at alone ties (PGlite's clock has
  -- millisecond resolution, and one transaction shares one now()).
  seq         BIGINT GENERATED ALWAYS AS IDENTITY,
  -- Later tenant tables reference users by (org_id, user_id), so a row can never point at
  -- another organisation's user.
  CONSTRAINT users_org_id_id_key UNIQUE (org_id, id)
);

-- The same address may exist in different orgs; within one org it is unique among live users
-- (a soft-deleted user's address can be invited again).
CREATE UNIQUE INDEX users_org_id_email_key ON users (org_id, email) WHERE deleted_at IS NULL;
-- Listing an org's users in creation order (keyset pagination on seq) and every org-scoped lookup.
CREATE INDEX users_org_id_seq_idx ON users (org_id, seq);

CREATE TRIGGER users_set_updated_at BEFORE UPDATE ON users
  FOR EACH ROW EXECUTE FUNCTION set_updated_at();
