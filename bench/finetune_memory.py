"""Peak host memory per rank of a 2-rank fine-tune of a ZeRO-3 checkpoint: does any rank hold the whole model?

A model of the 350m preset (``--quick``: 125m) at the bench vocab is pretrained for one step with
ZeRO-3 on 2 ranks (a partitioned checkpoint, cached), then fine-tuned for classification on 2 ranks
(``torchrun -m finetune``) in these modes, each stopping after 2 steps (``train.exit_interval``, a
partitioned save and no final export):

- ``from_checkpoint``: ``init_from`` = the ZeRO-3 run; rank 0 first merges it into ``RUN/backbone``
  with ``pretrain.export`` (the "backbone ready" mark), then the partitioned ZeRO-3 build.
- ``partitioned``: ``init_from`` = that merged backbone; ZeRO-3 built partitioned
  (``--zero.partitioned_init=true``; rank 0 reads one tensor at a time and scatters it).
- ``partitioned_frozen``: the same, ``--transfer.freeze_backbone=true`` (head only: no gradients and no
  optimizer states for the backbone, so the model states per rank are its fp32 partition, half the model).
- ``whole_zero3``: ZeRO-3, but every rank builds and loads the whole model before DeepSpeed partitions it.
- ``zero0``: the former default (every rank holds the model, its gradients and Adam's states: 16 B/param).
- ``*_live_limit``: with ``stage3_max_live_parameters`` / ``stage3_max_reuse_distance`` at 1e7 (see LIVE_LIMIT).

Every mode runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then returns freed large tensors to the
system at once; reference/deepspeed-cpu.md). The figure is the largest per-process peak RSS (VmHWM) of
the workers; ``none`` (imports and the process group, no model) is the floor every rank sits on, and
``model_fp32`` the whole task model's fp32 bytes. Expected model states per rank (fp32: 4 B weights,
4 B grads, 8 B Adam per trainable parameter, partitioned by the stage; DeepSpeed's ZeRO-3 keeps a
second fp32 copy of the partition for the optimizer, 2 B/param more at 2 ranks) are in each record's
config, and so is each rank's RSS and peak after every phase (``probe``), which says what set the peak.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
from pathlib import Path

from bench._train_common import (
    REPO,
    SCRATCH,
    VOCAB,
    check,
    ensure_shards,
    free_port,
    load_average,
    log,
    run_tree,
)
from bench.common import CACHE_DIR, bench_command, emit, print_table, record
from lmforge.rundir import latest_file

NAME = "finetune_memory"
WORLD = 2
MB = 2**20
MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}
ZERO3_PART = ["--zero.stage=3", "--zero.partitioned_init=true"]
# DeepSpeed keeps gathered ZeRO-3 parameters alive up to stage3_max_live_parameters (default 1e9) when they are
# used again within stage3_max_reuse_distance (1e9): below a billion parameters that can be the whole model,
# from the second step on (the first one traces the order). These engine settings cap it at 1e7.
LIVE_LIMIT = {"stage3_max_live_parameters": 10_000_000, "stage3_max_reuse_distance": 10_000_000,
              "stage3_prefetch_bucket_size": 10_000_000}
LIVE_LIMIT_JSON = SCRATCH / f"{NAME}-zero3-live-limit.json"
MODES = {  # name → (init_from: the ZeRO-3 run or its merged backbone, extra fine-tune args)
    "from_checkpoint": ("checkpoint", ZERO3_PART),
    "partitioned": ("backbone", ZERO3_PART),
    "partitioned_frozen": ("backbone", [*ZERO3_PART, "--transfer.freeze_backbone=true"]),
    "partitioned_live_limit": ("backbone", [*ZERO3_PART, f"--zero.ds_config={LIVE_LIMIT_JSON}"]),
    "partitioned_frozen_live_limit": ("backbone", [*ZERO3_PART, "--transfer.freeze_backbone=true",
                                                   f"--zero.ds_config={LIVE_LIMIT_JSON}"]),
    "whole_zero3": ("backbone", ["--zero.stage=3", "--zero.partitioned_init=false"]),
    "zero0": ("backbone", ["--zero.stage=0"]),
}


def torchrun(module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
            str(free_port()), "-m", module, *args]


# ---------------------------------------------------------------- inside each rank: where the memory goes
def _status_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process, MB."""
    got = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                got[line.split(":")[0]] = int(line.split()[1]) / 1024
    return got["VmRSS"], got["VmHWM"]


def probe_main(out: str, finetune_args: list[str]) -> int:
    """``python -m bench.finetune_memory probe OUT FINETUNE_ARGS...`` (under torchrun): ``python -m finetune``
    with (RSS, peak RSS) marks after each phase, written to ``OUT.rank<R>`` as JSON at the end."""
    import os

    import finetune.run as fr
    import pretrain.checkpoint as ckpt
    import pretrain.runtime as runtime
    from finetune.cli import main as finetune_main

    marks: list[tuple[str, float, float]] = [("imports", *_status_mb())]

    def after(fn, label):
        def wrapper(*a, **kw):
            result = fn(*a, **kw)
            marks.append((label, *_status_mb()))
            return result
        return wrapper

    def engine_built(*a, **kw):
        engine = fr_build_engine(*a, **kw)
        marks.append(("engine built", *_status_mb()))
        engine.backward = after(engine.backward, "backward")
        engine.step = after(engine.step, "optimizer step")
        return engine

    fr_build_engine = runtime.build_engine
    fr.resolve_backbone = after(fr.resolve_backbone, "backbone ready (rank 0: merged)")
    fr.build_module = after(fr.build_module, "task model built + loaded")
    runtime.build_engine = engine_built  # the shared runtime builds the engine of both stages
    ckpt.save = after(ckpt.save, "checkpoint saved")
    rc = finetune_main(finetune_args)
    marks.append(("end", *_status_mb()))
    Path(f"{out}.rank{os.environ.get('RANK', '0')}").write_text(json.dumps(marks))
    return rc


def pretrained_run(preset: str, shards: Path) -> Path:
    """A one-step ZeRO-3 pretraining run on 2 ranks (its checkpoint is partitioned), made once."""
    run = CACHE_DIR / f"{NAME}-{Path(preset).stem}-zero3"
    if latest_file(run).is_file():
        return run
    shutil.rmtree(run, ignore_errors=True)
    log(NAME, f"pretraining {preset} for 1 step, ZeRO-3 on {WORLD} ranks → {run} (once)")
    r = run_tree(torchrun("pretrain", [preset, f"--run_dir={run}", f"--data.shards=[{shards}]",
                                       f"--model.vocab_size={VOCAB}", "--data.seq_len=64", "--train.max_steps=1",
                                       "--train.micro_batch_size=1", "--train.global_batch_size=2", "--train.eval_every=0", "--train.eval_samples=2",
                                       "--optim.warmup_steps=0", "--zero.stage=3", "--precision=fp32",
                                       "--metrics.tensorboard=false"]))
    check(NAME, "pretraining", r)
    return run


def task_data(path: Path, n: int = 64) -> Path:
    """Seeded two-class texts (the words do not matter: only memory is measured)."""
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    rows = ["text,label"] + [f"{' '.join(rng.choices(words, k=12))},{rng.choice(['good', 'bad'])}" for _ in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def finetune(mode: str, init_from: Path, train: Path) -> tuple[dict, dict]:
    """(run_tree's measurement, the banner's parameter counts) of one 2-step fine-tune in ``mode``."""
    _, extra = MODES[mode]
    run_dir = SCRATCH / f"{NAME}-{mode}"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["configs/finetune/classify.yaml", f"--run_dir={run_dir}", f"--init_from={init_from}",
            f"--data.train={train}", "--precision=fp32", "--task.max_seq_len=64", "--train.micro_batch_size=2",
            "--train.max_steps=4", "--train.exit_interval=2", "--metrics.tensorboard=false", *extra]
    log(NAME, f"{mode}: fine-tune on {WORLD} ranks from {init_from.name} (load {load_average()})")
    probe = SCRATCH / f"{NAME}-{mode}-marks"
    r = run_tree(torchrun(f"bench.{NAME}", ["probe", str(probe), *args]), env=MMAP)
    check(NAME, f"{mode} fine-tune", r)
    r["phases"] = [json.loads(Path(f"{probe}.rank{k}").read_text()) for k in range(WORLD)]
    m = re.search(r"\(([\d,]+) params, ([\d,]+) trainable\).*?(ZeRO-\d[^,]*)", r["output"])
    if m is None:
        raise SystemExit(f"[bench.{NAME}] {mode}: no 'fine-tune ...' banner in the output:\n{r['output'][-3000:]}")
    counts = {"n_params": int(m.group(1).replace(",", "")), "n_trainable": int(m.group(2).replace(",", "")),
              "stage": m.group(3), "command": " ".join(["MALLOC_MMAP_THRESHOLD_=65536 torchrun --nproc_per_node",
                                                        str(WORLD), "-m finetune", *args])}
    if mode == "from_checkpoint":  # keep its merged backbone for the other modes
        shutil.rmtree(SCRATCH / f"{NAME}-backbone", ignore_errors=True)
        shutil.move(run_dir / "backbone", SCRATCH / f"{NAME}-backbone")
    shutil.rmtree(run_dir, ignore_errors=True)  # a 350m ZeRO-3 checkpoint: several GB
    return r, counts


def phase_summary(marks: list[list]) -> dict:
    """One rank's marks → {phases: [(label, rss, peak so far)], peak_set_by: the phase its peak RSS happened in}."""
    final = marks[-1][2]
    first = next(label for label, _, hwm in marks if hwm >= final)
    phases = []
    for label, rss, hwm in marks:  # repeated steps: the first two of each label are enough
        if sum(1 for x in phases if x[0] == label) < 2:
            phases.append((label, round(rss), round(hwm)))
    return {"phases_rss_peak_mb": phases, "peak_set_by": first}


def expected_states_mb(counts: dict, stage: int) -> float:
    from finetune.estimate import TaskSize, model_states

    size = TaskSize(counts["n_params"], counts["n_trainable"])
    return model_states(size, WORLD, stage, "fp32")["total"] / MB


def measure(preset: str, modes: list[str]) -> dict[str, tuple[dict, dict]]:
    shards = ensure_shards(NAME)
    run = pretrained_run(preset, shards)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    conf = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    conf["zero_optimization"].update(LIVE_LIMIT)
    LIVE_LIMIT_JSON.write_text(json.dumps(conf, indent=1))
    if "from_checkpoint" not in modes and not (SCRATCH / f"{NAME}-backbone" / "config.json").is_file():
        modes = ["from_checkpoint", *modes]  # it merges the backbone the other modes start from
    train = task_data(SCRATCH / f"{NAME}-train.csv")
    log(NAME, f"none: imports + process group on {WORLD} processes")
    floor = run_tree(torchrun("bench._init_driver", [preset, "none"]), env=MMAP)
    check(NAME, "imports-only run", floor)
    results = {"none": (floor, {})}
    for mode in modes:
        source = MODES[mode][0]
        init_from = run if source == "checkpoint" else SCRATCH / f"{NAME}-backbone"
        results[mode] = finetune(mode, init_from, train)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["probe"]:
        return probe_main(argv[1], argv[2:])
    ap = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: the 125m preset instead of 350m")
    ap.add_argument("--preset", default=None, help="configs/pretrain/<preset>.yaml (default 350m; --quick 125m)")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="fine-tune modes to run")
    a = ap.parse_args(argv)
    preset = f"configs/pretrain/{a.preset or ('125m' if a.quick else '350m')}.yaml"
    results = measure(preset, a.modes)
    floor_r = results["none"][0]
    counts = next(c for r, c in results.values() if c)
    model_mb = 4 * counts["n_params"] / MB
    common = {"preset": preset, "vocab_size": VOCAB, "world_size": WORLD, "precision": "fp32", "task": "classify"}
    floor = record(f"{NAME}.peak_rss_per_rank.none", "peak_rss", floor_r["peak_rss_mb_per_proc"], "MB",
                   config={**common, "what": "imports + process group, no model",
                           "per_process_peaks_mb": floor_r["peak_rss_mb_procs"]})
    model = record(f"{NAME}.model_fp32", "bytes", model_mb, "MB",
                   config={**common, "n_params": counts["n_params"], "what": "the whole task model's fp32 weights"})
    recs = [floor, model]
    for mode in [m for m in MODES if m in results]:
        r, c = results[mode]
        stage = int(c["stage"][5])
        peak = r["peak_rss_mb_per_proc"]
        cfg = {**common, "n_params": c["n_params"], "n_trainable": c["n_trainable"], "banner_stage": c["stage"],
               "per_process_peaks_mb": r["peak_rss_mb_procs"], "above_floor_mb": round(peak - floor["value"], 1),
               "expected_model_states_mb": round(expected_states_mb(c, stage), 1),
               "below_model_fp32": peak < model_mb, "above_floor_below_model_fp32": peak - floor["value"] < model_mb,
               "seconds": round(r["seconds"], 1), "command": c["command"],
               "ranks": [phase_summary(m) for m in r["phases"]],
               "what": "largest per-process peak RSS (VmHWM) of the 2 workers; the ratio is vs the whole model's fp32 bytes"}
        recs.append(record(f"{NAME}.peak_rss_per_rank.{mode}", "peak_rss", peak, "MB", model, config=cfg))
    emit(recs, NAME + ("-quick" if a.quick else ""), command=bench_command(NAME, argv))
    print_table(recs)
    print(json.dumps({rec["name"].split(".")[-1]: {"peak_mb": round(rec["value"], 1), **{
        k: rec["config"][k] for k in ("above_floor_mb", "expected_model_states_mb", "ranks")
        if k in rec["config"]}} for rec in recs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
