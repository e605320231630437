#!/usr/bin/env bash
# The GPU smoke test: bench/gpu_check.sh [--dry] [--work DIR] [--out FILE] [--only NAME ...] [--expect-gpu H200]
#
# On a GPU node (one GPU is enough; sized for an H200: under 8 minutes): data → ZeRO-2 and ZeRO-3
# pretraining of a d=1024, 8-layer, seq-1024 model in bf16 on cuda/nccl → flash SDPA → SIGUSR1 checkpoint
# and resume → export checked against the engine's logits → ZeRO-3 classify fine-tune → optimizer offload.
# Prints one JSON object (also written to --out); exits 1, naming every failed check on stderr, when any
# check fails. --dry runs the same sequence on the CPU with the tiny preset (GPU-only checks skipped).
# See bench/gpu_check.py for the checks.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

DRY=0
for arg in "$@"; do
    if [[ "$arg" == "--dry" ]]; then DRY=1; fi
done

if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then
    PY="$REPO/.venv/bin/python"
else
    PY="$(command -v python3 || command -v python)"
fi

# The accelerator follows the hardware on a GPU node: a DS_ACCELERATOR=cpu or LMFORGE_ACCELERATOR inherited
# from a shell (or `make test`) would turn the GPU check into a CPU run. The dry mode asks for the CPU by name.
unset LMFORGE_ACCELERATOR
if [[ "$DRY" == 1 ]]; then
    export DS_ACCELERATOR=cpu LMFORGE_ACCELERATOR=cpu
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
    if [[ "${DS_ACCELERATOR:-}" == "cpu" ]]; then
        unset DS_ACCELERATOR
    fi
    CORES="$(nproc 2>/dev/null || echo 8)"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES < 8 ? CORES : 8 ))}"
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO/.cache/torch_extensions}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LMFORGE_PROGRESS=0
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

exec "$PY" -m bench.gpu_check "$@"
