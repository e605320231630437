"""Run-level monitors registered by :func:`pretrain.runtime.build_trainer` for both stages:

- :class:`GoodputMonitor` (rank 0): this process's goodput record (``pretrain.goodput``) and TensorBoard
  ``goodput/*``, cumulative over the run's segments;
- :class:`StragglerMonitor` (every rank): per logging interval, each rank's mean time from the end of one
  step to the first loss of the next (data wait and forward), one all-gather of one float per rank on logging steps only; TensorBoard
  ``straggler/slowest_over_median`` and ``straggler/slowest_rank``, and a warning naming the rank and host
  when the ratio passes ``metrics.straggler_ratio``.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from lmforge.io import atomic_write_text
from lmforge.log import print0
from lmforge.rundir import goodput_segment_file, goodput_segment_files
from pretrain.callbacks import MetricsLogger
from pretrain.goodput import PARTS, PROCESS_SECONDS, account, lost_seconds, read_segments, scalars
from pretrain.trainer import Callback, Trainer


def _writer(trainer: Trainer):
    """The run's TensorBoard writer (the metrics logger's, rank 0; None when TensorBoard is off)."""
    return next((cb.writer for cb in trainer.callbacks if isinstance(cb, MetricsLogger)), None)


def _logging_step(trainer: Trainer) -> bool:
    """The metrics logger's logging steps (every ``log_every`` steps and the last)."""
    step = trainer.state.step
    return step % trainer.cfg.train.log_every == 0 or step >= trainer.cfg.train.max_steps


def process_start_time() -> float:
    """When this process started (epoch seconds): its imports and start-up count in the segment."""
    try:
        import psutil

        return psutil.Process(os.getpid()).create_time()
    except Exception:  # noqa: BLE001  (no psutil or no /proc: from the first import of lmforge, roughly)
        return time.time() - time.process_time()


class GoodputMonitor(Callback):
    """Rank 0 keeps this segment's goodput record and writes ``goodput/*`` on logging steps and at the end.

    Productive seconds are the steps' own times (``train/step_time``) less their data waits; the other
    parts are ``trainer.timings`` (data, eval, checkpoint save/load) and :data:`pretrain.goodput.PROCESS_SECONDS`
    (conversion); start-up is process start → first step less those. Must come after the checkpointer
    (a save at a step is then recorded at that step) and before the metrics logger (whose writer it
    uses, closed in the logger's ``on_train_end``).
    """

    def __init__(self):
        self.record: dict[str, Any] | None = None
        self.previous: list[dict[str, Any]] = []
        self._data_seen = 0.0
        self._saves_seen = 0.0

    def on_train_start(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        run_dir = trainer.cfg.run_dir
        files = goodput_segment_files(run_dir)
        index = int(files[-1].stem.split("_")[-1]) + 1 if files else 0
        self.previous = read_segments(run_dir)
        start, now = process_start_time(), time.time()
        self.record = {
            "segment": index, "host": socket.gethostname(), "pid": os.getpid(),
            "world_size": trainer.dist.world_size, "start": start, "train_start": now, "updated": now,
            "resumed_from": trainer.state.step or None, "first_step": trainer.state.step,
            "step": trainer.state.step, "ended": None, "seconds": {p: 0.0 for p in PARTS}, "saved": {},
        }
        self._measured(trainer)
        s = self.record["seconds"]
        s["startup"] = max(0.0, now - start - sum(v for k, v in s.items() if k not in ("startup", "productive")))
        self._data_seen = trainer.timings["data"]
        self._saves_seen = trainer.timings["checkpoint_save"]
        self._write(trainer)

    def _measured(self, trainer: Trainer) -> None:
        s = self.record["seconds"]
        for part in ("data", "eval", "checkpoint_save", "checkpoint_load"):
            s[part] = float(trainer.timings[part])
        s["conversion"] = float(PROCESS_SECONDS["conversion"])

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.record is None:
            return
        data = trainer.timings["data"]
        step_time = float(metrics.get("train/step_time", 0.0))
        self.record["seconds"]["productive"] += max(0.0, step_time - (data - self._data_seen))
        self._data_seen = data
        self.record["step"] = trainer.state.step
        saved = trainer.timings["checkpoint_save"] != self._saves_seen
        if saved:  # the checkpointer (before us) saved this step: what a resume from it keeps
            self._saves_seen = trainer.timings["checkpoint_save"]
            self.record["saved"][str(trainer.state.step)] = self.record["seconds"]["productive"]
        if saved or _logging_step(trainer):
            self._write(trainer, tensorboard=_logging_step(trainer))

    def on_rollback(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """A loss-spike rollback to ``record["to_step"]``: the steps trained since are lost work."""
        if self.record is None:
            return
        to = int(record["to_step"])
        self.record["rolled_back"] = self.record.get("rolled_back", 0.0) + lost_seconds(self.record, to)
        productive = self.record["seconds"]["productive"]
        self.record["saved"] = {k: v for k, v in self.record["saved"].items() if int(k) < to}
        self.record["saved"][str(to)] = productive  # a resume from it now loses only what follows
        self.record["step"] = to
        self._write(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.record is None:
            return
        if trainer.timings["checkpoint_save"] != self._saves_seen:  # the final save
            self.record["saved"][str(trainer.state.step)] = self.record["seconds"]["productive"]
        self.record["ended"] = "stopped" if trainer.stop_requested else "finished"
        self._write(trainer, tensorboard=True)

    def accounting(self) -> dict[str, Any]:
        """:func:`pretrain.goodput.account` over the earlier segments and this one, as of its last write."""
        return account([*self.previous, self.record])

    def _write(self, trainer: Trainer, tensorboard: bool = False) -> None:
        self._measured(trainer)
        self.record["updated"] = time.time()
        f = goodput_segment_file(trainer.cfg.run_dir, self.record["segment"])
        f.parent.mkdir(parents=True, exist_ok=True)
        # rewritten at every logging step: no fsync on the training loop's path (a lost newest version only
        # moves a few seconds from "lost work" to "between segments")
        atomic_write_text(f, json.dumps(self.record, indent=1) + "\n", durable=False)
        writer = _writer(trainer) if tensorboard else None
        if writer is not None:
            for k, v in scalars(self.accounting()).items():
                writer.add_scalar(k, v, trainer.state.step)
            writer.flush()


class StragglerMonitor(Callback):
    """Per logging interval, each rank's mean *lead time*: from the end of the previous step to the loss of
    the step's first micro-batch (its data wait and forward, and any rank-local work between steps), all
    before the step's first collective at ZeRO 0-2 (ZeRO-3 gathers parameters inside the forward, so there
    the fast ranks' lead times include some waiting). ``train/step_time`` cannot tell a straggler: it
    includes the wait in the step's collectives, so every rank's is about the slowest one's. Register it
    after the built-in callbacks: its clock restarts after their end-of-step work (checkpoints, logging),
    which ends in collectives, and before other ``on_loss`` hooks."""

    def __init__(self, ratio: float):
        self.ratio = ratio
        self._mark = 0.0
        self._busy = 0.0
        self._steps = 0
        self._arrived = False
        self._first_step = 0
        self._hosts: list[str] | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        self._mark = time.perf_counter()
        self._first_step = trainer.state.step + 1

    def on_loss(self, trainer: Trainer, loss: torch.Tensor, micro_step: int) -> torch.Tensor:
        if micro_step == 0 and not self._arrived:  # the step's first loss: before its first collective
            self._busy += time.perf_counter() - self._mark
            self._steps += 1
            self._arrived = True
        return loss

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.dist.world_size > 1 and self._steps and _logging_step(trainer):
            self._report(trainer)
        self._arrived = False
        self._mark = time.perf_counter()

    def _report(self, trainer: Trainer) -> None:
        n = trainer.dist.world_size
        mine = torch.tensor([self._busy / self._steps], dtype=torch.float64, device=trainer.dist.device)
        every = [torch.zeros_like(mine) for _ in range(n)]
        dist.all_gather(every, mine)
        times = torch.cat(every).tolist()
        first, last = self._first_step, trainer.state.step
        self._busy, self._steps, self._first_step = 0.0, 0, last + 1
        median = statistics.median(times)
        slowest = max(range(n), key=times.__getitem__)
        ratio = times[slowest] / median if median > 0 else 1.0
        writer = _writer(trainer)
        if writer is not None:
            writer.add_scalar("straggler/slowest_over_median", ratio, last)
            writer.add_scalar("straggler/slowest_rank", slowest, last)
            writer.add_scalar("straggler/slowest_s", times[slowest], last)
            writer.add_scalar("straggler/median_s", median, last)
            writer.flush()
        if ratio > self.ratio:  # the same decision on every rank (the same gathered times)
            if self._hosts is None:
                self._hosts = [""] * n
                dist.all_gather_object(self._hosts, socket.gethostname())  # once, on a logging step
            print0(f"warning: straggler rank {slowest} on host {self._hosts[slowest]}: {times[slowest]:.3f} s per step "
                   f"from the previous step to its first loss, {ratio:.2f}x the median {median:.3f} s (steps {first}-{last}, "
                   f"metrics.straggler_ratio={self.ratio:g}): a slow device, data read or host")
