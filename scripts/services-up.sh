#!/usr/bin/env bash
#
# Start a local PostgreSQL and Redis for development and CI, without Docker
# and without systemd. Safe to run repeatedly: anything already running is
# left alone.
#
# Usage:
#   eval "$(scripts/services-up.sh)"
#
# stdout carries only "export NAME=value" lines (DATABASE_URL,
# TEST_DATABASE_URL, REDIS_URL); all progress messages go to stderr.
#
# Environment:
#   LLM_APP_SERVICES_DIR  state directory (default: $PWD/.services; as root,
#                         /tmp/llm-app-services if the postgres user cannot
#                         reach $PWD)
#   PG_PORT               PostgreSQL port (default: 54329)
#   REDIS_PORT            Redis port      (default: 63799)
#   PG_BIN_DIR            PostgreSQL bin directory (default: newest
#                         /usr/lib/postgresql/*/bin)
#
# Stop with scripts/services-down.sh (add --purge to delete all data).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/services-common.sh
source "$SCRIPT_DIR/lib/services-common.sh"

DATABASES=(llm_app llm_app_test)
REDIS_WAIT_SECONDS=10

# --- 1. Make sure the binaries exist ----------------------------------------

ensure_packages() {
  local missing=()
  [[ -n $(find_pg_bin) ]] || missing+=(postgresql)
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    missing+=(redis-server)
  fi
  ((${#missing[@]} == 0)) && return 0

  if ! is_root; then
    die "missing package(s): ${missing[*]}. Install them, e.g.: sudo apt-get install -y ${missing[*]}"
  fi
  # Fresh CI machines have neither service. The Debian postgresql package
  # may start its own cluster on 5432 from its postinst; that does not
  # interfere with ours, so it is simply ignored.
  log "installing ${missing[*]} with apt-get"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql redis-server </dev/null
  [[ -n $(find_pg_bin) ]] || die "postgresql was installed but no initdb/postgres binaries were found"
  command -v redis-server >/dev/null 2>&1 || die "redis-server was installed but is not on PATH"
}

# --- 2. State directory ------------------------------------------------------

# Sets DIR, PGDATA_DIR, PGRUN_DIR and REDIS_DIR and creates them with the
# ownership and modes PostgreSQL insists on.
prepare_dirs() {
  resolve_services_dir
  DIR=$SERVICES_DIR
  # The directory ends up inside a shell-parsed option string for pg_ctl
  # (-o "... -k '<dir>'"), so quotes and whitespace would break it.
  [[ ! $DIR =~ [[:space:]\'\"] ]] || die "LLM_APP_SERVICES_DIR must not contain spaces or quotes: $DIR"

  PGDATA_DIR=$DIR/pgdata
  PGRUN_DIR=$DIR/pgrun
  REDIS_DIR=$DIR/redis

  # Unix socket paths are limited to ~107 bytes; fail with a clear message
  # instead of an obscure postgres startup error.
  local socket_path=$PGRUN_DIR/.s.PGSQL.$PG_PORT
  ((${#socket_path} <= 100)) \
    || die "state directory path is too long for a Unix socket ($socket_path); set a shorter one, e.g. LLM_APP_SERVICES_DIR=/tmp/llm-app-services"

  mkdir -p "$DIR"
  chmod 755 "$DIR"
  touch "$DIR/$SERVICES_MARKER"

  if is_root; then
    postgres_can_reach "$DIR" \
      || die "the postgres user cannot reach $DIR (a parent directory is not traversable). Use a directory it can reach, e.g.: LLM_APP_SERVICES_DIR=/tmp/llm-app-services $0"
    # The data directory must be 0700 (postgres refuses to start otherwise),
    # so the mode is set explicitly on every run.
    install -d -m 700 -o postgres -g postgres "$PGDATA_DIR"
    install -d -m 755 -o postgres -g postgres "$PGRUN_DIR"
  else
    mkdir -p "$PGDATA_DIR" "$PGRUN_DIR"
    chmod 700 "$PGDATA_DIR"
  fi
  mkdir -p "$REDIS_DIR"

  log "state directory: $DIR"
}

# --- 3. PostgreSQL -----------------------------------------------------------

start_postgres() {
  local pg_major data_major running_port pg_ready_rc=0
  # "pg_ctl (PostgreSQL) 15.14 (Debian ...)" -> "15"
  pg_major=$("$PG_BIN/pg_ctl" --version | sed -E 's/^[^0-9]*([0-9]+).*/\1/')

  if [[ -f $PGDATA_DIR/PG_VERSION ]]; then
    data_major=$(<"$PGDATA_DIR/PG_VERSION")
    [[ $data_major == "$pg_major" ]] \
      || die "$PGDATA_DIR was created by PostgreSQL $data_major but $PG_BIN is version $pg_major; run scripts/services-down.sh --purge or set PG_BIN_DIR"
  fi

  # pg_ctl status: 0 = running, 3 = not running, 4 = no (initialised) data dir.
  if as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
    # Line 4 of postmaster.pid is the port the running server listens on.
    running_port=$(sed -n 4p "$PGDATA_DIR/postmaster.pid")
    [[ $running_port == "$PG_PORT" ]] \
      || die "PostgreSQL from $PGDATA_DIR is already running on port $running_port, not $PG_PORT; run scripts/services-down.sh first (with the same LLM_APP_SERVICES_DIR)"
    log "PostgreSQL already running on 127.0.0.1:$PG_PORT"
    return
  fi

  # Something else on the port would make startup fail with a bind error
  # buried in the log; say so directly. (pg_isready: 0/1 = a server answered.)
  "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 2 || pg_ready_rc=$?
  ((pg_ready_rc > 1)) \
    || die "another PostgreSQL server is already listening on 127.0.0.1:$PG_PORT; stop it or choose another PG_PORT"

  if [[ ! -f $PGDATA_DIR/PG_VERSION ]]; then
    log "initialising PostgreSQL $pg_major cluster in $PGDATA_DIR"
    # Trust authentication is acceptable because the server only listens on
    # 127.0.0.1 and on a socket inside the state directory. initdb is chatty,
    # so its output is only shown when it fails.
    if ! as_pg "$PG_BIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
      >"$PGRUN_DIR/initdb.log" 2>&1; then
      cat "$PGRUN_DIR/initdb.log" >&2
      die "initdb failed"
    fi
  fi

  log "starting PostgreSQL on 127.0.0.1:$PG_PORT (log: $PGRUN_DIR/pg.log)"
  # -w waits until the server accepts connections (or -t seconds pass).
  if ! as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -l "$PGRUN_DIR/pg.log" -w -t 60 \
    -o "-p $PG_PORT -k '$PGRUN_DIR' -c listen_addresses=127.0.0.1" start </dev/null; then
    log "PostgreSQL failed to start; last lines of $PGRUN_DIR/pg.log:"
    tail -n 30 "$PGRUN_DIR/pg.log" >&2 || true
    exit 1
  fi
}

create_databases() {
  # Clients connect over TCP as the postgres superuser; that works for any
  # local OS user thanks to trust authentication.
  local pg_client_args=(-h 127.0.0.1 -p "$PG_PORT" -U postgres) db exists
  for db in "${DATABASES[@]}"; do
    exists=$("$PG_BIN/psql" "${pg_client_args[@]}" -d postgres -XtAc "SELECT 1 FROM pg_database WHERE datname = '$db'")
    if [[ $exists == 1 ]]; then
      log "database $db exists"
    else
      log "creating database $db"
      "$PG_BIN/createdb" "${pg_client_args[@]}" "$db"
    fi
  done
}

# --- 4. Redis ----------------------------------------------------------------

redis_ping() {
  [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
}

start_redis() {
  local deadline
  if redis_ping; then
    log "Redis already running on 127.0.0.1:$REDIS_PORT"
  else
    log "starting Redis on 127.0.0.1:$REDIS_PORT (log: $REDIS_DIR/redis.log)"
    # Pure cache for dev/CI: no RDB snapshots, no AOF, nothing to clean up.
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes \
      --save '' --appendonly no \
      --dir "$REDIS_DIR" --pidfile "$REDIS_DIR/redis.pid" --logfile "$REDIS_DIR/redis.log" </dev/null
    # --daemonize returns before the server listens; wait (bounded) for PONG.
    deadline=$((SECONDS + REDIS_WAIT_SECONDS))
    until redis_ping; do
      if ((SECONDS >= deadline)); then
        log "Redis did not answer PING within ${REDIS_WAIT_SECONDS}s; last lines of $REDIS_DIR/redis.log:"
        tail -n 30 "$REDIS_DIR/redis.log" >&2 || true
        exit 1
      fi
      sleep 0.2
    done
  fi
  # Remember the port so services-down.sh stops this instance (and only
  # this one) even if REDIS_PORT is not set when it runs.
  printf '%s\n' "$REDIS_PORT" >"$REDIS_DIR/port"
}

# --- 5. Putting it together --------------------------------------------------

main() {
  ensure_packages
  PG_BIN=$(find_pg_bin)
  [[ -x $PG_BIN/pg_ctl && -x $PG_BIN/initdb && -x $PG_BIN/psql ]] \
    || die "PostgreSQL bin directory $PG_BIN lacks pg_ctl/initdb/psql (set PG_BIN_DIR)"
  prepare_dirs
  start_postgres
  create_databases
  start_redis
  log "ready"
}

# All work runs with stdout pointed at stderr, so eval only ever sees the
# export lines. Deliberately no "exec 3>&1"-style copy of stdout: daemons
# started here (postgres, redis-server, a cluster started by apt) inherit
# every open descriptor, and one holding the pipe of
# "$(scripts/services-up.sh)" open would make the caller hang forever.
main >&2

printf 'export DATABASE_URL=postgres://postgres@127.0.0.1:%s/llm_app\n' "$PG_PORT"
printf 'export TEST_DATABASE_URL=postgres://postgres@127.0.0.1:%s/llm_app_test\n' "$PG_PORT"
printf 'export REDIS_URL=redis://127.0.0.1:%s\n' "$REDIS_PORT"
