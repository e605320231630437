"""Shared fixtures: a small tokenizer and shard set made from the embedded default corpus, once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

from slurm_fixtures import slurm_cluster  # noqa: E402, F401  (the local SLURM cluster, started on first use)


@pytest.fixture(scope="session")
def stdlib_files() -> list[str]:
    """150 real Python files from the embedded default corpus (deterministic choice)."""
    from data_pipeline.sources import default_corpus_paths, expand_inputs

    files = sorted(str(s.path) for s in expand_inputs(default_corpus_paths()))
    return files[:: max(1, len(files) // 150)][:150]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory, stdlib_files) -> Path:
    """A directory of ~150 text documents (copies of stdlib files), the tests' small corpus."""
    d = tmp_path_factory.mktemp("corpus")
    for i, f in enumerate(stdlib_files):
        (d / f"doc_{i:04d}.py").write_bytes(Path(f).read_bytes())
    return d


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_dir) -> Path:
    from data_pipeline.sources import iter_documents
    from data_pipeline.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(
        iter_documents([str(corpus_dir)]), out, vocab_size=1024, model_type="unigram", extra_special_tokens=["<mask>"]
    )
    return out


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory, corpus_dir, tokenizer_dir) -> Path:
    from data_pipeline.build import build_shards

    out = tmp_path_factory.mktemp("shards") / "s"
    build_shards([str(corpus_dir)], tokenizer_dir, out, workers=1, shard_tokens=50_000, val_docs=10, val_every=10)
    return out


# ---------------------------------------------------------------- running the pretrain stage for real
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"),
        PYTHONPATH=str(REPO),
        LMFORGE_PROGRESS="0",
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def run_stage(module: str, args: list[str], nproc: int = 1, env: dict[str, str] | None = None, check: bool = True,
              timeout: int = 600):
    """``python -m MODULE`` (nproc=1) or ``torchrun --nproc_per_node N -m MODULE`` as a real subprocess."""
    import subprocess
    import sys

    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", module, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env or stage_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's TensorBoard event files, read back with tensorboard itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
