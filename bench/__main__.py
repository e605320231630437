"""``python -m bench [--quick] [--only NAME ...]`` — run every benchmark in BENCHMARKS, then write bench/REPORT.md.

Each entry is a module ``bench.<name>`` whose ``main(argv) -> int`` prints and saves its records
(see bench/common.py). Add a benchmark by appending its module name here. At the end the report is
regenerated from all the saved results of the mode (``python -m bench.report [--quick]``), so a
``--only`` run updates its own section and keeps the others' latest figures with their dates.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

BENCHMARKS = [
    "data_pipeline",  # build vs limit / peer, scaling over workers, cost growth over corpus size
    "train_throughput",  # pretrain vs limit / peer, MFU, scaling over processes, RSS per ZeRO stage
    "checkpoint",  # save / load / world-size change / export
    "model_init",  # peak RSS per rank while building a model: whole vs ZeRO-3 partitioned
    "export_memory",  # peak RSS of the HF export: whole model vs streaming, against the bytes written
    "finetune_memory",  # peak RSS per rank of a 2-rank fine-tune of a ZeRO-3 checkpoint, against the model's bytes
    "transfer",  # test accuracy vs labelled examples, pretrained vs random init; classifier pooling
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only this benchmark (repeatable; same as naming it)")
    ap.add_argument("--quick", action="store_true", help="smoke-sized runs (passed to each benchmark)")
    ap.add_argument("--no-report", action="store_true", help="do not rewrite bench/REPORT.md at the end")
    args = ap.parse_args(argv)
    names = list(dict.fromkeys(args.names + args.only))
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    failed = []
    t_all = time.time()
    for name in names or BENCHMARKS:
        print(f"== bench.{name}", file=sys.stderr, flush=True)
        t0 = time.time()
        mod = importlib.import_module(f"bench.{name}")
        try:
            rc = mod.main(["--quick"] if args.quick else [])
        except SystemExit as e:  # a benchmark may bail out with SystemExit("reason")
            rc = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        if rc:
            failed.append(name)
        print(f"== bench.{name}: {'FAILED' if rc else 'ok'} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    print(f"== all benchmarks: {time.time() - t_all:.0f}s", file=sys.stderr, flush=True)
    if not args.no_report:
        from bench import report

        if report.main(["--quick"] if args.quick else []):
            failed.append("report")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
