"""``python -m pretrain CONFIG [--section.key=value ...] [--dry-run [--ranks=N] [--net_gbps=G] [--mfu=F]]``

Single process, ``torchrun --nproc_per_node N -m pretrain ...``, the ``deepspeed`` launcher and
SLURM all run this same ``main``; rank, world size and master address come from the environment.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from lmforge.config import config_help, dump_yaml, load_config, split_cli
from lmforge.errors import ConfigError, exit_process, run_cli
from pretrain.config import PretrainConfig

USAGE = __doc__.strip().splitlines()[0].strip("`")


def parse_args(argv: Sequence[str] | None) -> tuple[PretrainConfig, set[str], dict[str, float | None]]:
    """(config, bare flags, dry-run options ``ranks`` / ``net_gbps`` / ``mfu``, which are not config keys;
    None: pretrain.estimate's assumption)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    opts: dict[str, float | None] = {"ranks": int(os.environ.get("WORLD_SIZE", "1")), "net_gbps": None, "mfu": None}
    rest = []
    for a in argv:
        if a.startswith(("--local_rank=", "--local-rank=")):
            continue  # the deepspeed launcher appends it; LOCAL_RANK in the environment says the same
        key, eq, value = a[2:].partition("=")
        key = key.replace("-", "_")
        if a.startswith("--") and eq and key in opts:
            opts[key] = int(value) if key == "ranks" else _number(a, value)
        else:
            rest.append(a)
    path, overrides, flags = split_cli(rest)
    if "help" in flags or "h" in flags:
        print(f"usage: {USAGE}\n\nconfig keys (defaults before the preset is applied):\n{config_help(PretrainConfig)}")
        raise SystemExit(0)
    return load_config(PretrainConfig, path, overrides), flags, opts


def _number(arg: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{arg}: expected a number (write {arg.split('=')[0]}=N)") from None


def main(argv: Sequence[str] | None = None) -> int:
    cfg, flags, opts = parse_args(argv)
    if "dry-run" in flags:
        return dry_run(cfg, int(opts["ranks"]), opts["net_gbps"], opts["mfu"])
    from pretrain.run import run

    run(cfg)
    return 0


def dry_run(cfg: PretrainConfig, ranks: int, net_gbps: float | None = None, mfu: float | None = None) -> int:
    """Resolved config, parameter count, FLOPs/token, per-rank memory and network traffic — nothing is allocated."""
    from pretrain.estimate import ASSUMED_MFU, NET_GBPS, describe, network_lines, saves_line

    info = describe(cfg, vocab_size=estimate_vocab_size(cfg), world_size=ranks,
                    net_gbps=NET_GBPS if net_gbps is None else net_gbps, mfu=ASSUMED_MFU if mfu is None else mfu)
    print(dump_yaml(cfg), end="")
    print("# --- dry run ---")
    print(json.dumps(info, indent=1))
    print(f"n_params: {info['n_params']:,}")
    print("batch: " + (info["batch_note"] or f"{info['global_batch_size']} sequences per step = micro "
                       f"{info['micro_batch_size']} x accum {info['grad_accum_steps']} x {ranks} ranks"))
    print(saves_line(info["checkpoint"]))
    for line in network_lines(info["network"], ranks, info["zero_stage"], info["flops_per_token"]):
        print(line)
    return 0


def estimate_vocab_size(cfg: PretrainConfig) -> int:
    """The vocabulary a size estimate counts: ``model.vocab_size``, else the shards' tokenizer's."""
    vocab = cfg.model.vocab_size
    if vocab is None and cfg.data.shards:
        from pretrain.objective import shard_tokenizer

        vocab = shard_tokenizer(cfg.data.shards).vocab_size
    if vocab is None:
        raise ConfigError("model.vocab_size is unset and there are no data.shards to take it from: pass --model.vocab_size=N")
    return vocab


def cli() -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    # record: under torchrun, a failing rank's error becomes the job's reported root cause
    exit_process(run_cli(record(main)))  # no C++ teardown after gloo (see exit_process)


if __name__ == "__main__":
    cli()
