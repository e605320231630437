"""The run directory's checkpoint format, in one place and without torch (SLURM, the demo, both stages).

::

    RUN_DIR/checkpoints/step_00000100/           one checkpoint (DeepSpeed's files + ours)
    RUN_DIR/checkpoints/step_00000100/trainer_state.json   written last: the completeness marker
    RUN_DIR/checkpoints/step_00000100_universal/ a world-size conversion of it, made on demand
    RUN_DIR/checkpoints/latest                   the tag of the newest complete checkpoint (fsync + rename)
    RUN_DIR/checkpoints/best                     fine-tuning: JSON {tag, metric, value, step}

A checkpoint without ``trainer_state.json`` (a save killed half-way) is never loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lmforge.errors import CheckpointError
from lmforge.io import atomic_write_text
from lmforge.log import print0

CKPT = "checkpoints"
LATEST = "latest"
BEST = "best"  # never rotated away
STATE = "trainer_state.json"
_TAG = re.compile(r"step_(\d+)")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: str | Path) -> int | None:
    """The step of a checkpoint directory or tag (``step_00000100`` → 100); None for anything else
    (``step_00000100_universal`` included)."""
    m = _TAG.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoints_dir(run_dir: str | Path) -> Path:
    """``RUN_DIR/checkpoints``: the folder every checkpoint of a run lives in (it may not exist yet)."""
    return Path(run_dir) / CKPT


def checkpoint_dir(run_dir: str | Path, step_or_tag: int | str) -> Path:
    """One checkpoint's directory: ``checkpoint_dir(run, 100)`` and ``checkpoint_dir(run, "step_00000100")``
    are both ``RUN_DIR/checkpoints/step_00000100`` (complete or not, existing or not)."""
    tag = step_tag(step_or_tag) if isinstance(step_or_tag, int) else step_or_tag
    return checkpoints_dir(run_dir) / tag


def latest_file(run_dir: str | Path) -> Path:
    """``RUN_DIR/checkpoints/latest``, the file naming the newest complete checkpoint. It appears once the
    first checkpoint is complete and is replaced (atomically) by every later one: something to wait for
    or to compare modification times with. To read it, use :func:`latest_checkpoint` or :func:`latest_state`."""
    return checkpoints_dir(run_dir) / LATEST


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a run directory that has started checkpointing (it holds a ``checkpoints`` folder)."""
    return checkpoints_dir(path).is_dir()


def is_step_dir(path: str | Path) -> bool:
    """Whether ``path`` is (or claims to be) one checkpoint's directory: named ``step_…`` or holding the
    trainer state. It may still be incomplete: check :func:`is_complete` before loading it."""
    p = Path(path)
    return _TAG.match(p.name) is not None or state_file(p).is_file()


def state_file(step_dir: str | Path) -> Path:
    """``step_N/trainer_state.json``: the checkpoint's trainer state, written last (its completeness marker).
    Read it with :func:`read_state`; name it in messages as ``state_file(d).name``."""
    return Path(step_dir) / STATE


def run_dir_of(step_dir: str | Path) -> Path:
    """The run directory a checkpoint directory belongs to (``RUN_DIR/checkpoints/step_N`` → ``RUN_DIR``)."""
    return Path(step_dir).parent.parent


def is_complete(step_dir: Path) -> bool:
    """Whether the checkpoint's completeness marker (its trainer state, written last) is there."""
    return state_file(step_dir).is_file()


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step directories, oldest first."""
    root = Path(run_dir) / CKPT
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and step_of(d) is not None and is_complete(d)]
    return sorted(dirs, key=step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names; if it is unusable, the newest complete one (said aloud)."""
    root = Path(run_dir) / CKPT
    latest = root / LATEST
    if latest.is_file():
        target = root / latest.read_text().strip()
        if is_complete(target):
            newer = [d for d in root.glob("step_*") if d.is_dir() and step_of(d) is not None
                     and step_of(d) > (step_of(target) or -1) and not is_complete(d)]
            for d in newer:
                print0(f"ignoring incomplete checkpoint {d} (the save was interrupted); resuming from {target.name}")
            return target
        print0(f"{latest} names {target.name}, which is incomplete; falling back to the newest complete checkpoint")
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def has_checkpoints(run_dir: str | Path) -> bool:
    return bool(complete_checkpoints(run_dir)) or (Path(run_dir) / CKPT / LATEST).exists()


def read_state(step_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((step_dir / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{step_dir / STATE} is unreadable ({e}); resume from another checkpoint") from None


def latest_state(run_dir: str | Path) -> dict[str, Any] | None:
    """``{"tag", **trainer_state}`` of the checkpoint ``latest`` names, or None (no checkpoint yet, or torn)."""
    root = Path(run_dir) / CKPT
    try:
        tag = (root / LATEST).read_text().strip()
        return {"tag": tag, **json.loads((root / tag / STATE).read_text())}
    except (OSError, json.JSONDecodeError):
        return None


def mark_complete(step_dir: Path, state: dict[str, Any]) -> None:
    """Rank 0, after every rank's files are durable: the completeness marker, then ``latest``."""
    atomic_write_text(step_dir / STATE, json.dumps(state, indent=1))
    atomic_write_text(step_dir.parent / LATEST, step_dir.name + "\n")


def best_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The record of the best checkpoint (``checkpoints/best``), if one was marked and is complete."""
    f = Path(run_dir) / CKPT / BEST
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
    return rec if is_complete(Path(run_dir) / CKPT / rec["tag"]) else None


def mark_best(run_dir: str | Path, step_dir: Path, record: dict[str, Any]) -> None:
    """Rank 0: name ``step_dir`` the best checkpoint (atomically)."""
    atomic_write_text(Path(run_dir) / CKPT / BEST, json.dumps({"tag": step_dir.name, **record}, indent=1))


# ---------------------------------------------------------------- shards verified by this run
SHARDS_VERIFIED = "shards_verified.json"


def verified_shards(run_dir: str | Path) -> dict[str, list]:
    """``{shard path: [sha256, size, mtime_ns]}`` of the shard files this run has hashed (empty if none)."""
    f = Path(run_dir) / SHARDS_VERIFIED
    try:
        return json.loads(f.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return {}  # none yet, or unreadable: everything is hashed again, which is only slower


def mark_shards_verified(run_dir: str | Path, files: dict[str, list]) -> None:
    """Rank 0: record hashed shard files (merged with the record so far), so a requeue does not hash them again."""
    record = {**verified_shards(run_dir), **files}
    atomic_write_text(Path(run_dir) / SHARDS_VERIFIED, json.dumps({"files": record}, indent=0) + "\n")
