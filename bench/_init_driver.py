"""Run by bench/model_init.py under torchrun: import everything, then build one model and stop.

``python -m bench._init_driver PRESET MODE`` with MODE ``none`` (imports only), ``whole``
(``build_model`` on every rank) or ``partitioned`` (``build_model_partitioned``, ZeRO-3 zero.Init).
Rank 0 prints one JSON line: the parameter count and the build seconds (the caller measures RSS).
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist

from lmforge.config import load_config
from pretrain.config import PretrainConfig
from pretrain.dist import init_distributed
from pretrain.engine import EngineSpec, ds_config, param_numel, plan_batches
from pretrain.model import build_model, build_model_partitioned


def main() -> None:
    preset, mode = sys.argv[1], sys.argv[2]
    info = init_distributed()
    cfg = load_config(PretrainConfig, preset, ["--zero.stage=3", "--precision=fp32"])
    vocab = cfg.model.vocab_size or 32000
    torch.manual_seed(0)
    dist.barrier()
    t0 = time.perf_counter()
    n = 0
    if mode == "whole":
        n = sum(p.numel() for p in build_model(cfg.model, vocab).parameters())
    elif mode == "partitioned":
        conf = ds_config(EngineSpec.of(cfg), plan_batches(1, None, info.world_size, cfg.data.seq_len))
        n = sum(param_numel(p) for p in build_model_partitioned(cfg.model, vocab, conf).parameters())
    dist.barrier()
    seconds = time.perf_counter() - t0
    if info.is_main:
        print(json.dumps({"mode": mode, "n_params": n, "seconds": seconds}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
