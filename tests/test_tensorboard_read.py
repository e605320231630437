"""lmforge.tensorboard: the one reader of TensorBoard event files (demo, SLURM status, tests, benchmarks)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO


def _write(log_dir, steps=range(1, 6)):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(log_dir))
    w.add_text("config", "model: tiny", 0)
    for s in steps:
        w.add_scalar("train/loss", 10.0 / s, s)
        if s % 2 == 0:
            w.add_scalar("eval/loss", 20.0 / s, s)
    w.close()


def test_every_scalar_of_a_run_dir_or_its_tensorboard_folder(tmp_path):
    from lmforge.tensorboard import read_scalars, read_text, tensorboard_dir

    _write(tensorboard_dir(tmp_path))
    for where in (tmp_path, tmp_path / "tensorboard"):
        s = read_scalars(where)
        assert sorted(s) == ["eval/loss", "train/loss"]
        assert s["train/loss"] == [(i, pytest.approx(10.0 / i)) for i in range(1, 6)]
        assert s["eval/loss"] == [(2, 10.0), (4, 5.0)]
    assert read_scalars(tmp_path, tags=["eval/loss", "never/written"]) == {"eval/loss": [(2, 10.0), (4, 5.0)]}
    assert read_text(tmp_path) == {"config/text_summary": [(0, "model: tiny")]}


def test_newest_only_and_wall_time(tmp_path):
    from lmforge.tensorboard import read_scalars

    _write(tmp_path, steps=range(1, 300))
    newest = read_scalars(tmp_path, newest_only=True)
    assert newest == {"train/loss": [(299, pytest.approx(10.0 / 299))], "eval/loss": [(298, pytest.approx(20.0 / 298))]}
    timed = read_scalars(tmp_path, tags=["train/loss"], wall_time=True)["train/loss"]
    assert [p[:2] for p in timed] == [(i, pytest.approx(10.0 / i)) for i in range(1, 300)]
    assert all(t > 1e9 for _, _, t in timed) and [t for *_, t in timed] == sorted(t for *_, t in timed)


def test_nothing_written_reads_as_empty(tmp_path):
    from lmforge.tensorboard import read_scalars, read_text

    assert read_scalars(tmp_path / "missing") == {} and read_text(tmp_path / "missing") == {}
    assert read_scalars(tmp_path) == {} and read_text(tmp_path) == {}


def test_importing_the_reader_imports_neither_tensorboard_nor_torch():
    code = ("import sys, lmforge.tensorboard; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorboard', 'deepspeed')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_slurm_status_shows_the_newest_step(tmp_path):
    from lmforge.tensorboard import tensorboard_dir
    from slurm.status import last_metrics

    assert last_metrics(tmp_path) is None  # no event files yet
    _write(tensorboard_dir(tmp_path))
    step, scalars = last_metrics(tmp_path)
    assert step == 5 and scalars == {"train/loss": pytest.approx(2.0)}  # eval/loss was last logged at step 4
