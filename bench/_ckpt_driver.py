"""``python -m pretrain`` with stopwatches on checkpoint save, restore and universal conversion.

``torchrun --nproc_per_node N -m bench._ckpt_driver --out FILE CONFIG [--section.key=value ...]``

Runs exactly what ``python -m pretrain`` runs (``pretrain.cli.main``); only ``pretrain.checkpoint.save``
(called by the Checkpointer callback), ``pretrain.run.restore`` and ``pretrain.checkpoint.ensure_universal``
(called inside restore on a world-size change) are wrapped with a wall-clock timer. Rank 0 writes
the timings (seconds per call, the step dir of each save) to FILE as JSON. Each call's time is what
the training loop is stalled for on rank 0, barriers included.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench._ckpt_driver")
    ap.add_argument("--out", required=True)
    args, rest = ap.parse_known_args()

    import pretrain.checkpoint as ckpt
    import pretrain.run as run
    from pretrain.cli import main as pretrain_main

    timings: dict[str, list[dict]] = {"save": [], "restore": [], "ensure_universal": []}

    def timed(fn, key):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            result = fn(*a, **kw)
            entry = {"seconds": time.perf_counter() - t0}
            if isinstance(result, Path):
                entry["path"] = str(result)
            timings[key].append(entry)
            return result

        return wrapper

    ckpt.save = timed(ckpt.save, "save")
    ckpt.ensure_universal = timed(ckpt.ensure_universal, "ensure_universal")
    run.restore = timed(ckpt.restore, "restore")
    t0 = time.perf_counter()
    rc = pretrain_main(rest)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps({"timings": timings, "total_seconds": time.perf_counter() - t0}, indent=1))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
