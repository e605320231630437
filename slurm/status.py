"""``python -m slurm.status RUN_DIR`` — the SLURM jobs of a run: id, state, requeues, latest checkpoint, last metrics, goodput.

Reads RUN_DIR/slurm/jobs.jsonl and attempts.jsonl (written by ``slurm.submit`` and the sbatch
templates), asks SLURM for each job's state (``scontrol show job``, else ``sacct``), and reads the
checkpoint ``checkpoints/latest`` names and the newest TensorBoard scalars. Nothing is changed.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError, run_cli
from lmforge.rundir import latest_state
from lmforge.tensorboard import read_scalars, tensorboard_dir
from pretrain.goodput import account, read_segments
from slurm.launch import read_records

USAGE = __doc__.strip().splitlines()[0].split(" — ")[0].strip("`")


def slurm_state(job_id: str) -> tuple[str, int | None]:
    """(state, restarts) from slurmctld, or sacct's state once slurmctld forgot the job."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
        kv = dict(item.split("=", 1) for item in out.stdout.split() if "=" in item)
        if out.returncode == 0 and kv.get("JobState"):
            return kv["JobState"], int(kv.get("Restarts", "0"))
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True,
                             timeout=30)
        states = [s for s in out.stdout.splitlines() if s.strip()]
        return (states[-1].split(" ")[0] if states else "UNKNOWN"), None
    except (OSError, subprocess.TimeoutExpired):
        return "UNKNOWN (no SLURM client here)", None


def last_metrics(run_dir: Path) -> tuple[int, dict[str, float]] | None:
    """The newest logged step's scalars (train/*, eval/*) from TensorBoard."""
    tb = tensorboard_dir(run_dir)
    if not tb.is_dir():
        return None
    latest = {tag: points[-1] for tag, points in read_scalars(tb, newest_only=True).items()}
    if not latest:
        return None
    step = max(s for s, _ in latest.values())
    return step, {t: v for t, (s, v) in latest.items() if s == step}


def job_rows(run_dir: Path) -> list[dict[str, Any]]:
    attempts = read_records(run_dir, "attempts.jsonl")
    rows = []
    for job in read_records(run_dir, "jobs.jsonl"):
        jid = str(job["job_id"])
        mine = [a for a in attempts if str(a.get("job_id")) == jid]
        state, restarts = slurm_state(jid)
        if restarts is None:  # slurmctld forgot the job: count the runs this job recorded
            restarts = max((a.get("restart", 0) for a in mine), default=0)
        last = mine[-1]["event"] if mine else "-"
        rows.append({"job_id": jid, "stage": job.get("stage", "?"), "via": job.get("via", "?"), "state": state,
                     "requeues": restarts, "last_event": last})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0].startswith("-"):
        raise ConfigError(f"usage: {USAGE}")
    run_dir = Path(argv[0])
    if not run_dir.is_dir():
        raise ConfigError(f"run dir {run_dir} does not exist: pass the run_dir of a submitted run")
    rows = job_rows(run_dir)
    print(f"run {run_dir}")
    if not rows:
        print("  no SLURM jobs recorded (RUN_DIR/slurm/jobs.jsonl is missing: not submitted with slurm.submit "
              "or the sbatch templates)")
    for r in rows:
        print(f"  job {r['job_id']:>8}  {r['stage']:<8} {r['via']:<8} state {r['state']:<12} "
              f"requeues {r['requeues']}  last event {r['last_event']}")
    st = latest_state(run_dir)
    if st is None:
        print("latest checkpoint: none")
    else:
        print(f"latest checkpoint: {st['tag']} (step {st['step']}, {st.get('tokens_seen', 0):,} tokens, "
              f"{st.get('world_size', '?')} rank(s), saved for: {st.get('reason', '?')})")
    m = last_metrics(run_dir)
    if m is None:
        print("last metrics: none yet")
    else:
        step, scalars = m
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(scalars.items()) if k.split("/")[0] in ("train", "eval"))
        print(f"last metrics (step {step}): {shown}")
    segments = read_segments(run_dir)
    if segments:
        acc = account(segments)
        print(f"goodput: {acc['fraction']:.1%} of {acc['wall']:.0f} s over {len(segments)} segment(s), "
              f"{acc['parts']['lost']:.0f} s of lost work (python -m pretrain.goodput {run_dir} for the table)")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
