#!/usr/bin/env bash
# A shared MLflow tracking server: PostgreSQL backend + local artifact store, all under one folder.
#
#   scripts/server.sh start    # install PostgreSQL if missing (Debian, as root), init the cluster once, start both
#   scripts/server.sh stop     # stop the MLflow server, then PostgreSQL
#   scripts/server.sh status   # what is running
#   scripts/server.sh pg-bin   # print the folder holding initdb/pg_ctl/postgres (exit 1 if none; installs nothing)
#
# Settings (environment): SERVER_DIR (outputs/server), PORT (5000, MLflow on 127.0.0.1), PG_PORT (5432: only
# names PostgreSQL's socket, which lives in $SERVER_DIR/pg; no TCP port is opened), WORKERS (2), MLFLOW (the
# mlflow executable, default .venv/bin/mlflow else on PATH), PYTHON (beside it), PG_USER (see below),
# START_TIMEOUT (180 s).
#
# Layout of $SERVER_DIR:  pg/data (the cluster)  pg/postgres.log  pg/.s.PGSQL.$PG_PORT (socket)
#                         artifacts/ (--artifacts-destination)  mlflow.log  mlflow.pid
#
# PostgreSQL refuses to run as root. As root, the cluster is owned by and run as PG_USER: `postgres` (made
# by Debian's package) if it exists, else a system user `cl-runner-pg` created here; every folder above
# $SERVER_DIR must then be enterable by that user (o+x). Otherwise it runs as you. The socket folder is
# private to that user (and root); the cluster trusts local socket connections, and nothing listens on TCP
# except MLflow on 127.0.0.1:$PORT.
set -euo pipefail

SERVER_DIR=$(realpath -m "${SERVER_DIR:-outputs/server}")  # absolute: it goes into URIs
PORT=${PORT:-5000}
PG_PORT=${PG_PORT:-5432}
WORKERS=${WORKERS:-2}
START_TIMEOUT=${START_TIMEOUT:-180}
if [[ -z "${MLFLOW:-}" ]]; then
  if [[ -x .venv/bin/mlflow ]]; then MLFLOW=.venv/bin/mlflow; else MLFLOW=$(command -v mlflow || echo mlflow); fi
fi
PYTHON=${PYTHON:-$(dirname "$MLFLOW")/python}
[[ -x "$PYTHON" ]] || PYTHON=python3
PG_DIR=$SERVER_DIR/pg
PGDATA=$PG_DIR/data
PID_FILE=$SERVER_DIR/mlflow.pid
DB_URI="postgresql+psycopg2://mlflow@/mlflow?host=$PG_DIR&port=$PG_PORT"
URI="http://127.0.0.1:$PORT"

say() { echo "server: $*"; }
die() { echo "server: error: $*" >&2; exit 1; }

pg_bin() {  # the folder with initdb, pg_ctl and postgres: PATH, then Debian's /usr/lib/postgresql/<version>/bin
  local d
  if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
    d=$(dirname "$(readlink -f "$(command -v initdb)")")
    [[ -x "$d/postgres" ]] && { echo "$d"; return 0; }
  fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -n -r); do
    [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]] && { echo "$d"; return 0; }
  done
  return 1
}

install_pg() {
  pg_bin >/dev/null && return 0
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing PostgreSQL from Debian's packages (apt-get install postgresql)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    pg_bin >/dev/null && return 0
  fi
  die "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; install them (Debian/Ubuntu:" \
      "sudo apt-get install postgresql; macOS: brew install postgresql) or put their bin/ folder on PATH"
}

as_pg() {  # run a command as the cluster's owner
  if [[ $(id -u) -eq 0 ]]; then runuser -u "$PG_USER" -- "$@"; else "$@"; fi
}

pg_user() {
  if [[ $(id -u) -ne 0 ]]; then PG_USER=$(id -un); return; fi
  if [[ -z "${PG_USER:-}" ]]; then
    if id postgres >/dev/null 2>&1; then PG_USER=postgres; else PG_USER=cl-runner-pg; fi
  fi
  if ! id "$PG_USER" >/dev/null 2>&1; then
    say "creating the system user $PG_USER to own and run the PostgreSQL cluster (it refuses to run as root)"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$PG_USER"
  fi
}

mlflow_pid() {  # the running server's pid, or nothing (a stale pid file is removed)
  local pid
  [[ -f "$PID_FILE" ]] || return 0
  pid=$(cat "$PID_FILE")
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; else rm -f "$PID_FILE"; fi
}

port_busy() {
  "$PYTHON" -c "import socket, sys; s = socket.socket(); s.settimeout(1)
sys.exit(0 if s.connect_ex(('127.0.0.1', $1)) == 0 else 1)"
}

start_pg() {
  local bin
  bin=$(pg_bin)
  pg_user
  (( ${#PG_DIR} + 20 < 107 )) \
    || die "socket path $PG_DIR/.s.PGSQL.$PG_PORT is too long for a unix socket; use a shorter SERVER_DIR"
  mkdir -p "$PG_DIR"
  if [[ $(id -u) -eq 0 ]]; then chown "$PG_USER" "$PG_DIR"; fi
  chmod 700 "$PG_DIR"
  as_pg test -w "$PG_DIR" || die "user $PG_USER cannot reach $PG_DIR: a folder above it is not enterable by" \
    "others (chmod o+x it, or pick SERVER_DIR elsewhere)"
  if [[ ! -f "$PGDATA/PG_VERSION" ]]; then
    say "creating the PostgreSQL cluster in $PGDATA (owner $PG_USER)"
    as_pg "$bin/initdb" -D "$PGDATA" -U mlflow --auth=trust -E UTF8 --no-locale >"$PG_DIR/initdb.log" 2>&1 \
      || die "initdb failed: $(tail -5 "$PG_DIR/initdb.log")"
  fi
  if pg_running; then
    say "PostgreSQL already running ($PGDATA)"
  else
    as_pg "$bin/pg_ctl" -D "$PGDATA" -l "$PG_DIR/postgres.log" -w -t 60 \
      -o "-c listen_addresses='' -c unix_socket_directories='$PG_DIR' -p $PG_PORT" start >/dev/null \
      || die "PostgreSQL did not start: $(tail -5 "$PG_DIR/postgres.log")"
    say "PostgreSQL running on the socket $PG_DIR/.s.PGSQL.$PG_PORT"
  fi
  local psql="$bin/psql"
  [[ -x "$psql" ]] || psql=psql
  psql=("$psql" -h "$PG_DIR" -p "$PG_PORT" -U mlflow -d postgres)
  if [[ -z $("${psql[@]}" -tAc "select 1 from pg_database where datname = 'mlflow'") ]]; then
    "${psql[@]}" -qc "create database mlflow" >/dev/null
  fi
}

check_mlflow() {  # before anything starts
  [[ -x "$MLFLOW" ]] || command -v "$MLFLOW" >/dev/null || die "no mlflow executable ($MLFLOW); make install first"
  "$PYTHON" -c "import psycopg2" 2>/dev/null || die "$PYTHON cannot import psycopg2: pip install -e '.[server]'"
}

start_mlflow() {
  local pid
  pid=$(mlflow_pid)
  if [[ -n "$pid" ]]; then say "MLflow server already running (pid $pid)"; return 0; fi
  if port_busy "$PORT"; then die "127.0.0.1:$PORT is taken by another program (make ui?); pick PORT=..."; fi
  mkdir -p "$SERVER_DIR/artifacts"
  # its own session, so that stop can end the whole process group (mlflow + uvicorn workers)
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} setsid "$MLFLOW" server \
    --backend-store-uri "$DB_URI" --artifacts-destination "file://$SERVER_DIR/artifacts" \
    --host 127.0.0.1 --port "$PORT" --workers "$WORKERS" >>"$SERVER_DIR/mlflow.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$PID_FILE"
  local t0=$SECONDS
  until "$PYTHON" -c "import urllib.request as u; u.urlopen('$URI/health', timeout=2)" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PID_FILE"
      die "the MLflow server exited; the end of $SERVER_DIR/mlflow.log:"$'\n'"$(tail -15 "$SERVER_DIR/mlflow.log")"
    fi
    if (( SECONDS - t0 >= START_TIMEOUT )); then
      stop_mlflow
      die "no answer from $URI/health after ${START_TIMEOUT}s (see $SERVER_DIR/mlflow.log)"
    fi
    sleep 0.5
  done
  say "MLflow server up in $((SECONDS - t0))s (pid $pid, log $SERVER_DIR/mlflow.log)"
}

stop_mlflow() {
  local pid i
  pid=$(mlflow_pid)
  [[ -n "$pid" ]] || { say "MLflow server not running"; return 0; }
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 60); do  # uvicorn workers may outlive the mlflow parent by a moment
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 0.25
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$PID_FILE"
  say "MLflow server stopped"
}

pg_running() {  # sets bin and PG_USER
  [[ -f "$PGDATA/PG_VERSION" ]] || return 1
  bin=$(pg_bin) || die "PostgreSQL binaries not found: cannot reach the cluster in $PGDATA"
  pg_user
  as_pg "$bin/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1
}

stop_pg() {
  local bin
  if pg_running; then
    as_pg "$bin/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null && say "PostgreSQL stopped"
  else
    say "PostgreSQL not running"
  fi
}

case "${1:-}" in
  start)
    check_mlflow
    mkdir -p "$SERVER_DIR"
    install_pg
    start_pg
    start_mlflow
    echo
    echo "MLflow tracking server: $URI   (UI in a browser; backend $DB_URI; artifacts in $SERVER_DIR/artifacts)"
    echo "Log runs to it with:    MLFLOW_TRACKING_URI=$URI cl-run ...   (or cl-run mlflow.uri=$URI ...)"
    echo "Upload what it missed:  cl-report --sync outputs --tracking-uri $URI"
    echo "Stop it with:           make server-stop"
    ;;
  stop) stop_mlflow; stop_pg ;;
  status)
    pid=$(mlflow_pid)
    if [[ -n "$pid" ]]; then say "MLflow server running at $URI (pid $pid)"; else say "MLflow server not running"; fi
    if pg_running; then say "PostgreSQL running ($PGDATA)"; else say "PostgreSQL not running"; fi
    ;;
  pg-bin) pg_bin ;;
  *) echo "usage: $0 start|stop|status|pg-bin  (settings: SERVER_DIR PORT PG_PORT WORKERS MLFLOW PG_USER)" >&2
     exit 2 ;;
esac
