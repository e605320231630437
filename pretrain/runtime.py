"""The training runtime both stages build: seed → model → DeepSpeed engine → callbacks → trainer →
restore, in that order, in :func:`build_trainer`.

A stage (``pretrain.run``, ``finetune.run``) resolves and freezes its config, computes the batch plan,
makes its :class:`~pretrain.objective.Objective`, and hands them here with a model factory; it never
repeats this sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lmforge.log import print0
from pretrain.callbacks import MetricsLogger, ProgressBar, device_peak_flops, load_callbacks
from pretrain.checkpoint import Checkpointer, ResumeTarget, checkpoint_target, restore, seed_everything
from pretrain.dist import DistInfo
from pretrain.engine import (
    BatchPlan,
    EngineSpec,
    build_engine,
    builds_partitioned,
    ds_config,
    engine_settings_name,
    offload_summary,
)
from pretrain.monitor import GoodputMonitor, StragglerMonitor
from pretrain.trainer import Callback, Objective, Trainer


def build_trainer(
    cfg,
    info: DistInfo,
    plan: BatchPlan,
    objective: Objective,
    make_model: Callable[[dict[str, Any] | None], torch.nn.Module],
    flops_per_token: float,
    target: ResumeTarget | None,
    describe: Callable[[torch.nn.Module, str, str], str],
    param_groups: Callable[[torch.nn.Module], list[dict[str, Any]] | None] | None = None,
    stage_callbacks: Callable[[Checkpointer], list[Callback]] | None = None,
    extra_callbacks: list[Callback] | None = None,
) -> Trainer:
    """The trainer of a resolved, frozen stage config, restored from ``target`` when given.

    ``make_model(ds_config)`` builds the module (inside ZeRO-3's partitioned init when ``ds_config`` is
    not None); ``describe(model, how, offload)`` is the stage's start-up line (``how``: "ZeRO-3 (built
    partitioned), bf16, engine settings ds_configs/gpu/zero3.json"; ``offload``: what the engine offloads, or ""); ``param_groups(model)`` its optimizer groups (None: decay on ≥2-D weights only);
    ``stage_callbacks(checkpointer)`` callbacks that save through the checkpointer (the best checkpoint).
    """
    from pretrain.model import is_partitioned

    seed_everything(cfg.train.seed)  # identical initial weights (and head initialisation) on every rank
    spec = EngineSpec.of(cfg)
    universal = bool(target and target.universal)
    model = make_model(ds_config(spec, plan, load_universal=universal) if builds_partitioned(cfg.zero) else None)
    built = " (built partitioned)" if is_partitioned(model) else ""  # read from the parameters, before the engine
    engine = build_engine(model, spec, plan, load_universal=universal,
                          param_groups=param_groups(model) if param_groups else None)
    peak, source = device_peak_flops(cfg.metrics.peak_flops, cfg.precision)
    log_dir = f"{cfg.run_dir}/tensorboard" if cfg.metrics.tensorboard else None
    checkpointer = Checkpointer(cfg.checkpoint)
    # goodput after the savers (it records their saves) and before the logger (its writer closes at the end);
    # the straggler clock restarts after the built-in end-of-step work (saves, logging: they end in collectives)
    callbacks: list[Callback] = [checkpointer, *(stage_callbacks(checkpointer) if stage_callbacks else []),
                                 GoodputMonitor(),
                                 MetricsLogger(log_dir, flops_per_token, peak, source), ProgressBar(cfg.train.progress),
                                 StragglerMonitor(cfg.metrics.straggler_ratio),
                                 *load_callbacks(cfg.callbacks), *(extra_callbacks or [])]
    how = f"ZeRO-{cfg.zero.stage}{built}, {cfg.precision}, engine settings {engine_settings_name(cfg.zero)}"
    print0(describe(model, how, offload_summary(engine)))
    trainer = Trainer(cfg, engine, objective, info, plan, callbacks)
    trainer.restore_checkpoint = lambda step_dir: restore(trainer, checkpoint_target(step_dir, info.world_size))
    if target is not None:
        restore(trainer, target)
    return trainer
