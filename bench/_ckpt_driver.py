"""``python -m pretrain`` with stopwatches on checkpoint save, restore and universal conversion.

``torchrun --nproc_per_node N -m bench._ckpt_driver --out FILE CONFIG [--section.key=value ...]``

Runs exactly what ``python -m pretrain`` runs (``pretrain.cli.main``); only ``pretrain.checkpoint.save``
(called by the Checkpointer callback), ``pretrain.run.restore`` and ``pretrain.checkpoint.ensure_universal``
(called inside restore on a world-size change) are wrapped with a wall-clock timer. Rank 0 writes
the timings (seconds per call, the step dir of each save) to FILE as JSON. Each call's time is what
the training loop is stalled for on rank 0, barriers included. Every rank also counts its
``torch.save`` calls (seconds, bytes, files: serialization into the page cache, before any fsync)
into ``FILE.rank<R>``.

For the stall of background saves (``checkpoint.async_save``) it also times each
``pretrain.checkpoint.start_background_save`` (the snapshot: what training waits for) and each
``Checkpointer.finish`` (waiting for a write in flight, then the commit), and rank 0 records the wall time
at the end of every step (after the checkpointer's work of that step) and after the checkpointer's
``on_train_end`` (the last write committed), with ``trainer.timings`` then.
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

    timings: dict[str, list[dict]] = {"save": [], "restore": [], "ensure_universal": [], "background_save": [],
                                      "finish": []}

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

    import torch

    writes = {"seconds": 0.0, "bytes": 0, "files": 0}
    torch_save = torch.save

    def counted_save(obj, f, *a, **kw):  # DeepSpeed's checkpoint engine and our RNG files both use torch.save
        t = time.perf_counter()
        torch_save(obj, f, *a, **kw)
        writes["seconds"] += time.perf_counter() - t
        writes["files"] += 1
        if isinstance(f, str | os.PathLike) and os.path.exists(f):
            writes["bytes"] += os.path.getsize(f)

    torch.save = counted_save
    ckpt.save = timed(ckpt.save, "save")
    ckpt.start_background_save = timed(ckpt.start_background_save, "background_save")
    steps: list[dict] = []
    end: dict = {}
    checkpointer = ckpt.Checkpointer
    step_end, train_end, finish = checkpointer.on_step_end, checkpointer.on_train_end, checkpointer.finish

    def on_step_end(self, trainer, metrics):
        step_end(self, trainer, metrics)
        steps.append({"step": trainer.state.step, "t": time.perf_counter()})

    def on_train_end(self, trainer):
        train_end(self, trainer)
        end.update(t=time.perf_counter(), timings=dict(trainer.timings))

    def timed_finish(self, trainer):
        if self.pending is None:
            return finish(self, trainer)
        t = time.perf_counter()
        finish(self, trainer)
        timings["finish"].append({"seconds": time.perf_counter() - t})

    checkpointer.on_step_end, checkpointer.on_train_end, checkpointer.finish = on_step_end, on_train_end, timed_finish
    ckpt.ensure_universal = timed(ckpt.ensure_universal, "ensure_universal")
    run.restore = timed(ckpt.restore, "restore")
    t0 = time.perf_counter()
    rc = pretrain_main(rest)
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{args.out}.rank{rank}").write_text(json.dumps({"torch_save": writes}))
    if rank == 0:
        Path(args.out).write_text(json.dumps({"timings": timings, "total_seconds": time.perf_counter() - t0,
                                              "steps": steps, "train_end": end}, indent=1))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
