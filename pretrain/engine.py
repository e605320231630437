"""The DeepSpeed engine: batch arithmetic, precision and optimizer in one place.

``ds_configs/*.json`` (CPU) and ``ds_configs/gpu/*.json`` (CUDA) hold engine settings only (ZeRO stage,
offload, buckets). Everything a recipe decides — batch sizes, precision, clipping, the optimizer and its
schedule — comes from the typed config and is merged in here, so the two can never disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import ConfigError
from lmforge.log import print0
from pretrain.config import OptimConfig, PretrainConfig, ZeroConfig

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class EngineSpec:
    """What the engine reads of a stage's resolved config: its ZeRO and optimizer sections, the
    precision, the schedule's length and activation checkpointing (both stages have these)."""

    zero: ZeroConfig
    optim: OptimConfig
    precision: str
    max_steps: int
    activation_checkpointing: bool = False

    @classmethod
    def of(cls, cfg) -> EngineSpec:
        """From a pretraining or fine-tuning config (resolved: a concrete precision, ZeRO stage and step count)."""
        return cls(cfg.zero, cfg.optim, cfg.precision, cfg.train.max_steps, cfg.train.activation_checkpointing)


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_per_rank: int  # sequences per forward/backward on one data-parallel rank
    grad_accum_steps: int
    dp_world: int
    global_batch: int  # sequences per optimizer step, all ranks together (= micro × accum × ranks, exactly)
    seq_len: int
    note: str = ""  # one line for start-up and --dry-run when the plan differs from what the config asked

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def resolve_precision(precision: str, cuda: bool | None = None, cpu_flags: set[str] | None = None) -> str:
    """``auto`` → bf16 where the hardware runs it fast (a GPU, or a CPU with AVX512-BF16 or AMX), else fp32
    (other CPUs emulate bf16 matmuls, ~10x slower than fp32). Explicit precisions are returned as given."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() if cuda is None else cuda:
        return "bf16"
    if cpu_flags is None:
        try:
            cpu_flags = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            cpu_flags = set()
    return "bf16" if cpu_flags & {"avx512_bf16", "amx_bf16"} else "fp32"


def batch_plan(cfg: PretrainConfig, dp_world: int) -> BatchPlan:
    """The engine's batch arithmetic (``plan_batches``) for a pretraining config."""
    return plan_batches(cfg.train.micro_batch_size, cfg.train.global_batch_size, dp_world, cfg.data.seq_len)


def plan_batches(micro: int, global_batch: int | None, dp_world: int, seq_len: int) -> BatchPlan:
    """Split a global batch over ranks: global = micro × accumulation × ranks, exactly.

    ``micro`` is the *largest* micro-batch a rank may run (a memory bound): the plan takes the
    largest micro ≤ it that divides the rank's share, and accumulates the rest. ``global_batch``
    None means micro × ranks (no accumulation). A global batch the ranks cannot share evenly is
    rounded up to the next multiple of the ranks, and ``note`` says so.

    Up, not to the nearest: (1) every rank needs at least one sequence, so when there are more ranks
    than sequences only rounding up exists, and one rule covers every case; (2) at the recipe's lr a
    larger batch has less gradient noise, a smaller one more (McCandlish et al. 2018, "An Empirical
    Model of Large-Batch Training", §2), so up is the side that cannot destabilise a tuned recipe;
    the change is under ``dp_world`` sequences (≤ 3% for the presets at 24 ranks: 256 → 264).
    """
    if micro < 1:
        raise ConfigError(f"train.micro_batch_size: must be positive, got {micro}")
    if not global_batch:  # None (or 0): no accumulation
        return BatchPlan(micro, 1, dp_world, micro * dp_world, seq_len)
    if global_batch < 0:
        raise ConfigError(f"train.global_batch_size: must be positive, got {global_batch} (or unset it for micro x ranks)")
    used = -(-global_batch // dp_world) * dp_world  # smallest multiple of the ranks >= the request
    per_rank = used // dp_world
    m = max(d for d in range(1, min(micro, per_rank) + 1) if per_rank % d == 0)
    note = _plan_note(micro, global_batch, dp_world, used, m)
    return BatchPlan(m, per_rank // m, dp_world, used, seq_len, note)


def _plan_note(micro: int, asked: int, dp_world: int, used: int, m: int) -> str:
    """'' when the plan is what the config asked for (or all a rank's share allows), else one line."""
    per_rank = used // dp_world
    split = f"micro {m} x accum {per_rank // m} x {dp_world} ranks"
    # the smallest global batch >= the request that runs the full micro-batch on every rank
    full = -(-asked // (micro * dp_world)) * micro * dp_world
    hint = f"; train.global_batch_size={full} would run micro {micro}" if m < min(micro, per_rank) else ""
    if used != asked:
        return (f"global batch {used} instead of train.global_batch_size {asked}: {asked} sequences do not split over "
                f"{dp_world} ranks, rounded up to a multiple of the ranks ({split}){hint}")
    if hint:
        return (f"micro batch {m} instead of train.micro_batch_size {micro}: {per_rank} sequences per rank do not split "
                f"into micro-batches of {micro} ({split}){hint}")
    return ""


# DeepSpeed sums gradients over micro-steps in the model's dtype unless ``data_types.grad_accum_dtype``
# says otherwise (0.19.8 runtime/engine.py:1806 get_data_types: the default is the model dtype), i.e. in
# bf16 for bf16 runs. bf16 keeps 8 significant bits, so each addend is rounded to 2^-8 of the running sum
# and a long sum loses the small ones (the 7b preset sums 4 micro-steps at 32 ranks, 16 at 8).
# With "fp32", per ZeRO stage (0.19.8; tests/test_scale_config.py builds each engine and checks):
# - 1: engine.py:2305 _do_optimizer_sanity_check picks BF16_Optimizer (bf16_optimizer.py:191: a
#   full-size fp32 gradient buffer per rank, optimizer states still partitioned); with optimizer
#   offload it is the ZeRO optimizer, which accumulates into param.grad_accum in fp32
#   (zero/stage_1_and_2.py:401, :1237).
# - 2: the ZeRO optimizer adds each reduced bf16 gradient into an fp32 partition buffer
#   (stage_1_and_2.py:1259 _use_compact_grad_partition_buffer, :1325 _add_to_grad_partition_buffer).
# - 3: the gradient partitions live in one flat buffer of that dtype (zero/stage3.py:791) and each
#   micro-step's partition is added to it in fp32 (stage3.py:2030).
# - 0 (plain data parallel) cannot take it: engine.py:2323 raises NotImplementedError "unsupported mix
#   of model_dtype=bfloat16 and grad_accum_dtype=float32" (BF16_Optimizer is used there only with
#   pipeline parallelism), so ZeRO-0 bf16 keeps summing in bf16 and says so at start-up.
BF16_GRAD_ACCUM_DTYPE = "fp32"  # fp16 and fp32 runs keep DeepSpeed's default


def ds_config_path(zero: ZeroConfig) -> Path:
    """The engine JSON: ``zero.ds_config`` when set, else ``ds_configs/gpu/`` on CUDA and ``ds_configs/`` on
    the CPU (``ds_configs/README.md`` gives every value's reason: overlapped communication and 2e8-element
    buckets on GPUs, no overlap and 5e7 buckets on a 2-core CPU)."""
    if zero.ds_config:
        return Path(zero.ds_config)
    name = f"zero{zero.stage}_offload.json" if zero.offload_param else f"zero{zero.stage}.json"
    return REPO / "ds_configs" / ("" if _cpu_accelerator() else "gpu") / name


def engine_settings_name(zero: ZeroConfig) -> str:
    """The engine JSON as the start-up line names it: relative to the checkout when it is one of ours."""
    path = ds_config_path(zero)
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def ds_config(spec: EngineSpec, plan: BatchPlan, load_universal: bool = False) -> dict[str, Any]:
    """DeepSpeed's config: the engine JSON of ``spec.zero`` with the batch plan, precision and optimizer merged in."""
    path = ds_config_path(spec.zero)
    if not path.is_file():
        raise ConfigError(f"zero.ds_config: {path} not found")
    try:
        conf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"zero.ds_config: {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    owned = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
             "scheduler", "fp16", "bf16", "gradient_clipping"}
    clash = sorted(owned & set(conf))
    if clash:
        raise ConfigError(f"{path} sets {', '.join(clash)}: batch sizes, precision, clipping and the optimizer come from the lmforge config")
    zero = conf.setdefault("zero_optimization", {})
    zero["stage"] = spec.zero.stage
    if spec.zero.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if spec.zero.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    o = spec.optim
    conf.update(
        train_batch_size=plan.global_batch,
        train_micro_batch_size_per_gpu=plan.micro_batch_per_rank,
        gradient_accumulation_steps=plan.grad_accum_steps,
        gradient_clipping=o.grad_clip,
        optimizer={
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": _torch_adam(spec.zero),
                **_fused_adam(spec.zero),
                "adam_w_mode": True,
            },
        },
    )
    if load_universal:  # resuming a checkpoint written by another number of ranks
        conf["checkpoint"] = {"load_universal": True}
    if spec.precision == "bf16":
        conf["bf16"] = {"enabled": True}
        if spec.zero.stage > 0:  # see BF16_GRAD_ACCUM_DTYPE; an engine JSON may still choose bf16 sums (less memory)
            conf.setdefault("data_types", {}).setdefault("grad_accum_dtype", BF16_GRAD_ACCUM_DTYPE)
    elif spec.precision == "fp16":
        conf["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                        "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    return conf


def accumulation_note(spec: EngineSpec, plan: BatchPlan) -> str:
    """A one-line warning where gradients are summed over micro-steps in bf16 (ZeRO-0 cannot do fp32)."""
    if spec.precision == "bf16" and spec.zero.stage == 0 and plan.grad_accum_steps > 1:
        return (f"warning: ZeRO-0 sums the {plan.grad_accum_steps} micro-steps' gradients in bf16 (DeepSpeed accumulates "
                "in fp32 only with ZeRO >= 1): use --zero.stage=1 for fp32 accumulation")
    return ""


def builds_partitioned(zero: ZeroConfig) -> bool:
    """Whether the model is built inside deepspeed.zero.Init (ZeRO-3 only; see ZeroConfig.partitioned_init)."""
    if zero.stage != 3:
        return False
    if zero.partitioned_init is not None:
        return zero.partitioned_init
    return not _cpu_accelerator()


def _cpu_accelerator() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def _torch_adam(zero: ZeroConfig) -> bool:
    """torch's AdamW needs no JIT-compiled op. Offloading from a GPU uses DeepSpeedCPUAdam (a C++ op
    built on first use, much faster than torch's AdamW on host memory); on DeepSpeed's CPU accelerator
    everything is in host memory already and torch's AdamW is used, so nothing is compiled."""
    return not zero.offload_optimizer or _cpu_accelerator()


def _fused_adam(zero: ZeroConfig) -> dict[str, bool]:
    """torch's fused AdamW on CUDA (one kernel per step for all parameters, instead of one per tensor per
    operation; nothing to compile: DeepSpeed passes the flag on to torch.optim.AdamW). Not on the CPU
    accelerator (the foreach path measured best there) nor with offload (DeepSpeedCPUAdam then)."""
    return {} if zero.offload_optimizer or _cpu_accelerator() else {"fused": True}


def offload_summary(engine) -> str:
    """What the engine really offloads, read from its ZeRO optimizer (not from the config)."""
    opt = getattr(engine, "optimizer", None)
    parts = []
    if getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False):
        parts.append(f"optimizer states → cpu ({type(engine.basic_optimizer).__name__})")
    if getattr(opt, "offload_param", False):
        parts.append("parameters → cpu")
    return ", ".join(parts)


def lr_schedule(optimizer: torch.optim.Optimizer, o: OptimConfig, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine/linear decay to ``o.min_lr`` over ``steps`` (transformers' schedules, not hand-rolled)."""
    from transformers.optimization import get_constant_schedule_with_warmup, get_wsd_schedule

    warmup = min(o.warmup_steps, steps)
    if o.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    return get_wsd_schedule(
        optimizer,
        num_warmup_steps=warmup,
        num_decay_steps=max(steps - warmup, 1),
        num_stable_steps=0,
        decay_type=o.schedule,
        min_lr_ratio=o.min_lr / o.lr if o.lr > 0 else 0.0,
    )


def group_hparams(optim: OptimConfig) -> tuple[dict[str, float], dict[str, float]]:
    """Per-group settings of the two optimizer groups: (≥2-D weights, 1-D norms/biases)."""
    return {"weight_decay": optim.weight_decay}, {"weight_decay": 0.0}


def reapply_group_hparams(engine) -> None:
    """DeepSpeed's ZeRO-3 universal load copies param group 0's settings into every group (so norms
    would get weight decay after a world-size change, and every group group 0's learning rate until the
    schedule's next step); put each group's own settings back (recorded by :func:`build_engine`) and its
    learning rate from the restored schedule (whose per-group peaks and last rates were saved with it)."""
    groups = engine.optimizer.param_groups
    hparams = engine.lmforge_group_hparams
    for group, hp in zip(groups, hparams):
        group.update(hp)
    sched = getattr(engine, "lr_scheduler", None)
    if sched is not None and len(getattr(sched, "base_lrs", ())) == len(groups):
        for group, peak, last in zip(groups, sched.base_lrs, sched.get_last_lr()):
            group["initial_lr"], group["lr"] = peak, last


def param_ndim(p: torch.Tensor) -> int:
    """The parameter's real rank, also when ZeRO-3 already partitioned it into a flat shard."""
    return len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim


def param_numel(p: torch.Tensor) -> int:
    """The parameter's real size, also when ZeRO-3 already partitioned it."""
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def default_param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """No weight decay on norms and biases (1-D tensors), as in GPT-3 / Llama; frozen tensors left out."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay, no_decay = group_hparams(optim)
    return [
        {"params": [p for p in trainable if param_ndim(p) >= 2], **decay},
        {"params": [p for p in trainable if param_ndim(p) < 2], **no_decay},
    ]


def build_engine(model: torch.nn.Module, spec: EngineSpec, plan: BatchPlan, load_universal: bool = False,
                 param_groups: list[dict[str, Any]] | None = None):
    """deepspeed.initialize with the merged config; returns the engine (optimizer and schedule inside).

    ``param_groups`` (torch optimizer groups, e.g. per-layer learning rates of a fine-tune) replace
    the default two groups; a group's ``lr`` is its peak, which the schedule scales.
    """
    import deepspeed

    if spec.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from deepspeed.accelerator import get_accelerator

    if spec.precision == "fp16" and not get_accelerator().is_fp16_supported():
        raise ConfigError(
            f"precision=fp16 is not supported on this {get_accelerator().device_name()} device (DeepSpeed's CPU "
            "accelerator needs hardware fp16, e.g. AVX512-FP16); use --precision=bf16 or fp32"
        )
    conf = ds_config(spec, plan, load_universal)
    for line in (plan.note, accumulation_note(spec, plan)):
        if line:
            print0(line)
    params = [g for g in (param_groups or default_param_groups(model, spec.optim)) if g["params"]]
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen")
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        config=conf,
        lr_scheduler=lambda opt: lr_schedule(opt, spec.optim, spec.max_steps),
    )
    # what restore() puts back after a universal load (the lr is the schedule's, restored with it)
    engine.lmforge_group_hparams = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in params]
    return engine
