"""Where pretraining matters most: Rotten Tomatoes test accuracy against the number of labelled examples,
pretrained vs random init, and which token a causal classifier should pool.

``python -m bench.transfer [--quick] [--labels 100 300 1000 0]`` — on the demo's data and pretrained
model (``out/demo``; the demo's stages 1-5 run first when it is missing, ``python -m demo --no-finetune``):

* **few labels**: for each count n (0 = every training sentence), the first n of a seeded shuffle of
  the training split, fine-tuned from the pretrained model and from random initialisation with the same
  budget (``max(--min-steps, 3 epochs)`` steps of batch 32, the best validation checkpoint), test accuracy
  on the whole test split; records ``transfer.labels.n<N>.{pretrained,random_init}`` (the latter compared
  with the former) and a PNG plot, bench/results/transfer.png (when matplotlib is installed:
  ``make bench`` installs it);
* **pooling** (causal backbones): every training sentence, pooled as the mean state of the text's tokens
  (``task.pooling=mean``, the demo's), at the last word of the text (``last``, finetune's default) and at a
  closing ``</s>`` (``eos``), pretrained and random init: ``transfer.pooling.{mean,last,eos}.{pretrained,random_init}``.

Every run is a real 2-process fine-tune (``torchrun -m finetune configs/finetune/classify.yaml``) with the
demo's fine-tuning recipe (``demo.run``: pooling and lr; demo/EXPERIMENTS.md says how they were chosen).
``--quick``: 100 and 300 labels, 40 steps, no pooling.
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
from demo.run import FT_LR, POOLING
from finetune.rotten_tomatoes import subsample
from lmforge.rundir import latest_state

NAME = "transfer"
WHAT_POOLED = {"mean": "the mean state of the text", "last": "the last word", "eos": "a closing </s>"}
DEMO = REPO / "out" / "demo"


def ensure_demo() -> tuple[Path, dict[str, Any]]:
    """The demo's pretraining run and task data (stages 1-5 of ``python -m demo`` when missing)."""
    run_dir, info_file = DEMO / "runs" / "pretrain", DEMO / "rotten_tomatoes" / "info.json"
    if latest_state(run_dir) is None or not info_file.is_file():
        log(NAME, "no demo run in out/demo: running `python -m demo --no-finetune` first (a few minutes)")
        subprocess.run([sys.executable, "-m", "demo", "--no-finetune"], cwd=REPO, check=True)
    return run_dir, json.loads(info_file.read_text())


def finetune(run: Path, init: Path, info: dict[str, Any], train: Path, steps: int, extra: list[str]) -> dict[str, Any]:
    shutil.rmtree(run, ignore_errors=True)
    args = ["configs/finetune/classify.yaml", f"--run_dir={run}", f"--init_from={init}", f"--data.train={train}",
            f"--data.validation={info['validation']['path']}", f"--data.test={info['test']['path']}",
            f"--train.max_steps={steps}", "--task.max_seq_len=64", "--precision=fp32",
            "--data.max_validation_examples=400", f"--train.eval_every={max(10, steps // 4)}", "--train.log_every=50",
            f"--optim.lr={FT_LR:g}", *extra]
    r = run_tree(torchrun(2, "finetune", args), env=SUB_ENV)
    if r["returncode"]:
        raise SystemExit(f"[bench.{NAME}] fine-tune {run.name} failed:\n{r['output'][-3000:]}")
    m = json.loads((run / "metrics.json").read_text())
    return {"accuracy": m["test/accuracy"], "lr": m.get("lr"), "steps": m["steps"], "seconds": round(r["seconds"], 1),
            "command": "torchrun --nproc_per_node 2 -m finetune " + " ".join(args)}


def plot(points: dict[str, list[tuple[int, float]]], majority: float, out: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in points.items():
        ax.plot([n for n, _ in pts], [a for _, a in pts], marker="o", label=name)
    ax.axhline(majority, color="gray", linestyle="--", label="majority class")
    ax.set_xscale("log")
    ax.set_xlabel("labelled training sentences")
    ax.set_ylabel("test accuracy")
    ax.set_title("Rotten Tomatoes: pretrained vs random init")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--labels", type=int, nargs="+", default=None, help="labelled examples per run (0 = all)")
    ap.add_argument("--min-steps", type=int, default=150)
    a = ap.parse_args(argv)
    labels = a.labels or ([100, 300] if a.quick else [100, 300, 1000, 0])
    run_dir, info = ensure_demo()
    scratch = SCRATCH / NAME
    scratch.mkdir(parents=True, exist_ok=True)
    total = info["train"]["rows"]
    recs: list[dict[str, Any]] = []
    points: dict[str, list[tuple[int, float]]] = {"pretrained": [], "random init": []}
    for n in labels:
        count = n or total
        train = subsample(Path(info["train"]["path"]), n, scratch / f"train_{count}.csv")
        steps = 40 if a.quick else max(a.min_steps, -(-3 * count // 32))
        base = None
        for key, extra in (("pretrained", []), ("random_init", ["--transfer.random_init=true"])):
            log(NAME, f"{count} labels, {key}, {steps} steps")
            r = finetune(scratch / f"n{count}_{key}", run_dir, info, train, steps, [f"--task.pooling={POOLING}", *extra])
            rec = record(f"{NAME}.labels.n{count}.{key}", "accuracy", r["accuracy"], "fraction", base, config={
                "what": f"RT test accuracy ({info['test']['rows']} sentences of unseen movies) after fine-tuning on "
                        f"{count} labelled sentences, {key.replace('_', ' ')}", "labels": count, **r})
            base = base or rec
            recs.append(rec)
            points["pretrained" if key == "pretrained" else "random init"].append((count, r["accuracy"]))
    if not a.quick:
        steps = max(a.min_steps, -(-3 * total // 32))
        for pool in ("mean", "last", "eos"):
            for key, extra in (("pretrained", []), ("random_init", ["--transfer.random_init=true"])):
                log(NAME, f"pooling {pool}, {key}")
                r = finetune(scratch / f"pool_{pool}_{key}", run_dir, info, Path(info["train"]["path"]), steps,
                             [f"--task.pooling={pool}", *extra])
                recs.append(record(f"{NAME}.pooling.{pool}.{key}", "accuracy", r["accuracy"], "fraction", config={
                    "what": f"RT test accuracy, every training sentence, causal classifier pooling "
                            f"{WHAT_POOLED[pool]}, {key.replace('_', ' ')}",
                    **r}))
    png = plot(points, info["majority_test_accuracy"], RESULTS_DIR / f"{NAME}.png")
    recs.append(record(f"{NAME}.majority_class", "accuracy", info["majority_test_accuracy"], "fraction", config={
        "what": "the majority class of the training split, on the test split", "plot": png or
        "not drawn: matplotlib is not installed (make bench installs it)"}))
    emit(recs, NAME + ("-quick" if a.quick else ""), command=bench_command(NAME, argv))
    print_table(recs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
