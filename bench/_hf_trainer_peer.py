"""The peer of our trainer: Hugging Face ``transformers.Trainer`` with the same DeepSpeed config.

``torchrun --nproc_per_node N -m bench._hf_trainer_peer --out FILE [--warmup K] CONFIG [--section.key=value ...]``

The config and overrides are read exactly as ``python -m pretrain`` reads them; from them come the
DeepSpeed JSON (``pretrain.engine.ds_config``, byte for byte what our engine gets), the model
(``pretrain.model.build_model`` after the same seed) and the packed windows (``ShardLoader``'s global
samples in order: HF's sequential sampler, sharded by accelerate, gives rank r the same samples per
step as our loader). A TrainerCallback stamps every optimizer step's end; rank 0 writes them, the
logged losses and what HF actually set up (DeepSpeed engine? which optimizer?) to FILE as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench._hf_trainer_peer")
    ap.add_argument("--out", required=True)
    ap.add_argument("--use-cpu", action="store_true", help="TrainingArguments(use_cpu=True)")
    args, rest = ap.parse_known_args()

    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from bench._train_common import WindowDataset
    from pretrain.cli import parse_args
    from pretrain.engine import EngineSpec, batch_plan, ds_config
    from pretrain.model import build_model
    from pretrain.objective import shard_tokenizer

    cfg, _, _ = parse_args(rest)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan = batch_plan(cfg, world)
    conf = ds_config(EngineSpec.of(cfg), plan)
    conf_sent = json.loads(json.dumps(conf))  # HF edits the dict it is given; keep what we passed
    tok = shard_tokenizer(cfg.data.shards, cfg.model.vocab_size)
    torch.manual_seed(cfg.train.seed)  # as pretrain.run.build: identical initial weights
    model = build_model(cfg.model, tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    steps = cfg.train.max_steps
    data = WindowDataset(cfg.data.shards, cfg.data.seq_len, cfg.data.seed, steps * plan.global_batch)

    stamps: list[tuple[int, float]] = []
    losses: dict[int, float] = {}

    class Stamp(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            stamps.append((0, time.perf_counter()))

        def on_step_end(self, a, state, control, **kw):
            stamps.append((state.global_step, time.perf_counter()))

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])

    o = cfg.optim
    targs = TrainingArguments(
        output_dir=str(Path(cfg.run_dir) / "hf"),
        deepspeed=conf,
        use_cpu=args.use_cpu,
        per_device_train_batch_size=plan.micro_batch_per_rank,
        gradient_accumulation_steps=plan.grad_accum_steps,
        max_steps=steps,
        learning_rate=o.lr,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_epsilon=o.eps,
        weight_decay=o.weight_decay,
        max_grad_norm=o.grad_clip,
        warmup_steps=min(o.warmup_steps, steps),
        lr_scheduler_type="cosine",
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        logging_steps=cfg.train.log_every,  # the same logging cadence as our run
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # keep shift_labels
        train_sampling_strategy="sequential",
        seed=cfg.train.seed,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[Stamp()])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    engine = trainer.model_wrapped
    setup = {
        "is_deepspeed_enabled": bool(getattr(trainer, "is_deepspeed_enabled", False)),
        "engine": type(engine).__module__ + "." + type(engine).__name__,
        "optimizer": type(getattr(engine, "optimizer", trainer.optimizer)).__name__,
        "basic_optimizer": type(getattr(getattr(engine, "optimizer", None), "optimizer", None)).__name__,
        "zero_stage": engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None,
        "ds_config_as_passed": conf_sent,
        "device": str(targs.device),
        "distributed_type": str(trainer.accelerator.distributed_type),
    }
    if int(os.environ.get("RANK", "0")) == 0:
        result = {"stamps": stamps, "losses": losses, "train_seconds": total, "tokens_per_step": plan.tokens_per_step,
                  "setup": setup}
        Path(args.out).write_text(json.dumps(result, indent=1))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
