#!/usr/bin/env bash
# A real SLURM cluster on this host, for lmforge's tests and for trying lmforge's SLURM launcher:
# munged + slurmctld + two slurmd (nodes n1, n2; partition "debug") listening on 127.0.0.1 only.
# Everything (slurm.conf, munge key/socket, state, spool, logs, pid files) lives in one folder.
#
#   slurm/local_cluster.sh start  [--dir DIR] [--clean]   # idempotent; --clean forgets old jobs
#   slurm/local_cluster.sh stop   [--dir DIR]             # cancels jobs, stops daemons by PID
#   slurm/local_cluster.sh status [--dir DIR]             # exit 0 when up, 3 when down
#   slurm/local_cluster.sh env    [--dir DIR]             # just the `export ...` lines for eval
#
# DIR defaults to $LMFORGE_SLURM_DIR, else <repo>/.cache/slurm. Installs Debian's slurmctld slurmd
# slurm-client munge when they are missing (needs root). Without slurmdbd there is no real `sacct`:
# the stand-in slurm/sacct (backed by `scontrol show job`) must come first on PATH.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)   # holds the sacct stand-in
REPO=$(dirname "$HERE")
export PATH=$PATH:/usr/sbin:/sbin                       # the daemons live in sbin
usage() { sed -n '5,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

CMD=${1:-}; [ $# -gt 0 ] && shift
DIR=${LMFORGE_SLURM_DIR:-$REPO/.cache/slurm}; CLEAN=0
while [ $# -gt 0 ]; do
  case $1 in
    --dir) [ $# -ge 2 ] || usage; DIR=$2; shift 2 ;;
    --dir=*) DIR=${1#--dir=}; shift ;;
    --clean) CLEAN=1; shift ;;
    *) usage ;;
  esac
done
DIR=$(realpath -m "$DIR")
CONF=$DIR/slurm.conf
MDIR=$DIR/munge; MSOCK=$MDIR/munge.socket
NODES=(n1 n2)
TIMEOUT=${LMFORGE_SLURM_TIMEOUT:-60}   # seconds start waits for the nodes

# Client commands must talk to *this* cluster: drop any SLURM_* inherited from an outer job.
for v in $(compgen -e | grep '^SLURM_' || true); do unset "$v"; done
export SLURM_CONF=$CONF

T0=$SECONDS
log() { echo "[local_cluster +$((SECONDS - T0))s] $*" >&2; }
die() { echo "local_cluster: ERROR: $*" >&2; exit 1; }

# pid file -> live process with the expected command name (guards against recycled PIDs)
alive() {  # alive PIDFILE NAME
  local p; p=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$p" ] && kill -0 "$p" 2>/dev/null && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ]
}
pidfile() { case $1 in munged) echo "$MDIR/munged.pid" ;; slurmctld) echo "$DIR/run/slurmctld.pid" ;;
                      *) echo "$DIR/run/slurmd-$1.pid" ;; esac; }
up() { case $1 in munged|slurmctld) alive "$(pidfile "$1")" "$1" ;; *) alive "$(pidfile "$1")" slurmd ;; esac; }
# q CMD...: a client call that cannot hang when the controller is gone
q() { timeout 10 "$@" 2>/dev/null; }

# ---------------------------------------------------------------- install
ensure_packages() {
  local b missing=()
  for b in munged mungekey slurmctld slurmd srun sinfo scontrol; do command -v "$b" >/dev/null || missing+=("$b"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local pkgs=(slurmctld slurmd slurm-client munge) alog=$DIR/log/apt.log
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null ||
    die "missing ${missing[*]}; install them: apt-get install --no-install-recommends ${pkgs[*]}"
  log "installing ${pkgs[*]} (log: $alog)"
  export DEBIAN_FRONTEND=noninteractive
  local apt=(apt-get -o DPkg::Lock::Timeout=120 install -y --no-install-recommends "${pkgs[@]}")
  # `apt-get update` only when needed: it is the slow part, and the package lists are usually there.
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || ! "${apt[@]}" >>"$alog" 2>&1; then
    { apt-get -o DPkg::Lock::Timeout=120 update && "${apt[@]}"; } >>"$alog" 2>&1 ||
      { tail -n 20 "$alog" >&2; die "apt-get install failed (see $alog)"; }
  fi
  log "installed"
}

# ---------------------------------------------------------------- config
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_ports() {  # sets PORT: PORT=slurmctld, PORT+1=SlurmdPort default (unused), PORT+2.. = n1, n2
  # Start from a port derived from DIR so that several clusters (per-session test dirs, a user's
  # own) can run side by side, and reuse the same ports across restarts of one DIR.
  local h i k ok; h=$(printf %s "$DIR" | cksum | cut -d' ' -f1)
  for k in $(seq 0 49); do
    PORT=$((20000 + (h + k * 7) % 3000 * 4)); ok=1   # 20000-31999: below the ephemeral range
    for i in 0 1 2 3; do port_free $((PORT + i)) || { ok=0; break; }; done
    [ $ok = 1 ] && return 0
  done
  die "no 4 free consecutive ports found in 20000-31999"
}

write_conf() {
  local cpus mem
  # Advertise at least 2 CPUs per node (so two 1-task jobs share a node); config_overrides lets a
  # node claim more than the host has. Memory is not a consumable (CR_Core), so RealMemory only
  # bounds --mem requests: each fake node gets half of the host's memory.
  cpus=${LMFORGE_SLURM_CPUS:-$(nproc)}; [ "$cpus" -ge 2 ] || cpus=2
  mem=${LMFORGE_SLURM_MEM_MB:-$(awk '/^MemTotal/ {printf "%d", $2 / 1024 / 2}' /proc/meminfo)}
  cat > "$CONF.tmp" <<EOF
# Generated by slurm/local_cluster.sh -- rewritten at every fresh start.
ClusterName=lmforge
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
# listen on 127.0.0.1 only, not on every interface
CommunicationParameters=NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# private munged; cred_expire is also the wait before a requeued job may start again (default 120 s)
AuthInfo=socket=$MSOCK,cred_expire=10
StateSaveLocation=$DIR/state
# several slurmd on one host: %n = node name keeps their spool/pid/log files apart
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# no cgroups in containers/sandboxes: track processes through /proc
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,batch_sched_delay=0,sched_min_interval=0,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
PreemptType=preempt/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
# finished jobs stay visible to `scontrol show job` (and so to the sacct stand-in) for a day
MinJobAge=86400
KillWait=5
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + 2))-$((PORT + 3)) CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  mv "$CONF.tmp" "$CONF"
}

# ---------------------------------------------------------------- daemons
stop_pids() {  # NAME...: SIGTERM all, wait up to 10 s, then SIGKILL what is left
  local n p pids=()
  for n in "$@"; do up "$n" && pids+=("$(cat "$(pidfile "$n")")"); done
  [ ${#pids[@]} -eq 0 ] || kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 100); do
    local left=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left=1; done
    [ $left = 0 ] && break; sleep 0.1
  done
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && { log "force-killing $p"; kill -KILL "$p" || true; }; done
  for n in "$@"; do rm -f "$(pidfile "$n")"; done
}

node_states() { q sinfo -h -N -o '%N %t' | sort -u; }

show_status() {  # prints the state; returns 0 when every daemon is up and the controller answers
  local n bad=()
  for n in munged slurmctld "${NODES[@]}"; do up "$n" || bad+=("$n"); done
  if [ ${#bad[@]} -eq 0 ] && q scontrol ping | grep -q 'is UP'; then
    echo "local SLURM cluster UP  (dir $DIR, slurmctld port $(sed -n 's/^SlurmctldPort=//p' "$CONF"))"
    q sinfo -N -o '%N %P %t %c %m' || true
    return 0
  fi
  if [ ${#bad[@]} -eq 4 ]; then echo "local SLURM cluster DOWN  (dir $DIR)"
  else echo "local SLURM cluster DOWN  (dir $DIR; not running: ${bad[*]:-none, but slurmctld does not answer})"; fi
  return 3
}

print_env() {
  echo "export SLURM_CONF=$CONF"
  echo "export PATH=$HERE:\$PATH"
}

start() {
  if [ -f "$CONF" ] && show_status >/dev/null; then
    show_status; print_env; return 0   # already running: a no-op
  fi
  # unix socket paths (munge, slurmstepd's <spool>/n1_<job>.<step>) must stay under 108 bytes
  [ ${#DIR} -le 64 ] || die "dir '$DIR' is ${#DIR} chars; use a shorter --dir (unix socket path limit)"
  mkdir -p "$DIR"/{state,run,log} "$MDIR" "${NODES[@]/#/$DIR/spool/}"
  chmod 711 "$MDIR"   # munged refuses a socket dir without o+x
  ensure_packages
  # A half-running cluster (e.g. a crashed slurmd) is restarted whole, with a fresh config.
  stop_pids "${NODES[@]}" slurmctld
  pick_ports
  write_conf

  if ! up munged; then
    if [ ! -s "$MDIR/munge.key" ]; then
      (umask 077; head -c 1024 /dev/urandom > "$MDIR/munge.key.tmp") && mv "$MDIR/munge.key.tmp" "$MDIR/munge.key"
    fi
    rm -f "$MSOCK" "$MSOCK.lock"
    munged --key-file="$MDIR/munge.key" --socket="$MSOCK" --pid-file="$MDIR/munged.pid" \
           --log-file="$MDIR/munged.log" --seed-file="$MDIR/munged.seed" </dev/null >>"$DIR/log/daemons.out" 2>&1 ||
      { tail -n 5 "$MDIR/munged.log" >&2; die "munged failed to start"; }
  fi
  timeout 5 munge -S "$MSOCK" -n </dev/null | timeout 5 unmunge -S "$MSOCK" >/dev/null ||
    die "munge self-test failed (see $MDIR/munged.log)"

  # Daemons get /dev/null stdio so they never hold a caller's pipe open (pytest's capture).
  [ $CLEAN = 1 ] && rm -rf "${DIR:?}/state"/*
  slurmctld -f "$CONF" </dev/null >>"$DIR/log/daemons.out" 2>&1 || fail "slurmctld failed to start"
  for n in "${NODES[@]}"; do
    slurmd -f "$CONF" -N "$n" </dev/null >>"$DIR/log/daemons.out" 2>&1 || fail "slurmd $n failed to start"
  done
  log "daemons started; waiting for the nodes"

  local k n states
  for ((k = 1; ; k++)); do
    states=$(node_states)
    [ "$(grep -cE ' (idle|mix|alloc)$' <<<"$states")" -eq ${#NODES[@]} ] && break
    if [ $k -ge 30 ]; then   # after 3 s every daemon must still be there
      for n in slurmctld "${NODES[@]}"; do up "$n" || fail "$n exited"; done
    fi
    [ $((SECONDS - T0)) -ge "$TIMEOUT" ] && fail "nodes not idle after ${TIMEOUT}s: ${states:-sinfo does not answer}"
    # a drained node (left over in the saved state from an earlier run) is ours to resume
    if [ $((k % 20)) = 0 ] && grep -qE ' (drain|drng|down)' <<<"$states"; then
      q scontrol update nodename="$(awk '$2 ~ /drain|drng|down/ {print $1}' <<<"$states" | paste -sd,)" state=resume || true
    fi
    sleep 0.1
  done
  log "cluster up"
  show_status; print_env
}

fail() {  # fail MESSAGE: show the daemons' log tails, then die
  local f
  for f in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd-*.log "$DIR"/log/daemons.out; do
    [ -s "$f" ] && { echo "---- tail $f" >&2; tail -n 15 "$f" >&2; }
  done
  die "$1 (logs: $DIR/log; stop with: $0 stop --dir $DIR)"
}

stop() {
  local n any=0
  for n in munged slurmctld "${NODES[@]}"; do up "$n" && any=1; done
  [ $any = 1 ] || { echo "local SLURM cluster already stopped  (dir $DIR)"; return 0; }
  if up slurmctld; then
    # Cancel every job first so that no slurmstepd or job process outlives its slurmd.
    local jobs; jobs=$(q squeue -h -o %A | sort -u)
    if [ -n "$jobs" ]; then
      q scancel $jobs || true
      for _ in $(seq 100); do [ -z "$(q squeue -h -t R,CG,CF,S -o %A)" ] && break; sleep 0.1; done
    fi
  fi
  stop_pids "${NODES[@]}" slurmctld
  stop_pids munged
  rm -f "$MSOCK" "$MSOCK.lock"
  echo "local SLURM cluster stopped  (dir $DIR)"
}

case $CMD in
  start) start ;;
  stop) stop ;;
  status) show_status || exit 3 ;;
  env) print_env ;;
  *) usage ;;
esac
