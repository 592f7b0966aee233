#!/usr/bin/env bash
# Install and start whatever the tests need, idempotently: safe to re-run, starts nothing that
# already runs, and fights nothing that another owner started.
#
#   scripts/services.sh                 set up, print the test environment
#   scripts/services.sh -- CMD ARGS...  set up, then run CMD with that environment exported
#
# Services so far: none to start. The in-memory and SQLite backends are embedded (rusqlite
# bundles SQLite), so the foundation needs only the Rust toolchain and a C compiler. Each
# backend that needs a server adds an `ensure_<service>` step below: detect, install if
# missing, start if absent, wait until ready, then `export_env NAME VALUE` for the tests.
set -euo pipefail

BASE=${OUTBOX_SERVICES_DIR:-$HOME/.cache/outbox-services}
mkdir -p "$BASE/logs"
ENV_FILE=$BASE/env
: >"$ENV_FILE.tmp"

log() { printf 'services: %s\n' "$*" >&2; }

need_cmd() {
  command -v "$1" >/dev/null 2>&1 || { log "missing required command: $1 ($2)"; exit 1; }
}

# Record a variable for the tests (exported here, and written to $ENV_FILE for other shells).
export_env() {
  export "$1=$2"
  printf 'export %s=%q\n' "$1" "$2" >>"$ENV_FILE.tmp"
}

need_cmd cargo "install the Rust toolchain with rustup"
need_cmd cc "install gcc: rusqlite builds the bundled SQLite from C"
log "sqlite: embedded (rusqlite, bundled), nothing to start"
log "memory: embedded, nothing to start"

mv "$ENV_FILE.tmp" "$ENV_FILE"
log "ready; test environment in $ENV_FILE"

if [ "${1:-}" = "--" ]; then
  shift
  [ $# -gt 0 ] || { log "nothing to run after --"; exit 2; }
  exec "$@"
fi
