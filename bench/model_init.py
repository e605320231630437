"""Peak host memory per rank while a model is built: whole on every rank vs ZeRO-3's partitioned
build (``deepspeed.zero.Init``, ``--zero.partitioned_init``), 2 processes, no training.

Each mode runs ``bench/_init_driver.py`` under torchrun; the figure is the largest per-process peak
RSS (VmHWM); ``none`` (imports and process group only) is the floor both sit on. On DeepSpeed's CPU
accelerator the partitioned build also runs with ``MALLOC_MMAP_THRESHOLD_=65536``, which makes glibc
return every freed large tensor to the system at once: the gap between the two partitioned figures is
memory the C heap keeps after each module's full-size tensors are freed (why ``partitioned_init``
defaults to off on CPU).
"""

from __future__ import annotations

import argparse
import json
import sys

from bench._train_common import check, free_port, load_average, log, run_tree
from bench.common import bench_command, emit, print_table, record

NAME = "model_init"
WORLD = 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: the 125m preset instead of 350m")
    ap.add_argument("--preset", default=None, help="configs/pretrain/<preset>.yaml (default 350m; --quick 125m)")
    a = ap.parse_args(argv)
    preset = f"configs/pretrain/{a.preset or ('125m' if a.quick else '350m')}.yaml"
    results = {}
    modes = {"none": {}, "whole": {}, "partitioned": {}, "partitioned_mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
    for mode, env in modes.items():
        log(NAME, f"{mode}: {preset} on {WORLD} processes (load {load_average()})")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
               str(free_port()), "-m", "bench._init_driver", preset, mode.removesuffix("_mmap")]
        r = run_tree(cmd, env=env)
        check(NAME, f"{mode} build", r)
        info = json.loads([ln for ln in r["output"].splitlines() if ln.startswith("{")][-1])
        results[mode] = (r, info)
    recs = []
    floor = record(f"{NAME}.peak_rss_per_rank.none", "peak_rss", results["none"][0]["peak_rss_mb_per_proc"], "MB",
                   config={"preset": preset, "world_size": WORLD, "what": "imports + process group, no model",
                           "per_process_peaks_mb": results["none"][0]["peak_rss_mb_procs"]})
    recs.append(floor)
    whole = None
    for mode in ("whole", "partitioned", "partitioned_mmap"):
        r, info = results[mode]
        cfg = {"preset": preset, "n_params": info["n_params"], "world_size": WORLD, "precision": "fp32",
               "build_seconds": round(info["seconds"], 2), "per_process_peaks_mb": r["peak_rss_mb_procs"],
               "above_floor_mb": round(r["peak_rss_mb_per_proc"] - floor["value"], 1),
               "what": "largest per-process peak RSS (VmHWM) of a run that only builds the model",
               "command": " ".join([*(f"{k}={v}" for k, v in modes[mode].items()), "torchrun --nproc_per_node",
                                    str(WORLD), "-m bench._init_driver", preset, mode.removesuffix("_mmap")])}
        rec = record(f"{NAME}.peak_rss_per_rank.{mode}", "peak_rss", r["peak_rss_mb_per_proc"], "MB", whole, config=cfg)
        whole = whole or rec
        recs.append(rec)
    emit(recs, NAME + ("-quick" if a.quick else ""), command=bench_command(NAME, argv))
    print_table(recs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
