"""Run under torchrun with 2 ranks by test_model.py: a ZeRO-3 model built partitioned
(``build_model_partitioned``) against the same model built whole (``build_model``), same seed.

Rank 0 prints one JSON line per rank and model kind: how many parameters differ after gathering, whether
the RNG states afterwards are equal, and the elements this rank holds against the full count.
"""

from __future__ import annotations

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from pretrain.config import ModelConfig, PretrainConfig, ZeroConfig
from pretrain.dist import init_distributed
from pretrain.engine import EngineSpec, ds_config, plan_batches
from pretrain.model import build_model, build_model_partitioned


def check(kind: str, precision: str, tied: bool) -> dict:
    model = ModelConfig(kind=kind, hidden_size=64, num_layers=2, num_heads=4, max_seq_len=64, tie_embeddings=tied,
                        dropout=0.1 if kind == "masked" else 0.0)
    cfg = PretrainConfig(model=model, zero=ZeroConfig(stage=3), precision=precision)
    conf = ds_config(EngineSpec.of(cfg), plan_batches(2, None, 2, 64))
    conf["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every tensor
    ids = dict(bos_id=1, eos_id=2, pad_id=3, mask_id=4 if kind == "masked" else None)
    torch.manual_seed(11)
    whole = build_model(model, 1000, **ids)
    rng_whole = torch.get_rng_state()
    torch.manual_seed(11)
    part = build_model_partitioned(model, 1000, conf, **ids)
    rng_part = torch.get_rng_state()
    reference = dict(whole.named_parameters())
    differ = []
    for name, p in part.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            full = p.data.clone()
        want = reference[name].data.to(full.dtype)  # the engine casts a whole model the same way
        if full.shape != want.shape or not torch.equal(full, want):
            differ.append(name)
    return {
        "rank": dist.get_rank(), "kind": kind, "precision": precision, "tied": tied, "differ": differ,
        "rng_equal": torch.equal(rng_whole, rng_part),
        "dtype": str(next(part.parameters()).dtype),
        "local": sum(p.ds_tensor.numel() for p in part.parameters()),
        "full": sum(p.ds_numel for p in part.parameters()),
        "whole": sum(p.numel() for p in whole.parameters()),
    }


def check_finetune(task_name: str, hf_dir: str) -> dict:
    """A fine-tune task model built partitioned (pretrained weights copied in from rank 0) against the
    plain build: an untied causal backbone, so the aux LM head loads its own ``lm_head.`` weights."""
    from pathlib import Path

    from finetune.config import FinetuneConfig
    from finetune.model import Backbone, build_module
    from finetune.tasks import TASK_CLASSES, Vocab
    from lmforge.config import from_dict

    model = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, max_seq_len=64, tie_embeddings=False)
    if dist.get_rank() == 0 and not (Path(hf_dir) / "config.json").is_file():
        torch.manual_seed(5)
        build_model(model, 1000).save_pretrained(hf_dir)  # the "pretrained" backbone
    dist.barrier()
    typ = "sft" if task_name == "sft" else "sequence_classification"
    cfg = from_dict(FinetuneConfig, {"init_from": hf_dir, "data": {"train": "x"}, "task": {"type": typ},
                                     "zero": {"stage": 3}, "precision": "fp32", "transfer": {"aux_lm_weight": 0.3 if typ != "sft" else 0.0}})
    task = TASK_CLASSES[typ](cfg, None, Vocab(1, 2, 3), "causal")
    task.labels = ["a", "b"] if typ != "sft" else []
    backbone = Backbone(Path(hf_dir), model, {})
    conf = ds_config(EngineSpec.of(cfg), plan_batches(2, None, dist.get_world_size(), 64))
    conf["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    torch.manual_seed(3)
    whole = dict(build_module(cfg, task, backbone).named_parameters())
    torch.manual_seed(3)
    part = build_module(cfg, task, backbone, conf)
    differ = []
    for name, p in part.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            if not torch.equal(p.data, whole[name].data.to(p.dtype)):
                differ.append(name)
    return {"rank": dist.get_rank(), "task": task_name, "differ": differ, "n": len(whole),
            "partitioned": all(hasattr(p, "ds_id") for p in part.parameters())}


def main() -> None:
    init_distributed()
    for spec in sys.argv[1:]:
        kind, precision, tied = spec.split(":")
        rows = [None] * dist.get_world_size()
        row = check_finetune(precision, tied) if kind == "finetune" else check(kind, precision, tied == "tied")
        dist.all_gather_object(rows, row)
        if dist.get_rank() == 0:  # one writer: the ranks' lines would interleave
            for row in rows:
                print(json.dumps(row), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
