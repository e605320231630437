"""Where a training step's time goes: a cProfile of rank 0's steady-state steps, grouped by component.

Loaded into a pretraining run as ``--callbacks=[bench._profile_hook:profile]`` with
``LMFORGE_PROFILE_OUT=FILE`` and ``LMFORGE_PROFILE_FROM=STEP`` (the first profiled step; default 3).
Rank 0 profiles from the start of that step to the end of the last (before the final evaluation) and
writes JSON: the steps profiled,
their wall seconds, and the self time (``tottime``) of every function summed into the components of
:data:`COMPONENTS` (the first rule that matches a function wins), plus the 15 costliest functions.
cProfile slows Python-heavy code (DeepSpeed's per-parameter hooks) more than the C++ kernels, so the
shares are indicative; the step time with the profiler on is reported next to them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pretrain.trainer import Callback

# (component, test on the file of a Python function); first match wins. A built-in (a C++ op: file "~") is
# charged to the Python functions that called it, in proportion to the time each call took there, except
# the two named ones: the autograd engine and waiting on a collective.
COMPONENTS: list[tuple[str, object]] = [
    ("collectives (gloo)", lambda f: "torch/distributed" in f),
    ("optimizer (torch AdamW)", lambda f: "torch/optim" in f),
    ("DeepSpeed ZeRO partitioning and buckets", lambda f: "deepspeed/runtime/zero" in f),
    ("DeepSpeed engine", lambda f: "deepspeed/" in f),
    ("model forward", lambda f: "transformers/" in f or "torch/nn" in f),
    ("lmforge (loop, data, metrics)", lambda f: any(p in f for p in ("/pretrain/", "/data_pipeline/", "/lmforge/"))),
]
BACKWARD, COLLECTIVES, OTHER = "autograd backward", "collectives (gloo)", "other (python, torch internals)"


def component(file: str) -> str:
    for name, test in COMPONENTS:
        if test(file):  # type: ignore[operator]
            return name
    return OTHER


def charge(stats: dict) -> dict[tuple, dict[str, float]]:
    """{function: {component: self seconds}} for every profiled function."""
    out: dict[tuple, dict[str, float]] = {}
    for key, (_cc, _nc, tt, _ct, callers) in stats.items():
        file, _line, fn = key
        if file != "~":
            out[key] = {component(file): tt}
        elif "run_backward" in fn:
            out[key] = {BACKWARD: tt}
        elif "c10d" in fn or "wait" in fn:
            out[key] = {COLLECTIVES: tt}
        else:
            by = [(component(c[0]) if c[0] != "~" else OTHER, v[2]) for c, v in callers.items()]
            total = sum(t for _, t in by) or 1.0
            parts: dict[str, float] = {}
            for comp, t in by or [(OTHER, 1.0)]:
                parts[comp] = parts.get(comp, 0.0) + tt * t / total
            out[key] = parts
    return out


class Profile(Callback):
    def __init__(self, out: str, first: int):
        self.out, self.first = out, first
        self.prof = None
        self.t0 = 0.0
        self.steps = 0

    def on_step_end(self, trainer, metrics) -> None:
        if not trainer.dist.is_main:
            return
        if trainer.state.step == self.first - 1:
            import cProfile

            self.prof = cProfile.Profile()
            self.t0 = time.perf_counter()
            self.prof.enable()
        elif self.prof is not None:
            self.steps += 1
            if trainer.state.step >= trainer.cfg.train.max_steps:
                self._write()  # before the final evaluation

    def _write(self) -> None:
        self.prof.disable()
        wall = time.perf_counter() - self.t0
        import pstats

        st = pstats.Stats(self.prof)
        parts: dict[str, float] = {}
        funcs = []
        for (file, line, fn), split in charge(st.stats).items():  # type: ignore[attr-defined]
            for comp, t in split.items():
                parts[comp] = parts.get(comp, 0.0) + t
            main = max(split, key=split.get)
            funcs.append((sum(split.values()), f"{Path(file).name}:{line}({fn})", main))
        funcs.sort(reverse=True)
        n = max(self.steps, 1)
        Path(self.out).write_text(json.dumps({
            "steps_profiled": self.steps, "wall_seconds": wall, "seconds_per_step": wall / n,
            "per_step_seconds": {k: round(v / n, 4) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
            "top_functions": [{"seconds_per_step": round(t / n, 4), "function": f, "component": c}
                              for t, f, c in funcs[:15]],
        }, indent=1))
        self.prof = None


def profile() -> Profile:
    return Profile(os.environ["LMFORGE_PROFILE_OUT"], int(os.environ.get("LMFORGE_PROFILE_FROM", "3")))
