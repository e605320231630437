"""Small callbacks: throughput/MFU, TensorBoard, console lines, a progress bar."""

from __future__ import annotations

import resource
import time

import torch
import torch.distributed as dist

from lmforge.config import dump_yaml
from lmforge.errors import ConfigError
from lmforge.log import print0, progress_enabled
from pretrain.trainer import Callback, Trainer

# Dense (no sparsity) tensor-core peak FLOP/s per device and precision, from the vendors' datasheets.
# fp32 is the TF32 tensor-core peak: lmforge enables TF32 for fp32 matmuls on Ampere and later
# (pretrain.dist.init_distributed). Matched on torch.cuda.get_device_name(), the first pattern that
# matches wins, so the specific names come before the general ones.
GPU_PEAKS: list[tuple[str, str, dict[str, float]]] = [
    # (pattern, what it is, {precision: FLOP/s})
    (r"H100.*PCIe", "H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    (r"H100 NVL", "H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 418e12}),
    (r"H100", "H100 SXM", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),  # "NVIDIA H100 80GB HBM3"
    (r"H200", "H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),  # H100 SXM's compute, more memory
    (r"A100", "A100 40/80 GB", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),  # SXM4 and PCIe alike
    (r"L40S", "L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12}),
    (r"A10G", "A10G", {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12}),
    (r"V100", "V100", {"fp16": 125e12, "fp32": 15.7e12}),  # no bf16 on Volta
]


def gpu_peak_flops(device_name: str, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, what matched) for a CUDA device name in the run's precision; 0 when unknown."""
    import re

    for pattern, what, peaks in GPU_PEAKS:
        if re.search(pattern, device_name):
            if precision in peaks:
                return peaks[precision], f"table: {what} {precision}"
            return 0.0, f"{what} has no {precision} peak in the table: set metrics.peak_flops"
    return 0.0, f"unknown GPU {device_name}: set metrics.peak_flops"


def load_callbacks(specs: list[str]) -> list[Callback]:
    """``["module:factory", ...]`` → the callbacks the factories return (``--callbacks=[my.mod:Monitor]``)."""
    import importlib

    out = []
    for spec in specs:
        mod, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(f"callbacks: cannot load '{spec}' ({e}); write module:factory, importable here") from None
        cb = factory()
        if not isinstance(cb, Callback):
            raise ConfigError(f"callbacks: '{spec}' returned {type(cb).__name__}, not a pretrain.trainer.Callback")
        out.append(cb)
    return out


def measured_cpu_flops(dtype: torch.dtype = torch.float32, n: int = 512, trials: int = 5,
                       seconds: float = 0.1) -> float:
    """FLOP/s of this process's matmul in ``dtype``: the CPU 'peak' for MFU (honours OMP_NUM_THREADS).

    In the run's precision: CPUs with AMX or AVX512-BF16 multiply bf16 faster than fp32 (2.3x on the
    2-core test machine), so an fp32 peak would put a bf16 run's MFU above 100%. The best of several
    short trials, so that a moment of contention at start-up does not lower the peak (and inflate MFU).
    """
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(trials):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def device_peak_flops(configured: float | None, precision: str = "fp32") -> tuple[float, str]:
    """Per-device peak in the run's precision and where it came from (config, GPU table, or a CPU measurement)."""
    if configured:
        return configured, "config"
    if torch.cuda.is_available():
        return gpu_peak_flops(torch.cuda.get_device_name(), precision)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank measures at once, as they compute: the peak of a shared CPU
    return cpu_peak(precision, measured_cpu_flops)


def cpu_peak(precision: str, measure) -> tuple[float, str]:
    """The CPU's peak for a run in ``precision``: its matmul in that dtype, or in fp32 where that is faster. A CPU
    without AVX512-BF16/AMX multiplies bf16 through a slow generic kernel (measured: ~10x below fp32) while
    training's own bf16 layers run faster than that, so a bf16-only peak put MFU at 300% on such a CPU."""
    own = measure(DTYPES[precision])
    if precision == "fp32":
        return own, "measured CPU fp32 matmul"
    fp32 = measure(torch.float32)
    if fp32 > own:
        return fp32, f"measured CPU fp32 matmul, faster than {precision} on this CPU"
    return own, f"measured CPU {precision} matmul"


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


class MetricsLogger(Callback):
    """Aggregates steps over ``log_every`` and writes TensorBoard scalars and a console line.

    Every rank takes part in the one all-reduce (peak memory); only rank 0 writes.
    """

    def __init__(self, log_dir: str | None, flops_per_token: float, peak_flops: float, peak_source: str):
        self.log_dir = log_dir
        self.flops_per_token, self.peak_flops, self.peak_source = flops_per_token, peak_flops, peak_source
        self.writer = None
        self._window: list[dict[str, float]] = []

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.dist.is_main and self.log_dir:
            from torch.utils.tensorboard import SummaryWriter

            # On resume, events a crashed run logged after its checkpoint are purged: one continuous curve.
            purge = trainer.state.step + 1 if trainer.state.step else None
            self.writer = SummaryWriter(self.log_dir, purge_step=purge)
            self.writer.add_text("config", "```yaml\n" + dump_yaml(trainer.cfg) + "\n```", trainer.state.step)
        print0(f"MFU peak: {self.peak_flops / 1e12:.3f} TFLOP/s per device ({self.peak_source})")

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._window.append(metrics)
        step = trainer.state.step
        if step % trainer.cfg.train.log_every and step < trainer.cfg.train.max_steps:
            return
        scalars = self._aggregate(trainer)
        trainer.logged = scalars  # what the progress bar shows
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        print0(
            f"step {step:>6d} | loss {scalars.get('train/loss', float('nan')):.4f} | lr {scalars['train/lr']:.2e} | "
            f"{scalars['train/tokens_per_sec']:,.0f} tok/s | mfu {scalars['train/mfu'] * 100:.2f}%"
            + (f" | eval {scalars['eval/loss']:.4f}" if "eval/loss" in scalars else "")
        )

    def _aggregate(self, trainer: Trainer) -> dict[str, float]:
        """The window's metrics, read back from the device here (a logging step) and nowhere else: each
        step's loss is averaged over ranks in one all-reduce of the whole window."""
        w, self._window = self._window, []
        losses = torch.stack([torch.as_tensor(m["train/loss"], dtype=torch.float32, device=trainer.dist.device)
                              for m in w])
        mem = torch.tensor([peak_memory_gb(trainer.dist.device)], device=trainer.dist.device)
        if trainer.dist.world_size > 1:
            dist.all_reduce(losses)  # a skipped step is NaN on every rank (the skip is agreed)
            losses /= trainer.dist.world_size
            dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        step_losses = losses.tolist()
        for m, loss in zip(w, step_losses):
            m["train/loss"] = loss
        ok = [m for m in w if m["train/loss"] == m["train/loss"]]  # not NaN: skipped steps have no loss
        seconds = sum(m["train/step_time"] for m in w)
        tps = sum(m.get("train/step_tokens", trainer.plan.tokens_per_step) for m in w) / max(seconds, 1e-9)
        out = {k: float(v) for k, v in w[-1].items() if k != "train/step_tokens"}
        if ok:
            out["train/loss"] = sum(m["train/loss"] for m in ok) / len(ok)
            norms = [float(m["train/grad_norm"]) for m in ok if "train/grad_norm" in m]
            if norms:
                out["train/grad_norm"] = sum(norms) / len(norms)
        out["train/step_time"] = seconds / len(w)
        out["train/tokens_per_sec"] = tps
        out["train/mfu"] = (
            self.flops_per_token * tps / (self.peak_flops * trainer.dist.world_size) if self.peak_flops else 0.0
        )
        out["sys/peak_mem_gb"] = float(mem)
        for m in w:  # an evaluation inside the window is reported with it
            out.update({k: v for k, v in m.items() if k.startswith("eval/")})
        return {k: v for k, v in out.items() if v == v or k == "train/loss"}

    def on_rollback(self, trainer: Trainer, record: dict) -> None:
        """Steps after the rollback's checkpoint are trained again: their events are purged (one curve), and
        the rollback is recorded as text (the counters train/spikes, train/rollbacks, train/skipped_samples
        carry on)."""
        self._window = []
        if self.writer is not None:
            import json

            from torch.utils.tensorboard import SummaryWriter

            self.writer.close()
            self.writer = SummaryWriter(self.log_dir, purge_step=trainer.state.step + 1)
            self.writer.add_text("rollbacks", json.dumps(record), trainer.state.step)
            self.writer.flush()

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, trainer.state.step)
            self.writer.flush()

    def on_train_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class ProgressBar(Callback):
    """tqdm over optimizer steps, rank 0 only."""

    def __init__(self, enabled: bool | None):
        self.enabled = progress_enabled() if enabled is None else enabled
        self.bar = None

    def on_train_start(self, trainer: Trainer) -> None:
        if self.enabled and trainer.dist.is_main:
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.cfg.train.max_steps, initial=trainer.state.step, unit="step", dynamic_ncols=True)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            logged = getattr(trainer, "logged", None)  # the last logged loss: reading each step's would sync
            if logged and "train/loss" in logged:
                self.bar.set_postfix(loss=f"{logged['train/loss']:.3f}", refresh=False)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
