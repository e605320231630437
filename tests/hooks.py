"""Fault injections the tests install through ``--callbacks=[hooks:NAME]`` (tests/ is on PYTHONPATH).

Each factory reads its settings from the environment, so one subprocess run can be told where to
strike: ``LMFORGE_TEST_FAIL=STEP@RANK``.
"""

from __future__ import annotations

import os

from pretrain.trainer import Callback


class RaiseAt(Callback):
    """Rank ``rank`` raises at the end of optimizer step ``step`` (its peers are already on the next step)."""

    def __init__(self, step: int, rank: int):
        self.step, self.rank = step, rank

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.state.step == self.step and trainer.dist.rank == self.rank:
            raise RuntimeError(f"injected failure on rank {self.rank} at step {self.step}")


def fail() -> RaiseAt:
    step, _, rank = os.environ["LMFORGE_TEST_FAIL"].partition("@")
    return RaiseAt(int(step), int(rank or 0))


class RecordSamples(Callback):
    """Every rank appends the global sample ids it trains on (and a hash of each sample's tokens) to
    ``$LMFORGE_TEST_SAMPLES/rank<R>.jsonl``: what a resume on another world size really fed the model."""

    def on_train_start(self, trainer) -> None:
        import hashlib
        import json
        from pathlib import Path

        loader, rank = trainer.loader, trainer.dist.rank
        out = Path(os.environ["LMFORGE_TEST_SAMPLES"]) / f"rank{rank}.jsonl"
        draw = loader.next_batch

        def next_batch():
            batch = draw()  # the cursor may jump over skipped ranges first: read it after the draw
            first = loader.cursor - loader.micro_batch * loader.world_size + loader.rank * loader.micro_batch
            with open(out, "a") as f:
                f.write(json.dumps({"step": trainer.state.step + 1, "world": loader.world_size,
                                    "ids": list(range(first, first + len(batch))),
                                    "sha1": [hashlib.sha1(row.tobytes()).hexdigest() for row in batch]}) + "\n")
            return batch

        loader.next_batch = next_batch


def record_samples() -> RecordSamples:
    return RecordSamples()


class NanAt(Callback):
    """Turns the first micro-batch loss of the given optimizer steps into NaN, on one rank or all:
    ``LMFORGE_INJECT_NAN=STEP[,STEP...][@RANK]`` (what a bf16 overflow or a bad batch does)."""

    def __init__(self, steps: set[int], rank: int | None):
        self.steps, self.rank = steps, rank

    def on_loss(self, trainer, loss, micro_step):
        if micro_step == 0 and trainer.state.step + 1 in self.steps and self.rank in (None, trainer.dist.rank):
            return loss * float("nan")
        return loss


def nan() -> NanAt:
    steps, _, rank = os.environ["LMFORGE_INJECT_NAN"].partition("@")
    return NanAt({int(s) for s in steps.split(",") if s}, int(rank) if rank else None)


class SpikeOn(Callback):
    """Multiplies the loss of every micro-batch holding one of the global samples ``[start, end)`` by
    ``factor``: ``LMFORGE_SPIKE_SAMPLES=START:END[xFACTOR]`` (bad data that makes the loss spike; a rollback
    that skips those samples never sees it again)."""

    def __init__(self, start: int, end: int, factor: float):
        self.start, self.end, self.factor = start, end, factor

    def on_loss(self, trainer, loss, micro_step):
        loader = trainer.loader  # the micro-batch was just drawn: the loader's contract is a contiguous slice
        first = loader.cursor - loader.micro_batch * loader.world_size + loader.rank * loader.micro_batch
        if first < self.end and self.start < first + loader.micro_batch:
            return loss * self.factor
        return loss


def spike() -> SpikeOn:
    rng, _, factor = os.environ["LMFORGE_SPIKE_SAMPLES"].partition("x")
    start, _, end = rng.partition(":")
    return SpikeOn(int(start), int(end), float(factor or 20))


class CountSyncs(Callback):
    """Counts, per optimizer step, the collectives lmforge's own code issues and its reads of tensor values
    back to the host (``.item()``, ``float()``, ``int()``, ``bool()``, ``.tolist()``), written to
    ``$LMFORGE_TEST_SYNCS/rank<R>.jsonl``. DeepSpeed's own calls are not counted (their caller is not ours)."""

    COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "all_gather_into_tensor",
                   "reduce_scatter", "reduce_scatter_tensor", "barrier", "reduce", "gather", "scatter",
                   "broadcast_object_list", "all_to_all")
    READS = ("item", "__float__", "__int__", "__bool__", "tolist")

    def __init__(self):
        self.counts = {"collectives": 0, "reads": 0}
        self.where: list[str] = []

    def _ours(self, depth: int = 2) -> str | None:
        import sys
        from pathlib import Path

        f = sys._getframe(depth)
        path = Path(f.f_code.co_filename)
        repo = Path(__file__).resolve().parents[1]
        if path.is_relative_to(repo) and path.parts[len(repo.parts)] in ("pretrain", "finetune", "lmforge",
                                                                          "data_pipeline"):
            return f"{path.relative_to(repo)}:{f.f_lineno}"
        return None

    def _wrap(self, owner, name: str, kind: str) -> None:
        real = getattr(owner, name)

        def counted(*a, **kw):
            if where := self._ours():
                self.counts[kind] += 1
                self.where.append(f"{kind} {name} {where}")
            return real(*a, **kw)

        setattr(owner, name, counted)

    def on_train_start(self, trainer) -> None:
        import torch
        import torch.distributed as dist

        for name in self.COLLECTIVES:
            if hasattr(dist, name):
                self._wrap(dist, name, "collectives")
        for name in self.READS:
            self._wrap(torch.Tensor, name, "reads")

    def on_step_end(self, trainer, metrics) -> None:
        import json
        from pathlib import Path

        step = trainer.state.step
        row = {"step": step, **self.counts, "where": self.where,
               "logging": step % trainer.cfg.train.log_every == 0, "saved": trainer.state.step == step and any(
                   "checkpoint.py" in w for w in self.where)}
        with open(Path(os.environ["LMFORGE_TEST_SYNCS"]) / f"rank{trainer.dist.rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.counts = {"collectives": 0, "reads": 0}
        self.where = []


def count_syncs() -> CountSyncs:
    return CountSyncs()


class SlowRank(Callback):
    """One rank waits ``SECONDS`` longer for every micro-batch (a slow data read on one host), the others
    then wait for it in the step's collective: ``LMFORGE_TEST_SLOW=SECONDS[@RANK]`` (every rank when no rank
    is given)."""

    def __init__(self, seconds: float, rank: int | None):
        self.seconds, self.rank = seconds, rank

    def on_train_start(self, trainer) -> None:
        import time

        if self.rank not in (None, trainer.dist.rank):
            return
        objective = trainer.objective
        draw = objective.next_batch

        def next_batch():
            time.sleep(self.seconds)
            return draw()

        objective.next_batch = next_batch


def slow() -> SlowRank:
    seconds, _, rank = os.environ["LMFORGE_TEST_SLOW"].partition("@")
    return SlowRank(float(seconds), int(rank) if rank else None)


class SlowSave(Callback):
    """Background checkpoint writes made slow, and when they happen: every rank's writer thread sleeps
    before it fsyncs the files of the checkpoints named in ``LMFORGE_TEST_SLOW_SAVE=STEP:SECONDS[,...]``
    (``*:SECONDS``: every checkpoint), so a test can act while a write is in flight; and, with
    ``LMFORGE_TEST_TIMELINE=DIR``, every rank appends to ``DIR/rank<R>.jsonl`` the wall time of each step's
    end (``{"event": "step", "step"}``) and of the start and end of each background write (``"write_start"``,
    ``"write_end"``, ``"step"``: the checkpoint's). A test hook: lmforge's code has no branch for it (it
    wraps :func:`pretrain.async_save._write_snapshot` and ``_fsync_own``, the writer thread's steps)."""

    def __init__(self, delays: dict[str, float], timeline: str | None):
        import threading

        self.delays, self.timeline, self.rank = delays, timeline, 0
        self._lock = threading.Lock()

    def _log(self, event: str, step: int) -> None:
        import json
        import time
        from pathlib import Path

        if self.timeline:
            with self._lock, open(Path(self.timeline) / f"rank{self.rank}.jsonl", "a") as f:
                f.write(json.dumps({"event": event, "step": step, "t": time.time()}) + "\n")

    def on_train_start(self, trainer) -> None:
        import time

        import pretrain.async_save as ckpt
        from lmforge.rundir import step_of

        self.rank = trainer.dist.rank
        write, fsync = ckpt._write_snapshot, ckpt._fsync_own

        def slow_write(step_dir, *a, **kw):
            self._log("write_start", step_of(step_dir))
            try:
                return write(step_dir, *a, **kw)
            finally:
                self._log("write_end", step_of(step_dir))

        def slow_fsync(step_dir, *a, **kw):
            time.sleep(self.delays.get(str(step_of(step_dir)), self.delays.get("*", 0.0)))
            return fsync(step_dir, *a, **kw)

        ckpt._write_snapshot, ckpt._fsync_own = slow_write, slow_fsync

    def on_step_end(self, trainer, metrics) -> None:
        self._log("step", trainer.state.step)


def slow_save() -> SlowSave:
    spec = os.environ.get("LMFORGE_TEST_SLOW_SAVE", "")
    delays = {k.strip(): float(v) for k, _, v in (p.partition(":") for p in spec.split(",") if p.strip())}
    return SlowSave(delays, os.environ.get("LMFORGE_TEST_TIMELINE"))


def kill_part(part: int):
    """Build hook (``LMFORGE_BUILD_HOOK=hooks:kill_part``): with ``LMFORGE_TEST_KILL_PART=PART@N``, the task
    building part PART SIGKILLs itself once its N-th shard is recorded (a node lost mid-part)."""
    import signal

    target, _, after = os.environ.get("LMFORGE_TEST_KILL_PART", "-1@0").partition("@")
    if part != int(target):
        return None

    def on_shard(out, n: int) -> None:
        if n >= int(after):
            os.kill(os.getpid(), signal.SIGKILL)

    return on_shard
