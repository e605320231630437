"""``python -m bench [--quick] [NAME ...]`` — run every benchmark listed in BENCHMARKS, one after another.

Each entry is a module ``bench.<name>`` whose ``main(argv) -> int`` prints and saves its records
(see bench/common.py). Add a benchmark by appending its module name here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

BENCHMARKS = [
    "data_pipeline",
    "train_throughput",
    "checkpoint",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    ap.add_argument("--quick", action="store_true", help="smoke-sized runs (passed to each benchmark)")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    failed = []
    for name in args.names or BENCHMARKS:
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
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
