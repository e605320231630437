"""``python -m slurm.submit build --nodes N --partition P --time T [--array K] [--cpus-per-task C] [options] --input ... --tokenizer DIR --out OUT [build options]``

The data build as a SLURM job array (see data_pipeline/array.py): the inputs are planned into K
parts (default: as many as run at once on N nodes), each part is one array task on C cores
(``--cpus-per-task``, default 4: one part's main process keeps about 5 tokenizer workers busy, so a
bigger node runs several parts), at most N nodes' worth at a time; a merge job that depends on the whole array writes ``OUT/manifest.json``. The result is
byte for byte the token stream of ``python -m data_pipeline build`` with the same inputs and
options, in other shard files.

A task killed (``kill -9``, a node failure, the time limit) resumes where its part stands when run
again; the merge refuses while any part is incomplete and names them. Submitting the same command
again plans the same parts (a changed input is refused), submits only the incomplete ones, then the
merge: a failed task is retried alone. Build options other than ``--workers`` (= C) and
``--no-progress`` are the ones of ``python -m data_pipeline build``; ``--dedup`` cannot run as an
array. Logs and submitit's files go to OUT/slurm/. ``--dry-run`` prints the plan and the array's
sbatch script and writes nothing; ``--wait`` follows the merge job and exits non-zero unless the
build completed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from data_pipeline import array
from data_pipeline.cli import add_build_options, build_settings, fixed_mmap_threshold
from lmforge.errors import ConfigError
from slurm.jobs import FINAL_STATES, OptionParser, parse_time, sbatch_text, split_options, wait
from slurm.launch import RECORDS, REPO, append_record, read_records
from slurm.resources import partition_cores

USAGE = __doc__.strip().splitlines()[0].strip("`")
# One part's build has one main process that reads and decodes the documents and writes the shards for its
# tokenizer workers: it keeps about 5 of them busy (bench data_pipeline.where.*: 0.25 CPU-s of main process
# per 1.27 of workers), so a bigger node runs several parts at once.
DEFAULT_CPUS_PER_TASK = 4
HOOK_ENV = "LMFORGE_BUILD_HOOK"  # MODULE:FUNCTION; FUNCTION(part) -> on_shard(out, n) or None (tests' fault injection)


def parser() -> argparse.ArgumentParser:
    p = OptionParser(prog="python -m slurm.submit build", usage=USAGE, allow_abbrev=False,
                description=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, required=True, help="nodes the array may occupy at once")
    p.add_argument("--partition", required=True, help="SLURM partition (debug on the local test cluster)")
    p.add_argument("--time", required=True, help="time limit of each task: MM, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    p.add_argument("--array", type=int, help="number of parts = array tasks (default: the tasks that run at once)")
    p.add_argument("--cpus-per-task", type=int,
                   help=f"cores (tokenizer processes) per part (default: {DEFAULT_CPUS_PER_TASK}, or a smaller node's all)")
    p.add_argument("--cores-per-node", type=int, help="CPU cores of one node (default: sinfo for the partition)")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--mem", help="memory per task, SLURM syntax (the build's memory is flat: a few GB)")
    p.add_argument("--job-name", help="default: lmforge-build")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the sbatch script; write and submit nothing")
    p.add_argument("--wait", action="store_true", help="block until the merge job ends; non-zero unless the build completed")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between state checks with --wait (default 5)")
    return p


def _build_parser() -> argparse.ArgumentParser:
    b = OptionParser(prog="python -m slurm.submit build ... (build options)", allow_abbrev=False)
    add_build_options(b)
    return b


# ---------------------------------------------------------------- what runs in the jobs
class BuildPartTask:
    """Array task: one part of the planned build in ``out`` (resumes a part a killed task left)."""

    def __init__(self, out: str, workers: int):
        self.out, self.workers = out, workers

    def __call__(self, part: int) -> dict[str, Any]:
        fixed_mmap_threshold()
        m = array.build_part(self.out, part, workers=self.workers, on_shard=_hook(part))
        tr = m["splits"]["train"]
        return {"part": part, "tokens": tr["tokens"], "documents": tr["documents"], "shards": len(tr["shards"])}


class MergeTask:
    """The job after the array: the shard directory's manifest, or an error naming the incomplete parts."""

    def __init__(self, out: str, rerun: str):
        self.out, self.rerun = out, rerun

    def __call__(self) -> dict[str, Any]:
        m = array.merge(self.out, rerun_hint=self.rerun)
        return {"out": self.out, "train_tokens": m["splits"]["train"]["tokens"], "parts": m["array"]["parts"],
                "fingerprint": m["fingerprint"]}


def _hook(part: int) -> Callable[[Path, int], None] | None:
    spec = os.environ.get(HOOK_ENV)
    if not spec:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)(part)


# ---------------------------------------------------------------- submission
def main(argv: Sequence[str]) -> int:
    submit_args, build_args, extra = split_options(list(argv), parser())
    args = parser().parse_args(submit_args)
    b = _build_parser().parse_args(build_args)
    for name in ("nodes", "array", "cpus_per_task", "cores_per_node"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {v}: must be positive")
    minutes = parse_time(args.time)
    # without --cores-per-node, sinfo says how many parts fit a node; --cpus-per-task alone: one part per node
    node_cores = args.cores_per_node or (None if args.cpus_per_task else partition_cores(args.partition))
    cpus = args.cpus_per_task or min(node_cores, DEFAULT_CPUS_PER_TASK)
    at_once = args.nodes * max(1, node_cores // cpus) if node_cores else args.nodes
    out = Path(b.out).resolve()
    _refuse_while_running(out)
    parts = args.array or array.planned_parts(out) or at_once  # a resubmission keeps the plan's parts
    plan = array.plan_build(b.input, b.tokenizer, out, parts, **build_settings(b), write=not args.dry_run)
    n = len(plan["parts"])
    states = array.part_states(out, plan)
    todo = [i for i, st in enumerate(states) if st != "complete"]
    again = shlex.join(["python", "-m", "slurm.submit", "build", *argv])
    rerun = f"submit the same command again, only those parts run: {again}"

    ex = _executor(args, out, extra, minutes, cpus, at_once)
    if args.dry_run:
        for i, (specs, size) in enumerate(zip(plan["parts"], plan["bytes"])):
            print(f"# part {i} [{states[i]}]: {len(specs)} input(s), {size / 2**20:,.1f} MiB: {specs[0]}"
                  f"{' ...' if len(specs) > 1 else ''}")
        inner = ex._executor
        inner.parameters["map_count"] = max(1, len(todo))
        print(f"# --- sbatch script of the array ({len(todo)} of {n} part(s), {at_once} at a time, {cpus} core(s) "
              "each), then a merge job after it ---")
        print(sbatch_text(ex).rstrip())
        return 0
    if (out / array.MANIFEST).is_file():
        print(f"{out} is already built ({n} parts merged): nothing to submit", flush=True)
        return 0
    jobs = ex.map_array(BuildPartTask(str(out), cpus), todo) if todo else []
    array_id = jobs[0].job_id.split("_")[0] if jobs else None
    ex.update_parameters(cpus_per_task=1, slurm_array_parallelism=1, name=f"{args.job_name or 'lmforge-build'}-merge",
                         slurm_additional_parameters={**extra, **({"dependency": f"afterany:{array_id}"} if array_id else {})})
    merge_job = ex.submit(MergeTask(str(out), rerun))
    append_record(out, "jobs.jsonl", {"job_id": array_id, "merge_job_id": merge_job.job_id, "stage": "build",
                                      "via": "submitit", "argv": list(argv), "parts": todo, "of": n})
    if todo:
        print(f"submitted array job {array_id}: {len(todo)} of {n} part(s) ({', '.join(map(str, todo[:20]))}"
              f"{' ...' if len(todo) > 20 else ''}), {at_once} at a time x {cpus} core(s); logs {out / RECORDS}/", flush=True)
    print(f"submitted merge job {merge_job.job_id} (after the array) → {out / array.MANIFEST}", flush=True)
    return wait(merge_job, args.poll) if args.wait else 0


def _refuse_while_running(out: Path) -> None:
    """A second submission while the first one's merge has not ended would build its parts twice at once."""
    from slurm.status import slurm_state  # reads goodput records too: imported when needed

    last = (read_records(out, "jobs.jsonl") or [None])[-1]
    if last and last.get("merge_job_id"):
        state = slurm_state(last["merge_job_id"])[0].split(" ")[0]
        if state not in FINAL_STATES and not state.startswith("UNKNOWN"):
            raise ConfigError(f"the build of {out} submitted before (merge job {last['merge_job_id']}, array "
                              f"{last.get('job_id')}) is still {state}; wait for it or scancel both, then submit again")


def _executor(args: argparse.Namespace, out: Path, extra: dict[str, str | bool], minutes: int, cpus: int, at_once: int):
    import submitit

    ex = submitit.AutoExecutor(folder=out / RECORDS, cluster="slurm")
    params: dict[str, Any] = dict(
        nodes=1, tasks_per_node=1, cpus_per_task=cpus, timeout_min=minutes, name=args.job_name or "lmforge-build",
        slurm_partition=args.partition, slurm_array_parallelism=at_once,
        slurm_setup=[f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}",
                     "export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false"],
        # a task lost with its node runs again (and resumes its part)
        slurm_additional_parameters={"requeue": True, **extra},
    )
    for opt in ("account", "qos", "constraint", "mem"):
        if getattr(args, opt) is not None:
            params[f"slurm_{opt}"] = getattr(args, opt)
    ex.update_parameters(**params)
    return ex


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
