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
from pathlib import Path
from typing import Any

from data_pipeline.shards import atomic_write_text
from data_pipeline.tokenizer import Tokenizer
from finetune.config import FinetuneConfig
from finetune.data import split_validation
from finetune.model import Backbone, build_module, export_task_model, param_groups, resolve_backbone
from finetune.tasks import Vocab, make_task
from finetune.trainer import BestCheckpoint, FinetuneTrainer, TaskLoader
from lmforge.config import dump_yaml
from lmforge.errors import ConfigError, DataError
from lmforge.lock import lock_run_dir
from lmforge.log import print0
from lmforge.rundir import step_of
from lmforge.versions import check_versions
from pretrain.callbacks import MetricsLogger, ProgressBar, device_peak_flops, load_callbacks
from pretrain.checkpoint import (
    CKPT,
    Checkpointer,
    ResumeTarget,
    best_checkpoint,
    ensure_universal,
    latest_checkpoint,
    read_state,
    resolve_resume,
    restore,
    save,
)
from pretrain.dist import DistInfo, init_distributed, launch_env, shutdown
from pretrain.engine import (
    build_engine,
    builds_partitioned,
    ds_config,
    offload_summary,
    param_numel,
    plan_batches,
    reapply_group_hparams,
    resolve_precision,
)
from pretrain.model import is_partitioned
from pretrain.run import seed_everything

METRICS = "metrics.json"


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


def build(cfg: FinetuneConfig, info: DistInfo, backbone: Backbone, target: ResumeTarget | None) -> FinetuneTrainer:
    """The trainer, from the backbone and resume target :func:`prepare` made before the process group."""
    run_dir = Path(cfg.run_dir)
    tok = Tokenizer.load(backbone.hf_dir)
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "unk": tok.unk_id}
    mask_id = tok.token_to_id("<mask>") if backbone.model.kind == "masked" else None
    if mask_id is not None:
        ids["mask"] = mask_id
    if backbone.model.kind == "masked" and cfg.transfer.aux_lm_weight and mask_id is None:
        raise DataError(f"{backbone.hf_dir}: the tokenizer has no '<mask>' token, needed by aux_lm_weight on a masked model")
    task = make_task(cfg, tok, Vocab(tok.bos_id, tok.eos_id, tok.pad_id), backbone.model.kind)
    raw = load_splits(cfg, task)
    task.fit_labels(raw["train"])
    splits = {name: (exs, task.encode(exs, name)) for name, exs in raw.items()}
    if not splits["train"][1]:
        raise DataError(f"{cfg.data.train}: no usable training examples")

    plan = plan_batches(cfg.train.micro_batch_size, cfg.train.global_batch_size, info.world_size, cfg.task.max_seq_len)
    n_train = len(splits["train"][1])
    if cfg.train.max_steps is None:
        cfg.train.max_steps = max(1, math.ceil(cfg.train.epochs * n_train / plan.global_batch))
    if cfg.train.select_metric is None:
        cfg.train.select_metric = task.default_metric
    if info.is_main:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        tok.save(run_dir / "tokenizer")

    seed_everything(cfg.train.seed)  # the same head initialisation on every rank
    partitioned = builds_partitioned(cfg)
    conf = ds_config(cfg, plan, load_universal=bool(target and target.universal)) if partitioned else None
    module = build_module(cfg, task, backbone, conf)
    n_total = sum(param_numel(p) for p in module.parameters())
    n_train_params = sum(param_numel(p) for p in module.parameters() if p.requires_grad)
    built = " (built partitioned)" if is_partitioned(module) else ""  # read from the parameters, before the engine
    engine = build_engine(module, cfg, plan, load_universal=bool(target and target.universal),
                          param_groups=param_groups(module, cfg))
    loader = TaskLoader(splits["train"][1], plan.micro_batch_per_rank, plan.grad_accum_steps, info.rank,
                        info.world_size, cfg.data.seed, task.collate)
    from pretrain.model import flops_per_token

    peak, source = device_peak_flops(cfg.metrics.peak_flops)
    fpt = flops_per_token(cfg.model, tok.vocab_size, cfg.task.max_seq_len)
    checkpointer = Checkpointer(cfg)
    log_dir = str(run_dir / "tensorboard") if cfg.metrics.tensorboard else None
    callbacks = [checkpointer, BestCheckpoint(cfg.train.select_metric, checkpointer),
                 MetricsLogger(log_dir, fpt, peak, source), ProgressBar(cfg.train.progress), *load_callbacks(cfg.callbacks)]
    print0(
        f"fine-tune {run_dir}: {task.name} on a {backbone.model.kind} backbone ({n_total:,} params, {n_train_params:,} "
        f"trainable), {n_train} train / {len(splits['validation'][1])} validation features"
        + (f" / {len(splits['test'][1])} test" if "test" in splits else "")
        + f", {cfg.train.max_steps} steps of {plan.global_batch} ({cfg.train.max_steps * plan.global_batch / n_train:.2f} "
        f"epochs), {info.world_size} rank(s), ZeRO-{cfg.zero.stage}{built}, {cfg.precision}"
        + (f", offload: {off}" if (off := offload_summary(engine)) else "")
        + (f", labels {task.labels}" if task.labels else "")
    )
    trainer = FinetuneTrainer(cfg, engine, loader, info, plan, ids, task, splits, callbacks,
                              tokenizer_sha256=tok.fingerprint)
    trainer.backbone = backbone
    trainer.n_params = (n_total, n_train_params)
    if target is not None:
        restore(trainer, target)
    return trainer


def load_checkpoint_weights(trainer: FinetuneTrainer, step_dir: Path) -> None:
    """Put the weights of one of this run's checkpoints into the engine (a full DeepSpeed load:
    a weights-only load of a ZeRO-3 checkpoint silently loads nothing)."""
    state = read_state(step_dir)
    universal = state["world_size"] != trainer.dist.world_size and state["zero_stage"] > 0
    target = ResumeTarget(step_dir, state, universal)
    if universal:
        ensure_universal(target, trainer.dist.rank)
    path, _ = trainer.engine.load_checkpoint(str(step_dir.parent), tag=target.load_tag, load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise ConfigError(f"DeepSpeed could not load {step_dir}")
    reapply_group_hparams(trainer.engine, trainer.cfg)


def finish(trainer: FinetuneTrainer) -> tuple[dict[str, Any], Path]:
    """Best checkpoint → validation and test metrics (all ranks); returns them and the chosen checkpoint.
    The export and metrics.json follow in :func:`publish`, once the process group is gone."""
    cfg = trainer.cfg
    run_dir = Path(cfg.run_dir)
    best = best_checkpoint(run_dir)
    final = latest_checkpoint(run_dir)
    if final is None or step_of(final) != trainer.state.step:
        final = save(trainer, "final")
    chosen = run_dir / CKPT / best["tag"] if best else final
    if chosen != final:
        print0(f"loading the best checkpoint {chosen.name} ({best['metric']} = {best['value']:.4f})")
        load_checkpoint_weights(trainer, chosen)
    results: dict[str, Any] = {}
    for split in ("validation", "test"):
        if split in trainer.splits and trainer.splits[split][1]:
            m, _ = trainer.run_split(split)
            prefix = "eval" if split == "validation" else "test"
            results.update({f"{prefix}/{k}": v for k, v in m.items()})
            if trainer.task.name == "sft":
                gen = trainer.generate_samples(split, None if split == "test" else cfg.task.num_samples)
                results.update({f"{prefix}/{k}": v for k, v in gen.items()})
    if "eval/loss" in results:
        results["eval/ppl"] = math.exp(min(results["eval/loss"], 50.0))
    return results, chosen


def publish(trainer: FinetuneTrainer, results: dict[str, Any], chosen: Path) -> None:
    """Rank 0, after the process group is destroyed: TensorBoard, samples, the HF export, then
    ``metrics.json`` (last: it marks the run finished). A 7B export takes longer than any collective
    timeout, so no rank may be waiting in one meanwhile."""
    cfg = trainer.cfg
    run_dir = Path(cfg.run_dir)
    export_dir = run_dir / "export"
    best = best_checkpoint(run_dir)
    _write_tensorboard(run_dir, cfg, trainer.state.step, results)
    if trainer.last_generations:
        atomic_write_text(run_dir / "samples.jsonl", "".join(json.dumps(g) + "\n" for g in trainer.last_generations))
    from pretrain.export import fp32_state_dict

    export_task_model(fp32_state_dict(chosen), trainer.task, trainer.backbone, export_dir, trainer.task.tok)
    record = {
        **results,
        "task": trainer.task.name,
        "labels": trainer.task.labels,
        "checkpoint": chosen.name,
        "best": best,
        "steps": trainer.state.step,
        "epochs": trainer.loader.epoch,
        "n_params": trainer.n_params[0],
        "n_trainable_params": trainer.n_params[1],
        "examples": {k: len(v[0]) for k, v in trainer.splits.items()},
        "features": {k: len(v[1]) for k, v in trainer.splits.items()},
        "init_from": {"path": cfg.init_from, **trainer.backbone.source},
        "random_init": cfg.transfer.random_init,
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


def prepare(cfg: FinetuneConfig, rank: int, world_size: int) -> tuple[Backbone, ResumeTarget | None]:
    """Before the process group exists: the run-directory lock, the backbone's HF export (rank 0,
    the others wait on its completion marker) and the resume target (converted likewise)."""
    cfg.precision = resolve_precision(cfg.precision)  # before config.yaml and checkpoints record it
    if rank == 0:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        print0(f"run directory lock: {lock_run_dir(cfg.run_dir)}")
    backbone = resolve_backbone(cfg, rank)
    cfg.model = backbone.model
    from finetune.estimate import resolve_zero_stage

    cfg.zero.stage = resolve_zero_stage(cfg, backbone, world_size)  # "auto" → 0 or 3 by size, before anything reads it
    target = resolve_resume(cfg, world_size)  # first: a resume keeps the checkpoint's global batch
    if target is not None and target.universal:
        ensure_universal(target, rank)
    return backbone, target


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    check_versions()
    rank, _, world_size = launch_env()
    if (Path(cfg.run_dir) / METRICS).is_file() and cfg.resume.mode == "auto":
        done = json.loads((Path(cfg.run_dir) / METRICS).read_text())
        print0(f"{cfg.run_dir} is finished ({METRICS} exists, {done.get('steps')} steps); use another --run_dir "
               "or delete it to train again")
        return done
    backbone, target = prepare(cfg, rank, world_size)
    info = init_distributed(cfg.dist.timeout_s)
    ok, finished = False, None
    try:
        trainer = build(cfg, info, backbone, target)
        trainer.fit()
        if trainer.early_stopped:
            print0(f"early stop at step {trainer.state.step}: {trainer.evals_without_improvement} validations "
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
        publish(trainer, *finished)
    return finished[0]
