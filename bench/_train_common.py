"""Pieces shared by the training benchmarks (train_throughput, checkpoint) and their helper scripts.

* the subprocess environment (CPU DeepSpeed, 1 thread per process, offline),
* the token shards they train on (the demo's when present, else built once into the cache),
* torchrun command lines, TensorBoard read-back, per-process peak RSS of a process tree,
* :class:`WindowDataset`: the packed windows of :class:`data_pipeline.loader.ShardLoader` by global index.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import CACHE_DIR

REPO = Path(__file__).resolve().parents[1]
SCRATCH = CACHE_DIR / "scratch"
VOCAB = 8192
SUB_ENV = {
    "DS_ACCELERATOR": "cpu",
    "LMFORGE_ACCELERATOR": "cpu",  # the CPU benchmarks ask for it by name (pretrain.dist refuses cpu on GPU hosts)
    "OMP_NUM_THREADS": "1",
    "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "LMFORGE_PROGRESS": "0",
    "PYTHONWARNINGS": "ignore",
    "PYTHONPATH": str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
}


def log(name: str, msg: str) -> None:
    print(f"[bench.{name}] {msg}", file=sys.stderr, flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------- data
def ensure_shards(name: str) -> Path:
    """8192-vocab shards of the embedded default corpus, in the cache (copied from out/demo when there)."""
    dst = CACHE_DIR / f"shards-{VOCAB}"
    if (dst / "manifest.json").is_file():
        return dst
    demo = REPO / "out" / "demo" / "shards"
    shutil.rmtree(dst, ignore_errors=True)
    if (demo / "manifest.json").is_file():
        log(name, f"copying the demo shards {demo} → {dst} (once)")
        shutil.copytree(demo, dst.with_name(dst.name + ".tmp"), dirs_exist_ok=True)
        os.replace(dst.with_name(dst.name + ".tmp"), dst)
        return dst
    tok = CACHE_DIR / f"tokenizer-{VOCAB}-mask"
    log(name, f"training a tokenizer and building shards into {dst} (once, a few minutes)")
    env = {**os.environ, **SUB_ENV}
    py = sys.executable
    if not (tok / "tokenizer.model").is_file():
        subprocess.run([py, "-m", "data_pipeline", "train-tokenizer", "--vocab-size", str(VOCAB), "--out", str(tok),
                        "--extra-special-tokens", "<mask>"], env=env, cwd=REPO, check=True)
    subprocess.run([py, "-m", "data_pipeline", "build", "--tokenizer", str(tok), "--out", str(dst),
                    "--val-docs", "50"], env=env, cwd=REPO, check=True)
    return dst


class WindowDataset:
    """Global sample ``i`` of ShardLoader (the windows our trainer sees), as HF-style dict items."""

    def __init__(self, shards: list[str], seq_len: int, seed: int, n: int):
        from data_pipeline.loader import ShardLoader

        self.loader = ShardLoader(shards, seq_len, 1, seed=seed)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def window(self, i: int):
        import torch

        return torch.from_numpy(self.loader.sample(i))  # (T+1,) int64

    def __getitem__(self, i: int) -> dict[str, Any]:
        w = self.window(i)
        # forward on T tokens, T targets: the same work as our trainer (HF's loss takes shift_labels as is)
        return {"input_ids": w[:-1], "labels": w[:-1], "shift_labels": w[1:]}


# ---------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", module, *args]


def run_tree(cmd: list[str], env: dict[str, str] | None = None, timeout: float | None = None,
             interval: float = 0.1) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, CPU seconds, output, and peak RSS per *worker* process.

    ``peak_rss_mb_per_proc`` is the largest of the per-process peaks of the root's descendants
    (torchrun's workers and anything they start; the root itself when it never had children), each
    the larger of the sampled RSS and the kernel's high-water mark (VmHWM, read while it lives);
    ``peak_rss_mb_tree`` is the peak of the summed tree (what run_measured reports).
    """
    import psutil

    full_env = {**os.environ, **SUB_ENV, **(env or {})}
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=full_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    per_pid: dict[int, int] = {}
    tree_peak = 0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        if timeout and time.perf_counter() - t0 > timeout:
            proc.kill()
            break
        try:
            kids = root.children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        total = 0
        for p in [root, *kids]:
            try:
                rss = p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            total += rss
            if p.pid != root.pid or not kids:
                per_pid[p.pid] = max(per_pid.get(p.pid, 0), rss, _hwm(p.pid))
        tree_peak = max(tree_peak, total)
        time.sleep(interval)
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    reader.join()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    kids_peaks = [v for k, v in per_pid.items() if k != root.pid]
    workers = sorted(kids_peaks or [per_pid.get(root.pid, 0)], reverse=True)
    return {"returncode": rc, "seconds": seconds, "output": "".join(out),
            "cpu_seconds": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
            "peak_rss_mb_per_proc": workers[0] / 2**20, "peak_rss_mb_procs": [round(v / 2**20, 1) for v in workers],
            "peak_rss_mb_tree": tree_peak / 2**20}


def _hwm(pid: int) -> int:
    """Peak RSS so far of a live process (VmHWM), bytes; 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def check(name: str, what: str, r: dict[str, Any]) -> None:
    if r["returncode"] != 0:
        raise SystemExit(f"[bench.{name}] {what} failed (exit {r['returncode']}):\n{r['output'][-4000:]}")


# ---------------------------------------------------------------- TensorBoard
def tb_scalars(run_dir: Path, tag: str) -> list[tuple[float, int, float]]:
    """(wall_time, step, value) of one scalar, sorted by step."""
    from lmforge.tensorboard import read_scalars, tensorboard_dir

    points = read_scalars(tensorboard_dir(run_dir), tags=[tag], wall_time=True)[tag]
    return sorted(((w, s, v) for s, v, w in points), key=lambda t: t[1])
