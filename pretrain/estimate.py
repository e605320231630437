"""Size estimates for ``--dry-run``: parameters, FLOPs per token and ZeRO memory per rank.

Nothing is allocated: the model is built on the meta device and counted.

Memory is *model states* only (the ZeRO paper, Rajbhandari et al. 2020, §3.1): with Ψ parameters
and mixed precision a rank holds 2Ψ bytes of 16-bit params, 2Ψ of 16-bit grads and KΨ of optimizer
states, K = 12 (fp32 master weights + Adam m + v). Stage 1 partitions the optimizer states over the
data-parallel ranks, stage 2 also the gradients, stage 3 also the parameters. fp32 training keeps
4Ψ + 4Ψ + 8Ψ (no master copy). Activations, temporary buffers and fragmentation are not included.

DeepSpeed's own estimators (``estimate_zero2/3_model_states_mem_needs``) differ by design:
- ZeRO-2: ``2Ψ + 18Ψ/N`` — they also count the fp32 gradient partition (4Ψ/N) that the optimizer
  step reads, on top of the paper's 2Ψ/N 16-bit gradients.
- ZeRO-3: ``4·largest_layer + 18Ψ/N`` — a gather buffer for the largest layer, and the gradients as
  fp32 (4Ψ/N) instead of 16-bit (2Ψ/N).
``tests/test_model.py`` checks both relations exactly.

bf16 runs accumulate gradients in fp32 (``pretrain.engine.BF16_GRAD_ACCUM_DTYPE``), which costs memory:
ZeRO-1 adds a full-size fp32 gradient buffer (4Ψ, DeepSpeed's BF16_Optimizer), ZeRO-2/3 keep their
gradient partitions in fp32 (4Ψ/N instead of 2Ψ/N). ``fp32_grad_accum=True`` counts that.

Checkpoint size is what DeepSpeed 0.19 writes (measured with the tiny preset at 2 ranks for every stage
and precision; ``tests/test_scale_config.py`` checks the bf16 ZeRO-1 case against a real save):
``mp_rank_00_model_states.pt`` on data-parallel rank 0 holds the module in its dtype (stages 0-2; at
stage 3 the parameters are partitioned and the file per rank holds only the small persistent ones);
stage 0 also puts the optimizer in it (bf16/fp16: fp32 master + Adam m, v = 12Ψ; fp32: m, v = 8Ψ);
stages 1-3 write ``*zero_pp_rank_R_*_optim_states.pt`` per rank: fp32 master partition + m + v = 12Ψ/N,
for fp32 models too (the ZeRO optimizer keeps its own fp32 partition).
"""

from __future__ import annotations

import os
from typing import Any

from lmforge.errors import ConfigError
from pretrain.config import PretrainConfig
from pretrain.engine import batch_plan
from pretrain.model import build_model, count_params, count_params_analytic, flops_per_token, param_breakdown

GiB = 2**30  # DeepSpeed's estimators print bytes / 2**30 as "GB"; so do we

# bytes per parameter: (params, grads, optimizer states) held by one unpartitioned rank
STATE_BYTES = {
    "bf16": (2, 2, 12),  # 16-bit params + grads; fp32 master, Adam m, Adam v
    "fp16": (2, 2, 12),
    "fp32": (4, 4, 8),  # params are the master copy; Adam m, v
}


def _per_rank(n: int, world_size: int, partitioned: bool) -> int:
    # DeepSpeed pads a flat partition so it divides evenly: ceil(n / world)
    return -(-n // world_size) if partitioned else n


def zero_memory_per_rank(
    n_params: int,
    world_size: int,
    stage: int,
    precision: str,
    offload_optimizer: bool = False,
    fp32_grad_accum: bool = False,
) -> dict[str, int]:
    """Bytes of model states on one rank: ``{params, grads, optimizer, total, offloaded}``.

    ``total`` is what stays on the device; with ``offload_optimizer`` the optimizer states move to
    host memory and are reported under ``offloaded`` (per rank) instead. ``fp32_grad_accum``: the
    16-bit gradients are summed in fp32 (see the module docstring; ZeRO-0 cannot, so it is ignored there).
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage: expected 0, 1, 2 or 3, got {stage}")
    if precision not in STATE_BYTES:
        raise ValueError(f"precision: expected one of {'|'.join(STATE_BYTES)}, got {precision!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if offload_optimizer and stage == 0:
        raise ValueError("offload_optimizer needs ZeRO stage >= 1")
    p, g, k = STATE_BYTES[precision]
    out = {
        "params": p * _per_rank(n_params, world_size, stage >= 3),
        "grads": g * _per_rank(n_params, world_size, stage >= 2),
        "optimizer": k * _per_rank(n_params, world_size, stage >= 1),
        "offloaded": 0,
    }
    if fp32_grad_accum and stage == 1:  # BF16_Optimizer: a full fp32 buffer next to the 16-bit grads
        out["grads"] += 4 * n_params
    elif fp32_grad_accum and stage >= 2:  # the gradient partition itself is fp32
        out["grads"] = 4 * _per_rank(n_params, world_size, True)
    if offload_optimizer:
        out["offloaded"], out["optimizer"] = out["optimizer"], 0
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


# Assumed, not measured: the aggregate write bandwidth of the checkpoint filesystem for the whole job.
# Deliberately low (a shared filesystem under load); a run prints what each save really took
# ("checkpoint step_N saved (interval, Ns)"): set LMFORGE_SAVE_GIBPS to the figure seen there.
SAVE_GIB_PER_S = 1.0


def checkpoint_bytes(n_params: int, world_size: int, stage: int, precision: str) -> dict[str, int]:
    """Bytes DeepSpeed writes per checkpoint (module docstring): ``{rank0, other_rank, total}``."""
    model = (2 if precision in ("bf16", "fp16") else 4) * n_params
    if stage == 0:  # one file on rank 0: module + optimizer
        rank0 = model + (8 if precision == "fp32" else 12) * n_params
        return {"rank0": rank0, "other_rank": 0, "total": rank0}
    optim = 12 * _per_rank(n_params, world_size, True)  # fp32 master partition + Adam m, v
    rank0 = optim + (model if stage < 3 else 0)
    return {"rank0": rank0, "other_rank": optim, "total": rank0 + optim * (world_size - 1)}


def save_gib_per_s() -> float:
    """The assumed write bandwidth: ``LMFORGE_SAVE_GIBPS`` or :data:`SAVE_GIB_PER_S`."""
    raw = os.environ.get("LMFORGE_SAVE_GIBPS", "")
    try:
        value = float(raw) if raw else SAVE_GIB_PER_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"LMFORGE_SAVE_GIBPS={raw!r}: expected a positive number of GiB/s, e.g. LMFORGE_SAVE_GIBPS=4")
    return value


def checkpoint_plan(cfg: PretrainConfig, n_params: int, world_size: int, precision: str) -> dict[str, Any]:
    """Size and expected time of one save, and how often the config saves."""
    size = checkpoint_bytes(n_params, world_size, cfg.zero.stage, precision)
    bandwidth = save_gib_per_s()
    return {
        "interval_minutes": cfg.checkpoint.interval_minutes,
        "interval_steps": cfg.checkpoint.interval_steps,
        "save_gib": round(size["total"] / GiB, 3),
        "save_gib_rank0": round(size["rank0"] / GiB, 3),  # the largest rank's share
        "save_seconds": round(size["total"] / GiB / bandwidth, 1),
        "assumed_write_gib_per_s": bandwidth,
    }


def saves_line(c: dict[str, Any]) -> str:
    """The dry-run line for ``describe()["checkpoint"]``: how often, how big and how long a save is."""
    every = " and ".join(x for x in (f"{c['interval_minutes']:g} min" if c["interval_minutes"] else "",
                                     f"{c['interval_steps']} steps" if c["interval_steps"] else "") if x)
    when = f"every {every}" if every else "none on an interval (checkpoint.interval_minutes=0): a fault loses the run"
    return (f"saves: {when}; {c['save_gib']:g} GiB per save ({c['save_gib_rank0']:g} GiB on rank 0), "
            f"~{c['save_seconds']:g} s at an assumed {c['assumed_write_gib_per_s']:g} GiB/s write bandwidth "
            "(LMFORGE_SAVE_GIBPS=N to change)")


def describe(cfg: PretrainConfig, vocab_size: int, world_size: int = 1) -> dict[str, Any]:
    """What ``--dry-run`` prints: sizes, FLOPs and per-rank model-state memory for ZeRO 0-3."""
    m = cfg.model
    n_params = count_params(build_model(m, vocab_size, device="meta"))
    if n_params != count_params_analytic(m, vocab_size):  # the FLOPs formula relies on the closed form
        raise AssertionError(f"parameter count {n_params} != closed form {count_params_analytic(m, vocab_size)}")
    plan = batch_plan(cfg, world_size)  # the engine's batch arithmetic, so the two cannot disagree
    tokens_per_step = plan.tokens_per_step
    fpt = flops_per_token(m, vocab_size, cfg.data.seq_len)
    # a dry run plans for the accelerator the job will get (a login node has none): auto means bf16 there
    precision = "bf16" if cfg.precision == "auto" else cfg.precision
    fp32_accum = precision == "bf16"  # what pretrain.engine.ds_config asks DeepSpeed for
    memory = {}
    for stage in range(4):
        offload = cfg.zero.offload_optimizer and stage > 0
        mem = zero_memory_per_rank(n_params, world_size, stage, precision, offload, fp32_accum)
        memory[f"zero{stage}"] = round(mem["total"] / GiB, 3)
    return {
        "kind": m.kind,
        "n_params": n_params,
        "n_params_nonembedding": n_params - param_breakdown(m, vocab_size)["embedding"],
        "nominal_params": m.nominal_params,
        "vocab_size": vocab_size,
        "seq_len": cfg.data.seq_len,
        "flops_per_token": fpt,
        "world_size": world_size,
        "micro_batch_size": plan.micro_batch_per_rank,  # <= train.micro_batch_size (the largest allowed)
        "global_batch_size": plan.global_batch,
        "grad_accum_steps": plan.grad_accum_steps,
        "batch_note": plan.note or None,
        "tokens_per_step": tokens_per_step,
        "flops_per_step": fpt * tokens_per_step,
        "precision": cfg.precision if precision == cfg.precision else f"{cfg.precision} (bf16 on GPUs)",
        "zero_stage": cfg.zero.stage,
        # where micro-steps' gradients are summed (pretrain.engine.BF16_GRAD_ACCUM_DTYPE; ZeRO-0 cannot use fp32)
        "grad_accum_dtype": "fp32" if precision == "fp32" or (fp32_accum and cfg.zero.stage > 0) else precision,
        "offload_optimizer": cfg.zero.offload_optimizer,
        "memory_per_rank_gb": memory,  # model states only, GiB (2**30 bytes)
        "checkpoint": checkpoint_plan(cfg, n_params, world_size, precision),
    }
