"""The loss-spike guard: its verdicts (pure), the loader's skipped ranges, and a real 2-rank rollback."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import read_scalars, run_stage, stage_env

from data_pipeline.loader import ShardLoader
from lmforge.errors import DataError
from pretrain.spike import SpikeGuard

TINY = "configs/pretrain/tiny.yaml"


def _cfg(**kw):
    base = dict(action="rollback", window=10, threshold=5.0, warmup=4, min_spread=0.01, grad_norm=True,
                rollback_after=2, rollback_within=5)
    return SimpleNamespace(**{**base, **kw})


def test_a_spike_is_far_above_the_running_mean_and_is_judged_only_after_warmup():
    g = SpikeGuard(_cfg(action="skip"))
    assert not g.observe(1, 100.0).loss_spike  # nothing is a spike before `warmup` good steps
    g = SpikeGuard(_cfg(action="skip"))
    for step, loss in enumerate([5.0, 4.9, 5.1, 5.0, 4.95], 1):
        assert not g.observe(step, loss).loss_spike
    v = g.observe(6, 5.3)  # within 5 deviations of a noisy curve: training as usual
    assert not v.loss_spike and not v.skip
    v = g.observe(7, 9.0)
    assert v.loss_spike and v.skip and not v.rollback  # action skip never rolls back
    assert 9.0 not in g.losses  # a spike does not move the mean it is judged against
    assert not g.observe(8, math.nan).loss_spike  # non-finite losses are the NaN guard's


def test_a_flat_curve_has_a_spread_floor_and_log_only_counts():
    g = SpikeGuard(_cfg(action="log", min_spread=0.05))
    for step in range(1, 6):
        g.observe(step, 2.0)  # zero spread: without the floor any noise would be a spike
    assert not g.observe(6, 2.2).loss_spike  # 2.2 < 2.0 + 5 x 0.05 x 2.0
    v = g.observe(7, 3.0)
    assert v.loss_spike and not v.skip and not v.rollback


def test_rollback_after_k_spikes_within_n_steps_and_grad_norm_spikes_count():
    g = SpikeGuard(_cfg())
    for step in range(1, 7):
        g.observe(step, 3.0 - 0.01 * step, prev_grad_norm=1.0 + 0.01 * (step % 3))
    v = g.observe(7, 30.0, prev_grad_norm=1.0)
    assert v.loss_spike and v.skip and not v.rollback
    for step in (8, 9, 10, 11):
        assert not g.observe(step, 2.9, prev_grad_norm=1.01).rollback
    # the first spike left the 5-step window; a gradient-norm spike alone cannot be skipped, but it counts
    v = g.observe(12, 2.9, prev_grad_norm=50.0)
    assert v.grad_spike and not v.skip and not v.rollback
    v = g.observe(13, 40.0, prev_grad_norm=1.0)
    assert v.rollback and g.first_recent_spike() == 12
    state = json.loads(json.dumps(g.state_dict()))  # what a checkpoint records
    h = SpikeGuard(_cfg())
    h.load_state_dict(state)
    assert h.state_dict() == g.state_dict()


def test_the_loader_jumps_over_skipped_ranges_on_step_boundaries(shards_dir):
    loaders = [ShardLoader(shards_dir, 32, 2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    ref = ShardLoader(shards_dir, 32, 4, seed=3)
    for ld in loaders:
        ld.add_skip(8, 16)
        ld.add_skip(4, 8)  # adjacent ranges: one jump lands in the next
    got = [np.concatenate([ld.next_batch() for ld in loaders]) for _ in range(2)]
    assert [ld.cursor for ld in loaders] == [20, 20]
    np.testing.assert_array_equal(got[0], np.stack([ref.sample(g) for g in range(0, 4)]))
    np.testing.assert_array_equal(got[1], np.stack([ref.sample(g) for g in range(16, 20)]))
    with pytest.raises(DataError, match=r"skip range \[2, 8\).*multiples of micro batch x ranks = 4"):
        loaders[0].add_skip(2, 8)


def _args(run_dir, shards, *extra):
    # global batch 8 (micro 4 x 2 ranks): step s trains global samples [8(s-1), 8s)
    return [TINY, f"--run_dir={run_dir}", f"--data.shards=[{shards}]", "--data.seq_len=64", "--train.max_steps=14",
            "--train.micro_batch_size=4", "--train.log_every=1", "--train.eval_every=0", "--train.eval_samples=8",
            "--zero.stage=1", "--checkpoint.interval_steps=4", "--spike.warmup=4", "--spike.threshold=5",
            "--spike.grad_norm=false", "--callbacks=[hooks:record_samples,hooks:spike]", *extra]


def _trained(folder, rank):
    return [json.loads(line) for line in (folder / f"rank{rank}.jsonl").read_text().splitlines()]


def test_a_rollback_skips_the_spiking_data_and_then_matches_a_run_that_never_had_it(tmp_path, shards_dir):
    """Samples 72-87 (steps 10-11) multiply the loss by 30 (bad data). With rollback after 2 spikes in 5
    steps, the run skips both updates, returns to the checkpoint of step 8 and moves past samples
    [64, 88): everything trained since that checkpoint. A run told to skip [64, 88) from the start, with
    no bad data at all, must give the same curve."""
    spiky, ref = tmp_path / "spiky", tmp_path / "ref"
    for d in (spiky, ref):
        (d / "samples").mkdir(parents=True)
    proc = run_stage("pretrain", _args(spiky, shards_dir, "--spike.action=rollback", "--spike.rollback_after=2",
                                       "--spike.rollback_within=5"), nproc=2,
                     env=stage_env(LMFORGE_SPIKE_SAMPLES="72:88x30", LMFORGE_TEST_SAMPLES=str(spiky / "samples")))
    assert "spike at step 10: loss" in proc.stdout and "update skipped" in proc.stdout
    assert "rollback 1: spikes at steps [10, 11] → back to step_00000008; global samples [64, 88)" in proc.stdout
    skips = json.loads((spiky / "data_skips.json").read_text())["skips"]
    assert [(s["start"], s["end"], s["from_step"], s["to_step"]) for s in skips] == [(64, 88, 11, 8)]

    for rank in (0, 1):  # the samples of the abandoned steps 9-11 are never trained on again
        rows = _trained(spiky / "samples", rank)
        back = next(i for i in range(1, len(rows)) if rows[i]["step"] < rows[i - 1]["step"])
        assert rows[back]["step"] == 9
        after = [g for row in rows[back:] for g in row["ids"]]
        assert min(after) >= 88

    run_stage("pretrain", _args(ref, shards_dir, "--spike.action=log", "--data.skip_samples=[[64,88]]"), nproc=2,
              env=stage_env(LMFORGE_SPIKE_SAMPLES="0:0", LMFORGE_TEST_SAMPLES=str(ref / "samples")))
    got, want = read_scalars(spiky), read_scalars(ref)
    assert [s for s, _ in got["train/loss"]] == list(range(1, 15))  # the abandoned steps' events are purged
    np.testing.assert_allclose([v for _, v in got["train/loss"]], [v for _, v in want["train/loss"]], rtol=0,
                               atol=1e-4)
    assert got["train/rollbacks"][-1][1] == 1 and got["train/spikes"][-1][1] == 2
    assert got["train/skipped_samples"][-1][1] == 24
    assert want["train/spikes"][-1][1] == 0 and want["train/rollbacks"][-1][1] == 0
    # the resumable state carries the rollback: the last checkpoint records it, and data_skips.json the range
    state = json.loads((spiky / "checkpoints" / "step_00000014" / "trainer_state.json").read_text())
    assert state["trainer"]["rollbacks"] == 1 and state["loader"]["cursor"] == 14 * 8 + 24


def test_zero0_skips_a_spiking_step_and_logs_the_gradient_norm(tmp_path, shards_dir):
    proc = run_stage("pretrain", [TINY, f"--run_dir={tmp_path}", f"--data.shards=[{shards_dir}]", "--data.seq_len=64",
                                  "--train.max_steps=9", "--train.micro_batch_size=4", "--train.log_every=1",
                                  "--train.eval_every=0", "--train.eval_samples=8", "--zero.stage=0",
                                  "--spike.action=skip", "--spike.warmup=4", "--spike.grad_norm=false",
                                  "--callbacks=[hooks:spike]"],
                     env=stage_env(LMFORGE_SPIKE_SAMPLES="28:32x30"))  # step 8 of micro 4 on 1 rank
    assert "spike at step 8: loss" in proc.stdout
    tags = read_scalars(tmp_path)
    skipped, lr = dict(tags["train/skipped_steps"]), dict(tags["train/lr"])
    assert skipped[7] == 0 and skipped[8] == 1 and lr[8] == lr[7]  # no update, the schedule held
    assert dict(tags["train/spikes"])[9] == 1
    norms = dict(tags["train/grad_norm"])
    assert 8 not in norms and all(0 < norms[s] < 100 for s in (1, 7, 9))
