"""Where pretraining matters most: Rotten Tomatoes test accuracy against the number of labelled examples,
pretrained vs random init, and which token a causal classifier should pool.

``python -m bench.transfer [--quick] [--labels 100 300 1000 3000 0] [--seeds 1234 7]`` — on the demo's data
and pretrained model (``out/demo``; the demo's stages 1-5 run first when it is missing,
``python -m demo --no-finetune``):

* **few labels**: for each count n (0 = every training sentence), the first n of a seeded shuffle of
  the training split, fine-tuned from the pretrained model and from random initialisation with the same
  budget (``max(--min-steps, 3 epochs)`` steps of batch 32, the best validation checkpoint), once per
  fine-tuning seed (``train.seed`` and ``data.seed``: head init, batch order, the 400 validation sentences that
  pick the best checkpoint; seed 1234 is the demo's own run): the mean test accuracy on the whole test split,
  each seed's in the record's config; records ``transfer.labels.n<N>.{pretrained,random_init}`` (the latter
  compared with the former) and a PNG plot, bench/transfer.png (when matplotlib is installed:
  ``make bench`` installs it), means with each seed's points;
* **pooling** (causal backbones), at the demo's budget (its labelled sentences and steps), every seed: the
  mean state of the text's tokens (``task.pooling=mean``, the demo's), the last word of the text (``last``,
  finetune's default) and a closing ``</s>`` (``eos``), pretrained and random init:
  ``transfer.pooling.{mean,last,eos}.{pretrained,random_init}``.

Every run is a real 2-process fine-tune (``torchrun -m finetune configs/finetune/classify.yaml``) with the
demo's fine-tuning recipe (``demo.run``: pooling, lr and steps; demo/EXPERIMENTS.md says how they were chosen).
One fine-tune of the width-128 demo model takes ~20-40 s on 2 cores (100 steps; ~1.5 minutes for 282): the
labels 100-3,000 with two seeds and the pooling comparison took 13.4 minutes (every sentence adds 4 fine-tunes of
846 steps). ``--quick``: 100 and 300 labels, 40 steps, one seed, no pooling.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench._train_common import REPO, SCRATCH, SUB_ENV, log, run_tree, torchrun
from bench.common import RESULTS_DIR, bench_command, emit, print_table, record
from demo.run import FT_LR, FT_STEPS, LABELS, POOLING, finetune_args
from finetune.rotten_tomatoes import load_info, subsample
from lmforge.rundir import latest_state
from pretrain.engine import resolve_precision

NAME = "transfer"
REPORT_DIR = Path(__file__).resolve().parent
WHAT_POOLED = {"mean": "the mean state of the text", "last": "the last word", "eos": "a closing </s>"}
DEMO = REPO / "out" / "demo"


def ensure_demo() -> tuple[Path, dict[str, Any]]:
    """The demo's pretraining run and task data (stages 1-5 of ``python -m demo`` when missing)."""
    run_dir = DEMO / "runs" / "pretrain"
    if latest_state(run_dir) is None or load_info(DEMO / "rotten_tomatoes") is None:
        log(NAME, "no demo run in out/demo: running `python -m demo --no-finetune` first (a few minutes)")
        subprocess.run([sys.executable, "-m", "demo", "--no-finetune"], cwd=REPO, check=True)
    return run_dir, load_info(DEMO / "rotten_tomatoes")  # type: ignore[return-value]


def finetune(run: Path, init: Path, info: dict[str, Any], train: Path, steps: int, pooling: str, extra: list[str]
             ) -> dict[str, Any]:
    """One fine-tune of the demo's recipe (demo.run.finetune_args: pooling, lr, precision, validation)."""
    shutil.rmtree(run, ignore_errors=True)
    args = finetune_args(run, init, info, train, [f"--train.max_steps={steps}"], pooling, FT_LR,
                         resolve_precision("auto"), extra)
    r = run_tree(torchrun(2, "finetune", args), env=SUB_ENV)
    if r["returncode"]:
        raise SystemExit(f"[bench.{NAME}] fine-tune {run.name} failed:\n{r['output'][-3000:]}")
    m = json.loads((run / "metrics.json").read_text())
    return {"accuracy": m["test/accuracy"], "lr": m.get("lr"), "steps": m["steps"], "seconds": round(r["seconds"], 1),
            "command": "torchrun --nproc_per_node 2 -m finetune " + " ".join(args)}


def seeds_run(run: Path, init: Path, info: dict[str, Any], train: Path, steps: int, pooling: str, extra: list[str],
              seeds: list[int]) -> dict[str, Any]:
    """One fine-tune per seed: the mean test accuracy, and each run's."""
    runs = [finetune(run.with_name(f"{run.name}_s{seed}"), init, info, train, steps, pooling,
                     [*extra, f"--train.seed={seed}", f"--data.seed={seed}"]) for seed in seeds]
    accs = [r["accuracy"] for r in runs]
    return {"accuracy": sum(accs) / len(accs), "seeds": seeds, "accuracies": accs, "steps": runs[0]["steps"],
            "lr": runs[0]["lr"], "seconds": round(sum(r["seconds"] for r in runs), 1),
            "command": runs[0]["command"].replace(f"seed={seeds[0]}", "seed=SEED")}


def plot(points: dict[str, list[tuple[int, list[float]]]], majority: float, out: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in points.items():
        line, = ax.plot([n for n, _ in pts], [sum(a) / len(a) for _, a in pts], marker="o", label=f"{name} (mean)")
        ax.scatter([n for n, accs in pts for _ in accs], [a for _, accs in pts for a in accs], s=12, alpha=0.5,
                   color=line.get_color())
    ax.axhline(majority, color="gray", linestyle="--", label="majority class")
    ax.set_xscale("log")
    ax.set_xlabel("labelled training sentences")
    ax.set_ylabel("test accuracy")
    ax.set_title("Rotten Tomatoes: pretrained vs random init (dots: each fine-tuning seed)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--labels", type=int, nargs="+", default=None, help="labelled examples per run (0 = all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="fine-tuning seeds of every point (train.seed, data.seed)")
    ap.add_argument("--min-steps", type=int, default=FT_STEPS, help="fewest fine-tuning steps (default: the demo's)")
    ap.add_argument("--no-pooling", action="store_true", help="skip the pooling comparison")
    a = ap.parse_args(argv)
    labels = a.labels or ([100, 300] if a.quick else [100, 300, 1000, 3000, 0])
    seeds = a.seeds or ([1234] if a.quick else [1234, 7])
    run_dir, info = ensure_demo()
    scratch = SCRATCH / NAME
    scratch.mkdir(parents=True, exist_ok=True)
    total = info["train"]["rows"]
    recs: list[dict[str, Any]] = []
    points: dict[str, list[tuple[int, list[float]]]] = {"pretrained": [], "random init": []}
    done: dict[tuple[int, int, str], dict[str, Any]] = {}  # the demo's pooling at the demo's budget: run once
    for n in labels:
        count = n or total
        train = subsample(Path(info["train"]["path"]), n, scratch / f"train_{count}.csv")
        steps = 40 if a.quick else max(a.min_steps, -(-3 * count // 32))
        base = None
        for key, extra in (("pretrained", []), ("random_init", ["--transfer.random_init=true"])):
            log(NAME, f"{count} labels, {key}, {steps} steps, seeds {seeds}")
            r = seeds_run(scratch / f"n{count}_{key}", run_dir, info, train, steps, POOLING, extra, seeds)
            done[(count, steps, key)] = r
            rec = record(f"{NAME}.labels.n{count}.{key}", "accuracy", r["accuracy"], "fraction", base, config={
                "what": f"RT test accuracy ({info['test']['rows']} sentences of unseen movies) after fine-tuning on "
                        f"{count} labelled sentences, {key.replace('_', ' ')}", "labels": count, **r})
            base = base or rec
            recs.append(rec)
            points["pretrained" if key == "pretrained" else "random init"].append((count, r["accuracies"]))
    if not (a.quick or a.no_pooling):
        train = subsample(Path(info["train"]["path"]), LABELS, scratch / f"train_{LABELS}.csv")
        for pool in ("mean", "last", "eos"):
            for key, extra in (("pretrained", []), ("random_init", ["--transfer.random_init=true"])):
                log(NAME, f"pooling {pool}, {key}, seeds {seeds}")
                r = (done.get((LABELS, FT_STEPS, key)) if pool == POOLING else None) or seeds_run(
                    scratch / f"pool_{pool}_{key}", run_dir, info, train, FT_STEPS, pool, extra, seeds)
                recs.append(record(f"{NAME}.pooling.{pool}.{key}", "accuracy", r["accuracy"], "fraction", config={
                    "what": f"RT test accuracy, the demo's budget ({LABELS} labelled sentences, {FT_STEPS} steps), "
                            f"causal classifier pooling {WHAT_POOLED[pool]}, {key.replace('_', ' ')}",
                    **r}))
    # a full run's plot is committed next to REPORT.md, which shows it; a quick run's stays with its JSON
    png = plot(points, info["majority_test_accuracy"], (RESULTS_DIR if a.quick else REPORT_DIR) / f"{NAME}.png")
    recs.append(record(f"{NAME}.majority_class", "accuracy", info["majority_test_accuracy"], "fraction", config={
        "what": "the majority class of the training split, on the test split", "plot": png or
        "not drawn: matplotlib is not installed (make bench installs it)"}))
    emit(recs, NAME + ("-quick" if a.quick else ""), command=bench_command(NAME, argv))
    print_table(recs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
