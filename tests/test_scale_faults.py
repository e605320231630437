"""Scale-out failures recreated at small size on CPU (issue 13): a failing rank, the accelerator
rule, GPU selection, run-directory locks on filesystems without flock."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import time

import pytest
from conftest import run_stage, site_env, stage_env

from lmforge.errors import LmforgeError

TINY = "configs/pretrain/tiny.yaml"


def _args(run_dir, shards, *extra: str) -> list[str]:
    return [TINY, f"--run_dir={run_dir}", f"--data.shards={shards}", "--train.log_every=1", "--train.eval_every=0",
            "--data.seq_len=64", "--train.micro_batch_size=2", "--optim.warmup_steps=3", *extra]


# ---------------------------------------------------------------- 12. a failing rank ends the job
def test_a_rank_that_raises_ends_the_whole_torchrun_job(tmp_path, shards_dir):
    t0 = time.time()
    proc = run_stage("pretrain", _args(tmp_path / "run", shards_dir, "--train.max_steps=50", "--callbacks=[hooks:fail]"),
                     nproc=2, env=stage_env(LMFORGE_TEST_FAIL="3@1"), check=False, timeout=150, launcher="torchrun")
    took = time.time() - t0
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert took < 60 + 30, f"the job took {took:.0f}s to end"  # 30 s: start-up of two ranks on a busy 2-core CI
    # torchrun reports rank 1's own error as the root cause, not its peer's broken collective
    root = proc.stderr.split("Root Cause", 1)[-1]
    assert "injected failure on rank 1 at step 3" in root and "local_rank: 1" in root, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints" / "step_00000050").exists()


# ---------------------------------------------------------------- 10. the accelerator follows the hardware
def test_cpu_accelerator_is_refused_where_cuda_is_visible():
    from pretrain.dist import choose_accelerator

    env = {"DS_ACCELERATOR": "cpu"}
    with pytest.raises(LmforgeError, match="DS_ACCELERATOR=cpu but 8 CUDA device.*LMFORGE_ACCELERATOR=cpu"):
        choose_accelerator(env, cuda_devices=8)
    assert choose_accelerator({}, cuda_devices=8) == "cuda"  # unset: from the hardware
    assert choose_accelerator({}, cuda_devices=0) == "cpu"
    named = {"DS_ACCELERATOR": "cpu", "LMFORGE_ACCELERATOR": "cpu"}
    assert choose_accelerator(named, cuda_devices=8) == "cpu" and named["DS_ACCELERATOR"] == "cpu"
    with pytest.raises(LmforgeError, match="no CUDA device"):
        choose_accelerator({"LMFORGE_ACCELERATOR": "cuda"}, cuda_devices=0)


def test_a_gpu_job_with_an_inherited_cpu_accelerator_stops_with_one_line(tmp_path, shards_dir):
    # CUDA "visible" (torch patched at interpreter start-up) and DS_ACCELERATOR=cpu inherited from a shell
    env = stage_env()
    env.pop("LMFORGE_ACCELERATOR")
    env = site_env(tmp_path / "site", "import torch\ntorch.cuda.is_available = lambda: True\n"
                   "torch.cuda.device_count = lambda: 8\n", env)
    proc = run_stage("pretrain", _args(tmp_path / "run", shards_dir, "--train.max_steps=2"), env=env, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: DS_ACCELERATOR=cpu but 8 CUDA device(s) are visible"), proc.stderr[-2000:]


# ---------------------------------------------------------------- 5. GPU selection
def test_local_rank_maps_onto_the_visible_devices():
    from pretrain.dist import cuda_device_index

    assert [cuda_device_index(r, 8, 8) for r in range(8)] == list(range(8))  # all of the node's GPUs visible
    assert [cuda_device_index(r, 1, 8) for r in range(8)] == [0] * 8  # --gpus-per-task=1: one each
    with pytest.raises(LmforgeError, match="local rank 5 but only 4 CUDA device"):
        cuda_device_index(5, 4, 8)
    with pytest.raises(LmforgeError, match="no CUDA device"):
        cuda_device_index(0, 0)


# ---------------------------------------------------------------- 4. run-directory lock without flock
def _no_flock(monkeypatch, code=errno.ENOLCK):
    import fcntl

    def flock(*a):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", flock)


def test_lock_falls_back_to_a_lock_file_where_flock_is_unsupported(tmp_path, monkeypatch):
    from lmforge import lock

    _no_flock(monkeypatch)
    used = lock.lock_run_dir(tmp_path)
    assert used.startswith("lock file") and "ENOLCK" in used
    owner = json.loads((tmp_path / lock.OWNER).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(LmforgeError, match=f"another run is using {tmp_path} .*pid {os.getpid()}"):
        lock.lock_run_dir(tmp_path)  # a second run (here: the same live pid) is refused


def test_a_stale_lock_file_is_taken_over(tmp_path, monkeypatch, capsys):
    from lmforge import lock

    _no_flock(monkeypatch, errno.ENOSYS)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is surely gone
    (tmp_path / lock.OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "heartbeat": 0}))
    lock.lock_run_dir(tmp_path)
    assert f"pid {dead.pid} is not running" in capsys.readouterr().out
    assert json.loads((tmp_path / lock.OWNER).read_text())["pid"] == os.getpid()
    # another host's lock: stale only once its heartbeat is old
    other = {"host": "elsewhere", "pid": 1, "heartbeat": 1000.0}
    assert lock.stale_reason(other, now=1000.0 + 60) is None
    assert "no heartbeat from elsewhere" in lock.stale_reason(other, now=1000.0 + lock.STALE_S + 1)


def test_other_lock_errors_are_not_swallowed(tmp_path, monkeypatch):
    from lmforge import lock

    _no_flock(monkeypatch, errno.EIO)
    with pytest.raises(OSError):
        lock.lock_run_dir(tmp_path)


# ---------------------------------------------------------------- 7. tested version ranges
def test_versions_outside_the_tested_ranges_are_refused_in_one_line():
    from lmforge.versions import TESTED, check_versions

    ok = {"torch": "2.13.0+cpu", "deepspeed": "0.19.8", "transformers": "5.24.0"}
    check_versions(ok)
    check_versions()  # this environment (what the suite runs on) passes
    with pytest.raises(LmforgeError, match=r"^transformers 4\.46\.0 is installed, lmforge is tested with "
                                           r"transformers>=5\.24,<5\.25: pip install"):
        check_versions({**ok, "transformers": "4.46.0"})
    with pytest.raises(LmforgeError, match="deepspeed 0.20.1 is installed"):
        check_versions({**ok, "deepspeed": "0.20.1"})
    # pyproject.toml admits exactly the ranges checked at start-up
    import tomllib
    from conftest import REPO
    from packaging.requirements import Requirement

    deps = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    assert {r.name: r.specifier for r in deps if r.name in TESTED} == {
        n: Requirement(n + spec).specifier for n, spec in TESTED.items()}


# ---------------------------------------------------------------- 6. a kept global batch on another world size
def test_a_resume_whose_global_batch_does_not_split_over_the_new_ranks_is_refused(tmp_path):
    from lmforge.config import load_config, to_dict
    from pretrain.checkpoint import CheckpointError, resolve_resume
    from pretrain.config import PretrainConfig

    cfg = load_config(PretrainConfig, TINY, [f"--run_dir={tmp_path}", "--zero.stage=2"])
    step = tmp_path / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps(
        {"step": 4, "world_size": 4, "global_batch": 12, "zero_stage": cfg.zero.stage, "model": to_dict(cfg.model)}))
    target = resolve_resume(cfg, 3)
    assert target.universal and target.global_batch == 12  # 12 splits over 3 ranks
    assert cfg.train.global_batch_size is None  # the stage resolves its config from the target; this one is not changed
    with pytest.raises(CheckpointError, match="its global batch 12 does not split over them; resume on 3, 4, 6, 12"):
        resolve_resume(cfg, 5)


def test_conversion_workers_follow_the_cores_unless_memory_is_short(tmp_path):
    from pretrain.checkpoint import conversion_workers

    (tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 1000)
    assert conversion_workers(tmp_path, cores=64, available=10**9) == 64  # small files: one per core
    # 7B on 32 ranks: ~3 GB per optimizer file; a node with 64 cores and 100 GB free runs 13, not 64
    big = tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(big, "wb") as f:
        f.truncate(3 * 10**9)  # sparse: no disk used
    assert conversion_workers(tmp_path, cores=64, available=100 * 10**9) == 13
    assert conversion_workers(tmp_path, cores=64, available=10**9) == 1
