"""Shards are hashed once per job, striped over the ranks, and the run remembers it (issue: every rank hashed
every shard inside the training loop, again after each requeue: ~8.6 TB of reads at 7B x 32 ranks)."""

from __future__ import annotations

import collections
import shutil

from conftest import run_stage, site_env

TINY = "configs/pretrain/tiny.yaml"

# every sha256_file call of every process, appended to $LMFORGE_TEST_HASHLOG (the real hash still runs)
_COUNT_HASHES = '''
import os
import data_pipeline.shards as shards
_real = shards.sha256_file
def _counted(path, *a, **kw):
    with open(os.environ["LMFORGE_TEST_HASHLOG"], "a") as f:
        f.write(f"{os.environ.get('RANK', '0')} {path}\\n")
    return _real(path, *a, **kw)
shards.sha256_file = _counted
'''


def _args(run_dir, shards, *extra):
    return [TINY, f"--run_dir={run_dir}", f"--data.shards=[{shards}]", "--data.seq_len=64", "--train.log_every=1",
            "--train.eval_every=2", "--train.eval_samples=8", "--train.micro_batch_size=2", *extra]


def _hashes(log) -> list[tuple[str, str]]:
    return [tuple(line.split(" ", 1)) for line in log.read_text().splitlines()] if log.exists() else []


def test_each_shard_is_hashed_once_per_job_striped_and_not_again_after_a_requeue(tmp_path, shards_dir):
    from data_pipeline.shards import Manifest

    log = tmp_path / "hashes.log"
    env = site_env(tmp_path / "site", _COUNT_HASHES)
    env["LMFORGE_TEST_HASHLOG"] = str(log)
    rd = tmp_path / "run"
    m = Manifest(shards_dir)
    files = {str(s.path) for split in m.splits() for s in m.shards(split)}
    assert len(files) >= 4 and m.shards("val")  # train and validation shards, several of each rank's share
    out = run_stage("pretrain", _args(rd, shards_dir, "--train.max_steps=4", "--train.exit_interval=2"), nproc=2,
                    env=env)
    hashed = _hashes(log)
    counts = collections.Counter(path for _, path in hashed)
    assert set(counts) == files and set(counts.values()) == {1}  # every shard (val too), exactly once in total
    by_rank = collections.Counter(rank for rank, _ in hashed)
    assert set(by_rank) == {"0", "1"} and abs(by_rank["0"] - by_rank["1"]) <= 1  # striped over the ranks
    assert f"shards verified: {len(files)} hashed on 2 rank(s), 0 already" in out.stdout
    log.unlink()
    # the requeued job (the same run dir) trusts the record for files that did not change since
    out = run_stage("pretrain", _args(rd, shards_dir, "--train.max_steps=4"), nproc=2, env=env)
    assert "at step 2" in out.stdout and _hashes(log) == []
    assert f"shards verified: 0 hashed on 2 rank(s), {len(files)} already verified by this run" in out.stdout


def test_a_corrupt_shard_stops_the_run_naming_it(tmp_path, shards_dir):
    from data_pipeline.shards import Manifest

    bad = tmp_path / "shards"
    shutil.copytree(shards_dir, bad)
    victim = Manifest(bad).shards("train")[-1].path
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    victim.write_bytes(bytes(data))
    proc = run_stage("pretrain", _args(tmp_path / "run", bad, "--train.max_steps=2"), nproc=2, check=False)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert f"{victim}: sha256 mismatch (corrupt)" in err and "refusing to train on a damaged shard" in err
