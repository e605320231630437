"""``python -m slurm.submit {pretrain,finetune} CONFIG --nodes N --gpus-per-node G --partition P --time T [options] [--section.key=value ...]``

Submits the stage's ``main()`` as one SLURM job through submitit: N nodes × G tasks (one process
per GPU; ``--gpus-per-node 0`` runs one CPU process per node, gloo). ``--launcher torchrun`` submits
``slurm/STAGE.sbatch`` with sbatch instead (one torchrun per node). Options after the config that
are not submission options below are training-config overrides (``--run_dir=runs/x
--train.max_steps=50``); ``--slurm.KEY=VALUE`` adds ``#SBATCH --KEY=VALUE``.

GPU jobs get whole nodes: ``--exclusive``, ``--mem=0``, the node's cores shared out over its tasks,
and a checkpoint signal sized to the estimated save time (``slurm/resources.py``); CPU jobs share
their nodes.

The job's logs and submitit's files go to RUN_DIR/slurm/. It is requeued after a checkpoint when
SLURM signals the time limit (USR2, ``--grace`` seconds before) at most ``--max-requeues`` times,
and resumes from ``checkpoints/latest``. ``--dry-run`` prints the sbatch script and the resolved
training config without submitting; ``--wait`` follows the job through its requeues and exits
non-zero unless it completed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from lmforge.config import dump_yaml
from lmforge.errors import ConfigError, LmforgeError, run_cli
from slurm.jobs import OptionParser, parse_time, sbatch_text, split_options, wait
from slurm.launch import DEFAULT_MAX_REQUEUES, RECORDS, REPO, STAGES, TrainTask, append_record, stage_config
from slurm.resources import MIN_GRACE_S, STEP_AND_EXIT_S, NodeRequest, node_request

USAGE = __doc__.strip().splitlines()[0].strip("`")
def parser() -> argparse.ArgumentParser:
    p = OptionParser(prog="python -m slurm.submit", usage=USAGE, allow_abbrev=False,
                                description=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (= processes) per node; 0: one CPU process per node")
    p.add_argument("--partition", required=True, help="SLURM partition (debug on the local test cluster)")
    p.add_argument("--time", required=True, help="time limit: MM, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--mem", help="memory per node, SLURM syntax (64G, 500000M, 0 = all; GPU jobs: 0 unless given)")
    p.add_argument("--cpus-per-task", type=int,
                   help="CPU cores per task (data loading, OMP threads; GPU jobs: the node's cores / its tasks)")
    p.add_argument("--cores-per-node", type=int,
                   help="CPU cores of one node, shared out over a GPU job's tasks (default: sinfo for the partition)")
    p.add_argument("--launcher", choices=("submitit", "torchrun"), default="submitit",
                   help="submitit: one task per GPU (default); torchrun: sbatch slurm/STAGE.sbatch, one torchrun per node")
    p.add_argument("--job-name", help="default: lmforge-STAGE")
    p.add_argument("--max-requeues", type=int, default=DEFAULT_MAX_REQUEUES,
                   help=f"requeues after a time-limit checkpoint before the job fails (default {DEFAULT_MAX_REQUEUES})")
    p.add_argument("--grace", type=int,
                   help=f"seconds before the time limit at which SLURM signals the job to checkpoint (default "
                        f"{MIN_GRACE_S}; GPU jobs: {STEP_AND_EXIT_S} + twice the estimated save time, at least {MIN_GRACE_S})")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and the training config; submit nothing")
    p.add_argument("--wait", action="store_true", help="block until the job (with its requeues) ends; non-zero unless COMPLETED")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between state checks with --wait (default 5)")
    return p


def split_argv(argv: Sequence[str]) -> tuple[str, list[str], list[str], dict[str, str | bool]]:
    """→ (stage, submission options, training args, extra sbatch options from --slurm.KEY=VALUE)."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        parser().print_help()
        raise SystemExit(0 if argv else 2)
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}': usage: {USAGE} (or python -m slurm.submit build ...)")
    return (stage, *split_options(rest, parser()))


def check_args(args: argparse.Namespace) -> None:
    positive = ("nodes", "cpus_per_task", "cores_per_node")
    for name in ("nodes", "gpus_per_node", "max_requeues", "cpus_per_task", "cores_per_node", "grace"):
        v = getattr(args, name)
        if v is not None and (v < 0 or (v == 0 and name in positive)):
            raise ConfigError(f"--{name.replace('_', '-')} {v}: must be {'positive' if name in positive else '>= 0'}")
    parse_time(args.time)
    if args.wait and args.launcher == "torchrun":
        raise ConfigError("--wait follows submitit jobs; follow a --launcher torchrun job with python -m slurm.status RUN_DIR")


def check_grace(args: argparse.Namespace, request: NodeRequest) -> None:
    if request.grace_s >= parse_time(args.time) * 60:
        sized = " (sized to the estimated checkpoint save)" if args.grace is None and args.gpus_per_node else ""
        raise ConfigError(f"--grace {request.grace_s}s{sized} is not shorter than --time {args.time}; "
                          "lower --grace or give more --time")


def build_executor(args: argparse.Namespace, stage: str, folder: Path, extra: dict[str, str | bool],
                   request: NodeRequest):
    import submitit

    minutes = parse_time(args.time)
    gpus = args.gpus_per_node
    # The job runs this checkout's code with this Python; CPU runs need the cpu accelerator.
    setup = [f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}",
             f"export TORCH_EXTENSIONS_DIR=${{TORCH_EXTENSIONS_DIR:-{shlex.quote(str(REPO / '.cache' / 'torch_extensions'))}}}",
             "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"]
    # The accelerator follows the job's hardware, whatever the submitting shell exported: a GPU job
    # that inherited DS_ACCELERATOR=cpu would train on the CPU (pretrain.dist refuses that too).
    setup.append(f"export DS_ACCELERATOR={'cuda' if gpus else 'cpu'}")
    if not gpus:
        setup.append("export LMFORGE_ACCELERATOR=cpu  # asked for by name: a CPU job, even on a GPU node")
    # submitit's own timeout budget only matters if USR2 arrives before our handler is in place
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=args.max_requeues)
    params = dict(
        nodes=args.nodes, tasks_per_node=max(1, gpus), timeout_min=minutes, name=args.job_name or f"lmforge-{stage}",
        slurm_partition=args.partition, slurm_signal_delay_s=request.grace_s, slurm_setup=setup,
        # one task that fails ends the step: its peers would otherwise wait in a collective until a watchdog
        slurm_srun_args=["--kill-on-bad-exit=1"],
        slurm_additional_parameters={"requeue": True, **extra},
    )
    if gpus:
        params["gpus_per_node"] = gpus
    for opt in ("account", "qos", "constraint"):
        if getattr(args, opt) is not None:
            params[f"slurm_{opt}"] = getattr(args, opt)
    if request.mem is not None:
        params["slurm_mem"] = request.mem
    if request.cpus_per_task is not None:
        params["cpus_per_task"] = request.cpus_per_task
    if request.exclusive:
        params["slurm_exclusive"] = True
    ex.update_parameters(**params)
    return ex


def template_command(args: argparse.Namespace, stage: str, run_dir: Path, train_args: list[str],
                     extra: dict[str, str | bool], request: NodeRequest) -> tuple[list[str], dict[str, str]]:
    """(sbatch command, its environment) submitting ``slurm/STAGE.sbatch``: one task (torchrun) per node,
    the template's own ``#SBATCH`` lines overridden by the command line."""
    opts: dict[str, object] = {"job-name": args.job_name or f"lmforge-{stage}", "nodes": args.nodes,
                               "ntasks-per-node": 1, "partition": args.partition, "time": parse_time(args.time),
                               "signal": f"B:USR1@{request.grace_s}",
                               "output": f"{run_dir}/{RECORDS}/lmforge-{stage}-%j.out"}
    for opt in ("account", "qos", "constraint"):
        if getattr(args, opt) is not None:
            opts[opt] = getattr(args, opt)
    if args.gpus_per_node:
        opts["gpus-per-node"] = args.gpus_per_node
    opts.update({"mem": request.mem, "cpus-per-task": request.cpus_per_task, "exclusive": request.exclusive or None})
    opts.update(extra)
    cmd = ["sbatch", "--parsable", *(f"--{k}" if v is True else f"--{k}={v}" for k, v in opts.items() if v is not None),
           str(REPO / "slurm" / f"{stage}.sbatch"), *train_args]
    return cmd, {"LMFORGE_REPO": str(REPO), "LMFORGE_MAX_REQUEUES": str(args.max_requeues)}


def submit_template(cmd: list[str], env: dict[str, str], run_dir: Path) -> str:
    """Runs sbatch; the job id."""
    (run_dir / RECORDS).mkdir(parents=True, exist_ok=True)  # the log's folder: SLURM does not create it
    try:
        proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LmforgeError(f"sbatch could not run: {e}") from None
    if proc.returncode != 0:
        raise LmforgeError(f"sbatch refused the job: {(proc.stderr.strip().splitlines() or ['no message'])[-1]}")
    return proc.stdout.strip().split(";")[0]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["build"]:  # the data build as a job array: its own options (slurm/build_array.py)
        from slurm import build_array

        return build_array.main(argv[1:])
    stage, submit_args, train_args, extra = split_argv(argv)
    args = parser().parse_args(submit_args)
    check_args(args)
    cfg = stage_config(stage, train_args)
    run_dir = Path(cfg.run_dir).resolve()
    folder = run_dir / RECORDS
    world = args.nodes * max(1, args.gpus_per_node)
    torchrun = args.launcher == "torchrun"
    request = node_request(args, stage, cfg, 1 if torchrun else max(1, args.gpus_per_node))
    check_grace(args, request)
    if torchrun:
        return torchrun_job(args, stage, cfg, run_dir, train_args, extra, request)
    ex = build_executor(args, stage, folder, extra, request)
    if args.dry_run:
        print(f"# --- sbatch script ({args.nodes} node(s) x {max(1, args.gpus_per_node)} task(s) = world size {world}) ---")
        if request.note:
            print(f"# {request.note}")
        print(sbatch_text(ex).rstrip())
        print(f"# --- {stage} config (resolved) ---")
        print(dump_yaml(cfg), end="")
        return 0
    if request.note:
        print(request.note, flush=True)
    task = TrainTask(stage, train_args, str(run_dir), args.max_requeues)
    job = ex.submit(task)
    append_record(run_dir, "jobs.jsonl", {"job_id": job.job_id, "stage": stage, "via": "submitit", "argv": train_args,
                                          "nodes": args.nodes, "tasks_per_node": max(1, args.gpus_per_node)})
    print(f"submitted job {job.job_id}: {stage} on {args.nodes} node(s) x {max(1, args.gpus_per_node)} task(s), "
          f"logs {folder}/{job.job_id}_*_log.out; python -m slurm.status {cfg.run_dir}", flush=True)
    return wait(job, args.poll) if args.wait else 0


def torchrun_job(args: argparse.Namespace, stage: str, cfg, run_dir: Path, train_args: list[str],
                 extra: dict[str, str | bool], request: NodeRequest) -> int:
    """``--launcher torchrun``: the template job's sbatch command, printed (``--dry-run``) or run."""
    cmd, env = template_command(args, stage, run_dir, train_args, extra, request)
    nproc = max(1, args.gpus_per_node)
    if args.dry_run:
        print(f"# --- sbatch command ({args.nodes} node(s) x 1 torchrun x {nproc} process(es) = world size "
              f"{args.nodes * nproc}) ---")
        print(shlex.join([f"{k}={v}" for k, v in env.items()] + cmd))
        if request.note:
            print(f"# {request.note}")
        print(f"# --- {stage} config (resolved) ---")
        print(dump_yaml(cfg), end="")
        return 0
    if request.note:
        print(request.note, flush=True)
    job_id = submit_template(cmd, env, run_dir)
    print(f"submitted job {job_id}: {stage} on {args.nodes} node(s) x 1 torchrun x {nproc} process(es), log "
          f"{run_dir}/{RECORDS}/lmforge-{stage}-{job_id}.out; python -m slurm.status {cfg.run_dir}", flush=True)
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
