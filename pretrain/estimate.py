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

Network traffic (:func:`comm_bytes_per_rank`) is what DeepSpeed 0.19.8 sends per optimizer step with the
GPU engine settings (``ds_configs/gpu/``), counted in ring collectives: an all-gather or reduce-scatter of
S bytes sends (N-1)/N·S from each of the N ranks, an all-reduce 2(N-1)/N·S (NCCL's ring algorithm; nccl-tests'
"bus bandwidth" is this traffic over the time). Gradients and parameters travel in 16 bits for bf16/fp16
runs (``communication_data_type`` defaults to the model dtype, engine.py:1719, also when gradients
accumulate in fp32), in 32 for fp32. With Ψ parameters, S = 2Ψ bytes in bf16, and A micro-steps per step:
- ZeRO-0: one gradient all-reduce at the accumulation boundary, after backward (engine.py:3088
  "Communicate only at gradient accumulation boundaries"): 2S(N-1)/N.
- ZeRO-1: the same all-reduce once per step, and an all-gather of the updated 16-bit parameters after the
  step: 3S(N-1)/N. bf16 runs use BF16_Optimizer (fp32 accumulation), which reduces after the last backward
  (engine.py:3095 ``buffered_allreduce_fallback``) and gathers in ``update_lp_params`` (bf16_optimizer.py:431);
  the ZeRO optimizer reduces in the last backward's gradient hooks (stage_1_and_2.py:2294).
- ZeRO-2: an all-reduce of the gradients in *every* micro-step's backward (stage_1_and_2.py:2294 reduces
  when ``partition_gradients`` whatever the boundary; :1695 ``use_multi_rank_bucket_allreduce``, default
  true, all-reduces the whole bucket instead of reducing each slice to its owner), plus the all-gather
  after the step (stage_1_and_2.py:3153): A·2S(N-1)/N + S(N-1)/N.
- ZeRO-3: every micro-step gathers the parameters for forward and again for backward (with activation
  checkpointing one gather serves a layer's recomputation and its gradients, which follow each other) and
  reduce-scatters the gradients (stage3.py:1931 ``reduce_scatter_coalesced``): A·3S(N-1)/N; no all-gather
  after the step (the parameters stay partitioned). Tensors under ``stage3_param_persistence_threshold``
  (1e5 elements: the norm weights, 0.004% of ``7b``) are not gathered and are counted anyway; parameters kept
  between forward and backward by ``stage3_max_reuse_distance`` (at most ``stage3_max_live_parameters``,
  1e9) are counted as gathered again: an upper bound. ``zero.offload_param`` (host to device over PCIe)
  is not modelled.
The time is bytes / bandwidth, the bandwidth one GPU's share of the network (``--net_gbps``, default
400 Gb/s: one 400 Gb/s NIC per H100, as in DGX H100 and AWS p5). That is what a ring spanning several
nodes runs at; within one node NVLink is about 10 times faster, so there the estimate is an upper bound.
The compute time is the model's FLOPs for one rank's tokens at an assumed MFU of the peak. Communication
overlaps with backward (``overlap_comm``, ZeRO-3 prefetching) except where noted "not overlapped": the
post-step all-gather, and the all-reduce after backward at ZeRO-0 and BF16_Optimizer's ZeRO-1.
"compute-bound" means the traffic fits in the compute time, so that it *can* hide behind it.
"""

from __future__ import annotations

import math
import os
from typing import Any

from lmforge.errors import ConfigError
from pretrain.config import PretrainConfig
from pretrain.engine import BatchPlan, batch_plan, plan_batches
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


# Assumed, not measured, by the communication estimate (module docstring); --dry-run's --net_gbps and --mfu.
NET_GBPS = 400.0  # one GPU's share of the network: a 400 Gb/s NDR InfiniBand NIC per H100 (DGX H100, AWS p5)
# Model FLOPs utilisation of a well-run dense pretraining job on H100s: Llama 3 reports 38-43% in bf16 (Dubey et
# al. 2024, Table 4). A higher MFU shortens the compute time that communication must fit in: keep a margin.
ASSUMED_MFU = 0.4
ASSUMED_GPU = "NVIDIA H100 80GB HBM3"  # the GPU whose peak (pretrain.callbacks.GPU_PEAKS) the compute time assumes


def comm_bytes_per_rank(n_params: int, world_size: int, stage: int, grad_accum_steps: int, precision: str,
                        bf16_optimizer: bool = False) -> dict[str, Any]:
    """Bytes one rank sends per optimizer step (module docstring): ``{total, not_overlapped, per_micro_step,
    collectives}``; ``collectives`` lists ``{what, per, count, bytes, overlapped}``: ``bytes`` each time,
    ``count`` times a step (once per ``per``: "micro-step" or "step"). ``bf16_optimizer``: ZeRO-1 runs
    DeepSpeed's BF16_Optimizer (bf16 with fp32 accumulation and no optimizer offload, what
    ``pretrain.engine.ds_config`` asks for), which all-reduces after backward instead of during it."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage: expected 0, 1, 2 or 3, got {stage}")
    if world_size < 1 or grad_accum_steps < 1:
        raise ValueError(f"world_size and grad_accum_steps must be >= 1, got {world_size}, {grad_accum_steps}")
    size = (4 if precision == "fp32" else 2) * n_params  # S: all gradients, or all (16-bit) parameters
    ring = round(size * (world_size - 1) / world_size)  # one ring all-gather or reduce-scatter of S; all-reduce: 2x

    def once(what: str, n_bytes: int, overlapped: bool) -> dict[str, Any]:
        return {"what": what, "per": "step", "count": 1, "bytes": n_bytes, "overlapped": overlapped}

    def each_micro_step(what: str, n_bytes: int) -> dict[str, Any]:  # all overlapped with backward
        return {"what": what, "per": "micro-step", "count": grad_accum_steps, "bytes": n_bytes, "overlapped": True}

    gather = once("parameter all-gather after the step", ring, False)
    if stage == 0:
        coll = [once("gradient all-reduce after backward", 2 * ring, False)]
    elif stage == 1:
        when = "after the last backward" if bf16_optimizer else "in the last backward"
        coll = [once(f"gradient all-reduce {when}", 2 * ring, not bf16_optimizer), gather]
    elif stage == 2:
        coll = [each_micro_step("gradient all-reduce in backward", 2 * ring), gather]
    else:
        coll = [each_micro_step("2 parameter all-gathers + 1 gradient reduce-scatter", 3 * ring)]
    return {
        "total": sum(c["count"] * c["bytes"] for c in coll),
        "not_overlapped": sum(c["count"] * c["bytes"] for c in coll if not c["overlapped"]),
        "per_micro_step": sum(c["bytes"] for c in coll if c["per"] == "micro-step"),
        "collectives": coll,
    }


def _assumed_peak(cfg: PretrainConfig, precision: str) -> tuple[float, str]:
    if cfg.metrics.peak_flops:
        return cfg.metrics.peak_flops, "metrics.peak_flops"
    from pretrain.callbacks import gpu_peak_flops

    peak, source = gpu_peak_flops(ASSUMED_GPU, precision)
    return peak, source.removeprefix("table: ")


def network_plan(cfg: PretrainConfig, n_params: int, fpt: float, plan: BatchPlan, precision: str,
                 net_gbps: float = NET_GBPS, mfu: float = ASSUMED_MFU) -> dict[str, Any]:
    """Per rank and optimizer step: bytes sent and their time at ``net_gbps``, next to the compute time at
    ``mfu`` of the assumed peak; ``bound`` says which is longer, ``remedy`` what would make it compute-bound."""
    if not net_gbps > 0:
        raise ConfigError(f"--net_gbps={net_gbps}: expected a positive bandwidth in Gb/s per GPU, e.g. --net_gbps=400")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu={mfu}: expected a fraction of the peak in (0, 1], e.g. --mfu=0.4")
    peak, source = _assumed_peak(cfg, precision)
    bf16_optimizer = precision == "bf16" and not cfg.zero.offload_optimizer

    def cost(p: BatchPlan) -> tuple[dict[str, Any], float, float]:
        c = comm_bytes_per_rank(n_params, p.dp_world, cfg.zero.stage, p.grad_accum_steps, precision, bf16_optimizer)
        compute = fpt * p.tokens_per_step / p.dp_world / (peak * mfu) if peak else 0.0
        return c, c["total"] * 8 / (net_gbps * 1e9), compute

    c, comm, compute = cost(plan)
    bound = "compute" if comm <= compute else "communication"
    return {
        "assumed_gbps_per_rank": net_gbps,
        "gb_per_rank": round(c["total"] / 1e9, 1),  # per optimizer step; GB = 1e9 bytes, as network rates count
        "gb_per_rank_per_micro_step": round(c["per_micro_step"] / 1e9, 1),  # ZeRO-2/3: repeated every micro-step
        "collectives": [_collective(x) for x in c["collectives"]],
        "comm_seconds": round(comm, 2),
        "comm_seconds_not_overlapped": round(c["not_overlapped"] * 8 / (net_gbps * 1e9), 2),
        "tokens_per_rank": plan.tokens_per_step // plan.dp_world,
        "compute_seconds": round(compute, 2),
        "assumed_mfu": mfu,
        "assumed_peak_flops": peak,
        "peak_source": source,
        "bound": bound,
        "remedy": None if bound == "compute" else _remedy(cfg, plan, cost),
    }


def _collective(x: dict[str, Any]) -> str:
    """'4 micro-steps x 39.2 GB: 2 parameter all-gathers + 1 gradient reduce-scatter', '2.5 GB: ..., not overlapped'."""
    many = f"{x['count']} micro-step{'s' if x['count'] > 1 else ''} x " if x["per"] == "micro-step" else ""
    return f"{many}{x['bytes'] / 1e9:.1f} GB: {x['what']}" + ("" if x["overlapped"] else ", not overlapped")


def _remedy(cfg: PretrainConfig, plan: BatchPlan, cost) -> str:
    """What would make a communication-bound plan compute-bound: the first of a global batch that splits into
    full micro-batches, a larger micro-batch (ZeRO-2/3 send per micro-step), a larger global batch (ZeRO-0/1)."""
    asked, micro, ranks, stage = cfg.train.global_batch_size, cfg.train.micro_batch_size, plan.dp_world, cfg.zero.stage
    share = plan.global_batch // ranks

    def sends(p: BatchPlan) -> str:
        c, comm, compute = cost(p)
        return f"would send {c['total'] / 1e9:.3g} GB (~{comm:.3g} s vs compute {compute:.3g} s)" if comm <= compute else ""

    if asked and plan.micro_batch_per_rank < min(micro, share):  # the share does not split into full micro-batches
        full = -(-asked // (micro * ranks)) * micro * ranks
        p = plan_batches(micro, full, ranks, plan.seq_len)
        if sends(p):
            return (f"{share} sequences per rank do not split into micro-batches of {micro}: "
                    f"train.global_batch_size={full} (micro {p.micro_batch_per_rank} x accum {p.grad_accum_steps}) {sends(p)}")
    if asked and stage >= 2:
        for m in range(micro + 1, share + 1):
            p = plan_batches(m, asked, ranks, plan.seq_len)
            if p.micro_batch_per_rank == m and sends(p):
                return (f"raise train.micro_batch_size (ZeRO-{stage} sends the whole model in every micro-step): "
                        f"train.micro_batch_size={m} {sends(p)} if its activations fit")
    # ZeRO-0/1 send the same bytes a step whatever its tokens, ZeRO-2/3 too at one micro-step per step (their
    # least): a larger global batch adds compute, not traffic
    one_step = plan if stage <= 1 else plan_batches(share, plan.global_batch, ranks, plan.seq_len)
    _, comm, compute = cost(one_step)
    more = math.ceil(plan.global_batch * comm / compute / ranks) * ranks if compute else 0
    at = "" if stage <= 1 else f" at one micro-step (train.micro_batch_size={more // ranks}, if its activations fit)"
    return (f"each rank's share of the global batch is too small for this network: raise train.global_batch_size "
            f"to {more} or more{at}, or run on fewer ranks")


def network_lines(n: dict[str, Any], world_size: int, stage: int, flops_per_token: float) -> list[str]:
    """The dry-run lines for ``describe()["network"]``: bytes and time, compute time, which bounds the step."""
    if world_size == 1:
        net = "network: nothing sent (1 rank)"
    else:
        net = (f"network: {n['gb_per_rank']:,.1f} GB sent per rank per step (ZeRO-{stage}: {'; '.join(n['collectives'])}), "
               f"~{n['comm_seconds']:.3g} s at an assumed {n['assumed_gbps_per_rank']:g} Gb/s per GPU (--net_gbps=G to "
               f"change), {n['comm_seconds_not_overlapped']:.3g} s of it not overlapped with compute")
    compute = (f"compute: ~{n['compute_seconds']:.3g} s per step ({n['tokens_per_rank']:,} tokens per rank x "
               f"{flops_per_token:.3g} FLOP/token at an assumed {n['assumed_mfu']:.0%} MFU of "
               f"{n['assumed_peak_flops'] / 1e12:g} TFLOP/s, {n['peak_source']}; --mfu=F, --metrics.peak_flops=F to change)")
    verdict = f"{n['bound']}-bound (comm {n['comm_seconds']:.3g} s vs compute {n['compute_seconds']:.3g} s)"
    return [net, compute, "bound: " + verdict + (f": {n['remedy']}" if n["remedy"] else "")]


def describe(cfg: PretrainConfig, vocab_size: int, world_size: int = 1, net_gbps: float = NET_GBPS,
             mfu: float = ASSUMED_MFU) -> dict[str, Any]:
    """What ``--dry-run`` prints: sizes, FLOPs, per-rank model-state memory for ZeRO 0-3, and the network
    traffic per rank next to the compute time (at ``net_gbps`` per GPU and ``mfu`` of the assumed peak)."""
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
        "network": network_plan(cfg, n_params, fpt, plan, precision, net_gbps, mfu),
    }
