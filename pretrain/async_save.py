"""Asynchronous checkpoint saves (``checkpoint.async_save``): every rank snapshots its checkpoint files to
host memory (the only training stall), then a thread of that rank writes, fsyncs and hashes them while the next
steps train. :class:`pretrain.checkpoint.Checkpointer` starts them and commits them once every rank's write is
done; the files are byte for byte what DeepSpeed's synchronous ``torch.save`` writes."""

from __future__ import annotations

import os
import pickle
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmforge.errors import CheckpointError
from lmforge.io import fsync_dir
from lmforge.log import print0
from lmforge.rundir import checkpoint_files, checkpoints_dir, file_owner, hash_files, step_tag


def own_file_hashes(step_dir: Path, rank: int, world: int) -> dict[str, dict[str, Any]]:
    """Size and sha256 of the files this rank wrote (streamed in 8 MiB reads, fresh in its page cache)."""
    return hash_files(step_dir, [rel for rel in checkpoint_files(step_dir) if file_owner(rel, world) == rank])


class HostBuffers:
    """Host memory for the snapshots of one rank, kept from one save to the next: the same shapes come back
    every save, and copying into pages already touched is ~5x faster than into fresh ones (measured: 244 MB
    in 0.024 s vs 0.11 s). Costs one copy of the rank's checkpoint files in host memory while training."""

    def __init__(self):
        self._free: dict[int, list[torch.UntypedStorage]] = {}

    def take(self, nbytes: int) -> torch.UntypedStorage:
        free = self._free.get(nbytes)
        return free.pop() if free else torch.empty(nbytes, dtype=torch.uint8).untyped_storage()

    def give(self, storages: list[torch.UntypedStorage]) -> None:
        for st in storages:
            self._free.setdefault(st.nbytes(), []).append(st)


class _Recorder:
    """Stands in for torch.save's zip writer: keeps the records ``torch.serialization._save`` writes (the
    pickle, small metadata) and a host copy of every tensor storage, to be written later by :func:`_replay`.
    The file is then byte for byte what ``torch.save`` writes (same records, same order)."""

    def __init__(self, buffers: HostBuffers):
        self.buffers = buffers
        self.records: list[tuple[str, Any, int]] = []

    def write_record(self, name: str, data, nbytes: int) -> None:
        if isinstance(data, str | bytes):
            self.records.append((name, data, nbytes))
            return
        copy = self.buffers.take(nbytes)  # ``data`` is the live storage (or torch's own host copy of a GPU one)
        copy.copy_(data)
        self.records.append((name, copy, nbytes))

    def write_record_metadata(self, name: str, nbytes: int) -> None:  # torch.save under skip_data only
        raise CheckpointError("checkpoint.async_save: torch's skip_data serialization mode is not supported")


def _snapshot(obj: Any, buffers: HostBuffers) -> list[tuple[str, Any, int]]:
    """``torch.save(obj, ...)``'s records with every storage copied to host memory (the training stall)."""
    rec = _Recorder(buffers)
    torch.serialization._save(obj, rec, pickle, torch.serialization.DEFAULT_PROTOCOL, False)
    return rec.records


def _replay(path: Path, records: list[tuple[str, Any, int]]) -> None:
    """Write the records of :func:`_snapshot` to ``path`` as ``torch.save`` would (its zip writer)."""
    from torch.serialization import _get_storage_alignment, get_crc32_options

    name, stream = str(path), None
    try:
        name.encode("ascii")
        writer = torch._C.PyTorchFileWriter(name, get_crc32_options(), _get_storage_alignment())
    except UnicodeEncodeError:  # as torch.save: the C++ writer takes ascii names only
        stream = open(name, "wb")  # noqa: SIM115
        writer = torch._C.PyTorchFileWriter(stream, get_crc32_options(), _get_storage_alignment())
    try:
        for rec_name, data, nbytes in records:
            writer.write_record(rec_name, data, nbytes)
        writer.write_end_of_file()
    finally:
        if stream is not None:
            stream.close()


class _SnapshotEngine:
    """DeepSpeed's checkpoint engine during a background save: every ``save(state_dict, path)`` DeepSpeed
    makes is snapshotted (:func:`_snapshot`) instead of written; the rest is the real engine's."""

    def __init__(self, real, buffers: HostBuffers):
        self._real, self._buffers = real, buffers
        self.files: list[tuple[Path, list]] = []

    def save(self, state_dict, path: str) -> None:
        self.files.append((Path(path), _snapshot(state_dict, self._buffers)))

    def __getattr__(self, name: str):
        return getattr(self._real, name)


def background_save_problem(engine) -> str | None:
    """Why saves cannot go to the background with this engine (None: they can). They need DeepSpeed's plain
    torch.save engine writing zip files (the default; a ``checkpoint.writer`` in the engine JSON selects
    another) and torch's internal ``serialization._save(obj, zip_file, pickle_module, protocol, byteorder)``."""
    import inspect

    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    real = getattr(engine, "checkpoint_engine", None)
    if type(real) is not TorchCheckpointEngine:
        return f"DeepSpeed's checkpoint engine is {type(real).__name__}, not TorchCheckpointEngine"
    if not getattr(real, "zipfile_serialization", True):
        return "the engine JSON turns DeepSpeed's zip serialization off (checkpoint.checkpoint_serialization)"
    fn = getattr(torch.serialization, "_save", None)
    try:
        params = list(inspect.signature(fn).parameters) if fn is not None else []
    except (TypeError, ValueError):
        params = []
    if params[:5] != ["obj", "zip_file", "pickle_module", "pickle_protocol", "_disable_byteorder_record"]:
        return f"torch {torch.__version__} has no torch.serialization._save(obj, zip_file, ...) to snapshot with"
    return None


class BackgroundSave:
    """One checkpoint being written by a thread of this rank, committed later by :meth:`Checkpointer.finish`."""

    def __init__(self, step_dir: Path, files: list[tuple[Path, list]], state: dict[str, Any] | None,
                 reason: str, stall: float, rank: int, world: int):
        self.step_dir, self.files, self.state, self.reason, self.stall = step_dir, files, state, reason, stall
        self.rank, self.world = rank, world
        self.hashes: dict[str, dict[str, Any]] | None = None
        self.error: str | None = None
        self.seconds = 0.0
        # a daemon: a process that dies leaves the write unfinished, and the checkpoint uncommitted
        self.thread = threading.Thread(target=self._run, name=f"lmforge-save-{step_dir.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def done(self) -> bool:
        return not self.thread.is_alive()

    def storages(self) -> list[torch.UntypedStorage]:
        return [data for _, records in self.files for _, data, _ in records if isinstance(data, torch.UntypedStorage)]

    def _run(self) -> None:
        t0 = time.time()
        try:
            self.hashes = _write_snapshot(self.step_dir, self.files, self.rank, self.world)
        except BaseException as e:  # reported by every rank at the commit
            self.error = f"{type(e).__name__}: {e}"
        self.seconds = time.time() - t0


def _write_snapshot(step_dir: Path, files: list[tuple[Path, list]], rank: int, world: int) -> dict[str, dict[str, Any]]:
    """The background thread's work: write this rank's files, fsync them, hash them (the manifest entries)."""
    for path, records in files:
        _replay(path, records)
    _fsync_own(step_dir, rank, world)
    return own_file_hashes(step_dir, rank, world)


def _fsync_own(step_dir: Path, rank: int, world: int) -> None:
    """fsync the files this rank owns (:func:`file_owner`: the ones it wrote; rank 0 also DeepSpeed's
    recovery scripts), then the directory. Other ranks may still be writing theirs: their files are theirs."""
    for rel in checkpoint_files(step_dir):
        if file_owner(rel, world) == rank:
            with open(step_dir / rel, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(step_dir)


def start_background_save(trainer, reason: str, buffers: HostBuffers, rng: dict[str, Any],
                          state: dict[str, Any] | None) -> BackgroundSave:
    """Snapshot this rank's checkpoint to host memory (DeepSpeed's files through :class:`_SnapshotEngine`,
    ``rng``: this rank's RNG states, ``state``: rank 0's trainer state of this step) and start writing it in a
    thread; training waits only for the snapshot. Every rank calls it at the same step; nothing is complete
    until :meth:`pretrain.checkpoint.Checkpointer.finish` commits it."""
    cfg, info, engine = trainer.cfg, trainer.dist, trainer.engine
    root = checkpoints_dir(cfg.run_dir)
    step_dir = root / step_tag(trainer.state.step)
    t0 = time.time()
    if info.is_main and step_dir.exists():  # a leftover of an interrupted save of the same step
        shutil.rmtree(step_dir)
    if dist.is_initialized():
        dist.barrier()
    capture = _SnapshotEngine(engine.checkpoint_engine, buffers)
    engine.checkpoint_engine = capture
    try:
        engine.save_checkpoint(str(root), tag=step_dir.name, save_latest=False)
    finally:
        engine.checkpoint_engine = capture._real
    files = [*capture.files, (step_dir / f"rng_rank{info.rank:05d}.pt", _snapshot(rng, buffers))]
    pending = BackgroundSave(step_dir, files, state, reason, time.time() - t0, info.rank, info.world_size)
    pending.start()
    trainer.timings["checkpoint_save"] += pending.stall
    print0(f"checkpoint {step_dir.name}: snapshot in {pending.stall:.2f}s, writing in the background ({reason})")
    return pending
