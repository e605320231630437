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


@pytest.fixture(scope="session")
def causal_zero3(tmp_path_factory, shards_dir) -> Path:
    """A tiny causal model pretrained 20 steps on 2 ranks with ZeRO-3 (its checkpoint is partitioned): what the
    fine-tuning tests start from and the export test exports. Read-only for the tests."""
    return pretrain_tiny(tmp_path_factory.mktemp("pre") / "causal", shards_dir, 2, "--zero.stage=3")


def pretrain_tiny(run_dir: Path, shards: Path, nproc: int, *extra: str) -> Path:
    """20 steps of the ``tiny`` preset at seq_len 64: the backbone the fine-tuning tests start from."""
    run_stage("pretrain", ["configs/pretrain/tiny.yaml", f"--run_dir={run_dir}", f"--data.shards=[{shards}]",
                           "--data.seq_len=64", "--train.max_steps=20", "--train.eval_every=0", "--train.eval_samples=8",
                           "--train.micro_batch_size=4", "--optim.warmup_steps=3", *extra], nproc=nproc)
    return run_dir


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
        LMFORGE_ACCELERATOR="cpu",  # asked for by name: the suite runs on the CPU on GPU machines too
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"),
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),  # tests/hooks.py: --callbacks=[hooks:...]
        LMFORGE_PROGRESS="0",
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def run_stage(module: str, args: list[str], nproc: int = 1, env: dict[str, str] | None = None, check: bool = True,
              timeout: int = 600, nofile: int | None = None, launcher: str = "static"):
    """``python -m MODULE`` (nproc=1), or N ranks of it as real subprocesses: by default started with their
    RANK/WORLD_SIZE/MASTER_* environment as srun or a static launcher does (``tests/launch_ranks.py``: the
    others are killed when one fails), ``launcher="torchrun"`` through ``torchrun --nproc_per_node N``.

    ``nofile``: RLIMIT_NOFILE (soft and hard) of the run, as ``ulimit -n`` on a cluster. A run past
    ``timeout`` is killed with all its ranks (its own process group), then the test fails.
    """
    import resource
    import signal
    import subprocess
    import sys

    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", module, *args]
    else:
        cmd = [sys.executable, str(REPO / "tests" / "launch_ranks.py"), str(nproc), str(_free_port()), "-m", module,
               *args]

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    popen = subprocess.Popen(cmd, cwd=REPO, env=env or stage_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, preexec_fn=limit, start_new_session=True)
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)  # the ranks too, not only torchrun
        out, err = popen.communicate()
        raise AssertionError(f"{' '.join(cmd)}: no exit after {timeout} s:\n{out[-3000:]}\n{err[-3000:]}") from None
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's TensorBoard event files, read back with tensorboard itself."""
    import lmforge.tensorboard as tb

    return tb.read_scalars(tb.tensorboard_dir(run_dir))


_SLOW_SITE = '''"""Written by tests/conftest.py slowed_env(): make chosen work slower than a collective timeout."""
import importlib.abc, importlib.machinery, sys, time

SLOW = {slow!r}  # "module:function" -> seconds; "argv:MODULE" -> seconds at start-up of `python -m MODULE`
for key, s in SLOW.items():
    if key.startswith("argv:") and key[5:] in sys.orig_argv:
        time.sleep(s)


class _Slow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        targets = [k for k in SLOW if k.split(":")[0] == name]
        if not targets:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            for key in targets:
                attr = key.split(":")[1]
                fn = getattr(module, attr)

                def slowed(*a, _fn=fn, _s=SLOW[key], **k):
                    time.sleep(_s)
                    return _fn(*a, **k)

                setattr(module, attr, slowed)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Slow())
'''


def slowed_env(folder: Path, slow: dict[str, float], env: dict[str, str] | None = None) -> dict[str, str]:
    """``stage_env()`` whose processes sleep ``slow[key]`` seconds in ``module:function`` (or, for
    ``argv:MODULE``, at the start of ``python -m MODULE``): work made longer than a process-group
    timeout, the way a 7B conversion or export is, without a branch in lmforge's code."""
    return site_env(folder, _SLOW_SITE.format(slow=slow), env)


def site_env(folder: Path, code: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """``stage_env()`` whose Python processes run ``code`` at start-up (a ``sitecustomize`` in ``folder``):
    how a test patches a condition it cannot create here (slow work, visible CUDA devices)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    env = dict(env or stage_env())
    env["PYTHONPATH"] = os.pathsep.join([str(folder), env["PYTHONPATH"]])
    return env
