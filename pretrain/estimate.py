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
"""

from __future__ import annotations

from typing import Any

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
) -> dict[str, int]:
    """Bytes of model states on one rank: ``{params, grads, optimizer, total, offloaded}``.

    ``total`` is what stays on the device; with ``offload_optimizer`` the optimizer states move to
    host memory and are reported under ``offloaded`` (per rank) instead.
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
    if offload_optimizer:
        out["offloaded"], out["optimizer"] = out["optimizer"], 0
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


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
    memory = {}
    for stage in range(4):
        offload = cfg.zero.offload_optimizer and stage > 0
        mem = zero_memory_per_rank(n_params, world_size, stage, precision, offload)
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
        "micro_batch_size": cfg.train.micro_batch_size,
        "global_batch_size": plan.global_batch,
        "grad_accum_steps": plan.grad_accum_steps,
        "tokens_per_step": tokens_per_step,
        "flops_per_step": fpt * tokens_per_step,
        "precision": cfg.precision if precision == cfg.precision else f"{cfg.precision} (bf16 on GPUs)",
        "zero_stage": cfg.zero.stage,
        "offload_optimizer": cfg.zero.offload_optimizer,
        "memory_per_rank_gb": memory,  # model states only, GiB (2**30 bytes)
    }
