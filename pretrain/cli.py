"""``python -m pretrain CONFIG [--section.key=value ...] [--dry-run [--ranks=N]]``

Single process, ``torchrun --nproc_per_node N -m pretrain ...``, the ``deepspeed`` launcher and
SLURM all run this same ``main``; rank, world size and master address come from the environment.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lmforge.config import config_help, dump_yaml, load_config, split_cli
from lmforge.errors import ConfigError, DataError, run_cli
from pretrain.config import PretrainConfig

USAGE = __doc__.strip().splitlines()[0].strip("`")


def parse_args(argv: Sequence[str] | None) -> tuple[PretrainConfig, set[str], int]:
    argv = list(sys.argv[1:] if argv is None else argv)
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    rest = []
    for a in argv:  # --ranks=N is a dry-run option, not a config key
        if a.startswith(("--local_rank=", "--local-rank=")):
            continue  # the deepspeed launcher appends it; LOCAL_RANK in the environment says the same
        if a.startswith("--ranks="):
            ranks = int(a.split("=", 1)[1])
        else:
            rest.append(a)
    path, overrides, flags = split_cli(rest)
    if "help" in flags or "h" in flags:
        print(f"usage: {USAGE}\n\nconfig keys (defaults before the preset is applied):\n{config_help(PretrainConfig)}")
        raise SystemExit(0)
    return load_config(PretrainConfig, path, overrides), flags, ranks


def main(argv: Sequence[str] | None = None) -> int:
    cfg, flags, ranks = parse_args(argv)
    if "dry-run" in flags:
        return dry_run(cfg, ranks)
    from pretrain.run import run

    run(cfg)
    return 0


def shard_tokenizer(cfg: PretrainConfig):
    """The tokenizer stored with the first shard directory (all must share it; the loader checks)."""
    from data_pipeline.shards import Manifest
    from data_pipeline.tokenizer import Tokenizer

    if not cfg.data.shards:
        raise ConfigError("data.shards is empty: pass --data.shards=DIR (built with `python -m data_pipeline build`)")
    m = Manifest(cfg.data.shards[0])
    tok = Tokenizer.load(Path(cfg.data.shards[0]) / "tokenizer")
    if tok.fingerprint != m.tokenizer_sha256 or tok.vocab_size != m.vocab_size:
        raise DataError(f"{cfg.data.shards[0]}/tokenizer does not match its manifest.json; rebuild the shards")
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != tok.vocab_size:
        raise DataError(
            f"model.vocab_size {cfg.model.vocab_size} does not match the vocab of the tokenizer of "
            f"{cfg.data.shards[0]} ({tok.vocab_size}); drop the override or rebuild the shards"
        )
    return tok


def dry_run(cfg: PretrainConfig, ranks: int) -> int:
    """Resolved config, parameter count, FLOPs/token and per-rank memory — nothing is allocated."""
    from pretrain.estimate import describe, saves_line

    vocab = cfg.model.vocab_size
    if vocab is None:
        vocab = shard_tokenizer(cfg).vocab_size if cfg.data.shards else None
    if vocab is None:
        raise ConfigError("model.vocab_size is unset and there are no data.shards to take it from: pass --model.vocab_size=N")
    info = describe(cfg, vocab_size=vocab, world_size=ranks)
    print(dump_yaml(cfg), end="")
    print("# --- dry run ---")
    print(json.dumps(info, indent=1))
    print(f"n_params: {info['n_params']:,}")
    print("batch: " + (info["batch_note"] or f"{info['global_batch_size']} sequences per step = micro "
                       f"{info['micro_batch_size']} x accum {info['grad_accum_steps']} x {ranks} ranks"))
    print(saves_line(info["checkpoint"]))
    return 0


def cli() -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    # record: under torchrun, a failing rank's error becomes the job's reported root cause
    sys.exit(run_cli(record(main)))


if __name__ == "__main__":
    cli()
