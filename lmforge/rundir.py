"""The run directory's checkpoint format, in one place and without torch (SLURM, the demo, both stages).

::

    RUN_DIR/checkpoints/step_00000100/           one checkpoint (DeepSpeed's files + ours)
    RUN_DIR/checkpoints/step_00000100/checkpoint_manifest.json  every other file's size and sha256 (before the state)
    RUN_DIR/checkpoints/step_00000100/trainer_state.json   written last: the completeness marker
    RUN_DIR/checkpoints/step_00000100_universal/ a world-size conversion of it, made on demand
    RUN_DIR/checkpoints/latest                   the tag of the newest complete checkpoint (fsync + rename)
    RUN_DIR/checkpoints/best                     fine-tuning: JSON {tag, metric, value, step}

A checkpoint without ``trainer_state.json`` (a save killed half-way) is never loaded; one whose files
differ from its manifest (a torn copy, a bad disk) is damaged (:func:`checkpoint_problems`).
"""

from __future__ import annotations

import hashlib
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
MANIFEST = "checkpoint_manifest.json"  # {"files": {relative path: {"size", "sha256"}}}, written before STATE
VERIFY_DIR = ".checkpoint_verify"  # RUN_DIR/.checkpoint_verify/: each rank's share of a resume's hash check
HASH_CHUNK = 8 << 20  # files are hashed in 8 MiB reads, never read whole
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


# ---------------------------------------------------------------- data skipped by loss-spike rollbacks
DATA_SKIPS = "data_skips.json"


def data_skips(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rollbacks of this run, oldest first: ``{"start", "end", "from_step", "to_step", "spike_steps"}``;
    global samples ``[start, end)`` are never trained on again (a resume applies them too)."""
    f = Path(run_dir) / DATA_SKIPS
    try:
        return json.loads(f.read_text())["skips"]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{f} is unreadable ({e}): it lists the data ranges rollbacks skipped; "
                              "restore it or delete it to train on them again") from None


def add_data_skip(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Rank 0: append one rollback's skipped range (atomically, before the run goes on)."""
    skips = [*data_skips(run_dir), record]
    atomic_write_text(Path(run_dir) / DATA_SKIPS, json.dumps({"skips": skips}, indent=1) + "\n")


def abandon_checkpoints_after(run_dir: str | Path, step: int) -> list[Path]:
    """Rank 0, on a rollback to ``step``: point ``latest`` at it and rename the newer checkpoints (saved on
    the abandoned trajectory) to ``rolled_back_step_N`` so that no resume picks them; returns them."""
    import shutil

    root = Path(run_dir) / CKPT
    # their universal conversions too: a later checkpoint of the same step must not reuse one
    newer = [d for d in root.glob("step_*") if d.is_dir()
             and (m := _TAG.match(d.name)) and int(m.group(1)) > step]
    atomic_write_text(root / LATEST, step_tag(step) + "\n")
    moved = []
    for d in sorted(newer):
        dst = root / f"rolled_back_{d.name}"
        shutil.rmtree(dst, ignore_errors=True)
        d.rename(dst)
        moved.append(dst)
    return moved


# ---------------------------------------------------------------- the file manifest of a checkpoint
def manifest_file(step_dir: str | Path) -> Path:
    """``step_N/checkpoint_manifest.json``: size and sha256 of every other file of the checkpoint."""
    return Path(step_dir) / MANIFEST


def checkpoint_files(step_dir: str | Path) -> list[str]:
    """The files a manifest records: every file under ``step_dir`` (relative, ``/``-separated, sorted) but
    the trainer state and the manifest themselves."""
    root = Path(step_dir)
    return sorted(f.relative_to(root).as_posix() for f in root.rglob("*")
                  if f.is_file() and f.relative_to(root).as_posix() not in (STATE, MANIFEST))


_OWNER = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)")


def file_owner(rel: str, world: int) -> int:
    """The rank that wrote a checkpoint file (``zero_pp_rank_3_…``, ``rng_rank00003.pt`` → 3); rank 0 for
    the rest (``mp_rank_00_model_states.pt``, anything unknown). Every file has exactly one owner."""
    m = _OWNER.search(Path(rel).name)
    r = int(m.group(1)) if m else 0
    return r if r < world else 0


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_files(step_dir: str | Path, rels: list[str]) -> dict[str, dict[str, Any]]:
    """``{rel: {"size", "sha256"}}`` of the given files of ``step_dir`` (the manifest's entries)."""
    return {rel: {"size": (Path(step_dir) / rel).stat().st_size, "sha256": file_sha256(Path(step_dir) / rel)}
            for rel in rels}


def write_manifest(step_dir: str | Path, files: dict[str, dict[str, Any]]) -> None:
    """Rank 0, after every rank's files are durable and before :func:`mark_complete`: a complete checkpoint
    always has its manifest."""
    atomic_write_text(manifest_file(step_dir), json.dumps({"format": 1, "files": dict(sorted(files.items()))}, indent=0))


def read_manifest(step_dir: str | Path) -> dict[str, dict[str, Any]] | None:
    """The manifest's ``{rel: {"size", "sha256"}}``; None for a checkpoint saved before manifests existed;
    :class:`CheckpointError` when it is there but unreadable."""
    f = manifest_file(step_dir)
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{MANIFEST}: unreadable ({type(e).__name__})") from None


def size_problems(step_dir: str | Path, manifest: dict[str, dict[str, Any]]) -> list[str]:
    """What is wrong with the files' sizes (stat only: cheap on every rank): ``"REL: missing"``,
    ``"REL: size X expected Y"``."""
    out = []
    for rel, want in sorted(manifest.items()):
        try:
            size = (Path(step_dir) / rel).stat().st_size
        except OSError:
            out.append(f"{rel}: missing")
            continue
        if size != want["size"]:
            out.append(f"{rel}: size {size} expected {want['size']}")
    return out


def hash_problems(step_dir: str | Path, manifest: dict[str, dict[str, Any]], rels: list[str]) -> list[str]:
    """``"REL: sha256 mismatch"`` for each of ``rels`` whose content differs from the manifest (streamed)."""
    return [f"{rel}: sha256 mismatch" for rel in rels if file_sha256(Path(step_dir) / rel) != manifest[rel]["sha256"]]


def state_problem(step_dir: str | Path) -> str | None:
    """``"trainer_state.json: unreadable (…)"`` when the completeness marker is not valid JSON (it is not in
    the manifest: it is written after it)."""
    try:
        json.loads(state_file(step_dir).read_text())
    except (OSError, ValueError) as e:
        return f"{STATE}: unreadable ({type(e).__name__})"
    return None


def checkpoint_problems(step_dir: str | Path, rank: int = 0, world: int = 1) -> list[str] | None:
    """What is wrong with a complete checkpoint's files, as far as this rank checks: the trainer state, every
    file's size, and the sha256 of the files ``i % world == rank`` of the manifest (all of them for a world of
    one) whose size is right, sorted. ``[]``: intact; None: no manifest (saved before lmforge wrote one)."""
    problem = state_problem(step_dir)
    try:
        manifest = read_manifest(step_dir)
    except CheckpointError as e:
        return [p for p in (problem, str(e)) if p]
    if manifest is None:
        return [problem] if problem else None
    bad = size_problems(step_dir, manifest)
    sized = {p.rsplit(": ", 1)[0] for p in bad}
    mine = [rel for i, rel in enumerate(sorted(manifest)) if i % world == rank and rel not in sized]
    return sorted(([problem] if problem else []) + bad + hash_problems(step_dir, manifest, mine))


def join_problems(problems: list[str], shown: int = 3) -> str:
    """``REL: size X expected Y; REL2: sha256 mismatch; and N more``."""
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


def describe_problems(step_dir: str | Path, problems: list[str], shown: int = 3) -> str:
    """One line: ``step_00000008 is damaged (REL: size X expected Y; REL2: sha256 mismatch)``."""
    return f"{Path(step_dir).name} is damaged ({join_problems(problems, shown)})"


def verify_marker(run_dir: str | Path, step_dir: str | Path, world: int, rank: int) -> Path:
    """``RUN_DIR/.checkpoint_verify/step_N-KEY-wW-rR.json``: rank R's result of its share of the hash check
    of ``step_dir`` on W ranks (KEY: the step dir's absolute path, so another run's step_N is another file)."""
    step = Path(step_dir)
    key = hashlib.sha1(str(step.resolve()).encode()).hexdigest()[:10]
    return Path(run_dir) / VERIFY_DIR / f"{step.name}-{key}-w{world}-r{rank}.json"


def clear_verify_markers(run_dir: str | Path) -> None:
    """Rank 0, once every rank is past its resume (the first save): the hash-check markers are spent."""
    import shutil

    shutil.rmtree(Path(run_dir) / VERIFY_DIR, ignore_errors=True)


# ---------------------------------------------------------------- goodput records (pretrain.goodput)
GOODPUT = "goodput"  # RUN_DIR/goodput/segment_00000.json: one record per start of the job


def goodput_segment_file(run_dir: str | Path, segment: int) -> Path:
    """``RUN_DIR/goodput/segment_NNNNN.json``: the goodput record of one start (segment) of the run."""
    return Path(run_dir) / GOODPUT / f"segment_{segment:05d}.json"


def goodput_segment_files(run_dir: str | Path) -> list[Path]:
    """The run's goodput records, oldest segment first (empty when none)."""
    folder = Path(run_dir) / GOODPUT
    return sorted(folder.glob("segment_[0-9]*.json")) if folder.is_dir() else []
