"""What a job asks of its nodes beyond their number: GPU jobs own them, CPU jobs share as before.

A GPU job (``--gpus-per-node G`` > 0) asks for

- ``--exclusive`` and ``--mem=0`` (all of each node's memory): another job's data loaders, page cache
  or host-memory peaks on the same node slow every rank of this one (a collective waits for the slowest),
  and the host memory holds ZeRO offload, pinned buffers and the loader;
- ``--cpus-per-task``: the node's cores shared out over its tasks. submitit jobs run one task per GPU
  (cores ÷ G each, so SLURM binds each rank to its own cores); the torchrun templates run one task per
  node with all the cores, started with ``srun --cpu-bind=none`` (``slurm/torchrun_job.sh``) so that
  torchrun's G workers are not pinned to the cores of one. The cores come from ``--cores-per-node`` or
  from ``sinfo`` for the partition (its smallest node);
- a checkpoint warning sized to the save: ``STEP_AND_EXIT_S`` + twice the save time that ``python -m
  pretrain CONFIG --dry-run`` estimates (``pretrain.estimate``; ``LMFORGE_SAVE_GIBPS`` is the assumed
  write speed), never below ``MIN_GRACE_S``. Twice, because the estimate assumes a bandwidth, and a
  shared filesystem under load at the end of many jobs' time limits is slower.

A CPU job (``--gpus-per-node 0``, the local test cluster) asks for none of these: shared nodes, SLURM's
memory and CPU defaults, the signal ``MIN_GRACE_S`` before its time limit. Explicit ``--mem``,
``--cpus-per-task`` and ``--grace`` win for both.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from argparse import Namespace
from dataclasses import dataclass

from lmforge.errors import ConfigError, LmforgeError

MIN_GRACE_S = 120  # the signal never comes later than this before the time limit
STEP_AND_EXIT_S = 60  # the step in flight when the signal comes, the processes' exit and the requeue


@dataclass(frozen=True)
class NodeRequest:
    exclusive: bool
    mem: str | None  # SLURM's --mem, None: the partition's default
    cpus_per_task: int | None  # None: SLURM's default (1)
    grace_s: int  # seconds between the checkpoint signal and the time limit
    note: str  # one line for GPU jobs (what they ask for and why), "" for CPU jobs


def node_request(args: Namespace, stage: str, cfg, tasks_per_node: int) -> NodeRequest:
    """The node resources of a job of ``args.nodes`` x ``tasks_per_node`` tasks (submitit: one per GPU;
    the torchrun templates: one per node) training ``cfg``."""
    gpus = args.gpus_per_node
    if not gpus:
        if args.cores_per_node is not None:
            raise ConfigError("--cores-per-node sizes a GPU job's --cpus-per-task; for a CPU job give --cpus-per-task")
        return NodeRequest(False, args.mem, args.cpus_per_task, MIN_GRACE_S if args.grace is None else args.grace, "")
    cpus, cpus_why = args.cpus_per_task, "given"
    if cpus is None:
        cores, source = (args.cores_per_node, "") if args.cores_per_node else (partition_cores(args.partition), ", sinfo")
        if cores < tasks_per_node:
            raise ConfigError(f"--cores-per-node {cores}: fewer cores than the {tasks_per_node} tasks per node")
        cpus, cpus_why = cores // tasks_per_node, f"{cores} per node / {tasks_per_node} task(s){source}"
    if args.grace is not None:
        grace, grace_why = args.grace, "--grace"
    else:
        world = args.nodes * gpus
        saved = estimated_save(stage, cfg, world)
        if saved is None:
            grace, grace_why = MIN_GRACE_S, "the floor: checkpoint size unknown"
        else:
            gib, seconds, gibps = saved
            grace = max(MIN_GRACE_S, math.ceil(STEP_AND_EXIT_S + 2 * seconds))
            grace_why = (f"{STEP_AND_EXIT_S} s + 2 x {seconds:g} s to save {gib:g} GiB at {gibps:g} GiB/s, at least "
                         f"{MIN_GRACE_S}; LMFORGE_SAVE_GIBPS=N or --grace S to change")
    mem = "0" if args.mem is None else args.mem
    note = (f"whole nodes (--exclusive, --mem={mem}), {cpus} CPUs per task ({cpus_why}), checkpoint signal "
            f"{grace} s before the time limit ({grace_why})")
    return NodeRequest(True, mem, cpus, grace, note)


def partition_cores(partition: str) -> int:
    """CPUs of the partition's smallest node, from ``sinfo`` (``96`` or ``96+`` per node group)."""
    cmd = ["sinfo", "--noheader", f"--partition={partition}", "--format=%c"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        counts = [int(w.rstrip("+")) for w in out.stdout.split() if w.rstrip("+").isdigit()]
        why = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1] if out.returncode else "no nodes"
    except (OSError, subprocess.TimeoutExpired) as e:
        out, counts, why = None, [], str(e)
    if out is None or out.returncode or not counts:
        raise ConfigError(f"cannot read the cores of partition {partition}'s nodes ({' '.join(cmd)}: {why}); "
                          "pass --cores-per-node N or --cpus-per-task N")
    return min(counts)


def estimated_save(stage: str, cfg, world: int) -> tuple[float, float, float] | None:
    """(GiB, seconds, assumed GiB/s) of one checkpoint save, as the stage's dry run estimates it; None
    (with a line on stderr) where a fine-tune's backbone cannot be read yet."""
    from pretrain.estimate import GiB, checkpoint_bytes, save_gib_per_s

    if stage == "pretrain":
        from pretrain.cli import estimate_vocab_size
        from pretrain.estimate import describe

        c = describe(cfg, estimate_vocab_size(cfg), world)["checkpoint"]
        return c["save_gib"], c["save_seconds"], c["assumed_write_gib_per_s"]
    from finetune.estimate import ASSUMED_DEVICE_GIB, describe

    try:  # sized from the backbone's config files only, as `python -m finetune --dry-run` does
        info = describe(copy.deepcopy(cfg), world, int(ASSUMED_DEVICE_GIB * GiB))
    except (LmforgeError, OSError) as e:
        print(f"warning: checkpoint size unknown ({e}); the checkpoint signal comes {MIN_GRACE_S} s before the time "
              "limit: --grace S to give a large model more", file=sys.stderr)
        return None
    precision = "bf16" if cfg.precision == "auto" else cfg.precision
    # optimizer states counted for every parameter: an upper bound where layers are frozen
    gib = checkpoint_bytes(info["n_params"], world, info["zero_stage"], precision)["total"] / GiB
    gibps = save_gib_per_s()
    return round(gib, 3), round(gib / gibps, 1), gibps
