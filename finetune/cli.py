"""``python -m finetune CONFIG --run_dir=DIR --init_from=PRETRAIN_RUN [--data.train=F ...] [--section.key=value ...]``

Single process, ``torchrun --nproc_per_node N -m finetune ...`` and SLURM run this same ``main``;
rank, world size and master address come from the environment.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from finetune.config import FinetuneConfig
from lmforge.config import config_help, dump_yaml, load_config, split_cli
from lmforge.errors import run_cli

USAGE = __doc__.strip().splitlines()[0].strip("`")


def parse_args(argv: Sequence[str] | None) -> tuple[FinetuneConfig, set[str]]:
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith(("--local_rank=", "--local-rank="))]
    path, overrides, flags = split_cli(argv)
    if "help" in flags or "h" in flags:
        print(f"usage: {USAGE}\n\nconfig keys (defaults before the preset is applied):\n{config_help(FinetuneConfig)}")
        raise SystemExit(0)
    return load_config(FinetuneConfig, path, overrides), flags


def main(argv: Sequence[str] | None = None) -> int:
    cfg, flags = parse_args(argv)
    if "dry-run" in flags:
        print(dump_yaml(cfg), end="")
        return 0
    from finetune.run import run

    run(cfg)
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
