"""The loss-spike guard: which steps are spikes, and when to roll back.

A spike is a step whose loss (the mean over ranks, as the step's one collective agrees it) lies more
than ``threshold`` deviations above the mean of the last ``window`` good steps; the spread has a floor
(``min_spread`` of the mean) so a flat curve does not turn noise into spikes. The gradient norm is
watched the same way, one step late (it is known only after the update): a gradient-norm spike counts
towards a rollback but cannot be skipped. Nothing is judged before ``warmup`` good steps.

Actions (``spike.action``): ``log`` counts spikes (``train/spikes``); ``skip`` also leaves the step's
update out, like a non-finite loss; ``rollback`` skips too, and after ``rollback_after`` spikes within
``rollback_within`` steps restores the newest checkpoint before the first of them and moves the data
past every sample trained since (PaLM's recipe: restart ~100 steps before the spike and skip the
batches seen around it). The guard is pure bookkeeping on host floats that every rank holds alike, so
every rank reaches the same verdict without a further collective; its window is part of the run state.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass
class Verdict:
    loss_spike: bool = False  # this step's loss is a spike
    grad_spike: bool = False  # the previous step's gradient norm was a spike
    skip: bool = False  # leave this step's update out
    rollback: bool = False  # roll back after this step


class SpikeGuard:
    """``cfg``: the ``spike`` config section (action, window, threshold, warmup, min_spread, grad_norm,
    rollback_after, rollback_within)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.norms: deque[float] = deque(maxlen=cfg.window)
        self.recent: deque[int] = deque()  # steps of the spikes within the rollback window

    @property
    def on(self) -> bool:
        return self.cfg.action != "off"

    def _is_spike(self, history: deque[float], value: float) -> bool:
        if len(history) < max(2, self.cfg.warmup) or not math.isfinite(value):
            return False
        mean = sum(history) / len(history)
        spread = math.sqrt(sum((x - mean) ** 2 for x in history) / (len(history) - 1))
        spread = max(spread, self.cfg.min_spread * abs(mean))
        return value > mean + self.cfg.threshold * spread

    def would_skip(self, loss: float) -> bool:
        """Whether ``loss`` would be a skipped spike now (the window is not changed)."""
        return self.cfg.action in ("skip", "rollback") and self._is_spike(self.losses, loss)

    def observe(self, step: int, loss: float, prev_grad_norm: float | None = None) -> Verdict:
        """The verdict on step ``step`` (its agreed loss; the previous step's gradient norm)."""
        v = Verdict()
        if not self.on:
            return v
        if prev_grad_norm is not None and self.cfg.grad_norm and math.isfinite(prev_grad_norm):
            v.grad_spike = self._is_spike(self.norms, prev_grad_norm)
            if not v.grad_spike:
                self.norms.append(prev_grad_norm)
        v.loss_spike = self._is_spike(self.losses, loss)
        if math.isfinite(loss) and not v.loss_spike:
            self.losses.append(loss)
        if v.loss_spike or v.grad_spike:
            self.recent.append(step)
        while self.recent and self.recent[0] <= step - self.cfg.rollback_within:
            self.recent.popleft()
        v.skip = v.loss_spike and self.cfg.action in ("skip", "rollback")
        v.rollback = self.cfg.action == "rollback" and len(self.recent) >= self.cfg.rollback_after
        return v

    def first_recent_spike(self) -> int | None:
        return self.recent[0] if self.recent else None

    def forget_recent(self) -> None:
        self.recent.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "norms": list(self.norms), "recent": list(self.recent)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.losses = deque(sd.get("losses", []), maxlen=self.cfg.window)
        self.norms = deque(sd.get("norms", []), maxlen=self.cfg.window)
        self.recent = deque(sd.get("recent", []))
