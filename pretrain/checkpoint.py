"""Sharded checkpoints: save, rotate, convert across world sizes, restore (the directory format,
finding and marking checkpoints live in :mod:`lmforge.rundir`).

Layout (``RUN_DIR/checkpoints/``)::

    step_00000100/          DeepSpeed's own files (each rank writes its ZeRO partition)
        rng_rank00000.pt    per-rank python/numpy/torch RNG states (DeepSpeed saves none)
        checkpoint_manifest.json  size and sha256 of every file above (each rank hashes its own)
        trainer_state.json  written by rank 0 after every rank finished: the completeness marker
    step_00000100_universal/  made on demand when resuming on another number of ranks
    latest                  the tag of the newest complete checkpoint, written last (fsync + rename)

A checkpoint without ``trainer_state.json`` (a save killed half-way) is never loaded; a resume checks the
files against the manifest and falls back past a damaged checkpoint (:func:`verify_checkpoint`).

Interval saves are asynchronous by default (``checkpoint.async_save``, :mod:`pretrain.async_save`):
training stalls only while every rank copies its state to host memory; a thread per rank writes, fsyncs
and hashes the files while the next steps train, and the checkpoint is committed (manifest, trainer
state, ``latest``) at the first step end at which every rank has voted its write done.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import lmforge
from lmforge.config import to_dict
from lmforge.errors import CheckpointError, ConfigError
from lmforge.io import atomic_write_text, fsync_dir
from lmforge.log import print0
from lmforge.rundir import (  # noqa: F401  (re-exported: the run-directory format lives in lmforge.rundir)
    best_checkpoint,
    checkpoint_files,
    checkpoint_problems,
    checkpoints_dir,
    clear_verify_markers,
    complete_checkpoints,
    describe_problems,
    file_owner,
    has_checkpoints,
    hash_files,
    is_complete,
    is_run_dir,
    latest_checkpoint,
    manifest_file,
    mark_best,
    mark_complete,
    read_manifest,
    read_state,
    step_of,
    step_tag,
    verify_marker,
    write_manifest,
)
from pretrain.async_save import (
    BackgroundSave,
    HostBuffers,
    background_save_problem,
    own_file_hashes,
    start_background_save,
)
from pretrain.config import CheckpointConfig
from pretrain.engine import reapply_group_hparams
from pretrain.trainer import Callback

UNIVERSAL_DONE = "lmforge_universal_complete"


# ---------------------------------------------------------------- what to resume from
@dataclass(frozen=True)
class ResumeTarget:
    step_dir: Path
    state: dict[str, Any]
    universal: bool  # saved by another number of ranks: load DeepSpeed's universal format
    global_batch: int | None = None  # the global batch the resumed run uses (the checkpoint's unless set)

    @property
    def load_tag(self) -> str:
        return self.step_dir.name + ("_universal" if self.universal else "")


def resume_step_dir(mode: str, run_dir: Path,
                    check: Callable[[Path], list[str]] | None = None) -> Path | None:
    """The checkpoint ``--resume=MODE`` names: auto → the run's latest (None when it has none); a run dir
    → its latest; a step dir → itself, if complete. ``none`` → None.

    ``check(step_dir)`` lists what is wrong with a checkpoint's files (:func:`verify_checkpoint`). With it,
    a damaged latest checkpoint of a run (auto, or a run dir) is passed over for the newest intact one, with
    a one-line warning per damaged one; none intact is a :class:`CheckpointError`. A step dir named
    explicitly is never swapped for another: damaged, it is an error."""
    if mode == "none":
        return None
    source = run_dir if mode == "auto" else Path(mode)
    if mode != "auto" and not is_run_dir(source):  # an explicit step dir
        if not source.is_dir():
            raise ConfigError(f"--resume={mode}: no checkpoint there (give a run dir or a checkpoints/step_N dir)")
        if not is_complete(source):
            raise CheckpointError(f"{source} is incomplete (no trainer state: its save was interrupted); pick another step")
        if check is not None and (problems := check(source)):
            raise CheckpointError(f"--resume={mode}: checkpoint {describe_problems(source, problems)}; "
                                  "restore its files or resume from another checkpoint")
        return source
    latest = latest_checkpoint(source)
    if latest is None:
        if mode == "auto":
            return None
        raise ConfigError(f"--resume={mode}: no checkpoint there (give a run dir or a checkpoints/step_N dir)")
    if check is None:
        return latest
    candidates = [latest, *[d for d in reversed(complete_checkpoints(source)) if step_of(d) < step_of(latest)]]
    damaged = []
    for i, step_dir in enumerate(candidates):
        problems = check(step_dir)
        if not problems:
            return step_dir
        damaged.append(describe_problems(step_dir, problems))
        if i + 1 < len(candidates):
            print0(f"warning: checkpoint {damaged[-1]}; falling back to {candidates[i + 1].name}")
    more = f"; and {len(damaged) - 1} newer one(s) damaged too" if len(damaged) > 1 else ""
    raise CheckpointError(f"no intact checkpoint to resume in {checkpoints_dir(source)}: {damaged[-1]}{more}; "
                          "restore its files, or start afresh with another --run_dir")


def resolve_resume(cfg, world_size: int) -> ResumeTarget | None:
    """The checkpoint a stage's run resumes (``cfg.resume``), its files verified (:func:`verify_checkpoint`),
    checked against its model and ZeRO stage, with the global batch the resumed run must use. Nothing in
    ``cfg`` changes: the stage resolves it."""
    mode = cfg.resume.mode
    run_dir = Path(cfg.run_dir)
    if mode == "none":
        if has_checkpoints(run_dir):
            raise ConfigError(
                f"--resume=none but {run_dir} already holds checkpoints: use --resume=auto to continue it, "
                "or another --run_dir"
            )
        return None
    timeout_s = getattr(getattr(cfg, "dist", None), "timeout_s", 1800.0)
    step_dir = resume_step_dir(mode, run_dir, lambda d: verify_checkpoint(d, run_dir, world_size, timeout_s))
    if step_dir is None:
        return None
    state = read_state(step_dir)
    _check_compatible(cfg, state, step_dir)
    batch = _keep_global_batch(cfg, state, step_dir, world_size)
    return checkpoint_target(step_dir, world_size, state, batch)


def verify_checkpoint(step_dir: Path, run_dir: Path, world_size: int, timeout_s: float = 1800.0,
                      poll_s: float = 0.2) -> list[str]:
    """What is wrong with ``step_dir``'s files (``[]``: intact), agreed by every rank of the job.

    It runs before the process group exists (the resume target decides the config), so there is no
    collective: every rank checks the trainer state and every file's size against the manifest (stat
    only, the same answer everywhere) and the sha256 of its stripe of the files (``i % world == rank``),
    then writes its findings to ``RUN_DIR/.checkpoint_verify/`` and reads every other rank's, as
    :func:`pretrain.dist.rank0_work` waits on a marker. A finding is tied to the size, mtime and inode of
    the files it covers (and the manifest's), so a marker left by an earlier job counts only for unchanged
    files, whose answer it is. Every rank ends with the same sorted list, so all of them pick the same
    checkpoint. A rank that never reports (it died: its launcher ends the job anyway) is an error after
    ``timeout_s`` (at least 10 minutes: ranks start apart). Outside a launched job of ``world_size`` ranks
    (no RANK/WORLD_SIZE), this one process hashes every file. A checkpoint without a manifest (saved before
    lmforge wrote one) is accepted with a note.
    """
    rank, world = _hash_stripe(world_size)
    problems = checkpoint_problems(step_dir, rank, world)
    if problems is None:
        print0(f"note: {step_dir.name} has no {manifest_file(step_dir).name} (saved by an older lmforge): "
               "its files are not verified")
        return []
    try:
        names = sorted(read_manifest(step_dir) or {})
    except CheckpointError:  # the same finding on every rank: nothing was hashed
        names = []
    if world == 1 or not names:
        return sorted(set(problems))

    def stamps(r: int) -> list:
        return [_stamp(manifest_file(step_dir))] + [_stamp(step_dir / n) for n in names[r::world]]

    mine = verify_marker(run_dir, step_dir, world, rank)
    mine.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(mine, json.dumps({"stamps": stamps(rank), "problems": problems}))
    found, t0 = set(problems), time.monotonic()
    last = t0
    for r in range(world):
        if r == rank:
            continue
        want, marker = stamps(r), verify_marker(run_dir, step_dir, world, r)
        while True:
            try:
                rec = json.loads(marker.read_text())
            except (OSError, ValueError):
                rec = None
            if rec is not None and rec.get("stamps") == want:
                break
            if time.monotonic() - t0 > max(timeout_s, 600.0):  # ranks start apart: never under 10 minutes
                raise CheckpointError(f"rank {r} did not report its share of the check of {step_dir} within "
                                      f"{max(timeout_s, 600.0):.0f}s (dist.timeout_s)")
            if rank == 1 and time.monotonic() - last >= 60:
                last = time.monotonic()
                print(f"rank 1: waiting for rank {r} to check its share of {step_dir.name}, "
                      f"{last - t0:.0f}s so far", flush=True)
            time.sleep(poll_s)
        found.update(rec["problems"])
    return sorted(found)


def _hash_stripe(world_size: int) -> tuple[int, int]:
    """(rank, ranks) to stripe the hashing over: the launched job's, when it has ``world_size`` ranks."""
    env = os.environ
    if "RANK" in env and env.get("WORLD_SIZE") == str(world_size) and int(env["RANK"]) < world_size:
        return int(env["RANK"]), world_size
    return 0, 1


def _stamp(p: Path) -> list[int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def checkpoint_target(step_dir: Path, world_size: int, state: dict[str, Any] | None = None,
                      global_batch: int | None = None) -> ResumeTarget:
    """How to load ``step_dir`` on ``world_size`` ranks (universal when the number of ranks changed)."""
    state = read_state(step_dir) if state is None else state
    universal = state["world_size"] != world_size and state["zero_stage"] > 0
    return ResumeTarget(step_dir, state, universal, global_batch)


def _check_compatible(cfg, state: dict[str, Any], step_dir: Path) -> None:
    saved, now = state["model"], to_dict(cfg.model)
    shape_keys = ("kind", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                  "tie_embeddings")
    diff = [f"model.{k}: {saved.get(k)} → {now.get(k)}" for k in shape_keys if saved.get(k) != now.get(k)]
    if diff:
        raise CheckpointError(f"cannot resume {step_dir}: different model shape ({'; '.join(diff)})")
    if state["zero_stage"] != cfg.zero.stage and (state["zero_stage"] == 0 or cfg.zero.stage == 0):
        raise CheckpointError(
            f"cannot resume {step_dir} (ZeRO-{state['zero_stage']}) with ZeRO-{cfg.zero.stage}: keep zero.stage"
        )


def _keep_global_batch(cfg, state: dict[str, Any], step_dir: Path, world_size: int) -> int | None:
    """The global batch of the resumed run. A resume continues the same optimisation: an unset global batch
    is the checkpoint's, not micro x ranks (which changes with the number of ranks); an explicit different
    one is allowed, with a warning."""
    saved, now = state.get("global_batch"), cfg.train.global_batch_size
    if saved is not None and (now is None or now == saved) and saved % world_size:
        # the batch plan would round it up, and the data position (a multiple of it) would not split evenly
        fits = [n for n in range(1, saved + 1) if saved % n == 0]
        raise CheckpointError(
            f"cannot resume {step_dir} on {world_size} ranks: its global batch {saved} does not split over them; "
            f"resume on {', '.join(map(str, fits[-4:]))} or another divisor of {saved} ranks"
        )
    if saved is None or now == saved:
        return now
    if now is None:
        if saved != cfg.train.micro_batch_size * world_size:  # said only when it differs from micro x ranks
            print0(f"resume: keeping the global batch of {step_dir.name}, {saved} (train.global_batch_size is not set)")
        return saved
    print0(f"warning: {step_dir.name} was trained with global batch {saved}; continuing with "
           f"train.global_batch_size={now} changes the optimisation")
    return now


# ---------------------------------------------------------------- world-size change
def ensure_universal(target: ResumeTarget, rank: int) -> None:
    """Rank 0 converts the checkpoint with DeepSpeed's ds_to_universal (once, cached); others wait.

    Called before the process group exists (``pretrain.run``): the conversion of a 7B checkpoint
    outlasts any collective timeout, so the other ranks wait on its completion marker instead.
    """
    from pretrain.dist import rank0_work

    out = target.step_dir.parent / target.load_tag
    rank0_work(f"converting {target.step_dir.name} to the universal format", lambda: _convert(target, out),
               lambda: (out / UNIVERSAL_DONE).is_file(), target.step_dir.parent, rank)


def conversion_workers(step_dir: Path | None = None, cores: int | None = None, available: int | None = None) -> int:
    """Extract/merge workers for ds_to_universal: one per core this process may use (its default is 4,
    ours was 1), but no more than the memory holds: each extract worker loads one rank's optimizer
    file (~3 GB per rank at 7B on 32 ranks), counted twice for the copies it makes."""
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
    files = [f.stat().st_size for f in step_dir.glob("*optim_states.pt")] if step_dir is not None else []
    if not files:
        return max(1, cores)
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    return max(1, min(cores, int(0.8 * available) // (2 * max(files))))


def _convert(target: ResumeTarget, out: Path) -> None:
    workers = conversion_workers(target.step_dir)
    print0(f"checkpoint {target.step_dir.name} was written by {target.state['world_size']} rank(s): "
           f"converting to DeepSpeed's universal format → {out.name} ({workers} workers)")
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(target.step_dir),
           "--output_folder", str(out), "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
    if target.state["zero_stage"] < 3:
        cmd.append("--inject_missing_state")  # ZeRO-1/2 checkpoints lack the universal metadata
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise CheckpointError(f"converting {target.step_dir} to universal format failed: {tail}")
    _fsync_tree(out, 0)
    atomic_write_text(out / UNIVERSAL_DONE, "ok\n")
    print0(f"universal checkpoint {out.name} written ({time.time() - t0:.0f}s)")


# ---------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    """python, numpy and torch RNGs from one seed (the same seed on every rank: identical initial weights)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG of this process as tensors, ints and tuples only: the file loads with
    ``torch.load(weights_only=True)``, which runs no pickled code (a run directory may come from elsewhere)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def load_rng_state(path: Path) -> dict[str, Any] | None:
    """The RNG state saved in ``path``, read without unpickling code; None for an older pickled file."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        print0(f"{path} is a pickle from an older lmforge and is not loaded (it could run code); "
               "the RNG streams are seeded afresh")
        return None


# ---------------------------------------------------------------- save
def save(trainer, reason: str = "interval") -> Path:
    """Every rank writes its shard; rank 0 then marks the checkpoint complete and moves ``latest``."""
    cfg, info = trainer.cfg, trainer.dist
    root = checkpoints_dir(cfg.run_dir)
    tag = step_tag(trainer.state.step)
    step_dir = root / tag
    t0 = time.time()
    if info.is_main and step_dir.exists():  # a leftover of an interrupted save of the same step
        shutil.rmtree(step_dir)
    if dist.is_initialized():
        dist.barrier()
    trainer.engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(rng_state(), step_dir / f"rng_rank{info.rank:05d}.pt")
    _fsync_tree(step_dir, info.rank)
    files = own_file_hashes(step_dir, info.rank, info.world_size)
    if dist.is_initialized():
        dist.barrier()  # every rank's files are on disk before the checkpoint is declared complete
        if info.world_size > 1:
            gathered: list = [None] * info.world_size
            dist.all_gather_object(gathered, files)
            files = {k: v for part in gathered for k, v in part.items()}
    if info.is_main:
        _commit(step_dir, files, trainer_state(trainer, reason), cfg)
    if dist.is_initialized():
        dist.barrier()
    trainer.timings["checkpoint_save"] += time.time() - t0
    print0(f"checkpoint {tag} saved ({reason}, {time.time() - t0:.1f}s)")
    return step_dir


def trainer_state(trainer, reason: str) -> dict[str, Any]:
    """What ``trainer_state.json`` records of the step being saved (a JSON copy: later steps change nothing)."""
    cfg, info = trainer.cfg, trainer.dist
    state = {
        **trainer.state_dict(),
        "step": trainer.state.step,
        "tokens_seen": trainer.state.tokens_seen,
        "world_size": info.world_size,
        "global_batch": trainer.plan.global_batch,
        "zero_stage": cfg.zero.stage,
        "precision": cfg.precision,
        "model": to_dict(cfg.model),
        "tokenizer_sha256": trainer.tokenizer_sha256,
        "manifest_fingerprint": trainer.loader.fingerprint,
        "lmforge_version": lmforge.__version__,
        "reason": reason,
        "saved_at": time.time(),
    }
    return json.loads(json.dumps(state))


def _commit(step_dir: Path, files: dict[str, dict[str, Any]], state: dict[str, Any], cfg) -> None:
    """Rank 0, once every rank's files are durable: the manifest, the completeness marker and ``latest``
    (:func:`mark_complete`), then the rotation of older checkpoints."""
    missing = [rel for rel in checkpoint_files(step_dir) if rel not in files]  # named for no rank: rare
    write_manifest(step_dir, {**files, **hash_files(step_dir, missing)})  # before the completeness marker
    clear_verify_markers(cfg.run_dir)  # every rank is past its resume's check
    mark_complete(step_dir, state)
    rotate(step_dir.parent, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)


def _fsync_tree(step_dir: Path, rank: int) -> None:
    """fsync the files this rank wrote (DeepSpeed does not), so 'complete' means on disk."""
    for f in step_dir.rglob("*"):
        if f.is_file() and (f"rank_{rank}" in f.name or f"rank{rank:05d}" in f.name or rank == 0):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(step_dir)


def rotate(root: Path, keep_last: int, keep_every: int) -> None:
    """Delete complete checkpoints beyond the newest ``keep_last`` (keeping multiples of ``keep_every``)."""
    complete = complete_checkpoints(root.parent)
    if keep_last <= 0:
        return
    best = best_checkpoint(root.parent)
    for d in complete[:-keep_last]:
        step = step_of(d)
        if (keep_every and step % keep_every == 0) or (best is not None and d.name == best["tag"]):
            continue
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(d.parent / (d.name + "_universal"), ignore_errors=True)


# ---------------------------------------------------------------- restore
def restore(trainer, target: ResumeTarget) -> None:
    """Load weights, optimizer, schedule, loader position and RNG from ``target`` (both stages)."""
    cfg, info = trainer.cfg, trainer.dist
    state = target.state
    if state["tokenizer_sha256"] != trainer.tokenizer_sha256:
        raise CheckpointError(
            f"cannot resume {target.step_dir}: it was trained with tokenizer {state['tokenizer_sha256'][:12]}, "
            f"this run uses {trainer.tokenizer_sha256[:12]}"
        )
    if state["manifest_fingerprint"] != trainer.loader.fingerprint and not cfg.resume.allow_data_change:
        raise CheckpointError(
            f"cannot resume {target.step_dir}: the {trainer.objective.data_name} changed since it was saved "
            "(fingerprint differs); "
            "pass --resume.allow_data_change=true to continue on the new data"
        )
    t0 = time.time()
    load_engine_state(trainer.engine, target, info.rank)
    trainer.timings["checkpoint_load"] += time.time() - t0
    trainer.load_state_dict(state, allow_data_change=cfg.resume.allow_data_change)
    rng_file = target.step_dir / f"rng_rank{info.rank:05d}.pt"
    saved_rng = load_rng_state(rng_file) if not target.universal and rng_file.is_file() else None
    if saved_rng is not None:
        set_rng_state(saved_rng)
    else:  # another world size: a fresh, reproducible stream per rank
        seed_everything(cfg.train.seed + 1000 * trainer.state.step + info.rank)
    how = f" (universal: {state['world_size']} → {info.world_size} ranks)" if target.universal else ""
    print0(f"resumed from {target.step_dir} at step {trainer.state.step}, {trainer.state.tokens_seen:,} tokens{how}")


def load_engine_state(engine, target: ResumeTarget, rank: int) -> None:
    """The one DeepSpeed load of both stages: weights, optimizer and schedule of ``target`` into ``engine``
    (converted to the universal format first when the number of ranks changed). A full load, never
    weights-only: a weights-only load of a ZeRO-3 checkpoint silently loads nothing."""
    if target.universal:
        ensure_universal(target, rank)
    load_path, _ = engine.load_checkpoint(
        str(target.step_dir.parent), tag=target.load_tag, load_module_strict=True,
        load_optimizer_states=True, load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {target.step_dir}; its files may be damaged")
    unshare_optimizer_steps(engine)
    reapply_group_hparams(engine)


def unshare_optimizer_steps(engine) -> None:
    """Give every optimizer state its own ``step`` tensor.

    DeepSpeed's ZeRO-3 universal load (0.19) puts one ``step`` tensor into the state of every
    parameter group. torch's AdamW increments it in place once per group, so after a world-size
    change the step count ran ahead by the number of groups per update and Adam's bias correction
    was wrong (the losses drifted ~1e-3 from the uninterrupted run's).
    """
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    seen: set[int] = set()
    for state in getattr(opt, "state", {}).values():
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(step))


# ---------------------------------------------------------------- when to save
class Checkpointer(Callback):
    """Callback: save every N steps / M minutes, at the end, and on SIGUSR1/SIGTERM (then stop).

    A signal only sets a flag; the save happens at the next step boundary, after the flag is
    all-reduced so that every rank saves the same step even if only one of them was signalled.

    With ``checkpoint.async_save``, interval saves go to the background (:func:`start_background_save`);
    at most one is in flight (a new save first waits for the previous one). Each rank votes "my write is
    done" in the step's one collective (``save_written``); at the first step end where every rank has, the
    checkpoint is committed: the ranks' hashes are gathered and rank 0 writes the manifest, the trainer
    state and ``latest``, then rotates. The saves the job ends with (final, signal, exit_interval, the
    best checkpoint) first commit the one in flight, then save synchronously; so does a loss-spike
    rollback before it picks its checkpoint.
    """

    SIGNALS = ("SIGUSR1", "SIGTERM")

    def __init__(self, checkpoint: CheckpointConfig):
        self.c = checkpoint
        self.last_save_time = time.time()
        self.last_saved_step = -1
        self.signalled = False
        self._previous: dict[int, Any] = {}
        self.background = False  # interval saves go to the background (decided in on_train_start)
        self.pending: BackgroundSave | None = None
        self._buffers = HostBuffers()
        self._unbooked = 0.0  # commit stalls, added to timings["checkpoint_save"] with the next save

    def on_train_start(self, trainer) -> None:
        import signal

        self.last_saved_step = trainer.state.step  # resuming: the restored step is already on disk
        self.background = bool(self.c.async_save)
        if self.background and (why := background_save_problem(trainer.engine)):
            self.background = False
            print0(f"note: checkpoint.async_save: {why}; saving synchronously")
        if self.c.on_signal:
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signalled = True

    def step_flags(self, trainer) -> dict[str, float]:
        """Votes for the step's one collective: a signal on any rank stops every rank; the save interval in
        minutes is rank 0's clock (clocks differ per rank); this rank's background write is done."""
        due = (bool(self.c.interval_minutes) and trainer.dist.is_main
               and time.time() - self.last_save_time >= 60 * self.c.interval_minutes)
        written = self.pending is not None and self.pending.done()
        return {"signal": 1.0 if self.signalled else 0.0, "save_due": 1.0 if due else 0.0,
                "save_written": 1.0 if written else 0.0}

    def on_step_end(self, trainer, metrics: dict[str, float]) -> None:
        step = trainer.state.step
        if self.pending is not None and (trainer.agreed.get("save_written", 0) >= trainer.dist.world_size
                                         or trainer.rollback_due):
            self.finish(trainer)  # every rank's write is done (a rollback next: it must see the checkpoint)
        if self.c.on_signal and trainer.agreed.get("signal", 0) > 0:
            self._save(trainer, "signal")
            trainer.stop_requested = True
            trainer.preempted = True
            return
        exit_now = trainer.cfg.train.exit_interval and step % trainer.cfg.train.exit_interval == 0
        if exit_now and step < trainer.cfg.train.max_steps:
            self._save(trainer, "exit_interval")
            trainer.stop_requested = True
            return
        due_steps = self.c.interval_steps and step % self.c.interval_steps == 0
        if due_steps or trainer.agreed.get("save_due", 0) > 0:
            self._save(trainer, "interval")

    def on_eval_end(self, trainer, metrics: dict[str, float]) -> None: ...

    def on_rollback(self, trainer, record) -> None:
        self.last_saved_step = trainer.state.step  # the checkpoint rolled back to is on disk

    def on_train_end(self, trainer) -> None:
        import signal

        self.finish(trainer)  # the job is about to end: the write in flight is committed first
        if self.c.save_final and not getattr(trainer, "preempted", False):
            self._save(trainer, "final")
        self._book(trainer)
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)

    def finish(self, trainer) -> None:
        """Wait for the background write in flight (if any) and commit it. Every rank calls it at the same
        step (it gathers the ranks' file hashes): when all voted it done, or before a save, a rollback or
        the end. A rank whose write failed fails every rank here, as a synchronous save would."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        info = trainer.dist
        t0 = time.time()
        pending.thread.join()
        results = [(pending.error, pending.hashes)]
        if dist.is_initialized() and info.world_size > 1:
            results = [None] * info.world_size
            dist.all_gather_object(results, (pending.error, pending.hashes))
        failed = [(r, err) for r, (err, _) in enumerate(results) if err is not None]
        if failed:
            rank, err = failed[0]
            raise CheckpointError(f"the background write of checkpoint {pending.step_dir.name} failed on rank {rank} "
                                  f"({err}); {pending.step_dir} is incomplete and is never loaded")
        if info.is_main:
            files = {k: v for _, part in results for k, v in part.items()}
            _commit(pending.step_dir, files, pending.state, trainer.cfg)
        if dist.is_initialized():
            dist.barrier()  # committed for every rank (a rollback lists the complete checkpoints on each)
        self._buffers.give(pending.storages())
        pending.files = []
        waited = time.time() - t0
        self._unbooked += waited
        trainer.timings["checkpoint_write_background"] += pending.seconds
        print0(f"checkpoint {pending.step_dir.name} saved ({pending.reason}, {pending.stall + waited:.1f}s; "
               f"written in the background in {pending.seconds:.1f}s)")

    def _book(self, trainer) -> None:
        """Commit stalls count as checkpoint_save time with the next save (the goodput record then ties a
        change of that time to the step a checkpoint was taken at)."""
        trainer.timings["checkpoint_save"] += self._unbooked
        self._unbooked = 0.0

    def _save(self, trainer, reason: str) -> None:
        # in the background when the job goes on after it as it is (a rollback due at this step would move
        # the step dir away under the writer: saved synchronously, then abandoned as in synchronous mode)
        background = self.background and reason == "interval" and not trainer.rollback_due
        if not background:
            self.finish(trainer)
        if trainer.state.step == self.last_saved_step:
            return
        self.finish(trainer)  # at most one in flight
        self._book(trainer)
        if background:
            state = trainer_state(trainer, reason) if trainer.dist.is_main else None
            self.pending = start_background_save(trainer, reason, self._buffers, rng_state(), state)
        else:
            save(trainer, reason)
        self.last_saved_step = trainer.state.step
        self.last_save_time = time.time()
