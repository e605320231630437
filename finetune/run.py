"""Wiring: init_from → backbone + tokenizer, task data → features, the shared DeepSpeed engine and
trainer → fit → best checkpoint → test metrics → ``metrics.json`` and an HF export.

Run directory (same layout as pretraining, plus)::

    backbone/        the pretrained model as an HF dir (made once from a DeepSpeed checkpoint)
    checkpoints/     step_N/ (DeepSpeed shards + trainer_state.json), latest, best
    tensorboard/     train/*, eval/*, test/*
    metrics.json     final metrics (test/*, eval/* of the best checkpoint), written last
    samples.jsonl    sft: generations of the best model
    export/          the fine-tuned model for transformers' AutoModelFor<Task>
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline.tokenizer import Tokenizer
from finetune.config import FinetuneConfig, auto_lr
from finetune.data import split_validation
from finetune.model import (
    Backbone,
    build_module,
    export_task_model,
    finetune_flops_per_token,
    param_groups,
    resolve_backbone,
)
from finetune.objective import BestCheckpoint, TaskLoader, TaskObjective
from finetune.tasks import Task, Vocab, make_task
from lmforge.config import dump_yaml, freeze, resolved
from lmforge.errors import DataError
from lmforge.io import atomic_write_text
from lmforge.lock import lock_run_dir
from lmforge.log import print0
from lmforge.rundir import best_checkpoint, checkpoint_dir, latest_checkpoint, step_of
from lmforge.versions import check_versions
from pretrain.checkpoint import (
    ResumeTarget,
    checkpoint_target,
    ensure_universal,
    load_engine_state,
    resolve_resume,
    save,
)
from pretrain.dist import DistInfo, init_distributed, launch_env, shutdown
from pretrain.engine import param_numel, plan_batches, resolve_precision
from pretrain.goodput import timed
from pretrain.objective import special_ids
from pretrain.runtime import build_trainer
from pretrain.trainer import Trainer

METRICS = "metrics.json"


@dataclass
class Setup:
    """What :func:`prepare` resolves before the process group exists."""

    cfg: FinetuneConfig  # resolved and frozen
    backbone: Backbone
    target: ResumeTarget | None
    tok: Tokenizer
    task: Task
    splits: dict[str, tuple[list, list[dict[str, Any]]]]  # name → (examples, encoded features)


def load_splits(cfg: FinetuneConfig, task) -> dict[str, list]:
    d = cfg.data
    train = task.read(d.train)
    if d.validation:
        val = task.read(d.validation)
    else:
        train, val = split_validation(train, d.validation_fraction, d.seed)
        print0(f"validation: {len(val)} examples split from {d.train} (seed {d.seed}, fraction {d.validation_fraction})")
    if d.max_validation_examples is not None and len(val) > d.max_validation_examples:
        import random

        keep = sorted(random.Random(d.seed).sample(range(len(val)), d.max_validation_examples))
        val = [val[i] for i in keep]
    splits = {"train": train, "validation": val}
    if d.test:
        splits["test"] = task.read(d.test)
    return splits


def build(setup: Setup, info: DistInfo) -> Trainer:
    """The trainer of a prepared run: the task objective on the shared runtime."""
    cfg, task, splits, tok, backbone, target = setup.cfg, setup.task, setup.splits, setup.tok, setup.backbone, setup.target
    run_dir = Path(cfg.run_dir)
    plan = plan_batches(cfg.train.micro_batch_size, cfg.train.global_batch_size, info.world_size, cfg.task.max_seq_len)
    n_train = len(splits["train"][1])
    if info.is_main:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        tok.save(run_dir / "tokenizer")
    loader = TaskLoader(splits["train"][1], plan.micro_batch_per_rank, plan.grad_accum_steps, info.rank,
                        info.world_size, cfg.data.seed, task.collate)
    ids = special_ids(tok, backbone.model.kind, need_mask=False)
    objective = TaskObjective(cfg, task, splits, loader, ids, tok.fingerprint)
    mean_len = sum(len(f["input_ids"]) for f in splits["train"][1]) / n_train  # MFU counts real tokens only

    def describe(module, how: str, offload: str) -> str:
        n_total = sum(param_numel(p) for p in module.parameters())
        n_trainable = sum(param_numel(p) for p in module.parameters() if p.requires_grad)
        objective.n_params = (n_total, n_trainable)
        return (f"fine-tune {run_dir}: {task.name} on a {backbone.model.kind} backbone ({n_total:,} params, "
                f"{n_trainable:,} trainable), {n_train} train / {len(splits['validation'][1])} validation features"
                + (f" / {len(splits['test'][1])} test" if "test" in splits else "")
                + f", {cfg.train.max_steps} steps of {plan.global_batch} ({cfg.train.max_steps * plan.global_batch / n_train:.2f} "
                f"epochs), {info.world_size} rank(s), {how}" + (f", offload: {offload}" if offload else "")
                + (f", labels {task.labels}" if task.labels else ""))

    return build_trainer(
        cfg, info, plan, objective, lambda conf: build_module(cfg, task, backbone, conf, device=info.device),
        finetune_flops_per_token(cfg, task, tok.vocab_size, mean_len), target, describe,
        param_groups=lambda module: param_groups(module, cfg),
        stage_callbacks=lambda checkpointer: [BestCheckpoint(cfg.train.select_metric, checkpointer)],
    )


def finish(trainer: Trainer) -> tuple[dict[str, Any], Path]:
    """Best checkpoint → validation and test metrics (all ranks); returns them and the chosen checkpoint.
    The export and metrics.json follow in :func:`publish`, once the process group is gone."""
    cfg = trainer.cfg
    run_dir = Path(cfg.run_dir)
    best = best_checkpoint(run_dir)
    final = latest_checkpoint(run_dir)
    if final is None or step_of(final) != trainer.state.step:
        final = save(trainer, "final")
    chosen = checkpoint_dir(run_dir, best["tag"]) if best else final
    if chosen != final:
        print0(f"loading the best checkpoint {chosen.name} ({best['metric']} = {best['value']:.4f})")
        # the one restore path (pretrain.checkpoint): weights only matter now, but a weights-only load of
        # a ZeRO-3 checkpoint loads nothing, and another world size needs the universal conversion
        load_engine_state(trainer.engine, checkpoint_target(chosen, trainer.dist.world_size), trainer.dist.rank)
    obj: TaskObjective = trainer.objective
    results: dict[str, Any] = {}
    for split in ("validation", "test"):
        if split in obj.splits and obj.splits[split][1]:
            m, _ = obj.run_split(split)
            prefix = "eval" if split == "validation" else "test"
            results.update({f"{prefix}/{k}": v for k, v in m.items()})
            if obj.task.name == "sft":
                gen = obj.generate_samples(split, None if split == "test" else cfg.task.num_samples)
                results.update({f"{prefix}/{k}": v for k, v in gen.items()})
    if "eval/loss" in results:
        results["eval/ppl"] = math.exp(min(results["eval/loss"], 50.0))
    return results, chosen


def publish(trainer: Trainer, backbone: Backbone, results: dict[str, Any], chosen: Path) -> None:
    """Rank 0, after the process group is destroyed: TensorBoard, samples, the HF export, then
    ``metrics.json`` (last: it marks the run finished). A 7B export takes longer than any collective
    timeout, so no rank may be waiting in one meanwhile."""
    cfg = trainer.cfg
    run_dir = Path(cfg.run_dir)
    export_dir = run_dir / "export"
    best = best_checkpoint(run_dir)
    obj: TaskObjective = trainer.objective
    _write_tensorboard(run_dir, cfg, trainer.state.step, results)
    if obj.last_generations:
        atomic_write_text(run_dir / "samples.jsonl", "".join(json.dumps(g) + "\n" for g in obj.last_generations))
    from pretrain.export import fp32_state_dict

    export_task_model(fp32_state_dict(chosen), obj.task, backbone, export_dir, obj.task.tok)
    record = {
        **results,
        "task": obj.task.name,
        "labels": obj.task.labels,
        "checkpoint": chosen.name,
        "best": best,
        "steps": trainer.state.step,
        "epochs": trainer.loader.epoch,
        "n_params": obj.n_params[0],
        "n_trainable_params": obj.n_params[1],
        "examples": {k: len(v[0]) for k, v in obj.splits.items()},
        "features": {k: len(v[1]) for k, v in obj.splits.items()},
        "init_from": {"path": cfg.init_from, **backbone.source},
        "random_init": cfg.transfer.random_init,
        "lr": cfg.optim.lr,
        "pooling": cfg.task.pooling,
        "world_size": trainer.dist.world_size,
        "export": str(export_dir),
        "finished_at": time.time(),
    }
    atomic_write_text(run_dir / METRICS, json.dumps(record, indent=1) + "\n")  # last: marks the run finished
    shown = " | ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float))
    print0(f"done: {shown} → {run_dir / METRICS}, model → {export_dir}")


def _write_tensorboard(run_dir: Path, cfg: FinetuneConfig, step: int, results: dict[str, Any]) -> None:
    if not cfg.metrics.tensorboard:
        return
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(run_dir / "tensorboard"))
    for k, v in results.items():
        if k.startswith("test/"):
            w.add_scalar(k, v, step)
        elif k.startswith("eval/"):
            w.add_scalar(k.replace("eval/", "best/"), v, step)
    w.close()


def prepare(cfg: FinetuneConfig, rank: int, world_size: int) -> Setup:
    """Before the process group exists: the run-directory lock, the backbone's HF export (rank 0, the others
    wait on its completion marker), the resume target (converted likewise), the task data, and the config
    resolved once and frozen (precision, backbone shape, ZeRO stage, global batch, steps, select metric)."""
    if rank == 0:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        print0(f"run directory lock: {lock_run_dir(cfg.run_dir)}")
    backbone = resolve_backbone(cfg, rank)
    from finetune.estimate import resolve_zero_stage

    changes: dict[str, Any] = {"precision": resolve_precision(cfg.precision), "model": backbone.model}
    if cfg.optim.lr is None:
        changes["optim.lr"], why = auto_lr(backbone.model.hidden_size, cfg.transfer.freeze_backbone)
        print0(f"fine-tuning lr {changes['optim.lr']:.2e} ({why})")
    else:
        print0(f"fine-tuning lr {cfg.optim.lr:.2e} (optim.lr)")
    # "auto" → 0 or 3 by size, before anything reads it
    changes["zero.stage"] = resolve_zero_stage(resolved(cfg, changes), backbone, world_size)
    target = resolve_resume(resolved(cfg, changes), world_size)  # a resume keeps the checkpoint's global batch
    if target is not None:
        changes["train.global_batch_size"] = target.global_batch
        if target.universal:
            with timed("conversion"):  # a part of the goodput record
                ensure_universal(target, rank)

    tok = Tokenizer.load(backbone.hf_dir)
    if backbone.model.kind == "masked" and cfg.transfer.aux_lm_weight and tok.token_to_id("<mask>") is None:
        raise DataError(f"{backbone.hf_dir}: the tokenizer has no '<mask>' token, needed by aux_lm_weight on a masked model")
    task = make_task(cfg, tok, Vocab(tok.bos_id, tok.eos_id, tok.pad_id), backbone.model.kind)
    raw = load_splits(cfg, task)
    task.fit_labels(raw["train"])
    splits = {name: (exs, task.encode(exs, name)) for name, exs in raw.items()}
    if not splits["train"][1]:
        raise DataError(f"{cfg.data.train}: no usable training examples")
    if cfg.train.max_steps is None:
        plan = plan_batches(cfg.train.micro_batch_size, changes.get("train.global_batch_size", cfg.train.global_batch_size),
                            world_size, cfg.task.max_seq_len)
        changes["train.max_steps"] = max(1, math.ceil(cfg.train.epochs * len(splits["train"][1]) / plan.global_batch))
    if cfg.train.select_metric is None:
        changes["train.select_metric"] = task.default_metric
    return Setup(freeze(resolved(cfg, changes)), backbone, target, tok, task, splits)


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    check_versions()
    rank, _, world_size = launch_env()
    if (Path(cfg.run_dir) / METRICS).is_file() and cfg.resume.mode == "auto":
        done = json.loads((Path(cfg.run_dir) / METRICS).read_text())
        print0(f"{cfg.run_dir} is finished ({METRICS} exists, {done.get('steps')} steps); use another --run_dir "
               "or delete it to train again")
        return done
    setup = prepare(cfg, rank, world_size)
    cfg = setup.cfg
    info = init_distributed(cfg.dist.timeout_s)
    ok, finished = False, None
    try:
        trainer = build(setup, info)
        trainer.fit()
        obj: TaskObjective = trainer.objective
        if obj.early_stopped:
            print0(f"early stop at step {trainer.state.step}: {obj.evals_without_improvement} validations "
                   f"without improvement of {cfg.train.select_metric}")
        elif trainer.stop_requested and trainer.state.step < cfg.train.max_steps:
            print0(f"stopped at step {trainer.state.step} ({'signal' if trainer.preempted else 'train.exit_interval'}); "
                   "run the same command again to continue")
            ok = True
            return {}
        finished = finish(trainer)
        ok = True
    finally:
        shutdown(ok)
    if rank == 0:
        publish(trainer, setup.backbone, *finished)
    return finished[0]
