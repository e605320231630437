# The body of slurm/pretrain.sbatch and slurm/finetune.sbatch (sourced by them with STAGE set):
# one torchrun per node (srun), one training process per GPU (one per node on CPU), c10d rendezvous
# on the first node. On USR1 (SLURM's --signal=B:USR1@grace, or `scancel -b -s USR1 JOB`) the
# signal is forwarded to every training process, which checkpoint at the next step boundary and
# exit; this shell then requeues the job, which resumes from checkpoints/latest.
# Environment knobs: LMFORGE_REPO (default: the submit dir), LMFORGE_PYTHON, LMFORGE_NPROC_PER_NODE,
# LMFORGE_MAX_REQUEUES (default 10), LMFORGE_SHUTDOWN_TIMEOUT (s the processes get to save; default 600).
set -uo pipefail
REPO=${LMFORGE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$REPO/slurm/launch.py" ]; then
  echo "error: $REPO is not an lmforge checkout: sbatch from the checkout, or export LMFORGE_REPO=/path/to/lmforge" >&2
  exit 2
fi
if [ -z "${LMFORGE_PYTHON:-}" ]; then
  LMFORGE_PYTHON=python3; [ -x "$REPO/.venv/bin/python" ] && LMFORGE_PYTHON=$REPO/.venv/bin/python
fi
PY=$LMFORGE_PYTHON
cd "$REPO" || exit 2
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$REPO/.cache/torch_extensions}
GPUS=${SLURM_GPUS_ON_NODE:-0}
NPROC=${LMFORGE_NPROC_PER_NODE:-$(( GPUS > 0 ? GPUS : 1 ))}
# the accelerator follows the hardware, whatever the submitting shell exported (pretrain.dist refuses cpu on GPUs)
if [ "$GPUS" -gt 0 ]; then export DS_ACCELERATOR=cuda; else export DS_ACCELERATOR=cpu LMFORGE_ACCELERATOR=cpu; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_ON_NODE:-$NPROC} / NPROC > 0 ? ${SLURM_CPUS_ON_NODE:-$NPROC} / NPROC : 1 ))}

# Sensible NCCL defaults for multi-node GPU jobs (uncomment and adapt to your fabric):
# export NCCL_DEBUG=WARN                       # INFO when debugging hangs
# export NCCL_SOCKET_IFNAME=^lo,docker0        # the interface(s) for bootstrap/socket traffic
# export NCCL_IB_DISABLE=0                     # use InfiniBand when present
# export NCCL_IB_HCA=mlx5                      # which HCAs
# export NCCL_NET_GDR_LEVEL=PHB                # GPUDirect RDMA distance
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1     # a dead peer fails the job instead of hanging it
# export NCCL_TIMEOUT=1800                     # seconds before a stuck collective errors out

read -r ADDR PORT < <("$PY" -m slurm.launch rendezvous) || { echo "error: no rendezvous address" >&2; exit 2; }
# validates the config (one-line error on bad input), records the job in RUN_DIR/slurm/
LMFORGE_STATE_BEFORE=$("$PY" -m slurm.launch register "$STAGE" "$@") || exit 2
export LMFORGE_STATE_BEFORE
echo "lmforge $STAGE: job $SLURM_JOB_ID run ${SLURM_RESTART_COUNT:-0}, $SLURM_NNODES node(s) x $NPROC process(es), rendezvous $ADDR:$PORT"

SIGNALLED=0
forward_signal() {
  SIGNALLED=1
  echo "batch shell: USR1 received, forwarding it to the training processes"
  scancel --signal=USR1 "$SLURM_JOB_ID"   # every job step's tasks (the torchruns), not this shell
}
trap forward_signal USR1

# GPU nodes: the one task per node (torchrun) gets all the node's cores, unbound, for its $NPROC workers and
# their data loaders (one core per task is SLURM's default, and srun 22.05-23.02 does not inherit
# --cpus-per-task from the job); CPU jobs keep SLURM's defaults
CPU_OPTS=()
if [ "$GPUS" -gt 0 ]; then CPU_OPTS=(--cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --cpu-bind=none); fi
srun --kill-on-bad-exit=1 ${CPU_OPTS[@]+"${CPU_OPTS[@]}"} --nodes="$SLURM_NNODES" --ntasks-per-node=1 \
  "$PY" -m torch.distributed.run --nnodes "$SLURM_NNODES" --nproc_per_node "$NPROC" \
    --rdzv_backend c10d --rdzv_endpoint "$ADDR:$PORT" --rdzv_id "$SLURM_JOB_ID" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${LMFORGE_SHUTDOWN_TIMEOUT:-600}" \
    -m "$STAGE" "$@" &
SRUN=$!
while :; do   # `wait` returns early when the trap runs: wait again until srun is gone
  wait "$SRUN"; RC=$?
  kill -0 "$SRUN" 2>/dev/null || break
done
if [ "$SIGNALLED" = 1 ]; then
  # requeues (exit 0, and SLURM restarts this script) if the processes checkpointed for the signal
  "$PY" -m slurm.launch after-signal "$STAGE" "$@" && exit 0
fi
exit "$RC"
