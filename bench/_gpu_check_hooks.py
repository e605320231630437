"""The callback ``bench/gpu_check.sh`` installs in its signal run (``--callbacks=[bench._gpu_check_hooks:pause]``).

``LMFORGE_GPU_CHECK_PAUSE=STEP:MARKER``: at the end of optimizer step STEP every rank writes
``MARKER.rank<R>`` (its pid) and waits, at most ``LMFORGE_GPU_CHECK_PAUSE_S`` seconds (120), until the
process receives SIGUSR1/SIGTERM (the trainer's Checkpointer sets its flag). The checker sends the
signal from outside once it sees the marker, so the signal really arrives mid-run, on a run of ~30 steps
that a GPU finishes in a few seconds. Training itself is not changed: the save happens at the next step
boundary, as for any signal. A resumed run starts past STEP and never pauses.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pretrain.checkpoint import Checkpointer
from pretrain.trainer import Callback


class PauseForSignal(Callback):
    def __init__(self, step: int, marker: Path, timeout_s: float):
        self.step, self.marker, self.timeout_s = step, marker, timeout_s

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.state.step != self.step:
            return
        checkpointer = next((cb for cb in trainer.callbacks if isinstance(cb, Checkpointer)), None)
        if checkpointer is None:
            raise RuntimeError("PauseForSignal: the trainer has no Checkpointer to receive the signal")
        marker = self.marker.with_name(f"{self.marker.name}.rank{trainer.dist.rank}")
        marker.write_text(f"{os.getpid()}\n")
        deadline = time.monotonic() + self.timeout_s
        while not checkpointer.signalled and time.monotonic() < deadline:
            time.sleep(0.02)


def pause() -> PauseForSignal:
    step, _, marker = os.environ["LMFORGE_GPU_CHECK_PAUSE"].partition(":")
    return PauseForSignal(int(step), Path(marker), float(os.environ.get("LMFORGE_GPU_CHECK_PAUSE_S", "120")))
