-- 002: per-org limit overrides and durable usage toward the hard caps.

-- One row per org that does not use the defaults from the environment. NULL in a column means
-- "the default"; 0 means "no limit".
CREATE TABLE org_limits (
  org_id                UUID PRIMARY KEY REFERENCES orgs (id),
  burst                 INTEGER CHECK (burst >= 0),
  per_second            DOUBLE PRECISION CHECK (per_second >= 0),
  user_burst            INTEGER CHECK (user_burst >= 0),
  user_per_second       DOUBLE PRECISION CHECK (user_per_second >= 0),
  daily_request_cap     BIGINT CHECK (daily_request_cap >= 0),
  monthly_request_cap   BIGINT CHECK (monthly_request_cap >= 0),
  max_concurrent        INTEGER CHECK (max_concurrent >= 0),
  created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
  updated_at            TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TRIGGER org_limits_set_updated_at BEFORE UPDATE ON org_limits
  FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- Admitted requests per org and calendar period (UTC). Written in batches by every instance
-- (additive upserts), read back when the limiter's counters are lost (Redis restart or flush).
CREATE TABLE org_usage (
  org_id        UUID NOT NULL REFERENCES orgs (id),
  period        VARCHAR(5) NOT NULL CHECK (period IN ('day', 'month')),
  period_start  DATE NOT NULL,
  requests      BIGINT NOT NULL DEFAULT 0 CHECK (requests >= 0),
  updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, period, period_start)
);
