"""``python -m pretrain.verify RUN_DIR`` (or one ``RUN_DIR/checkpoints/step_N``): check checkpoints' files.

One line per checkpoint, oldest first: ``ok``, ``damaged`` (which file and why: size X expected Y, sha256
mismatch, missing), ``incomplete`` (its save was interrupted; never resumed from) or ``no manifest``
(saved by an older lmforge; not verifiable). Every file is re-hashed (8 MiB reads), in this one process.
Exit code 1 when the checkpoint a resume would take first (``latest``) is damaged, else 0. Imports no torch.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Sequence
from pathlib import Path

from lmforge.errors import CheckpointError, run_cli
from lmforge.rundir import (
    checkpoint_problems,
    checkpoints_dir,
    is_complete,
    is_run_dir,
    join_problems,
    latest_checkpoint,
    manifest_file,
    state_file,
    step_of,
)


def status(step_dir: Path) -> tuple[str, bool]:
    """(the line for ``step_dir``, whether it is damaged)."""
    if not is_complete(step_dir):
        return f"{step_dir.name}: incomplete (no {state_file(step_dir).name}: its save was interrupted)", False
    problems = checkpoint_problems(step_dir)
    if problems is None:
        return f"{step_dir.name}: no manifest (no {manifest_file(step_dir).name}: saved by an older lmforge)", False
    if problems:
        return f"{step_dir.name}: damaged: {join_problems(problems, shown=10)}", True
    return f"{step_dir.name}: ok", False


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    path = Path(args[0])
    if is_run_dir(path):
        steps = sorted((d for d in checkpoints_dir(path).iterdir() if d.is_dir() and step_of(d) is not None),
                       key=step_of)
        with contextlib.redirect_stdout(io.StringIO()):  # its notes speak of resuming
            latest = latest_checkpoint(path)
    elif path.is_dir():
        steps, latest = [path], path
    else:
        raise CheckpointError(f"{path}: neither a run directory with checkpoints nor a checkpoint directory")
    if not steps:
        raise CheckpointError(f"{path}: no checkpoints")
    bad_latest = False
    for d in steps:
        line, damaged = status(d)
        print(line + ("  (latest)" if d == latest else ""), flush=True)
        bad_latest |= damaged and d == latest
    return 1 if bad_latest else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
