"""Wiring: config → tokenizer, model, engine, loader, callbacks → ``Trainer.fit()``."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from data_pipeline.loader import ShardLoader
from lmforge.config import dump_yaml
from lmforge.errors import DataError
from lmforge.lock import lock_run_dir
from lmforge.log import print0
from lmforge.versions import check_versions
from pretrain.callbacks import MetricsLogger, ProgressBar, device_peak_flops, load_callbacks
from pretrain.checkpoint import Checkpointer, ResumeTarget, ensure_universal, resolve_resume, restore
from pretrain.cli import shard_tokenizer
from pretrain.config import PretrainConfig
from pretrain.dist import DistInfo, init_distributed, launch_env, shutdown
from pretrain.engine import (
    batch_plan,
    build_engine,
    builds_partitioned,
    ds_config,
    offload_summary,
    param_numel,
    resolve_precision,
)
from pretrain.trainer import Callback, Trainer, TrainState

_UNRESOLVED = object()  # build(): resolve the resume target itself


def special_ids(tok, kind: str) -> dict[str, int]:
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "unk": tok.unk_id}
    if kind == "masked":
        mask = tok.token_to_id("<mask>")
        if mask is None:
            raise DataError(
                "a masked LM needs a '<mask>' token: train the tokenizer with --extra-special-tokens '<mask>'"
            )
        ids["mask"] = mask
    return ids


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_run_dir(cfg: PretrainConfig, tok, info: DistInfo) -> Path:
    run_dir = Path(cfg.run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        tok.save(run_dir / "tokenizer")
    return run_dir


def build(cfg: PretrainConfig, info: DistInfo, extra_callbacks: list[Callback] | None = None,
          target: ResumeTarget | None | object = _UNRESOLVED) -> Trainer:
    """Everything a run needs, ready for ``fit()`` (checkpoint restore hooks in before fit).

    ``target``: the checkpoint to resume, when :func:`prepare` already resolved (and converted) it.
    """
    from pretrain.model import build_model, build_model_partitioned, flops_per_token, is_partitioned

    cfg.precision = resolve_precision(cfg.precision)  # before config.yaml and checkpoints record it
    tok = shard_tokenizer(cfg)
    ids = special_ids(tok, cfg.model.kind)
    run_dir = prepare_run_dir(cfg, tok, info)
    if target is _UNRESOLVED:
        target = resolve_resume(cfg, info.world_size)  # first: a resume keeps the checkpoint's global batch
    plan = batch_plan(cfg, info.world_size)
    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    # Every ZeRO stage starts from the same weights; ZeRO-3 builds the model already partitioned.
    model_ids = dict(bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], mask_id=ids.get("mask"))
    if builds_partitioned(cfg):
        conf = ds_config(cfg, plan, load_universal=bool(target and target.universal))
        model = build_model_partitioned(cfg.model, tok.vocab_size, conf, **model_ids)
    else:
        model = build_model(cfg.model, tok.vocab_size, **model_ids)
    built = " (built partitioned)" if is_partitioned(model) else ""  # read from the parameters, before the engine
    engine = build_engine(model, cfg, plan, load_universal=bool(target and target.universal))
    loader = ShardLoader(
        cfg.data.shards, cfg.data.seq_len, plan.micro_batch_per_rank, seed=cfg.data.seed, rank=info.rank,
        world_size=info.world_size, weights=cfg.data.weights, tokenizer_sha256=tok.fingerprint,
        verify=cfg.data.verify_shards,
    )
    peak, source = device_peak_flops(cfg.metrics.peak_flops)
    fpt = flops_per_token(cfg.model, tok.vocab_size, cfg.data.seq_len)
    log_dir = str(run_dir / "tensorboard") if cfg.metrics.tensorboard else None
    callbacks: list[Callback] = [Checkpointer(cfg), MetricsLogger(log_dir, fpt, peak, source), ProgressBar(cfg.train.progress)]
    callbacks += load_callbacks(cfg.callbacks) + (extra_callbacks or [])
    n_params = sum(param_numel(p) for p in model.parameters())
    print0(
        f"run {run_dir}: {cfg.model.kind} model, {n_params:,} params, "
        f"{info.world_size} rank(s), ZeRO-{cfg.zero.stage}{built}, {cfg.precision}, global batch {plan.global_batch} x "
        f"{plan.seq_len} tokens (micro {plan.micro_batch_per_rank} x accum {plan.grad_accum_steps} x {plan.dp_world} ranks)"
        + (f", offload: {off}" if (off := offload_summary(engine)) else "")
    )
    trainer = Trainer(cfg, engine, loader, info, plan, ids, callbacks, tokenizer_sha256=tok.fingerprint)
    if target is not None:
        restore(trainer, target)
    return trainer


def prepare(cfg, rank: int, world_size: int) -> ResumeTarget | None:
    """What runs before the process group exists: the run-directory lock and the resume target,
    converted to DeepSpeed's universal format on rank 0 when the world size changed (the other
    ranks wait on its completion marker: no collective waits on single-rank work)."""
    if rank == 0:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        print0(f"run directory lock: {lock_run_dir(cfg.run_dir)}")
    target = resolve_resume(cfg, world_size)  # first: a resume keeps the checkpoint's global batch
    if target is not None and target.universal:
        ensure_universal(target, rank)
    return target


def run(cfg: PretrainConfig) -> TrainState:
    check_versions()
    rank, _, world_size = launch_env()
    target = prepare(cfg, rank, world_size)
    info = init_distributed(cfg.dist.timeout_s)
    ok = False
    try:
        trainer = build(cfg, info, target=target)
        state = trainer.fit()
        print0(f"done: {state.step} steps, {state.tokens_seen:,} tokens, {state.skipped_steps} skipped → {cfg.run_dir}")
        ok = True
        return state
    finally:
        shutdown(ok)
