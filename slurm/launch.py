"""What runs inside a SLURM job: rank set-up, the preemption protocol, and the run's job records.

:class:`TrainTask` is the callable ``python -m slurm.submit`` hands to submitit. Every task (one per
GPU, or one per node on CPU) sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from
SLURM's environment and calls the same ``main()`` as ``python -m pretrain`` / ``python -m finetune``.

Preemption, the submitit way: SLURM sends USR2 ``grace`` seconds before the time limit (and
``job._interrupt()`` sends it on demand). The trainer's :class:`~pretrain.checkpoint.Checkpointer`
already saves at the next step boundary on SIGUSR1/SIGTERM, on every rank, and returns; so USR2 is
re-sent to the process as USR1 (once the trainer listens), and after ``main()`` returns rank 0
requeues the job, which resumes from ``checkpoints/latest`` (``--resume=auto``). submitit's own
USR2 handler is replaced: it calls ``checkpoint()`` inside the signal handler on rank 0 only, and
it counts every interrupt of a job shorter than 50 minutes as a timeout (its budget is
``max_num_timeout``, default 3). Here the budget is SLURM's own restart count against
``--max-requeues``, whatever the job's length.

SIGTERM (``scancel``, an admin's ``scontrol requeue``, a preemption with GraceTime) also saves at
the next step boundary if time allows, but SLURM decides what happens next: no self-requeue.

``python -m slurm.launch rendezvous|register|after-signal`` are the helpers of the sbatch templates.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit

from lmforge.config import load_config, split_cli
from lmforge.errors import ConfigError, LmforgeError
from lmforge.rundir import latest_state

REPO = Path(__file__).resolve().parents[1]
STAGES = {  # stage -> (module whose main(argv) runs it, its config class)
    "pretrain": ("pretrain.cli", "pretrain.config:PretrainConfig"),
    "finetune": ("finetune.cli", "finetune.config:FinetuneConfig"),
}
RECORDS = "slurm"  # RUN_DIR/slurm/: submitit's logs and pickles, jobs.jsonl, attempts.jsonl
DEFAULT_MAX_REQUEUES = 10


class RequeueLimitError(LmforgeError):
    """The job was interrupted more often than ``--max-requeues`` allows."""


# ---------------------------------------------------------------- the training config of a stage
def stage_config(stage: str, train_args: Sequence[str]):
    """Load and validate the stage's config exactly as its own CLI would (bad keys fail here, early)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}': expected one of {', '.join(STAGES)}")
    mod, cls_path = STAGES[stage][1].split(":")
    cls = getattr(importlib.import_module(mod), cls_path)
    path, overrides, flags = split_cli(list(train_args))
    if flags:
        raise ConfigError(f"--{sorted(flags)[0]} is not a training option here; see python -m slurm.submit --help")
    if path is None:
        raise ConfigError(f"no config file: python -m slurm.submit {stage} CONFIG [options] [--section.key=value]")
    return load_config(cls, path, overrides)


# ---------------------------------------------------------------- rendezvous
def master_addr(first_node: str) -> str:
    """The first node's address: its host name if it resolves, else SLURM's NodeAddr for it."""
    try:
        socket.getaddrinfo(first_node, None)
        return first_node
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", first_node], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    for item in out.split():
        if item.startswith("NodeAddr="):
            return item.split("=", 1)[1]
    raise LmforgeError(f"cannot resolve the first node '{first_node}' and scontrol shows no NodeAddr for it; "
                       "set MASTER_ADDR in the job's environment")


def master_port(job_id: str, restart: int) -> int:
    """15000-19999, from the job id; the last digit is the restart count, so a requeued job does not
    meet a socket its previous run left in TIME_WAIT."""
    return 15000 + (int(job_id.split("_")[0]) * 10 + restart % 10) % 5000


def restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def first_node() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        raise LmforgeError("SLURM_JOB_NODELIST is not set: this runs inside a SLURM job only")
    out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not out.stdout.split():
        raise LmforgeError(f"scontrol show hostnames {nodes} failed: {out.stderr.strip()}")
    return out.stdout.split()[0]


# ---------------------------------------------------------------- records under RUN_DIR/slurm
def append_record(run_dir: str | Path, name: str, record: dict[str, Any]) -> None:
    d = Path(run_dir) / RECORDS
    d.mkdir(parents=True, exist_ok=True)
    with open(d / name, "a") as f:  # one short line per write: appends do not interleave
        f.write(json.dumps({"time": time.time(), **record}) + "\n")


def read_records(run_dir: str | Path, name: str) -> list[dict[str, Any]]:
    f = Path(run_dir) / RECORDS / name
    if not f.is_file():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return out


def stopped_on_signal(run_dir: str | Path, before: dict[str, Any] | None) -> dict[str, Any] | None:
    """The checkpoint this attempt saved because of a signal, if that is how it stopped."""
    now = latest_state(run_dir)
    if now is None or now.get("reason") != "signal":
        return None
    if before is not None and before.get("tag") == now["tag"] and before.get("saved_at") == now.get("saved_at"):
        return None  # the previous attempt's
    return now


def requeue(job_id: str, run_dir: str | Path, step: int | None, max_requeues: int) -> None:
    """Requeue this job, or raise :class:`RequeueLimitError` when its restarts are used up."""
    n = restart_count()
    if n >= max_requeues:
        append_record(run_dir, "attempts.jsonl", {"job_id": job_id, "restart": n, "event": "requeue_limit", "step": step})
        raise RequeueLimitError(
            f"job {job_id} was interrupted again after {n} requeue(s) (--max-requeues {max_requeues}); not requeued. The run is "
            f"checkpointed at step {step}: submit the same command again to continue"
        )
    subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, timeout=60)
    append_record(run_dir, "attempts.jsonl", {"job_id": job_id, "restart": n, "event": "requeued", "step": step})
    print(f"checkpointed at step {step}; job {job_id} requeued (restart {n + 1} of at most {max_requeues})", flush=True)


# ---------------------------------------------------------------- signals
class SignalBridge:
    """USR2 (submitit's signal) → "checkpoint, then requeue": re-sent as SIGUSR1 once the trainer's
    Checkpointer listens (it handles SIGUSR1/SIGTERM, not USR2).

    Until training starts (and after it ends) SIGUSR1 is ours too, so an early USR1/USR2 is neither
    lost nor fatal (USR1's default action kills the process): a watcher thread re-sends it once the
    Checkpointer has taken SIGUSR1 over. A USR1 that reaches the trainer directly checkpoints and
    stops it like SIGTERM: no requeue by us.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.requeue_wanted = False
        self._pending = False
        self._stop = threading.Event()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        threading.Thread(target=self._watch, name="lmforge-signal-bridge", daemon=True).start()

    def uninstall(self) -> None:
        self._stop.set()
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)

    def _handle(self, signum, frame) -> None:
        then = ", then requeue" if signum == signal.SIGUSR2 else ""
        print(f"received {signal.Signals(signum).name}: checkpoint at the next step boundary{then}", flush=True)
        self.requeue_wanted |= signum == signal.SIGUSR2
        self._pending = True
        self._forward()

    def _trainer_listens(self) -> bool:
        h = signal.getsignal(signal.SIGUSR1)
        return callable(h) and h != self._handle

    def _forward(self) -> None:
        if self._pending and self._trainer_listens():
            self._pending = False
            os.kill(os.getpid(), signal.SIGUSR1)

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            self._forward()


# ---------------------------------------------------------------- the submitit callable
class TrainTask(submitit.helpers.Checkpointable):
    """``stage`` main(argv) on every task of a SLURM job; requeued after a USR1/USR2 checkpoint."""

    def __init__(self, stage: str, train_args: Sequence[str], run_dir: str, max_requeues: int = DEFAULT_MAX_REQUEUES):
        self.stage, self.train_args, self.run_dir = stage, list(train_args), run_dir
        self.max_requeues = max_requeues

    def set_rank_env(self) -> submitit.JobEnvironment:
        job = submitit.JobEnvironment()
        os.environ.update(
            RANK=str(job.global_rank), LOCAL_RANK=str(job.local_rank), WORLD_SIZE=str(job.num_tasks),
            MASTER_ADDR=master_addr(job.hostnames[0]), MASTER_PORT=str(master_port(job.job_id, restart_count())),
        )
        return job

    def __call__(self) -> dict[str, Any]:
        job = self.set_rank_env()
        rank, job_id = job.global_rank, job.job_id
        bridge = SignalBridge()
        bridge.install()  # replaces submitit's USR2 handler (see the module docstring)
        before = latest_state(self.run_dir)
        if rank == 0:
            append_record(self.run_dir, "attempts.jsonl", {
                "job_id": job_id, "restart": restart_count(), "event": "start", "world_size": job.num_tasks,
                "nodes": os.environ.get("SLURM_JOB_NODELIST"), "step": before and before["step"]})
        try:
            main = importlib.import_module(STAGES[self.stage][0]).main
            main(self.train_args)
        except BaseException as e:
            if rank == 0:
                append_record(self.run_dir, "attempts.jsonl", {"job_id": job_id, "restart": restart_count(),
                                                               "event": "failed", "error": repr(e)[:500]})
            raise
        finally:
            bridge.uninstall()
        saved = stopped_on_signal(self.run_dir, before)
        if saved is None:  # training finished: no requeue, whatever signal came late
            final = latest_state(self.run_dir)
            if rank == 0:
                append_record(self.run_dir, "attempts.jsonl", {"job_id": job_id, "restart": restart_count(),
                                                               "event": "completed", "step": final and final["step"]})
            return {"run_dir": self.run_dir, "step": final and final["step"], "world_size": job.num_tasks}
        if rank == 0:
            if bridge.requeue_wanted:
                requeue(job_id, self.run_dir, saved["step"], self.max_requeues)
            else:
                print(f"checkpointed at step {saved['step']} on SIGTERM; SLURM decides whether the job runs again",
                      flush=True)
                append_record(self.run_dir, "attempts.jsonl", {"job_id": job_id, "restart": restart_count(),
                                                               "event": "stopped", "step": saved["step"]})
        # No result file for an interrupted attempt: submitit (and --wait) keep waiting for the requeued run.
        raise SystemExit(0)

    # checkpoint() is submitit's default (the same task again): it is only reached if USR2 comes before
    # __call__ replaced submitit's handler, and the requeued task resumes from checkpoints/latest anyway.


# ---------------------------------------------------------------- helpers for the sbatch templates
def _sbatch_cli(argv: list[str]) -> int:
    usage = ("usage: python -m slurm.launch rendezvous | register STAGE CONFIG [overrides] | "
             "after-signal STAGE CONFIG [overrides]")
    if not argv:
        raise ConfigError(usage)
    cmd, rest = argv[0], argv[1:]
    if cmd == "rendezvous":  # "ADDR PORT" for torchrun --rdzv_endpoint
        print(master_addr(first_node()), master_port(os.environ["SLURM_JOB_ID"], restart_count()))
        return 0
    if cmd not in ("register", "after-signal") or not rest:
        raise ConfigError(usage)
    cfg = stage_config(rest[0], rest[1:])
    job_id = os.environ.get("SLURM_JOB_ID", "")
    max_requeues = int(os.environ.get("LMFORGE_MAX_REQUEUES", DEFAULT_MAX_REQUEUES))
    if cmd == "register":  # at the start of every run of the batch script
        if job_id not in {r.get("job_id") for r in read_records(cfg.run_dir, "jobs.jsonl")}:
            append_record(cfg.run_dir, "jobs.jsonl", {"job_id": job_id, "stage": rest[0], "via": "sbatch",
                                                      "argv": rest[1:], "nodes": os.environ.get("SLURM_JOB_NUM_NODES")})
        state = latest_state(cfg.run_dir)
        append_record(cfg.run_dir, "attempts.jsonl", {"job_id": job_id, "restart": restart_count(), "event": "start",
                                                      "nodes": os.environ.get("SLURM_JOB_NODELIST"),
                                                      "step": state and state["step"]})
        print(json.dumps(state) if state else "null")  # the template compares it after the run
        return 0
    # after-signal: the training processes stopped after a USR1; requeue if they checkpointed for it
    before = json.loads(os.environ.get("LMFORGE_STATE_BEFORE") or "null")
    saved = stopped_on_signal(cfg.run_dir, before)
    if saved is None:
        print("no checkpoint was saved for the signal (the run had finished, or failed): not requeued", flush=True)
        append_record(cfg.run_dir, "attempts.jsonl", {"job_id": job_id, "restart": restart_count(), "event": "ended"})
        return 1
    requeue(job_id, cfg.run_dir, saved["step"], max_requeues)
    return 0


if __name__ == "__main__":
    from lmforge.errors import run_cli

    sys.exit(run_cli(_sbatch_cli, sys.argv[1:]))
