# shellcheck shell=bash
#
# Shared helpers for scripts/services-up.sh and scripts/services-down.sh.
# Sourced, not executed: both scripts must agree on where the state lives,
# which ports are used and how commands are run as the postgres user,
# otherwise "down" could miss what "up" started.

# Unusual default ports so a locally installed PostgreSQL (5432) or Redis
# (6379) keeps working next to ours.
PG_PORT="${PG_PORT:-54329}"
REDIS_PORT="${REDIS_PORT:-63799}"

# Fallback state directory for root when the checkout itself is not
# reachable by the postgres user (e.g. a clone under /root, mode 700).
SERVICES_FALLBACK_DIR=/tmp/llm-app-services

# File that marks a directory as created by services-up.sh; --purge only
# deletes directories carrying it, so a mistyped LLM_APP_SERVICES_DIR can
# never wipe something unrelated.
# shellcheck disable=SC2034 # used by the sourcing scripts
SERVICES_MARKER=.llm-app-services

# All human-readable output goes to stderr: services-up.sh keeps stdout for
# the export lines that callers eval.
log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

is_root() { [[ $(id -u) -eq 0 ]]; }

# Run a command as the user that owns the PostgreSQL data directory.
# PostgreSQL refuses to run as root, so as root we switch to "postgres";
# otherwise the current user owns the cluster. runuser (util-linux) takes an
# argv instead of a shell string, which avoids quoting problems with paths.
# "cd /" avoids "could not change directory to /root" warnings when the
# caller's working directory is not readable by postgres.
as_pg() {
  if is_root; then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

# Can the postgres user reach (traverse) the given path? Every parent
# directory needs the x bit for "other", which a checkout under /root or a
# home directory with mode 700 does not have.
postgres_can_reach() {
  (cd / && runuser -u postgres -- test -x "$1") 2>/dev/null
}

# Sets SERVICES_DIR to an absolute path.
#   - LLM_APP_SERVICES_DIR wins when set (an unreachable path is reported by
#     services-up.sh, not silently replaced).
#   - Otherwise $PWD/.services, except for root when postgres cannot reach
#     $PWD: then a fixed directory under /tmp, so CI clones anywhere work.
resolve_services_dir() {
  local dir
  if [[ -n ${LLM_APP_SERVICES_DIR:-} ]]; then
    dir=$LLM_APP_SERVICES_DIR
  else
    dir=$PWD/.services
    if is_root && id postgres >/dev/null 2>&1 && ! postgres_can_reach "$PWD"; then
      log "postgres user cannot reach $PWD; using $SERVICES_FALLBACK_DIR instead (set LLM_APP_SERVICES_DIR to choose another directory)"
      dir=$SERVICES_FALLBACK_DIR
    fi
  fi
  # Make relative paths absolute without requiring the directory to exist.
  [[ $dir == /* ]] || dir=$PWD/$dir
  # shellcheck disable=SC2034 # result variable for the sourcing scripts
  SERVICES_DIR=${dir%/}
}

# Prints the bin directory of the newest PostgreSQL server installation, or
# nothing. PG_BIN_DIR overrides the search. Debian installs server binaries
# in /usr/lib/postgresql/<major>/bin (not on PATH); other systems usually put
# them on PATH.
find_pg_bin() {
  if [[ -n ${PG_BIN_DIR:-} ]]; then
    printf '%s\n' "$PG_BIN_DIR"
    return
  fi
  local d found=()
  for d in /usr/lib/postgresql/*/bin; do
    [[ -x $d/initdb && -x $d/postgres && -x $d/pg_ctl ]] && found+=("$d")
  done
  if ((${#found[@]} > 0)); then
    printf '%s\n' "${found[@]}" | sort -V | tail -n 1
  elif command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
  fi
}
