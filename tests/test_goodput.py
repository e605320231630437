"""Goodput across restarts and the straggler monitor (issue 16), on one real 2-rank run: rank 1 reads its data
slowly (tests/hooks.py ``slow``), the run is killed with SIGKILL two steps after its first checkpoint and
resumed to the end."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from conftest import REPO, read_scalars, run_stage, stage_env

TINY = "configs/pretrain/tiny.yaml"
SLOW_S = 0.3  # rank 1's extra wait per micro-batch (a step of the tiny model takes ~0.02 s)


def _args(run_dir, shards) -> list[str]:
    return [TINY, f"--run_dir={run_dir}", f"--data.shards=[{shards}]", "--train.log_every=2", "--train.eval_every=0",
            "--train.eval_samples=8", "--data.seq_len=64", "--train.global_batch_size=4", "--train.micro_batch_size=2",
            "--optim.warmup_steps=3", "--train.max_steps=10", "--checkpoint.interval_steps=4",
            "--metrics.straggler_ratio=1.3", "--callbacks=[hooks:slow]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def restarted(tmp_path_factory, shards_dir):
    """(run dir, stdout of both segments): killed with SIGKILL at step 6 (checkpoint: step 4), then resumed."""
    from pretrain.goodput import read_segments

    run_dir = tmp_path_factory.mktemp("goodput") / "run"
    env = stage_env(LMFORGE_TEST_SLOW=f"{SLOW_S}@1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "pretrain", *_args(run_dir, shards_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    marker = run_dir / "checkpoints" / "step_00000004" / "trainer_state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        segs = read_segments(run_dir) if marker.exists() else []
        if segs and segs[-1]["step"] >= 6:  # rank 0's record of the logging step 6: two steps past the checkpoint
            break
        time.sleep(0.02)
    ranks = psutil.Process(proc.pid).children(recursive=True)  # torchrun starts each in its own session
    os.killpg(proc.pid, signal.SIGKILL)
    for p in ranks:  # a node crash: every process of the job at once
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    first, _ = proc.communicate()
    assert marker.exists() and not (run_dir / "checkpoints" / "step_00000008").exists(), first[-3000:]
    second = run_stage("pretrain", _args(run_dir, shards_dir), nproc=2, env=env)
    assert "resumed from" in second.stdout and "at step 4" in second.stdout
    return run_dir, first + second.stdout


def test_goodput_counts_the_work_a_crash_lost(restarted):
    from pretrain.goodput import account, read_segments
    from slurm import status

    run_dir, _ = restarted
    segs = read_segments(run_dir)
    assert [(s["resumed_from"], s["first_step"], s["step"], s["ended"]) for s in segs] == [
        (None, 0, 6, None), (4, 4, 10, "finished")]
    assert set(segs[0]["saved"]) == {"4"} and set(segs[1]["saved"]) == {"8", "10"}
    acc = account(segs)
    parts, wall = acc["parts"], acc["wall"]
    # steps 5-6 of the killed segment were trained again: lost (each takes rank 1's SLOW_S at least)
    assert 2 * SLOW_S * 0.8 < parts["lost"] < segs[0]["seconds"]["productive"], parts
    assert 0 < acc["fraction"] < 1 and parts["productive"] > 8 * SLOW_S * 0.8
    assert parts["startup"] > 0 and parts["checkpoint_save"] > 0 and parts["checkpoint_load"] > 0
    # the named parts add up to the wall time (the sum over segments of last record - process start)
    assert abs(wall - sum(v for k, v in parts.items() if k != "other")) <= 0.05 * wall, parts
    assert wall == pytest.approx(sum(s["updated"] - s["start"] for s in segs))

    out = subprocess.run([sys.executable, "-m", "pretrain.goodput", str(run_dir)], cwd=REPO, env=stage_env(),
                         capture_output=True, text=True, check=True).stdout
    assert f"goodput of {run_dir}: {acc['fraction']:.1%}" in out and "over 2 segment(s)" in out
    lost_row = next(line.split() for line in out.splitlines() if line.strip().startswith("lost"))
    assert float(lost_row[1]) == pytest.approx(parts["lost"], abs=0.051) and float(lost_row[3]) > 0  # seg 0 lost it
    assert "segment 1: resumed from step 4, steps 4→10, 2 rank(s)" in out

    tb = read_scalars(run_dir)
    for tag in ("goodput/fraction", "goodput/productive_s", "goodput/lost_s", "goodput/startup_s",
                "goodput/checkpoint_save_s", "goodput/data_s", "goodput/other_s", "goodput/wall_s"):
        assert tag in tb, sorted(tb)
    steps = [s for s, _ in tb["goodput/fraction"]]
    assert steps[:2] == [2, 4] and steps[-1] == 10  # one curve: the killed segment's step 6 is purged
    assert tb["goodput/lost_s"][-1][1] == pytest.approx(parts["lost"], rel=1e-4)  # cumulative over segments
    assert tb["goodput/fraction"][-1][1] == pytest.approx(acc["fraction"], rel=1e-4)

    assert status.main([str(run_dir)]) == 0  # slurm.status shows the summary line too


def test_a_slow_rank_is_named_as_the_straggler(restarted):
    run_dir, stdout = restarted
    warned = [line for line in stdout.splitlines() if line.startswith("warning: straggler rank")]
    assert warned and all(line.startswith(f"warning: straggler rank 1 on host {socket.gethostname()}:")
                          for line in warned), stdout[-3000:]
    tb = read_scalars(run_dir)
    ranks = [v for _, v in tb["straggler/slowest_rank"]]
    ratios = sorted(v for _, v in tb["straggler/slowest_over_median"])
    assert [s for s, _ in tb["straggler/slowest_rank"]] == [2, 4, 6, 8, 10]  # logging steps only
    assert ranks == [1.0] * 5 and ratios[len(ratios) // 2] > 1.3, (ranks, ratios)
    # 2 ranks: slowest / median = 2 t1 / (t0 + t1) < 2
    assert ratios[-1] < 2
    medians = dict(tb["straggler/median_s"])
    assert all(v > SLOW_S * 0.4 for v in medians.values())
    assert "straggler_ratio: 1.3" in (run_dir / "config.yaml").read_text()


def _segment(start, updated, productive, first, step, saved, resumed_from=None, **extra):
    seconds = {"productive": productive, "startup": 5.0, "data": 1.0, "eval": 0.0, "checkpoint_save": 2.0,
               "checkpoint_load": 0.0, "conversion": 0.0}
    return {"start": start, "updated": updated, "first_step": first, "step": step, "resumed_from": resumed_from,
            "seconds": seconds, "saved": {str(k): v for k, v in saved.items()}, **extra}


def test_lost_work_follows_where_the_next_segment_resumed():
    from pretrain.goodput import account

    killed = _segment(0, 100, 80, 0, 30, {10: 20, 20: 50})
    assert account([killed, _segment(200, 250, 30, 20, 40, {}, 20)])["parts"]["lost"] == 30  # steps 21-30
    assert account([killed, _segment(200, 250, 30, 10, 40, {}, 10)])["parts"]["lost"] == 60  # latest was torn
    assert account([killed, _segment(200, 250, 30, 0, 40, {})])["parts"]["lost"] == 80  # started afresh
    assert account([killed, _segment(200, 250, 30, 30, 40, {}, 30)])["parts"]["lost"] == 0  # saved after its record
    assert account([killed, _segment(200, 250, 30, 25, 40, {}, 25)])["parts"]["lost"] == 80 * 5 / 30  # unrecorded save
    acc = account([_segment(0, 100, 80, 0, 30, {30: 80}, rolled_back=7.5)])  # a loss-spike rollback inside it
    parts = acc["parts"]
    assert parts["lost"] == 7.5 and parts["productive"] == 72.5 and acc["fraction"] == 0.725
    assert parts["other"] == pytest.approx(100 - 80 - 5 - 1 - 2)
    assert account([])["fraction"] == 0.0
