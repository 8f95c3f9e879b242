#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for `launcher=slurm` tests: munge, MariaDB + slurmdbd (so that
# `sacct` works: submitit polls it to see a job end, and a job the cluster kills is only noticed through it),
# slurmctld and slurmd, all configured and kept under one folder, on free ports of 127.0.0.1 (munge's socket
# is the default one, /run/munge/munge.socket.2, so one such cluster per machine).
#
#   scripts/slurm.sh install  # Debian's slurm-wlm, slurmdbd, munge, mariadb-server (as root; skipped if present)
#   scripts/slurm.sh start    # configure (first time) and start the five daemons; prints `export SLURM_CONF=...`
#   scripts/slurm.sh stop     # stop them again (slurmd, slurmctld, slurmdbd, MariaDB, munged), by their pid files
#   scripts/slurm.sh status   # which daemons run
#
# Settings (environment): SLURM_DIR (outputs/slurm), CPUS (2: what the node offers), START_TIMEOUT (60 s).
# Clients (sbatch, squeue, sacct, cl-run) find the cluster through SLURM_CONF=$SLURM_DIR/slurm.conf; it names
# nothing under /etc is touched. Root only: slurmd must
# run as root to start jobs as their user, and the jobs here run as root as well.
set -euo pipefail

SLURM_DIR=$(realpath -m "${SLURM_DIR:-outputs/slurm}")  # absolute: it goes into the config files
CPUS=${CPUS:-2}
START_TIMEOUT=${START_TIMEOUT:-60}
CONF=$SLURM_DIR/slurm.conf
NODE=$(hostname -s)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)  # start order; stop runs it backwards

say() { echo "slurm: $*"; }
die() { echo "slurm: error: $*" >&2; exit 1; }

install() {
  local missing=()
  for b in slurmctld slurmd slurmdbd sbatch munged mariadbd; do command -v "$b" >/dev/null || missing+=("$b"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null || die "missing ${missing[*]}: install Debian's slurm-wlm" \
    "slurmdbd munge mariadb-server (as root), or use a real cluster"
  say "installing slurm-wlm slurmdbd munge mariadb-server (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm slurmdbd munge mariadb-server >/dev/null
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

configure() {  # once per folder: the ports are chosen here and kept, so a restarted cluster keeps its address
  [[ -f $CONF ]] && return 0
  mkdir -p "$SLURM_DIR"/{munge,mysql,ctld,spool,log}
  chmod 755 "$SLURM_DIR/munge"  # munged wants its socket folder enterable by all
  dd if=/dev/urandom of="$SLURM_DIR/munge/munge.key" bs=128 count=1 status=none
  chmod 600 "$SLURM_DIR/munge/munge.key"
  local ctld_port slurmd_port dbd_port db_port mem
  ctld_port=$(free_port); slurmd_port=$(free_port); dbd_port=$(free_port); db_port=$(free_port)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))  # half the machine, in MB
  local auth="AuthType=auth/munge"
  cat > "$SLURM_DIR/slurmdbd.conf" <<EOF
$auth
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
PidFile=$SLURM_DIR/slurmdbd.pid
LogFile=$SLURM_DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$SLURM_DIR/slurmdbd.conf"  # slurmdbd refuses a world-readable config
  echo "$db_port" > "$SLURM_DIR/mysql.port"
  # linuxproc / task/none: no cgroups needed (containers rarely delegate them); cons_tres per CPU so that two
  # one-CPU jobs share the node
  cat > "$CONF" <<EOF
# one-node test cluster made by scripts/slurm.sh; clients: SLURM_CONF=$CONF
ClusterName=clrunner
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
$auth
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$SLURM_DIR/ctld
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
MessageTimeout=5
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  say "configured a one-node cluster in $SLURM_DIR (slurmctld on 127.0.0.1:$ctld_port)"
}

pid_of() {  # the daemon's pid when it runs, else nothing (our record: the daemons rewrite their own pid files)
  local f=$SLURM_DIR/pids/$1 p
  [[ -f $f ]] || return 1
  p=$(cat "$f" 2>/dev/null) && [[ -n $p ]] && kill -0 "$p" 2>/dev/null && echo "$p"
}

wait_for() {  # wait_for <daemon> <command...>: until the command succeeds; fails when the daemon died or at START_TIMEOUT
  local daemon=$1 t0=$SECONDS; shift
  until "$@" >/dev/null 2>&1; do
    pid_of "$daemon" >/dev/null || die "$daemon stopped while starting; see $SLURM_DIR/log/$daemon.log"
    (( SECONDS - t0 >= START_TIMEOUT )) && die "$daemon did not answer within ${START_TIMEOUT}s; see $SLURM_DIR/log/$daemon.log"
    sleep 1
  done
}

# munge on its default socket: Slurm 22.05's clients ignore AuthInfo=socket= when they talk to slurmdbd
# (sacctmgr, sacct), so the socket cannot be private. Its key and logs stay under $SLURM_DIR.
MUNGE_SOCKET=/run/munge/munge.socket.2
start_munged() {
  if [[ -S $MUNGE_SOCKET ]] && munge -n -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
    die "another munged already serves $MUNGE_SOCKET (a real SLURM set-up?); stop it or use that cluster"
  fi
  mkdir -p "$(dirname "$MUNGE_SOCKET")"
  launch munged munged --foreground --socket="$MUNGE_SOCKET" --key-file="$SLURM_DIR/munge/munge.key" \
    --pid-file="$SLURM_DIR/munged.pid" --log-file="$SLURM_DIR/log/munged.log" --seed-file="$SLURM_DIR/munge/seed"
  wait_for munged munge -n -S "$MUNGE_SOCKET"
}

launch() {  # launch <daemon> <command...>: in the foreground of its own session, its pid in <daemon>.pid at once
  local daemon=$1; shift
  mkdir -p "$SLURM_DIR/pids"
  setsid "$@" </dev/null >>"$SLURM_DIR/log/$daemon.out" 2>&1 &
  echo $! > "$SLURM_DIR/pids/$daemon"  # setsid execs in place (not a group leader here), so this is the daemon
}

start() {
  install
  configure
  export SLURM_CONF=$CONF
  pid_of munged >/dev/null || start_munged
  if ! pid_of mariadbd >/dev/null; then
    local db=$SLURM_DIR/mysql
    [[ -d $db/data/mysql ]] || mariadb-install-db --user=root --datadir="$db/data" >"$SLURM_DIR/log/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed; see $SLURM_DIR/log/mariadb-install.log"
    # a private server on 127.0.0.1 that only slurmdbd uses; without grant tables, so no password to keep
    launch mariadbd mariadbd --no-defaults --user=root --datadir="$db/data" --socket="$db/mysqld.sock" \
      --port="$(cat "$SLURM_DIR/mysql.port")" --bind-address=127.0.0.1 --skip-grant-tables \
      --pid-file="$SLURM_DIR/mariadbd.pid" --log-error="$SLURM_DIR/log/mariadbd.log"
    wait_for mariadbd test -S "$db/mysqld.sock"
  fi
  pid_of slurmdbd >/dev/null || launch slurmdbd slurmdbd -D
  wait_for slurmdbd sacctmgr -n list cluster
  pid_of slurmctld >/dev/null || launch slurmctld slurmctld -D
  wait_for slurmctld scontrol ping
  pid_of slurmd >/dev/null || launch slurmd slurmd -D -N "$NODE"
  wait_for slurmd bash -c "sinfo -h -N -o %t | grep -q -E '^(idle|mix|alloc)'"
  say "up: $(sinfo -h -o '%P %D node(s) %c CPUs %t')"
  echo "export SLURM_CONF=$CONF"
}

stop() {
  local i p t
  # jobs still queued or running would leave slurmstepd processes behind: cancel this cluster's jobs first
  if p=$(pid_of slurmctld); then
    SLURM_CONF=$CONF scancel --full --user="$(id -un)" 2>/dev/null || true
    for (( t=0; t<20; t++ )); do [[ -z $(SLURM_CONF=$CONF squeue -h 2>/dev/null) ]] && break; sleep 0.5; done
  fi
  for (( i=${#DAEMONS[@]}-1; i>=0; i-- )); do
    p=$(pid_of "${DAEMONS[i]}") || continue
    kill "$p" 2>/dev/null || true
    for (( t=0; t<20; t++ )); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$p" 2>/dev/null && { say "${DAEMONS[i]} ($p) ignored SIGTERM for 10 s: SIGKILL"; kill -9 "$p" || true; }
  done
  say "stopped"
}

status() {
  local d p
  for d in "${DAEMONS[@]}"; do
    if p=$(pid_of "$d"); then echo "$d: running ($p)"; else echo "$d: stopped"; fi
  done
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: scripts/slurm.sh install|start|stop|status" ;;
esac
