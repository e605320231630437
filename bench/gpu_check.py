"""``bench/gpu_check.sh [--dry] [--work DIR] [--out FILE] [--only NAME ...]`` — the GPU smoke test.

On one GPU (an H200 is what it is sized for: under 8 minutes), one process at a time, everything a user
runs, as a user runs it (``python -m pretrain``, ``python -m pretrain.export``, ``python -m finetune``,
``python -m data_pipeline``), checked from the outside (exit codes, start-up lines, TensorBoard scalars,
files). The checks, in order (``CHECKS``):

``accelerator_cuda``        lmforge's ``init_distributed`` picks the ``cuda`` accelerator by itself
``backend_nccl``            … and the ``nccl`` process-group backend
``precision_auto_bf16``     ``precision: auto`` resolves to bf16
``data``                    a small corpus (standard-library files) → tokenizer → verified shards
``sdpa_no_mask``            a forward of the model with no attention mask hands SDPA no mask (``is_causal``)
``flash_sdpa``              the same forward under ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)`` only
``pretrain_zero2``          d=1024, 8 layers, seq 1024, 30 steps, ZeRO-2: start-up line, loss finite and
                            falling, tokens/s, MFU, peak memory
``pretrain_zero3``          the same with ZeRO-3; the start-up line says ``ZeRO-3 (built partitioned)``
``mfu_h200``                both runs measured MFU against the GPU table's H200 bf16 peak, within (0, 1]
``signal_resume``           the ZeRO-3 run again, SIGUSR1 mid-run → ``checkpoint … saved (signal…)`` and exit 0
                            → the same command resumes, and its curve equals the uninterrupted run's
                            (bf16 tolerance)
``export_logits``           the ZeRO-3 checkpoint exported, loaded with ``AutoModelForCausalLM`` on the
                            device: its logits equal the training engine's
``finetune_classify_zero3`` a ZeRO-3 ``classify`` fine-tune from the ZeRO-3 run: ``metrics.json``
``offload_step``            one optimizer step with the optimizer offloaded to the CPU

``--dry`` is the CPU dry mode (``DS_ACCELERATOR=cpu LMFORGE_ACCELERATOR=cpu``): the same sequence with the
``tiny`` preset, seq 64, 8 steps, fp32, ZeRO-3 built partitioned on request; the GPU-only checks
(``GPU_ONLY``) are recorded as ``{"ok": true, "skipped": "cpu dry mode"}``; everything else really runs
(under 3 minutes on 2 cores). Every check is a record ``{"name", "ok", "seconds", ...details}``; a failed
one has a one-line ``"error"``, also printed to stderr (``gpu_check: FAILED name: reason``), and the checks
that need it are recorded as failed (``"not run: needs …"``); the independent ones still run. One JSON
object goes to stdout at the end and to ``--out``; the exit status is 1 when any check failed.
Each command's output is in ``WORK/MODE/logs/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "gpu_check"  # a folder: bench.report reads bench/results/*.json as benchmarks
GPU_BUDGET_S = 480.0
DRY_BUDGET_S = 180.0


class CheckFailed(Exception):
    """A check's one-line reason for failing."""


@dataclass(frozen=True)
class Mode:
    name: str  # "gpu" | "dry"
    preset: str
    train: tuple[str, ...]  # overrides of every pretraining run (model shape, steps, batch, logging)
    steps: int
    pause_at: int  # the signal run pauses after this step and gets SIGUSR1 there
    precision: str  # what the runs must say at start-up
    zero3_args: tuple[str, ...]
    corpus_files: int
    tokenizer_docs: int  # the tokenizer trains on a sample (its time grows with the text; the shards hold it all)
    vocab: int
    seq_len: int
    build_workers: int
    finetune: tuple[str, ...]
    resume_atol: float  # |loss(resumed) - loss(uninterrupted)| per step
    logits_atol: float  # |export - engine| logits: atol + rtol * max |logit|
    logits_rtol: float
    timeout_s: int  # per command
    budget_s: float

    @property
    def gpu(self) -> bool:
        return self.name == "gpu"


GPU = Mode(
    name="gpu",
    preset="configs/pretrain/125m.yaml",
    train=("--model.hidden_size=1024", "--model.num_layers=8", "--model.num_heads=16", "--model.intermediate_size=null",
           "--model.vocab_size=null", "--model.max_seq_len=1024", "--model.nominal_params=null", "--data.seq_len=1024",
           "--precision=auto", "--optim.lr=1e-3", "--optim.min_lr=1e-4", "--optim.warmup_steps=5",
           "--train.max_steps=30", "--train.micro_batch_size=16", "--train.global_batch_size=32",
           "--train.log_every=1", "--train.eval_every=0", "--train.eval_samples=16",
           "--checkpoint.interval_minutes=0"),
    steps=30,
    pause_at=12,
    precision="bf16",
    zero3_args=(),
    corpus_files=600,
    tokenizer_docs=150,
    vocab=4096,
    seq_len=1024,
    build_workers=4,
    finetune=("--task.max_seq_len=128", "--train.micro_batch_size=16", "--train.max_steps=20", "--optim.lr=1e-4",
              "--train.log_every=5", "--train.eval_every=10"),
    resume_atol=0.05,
    logits_atol=0.05,
    logits_rtol=0.02,
    timeout_s=420,
    budget_s=GPU_BUDGET_S,
)

DRY = Mode(
    name="dry",
    preset="configs/pretrain/tiny.yaml",
    train=("--data.seq_len=64", "--precision=fp32", "--optim.warmup_steps=3", "--train.max_steps=8",
           "--train.micro_batch_size=4", "--train.global_batch_size=4", "--train.log_every=1",
           "--train.eval_every=0", "--train.eval_samples=8"),
    steps=8,
    pause_at=3,
    precision="fp32",
    zero3_args=("--zero.partitioned_init=true",),  # the CPU builds ZeRO-3 whole by default
    corpus_files=100,
    tokenizer_docs=60,
    vocab=1024,
    seq_len=64,
    build_workers=1,
    finetune=("--precision=fp32", "--task.max_seq_len=64", "--train.micro_batch_size=8", "--train.max_steps=6",
              "--optim.lr=2e-3", "--train.log_every=2", "--train.eval_every=3", "--zero.partitioned_init=true"),
    resume_atol=1e-5,
    logits_atol=1e-5,
    logits_rtol=0.0,
    timeout_s=240,
    budget_s=DRY_BUDGET_S,
)


@dataclass
class Check:
    name: str
    run: Callable[[Ctx], dict[str, Any]]
    needs: tuple[str, ...] = ()
    gpu_only: bool = False
    doc: str = ""


@dataclass
class Proc:
    cmd: list[str]
    rc: int
    out: str
    err: str
    seconds: float

    def tail(self, n: int = 1) -> str:
        """The last meaningful lines of stderr (else stdout): the reason a command failed."""
        lines = [ln.strip() for ln in (self.err or self.out).splitlines() if ln.strip()]
        keep = [ln for ln in lines if not NOISE.match(ln)] or lines
        return " | ".join(keep[-n:])[-400:]


NOISE = re.compile(r"\[20\d\d-\d\d-\d\d |[WI]\d{4} |warnings\.warn|.*Warning: ")  # log lines, not the error


@dataclass
class Ctx:
    mode: Mode
    work: Path
    expect_gpu: str = "H200"  # the GPU table entry the MFU peak must come from ('' = any)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.work / self.mode.name

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def shards(self) -> Path:
        return self.data / "shards"

    def env(self, **extra: str) -> dict[str, str]:
        """The commands' environment: the accelerator follows the hardware on the GPU; the CPU asked for by
        name in the dry mode; offline; one line per log step (no progress bars)."""
        env = dict(os.environ)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "LMFORGE_ACCELERATOR"):
            env.pop(k, None)
        if self.mode.gpu:
            if env.get("DS_ACCELERATOR") == "cpu":
                env.pop("DS_ACCELERATOR")
        else:
            env.update(DS_ACCELERATOR="cpu", LMFORGE_ACCELERATOR="cpu")
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", LMFORGE_PROGRESS="0")
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
        env.update(extra)
        return env

    def run(self, label: str, args: list[str], env: dict[str, str] | None = None, timeout: int | None = None) -> Proc:
        """``python ARGS`` in the checkout, its output kept in ``logs/LABEL.out|err``; killed (with its process
        group) past the timeout, which fails the check."""
        cmd = [sys.executable, *args]
        timeout = timeout or self.mode.timeout_s
        self.make_logs()
        t0 = time.time()
        with open(self.logs / f"{label}.out", "w") as out, open(self.logs / f"{label}.err", "w") as err:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            p = subprocess.Popen(cmd, cwd=REPO, env=env or self.env(), stdout=out, stderr=err, start_new_session=True)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(p)
                raise CheckFailed(f"{label}: no exit after {timeout} s (logs: {self.logs / label}.out/.err)") from None
            except BaseException:  # Ctrl-C: no training process outlives the checker
                _kill_group(p)
                raise
        return self._proc(cmd, rc, label, time.time() - t0)

    def make_logs(self) -> None:
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckFailed(f"cannot use the work directory {self.work}: {e.strerror or e}") from None

    def _proc(self, cmd: list[str], rc: int, label: str, seconds: float) -> Proc:
        return Proc(cmd, rc, (self.logs / f"{label}.out").read_text(errors="replace"),
                    (self.logs / f"{label}.err").read_text(errors="replace"), seconds)

    def ok(self, proc: Proc, what: str) -> Proc:
        if proc.rc != 0:
            raise CheckFailed(f"{what} exited with {proc.rc}: {proc.tail(2)}")
        return proc

    def probe(self, label: str, args: list[str], timeout: int | None = None) -> dict[str, Any]:
        """A ``bench._gpu_check_probe`` run's JSON (its last stdout line), memoised per label."""
        if label not in self.cache:
            try:
                proc = self.ok(self.run(label, ["-m", "bench._gpu_check_probe", *args], timeout=timeout), label)
                last = [ln for ln in proc.out.splitlines() if ln.startswith("{")]
                if not last:
                    raise CheckFailed(f"{label}: no JSON on stdout")
                self.cache[label] = json.loads(last[-1])
            except CheckFailed as e:
                self.cache[label] = e
        got = self.cache[label]
        if isinstance(got, CheckFailed):
            raise CheckFailed(str(got))
        return got

    def pretrain_args(self, run_dir: Path, *extra: str) -> list[str]:
        return ["-m", "pretrain", self.mode.preset, f"--run_dir={run_dir}", f"--data.shards=[{self.shards}]",
                *self.mode.train, *extra]


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def expect(cond: bool, reason: str) -> None:
    if not cond:
        raise CheckFailed(reason)


# ---------------------------------------------------------------- data
def check_data(ctx: Ctx) -> dict[str, Any]:
    """Standard-library files → ``data_pipeline train-tokenizer`` → ``data_pipeline build`` → ``inspect --verify``."""
    m = ctx.mode
    ctx.make_logs()
    shutil.rmtree(ctx.runs, ignore_errors=True)  # every invocation trains from scratch
    ctx.runs.mkdir(parents=True)
    d = ctx.data
    if (ctx.shards / "manifest.json").is_file() and (d / "tok" / "tokenizer.model").is_file():
        _classification_csv(d / "cls_train.csv", 240, 1)
        _classification_csv(d / "cls_test.csv", 60, 2)
        proc = ctx.ok(ctx.run("data_verify", ["-m", "data_pipeline", "inspect", str(ctx.shards), "--verify"]),
                      "data_pipeline inspect --verify")
        return {"reused": str(d), "inspect": proc.out.strip().splitlines()[-1][:200]}
    shutil.rmtree(d, ignore_errors=True)
    corpus = d / "corpus"
    corpus.mkdir(parents=True)
    files = _stdlib_files(m.corpus_files)
    for i, f in enumerate(files):
        shutil.copyfile(f, corpus / f"doc_{i:04d}.py")
    ctx.ok(ctx.run("data_tokenizer", ["-m", "data_pipeline", "train-tokenizer", "--input", str(corpus),
                                      "--vocab-size", str(m.vocab), "--sample-docs", str(m.tokenizer_docs),
                                      "--out", str(d / "tok")]), "data_pipeline train-tokenizer")
    ctx.ok(ctx.run("data_build", ["-m", "data_pipeline", "build", "--input", str(corpus), "--tokenizer", str(d / "tok"),
                                  "--out", str(ctx.shards), "--workers", str(m.build_workers), "--val-docs", "20",
                                  "--val-every", "10", "--seq-len", str(m.seq_len), "--no-progress"]),
           "data_pipeline build")
    proc = ctx.ok(ctx.run("data_verify", ["-m", "data_pipeline", "inspect", str(ctx.shards), "--verify"]),
                  "data_pipeline inspect --verify")
    manifest = json.loads((ctx.shards / "manifest.json").read_text())
    _classification_csv(d / "cls_train.csv", 240, 1)
    _classification_csv(d / "cls_test.csv", 60, 2)
    return {"documents": len(files), "vocab_size": m.vocab, "shards": str(ctx.shards),
            "train_tokens": _manifest_tokens(manifest), "inspect": proc.out.strip().splitlines()[-1][:200]}


def _stdlib_files(n: int) -> list[Path]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "__pycache__" not in p.parts
                   and 2_000 < p.stat().st_size < 200_000)
    if len(files) < 20:
        raise CheckFailed(f"found only {len(files)} Python files under {root} for the corpus")
    return files[:: max(1, len(files) // n)][:n]


def _manifest_tokens(manifest: dict) -> int | None:
    for key in ("train_tokens", "tokens", "num_tokens"):
        if isinstance(manifest.get(key), int):
            return manifest[key]
    splits = manifest.get("splits")
    if isinstance(splits, dict) and isinstance(splits.get("train"), dict):
        return splits["train"].get("tokens")
    return None


FILLER = ("def class import self return value list data file name path index item text line open "
          "string number object module method result error test type args kwargs print format").split()


def _classification_csv(path: Path, n: int, seed: int) -> None:
    """'good' iff the text holds one of a few words (else 'bad'): a task with chance 0.5."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(n):
            label = rng.choice(["good", "bad"])
            words = [rng.choice(FILLER) for _ in range(rng.randint(4, 10))]
            pool = ["sorted", "append", "extend", "update"] if label == "good" else ["raise", "except", "assert", "finally"]
            words.insert(rng.randrange(len(words) + 1), rng.choice(pool))
            w.writerow([" ".join(words), label])


# ---------------------------------------------------------------- the device
def _device(ctx: Ctx) -> dict[str, Any]:
    return ctx.probe("device_probe", ["device"], timeout=180)


def check_accelerator(ctx: Ctx) -> dict[str, Any]:
    d = _device(ctx)
    expect(d.get("accelerator") == "cuda" and d.get("device", "").startswith("cuda"),
           f"the accelerator is {d.get('accelerator')} ({d.get('device')}), not cuda; CUDA available: "
           f"{d.get('cuda_available')}, torch {d.get('torch')} (CUDA {d.get('torch_cuda')}); "
           "run on a GPU node, or use --dry for the CPU dry mode")
    return {k: d.get(k) for k in ("accelerator", "device", "device_name", "capability", "memory_gib", "device_count",
                                  "torch", "torch_cuda")}


def check_backend(ctx: Ctx) -> dict[str, Any]:
    d = _device(ctx)
    expect(d.get("backend") == "nccl", f"the process-group backend is {d.get('backend')}, not nccl")
    return {"backend": d["backend"]}


def check_precision(ctx: Ctx) -> dict[str, Any]:
    d = _device(ctx)
    expect(d.get("precision_auto") == "bf16", f"precision auto resolves to {d.get('precision_auto')}, not bf16")
    return {"precision_auto": d["precision_auto"]}


# ---------------------------------------------------------------- attention
def _sdpa(ctx: Ctx) -> dict[str, Any]:
    args = ["sdpa", ctx.mode.preset, str(ctx.mode.vocab), *(["--flash"] if ctx.mode.gpu else []),
            *[a for a in ctx.mode.train if a.startswith(("--model.", "--data.seq_len"))
              and a != "--model.vocab_size=null"]]
    return ctx.probe("sdpa_probe", args, timeout=240)


def check_sdpa_no_mask(ctx: Ctx) -> dict[str, Any]:
    s = _sdpa(ctx)
    expect(s["calls"] > 0, "the model never called scaled_dot_product_attention (attn_implementation is not sdpa?)")
    expect(s["calls_with_mask"] == 0, f"{s['calls_with_mask']} of {s['calls']} SDPA calls got an attention mask")
    expect(s["calls_causal"] == s["calls"], f"only {s['calls_causal']} of {s['calls']} SDPA calls had is_causal=True")
    expect(s["logits_finite"], "non-finite logits")
    return {k: s.get(k) for k in ("device", "dtype", "seq_len", "calls", "calls_with_mask", "calls_causal", "first_call")}


def check_flash(ctx: Ctx) -> dict[str, Any]:
    s = _sdpa(ctx)
    expect(s.get("flash", False), f"the forward under SDPBackend.FLASH_ATTENTION failed: {s.get('flash_error')}")
    expect(s.get("flash_logits_finite", False), "non-finite logits under the flash backend")
    expect(s["dtype"] == "torch.bfloat16", f"ran in {s['dtype']}, not bf16")
    return {k: s.get(k) for k in ("device", "dtype", "seq_len", "flash_calls", "flash_max_abs_diff")}


# ---------------------------------------------------------------- pretraining
def _banner(out: str, start: str = "run ") -> str:
    """The stage's start-up line: ``run DIR: causal model, N params, …`` (``fine-tune DIR: …`` for fine-tuning)."""
    lines = [ln for ln in out.splitlines() if ln.startswith(start) and " params" in ln and "ZeRO-" in ln]
    if not lines:
        raise CheckFailed(f"no start-up line ('{start}DIR: … params, … ZeRO-N, …') in the output")
    return lines[0]


def _expected_how(ctx: Ctx, stage: int) -> str:
    built = " (built partitioned)" if stage == 3 else ""
    settings = f"ds_configs/{'gpu/' if ctx.mode.gpu else ''}zero{stage}.json"
    return f"ZeRO-{stage}{built}, {ctx.mode.precision}, engine settings {settings}"


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from lmforge.tensorboard import read_scalars

    return read_scalars(run_dir)


def _pretrain(ctx: Ctx, stage: int) -> dict[str, Any]:
    m = ctx.mode
    run_dir = ctx.runs / f"zero{stage}"
    proc = ctx.ok(ctx.run(f"pretrain_zero{stage}", ctx.pretrain_args(run_dir, f"--zero.stage={stage}",
                                                                     *(m.zero3_args if stage == 3 else ()))),
                  f"python -m pretrain (ZeRO-{stage})")
    banner = _banner(proc.out)
    expect(_expected_how(ctx, stage) in banner, f"start-up line lacks '{_expected_how(ctx, stage)}': {banner}")
    sc = _scalars(run_dir)
    losses = [v for _, v in sc.get("train/loss", [])]
    expect(len(losses) == m.steps, f"{len(losses)} train/loss points in TensorBoard, expected {m.steps}")
    expect(all(math.isfinite(v) for v in losses), f"non-finite loss: {losses}")
    k = max(1, m.steps // 4)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    expect(last < first - 0.1, f"the loss is not falling: mean of the first {k} steps {first:.4f}, of the last "
                               f"{k} {last:.4f}")
    skipped = [v for _, v in sc.get("train/skipped_steps", [])]
    expect(not skipped or skipped[-1] == 0, f"{skipped[-1] if skipped else 0} skipped steps")
    tps = [v for _, v in sc.get("train/tokens_per_sec", [])]
    mfu = [v for _, v in sc.get("train/mfu", [])]
    mem = [v for _, v in sc.get("sys/peak_mem_gb", [])]
    expect(bool(tps) and min(tps) > 0, f"train/tokens_per_sec missing or not positive: {tps[:3]}")
    expect(bool(mem) and max(mem) > 0, f"sys/peak_mem_gb missing or not positive: {mem[:3]}")
    expect(bool(mfu), "train/mfu missing")
    steady = slice(min(5, len(tps) - 1), None)  # past the first steps (allocation, kernel selection)
    peak_line = next((ln for ln in proc.out.splitlines() if ln.startswith("MFU peak:")), "")
    ctx.cache[f"zero{stage}"] = {"run_dir": run_dir, "peak_line": peak_line, "mfu": mfu[steady]}
    return {"run_dir": str(run_dir), "banner": banner, "command": " ".join(proc.cmd[1:]),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
            "tokens_per_sec": round(_median(tps[steady]), 1), "mfu": round(_median(mfu[steady]), 4),
            "mfu_peak": peak_line.removeprefix("MFU peak: "), "peak_mem_gb": round(max(mem), 3),
            "run_seconds": round(proc.seconds, 1)}


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if s else float("nan")


def check_zero2(ctx: Ctx) -> dict[str, Any]:
    return _pretrain(ctx, 2)


def check_zero3(ctx: Ctx) -> dict[str, Any]:
    return _pretrain(ctx, 3)


def check_mfu(ctx: Ctx) -> dict[str, Any]:
    expect_gpu = ctx.expect_gpu
    out = {}
    for stage in (2, 3):
        r = ctx.cache[f"zero{stage}"]
        want = f"(table: {expect_gpu} bf16)" if expect_gpu else "(table: "
        expect(want in r["peak_line"], f"ZeRO-{stage}: MFU peak is not the table's {expect_gpu or 'GPU'} bf16 one: "
                                       f"{r['peak_line'] or 'no MFU peak line'}")
        expect(all(0 < v <= 1 for v in r["mfu"]), f"ZeRO-{stage}: MFU outside (0, 1]: {r['mfu']}")
        out[f"zero{stage}_mfu"] = round(_median(r["mfu"]), 4)
        out["peak"] = r["peak_line"].removeprefix("MFU peak: ")
    return out


# ---------------------------------------------------------------- signal → checkpoint → resume
def check_signal_resume(ctx: Ctx) -> dict[str, Any]:
    from lmforge.rundir import latest_state

    m = ctx.mode
    ref = ctx.cache["zero3"]["run_dir"]
    run_dir = ctx.runs / "signal"
    marker = ctx.root / "pause"
    for old in ctx.root.glob("pause.rank*"):
        old.unlink()
    env = ctx.env(LMFORGE_GPU_CHECK_PAUSE=f"{m.pause_at}:{marker}")
    args = ctx.pretrain_args(run_dir, "--zero.stage=3", *m.zero3_args, "--callbacks=[bench._gpu_check_hooks:pause]")
    # 1. start, wait for the pause after step pause_at, send SIGUSR1 to every rank (the pids in the markers)
    cmd = [sys.executable, *args]
    ctx.make_logs()
    t0 = time.time()
    with open(ctx.logs / "signal_run.out", "w") as out, open(ctx.logs / "signal_run.err", "w") as err:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            deadline = time.time() + m.timeout_s
            while not (ctx.root / "pause.rank0").exists():
                if p.poll() is not None:
                    raise CheckFailed(f"the signal run exited ({p.returncode}) before step {m.pause_at}: "
                                      f"{ctx._proc(cmd, p.returncode, 'signal_run', 0).tail(2)}")
                if time.time() > deadline:
                    raise CheckFailed(f"the signal run did not reach step {m.pause_at} in {m.timeout_s} s")
                time.sleep(0.05)
            time.sleep(0.2)  # every rank of a multi-rank run writes its marker; this check runs one
            for f in sorted(ctx.root.glob("pause.rank*")):  # the training processes only, not helpers in the group
                os.kill(int(f.read_text().split()[0]), signal.SIGUSR1)
            rc = p.wait(timeout=m.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(p)
            raise CheckFailed(f"no exit {m.timeout_s} s after SIGUSR1") from None
        except BaseException:
            if p.poll() is None:
                _kill_group(p)
            raise
    first = ctx._proc(cmd, rc, "signal_run", time.time() - t0)
    expect(rc == 0, f"after SIGUSR1 the run exited with {rc}, not 0: {first.tail(2)}")
    saved = [ln for ln in first.out.splitlines() if ln.startswith("checkpoint ") and "saved (signal" in ln]
    expect(bool(saved), "no 'checkpoint … saved (signal, …)' line after SIGUSR1")
    state = latest_state(run_dir)
    expect(state is not None and state.get("step") == m.pause_at + 1,
           f"the signal checkpoint is at step {state and state.get('step')}, expected {m.pause_at + 1} "
           "(the step after the signal)")
    # 2. the same command again: resumes there and finishes
    second = ctx.ok(ctx.run("signal_resume", args, env=env), "the resumed run")
    resumed = [ln for ln in second.out.splitlines() if ln.startswith("resumed from")]
    expect(bool(resumed) and re.search(rf"\bat step {m.pause_at + 1}\b", resumed[0]) is not None,
           f"the rerun did not say 'resumed from … at step {m.pause_at + 1}': {resumed[:1]}")
    # 3. one TensorBoard curve, on the uninterrupted run's within tolerance
    a = dict(_scalars(ref).get("train/loss", []))
    b = dict(_scalars(run_dir).get("train/loss", []))
    expect(sorted(b) == list(range(1, m.steps + 1)), f"the resumed curve has steps {sorted(b)}, expected 1..{m.steps}")
    diffs = {s: abs(a[s] - b[s]) for s in b if s in a}
    expect(len(diffs) == m.steps, f"the uninterrupted run has steps {sorted(a)}")
    worst = max(diffs, key=lambda s: diffs[s])
    expect(all(math.isfinite(v) for v in b.values()), "non-finite loss in the resumed run")
    expect(diffs[worst] <= m.resume_atol,
           f"the resumed curve leaves the uninterrupted one: step {worst} loss {b[worst]:.6f} vs {a[worst]:.6f} "
           f"(|diff| {diffs[worst]:.2e} > {m.resume_atol:g})")
    after = [s for s in diffs if s > m.pause_at + 1]
    return {"signal_after_step": m.pause_at, "saved": saved[0], "resumed": resumed[0],
            "max_abs_loss_diff": diffs[worst], "max_abs_loss_diff_after_resume": max(diffs[s] for s in after),
            "tolerance": m.resume_atol, "bit_identical": all(d == 0 for d in diffs.values())}


# ---------------------------------------------------------------- export
def check_export(ctx: Ctx) -> dict[str, Any]:
    m = ctx.mode
    run_dir = ctx.cache["zero3"]["run_dir"]
    export = ctx.runs / "zero3_export"
    ctx.ok(ctx.run("export", ["-m", "pretrain.export", str(run_dir), "--out", str(export)]), "python -m pretrain.export")
    expect((export / "config.json").is_file(), f"{export}/config.json missing")
    r = ctx.probe("export_logits", ["logits", str(run_dir), str(export)])
    expect(r["finite"], "non-finite logits")
    expect(r["device"].startswith("cuda") if m.gpu else r["device"] == "cpu", f"compared on {r['device']}")
    tol = m.logits_atol + m.logits_rtol * r["max_abs_logit"]
    expect(r["max_abs_diff"] <= tol, f"export logits differ from the engine's by {r['max_abs_diff']:.3g} "
                                     f"(tolerance {tol:.3g}; mean {r['mean_abs_diff']:.3g}, |logit| ≤ "
                                     f"{r['max_abs_logit']:.3g}, argmax agreement {r['argmax_agreement']:.4f})")
    return {"export": str(export), "tolerance": tol, **r}


# ---------------------------------------------------------------- fine-tuning
def check_finetune(ctx: Ctx) -> dict[str, Any]:
    run_dir = ctx.runs / "classify"
    d = ctx.data
    proc = ctx.ok(ctx.run("finetune_classify", ["-m", "finetune", "configs/finetune/classify.yaml",
                                                f"--run_dir={run_dir}", f"--init_from={ctx.cache['zero3']['run_dir']}",
                                                f"--data.train={d / 'cls_train.csv'}", f"--data.test={d / 'cls_test.csv'}",
                                                "--zero.stage=3", *ctx.mode.finetune]),
                  "python -m finetune (classify, ZeRO-3)")
    banner = _banner(proc.out, "fine-tune ")
    expect(f"ZeRO-3 (built partitioned), {ctx.mode.precision}" in banner,
           f"start-up line lacks 'ZeRO-3 (built partitioned), {ctx.mode.precision}': {banner}")
    metrics_file = run_dir / "metrics.json"
    expect(metrics_file.is_file(), f"{metrics_file} missing")
    metrics = json.loads(metrics_file.read_text())
    numbers = {k: v for k, v in _flatten(metrics).items() if isinstance(v, (int, float))}
    expect(all(math.isfinite(v) for v in numbers.values()), f"non-finite metrics: {numbers}")
    expect(any("accuracy" in k for k in numbers), f"no accuracy in metrics.json: {sorted(numbers)}")
    return {"run_dir": str(run_dir), "banner": banner, "metrics": {k: v for k, v in numbers.items()
                                                                    if "accuracy" in k or "f1" in k or k == "steps"}}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------- optimizer offload
def check_offload(ctx: Ctx) -> dict[str, Any]:
    run_dir = ctx.runs / "offload"
    proc = ctx.ok(ctx.run("offload_step", ctx.pretrain_args(run_dir, "--zero.stage=2", "--zero.offload_optimizer=true",
                                                            "--train.max_steps=1")),
                  "python -m pretrain (ZeRO-2, optimizer offload)")
    banner = _banner(proc.out)
    expect("offload: optimizer states → cpu" in banner, f"the engine does not offload the optimizer: {banner}")
    losses = [v for _, v in _scalars(run_dir).get("train/loss", [])]
    expect(len(losses) == 1 and math.isfinite(losses[0]), f"train/loss after one offloaded step: {losses}")
    return {"banner": banner, "loss": round(losses[0], 4), "run_seconds": round(proc.seconds, 1)}


# ---------------------------------------------------------------- the sequence
CHECKS: list[Check] = [
    Check("accelerator_cuda", check_accelerator, gpu_only=True),  # first: without a GPU nothing else is tried
    Check("backend_nccl", check_backend, gpu_only=True),
    Check("precision_auto_bf16", check_precision, gpu_only=True),
    Check("data", check_data, needs=("accelerator_cuda",)),
    Check("sdpa_no_mask", check_sdpa_no_mask, needs=("accelerator_cuda",)),
    Check("flash_sdpa", check_flash, needs=("accelerator_cuda",), gpu_only=True),
    Check("pretrain_zero2", check_zero2, needs=("data", "accelerator_cuda")),
    Check("pretrain_zero3", check_zero3, needs=("data", "accelerator_cuda")),
    Check("mfu_h200", check_mfu, needs=("pretrain_zero2", "pretrain_zero3"), gpu_only=True),
    Check("signal_resume", check_signal_resume, needs=("pretrain_zero3",)),
    Check("export_logits", check_export, needs=("pretrain_zero3",)),
    Check("finetune_classify_zero3", check_finetune, needs=("pretrain_zero3",)),
    Check("offload_step", check_offload, needs=("data", "accelerator_cuda")),
]
NAMES = [c.name for c in CHECKS]
GPU_ONLY = [c.name for c in CHECKS if c.gpu_only]


def with_prerequisites(names: list[str]) -> list[str]:
    by_name = {c.name: c for c in CHECKS}
    want: set[str] = set()

    def add(n: str) -> None:
        if n not in want:
            want.add(n)
            for dep in by_name[n].needs:
                add(dep)

    for n in names:
        add(n)
    return [n for n in NAMES if n in want]


def run_checks(ctx: Ctx, names: list[str]) -> list[dict[str, Any]]:
    records = []
    for check in CHECKS:
        if check.name not in names:
            continue
        t0 = time.time()
        if check.gpu_only and not ctx.mode.gpu:
            rec = {"name": check.name, "ok": True, "seconds": 0.0, "skipped": "cpu dry mode"}
        else:
            failed = [n for n in check.needs if n in ctx.results and not ctx.results[n]["ok"]]
            if failed:
                rec = {"name": check.name, "ok": False, "seconds": 0.0, "error": f"not run: needs {', '.join(failed)}"}
            else:
                _log(f"{check.name} …")
                try:
                    details = check.run(ctx)
                    rec = {"name": check.name, "ok": True, "seconds": round(time.time() - t0, 1), **details}
                except CheckFailed as e:
                    rec = {"name": check.name, "ok": False, "seconds": round(time.time() - t0, 1), "error": str(e)}
                except Exception as e:  # a bug in the check itself: still one line, and the others still run
                    tb = traceback.extract_tb(e.__traceback__)[-1]
                    rec = {"name": check.name, "ok": False, "seconds": round(time.time() - t0, 1),
                           "error": f"{type(e).__name__}: {e} ({Path(tb.filename).name}:{tb.lineno})"}
        ctx.results[check.name] = rec
        records.append(rec)
        if rec["ok"]:
            _log(f"{check.name}: {'skipped (' + rec['skipped'] + ')' if 'skipped' in rec else 'ok'} ({rec['seconds']}s)")
        else:
            print(f"gpu_check: FAILED {check.name}: {rec['error']}", file=sys.stderr, flush=True)
    return records


def _log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in ("torch", "deepspeed", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.splitlines()[0].split("—", 1)[-1].strip())
    ap.add_argument("--dry", action="store_true", help="CPU dry mode: the tiny preset on the CPU; GPU-only checks skipped")
    ap.add_argument("--work", type=Path, default=REPO / "out" / "gpu_check",
                    help="working directory: data, runs and logs under WORK/gpu or WORK/dry (default out/gpu_check)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where the JSON goes too (default bench/results/gpu_check/gpu_check[-dry].json)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help=f"run only these checks and what they need (repeatable or comma-separated): {', '.join(NAMES)}")
    ap.add_argument("--expect-gpu", default="H200",
                    help="the GPU table entry the MFU peak must come from (default H200; '' accepts any entry)")
    args = ap.parse_args(argv)
    only = [n for item in args.only for n in item.split(",") if n]
    unknown = [n for n in only if n not in NAMES]
    if unknown:
        ap.error(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(NAMES)}")
    names = with_prerequisites(only) if only else NAMES
    mode = DRY if args.dry else GPU
    out_path = args.out or DEFAULT_OUT / f"gpu_check{'-dry' if args.dry else ''}.json"
    ctx = Ctx(mode, args.work.resolve(), args.expect_gpu)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.time()
    _log(f"{mode.name} mode, {len(names)} check(s), work {ctx.root}")
    records = run_checks(ctx, names)
    total = round(time.time() - t0, 1)
    failed = [r["name"] for r in records if not r["ok"]]
    result = {"ok": not failed, "mode": mode.name, "failed": failed, "started_at": started, "total_seconds": total,
              "budget_seconds": mode.budget_s, "within_budget": total <= mode.budget_s, "work": str(ctx.root),
              "host": os.uname().nodename, "versions": _versions(), "checks": records}
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(text + "\n")
    except OSError as e:
        print(f"gpu_check: cannot write {out_path}: {e.strerror or e}", file=sys.stderr)
        return 1
    if total > mode.budget_s:
        _log(f"warning: took {total:.0f}s, over the {mode.budget_s:.0f}s budget of the {mode.name} mode")
    _log(f"{'all ' + str(len(records)) + ' checks ok' if not failed else 'FAILED: ' + ', '.join(failed)} "
         f"({total:.0f}s) → {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
