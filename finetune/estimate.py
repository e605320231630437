"""Memory per rank of a fine-tune, and the ZeRO stage that ``zero.stage: auto`` (the default) picks.

Model states as in ``pretrain/estimate.py`` (the ZeRO paper: 16-bit params 2Ψ + grads 2Ψ + fp32
master and Adam 12Ψ per rank before partitioning), counted on the *task* model — the backbone with
its head (sft: the causal LM itself; ``aux_lm_weight``: plus the LM head) — and split by what trains:
a frozen parameter keeps its weights only, no gradient and no optimizer state. Activations, buffers
and fragmentation are not counted.

The rule for ``auto``, decided once the backbone's size is known and before anything records the config:

- **ZeRO-0** while its model states fit in ``FIT_FRACTION`` (half) of one device's memory: no
  communication beyond the gradient all-reduce, and the fastest step at sizes where it fits.
- **ZeRO-3** otherwise. On GPUs it builds the task model already partitioned
  (``pretrain.engine.builds_partitioned``): rank 0 reads the backbone one tensor at a time and scatters
  it, so no rank holds the whole model, on the device or on the host. ZeRO-1/2 are skipped on purpose:
  they still build and read the whole fp32 model on every rank's host (8 ranks x 27 GB at 7B) and keep
  all 16-bit parameters on every device; pick them explicitly with ``--zero.stage=2``.
- Half, because the other half is for activations, the logits of a large vocabulary and allocator
  slack, which grow with batch and sequence length. On an 80 GB GPU full fine-tuning (16 bytes per
  parameter) switches to ZeRO-3 above 40 GiB / 16 B ≈ 2.7B parameters (1.3B stays ZeRO-0, 7B gets
  ZeRO-3); on a 24 GB GPU above 0.8B. A frozen backbone costs 2 bytes per frozen parameter (bf16), so a
  head-only fine-tune of 7B still fits ZeRO-0 on one 80 GB GPU.
- Offloading (``zero.offload_optimizer`` / ``offload_param``) needs a ZeRO stage: auto gives ZeRO-3.
- A resumed run keeps the stage of the checkpoint it continues (a ZeRO-0 ↔ ZeRO-n restore is refused).

"Device memory" is this rank's GPU; on DeepSpeed's CPU accelerator it is the host's RAM divided by
the node's ranks. ``python -m finetune ... --dry-run`` plans for ``--gpu_memory_gb`` (default: the
local GPU's, or 80 GB on a machine without one) and needs only the pretrain run's ``config.yaml``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.config import FinetuneConfig
from lmforge.config import load_config
from lmforge.errors import ConfigError
from lmforge.log import print0
from pretrain.estimate import GiB, zero_memory_per_rank

FIT_FRACTION = 0.5  # of one device's memory for model states; the rest for activations (see above)
ASSUMED_DEVICE_GIB = 80.0  # a dry run on a machine without a GPU plans for an 80 GB one (A100/H100)
ASSUMED_LABELS = ("0", "1")  # a dry run's classification head when task.labels is unset (d x 2 parameters)


@dataclass(frozen=True)
class TaskSize:
    n_params: int  # unique parameters of the fine-tuned module (tied ones once)
    n_trainable: int  # those with requires_grad after the transfer.freeze_* options


def count_task_model(cfg: FinetuneConfig, conf, task, kind: str) -> TaskSize:
    """Parameters of the module ``finetune.model.build_module`` would build, made on the meta device
    from the backbone's transformers config ``conf`` (no memory, no weights read)."""
    from finetune.model import FinetuneModule, _new_lm_head, apply_freezing, task_model_class, tie_lm_head

    conf = copy.deepcopy(conf)
    if task.labels:
        conf.num_labels = task.num_labels
    with torch.device("meta"):
        tm = task_model_class(task, kind)(conf)
        head = _new_lm_head(kind, conf) if cfg.transfer.aux_lm_weight else None
    if head is not None and (kind == "masked" or getattr(conf, "tie_word_embeddings", False)):
        tie_lm_head(head, tm, kind)  # as the real build ties it, so a shared matrix counts once
    module = FinetuneModule(task, tm, kind, cfg.transfer.aux_lm_weight, head)
    apply_freezing(module, cfg)
    params = list(module.parameters())
    return TaskSize(sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))


def model_states(size: TaskSize, world_size: int, stage: int, precision: str, offload: bool = False) -> dict[str, int]:
    """Bytes per rank ``{params, grads, optimizer, offloaded, total}``: every parameter's weights, the
    trainable ones' gradients and optimizer states (pretrain.estimate.zero_memory_per_rank for each part)."""
    weights = zero_memory_per_rank(size.n_params, world_size, stage, precision)
    trained = zero_memory_per_rank(size.n_trainable, world_size, stage, precision, offload and stage > 0)
    out = {"params": weights["params"], "grads": trained["grads"], "optimizer": trained["optimizer"],
           "offloaded": trained["offloaded"]}
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def choose_stage(cfg: FinetuneConfig, size: TaskSize, world_size: int, device_bytes: int,
                 precision: str) -> tuple[int, str]:
    """(ZeRO stage, why): the rule of this module's docstring; an integer ``zero.stage`` stands."""
    if cfg.zero.stage != "auto":
        return cfg.zero.stage, "zero.stage is set in the config"
    if cfg.zero.offload_optimizer or cfg.zero.offload_param:
        return 3, "zero.offload_* is set and ZeRO-0 cannot offload"
    budget = FIT_FRACTION * device_bytes
    z0 = model_states(size, world_size, 0, precision)["total"]
    if z0 <= budget:
        return 0, f"its model states ({_gib(z0)} per rank) fit in half of the {_gib(device_bytes)} device memory"
    z3 = model_states(size, world_size, 3, precision)["total"]
    return 3, (f"ZeRO-0's model states ({_gib(z0)} per rank) exceed half of the {_gib(device_bytes)} device "
               f"memory; ZeRO-3 holds {_gib(z3)} per rank at {world_size} rank(s), built partitioned on GPUs")


def device_memory() -> int:
    """Bytes of memory one rank's model states live in: its GPU, or its share of the host's RAM on
    DeepSpeed's CPU accelerator (where the node's ranks share it). Called before the process group
    exists, so the accelerator is chosen as ``init_distributed`` will (DeepSpeed's is not touched yet)."""
    from pretrain.dist import choose_accelerator

    if choose_accelerator() == "cuda":
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def checkpoint_stage(cfg: FinetuneConfig) -> tuple[int, Path] | None:
    """The ZeRO stage of the checkpoint this run will resume from (``resume.mode``), if any."""
    from lmforge.rundir import read_state
    from pretrain.checkpoint import resume_step_dir

    step = resume_step_dir(cfg.resume.mode, Path(cfg.run_dir))
    return (int(read_state(step)["zero_stage"]), step) if step is not None else None


def sizing_task(cfg: FinetuneConfig, kind: str):
    """The task object the counts are made with, before any data is read: the label set is
    ``task.labels`` or ASSUMED_LABELS (the head is hidden x labels, a rounding error next to the backbone),
    so the dry run and the run decide the stage from the same numbers."""
    from finetune.tasks import make_task

    task = make_task(cfg, None, None, kind)
    if cfg.task.type in ("sequence_classification", "token_classification"):
        task.labels = list(cfg.task.labels or ASSUMED_LABELS)
    return task


def resolve_zero_stage(cfg: FinetuneConfig, backbone, world_size: int, device_bytes: int | None = None) -> int:
    """``zero.stage`` as an integer, decided before the resume checks and the engine read it; says the
    choice and why on rank 0. ``backbone`` is ``finetune.model.resolve_backbone``'s (its HF config is read)."""
    if cfg.zero.stage != "auto":
        return cfg.zero.stage
    kept = checkpoint_stage(cfg)
    if kept is not None:
        print0(f"zero.stage auto → ZeRO-{kept[0]}: the stage of {kept[1]}, which this run resumes")
        return kept[0]
    from transformers import AutoConfig

    kind = backbone.model.kind
    size = count_task_model(cfg, AutoConfig.from_pretrained(backbone.hf_dir), sizing_task(cfg, kind), kind)
    device_bytes = device_memory() if device_bytes is None else device_bytes
    stage, why = choose_stage(cfg, size, world_size, device_bytes, cfg.precision)
    print0(f"zero.stage auto → ZeRO-{stage}: {why}")
    need = model_states(size, world_size, stage, cfg.precision, cfg.zero.offload_optimizer)["total"]
    if need > FIT_FRACTION * device_bytes:
        print0(f"warning: ZeRO-{stage} model states need {_gib(need)} per rank, over half of the device's "
               f"{_gib(device_bytes)}: add ranks, freeze layers or set --zero.offload_optimizer=true")
    return stage


# ---------------------------------------------------------------- --dry-run
def backbone_config(init_from: str) -> tuple[Any, str, dict[str, str]]:
    """(transformers config, kind, where) of the backbone ``init_from`` names, from its config files
    only: a pretrain run's ``config.yaml`` (+ its tokenizer when the vocab size is unset) or an HF
    dir's ``config.json``. Nothing is exported or read from the weights."""
    from finetune.model import find_checkpoint, model_config_from_hf
    from pretrain.config import PretrainConfig
    from pretrain.model import hf_config

    step_dir = find_checkpoint(init_from)
    if step_dir is None:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(init_from), model_config_from_hf(Path(init_from)).kind, {"hf_dir": init_from}
    pre_run = step_dir.parent.parent
    if not (pre_run / "config.yaml").is_file():
        raise ConfigError(f"init_from: {pre_run}/config.yaml is missing; point init_from at a whole pretrain run dir")
    model = load_config(PretrainConfig, pre_run / "config.yaml").model
    vocab = model.vocab_size
    if vocab is None:
        from data_pipeline.tokenizer import Tokenizer

        vocab = Tokenizer.load(pre_run / "tokenizer").vocab_size
    return hf_config(model, vocab), model.kind, {"run_dir": str(pre_run), "checkpoint": step_dir.name}


def describe(cfg: FinetuneConfig, world_size: int, device_bytes: int) -> dict[str, Any]:
    """What ``--dry-run`` prints: the task model's size, per-rank model states by ZeRO stage, the stage
    ``auto`` picks and whether it fits. Resolves ``cfg.zero.stage`` (the dry run prints the resolved config)."""
    from pretrain.engine import plan_batches

    conf, kind, source = backbone_config(cfg.init_from)
    task = sizing_task(cfg, kind)
    size = count_task_model(cfg, conf, task, kind)
    precision = "bf16" if cfg.precision == "auto" else cfg.precision  # planned for a GPU, like pretraining's
    stage, why = choose_stage(cfg, size, world_size, device_bytes, precision)
    cfg.zero.stage = stage
    plan = plan_batches(cfg.train.micro_batch_size, cfg.train.global_batch_size, world_size, cfg.task.max_seq_len)
    offload = cfg.zero.offload_optimizer
    memory = {f"zero{s}": round(model_states(size, world_size, s, precision, offload)["total"] / GiB, 3)
              for s in range(4)}
    chosen = model_states(size, world_size, stage, precision, offload)
    budget = FIT_FRACTION * device_bytes
    return {
        "init_from": source,
        "kind": kind,
        "task": task.name,
        "num_labels": task.num_labels or None,
        "labels_from": "task.labels" if cfg.task.labels else ("assumed: the training data decides" if task.labels else None),
        "n_params": size.n_params,
        "n_trainable_params": size.n_trainable,
        "world_size": world_size,
        "micro_batch_size": plan.micro_batch_per_rank,
        "global_batch_size": plan.global_batch,
        "grad_accum_steps": plan.grad_accum_steps,
        "precision": cfg.precision if precision == cfg.precision else f"{cfg.precision} (bf16 on GPUs)",
        "zero_stage": stage,
        "zero_stage_reason": why,
        # builds_partitioned's rule on GPUs (on DeepSpeed's CPU accelerator only with partitioned_init=true)
        "partitioned_build": stage == 3 and cfg.zero.partitioned_init is not False,
        "offload_optimizer": offload,
        "memory_per_rank_gb": memory,  # model states only, GiB (2**30 bytes), all four stages
        "chosen_stage_gb": {k: round(v / GiB, 3) for k, v in chosen.items()},
        "device_memory_gb": round(device_bytes / GiB, 1),
        "budget_gb": round(budget / GiB, 1),  # FIT_FRACTION of the device: what model states may take
        "fits": chosen["total"] <= budget,
    }
