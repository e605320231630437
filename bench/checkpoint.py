"""Checkpoint speed: save and load of a sharded ZeRO-2 checkpoint against raw disk writes, resume on
another world size, export.

``python -m bench.checkpoint [--quick]`` — in one run, on the 125m preset's shape (d 768, 12 layers,
FFN 2560, tied) with the shards' 8192 vocab: 105.4M params, fp32, seq_len 128, micro batch 4, 2 ranks:

1. **save**: ``torchrun -m bench._ckpt_driver`` (``python -m pretrain`` with timers around
   ``pretrain.checkpoint.save``) trains 2 steps with ``--checkpoint.interval_steps=1``: seconds per
   save (every rank writes its partition, fsync, barriers, trainer_state, ``latest``) and MB/s =
   bytes of the step directory / seconds (the faster of the two saves is the figure);
2. **limit**: the same number of bytes written by one process in 16 MiB blocks + fsync, in the same
   folder (dd-like), into fresh page-cache pages like the saves → ratio save / limit (goal >= 0.5);
   diagnostics: one writer per rank writing that rank's bytes in parallel, and one writer reusing
   just-freed page-cache pages ("warm", much faster on this VM), each with the ratio of the save to it;
3. **load**: a resume run on 2 ranks: seconds of ``pretrain.run.restore`` (DeepSpeed load of weights
   and optimizer, trainer state, RNG); the files were just written, so reads likely hit the page cache;
4. **world-size change**: resume the same checkpoint on 1 rank: seconds of restore (of which
   ``ds_to_universal``, run once and cached) and peak RSS per process (max over the rank and the
   converter's processes);
5. **export**: ``python -m pretrain.export RUN --out DIR``: wall seconds and peak RSS;
6. **stall**: the training stall per save, synchronous against asynchronous (``checkpoint.async_save``),
   on the same model and 2 ranks: 12 steps saving every 3 (4 saves), once with each, and once without
   saving, in turn (``--stall-repeats`` rounds, 3). Figures per mode: what
   training waited per save as lmforge counts it (``timings["checkpoint_save"]``: the whole save, or the
   snapshot plus any wait for a write in flight and the commit), and the cost per save on the wall clock
   (steps 2-12 and the last commit, minus the same without saves, / 4): it also holds what the background
   writer takes from the training (on this 2-core VM both ranks' writers share the cores with the ranks),
   and any other load on the machine; so a third, the CPU seconds a save adds (all processes, least of the
   rounds), which other load disturbs much less.

Scratch runs live in bench/results/cache/scratch/checkpoint (~4 GB while it runs, deleted at the end
unless --keep). ``--quick``: the small preset's shape (24M), seq 64, micro 2. ``--only-stall``: section 6
only (the other records of the last run of the mode are kept).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench._train_common import SCRATCH, check, ensure_shards, load_average, log, run_tree, torchrun
from bench.common import RESULTS_DIR, bench_command, emit, print_table, record
from lmforge.rundir import checkpoint_dir, checkpoints_dir

NAME = "checkpoint"
MB = 1 << 20
GOAL_VS_DISK = 0.5


def model_args(quick: bool) -> list[str]:
    if quick:
        return ["configs/pretrain/small.yaml", "--data.seq_len=64", "--train.micro_batch_size=2"]
    return ["configs/pretrain/125m.yaml", "--model.vocab_size=null", "--data.seq_len=128", "--model.max_seq_len=128",
            "--train.micro_batch_size=4"]


def train_args(run_dir: Path, shards: Path, quick: bool, steps: int, extra: list[str] = ()) -> list[str]:
    micro = 2 if quick else 4
    return [*model_args(quick), f"--run_dir={run_dir}", f"--data.shards=[{shards}]", "--precision=fp32",
            "--zero.stage=2", f"--train.global_batch_size={2 * micro}", f"--train.max_steps={steps}",
            "--train.log_every=1", "--train.eval_every=0", "--train.eval_samples=8", "--train.progress=false",
            "--checkpoint.save_final=false", "--checkpoint.keep_last=5", *extra]


def dir_bytes(d: Path) -> tuple[int, int]:
    files = [f for f in d.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), len(files)


def raw_write(path: Path, nbytes: int, block: int = 16 * MB, start=None) -> float:
    """Seconds to write ``nbytes`` to a new file in ``block``-sized writes, then fsync (dd-like)."""
    buf = os.urandom(block)
    if start is not None:
        start.wait()
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(buf[: min(block, left)])
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def parallel_write(folder: Path, sizes: list[int]) -> float:
    """Seconds for one forked process per entry of ``sizes`` to write (+ fsync) that many bytes at once."""
    ctx = mp.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=raw_write, args=(folder / f"_par_probe{i}.bin", n, 16 * MB, start))
             for i, n in enumerate(sizes)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # every writer has its buffer ready
    t0 = time.perf_counter()
    start.set()
    for p in procs:
        p.join()
    return time.perf_counter() - t0


def raw_writes(folder: Path, nbytes: int, rank_sizes: list[int]) -> dict[str, list[float]]:
    """Two probes into fresh page-cache pages (the first kept while the second is written, as our
    checkpoints are), one with a writer per rank writing that rank's bytes in parallel (fresh pages
    too), then, after deleting them, one that reuses the freed pages ("warm").

    On this VM the page-cache pages a write allocates cost far more the first time (measured ~300 MB/s
    for fresh pages vs ~1.3 GB/s for just-freed ones, fsync included): the disk is not the limit.
    """
    probes = [folder / f"_raw_write_probe{i}.bin" for i in range(2)]
    fresh = [raw_write(p, nbytes) for p in probes]
    par = parallel_write(folder, rank_sizes)
    for p in [*probes, *folder.glob("_par_probe*.bin")]:
        p.unlink()
    warm = raw_write(probes[0], nbytes)
    probes[0].unlink()
    return {"fresh": fresh, "parallel": [par], "warm": [warm]}


def driver(nproc: int, out: Path, args: list[str], whole: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run, rank 0's timings); ``whole``: everything rank 0 recorded (timings, steps, train_end)."""
    out.unlink(missing_ok=True)
    r = run_tree(torchrun(nproc, "bench._ckpt_driver", ["--out", str(out), *args]))
    check(NAME, f"{nproc}-rank driver run", r)
    data = json.loads(out.read_text())
    return r, data if whole else data["timings"]


def params_of(args: list[str]) -> int:
    from pretrain.cli import parse_args
    from pretrain.model import build_model, count_params
    from pretrain.objective import shard_tokenizer

    cfg, _, _ = parse_args(args)
    return count_params(build_model(cfg.model, shard_tokenizer(cfg.data.shards, cfg.model.vocab_size).vocab_size, device="meta"))


STALL_STEPS, STALL_EVERY = 12, 3
STALL_MODES = {
    "none": ["--checkpoint.interval_steps=0"],
    "sync": [f"--checkpoint.interval_steps={STALL_EVERY}", "--checkpoint.async_save=false"],
    "async": [f"--checkpoint.interval_steps={STALL_EVERY}", "--checkpoint.async_save=true"],
}


def stall_runs(shards: Path, scratch: Path, quick: bool, repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Section 6: per mode (no saves, sync, async) ``repeats`` 2-rank runs, the modes in turn."""
    rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in STALL_MODES}
    for rnd in range(repeats):
        for mode, extra in STALL_MODES.items():
            rd = scratch / f"stall_{mode}"
            shutil.rmtree(rd, ignore_errors=True)
            args = train_args(rd, shards, quick, STALL_STEPS, extra)
            r, data = driver(2, scratch / f"stall_{mode}.json", args, whole=True)
            t, steps = data["timings"], {s["step"]: s["t"] for s in data["steps"]}
            timings = data["train_end"]["timings"]
            saves = len(t["save"]) + len(t["background_save"])
            run = {"wall": data["train_end"]["t"] - steps[1], "saves": saves,
                   "stall": timings.get("checkpoint_save", 0.0), "write": timings.get("checkpoint_write_background", 0.0),
                   "save_calls": [round(x["seconds"], 3) for x in t["save"]],
                   "snapshots": [round(x["seconds"], 3) for x in t["background_save"]],
                   "commits": [round(x["seconds"], 3) for x in t["finish"]],
                   "step_seconds": [round(steps[i] - steps[i - 1], 3) for i in range(2, STALL_STEPS + 1)],
                   "run_wall_seconds": round(r["seconds"], 1), "cpu": r["cpu_seconds"], "round": rnd,
                   "command": "torchrun --nproc_per_node 2 -m bench._ckpt_driver --out FILE " + " ".join(args)}
            log(NAME, f"stall round {rnd} {mode}: {run['wall']:.2f} s for steps 2-{STALL_STEPS}, "
                      f"{saves} saves, stall {run['stall']:.2f} s, background writes {run['write']:.2f} s")
            rounds[mode].append(run)
            shutil.rmtree(rd, ignore_errors=True)
    return rounds


def stall_records(rounds: dict[str, list[dict[str, Any]]], common: dict[str, Any]) -> list[dict[str, Any]]:
    """Records of section 6: the stall per save (median of the rounds), the wall cost per save (fastest rounds),
    the CPU cost per save (least of the rounds)."""
    best = {mode: min(runs, key=lambda r: r["wall"]) for mode, runs in rounds.items()}
    none, none_cpu = best["none"]["wall"], min(r["cpu"] for r in rounds["none"])
    whats = {
        "stall": "seconds training waited per save, as lmforge counts it (timings['checkpoint_save'] / saves, median of "
                 "the rounds; async: the snapshot to host memory, any wait for the write in flight, the commits, the "
                 "last write's at the end included)",
        "save_cost": "wall seconds per save: (steps 2-12 and the last commit, with saves) - (the same without saves), "
                     "/ saves, fastest runs; includes what the background writer takes from the training, and other "
                     "load on the machine (see load_avg)",
        "cpu_cost": "CPU seconds per save, all processes of the run: (with saves) - (without), / saves, least of the "
                    "rounds; the work a save adds wherever it runs (2 ranks on 2 cores: the writers share them)",
    }
    recs: list[dict[str, Any]] = []
    for kind in ("stall", "save_cost", "cpu_cost"):
        base = None
        for mode in ("sync", "async"):
            run = best[mode]
            n = max(1, run["saves"])
            value = {"stall": statistics.median(r["stall"] for r in rounds[mode]) / n, "save_cost": (run["wall"] - none) / n,
                     "cpu_cost": (min(r["cpu"] for r in rounds[mode]) - none_cpu) / n}[kind]
            rec = record(f"{NAME}.{kind}.{mode}", "seconds_per_save", value, "s", base, config={
                **common, "what": whats[kind], "mode": mode, "saves": run["saves"], "every_steps": STALL_EVERY,
                "steps": STALL_STEPS, "wall_with_saves_s": round(run["wall"], 3), "wall_without_saves_s": round(none, 3),
                "cpu_s_per_round": [round(r["cpu"], 1) for r in rounds[mode]],
                "cpu_s_per_round_without_saves": [round(r["cpu"], 1) for r in rounds["none"]],
                "stall_s_per_round": [round(r["stall"], 3) for r in rounds[mode]],
                "wall_s_per_round": [round(r["wall"], 2) for r in rounds[mode]],
                "wall_s_per_round_without_saves": [round(r["wall"], 2) for r in rounds["none"]],
                "background_write_s_per_save": round(run["write"] / n, 3) if mode == "async" else None,
                "save_calls_s": run["save_calls"], "snapshots_s": run["snapshots"], "commits_s": run["commits"],
                "step_seconds": run["step_seconds"], "step_seconds_without_saves": best["none"]["step_seconds"],
                "command": run["command"]})
            if mode == "async":
                rec["config"]["goal"] = "< sync"
                rec["config"]["meets_goal"] = base is not None and value < base["value"]
            recs.append(rec)
            base = rec
    return recs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 24M model, seq 64")
    ap.add_argument("--keep", action="store_true", help="keep the scratch run dir and export")
    ap.add_argument("--only-stall", action="store_true",
                    help="section 6 only (training stall per save, sync vs async); the other records are kept")
    ap.add_argument("--stall-repeats", type=int, default=3, help="rounds of the three stall runs")
    a = ap.parse_args(argv)
    shards = ensure_shards(NAME)
    scratch = SCRATCH / NAME
    run_dir, export_dir = scratch / "run", scratch / "export"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    n_params = params_of(train_args(run_dir, shards, a.quick, 2))
    stall_common = {"n_params": n_params, "world_size": 2, "zero_stage": 2, "precision": "fp32",
                    "model": " ".join(model_args(a.quick))}
    if a.only_stall:
        log(NAME, f"{n_params / 1e6:.1f}M params; load average {load_average()} (2 cores); stall runs only")
        last = RESULTS_DIR / f"{NAME}{'-quick' if a.quick else ''}.json"
        kept = json.loads(last.read_text()) if last.is_file() else []
        recs = [r for r in kept if not r["name"].startswith(tuple(f"{NAME}.{k}." for k in ("stall", "save_cost",
                                                                                           "cpu_cost")))]
        recs += stall_records(stall_runs(shards, scratch, a.quick, a.stall_repeats),
                              {**stall_common, "load_avg": load_average()})
        emit(recs, NAME + ("-quick" if a.quick else ""), command=bench_command(NAME, argv))
        print_table(recs)
        if not a.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        return 0
    loads = {"start": load_average()}
    log(NAME, f"{n_params / 1e6:.1f}M params; load average {loads['start']} (2 cores)")
    show = " ".join  # the exact commands, for the records

    # 1. train 2 steps, checkpoint after each
    save_args = train_args(run_dir, shards, a.quick, 2, ["--checkpoint.interval_steps=1"])
    r_train, t_train = driver(2, scratch / "save.json", save_args)
    saves = []
    for s in t_train["save"]:
        nbytes, nfiles = dir_bytes(Path(s["path"]))
        saves.append({"seconds": s["seconds"], "bytes": nbytes, "files": nfiles, "step_dir": Path(s["path"]).name})
    best = min(saves, key=lambda s: s["seconds"] / s["bytes"])
    log(NAME, f"saves: {[round(s['seconds'], 2) for s in saves]} s for {best['bytes'] / MB:,.0f} MB")

    # 2. the same bytes, raw, same folder
    per_rank = [json.loads(f.read_text())["torch_save"] for f in sorted(scratch.glob("save.json.rank*"))]
    rank_sizes = [w["bytes"] // len(saves) for w in per_rank]  # what each rank writes per save
    raw = raw_writes(checkpoints_dir(run_dir), best["bytes"], rank_sizes)
    loads["after_save"] = load_average()

    # 3. resume on the same world size, one more step
    load_args = train_args(run_dir, shards, a.quick, 3)
    r_load, t_load = driver(2, scratch / "load.json", load_args)
    loads["after_load"] = load_average()

    # 4. resume the same checkpoint on 1 rank (global batch kept: accumulation 2)
    latest = checkpoint_dir(run_dir, saves[-1]["step_dir"])
    uni_args = train_args(scratch / "run1", shards, a.quick, 3, [f"--resume={latest}"])
    r_uni, t_uni = driver(1, scratch / "universal.json", uni_args)
    loads["after_universal"] = load_average()

    # 5. export
    exp_cmd = ["-m", "pretrain.export", str(run_dir), "--out", str(export_dir)]
    r_exp = run_tree([sys.executable, *exp_cmd])
    check(NAME, "export", r_exp)
    exp_bytes, exp_files = dir_bytes(export_dir)
    loads["end"] = load_average()

    common = {"n_params": n_params, "world_size": 2, "zero_stage": 2, "precision": "fp32",
              "model": " ".join(model_args(a.quick)), "load_avg": loads}
    save_mbps = best["bytes"] / MB / best["seconds"]
    disk = record(f"{NAME}.limit.disk_write", "write_mb_per_s", best["bytes"] / MB / min(raw["fresh"]), "MB/s", config={
        "what": "one process writes the checkpoint's byte count in 16 MiB blocks to a new file in the same folder, "
                "then fsync; best of 2, the first kept while the second is written (fresh page-cache pages, like "
                "the checkpoints, which are all kept)", "bytes": best["bytes"],
        "seconds": [round(x, 3) for x in raw["fresh"]]})
    warm = record(f"{NAME}.limit.disk_write_warm", "write_mb_per_s", best["bytes"] / MB / raw["warm"][0], "MB/s",
                  config={"what": "the same write after deleting the probes: it reuses just-freed page-cache pages "
                                  "(on this VM a first touch of memory is what costs, not the disk)",
                          "seconds": round(raw["warm"][0], 3)})
    r = record(f"{NAME}.save.zero2", "save_mb_per_s", save_mbps, "MB/s", disk, config={
        **common, "what": "bytes of the step dir / seconds of pretrain.checkpoint.save on rank 0 (all ranks write "
                          "their ZeRO partitions, fsync, barriers, trainer_state.json, latest); faster of 2 saves",
        "saves": [{**s, "seconds": round(s["seconds"], 3)} for s in saves], "goal": f">= {GOAL_VS_DISK} x disk",
        "command": "torchrun --nproc_per_node 2 -m bench._ckpt_driver --out FILE " + show(save_args)})
    r["config"]["meets_goal"] = r["ratio"] is not None and r["ratio"] >= GOAL_VS_DISK
    r["config"]["torch_save_per_rank"] = [
        {"seconds": round(w["seconds"], 3), "mb": round(w["bytes"] / MB, 1), "files": w["files"],
         "mb_per_s": round(w["bytes"] / MB / max(w["seconds"], 1e-9), 1)} for w in per_rank]
    r["config"]["torch_save_note"] = "per rank, both saves together: serialization into the page cache, no fsync"
    par = record(f"{NAME}.limit.disk_write_parallel", "write_mb_per_s", sum(rank_sizes) / MB / raw["parallel"][0],
                 "MB/s", config={"what": "one forked writer per rank, each writing that rank's bytes of one save "
                                         "(+ fsync) at the same time, into fresh pages", "bytes_per_writer": rank_sizes,
                                 "seconds": round(raw["parallel"][0], 3)})
    recs = [disk, par, warm, r, record(f"{NAME}.save_vs_parallel_disk.zero2", "save_mb_per_s", save_mbps, "MB/s", par,
                         config={"what": f"same figure as {NAME}.save.zero2, compared with the parallel writers"})]
    r2 = record(f"{NAME}.save_vs_warm_disk.zero2", "save_mb_per_s", save_mbps, "MB/s", warm,
                config={"what": f"same figure as {NAME}.save.zero2, compared with the warm-page write"})
    recs.append(r2)
    recs.append(record(f"{NAME}.save_time.zero2", "seconds", best["seconds"], "s", config={
        "bytes": best["bytes"], "files": best["files"], "step_dir": best["step_dir"]}))
    ld = t_load["restore"][0]["seconds"]
    recs.append(record(f"{NAME}.load_time.zero2", "seconds", ld, "s", config={
        **common, "what": "seconds of pretrain.run.restore on rank 0 when resuming on 2 ranks (DeepSpeed "
                          "load_checkpoint of weights + optimizer partitions, trainer state, RNG); page cache warm",
        "bytes": best["bytes"], "mb_per_s": round(best["bytes"] / MB / ld, 1),
        "resume_run_wall_seconds": round(r_load["seconds"], 1),
        "command": "torchrun --nproc_per_node 2 -m bench._ckpt_driver --out FILE " + show(load_args)}))
    conv = t_uni["ensure_universal"][0]["seconds"] if t_uni["ensure_universal"] else None
    uni_common = {**common, "world_size": "2 -> 1", "conversion_seconds (ds_to_universal)": conv and round(conv, 2),
                  "command": "torchrun --nproc_per_node 1 -m bench._ckpt_driver --out FILE " + show(uni_args)}
    recs.append(record(f"{NAME}.resume_2to1.time", "seconds", t_uni["restore"][0]["seconds"], "s", config={
        **uni_common, "what": "seconds of pretrain.run.restore on 1 rank: ds_to_universal (subprocess) + universal load",
        "resume_run_wall_seconds": round(r_uni["seconds"], 1)}))
    recs.append(record(f"{NAME}.resume_2to1.peak_rss", "peak_rss", r_uni["peak_rss_mb_per_proc"], "MB", config={
        **uni_common, "what": "largest per-process peak RSS (VmHWM) of the 1-rank run's processes, converter included",
        "per_process_peaks_mb": r_uni["peak_rss_mb_procs"], "tree_peak_mb": round(r_uni["peak_rss_mb_tree"], 1)}))
    exp_common = {**common, "export_bytes": exp_bytes, "export_files": exp_files,
                  "command": "python " + show(exp_cmd)}
    recs.append(record(f"{NAME}.export.time", "seconds", r_exp["seconds"], "s", config={
        **exp_common, "what": "wall seconds of the export process (start-up, zero_to_fp32 merge, save_pretrained)",
        "cpu_seconds": round(r_exp["cpu_seconds"], 1)}))
    recs.append(record(f"{NAME}.export.peak_rss", "peak_rss", r_exp["peak_rss_mb_per_proc"], "MB", config={
        **exp_common, "what": "peak RSS (VmHWM) of the export process"}))
    recs.append(record(f"{NAME}.train_run.peak_rss_per_rank", "peak_rss", r_train["peak_rss_mb_per_proc"], "MB",
                       config={**common, "what": "the 2-step saving run: max over the 2 ranks of each one's peak RSS",
                               "per_process_peaks_mb": r_train["peak_rss_mb_procs"]}))

    # 6. the training stall per save, sync vs async
    recs += stall_records(stall_runs(shards, scratch, a.quick, a.stall_repeats), {**stall_common, "load_avg": loads})
    emit(recs, NAME + ("-quick" if a.quick else ""), command=bench_command(NAME, argv))
    print_table(recs)
    if not a.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
