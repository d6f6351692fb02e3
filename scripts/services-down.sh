#!/usr/bin/env bash
#
# Stop the PostgreSQL and Redis started by scripts/services-up.sh.
# Services that are not running are skipped, so this is safe to call from
# cleanup traps.
#
# Usage:
#   scripts/services-down.sh           # stop, keep data
#   scripts/services-down.sh --purge   # stop and delete the state directory
#
# Uses the same LLM_APP_SERVICES_DIR / PG_PORT / REDIS_PORT defaults as
# services-up.sh.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/services-common.sh
source "$SCRIPT_DIR/lib/services-common.sh"

PURGE=false
for arg in "$@"; do
  case $arg in
    --purge) PURGE=true ;;
    -h | --help)
      # Print the header comment block.
      awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
      exit 0
      ;;
    *) die "unknown argument: $arg (expected --purge)" ;;
  esac
done

STOP_WAIT_SECONDS=15

resolve_services_dir
DIR=$SERVICES_DIR

if [[ ! -d $DIR ]]; then
  log "nothing to stop: $DIR does not exist"
  exit 0
fi

# --- PostgreSQL --------------------------------------------------------------

stop_postgres() {
  local pgdata=$DIR/pgdata pg_bin
  if [[ ! -f $pgdata/PG_VERSION ]]; then
    log "PostgreSQL: no cluster in $pgdata"
    return
  fi
  pg_bin=$(find_pg_bin)
  if [[ -z $pg_bin ]]; then
    log "PostgreSQL: binaries not found, nothing can be running"
    return
  fi
  if ! as_pg "$pg_bin/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; then
    log "PostgreSQL: not running"
    return
  fi
  log "PostgreSQL: stopping"
  # -m fast: roll back open transactions and disconnect clients instead of
  # waiting for them (test runners often keep pools open).
  as_pg "$pg_bin/pg_ctl" -D "$pgdata" -m fast -w -t "$STOP_WAIT_SECONDS" stop >&2
}

# --- Redis -------------------------------------------------------------------

stop_redis() {
  local redis_dir=$DIR/redis port pid=""
  # services-up.sh records the port once Redis answers. Without that file
  # this directory never had a Redis, and whatever listens on REDIS_PORT
  # belongs to someone else (e.g. another state directory): leave it alone.
  if [[ ! -f $redis_dir/port ]]; then
    log "Redis: not started from $DIR"
    return
  fi
  port=$(<"$redis_dir/port")
  [[ -f $redis_dir/redis.pid ]] && pid=$(<"$redis_dir/redis.pid")

  if [[ $(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null) == PONG ]]; then
    log "Redis: stopping (port $port)"
    # nosave: the instance is a throwaway cache. redis-cli may report the
    # closed connection as an error; the loop below checks the real outcome.
    redis-cli -h 127.0.0.1 -p "$port" shutdown nosave >/dev/null 2>&1 || true
  elif [[ -n $pid ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == redis-server* ]]; then
    # Running but not answering (e.g. hung): fall back to a signal, after
    # checking the pid really is a redis-server and not a reused pid.
    log "Redis: not answering on port $port, sending SIGTERM to pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
  else
    log "Redis: not running"
    return
  fi

  local deadline=$((SECONDS + STOP_WAIT_SECONDS))
  while [[ $(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null) == PONG ]] \
    || { [[ -n $pid ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == redis-server* ]]; }; do
    if ((SECONDS >= deadline)); then
      log "ERROR: Redis did not stop within ${STOP_WAIT_SECONDS}s"
      return 1
    fi
    sleep 0.2
  done
  rm -f "$redis_dir/redis.pid"
}

# Stop both even if one fails, then report.
rc=0
stop_postgres || rc=1
if command -v redis-cli >/dev/null 2>&1; then
  stop_redis || rc=1
else
  log "Redis: redis-cli not installed, nothing can be running"
fi

if [[ $PURGE == true ]]; then
  if ((rc != 0)); then
    log "not purging $DIR because a service failed to stop"
  elif [[ -f $DIR/$SERVICES_MARKER ]]; then
    log "deleting $DIR"
    rm -rf -- "$DIR"
  else
    log "not purging $DIR: it was not created by services-up.sh (no $SERVICES_MARKER file)"
    rc=1
  fi
fi

exit "$rc"
