"""Training throughput of ``python -m pretrain`` against a peer and a limit, plus memory per ZeRO stage.

``python -m bench.train_throughput [--quick] [--steps N] [--repeats R]`` — in one run, the ``small``
preset (configs/pretrain/small.yaml, 24M params at vocab 8192) on the same shards, micro batch,
seq_len and precision, 2 processes under torchrun, rounds of all four runs in turn (best round kept):

* **ours**: ``torchrun -m pretrain small.yaml --zero.stage=2 --train.log_every=1 ...``; steady-state
  tokens/s over the steps after the first ``--warmup`` (3), from the wall-clock stamps of the
  per-step TensorBoard events (a whole loop iteration: data, forward/backward/step, callbacks);
  also from the trainer's own ``train/step_time`` (train_step only, callbacks excluded);
* **peer**: Hugging Face ``transformers.Trainer`` with the SAME DeepSpeed JSON
  (``pretrain.engine.ds_config``), the same model and windows (bench/_hf_trainer_peer.py);
  ``TrainingArguments(use_cpu=True, deepspeed=dict)`` is what makes it run on a CPU;
* **limit**: a plain PyTorch loop, DDP over gloo + torch AdamW, no DeepSpeed (bench/_plain_loop.py);
* diagnostic: ours at ZeRO-0 (the DeepSpeed engine without partitioning), same measurement;
* **scaling**: the same training (same global batch, so the same samples per step) on 1 process,
  with 2 micro batches of gradient accumulation: ratio ours on 2 processes / ours on 1;
* ratios ours / limit (goal >= 0.95) and ours / peer (goal >= 1.0); MFU of each against this
  machine's measured 1-thread fp32 matmul FLOP/s per process (``pretrain.callbacks.measured_cpu_flops``);
* peak RSS per rank (max over the 2 training processes) for ZeRO 0/2/3 on a 64.7M-param model
  (the small shape widened to d 640, 12 layers, 10 heads), a few steps each;
* **where the time goes**: a cProfile of rank 0's steady-state steps (bench/_profile_hook.py) of ours at
  ZeRO-2 and at ZeRO-0, summed per component (autograd backward, model forward, gloo collectives, ZeRO
  bucketing, optimizer, DeepSpeed engine, lmforge's own loop): the ZeRO-2 record of each component is
  compared with its ZeRO-0 record, so the report shows what ZeRO-2 adds per step (ZeRO-0 runs as fast as
  the plain loop: it is the limit's own arithmetic in the same engine).

Precision is fp32 everywhere: bf16 matmuls on these CPUs (no AMX/AVX512-BF16) are ~10x slower.
Step-1 losses of the three are recorded: they must agree (same weights, same windows). All scratch
runs live in bench/results/cache/scratch/train_throughput. ``--quick``: seq 128, micro 4, 6 steps, 1 round.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
from pathlib import Path
from typing import Any

from bench._train_common import (
    SCRATCH,
    check,
    ensure_shards,
    load_average,
    log,
    run_tree,
    tb_scalars,
    torchrun,
)
from bench.common import RESULTS_DIR, bench_command, emit, print_table, record

NAME = "train_throughput"
PRESET = "configs/pretrain/small.yaml"
WIDE = ["--model.hidden_size=640", "--model.num_layers=12", "--model.num_heads=10"]  # 64.7M params at vocab 8192
GOAL_VS_LIMIT = 0.95
GOAL_VS_PEER = 1.0
WORLD = 2


def train_args(run_dir: Path, shards: Path, a: argparse.Namespace, steps: int, extra: list[str] = ()) -> list[str]:
    return [PRESET, f"--run_dir={run_dir}", f"--data.shards=[{shards}]", f"--data.seq_len={a.seq_len}",
            f"--train.micro_batch_size={a.micro}", "--precision=fp32", f"--train.max_steps={steps}",
            "--train.log_every=1", "--train.eval_every=0", "--train.eval_samples=16", "--train.progress=false",
            "--checkpoint.save_final=false", *extra]


def steady(stamps: list[tuple[int, float]], warmup: int, tokens_per_step: int) -> tuple[float, int]:
    """tokens/s between the end of step ``warmup`` and the end of the last step; (rate, steps timed)."""
    t = dict(stamps)
    last = max(t)
    if warmup not in t or last <= warmup:
        raise SystemExit(f"[bench.{NAME}] need more than {warmup} steps (have {last})")
    return tokens_per_step * (last - warmup) / (t[last] - t[warmup]), last - warmup


def run_ours(run_dir: Path, args: list[str], warmup: int, tps: int, stage: int = 2,
             world: int = WORLD) -> dict[str, Any]:
    shutil.rmtree(run_dir, ignore_errors=True)
    r = run_tree(torchrun(world, "pretrain", [*args, f"--zero.stage={stage}"]))
    check(NAME, "ours", r)
    wall = [(s, w) for w, s, _ in tb_scalars(run_dir, "train/step_time")]
    st = [(s, v) for _, s, v in tb_scalars(run_dir, "train/step_time") if s > warmup]
    rate, n = steady(wall, warmup, tps)
    loss1 = next(v for _, s, v in tb_scalars(run_dir, "train/loss") if s == 1)
    return {"tokens_per_s": rate, "steps_timed": n, "tokens_per_s_step_time": tps * len(st) / sum(v for _, v in st),
            "mean_step_time_s": statistics.mean(v for _, v in st), "loss_step1": loss1,
            "seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"], "peak_rss_mb_per_rank": r["peak_rss_mb_per_proc"]}


def run_helper(module: str, run_dir: Path, args: list[str], warmup: int, extra: list[str] = ()) -> dict[str, Any]:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    out = run_dir / "result.json"
    r = run_tree(torchrun(WORLD, module, [*extra, "--out", str(out), *args, "--zero.stage=2"]))
    check(NAME, module, r)
    res = json.loads(out.read_text())
    rate, n = steady([tuple(x) for x in res["stamps"]], warmup, res["tokens_per_step"])
    return {"tokens_per_s": rate, "steps_timed": n, "loss_step1": res["losses"].get("1"), "setup": res["setup"],
            "seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"], "peak_rss_mb_per_rank": r["peak_rss_mb_per_proc"]}


def throughput(a: argparse.Namespace, shards: Path, scratch: Path) -> list[dict[str, Any]]:
    import torch

    from pretrain.callbacks import measured_cpu_flops
    from pretrain.cli import parse_args
    from pretrain.engine import EngineSpec, batch_plan, ds_config
    from pretrain.model import flops_per_token
    from pretrain.objective import shard_tokenizer

    base = train_args(scratch / "x", shards, a, a.steps, ["--zero.stage=2"])  # the config the figures are about
    cfg, _, _ = parse_args(base)
    plan = batch_plan(cfg, WORLD)
    vocab = shard_tokenizer(cfg.data.shards, cfg.model.vocab_size).vocab_size
    fpt = flops_per_token(cfg.model, vocab, cfg.data.seq_len)
    n_params = n_params_of(base)
    torch.set_num_threads(1)
    peaks = [measured_cpu_flops()]
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "peer": [], "limit": [], "ours0": [], "ours1": []}
    # 1 process, same global batch as WORLD processes: the same training, accumulating WORLD micro batches
    one_proc = [f"--train.global_batch_size={plan.global_batch}"]
    loads = [load_average()]
    for k in range(a.repeats):
        log(NAME, f"round {k + 1}/{a.repeats}: ours (load {load_average()})")
        runs["ours"].append(run_ours(scratch / "ours", train_args(scratch / "ours", shards, a, a.steps), a.warmup,
                                     plan.tokens_per_step))
        log(NAME, f"  ours {runs['ours'][-1]['tokens_per_s']:,.0f} tok/s; peer: HF Trainer + DeepSpeed")
        runs["peer"].append(run_helper("bench._hf_trainer_peer", scratch / "peer",
                                       train_args(scratch / "peer", shards, a, a.steps), a.warmup, ["--use-cpu"]))
        log(NAME, f"  peer {runs['peer'][-1]['tokens_per_s']:,.0f} tok/s; limit: plain DDP loop")
        runs["limit"].append(run_helper("bench._plain_loop", scratch / "limit",
                                        train_args(scratch / "limit", shards, a, a.steps), a.warmup))
        log(NAME, f"  limit {runs['limit'][-1]['tokens_per_s']:,.0f} tok/s; ours at ZeRO-0 (diagnostic)")
        runs["ours0"].append(run_ours(scratch / "ours0", train_args(scratch / "ours0", shards, a, a.steps), a.warmup,
                                      plan.tokens_per_step, stage=0))
        log(NAME, f"  ours ZeRO-0 {runs['ours0'][-1]['tokens_per_s']:,.0f} tok/s; scaling: ours on 1 process")
        runs["ours1"].append(run_ours(scratch / "ours1", train_args(scratch / "ours1", shards, a, a.steps, one_proc),
                                      a.warmup, plan.tokens_per_step, world=1))
        log(NAME, f"  ours on 1 process {runs['ours1'][-1]['tokens_per_s']:,.0f} tok/s")
        loads.append(load_average())
    peaks.append(measured_cpu_flops())
    peak = max(peaks)
    best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in runs.items()}

    def mfu(tps: float) -> float:
        return fpt * tps / (peak * WORLD)

    common = {
        "preset": PRESET, "n_params": n_params, "world_size": WORLD, "precision": "fp32 (bf16 is ~10x slower on this CPU)",
        "seq_len": cfg.data.seq_len, "micro_batch_per_rank": plan.micro_batch_per_rank,
        "tokens_per_step": plan.tokens_per_step, "steps": a.steps, "warmup_steps_skipped": a.warmup,
        "rounds": a.repeats, "figure": "best round", "threads_per_process": 1, "load_avg_1_5_15_per_round": loads,
        "ds_config": ds_config(EngineSpec.of(cfg), plan),
    }
    cmd_ours = "torchrun --nproc_per_node 2 -m pretrain " + " ".join(train_args(Path("RUN"), shards, a, a.steps)) \
        + " --zero.stage=2"

    def cfg_of(key: str, what: str, cmd: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        b = best[key]
        return {**common, "what": what, "command": cmd, "mfu": round(mfu(b["tokens_per_s"]), 4),
                "all_rounds_tokens_per_s": [round(r["tokens_per_s"], 1) for r in runs[key]],
                "loss_step1": b["loss_step1"], "wall_seconds": round(b["seconds"], 1),
                "cpu_seconds": round(b["cpu_seconds"], 1), "peak_rss_mb_per_rank": round(b["peak_rss_mb_per_rank"], 1),
                **(extra or {})}

    helper = " ".join(train_args(Path("RUN"), shards, a, a.steps)) + " --zero.stage=2"
    lim = record(f"{NAME}.limit.plain_ddp", "tokens_per_s", best["limit"]["tokens_per_s"], "tokens/s", config=cfg_of(
        "limit", "plain PyTorch loop: DDP (gloo) + torch AdamW + clip + LR schedule, no DeepSpeed",
        f"torchrun --nproc_per_node 2 -m bench._plain_loop --out FILE {helper}"))
    peer = record(f"{NAME}.peer.hf_trainer", "tokens_per_s", best["peer"]["tokens_per_s"], "tokens/s", config=cfg_of(
        "peer", "transformers.Trainer, same DeepSpeed JSON, TrainingArguments(use_cpu=True, logging_steps=1)",
        f"torchrun --nproc_per_node 2 -m bench._hf_trainer_peer --use-cpu --out FILE {helper}",
        {"hf_setup": {k: v for k, v in best["peer"]["setup"].items() if k != "ds_config_as_passed"}}))
    ours_cfg = cfg_of("ours", "lmforge pretrain, ZeRO-2; wall clock between per-step TensorBoard events", cmd_ours, {
        "tokens_per_s_from_step_time": round(best["ours"]["tokens_per_s_step_time"], 1),
        "mean_step_time_s": round(best["ours"]["mean_step_time_s"], 3)})
    recs = [lim, peer]
    r = record(f"{NAME}.ours.zero2", "tokens_per_s", best["ours"]["tokens_per_s"], "tokens/s", lim,
               config={**ours_cfg, "goal": f">= {GOAL_VS_LIMIT} x limit"})
    r["config"]["meets_goal"] = r["ratio"] is not None and r["ratio"] >= GOAL_VS_LIMIT
    recs.append(r)
    r = record(f"{NAME}.ours_vs_peer.zero2", "tokens_per_s", best["ours"]["tokens_per_s"], "tokens/s", peer,
               config={"what": f"same figure as {NAME}.ours.zero2, compared with the peer",
                       "goal": f">= {GOAL_VS_PEER} x peer"})
    r["config"]["meets_goal"] = r["ratio"] is not None and r["ratio"] >= GOAL_VS_PEER
    recs.append(r)
    recs.append(record(f"{NAME}.ours.zero0", "tokens_per_s", best["ours0"]["tokens_per_s"], "tokens/s", lim,
                       config=cfg_of("ours0", "diagnostic: lmforge pretrain at ZeRO-0 (DeepSpeed engine without "
                                     "partitioning), same measurement", cmd_ours.replace("stage=2", "stage=0"))))
    recs.append(record(f"{NAME}.ours.zero2.step_time", "tokens_per_s", best["ours"]["tokens_per_s_step_time"],
                       "tokens/s", lim, config={"what": "diagnostic: tokens_per_step x steps / sum(train/step_time) "
                                                "(train_step only: callbacks and the loop itself excluded)"}))
    recs += scaling(best, runs, cfg_of, shards, a, one_proc, cmd_ours)
    for key, rec in (("limit", lim), ("peer", peer), ("ours", recs[2])):
        recs.append(record(f"{NAME}.mfu.{key}", "mfu", 100 * mfu(best[key]["tokens_per_s"]), "%", config={
            "of": rec["name"], "flops_per_token": fpt, "peak_flops_per_process": round(peak),
            "peak": "pretrain.callbacks.measured_cpu_flops() with 1 thread, best of before/after the runs",
            "peak_measurements": [round(p) for p in peaks]}))
    return recs


def scaling(best: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]], cfg_of, shards: Path,
            a: argparse.Namespace, one_proc: list[str], cmd_ours: str) -> list[dict[str, Any]]:
    """tokens/s of the same training on 1 and on WORLD processes; ratio = the speed-up."""
    cmd1 = "torchrun --nproc_per_node 1 -m pretrain " + " ".join(
        train_args(Path("RUN"), shards, a, a.steps, one_proc)) + " --zero.stage=2"
    one = record(f"{NAME}.scaling.w1", "tokens_per_s", best["ours1"]["tokens_per_s"], "tokens/s", config=cfg_of(
        "ours1", f"lmforge pretrain, ZeRO-2, 1 process, the global batch of {WORLD} processes (gradient "
        f"accumulation {WORLD}); same measurement as {NAME}.ours.zero2", cmd1, {"world_size": 1, "gradient_accumulation_steps": WORLD}))
    r = record(f"{NAME}.scaling.w{WORLD}", "tokens_per_s", best["ours"]["tokens_per_s"], "tokens/s", one, config={
        "what": f"same figure as {NAME}.ours.zero2 ({WORLD} processes, same global batch); ratio = speed-up "
                "over 1 process", "command": cmd_ours, "ideal_ratio": float(WORLD),
        "loss_step1": {"w1": best["ours1"]["loss_step1"], f"w{WORLD}": best["ours"]["loss_step1"]},
        "all_rounds_tokens_per_s": {"w1": [round(x["tokens_per_s"], 1) for x in runs["ours1"]],
                                    f"w{WORLD}": [round(x["tokens_per_s"], 1) for x in runs["ours"]]}})
    r["config"]["efficiency"] = r["ratio"] and round(r["ratio"] / WORLD, 4)
    return [one, r]


def profile(a: argparse.Namespace, shards: Path, scratch: Path) -> list[dict[str, Any]]:
    """Seconds per step per component, ZeRO-2 against ZeRO-0 (bench/_profile_hook.py)."""
    from bench._train_common import SUB_ENV

    out: dict[int, dict[str, Any]] = {}
    for stage in (0, 2):
        run_dir = scratch / f"profile-zero{stage}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        prof = run_dir / "profile.json"
        args = train_args(run_dir, shards, a, a.profile_steps, [f"--zero.stage={stage}",
                                                                "--callbacks=[bench._profile_hook:profile]"])
        log(NAME, f"profile: ZeRO-{stage}, {a.profile_steps} steps (load {load_average()})")
        r = run_tree(torchrun(WORLD, "pretrain", args), env={**SUB_ENV, "LMFORGE_PROFILE_OUT": str(prof),
                                                               "LMFORGE_PROFILE_FROM": str(a.warmup + 1)})
        check(NAME, f"profile ZeRO-{stage}", r)
        out[stage] = json.loads(prof.read_text())
    recs: list[dict[str, Any]] = []
    cmd = "LMFORGE_PROFILE_OUT=FILE torchrun --nproc_per_node 2 -m pretrain " + " ".join(train_args(
        Path("RUN"), shards, a, a.profile_steps, ["--callbacks=[bench._profile_hook:profile]"])) + " --zero.stage=S"
    parts = sorted(set(out[0]["per_step_seconds"]) | set(out[2]["per_step_seconds"]),
                   key=lambda k: -out[2]["per_step_seconds"].get(k, 0.0))
    for stage in (0, 2):
        common = {"what": f"cProfile of rank 0, steps {a.warmup + 1}-{a.profile_steps} of ours at ZeRO-{stage}: self "
                          "time per step of the functions of this component (a C++ op is charged to its Python "
                          "callers); the profiler slows Python-heavy code more than kernels",
                  "command": cmd.replace("stage=S", f"stage={stage}"),
                  "profiled_seconds_per_step": round(out[stage]["seconds_per_step"], 3),
                  "steps_profiled": out[stage]["steps_profiled"]}
        recs.append(record(f"{NAME}.profile.zero{stage}.step", "seconds", out[stage]["seconds_per_step"], "s/step",
                           recs[0] if stage == 2 else None,
                           config={**common, "top_functions": out[stage]["top_functions"][:8]}))
        for part in parts:
            tag = re.sub(r"[^a-z0-9]+", "_", part.lower()).strip("_")
            base = next((r for r in recs if r["name"] == f"{NAME}.profile.zero0.{tag}"), None)
            recs.append(record(f"{NAME}.profile.zero{stage}.{tag}", "seconds",
                               out[stage]["per_step_seconds"].get(part, 0.0), "s/step", base,
                               config={**common, "component": part}))
    return recs


def n_params_of(args: list[str]) -> int:
    from pretrain.cli import parse_args
    from pretrain.model import build_model, count_params
    from pretrain.objective import shard_tokenizer

    cfg, _, _ = parse_args(args)
    return count_params(build_model(cfg.model, shard_tokenizer(cfg.data.shards, cfg.model.vocab_size).vocab_size, device="meta"))


def memory(a: argparse.Namespace, shards: Path, scratch: Path) -> list[dict[str, Any]]:
    recs: list[dict[str, Any]] = []
    zero0 = None
    variants = {"zero0": ["--zero.stage=0"], "zero2": ["--zero.stage=2"], "zero3": ["--zero.stage=3"],
                "zero3_partitioned_init": ["--zero.stage=3", "--zero.partitioned_init=true"]}
    for tag, zero_args in variants.items():
        run_dir = scratch / f"mem-{tag}"
        shutil.rmtree(run_dir, ignore_errors=True)
        args = train_args(run_dir, shards, a, a.mem_steps, [*WIDE, *zero_args])
        log(NAME, f"memory: {' '.join(zero_args)}, 64.7M params, {a.mem_steps} steps (load {load_average()})")
        r = run_tree(torchrun(WORLD, "pretrain", args))
        check(NAME, f"{tag} memory run", r)
        reported = max(v for _, _, v in tb_scalars(run_dir, "sys/peak_mem_gb"))
        cfg = {"n_params": n_params_of(args), "model": "small + " + " ".join(WIDE), "world_size": WORLD,
               "precision": "fp32", "seq_len": a.seq_len, "micro_batch_per_rank": a.micro, "steps": a.mem_steps,
               "what": "max over the 2 training processes of each one's peak RSS (psutil, polled every 0.1 s)",
               "per_process_peaks_mb": r["peak_rss_mb_procs"], "tree_peak_mb": round(r["peak_rss_mb_tree"], 1),
               "trainer_reported_peak_gb": round(reported, 3), "load_avg": load_average(),
               "command": "torchrun --nproc_per_node 2 -m pretrain "
                          + " ".join(train_args(Path("RUN"), shards, a, a.mem_steps, [*WIDE, *zero_args]))}
        rec = record(f"{NAME}.rss_per_rank.{tag}", "peak_rss", r["peak_rss_mb_per_proc"], "MB", zero0, config=cfg)
        zero0 = zero0 or rec
        recs.append(rec)
    return recs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: seq 128, micro 4, 6 steps, 1 round")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per throughput run (default 12)")
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the steady state")
    ap.add_argument("--repeats", type=int, default=None, help="rounds of ours/peer/limit (default 2)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument("--only-memory", action="store_true",
                    help="re-measure RSS per ZeRO variant only; the other records of the last run are kept")
    a = ap.parse_args(argv)
    a.seq_len, a.micro = (128, 4) if a.quick else (256, 8)
    a.steps = a.steps or (6 if a.quick else 12)
    a.repeats = a.repeats or (1 if a.quick else 2)
    a.mem_steps = 2 if a.quick else 4
    a.profile_steps = a.warmup + (3 if a.quick else 6)
    shards = ensure_shards(NAME)
    scratch = SCRATCH / NAME
    scratch.mkdir(parents=True, exist_ok=True)
    log(NAME, f"load average at start: {load_average()} (2 cores)")
    if a.only_memory:
        last = RESULTS_DIR / f"{NAME}{'-quick' if a.quick else ''}.json"
        kept = json.loads(last.read_text()) if last.is_file() else []
        recs = [r for r in kept if ".rss_per_rank." not in r["name"]] + memory(a, shards, scratch)
    else:
        recs = throughput(a, shards, scratch)
        if not a.skip_profile:
            recs += profile(a, shards, scratch)
        if not a.skip_memory:
            recs += memory(a, shards, scratch)
    emit(recs, NAME + ("-quick" if a.quick else ""), command=bench_command(NAME, argv))
    print_table(recs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
