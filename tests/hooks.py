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
            first = loader.cursor + loader.rank * loader.micro_batch  # the loader's contract: a contiguous slice
            batch = draw()
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
