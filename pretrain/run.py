"""Pretraining's wiring: resolve and freeze the config → tokenizer, shard loader, the language-modelling
objective → the shared runtime (:func:`pretrain.runtime.build_trainer`) → ``Trainer.fit()``."""

from __future__ import annotations

from pathlib import Path

from data_pipeline.loader import ShardLoader
from lmforge.config import dump_yaml, freeze, is_frozen, resolved
from lmforge.lock import lock_run_dir
from lmforge.log import print0
from lmforge.rundir import data_skips
from lmforge.versions import check_versions
from pretrain.checkpoint import ResumeTarget, ensure_universal, resolve_resume
from pretrain.config import PretrainConfig
from pretrain.dist import DistInfo, init_distributed, launch_env, shutdown
from pretrain.engine import batch_plan, param_numel, resolve_precision
from pretrain.goodput import timed
from pretrain.objective import LanguageModeling, shard_tokenizer, special_ids, verify_shards_once
from pretrain.runtime import build_trainer
from pretrain.trainer import Callback, Trainer, TrainState


def resolve(cfg: PretrainConfig, world_size: int) -> tuple[PretrainConfig, ResumeTarget | None]:
    """The run's config, resolved once and frozen: a concrete precision and, on resume, the checkpoint's
    global batch (with the checkpoint to resume). ``cfg`` itself is not changed."""
    changes: dict = {"precision": resolve_precision(cfg.precision)}  # before config.yaml and checkpoints record it
    target = resolve_resume(cfg, world_size)  # first: a resume keeps the checkpoint's global batch
    if target is not None and target.global_batch != cfg.train.global_batch_size:
        changes["train.global_batch_size"] = target.global_batch
    return freeze(resolved(cfg, changes)), target


def prepare_run_dir(cfg: PretrainConfig, tok, info: DistInfo) -> Path:
    run_dir = Path(cfg.run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        tok.save(run_dir / "tokenizer")
    return run_dir


def build(cfg: PretrainConfig, info: DistInfo, extra_callbacks: list[Callback] | None = None,
          target: ResumeTarget | None | object = None) -> Trainer:
    """Everything a run needs, ready for ``fit()`` (the checkpoint, if any, already restored).

    ``cfg`` and ``target`` come from :func:`prepare` (resolved and frozen); given a config as loaded, this
    resolves it (and its resume target) itself.
    """
    from pretrain.model import build_model, build_model_partitioned, flops_per_token

    if not is_frozen(cfg):
        cfg, target = resolve(cfg, info.world_size)
        if target is not None and target.universal:
            ensure_universal(target, info.rank)
    tok = shard_tokenizer(cfg.data.shards, cfg.model.vocab_size)
    ids = special_ids(tok, cfg.model.kind)
    run_dir = prepare_run_dir(cfg, tok, info)
    plan = batch_plan(cfg, info.world_size)
    if cfg.data.verify_shards:
        verify_shards_once(cfg.data.shards, run_dir, info.rank, info.world_size)
    loader = ShardLoader(
        cfg.data.shards, cfg.data.seq_len, plan.micro_batch_per_rank, seed=cfg.data.seed, rank=info.rank,
        world_size=info.world_size, weights=cfg.data.weights, tokenizer_sha256=tok.fingerprint,
        verify=False,  # verified above, once for the job
    )
    for start, end in [*cfg.data.skip_samples, *((r["start"], r["end"]) for r in data_skips(run_dir))]:
        loader.add_skip(start, end)  # ranges left out by the user and by loss-spike rollbacks
    objective = LanguageModeling(cfg.model.kind, loader, ids, tok.fingerprint, cfg.data.shards, cfg.data.seq_len,
                                 cfg.train.seed, cfg.model.mlm_probability, cfg.train.eval_samples, cfg.train.max_tokens)
    model_ids = dict(bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], mask_id=ids.get("mask"))

    def make_model(conf):  # every ZeRO stage starts from the same weights; ZeRO-3 builds them already partitioned
        if conf is not None:
            return build_model_partitioned(cfg.model, tok.vocab_size, conf, **model_ids)
        # on the rank's own device (a GPU), not in host memory on every rank and then copied over
        return build_model(cfg.model, tok.vocab_size, device=info.device, **model_ids)

    def describe(model, how: str, offload: str) -> str:
        n_params = sum(param_numel(p) for p in model.parameters())
        return (f"run {run_dir}: {cfg.model.kind} model, {n_params:,} params, {info.world_size} rank(s), {how}, "
                f"global batch {plan.global_batch} x {plan.seq_len} tokens (micro {plan.micro_batch_per_rank} x accum "
                f"{plan.grad_accum_steps} x {plan.dp_world} ranks)" + (f", offload: {offload}" if offload else ""))

    fpt = flops_per_token(cfg.model, tok.vocab_size, cfg.data.seq_len)
    return build_trainer(cfg, info, plan, objective, make_model, fpt, target, describe, extra_callbacks=extra_callbacks)


def prepare(cfg: PretrainConfig, rank: int, world_size: int) -> tuple[PretrainConfig, ResumeTarget | None]:
    """What runs before the process group exists: the run-directory lock, the resolved config and the
    resume target, converted to DeepSpeed's universal format on rank 0 when the world size changed (the
    other ranks wait on its completion marker: no collective waits on single-rank work)."""
    if rank == 0:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        print0(f"run directory lock: {lock_run_dir(cfg.run_dir)}")
    cfg, target = resolve(cfg, world_size)
    if target is not None and target.universal:
        with timed("conversion"):  # a part of the goodput record
            ensure_universal(target, rank)
    return cfg, target


def run(cfg: PretrainConfig) -> TrainState:
    check_versions()
    rank, _, world_size = launch_env()
    cfg, target = prepare(cfg, rank, world_size)
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
