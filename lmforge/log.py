"""Rank-aware output: one helper, so only rank 0 talks unless asked otherwise."""

from __future__ import annotations

import os
import sys


def env_rank() -> int:
    """Global rank from torchrun / SLURM environment (0 when not distributed)."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def is_rank0() -> bool:
    return env_rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on global rank 0 only; flushed so logs interleave sensibly under srun/torchrun."""
    if is_rank0():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def progress_enabled() -> bool:
    """tqdm bars only on rank 0 and on a terminal (or when LMFORGE_PROGRESS=1 forces them)."""
    forced = os.environ.get("LMFORGE_PROGRESS")
    if forced is not None:
        return forced == "1" and is_rank0()
    return is_rank0() and sys.stderr.isatty()
