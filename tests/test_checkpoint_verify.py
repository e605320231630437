"""Checkpoints that prove themselves: a manifest of every file's size and sha256 written at save, checked on
resume (a damaged latest checkpoint is passed over for the newest intact one), and ``python -m pretrain.verify``.

One 2-rank run saves steps 4 and 8; its copies are damaged (a truncated file, a flipped byte) and resumed.
The manifest checks themselves are pure functions, tested without processes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_stage, stage_env
from test_checkpoint import TINY, _args, _losses

COMMON = ["--zero.stage=2", "--precision=fp32", "--train.micro_batch_size=2", "--train.max_steps=8"]


def _truncate(f: Path, keep: int | None = None) -> None:
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2 if keep is None else keep)


def _flip(f: Path, at: int | None = None) -> None:
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size // 2 if at is None else at)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0x01]))


def _verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.verify", str(path)], cwd=REPO, env=stage_env(),
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- the manifest, as pure functions
def _step_dir(tmp_path: Path, step: int = 4, manifest: bool = True) -> Path:
    from lmforge.rundir import checkpoint_dir, checkpoint_files, hash_files, mark_complete, write_manifest

    d = checkpoint_dir(tmp_path, step)
    (d / "sub").mkdir(parents=True)
    (d / "a_rank_0.pt").write_bytes(b"a" * 100)
    (d / "rng_rank00001.pt").write_bytes(b"r" * 50)
    (d / "sub" / "zero_pp_rank_1_optim_states.pt").write_bytes(bytes(range(256)) * 40)
    if manifest:
        write_manifest(d, hash_files(d, checkpoint_files(d)))
    mark_complete(d, {"step": step})
    return d


def test_the_manifest_check_finds_sizes_hashes_and_missing_files(tmp_path):
    from lmforge.rundir import checkpoint_files, checkpoint_problems, file_owner, read_manifest

    d = _step_dir(tmp_path)
    assert sorted(read_manifest(d)) == checkpoint_files(d) == ["a_rank_0.pt", "rng_rank00001.pt",
                                                               "sub/zero_pp_rank_1_optim_states.pt"]
    assert [file_owner(n, 2) for n in checkpoint_files(d)] == [0, 1, 1] and file_owner("rng_rank00005.pt", 2) == 0
    assert checkpoint_problems(d) == []
    _flip(d / "sub" / "zero_pp_rank_1_optim_states.pt")  # same size: only its hash tells
    assert checkpoint_problems(d) == ["sub/zero_pp_rank_1_optim_states.pt: sha256 mismatch"]
    # striped: rank r of 2 hashes the files i % 2 == r (here rank 0 has files 0 and 2, rank 1 file 1)
    assert checkpoint_problems(d, rank=1, world=2) == []
    assert checkpoint_problems(d, rank=0, world=2) == ["sub/zero_pp_rank_1_optim_states.pt: sha256 mismatch"]
    _truncate(d / "a_rank_0.pt", 60)  # sizes are checked on every rank; a file of the wrong size is not hashed
    (d / "rng_rank00001.pt").unlink()
    want = ["a_rank_0.pt: size 60 expected 100", "rng_rank00001.pt: missing"]
    assert checkpoint_problems(d, rank=1, world=2) == want
    assert checkpoint_problems(d) == [*want, "sub/zero_pp_rank_1_optim_states.pt: sha256 mismatch"]
    (d / "trainer_state.json").write_text("{torn")
    assert checkpoint_problems(d, rank=1, world=2) == [*want, "trainer_state.json: unreadable (JSONDecodeError)"]
    assert checkpoint_problems(_step_dir(tmp_path, 8, manifest=False)) is None  # saved before manifests


def test_a_damaged_latest_falls_back_and_an_explicit_one_is_refused(tmp_path, capsys):
    from lmforge.errors import CheckpointError
    from pretrain.checkpoint import resume_step_dir, verify_checkpoint

    old, new = _step_dir(tmp_path, 4), _step_dir(tmp_path, 8)

    def check(d):
        return verify_checkpoint(d, tmp_path, 1)

    assert resume_step_dir("auto", tmp_path, check) == new
    _truncate(new / "a_rank_0.pt", 10)
    assert resume_step_dir("auto", tmp_path, check) == old
    assert capsys.readouterr().out == ("warning: checkpoint step_00000008 is damaged (a_rank_0.pt: size 10 expected "
                                       "100); falling back to step_00000004\n")
    assert resume_step_dir(str(tmp_path), tmp_path, check) == old  # a run dir: the same
    with pytest.raises(CheckpointError, match=r"^--resume=.*step_00000008: checkpoint step_00000008 is damaged "
                                              r"\(a_rank_0.pt: size 10 expected 100\); restore its files"):
        resume_step_dir(str(new), tmp_path, check)  # named explicitly: never swapped for another
    _flip(old / "rng_rank00001.pt", 3)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint to resume in .*: step_00000004 is damaged "
                                              r"\(rng_rank00001.pt: sha256 mismatch\); and 1 newer"):
        resume_step_dir("auto", tmp_path, check)
    legacy = _step_dir(tmp_path, 12, manifest=False)
    assert resume_step_dir("auto", tmp_path, check) == legacy
    assert "note: step_00000012 has no checkpoint_manifest.json" in capsys.readouterr().out


def test_verify_names_every_checkpoint_in_process(tmp_path, capsys):
    from pretrain.verify import main

    _step_dir(tmp_path, 4, manifest=False)
    _step_dir(tmp_path, 8)
    assert main([str(tmp_path)]) == 0
    (tmp_path / "checkpoints" / "step_00000012").mkdir()  # a save killed half-way
    _truncate(tmp_path / "checkpoints" / "step_00000008" / "a_rank_0.pt", 1)
    assert main([str(tmp_path)]) == 1  # the latest is damaged
    assert capsys.readouterr().out.splitlines()[-3:] == [
        "step_00000004: no manifest (no checkpoint_manifest.json: saved by an older lmforge)",
        "step_00000008: damaged: a_rank_0.pt: size 1 expected 100  (latest)",
        "step_00000012: incomplete (no trainer_state.json: its save was interrupted)"]


# ---------------------------------------------------------------- real saves and resumes
@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards_dir) -> Path:
    """8 steps on 2 ranks (ZeRO-2), checkpoints at steps 4 and 8."""
    rd = tmp_path_factory.mktemp("verify") / "straight"
    run_stage("pretrain", _args(rd, shards_dir, *COMMON, "--checkpoint.interval_steps=4"), nproc=2)
    return rd


def test_a_resume_passes_over_a_damaged_checkpoint_and_continues_exactly(tmp_path, shards_dir, straight):
    from lmforge.rundir import checkpoint_files, read_manifest

    ok = _verify(straight)
    assert ok.returncode == 0 and ok.stdout.splitlines() == ["step_00000004: ok", "step_00000008: ok  (latest)"]
    names = sorted(read_manifest(straight / "checkpoints" / "step_00000008"))
    assert names == checkpoint_files(straight / "checkpoints" / "step_00000008") and len(names) == 5  # both ranks'
    rd = tmp_path / "run"
    shutil.copytree(straight, rd)
    step8 = rd / "checkpoints" / "step_00000008"
    # a torn copy of rank 1's optimizer partition, and one flipped byte in a file that rank 1 hashes on resume
    truncated = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    flipped = next(n for i, n in enumerate(names) if i % 2 == 1 and n != truncated)
    size = (step8 / truncated).stat().st_size
    _truncate(step8 / truncated)
    _flip(step8 / flipped)
    bad = _verify(rd)
    assert bad.returncode == 1 and bad.stdout.splitlines() == [
        "step_00000004: ok", f"step_00000008: damaged: {flipped}: sha256 mismatch; "
                             f"{truncated}: size {size // 2} expected {size}  (latest)"]
    out = run_stage("pretrain", _args(rd, shards_dir, *COMMON), nproc=2).stdout
    assert (f"warning: checkpoint step_00000008 is damaged ({flipped}: sha256 mismatch; {truncated}: size "
            f"{size // 2} expected {size}); falling back to step_00000004") in out
    assert "resumed from" in out and "at step 4" in out
    a, b = _losses(straight), _losses(rd)
    assert sorted(b) == list(range(1, 9))
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]  # bit-identical, as an undamaged resume
    again = _verify(rd)  # step 8 was saved again, intact
    assert again.returncode == 0 and again.stdout.splitlines()[-1] == "step_00000008: ok  (latest)"

    # every checkpoint damaged: one line naming the file, exit code 2, no traceback (and no training)
    _truncate(rd / "checkpoints" / "step_00000008" / truncated)
    _flip(rd / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt")
    proc = run_stage("pretrain", _args(rd, shards_dir, *COMMON), check=False)
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(err) == 1 and "no intact checkpoint to resume" in err[0]
    assert "step_00000004 is damaged (mp_rank_00_model_states.pt: sha256 mismatch)" in err[0]
    assert f"warning: checkpoint step_00000008 is damaged ({truncated}: size" in proc.stdout
    assert _verify(rd).returncode == 1


def test_an_explicit_damaged_checkpoint_is_refused(tmp_path, straight):
    from lmforge.config import load_config
    from pretrain.checkpoint import CheckpointError, resolve_resume
    from pretrain.config import PretrainConfig

    step4 = tmp_path / "run" / "checkpoints" / "step_00000004"
    shutil.copytree(straight / "checkpoints" / "step_00000004", step4)
    _truncate(step4 / "rng_rank00000.pt", 0)
    cfg = load_config(PretrainConfig, TINY, [f"--run_dir={tmp_path / 'other'}", f"--resume={step4}", "--zero.stage=2"])
    with pytest.raises(CheckpointError, match=r"step_00000004 is damaged \(rng_rank00000.pt: size 0 expected \d+\)"):
        resolve_resume(cfg, 2)
    manifest = json.loads((step4 / "checkpoint_manifest.json").read_text())["files"]
    assert all(len(v["sha256"]) == 64 for v in manifest.values())
