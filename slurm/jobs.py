"""What every ``python -m slurm.submit`` command shares: option splitting, SLURM's time format, the batch
script submitit would write, and following a job to its end."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lmforge.errors import ConfigError, LmforgeError

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}


class OptionParser(argparse.ArgumentParser):
    """Usage errors as one line (a ConfigError through run_cli), not argparse's usage text and exit 2."""

    def error(self, message: str):  # one line, through run_cli, instead of argparse's usage + exit
        raise ConfigError(f"{message}; see python -m slurm.submit --help")


def split_options(rest: Sequence[str], p: argparse.ArgumentParser) -> tuple[list[str], list[str], dict[str, str | bool]]:
    """→ (the options ``p`` knows, the stage's own args, extra sbatch options from --slurm.KEY=VALUE)."""
    ours = {a.option_strings[0]: a.nargs != 0 for a in p._actions if a.option_strings}
    submit, train, extra = [], [], {}
    i = 0
    while i < len(rest):
        a = rest[i]
        name, eq, value = a.partition("=")
        if name.startswith("--slurm."):
            key = name[len("--slurm."):].replace("_", "-")
            if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
                raise ConfigError(f"{name}: not an sbatch option name (write --slurm.exclude=n3)")
            extra[key] = value if eq else True
        elif name in ours:
            submit.append(a)
            if ours[name] and not eq:  # "--nodes 4": the value is the next word
                if i + 1 >= len(rest):
                    raise ConfigError(f"{name} needs a value")
                submit.append(rest[i + 1])
                i += 1
        elif name in ("-h", "--help"):
            p.print_help()
            raise SystemExit(0)
        else:
            train.append(a)
        i += 1
    return submit, train, extra


def parse_time(s: str) -> int:
    """SLURM's --time formats → minutes (rounded up)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s.strip())
    if not m:
        raise ConfigError(f"--time {s!r}: expected MM, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        secs = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        secs = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        secs = a * 60 + b
    else:  # MM
        secs = a * 60
    if secs <= 0:
        raise ConfigError(f"--time {s!r}: must be positive")
    return -(-secs // 60)


def sbatch_text(ex) -> str:
    """The batch script submitit would write (its %j placeholders left in)."""
    inner = ex._executor
    return inner._make_submission_file_text(inner._submitit_command_str, "dry-run")


def wait(job, poll: float) -> int:
    """Follow the job through its requeues until SLURM reports a final state; 0 only for COMPLETED."""
    from slurm.status import slurm_state

    last, unknown = None, 0
    while True:
        state = slurm_state(job.job_id)[0].split(" ")[0]  # "CANCELLED by 0" -> CANCELLED
        if state != last:
            print(f"job {job.job_id}: {state}", flush=True)
            last = state
        if state in FINAL_STATES:
            break
        unknown = unknown + 1 if state.startswith("UNKNOWN") else 0
        if unknown * poll > 300:
            raise LmforgeError(f"SLURM has not reported the state of job {job.job_id} for 5 minutes (scontrol and "
                               "sacct fail); follow it with squeue")
        time.sleep(poll)
    if state == "COMPLETED":
        try:
            result = job.task(0).result()
        except Exception as e:  # noqa: BLE001  (the job's own error, already in its log)
            raise LmforgeError(f"job {job.job_id} completed but reported an error: {_last_line(e)}") from None
        print(f"job {job.job_id} completed: {result}", flush=True)
        return 0
    err, tail = first_error(job.paths.stderr.parent, job.job_id)
    err = err or job.paths.stderr
    print(f"job {job.job_id} ended {state}{': ' + tail if tail else ''} (log: {err})", file=sys.stderr, flush=True)
    return 1


def first_error(folder: Path, job_id: str) -> tuple[Path | None, str]:
    """The error of the task that failed first, and its log: its peers' errors ("connection closed",
    killed by --kill-on-bad-exit) follow it, so the log written to last is the wrong one to quote."""
    found = []
    for err in folder.glob(f"{job_id}_*_log.err"):
        # torch prefixes a rank's traceback lines with "[rank0]: "
        lines = [re.sub(r"^\[rank\d+\]: ", "", ln) for ln in err.read_text(errors="replace").splitlines()]
        line = next((ln for ln in reversed(lines) if re.match(r"\w+(\.\w+)*(Error|Exception)\b|error: ", ln)), "")
        if line:
            found.append((err.stat().st_mtime, err, line))
    return (min(found)[1], min(found)[2]) if found else (None, "")


def _last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else repr(e)
