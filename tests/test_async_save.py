"""Checkpoints written in the background (``checkpoint.async_save``, issue 16): training goes on while every
rank's thread writes its files; the checkpoint is committed once all are durable; a SIGKILL during the write
leaves the previous checkpoint as ``latest`` and the resume continues exactly from it.

Three 2-rank runs of the tiny model (the suite's budget): a synchronous one, an asynchronous one whose
writers are slowed (tests/hooks.py ``slow_save``: 2 s at step 4, 120 s at step 8) and killed with SIGKILL
during the write of step 8, and its resume to the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import REPO, run_stage, stage_env
from test_checkpoint import _args, _losses

COMMON = ["--zero.stage=2", "--precision=fp32", "--train.max_steps=12", "--checkpoint.interval_steps=4",
          "--train.micro_batch_size=2"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timeline(folder, rank: int) -> list[dict]:
    f = folder / f"rank{rank}.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


def _events(rows: list[dict], event: str) -> dict[int, float]:
    return {r["step"]: r["t"] for r in rows if r["event"] == event}


def _tensors(obj, path: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a loaded checkpoint file, by its path in the nesting."""
    if torch.is_tensor(obj):
        return {path: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else ()
    return {k: v for key, value in items for k, v in _tensors(value, f"{path}/{key}").items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards_dir) -> dict:
    """The synchronous run; the asynchronous one, killed during its write of step 8 (what it left); its resume."""
    root = tmp_path_factory.mktemp("async_save")
    sync, run, timeline = root / "sync", root / "async", root / "timeline"
    timeline.mkdir()
    run_stage("pretrain", _args(sync, shards_dir, *COMMON, "--checkpoint.async_save=false"), nproc=2)

    env = stage_env(LMFORGE_TEST_SLOW_SAVE="4:2,8:120", LMFORGE_TEST_TIMELINE=str(timeline))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "pretrain", *_args(run, shards_dir, *COMMON, "--callbacks=[hooks:slow_save]")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300

    def writing_8_and_trained_past_it() -> bool:
        rows = [_timeline(timeline, r) for r in (0, 1)]
        return all(8 in _events(t, "write_start") and max(_events(t, "step"), default=0) >= 9 for t in rows)

    while time.time() < deadline and proc.poll() is None and not writing_8_and_trained_past_it():
        time.sleep(0.05)
    ranks = psutil.Process(proc.pid).children(recursive=True)  # torchrun starts each in its own session
    os.killpg(proc.pid, signal.SIGKILL)
    for p in ranks:  # every process of the job at once, as a node crash
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    killed_out, _ = proc.communicate()
    ckpts = run / "checkpoints"
    killed = {"latest": (ckpts / "latest").read_text().strip() if (ckpts / "latest").is_file() else None,
              "step8": sorted(p.name for p in (ckpts / "step_00000008").iterdir()) if (ckpts / "step_00000008").is_dir() else None,
              "timeline": [_timeline(timeline, r) for r in (0, 1)], "stdout": killed_out, "at": time.time()}
    assert writing_8_and_trained_past_it(), killed_out[-3000:]
    resumed = run_stage("pretrain", _args(run, shards_dir, *COMMON), nproc=2)
    return {"sync": sync, "run": run, "killed": killed, "resumed": resumed.stdout}


def test_async_saves_write_what_sync_saves_write_while_training_goes_on(runs):
    sync, run, killed = runs["sync"], runs["run"], runs["killed"]
    a, b = _losses(sync), _losses(run)
    assert sorted(b) == list(range(1, 13)) and [a[s] for s in range(1, 13)] == [b[s] for s in range(1, 13)]
    # step 4, saved in the background by the run before its kill: byte for byte the synchronous run's files
    want, got = (json.loads((d / "checkpoints" / "step_00000004" / "checkpoint_manifest.json").read_text())["files"]
                 for d in (sync, run))
    assert got == want and len(got) == 5 and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in got
    for step in (4, 8, 12):  # 8 and 12 by the resume, in the background too (a resumed optimizer pickles its
        tag = f"step_{step:08d}"  # per-group step counters apart: same tensors, other bytes)
        want, got = (json.loads((d / "checkpoints" / tag / "trainer_state.json").read_text()) for d in (sync, run))
        assert {**got, "saved_at": 0} == {**want, "saved_at": 0} and got["step"] == step  # the state of that step
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank00001.pt"):
            x, y = (_tensors(torch.load(d / "checkpoints" / tag / name, weights_only=False)) for d in (sync, run))
            assert x and x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (tag, name)
    out = killed["stdout"]
    assert "checkpoint step_00000004: snapshot in" in out and "checkpoint step_00000004 saved (interval" in out
    assert "written in the background in" in out and "saved (interval" in runs["resumed"]
    for rows in killed["timeline"]:  # every rank trained steps while its write of step 4 was in flight
        start, end, steps = _events(rows, "write_start")[4], _events(rows, "write_end")[4], _events(rows, "step")
        assert [s for s, t in steps.items() if start < t < end and s > 4], rows


def test_sigkill_during_a_background_write_resumes_exactly_from_the_previous_checkpoint(runs):
    killed, out = runs["killed"], runs["resumed"]
    assert killed["latest"] == "step_00000004"  # the write of step 8 was in flight: latest did not move
    assert killed["step8"] is not None and "trainer_state.json" not in killed["step8"]
    assert "checkpoint_manifest.json" not in killed["step8"]
    assert all(8 not in _events(rows, "write_end") for rows in killed["timeline"])  # killed mid-write on both ranks
    assert (f"ignoring incomplete checkpoint {runs['run'] / 'checkpoints' / 'step_00000008'} (the save was "
            "interrupted); resuming from step_00000004") in out
    assert "resumed from" in out and "at step 4" in out
    want = _losses(runs["sync"])
    # one curve: the killed run's steps past its checkpoint are dropped, steps 5-12 are the resume's (logged after
    # the kill), and every loss is the uninterrupted run's, bit for bit
    import lmforge.tensorboard as tb

    points = tb.read_scalars(tb.tensorboard_dir(runs["run"]), wall_time=True)["train/loss"]
    assert [s for s, _, _ in points] == list(range(1, 13))
    assert all(t > killed["at"] for s, _, t in points if s > 4) and all(v == want[s] for s, v, _ in points)
    assert (runs["run"] / "checkpoints" / "latest").read_text().strip() == "step_00000012"


def test_a_snapshot_is_written_byte_for_byte_as_torch_save_writes(tmp_path):
    """In process: what a background save writes (host copies of the storages, replayed later) is the file
    torch.save writes, views, shared storages, dtypes and parameters included; later updates do not leak in."""
    from pretrain.async_save import HostBuffers, _replay, _snapshot, background_save_problem

    base = torch.arange(24, dtype=torch.float32)
    obj = {"view": base[4:10], "whole": base, "bf16": torch.ones(3, dtype=torch.bfloat16),
           "param": torch.nn.Parameter(torch.randn(2, 2)), "nested": [{"step": torch.tensor(7.0)}, (1, "x")]}
    want = io.BytesIO()
    torch.save(obj, want)
    (tmp_path / "a").mkdir()
    torch.save(obj, tmp_path / "a" / "f.pt")
    buffers = HostBuffers()
    records = _snapshot(obj, buffers)
    base.add_(100)  # training goes on after the snapshot
    obj["nested"][0]["step"] += 1
    (tmp_path / "b").mkdir()
    _replay(tmp_path / "b" / "f.pt", records)
    assert (tmp_path / "b" / "f.pt").read_bytes() == (tmp_path / "a" / "f.pt").read_bytes()
    got = torch.load(tmp_path / "b" / "f.pt", weights_only=False)
    assert got["view"].tolist() == list(range(4, 10)) and got["nested"][0]["step"].item() == 7.0
    assert got["view"].untyped_storage().data_ptr() == got["whole"].untyped_storage().data_ptr()
    # the host buffers come back for the next snapshot of the same shapes
    kept = [d for _, d, _ in records if isinstance(d, torch.UntypedStorage)]
    buffers.give(kept)
    again = [d for _, d, _ in _snapshot(obj, buffers) if isinstance(d, torch.UntypedStorage)]
    assert {s.data_ptr() for s in again} == {s.data_ptr() for s in kept}

    class OtherEngine:
        checkpoint_engine = object()

    assert "not TorchCheckpointEngine" in background_save_problem(OtherEngine())
