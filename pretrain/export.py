"""``python -m pretrain.export RUN_DIR [--step N] --out DIR [--dtype bf16|fp32]``

Writes a Hugging Face model directory (config.json, model.safetensors — sharded above
``--max-shard-size`` — generation_config.json and the tokenizer files) from a sharded DeepSpeed
checkpoint. It runs on CPU in one process: it needs neither the GPUs nor the world size that
trained the model (ZeRO partitions are merged with DeepSpeed's ``zero_to_fp32``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from lmforge.config import load_config
from lmforge.errors import run_cli
from pretrain.checkpoint import CKPT, CheckpointError, is_complete, latest_checkpoint, read_state, step_tag
from pretrain.config import PretrainConfig


def find_step(run_dir: Path, step: int | None) -> Path:
    if step is None:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise CheckpointError(f"{run_dir} has no complete checkpoint under {CKPT}/; train first")
        return found
    d = run_dir / CKPT / step_tag(step)
    if not is_complete(d):
        raise CheckpointError(f"{d} is missing or incomplete; pick a step listed in {run_dir / CKPT}")
    return d


def fp32_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from any ZeRO stage's checkpoint, on CPU."""
    if any(step_dir.glob("*optim_states.pt")) and any(step_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    else:  # ZeRO-0: the module states file holds the whole model
        files = sorted(step_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(f"{step_dir} holds no DeepSpeed model states; is it a checkpoint directory?")
        sd = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in sd.items()}


def build_hf_model(run_dir: Path, state: dict, cfg: PretrainConfig):
    from data_pipeline.tokenizer import Tokenizer
    from pretrain.model import build_model
    from pretrain.run import special_ids

    tok = Tokenizer.load(run_dir / "tokenizer")
    if tok.fingerprint != state["tokenizer_sha256"]:
        raise CheckpointError(f"{run_dir}/tokenizer differs from the one the checkpoint was trained with")
    ids = special_ids(tok, cfg.model.kind)
    model = build_model(cfg.model, tok.vocab_size, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
                        mask_id=ids.get("mask"))
    return model, tok


def load_weights(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], where: Path) -> None:
    """Strict load, except for keys that are tied to a loaded one (e.g. lm_head = embeddings).

    ``model`` may be whole or built partitioned for ZeRO-3 (``pretrain.model.load_state``)."""
    from pretrain.model import load_state

    missing, unexpected = load_state(model, sd)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])  # a list, or a dict keyed by the tied names
    really_missing = [k for k in missing if k not in tied]
    if really_missing or unexpected:
        raise CheckpointError(
            f"{where}: weights do not match the model (missing {really_missing[:3]}, unexpected {list(unexpected)[:3]})"
        )
    model.tie_weights()


def export(run_dir: str | Path, out: str | Path, step: int | None = None, dtype: str = "fp32",
           max_shard_size: str = "2GB") -> Path:
    run_dir, out = Path(run_dir), Path(out)
    step_dir = find_step(run_dir, step)
    state = read_state(step_dir)
    cfg = load_config(PretrainConfig, run_dir / "config.yaml")
    model, tok = build_hf_model(run_dir, state, cfg)
    load_weights(model, fp32_state_dict(step_dir), step_dir)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    _save_generation_config(model, tmp)
    tok.save(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # a reader never sees a half-written export
    return out


def _save_generation_config(model, out: Path) -> None:
    from transformers import GenerationConfig

    c = model.config
    if c.model_type == "llama":
        GenerationConfig(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                         do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=128).save_pretrained(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--max-shard-size", default="2GB", help="safetensors files are split above this size")
    args = ap.parse_args(argv)
    path = export(args.run_dir, args.out, args.step, args.dtype, args.max_shard_size)
    print(f"exported {args.run_dir} → {path} (load with transformers' AutoModel*/AutoTokenizer.from_pretrained)")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
