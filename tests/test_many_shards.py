"""Thousands of shards under a small ``ulimit -n``: the loader keeps a bounded number of files open.

A 7B run reads ~8,000 shards and many clusters give jobs ``ulimit -n`` 1024 (hard 4096). A loader
that kept one map per shard open ran out of descriptors mid-run (a 2-rank run over 2,980 shards
under ``ulimit -n 256`` logged step 10, then stalled).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, read_scalars, run_stage

from data_pipeline.build import build_shards
from data_pipeline.loader import ShardLoader, TokenStore, eval_batches
from data_pipeline.shards import MANIFEST, Manifest, manifest_fingerprint
from lmforge.errors import DataError

SHARD_TOKENS = 32  # a 64-token window spans ~3 shards: each read crosses files
NOFILE = 256  # soft and hard: raising the soft limit at start-up cannot rescue a leaking loader


def _reshard(root: Path, shard_tokens: int) -> None:
    """Cut every split of a built shard set into shards of ``shard_tokens`` (same tokens, same order).

    ``build_shards --shard-tokens 32`` makes the same layout, but it rewrites its progress record
    (a list of every shard so far) after each shard: 3,000 shards took ~55 s here, this takes ~1 s.
    """
    m = json.loads((root / MANIFEST).read_text())
    dtype, eos = Manifest(root).dtype, m["tokenizer"]["eos_id"]
    for split, info in m["splits"].items():
        old = [root / s["file"] for s in info["shards"]]
        tokens = np.concatenate([np.fromfile(p, dtype=dtype) for p in old]) if old else np.zeros(0, dtype)
        for p in old:
            p.unlink()
        shards = []
        for k, start in enumerate(range(0, len(tokens), shard_tokens)):
            piece = tokens[start : start + shard_tokens].tobytes()
            name = f"{split}_{k:05d}.bin"
            (root / name).write_bytes(piece)
            docs = int(np.count_nonzero(tokens[start : start + shard_tokens] == eos))
            shards.append({"file": name, "tokens": len(piece) // dtype.itemsize, "documents": docs,
                           "sha256": hashlib.sha256(piece).hexdigest()})
        info["shards"] = shards
    m["fingerprint"] = manifest_fingerprint(m)
    (root / MANIFEST).write_text(json.dumps(m, indent=1))


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, corpus_dir, tokenizer_dir) -> Path:
    """~3,100 train shards and ~1,100 val shards of 32 tokens, from 20 documents of the test corpus."""
    docs = sorted(corpus_dir.iterdir())
    # the largest of the first 20 documents is held out (it is the last one the build reads), so
    # evaluation also walks over a thousand shards
    chosen = docs[:20]
    big = max(chosen, key=lambda p: p.stat().st_size)
    src = tmp_path_factory.mktemp("docs")
    for i, p in enumerate([p for p in chosen if p != big] + [big]):
        shutil.copyfile(p, src / f"doc_{i:03d}.py")
    out = tmp_path_factory.mktemp("many") / "s"
    build_shards([str(src)], tokenizer_dir, out, shard_tokens=1 << 20, val_docs=1, val_every=len(chosen))
    _reshard(out, SHARD_TOKENS)
    m = Manifest(out)
    assert len(m.shards("train")) >= 3000 and len(m.shards("val")) >= 500  # what the tests below rely on
    return out


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _shards_touched(store: TokenStore, starts: np.ndarray, length: int) -> np.ndarray:
    """Indices of the shards that reads [start, start + length) touch."""
    first = np.searchsorted(store.offsets, starts, side="right") - 1
    last = np.searchsorted(store.offsets, starts + length - 1, side="right") - 1
    return np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last)]))


def test_open_files_stay_bounded_while_reading_every_shard(many_shards):
    m = Manifest(many_shards)
    tokens = np.concatenate([np.fromfile(s.path, dtype=m.dtype) for s in m.shards("train")]).astype(np.int64)
    store = TokenStore(many_shards, max_open=16)
    before = _open_fds()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # leave room for 64 more descriptors only: a store that keeps every shard open hits EMFILE
    resource.setrlimit(resource.RLIMIT_NOFILE, (before + 64, hard))
    try:
        starts = np.random.default_rng(0).permutation((len(tokens) - 1) // 50) * 50  # random order, all shards
        peak = before
        for start in starts:
            assert np.array_equal(store.read(int(start), 51), tokens[start : start + 51])
            peak = max(peak, _open_fds())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(_shards_touched(store, starts, 51)) == len(store.shards)
    assert peak - before <= 16
    store.close()
    assert _open_fds() <= before


def test_running_out_of_descriptors_is_a_one_line_data_error(many_shards):
    store = TokenStore(many_shards, verify=False, max_open=100_000)  # a budget above what the limit allows
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_open_fds() + 32, hard))
    try:
        with pytest.raises(DataError, match=r"cannot open shard .*train_\d+\.bin: Too many open files; raise `ulimit -n`"):
            store.read(0, store.tokens)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        store.close()


def test_each_shard_is_hashed_once_however_often_it_is_reopened(many_shards):
    store = TokenStore(many_shards, max_open=2)
    hashed: list[Path] = []
    verify = store.manifest.verify_shard
    store.manifest.verify_shard = lambda s: hashed.append(s.path) or verify(s)  # count, then really hash
    for _ in range(2):  # the second pass reopens every shard (only 2 stay open)
        for start in range(0, store.tokens - 40, 40):
            store.read(start, 41)
    assert len(hashed) == len(set(hashed)) == len(store.shards)


def test_a_shard_cut_short_during_a_run_is_a_data_error(shards_dir, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(shards_dir, root)
    store = TokenStore(root)
    first = store.shards[0]
    store.read(0, 10)  # verified and open
    first.path.write_bytes(first.path.read_bytes()[: first.tokens])  # half its bytes, under the open file
    with pytest.raises(DataError, match=f"shard {first.path} ends before its manifest size .* rebuild or restore it"):
        store.read(first.tokens - 5, 10)


def test_evaluation_keeps_open_files_bounded(many_shards):
    before = _open_fds()
    peak = before
    for _ in eval_batches(many_shards, 64, micro_batch=4):  # every val window, in order: every val shard
        peak = max(peak, _open_fds())
    assert peak - before <= 128
    assert _open_fds() <= before  # the stores are closed when the pass ends


@pytest.mark.parametrize("soft, hard", [(256, 1024), (256, 256)])
def test_start_up_raises_the_soft_open_file_limit_to_the_hard_one(soft, hard):
    code = ("import resource; from lmforge.limits import raise_open_file_limit as r; "
            "print(*r(), *resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))).stdout
    assert out.split() == [str(soft), str(hard), str(hard), str(hard)]  # (old, new) returned, and in effect


def test_two_rank_run_over_3000_shards_under_ulimit_256(many_shards, tmp_path):
    seq, global_batch = 64, 160
    probe = ShardLoader(many_shards, seq, global_batch)
    steps = -(-probe.samples_per_epoch // global_batch)  # one full epoch: every window, so every shard
    run_dir = tmp_path / "run"
    run_stage("pretrain", [
        "configs/pretrain/tiny.yaml", f"--run_dir={run_dir}", f"--data.shards=[{many_shards}]", f"--data.seq_len={seq}",
        f"--train.global_batch_size={global_batch}", f"--train.micro_batch_size={global_batch // 2}",
        f"--train.max_steps={steps}", "--train.eval_every=0", f"--train.eval_samples={global_batch}",
        "--train.log_every=1", "--optim.warmup_steps=2", "--model.num_layers=1",
    ], nproc=2, nofile=NOFILE, timeout=300)
    ckpt = run_dir / "checkpoints" / f"step_{steps:08d}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    cursor = state["loader"]["cursor"]
    assert cursor == steps * global_batch

    # Which shards did the run read? Replay its global samples through the loader's own order.
    seed = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["seed"]
    loader = ShardLoader(many_shards, seq, global_batch, seed=seed)
    store, starts = loader.sources[0].store, []
    store.read = lambda start, length: starts.append(start) or np.zeros(length, np.int64)  # record only
    for g in range(cursor):
        loader.sample(g)
    # an epoch's windows cover tokens [0, n * seq]: every shard but those holding only the tail after it
    readable = int(np.searchsorted(store.offsets, loader.samples_per_epoch * seq, side="right"))
    assert readable >= 3000 and readable >= len(store.shards) - 2  # the tail is shorter than one window
    assert np.array_equal(_shards_touched(store, np.array(starts), seq + 1), np.arange(readable))
    assert len(read_scalars(run_dir)["eval/loss"]) == 1  # the final evaluation read the val shards too
