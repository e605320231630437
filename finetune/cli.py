"""``python -m finetune CONFIG --run_dir=DIR --init_from=PRETRAIN_RUN [--data.train=F ...] [--section.key=value ...] [--dry-run [--ranks=N] [--gpu_memory_gb=G]]``

Single process, ``torchrun --nproc_per_node N -m finetune ...`` and SLURM run this same ``main``;
rank, world size and master address come from the environment. ``--dry-run`` prints the resolved
config (``zero.stage: auto`` decided) and the per-rank memory of the task model, from the pretrain
run's ``config.yaml`` alone: no weights are read, nothing is exported, no data is needed.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from finetune.config import FinetuneConfig
from lmforge.config import (
    config_help,
    dump_yaml,
    from_dict,
    load_config,
    merge,
    parse_overrides,
    read_yaml,
    split_cli,
)
from lmforge.errors import ConfigError, exit_process, run_cli

USAGE = __doc__.strip().splitlines()[0].strip("`")
DRY_RUN_DATA = "<not read by --dry-run>"  # data.train when a dry run is given none: sizes do not depend on it


def parse_args(argv: Sequence[str] | None) -> tuple[FinetuneConfig, set[str], dict[str, float]]:
    """(config, bare flags, dry-run options ``ranks`` / ``gpu_memory_gb``, which are not config keys)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    opts: dict[str, float] = {"ranks": int(os.environ.get("WORLD_SIZE", "1"))}
    rest = []
    for a in argv:
        if a.startswith(("--local_rank=", "--local-rank=")):
            continue  # the deepspeed launcher appends it; LOCAL_RANK in the environment says the same
        key, eq, value = a[2:].partition("=")
        if a.startswith("--") and key.replace("-", "_") in ("ranks", "gpu_memory_gb"):
            opts[key.replace("-", "_")] = _positive(a, value if eq else "")
        else:
            rest.append(a)
    path, overrides, flags = split_cli(rest)
    if "help" in flags or "h" in flags:
        print(f"usage: {USAGE}\n\nconfig keys (defaults before the preset is applied):\n{config_help(FinetuneConfig)}")
        raise SystemExit(0)
    if "dry-run" not in flags:
        return load_config(FinetuneConfig, path, overrides), flags, opts
    data = merge(read_yaml(path) if path else {}, parse_overrides(overrides))
    if not (data.get("data") or {}).get("train"):
        data = merge(data, {"data": {"train": DRY_RUN_DATA}})
    return from_dict(FinetuneConfig, data), flags, opts


def _positive(arg: str, value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = 0.0
    if x <= 0:
        raise ConfigError(f"{arg}: expected a positive number (write {arg.split('=')[0]}=N)")
    return x


def dry_run(cfg: FinetuneConfig, ranks: int, gpu_memory_gb: float | None) -> int:
    """Resolved config, task-model size and per-rank model-state memory — nothing is allocated or read."""
    from finetune.estimate import ASSUMED_DEVICE_GIB, describe
    from pretrain.estimate import GiB

    if ranks != int(ranks):
        raise ConfigError(f"--ranks={ranks}: expected a whole number of ranks")
    device = "given by --gpu_memory_gb"
    if gpu_memory_gb is None:
        import torch

        if torch.cuda.is_available():
            gpu_memory_gb, device = torch.cuda.get_device_properties(0).total_memory / GiB, "this machine's GPU"
        else:
            gpu_memory_gb, device = ASSUMED_DEVICE_GIB, "assumed (no GPU here): pass --gpu_memory_gb=G"
    info = describe(cfg, world_size=int(ranks), device_bytes=int(gpu_memory_gb * GiB))
    info["device_memory_from"] = device
    print(dump_yaml(cfg), end="")
    print("# --- dry run ---")
    print(json.dumps(info, indent=1))
    print(f"n_params: {info['n_params']:,} ({info['n_trainable_params']:,} trainable)")
    print(f"ZeRO-{info['zero_stage']}: {info['zero_stage_reason']}; "
          f"{'fits' if info['fits'] else 'does NOT fit'} ({info['chosen_stage_gb']['total']} of the "
          f"{info['budget_gb']} GiB budget per rank)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    cfg, flags, opts = parse_args(argv)
    if "dry-run" in flags:
        return dry_run(cfg, opts["ranks"], opts.get("gpu_memory_gb"))
    from finetune.run import run

    run(cfg)
    return 0


def cli() -> None:
    exit_process(run_cli(main))  # no C++ teardown after gloo (see exit_process)


if __name__ == "__main__":
    cli()
