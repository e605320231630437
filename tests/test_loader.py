"""The packed loader: windows, deterministic global order, rank split, O(1) resume, mixtures, integrity."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as tmp_mp

from data_pipeline.build import build_shards
from data_pipeline.loader import ShardLoader, TokenStore, eval_batches
from data_pipeline.shards import Manifest
from lmforge.errors import DataError

SEQ = 32


def _all_tokens(shards: Path, split: str = "train") -> np.ndarray:
    m = Manifest(shards)
    return np.concatenate([np.fromfile(s.path, dtype=m.dtype) for s in m.shards(split)]).astype(np.int64)


def test_windows_pack_across_documents_and_cover_each_epoch(shards_dir):
    tokens = _all_tokens(shards_dir)
    ld = ShardLoader(shards_dir, seq_len=SEQ, micro_batch=1, seed=3)
    n = ld.samples_per_epoch
    assert n == (len(tokens) - 1) // SEQ
    windows = np.stack([ld.sample(g) for g in range(n)])  # one epoch
    order = ld.sources[0]._perm  # the epoch's permutation of window indices
    assert sorted(order.tolist()) == list(range(n)) and not np.array_equal(order, np.arange(n))
    for g in (0, 1, n // 2, n - 1):
        start = int(order[g]) * SEQ
        assert np.array_equal(windows[g], tokens[start : start + SEQ + 1])
    # consecutive windows overlap by one token: every token is a target once per epoch
    w0, w1 = ld.sources[0].window(0, shuffle=False), ld.sources[0].window(1, shuffle=False)
    assert w0[-1] == w1[0]
    # windows cross document boundaries: some window holds an EOS that is not its last token
    eos = Manifest(shards_dir).eos_id
    assert (windows[:, :-1] == eos).any()
    # the next epoch is another permutation
    ld.sample(n)
    assert not np.array_equal(ld.sources[0]._perm, order)


def test_order_depends_on_seed_only(shards_dir):
    a = ShardLoader(shards_dir, SEQ, 4, seed=1)
    b = ShardLoader(shards_dir, SEQ, 4, seed=1)
    c = ShardLoader(shards_dir, SEQ, 4, seed=2)
    xa, xb, xc = (np.concatenate([x.next_batch() for _ in range(5)]) for x in (a, b, c))
    assert np.array_equal(xa, xb) and not np.array_equal(xa, xc)


def test_rank_split_equals_single_rank_and_resume_is_exact(shards_dir):
    SEQ = 8192  # few samples per epoch, so the test crosses an epoch boundary
    one = ShardLoader(shards_dir, SEQ, micro_batch=4, seed=0)
    ranks = [ShardLoader(shards_dir, SEQ, micro_batch=2, seed=0, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):
        assert np.array_equal(one.next_batch(), np.concatenate([r.next_batch() for r in ranks]))
    state = one.state_dict()
    assert ranks[0].state_dict() == state == ranks[1].state_dict()
    # resume on a different world size: 2 ranks → 1, and 1 → 4 ranks
    resumed = ShardLoader(shards_dir, SEQ, micro_batch=4, seed=0)
    resumed.load_state_dict(ranks[1].state_dict())
    four = [ShardLoader(shards_dir, SEQ, micro_batch=1, seed=0, rank=r, world_size=4) for r in range(4)]
    for f in four:
        f.load_state_dict(state)
    for _ in range(30):  # goes across an epoch boundary
        want = one.next_batch()
        assert np.array_equal(resumed.next_batch(), want)
        assert np.array_equal(np.concatenate([f.next_batch() for f in four]), want)
    assert one.state_dict()["epoch"] >= 1


def test_resume_refuses_other_data_or_settings(shards_dir, tmp_path, corpus_dir, tokenizer_dir):
    ld = ShardLoader(shards_dir, SEQ, 2)
    ld.next_batch()
    state = ld.state_dict()
    with pytest.raises(DataError, match="seq_len"):
        ShardLoader(shards_dir, SEQ * 2, 2).load_state_dict(state)
    other = tmp_path / "other"
    build_shards([str(corpus_dir)], tokenizer_dir, other, shard_tokens=30_000)
    with pytest.raises(DataError, match="fingerprint changed"):
        ShardLoader(other, SEQ, 2).load_state_dict(state)
    ShardLoader(other, SEQ, 2).load_state_dict(state, allow_data_change=True)
    with pytest.raises(DataError, match="global batch"):
        ShardLoader(shards_dir, SEQ, 3).load_state_dict(state)


def test_weighted_mixture(shards_dir, tmp_path, corpus_dir, tokenizer_dir):
    other = tmp_path / "other"
    build_shards([str(corpus_dir)], tokenizer_dir, other, shard_tokens=30_000, val_docs=20, val_every=3)
    ld = ShardLoader([shards_dir, other], SEQ, 1, seed=0, weights=[0.7, 0.3])
    picks = np.array([ld.schedule.locate(g)[0] for g in range(5000)])
    assert np.bincount(picks).tolist() == [3500, 1500]  # exact per 1000-sample block
    assert 0.6 < np.mean(picks[:100] == 0) < 0.8  # interleaved, not in long runs
    # each source's local indices are consecutive: nothing skipped or repeated
    local = [[ld.schedule.locate(g)[1] for g in range(3000) if picks[g] == s] for s in (0, 1)]
    assert local[0] == list(range(2100)) and local[1] == list(range(900))
    ld2 = ShardLoader([shards_dir, other], SEQ, 1, seed=0, weights=[0.7, 0.3])
    ld2.load_state_dict({**ld.state_dict(), "cursor": 1234})
    ld.cursor = 1234
    assert np.array_equal(ld.next_batch(), ld2.next_batch())


def test_corrupt_shard_is_detected_before_training_on_it(tmp_path, corpus_dir, tokenizer_dir):
    out = tmp_path / "s"
    build_shards([str(corpus_dir)], tokenizer_dir, out, shard_tokens=50_000)
    shards = Manifest(out).shards("train")
    data = bytearray(shards[2].path.read_bytes())
    data[7] ^= 0x10
    shards[2].path.write_bytes(bytes(data))
    store = TokenStore(out)
    store.read(0, 100)  # intact shard: fine
    with pytest.raises(DataError, match=f"damaged shard: {shards[2].path}: sha256 mismatch"):
        store.read(2 * 50_000 + 5, 10)
    shards[3].path.write_bytes(shards[3].path.read_bytes()[:-2])
    with pytest.raises(DataError, match=f"shard {shards[3].path} is .* truncated"):
        ShardLoader(out, SEQ, 2)


def test_tokenizer_mismatch_and_too_long_seq_len(shards_dir):
    with pytest.raises(DataError, match="built with tokenizer"):
        ShardLoader(shards_dir, SEQ, 2, tokenizer_sha256="0" * 64)
    with pytest.raises(DataError, match="seq_len 10000000 is longer than the data"):
        ShardLoader(shards_dir, 10_000_000, 2)
    with pytest.raises(DataError, match="has no manifest.json"):
        ShardLoader(shards_dir / "tokenizer", SEQ, 2)


def test_eval_batches_are_sequential_and_rank_split(shards_dir):
    val = _all_tokens(shards_dir, "val")
    full = list(eval_batches(shards_dir, SEQ, micro_batch=2))
    assert np.array_equal(full[0][0], val[: SEQ + 1]) and np.array_equal(full[0][1], val[SEQ : 2 * SEQ + 1])
    r0 = list(eval_batches(shards_dir, SEQ, 1, rank=0, world_size=2))
    r1 = list(eval_batches(shards_dir, SEQ, 1, rank=1, world_size=2))
    assert len(r0) == len(r1) == len(full)
    assert all(np.array_equal(np.concatenate([a, b]), f) for a, b, f in zip(r0, r1, full))
    # a subset is spread over the whole split, not taken from its first documents
    total = (len(val) - 1) // SEQ
    few = np.concatenate(list(eval_batches(shards_dir, SEQ, micro_batch=2, max_samples=4)))
    for k, w in enumerate(few):
        start = (k * total // 4) * SEQ
        assert np.array_equal(w, val[start : start + SEQ + 1])


# ---------------------------------------------------------------- real processes over gloo
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, shards: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ld = ShardLoader(shards, SEQ, micro_batch=4 // world, seed=5, rank=rank, world_size=world)
        batches = [ld.next_batch() for _ in range(6)]
        state = ld.state_dict()
        # a fresh loader resumed from the state continues identically (here: on the same ranks)
        resumed = ShardLoader(shards, SEQ, micro_batch=4 // world, seed=5, rank=rank, world_size=world)
        resumed.load_state_dict(state)
        batches += [resumed.next_batch() for _ in range(6)]
        gathered: list = [None] * world
        dist.all_gather_object(gathered, batches)
        if rank == 0:
            steps = [np.concatenate([g[i] for g in gathered]) for i in range(len(batches))]
            np.save(out, np.stack(steps))
    finally:
        dist.destroy_process_group()


def test_two_processes_see_the_single_process_global_order(shards_dir, tmp_path):
    results = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}.npy"
        tmp_mp.spawn(_worker, args=(world, _free_port(), str(shards_dir), str(out)), nprocs=world, join=True)
        results[world] = np.load(out)
    assert results[1].shape == (12, 4, SEQ + 1)
    assert np.array_equal(results[1], results[2])
