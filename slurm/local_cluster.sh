#!/usr/bin/env bash
# A real SLURM cluster on this host, for lmforge's tests and for trying lmforge on SLURM: munged,
# slurmctld and two slurmd (nodes n1, n2; partition "debug"), listening on 127.0.0.1 only.
# Everything (slurm.conf, munge key/socket, state, spool, logs, pid files) lives in one folder.
#   slurm/local_cluster.sh start  [--dir DIR] [--clean]  # idempotent; --clean forgets old jobs
#   slurm/local_cluster.sh stop   [--dir DIR]            # cancels all jobs, stops the daemons by PID
#   slurm/local_cluster.sh status [--dir DIR]            # exit 0 when up, 3 when down
#   slurm/local_cluster.sh env    [--dir DIR]            # only the `export ...` lines, for eval
# DIR: $LMFORGE_SLURM_DIR, else <repo>/.cache/slurm (/tmp/lmforge-slurm-UID-N when the checkout's
# folders are private: munged must reach its socket). Installs Debian's slurmctld slurmd slurm-client
# munge when missing (as root). No slurmdbd, so no real sacct: put the stand-in slurm/sacct first on PATH.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)   # also holds the sacct stand-in
REPO=$(dirname "$HERE")
export PATH=$PATH:/usr/sbin:/sbin                       # the daemons live in sbin
usage() { sed -n '5,8p' "$0" | sed 's/^#  //' >&2; exit 2; }

CMD=${1:-}; [ $# -gt 0 ] && shift
# munged needs go+x on every directory above its socket: a checkout under a private folder (a 700
# home, `mktemp -d`) gets a default under /tmp instead, one per checkout
others_can_enter() { local p=$1; while p=$(dirname "$p"); [ "$p" != / ]; do
  [ -n "$(find "$p" -maxdepth 0 -perm -011)" ] || return 1; done; }
if others_can_enter "$REPO/.cache"; then DEFAULT_DIR=$REPO/.cache/slurm
else DEFAULT_DIR=/tmp/lmforge-slurm-$(id -u)-$(printf %s "$REPO" | cksum | cut -d' ' -f1); fi
DIR=${LMFORGE_SLURM_DIR:-$DEFAULT_DIR}; CLEAN=0
while [ $# -gt 0 ]; do
  case $1 in
    --dir) [ $# -ge 2 ] || usage; DIR=$2; shift 2 ;;
    --dir=*) DIR=${1#--dir=}; shift ;;
    --clean) CLEAN=1; shift ;;
    *) usage ;;
  esac
done
DIR=$(realpath -m "$DIR"); CONF=$DIR/slurm.conf
MDIR=$DIR/munge; MSOCK=$MDIR/munge.socket
NODES=(n1 n2)
TIMEOUT=${LMFORGE_SLURM_TIMEOUT:-60}   # seconds that start waits for idle nodes

# Client commands must talk to *this* cluster: drop SLURM_* inherited from an outer job.
for v in $(compgen -e | grep '^SLURM_' || true); do unset "$v"; done
export SLURM_CONF=$CONF

T0=$SECONDS
log() { echo "[local_cluster +$((SECONDS - T0))s] $*" >&2; }
die() { echo "local_cluster: ERROR: $*" >&2; exit 1; }
q() { timeout 10 "$@" 2>/dev/null; }   # a client call that cannot hang on a dead controller
# A daemon is up when its pid file names a live (not zombie) process of the right name: PIDs get recycled.
pidfile() { case $1 in munged) echo "$MDIR/munged.pid" ;; slurmctld) echo "$DIR/run/slurmctld.pid" ;;
                      *) echo "$DIR/run/slurmd-$1.pid" ;; esac; }
running() { local s; s=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) && [ -n "$s" ] && [ "$s" != Z ]; }
up() {
  local p; p=$(cat "$(pidfile "$1")" 2>/dev/null) && [ -n "$p" ] && running "$p" &&
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$(case $1 in munged|slurmctld) echo "$1" ;; *) echo slurmd ;; esac)" ]
}

ensure_packages() {
  local b missing=() pkgs=(slurmctld slurmd slurm-client munge) alog=$DIR/log/apt.log
  for b in munged munge slurmctld slurmd srun sinfo scontrol; do command -v "$b" >/dev/null || missing+=("$b"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null ||
    die "missing ${missing[*]}; install: apt-get install --no-install-recommends ${pkgs[*]}"
  log "installing ${pkgs[*]} (log: $alog)"
  export DEBIAN_FRONTEND=noninteractive
  local apt=(apt-get -o DPkg::Lock::Timeout=120 install -y --no-install-recommends "${pkgs[@]}")
  # `apt-get update` only when needed: it is the slow part, and the lists are usually there.
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || ! "${apt[@]}" >>"$alog" 2>&1; then
    { apt-get -o DPkg::Lock::Timeout=120 update && "${apt[@]}"; } >>"$alog" 2>&1 ||
      { tail -n 20 "$alog" >&2; die "apt-get install failed (see $alog)"; }
  fi
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_ports() {  # PORT: slurmctld; PORT+1: SlurmdPort (unused); PORT+2, PORT+3: n1, n2
  # First try a port derived from DIR: several clusters (per-session test folders, a user's own)
  # run side by side, and one folder keeps its ports across restarts.
  local h i k ok; h=$(printf %s "$DIR" | cksum | cut -d' ' -f1)
  for k in $(seq 0 49); do
    PORT=$((20000 + (h + k * 7) % 3000 * 4)); ok=1   # 20000-31999: below the ephemeral range
    for i in 0 1 2 3; do port_free $((PORT + i)) || { ok=0; break; }; done
    [ $ok = 1 ] && return 0
  done
  die "no 4 free consecutive ports in 20000-31999"
}

write_conf() {
  # >= 2 CPUs per node so that two 1-task jobs share one; config_overrides lets a node claim more
  # than the host has. Memory is not consumable (CR_Core): RealMemory only bounds --mem requests.
  local cpus mem; cpus=${LMFORGE_SLURM_CPUS:-$(nproc)}; [ "$cpus" -ge 2 ] || cpus=2
  mem=${LMFORGE_SLURM_MEM_MB:-$(awk '/^MemTotal/ {printf "%d", $2 / 1024 / 2}' /proc/meminfo)}
  cat > "$CONF.tmp" <<EOF
# Written by slurm/local_cluster.sh at every fresh start: edits are lost.
ClusterName=lmforge
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
# bind 127.0.0.1, not every interface
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# private munged; cred_expire is also the wait before a requeued job may run again (default 120 s)
AuthInfo=socket=$MSOCK,cred_expire=10
StateSaveLocation=$DIR/state
# several slurmd on one host: %n (node name) keeps their files apart
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
MailProg=/bin/true
# no cgroups in containers: track job processes through /proc
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
# finished jobs stay in scontrol show job (so in the sacct stand-in) for a day
MinJobAge=86400
KillWait=5
InactiveLimit=0
Waittime=0
SlurmdTimeout=30
MessageTimeout=10
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + 2))-$((PORT + 3)) CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  mv "$CONF.tmp" "$CONF"
}

stop_pids() {  # NAME...: SIGTERM together, wait up to 10 s, then SIGKILL what is left
  local n p pids=() left
  for n in "$@"; do up "$n" && pids+=("$(cat "$(pidfile "$n")")"); done
  [ ${#pids[@]} -eq 0 ] || kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 100); do
    left=0; for p in "${pids[@]}"; do running "$p" && left=1; done
    [ $left = 0 ] && break; sleep 0.1
  done
  for p in "${pids[@]}"; do running "$p" && { log "force-killing $p"; kill -KILL "$p" || true; }; done
  for n in "$@"; do rm -f "$(pidfile "$n")"; done
}

show_status() {  # prints the state; 0 when every daemon is up and the controller answers
  local n bad=()
  for n in munged slurmctld "${NODES[@]}"; do up "$n" || bad+=("$n"); done
  if [ ${#bad[@]} -eq 0 ] && q scontrol ping | grep -q 'is UP'; then
    echo "local SLURM cluster UP  (dir $DIR, slurmctld port $(sed -n 's/^SlurmctldPort=//p' "$CONF"))"
    q sinfo -N -o '%N %P %t %c %m' || true
    return 0
  fi
  echo "local SLURM cluster DOWN  (dir $DIR$([ ${#bad[@]} -eq 4 ] || echo "; not up: ${bad[*]:-controller not answering}"))"
  return 3
}

print_env() { echo "export SLURM_CONF=$CONF"; echo "export PATH=$HERE:\$PATH"; }

fail() {  # MESSAGE: show the log tails, then die
  local f
  for f in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd-*.log "$DIR"/log/daemons.out "$MDIR/munged.log"; do
    [ -s "$f" ] && { echo "---- tail $f" >&2; tail -n 15 "$f" >&2; }
  done
  die "$1 (logs: $DIR/log; clean up with: $0 stop --dir $DIR)"
}

start() {
  # unix socket paths (munge's, slurmstepd's <spool>/n1_<job>.<step>) must stay under 108 bytes
  [ ${#DIR} -le 64 ] || die "'$DIR' is ${#DIR} chars long; use a shorter --dir (unix socket path limit)"
  mkdir -p "$DIR"/{state,run,log} "$MDIR" "${NODES[@]/#/$DIR/spool/}"
  exec 9>"$DIR/.lock"; flock -w 300 9 || die "another start/stop holds $DIR/.lock"
  if [ -f "$CONF" ] && show_status >/dev/null; then   # already up: a no-op
    [ $CLEAN = 0 ] || log "--clean ignored: the cluster is running (stop it first)"
    show_status; print_env; return 0
  fi
  # munged wants x for group and others on every directory above its socket
  chmod 711 "$MDIR"; chmod go+x "$DIR"
  local p=$DIR
  while p=$(dirname "$p"); [ "$p" != / ]; do
    [ -n "$(find "$p" -maxdepth 0 -perm -011)" ] || die "munged needs go+x on $p: chmod go+x $p, or use another --dir"
  done
  ensure_packages
  stop_pids "${NODES[@]}" slurmctld   # a half-running cluster is restarted whole, with a fresh config
  pick_ports
  write_conf

  if ! up munged; then
    [ -s "$MDIR/munge.key" ] || (umask 077; head -c 1024 /dev/urandom > "$MDIR/munge.key")
    rm -f "$MSOCK" "$MSOCK.lock"
    # daemons get /dev/null stdio and not the lock (fd 9): none may hold a caller's pipe or the lock
    munged --key-file="$MDIR/munge.key" --socket="$MSOCK" --pid-file="$MDIR/munged.pid" \
      --log-file="$MDIR/munged.log" --seed-file="$MDIR/munged.seed" </dev/null >>"$DIR/log/daemons.out" 2>&1 9>&- ||
      fail "munged did not start"
  fi
  timeout 5 munge -S "$MSOCK" -n </dev/null | timeout 5 unmunge -S "$MSOCK" >/dev/null || fail "munge self-test failed"

  [ $CLEAN = 1 ] && rm -rf "${DIR:?}/state"/*
  slurmctld -f "$CONF" </dev/null >>"$DIR/log/daemons.out" 2>&1 9>&- || fail "slurmctld did not start"
  local n k states
  for n in "${NODES[@]}"; do
    slurmd -f "$CONF" -N "$n" </dev/null >>"$DIR/log/daemons.out" 2>&1 9>&- || fail "slurmd $n did not start"
  done
  for ((k = 1; ; k++)); do
    states=$(q sinfo -h -N -o '%N %t' | sort -u)
    [ "$(grep -cE ' (idle|mix|alloc)$' <<<"$states")" -eq ${#NODES[@]} ] && break
    [ $((SECONDS - T0)) -ge "$TIMEOUT" ] && fail "nodes not idle after ${TIMEOUT}s: ${states:-sinfo does not answer}"
    if [ $k -ge 30 ]; then   # 3 s on, a daemon that is gone will not come back
      for n in slurmctld "${NODES[@]}"; do up "$n" || fail "$n exited"; done
    fi
    # a node drained in the saved state of an earlier run is ours to resume
    if [ $((k % 20)) = 0 ] && grep -qE ' (drain|drng|down)' <<<"$states"; then
      q scontrol update nodename="$(awk '$2 ~ /drain|drng|down/ {print $1}' <<<"$states" | paste -sd,)" state=resume || true
    fi
    sleep 0.1
  done
  log "started"
  show_status; print_env
}

stop() {
  [ -d "$DIR" ] && { exec 9>"$DIR/.lock"; flock -w 300 9 || die "another start/stop holds $DIR/.lock"; }
  local n any=0 jobs
  for n in munged slurmctld "${NODES[@]}"; do up "$n" && any=1; done
  [ $any = 1 ] || { echo "local SLURM cluster already stopped  (dir $DIR)"; return 0; }
  if up slurmctld; then
    # cancel every job first, so that no slurmstepd or job process outlives its slurmd
    jobs=$(q squeue -h -o %A | sort -u)
    if [ -n "$jobs" ]; then
      q scancel $jobs || true
      for _ in $(seq 150); do [ -z "$(q squeue -h -t R,CG,CF,S -o %A)" ] && break; sleep 0.1; done
    fi
  fi
  stop_pids "${NODES[@]}" slurmctld munged   # together: each takes ~2 s to exit on SIGTERM
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
