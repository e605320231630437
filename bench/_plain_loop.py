"""The limit for our trainer: a plain PyTorch loop, no DeepSpeed (DDP over gloo, torch AdamW).

``torchrun --nproc_per_node N -m bench._plain_loop --out FILE CONFIG [--section.key=value ...]``

The same config, model (``build_model`` after the same seed), the same windows per rank and step as
our ShardLoader gives (rank r of step s: global samples s·G + r·micro … + micro - 1), the same
optimizer recipe (AdamW with decay on ≥2-D weights only, warm-up + decay schedule, global-norm
clipping) and the same loss (cross-entropy on fp32 logits). Only fp32 is supported (a CPU bench).
Nothing else happens per step: no NaN checks, no metrics, no logging. Rank 0 writes the end time
of every step and the losses of the first steps to FILE as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench._plain_loop")
    ap.add_argument("--out", required=True)
    args, rest = ap.parse_known_args()

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from bench._train_common import WindowDataset
    from pretrain.cli import parse_args
    from pretrain.engine import batch_plan, group_hparams, lr_schedule
    from pretrain.model import build_model
    from pretrain.objective import shard_tokenizer

    cfg, _, _ = parse_args(rest)
    if cfg.precision != "fp32":
        raise SystemExit("bench._plain_loop runs fp32 only")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    plan = batch_plan(cfg, world)
    tok = shard_tokenizer(cfg.data.shards, cfg.model.vocab_size)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    model.train()
    ddp = DDP(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay, no_decay = group_hparams(cfg.optim)
    o = cfg.optim
    opt = torch.optim.AdamW(
        [{"params": [p for p in trainable if p.ndim >= 2], **decay},
         {"params": [p for p in trainable if p.ndim < 2], **no_decay}],
        lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
    )
    sched = lr_schedule(opt, cfg.optim, cfg.train.max_steps)
    steps, micro, accum = cfg.train.max_steps, plan.micro_batch_per_rank, plan.grad_accum_steps
    data = WindowDataset(cfg.data.shards, cfg.data.seq_len, cfg.data.seed, steps * plan.global_batch)

    stamps: list[tuple[int, float]] = [(0, time.perf_counter())]
    losses: dict[int, float] = {}
    t0 = time.perf_counter()
    for step in range(steps):
        for k in range(accum):
            first = step * plan.global_batch + (k * world + rank) * micro  # our loader's layout
            batch = torch.stack([data.window(first + i) for i in range(micro)])
            inputs, targets = batch[:, :-1], batch[:, 1:]
            ctx = ddp.no_sync() if k < accum - 1 else contextlib.nullcontext()
            with ctx:
                logits = ddp(input_ids=inputs, use_cache=False).logits
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
                (loss / accum).backward()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        stamps.append((step + 1, time.perf_counter()))
        if step < 3:  # warm-up steps (not timed): the mean over ranks, as our trainer logs it
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses[step + 1] = float(mean) / world
    total = time.perf_counter() - t0
    if rank == 0:
        result = {"stamps": stamps, "losses": losses, "train_seconds": total, "tokens_per_step": plan.tokens_per_step,
                  "setup": {"ddp": "gloo", "optimizer": "torch.optim.AdamW (foreach default)",
                            "ddp_bucket_cap_mb": 25, "world_size": world}}
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
