"""The run directory's format (lmforge.rundir): one module that SLURM, the demo and both stages read."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_step_tags_round_trip_and_other_names_are_not_steps():
    from lmforge.rundir import step_of, step_tag

    assert step_tag(100) == "step_00000100" and step_of(step_tag(100)) == 100
    assert step_of(REPO / "runs" / "x" / "checkpoints" / "step_123456789") == 123456789  # past 8 digits
    assert step_of("step_00000100_universal") is None and step_of("latest") is None and step_of("step_") is None


def test_latest_state_and_the_newest_complete_checkpoint(tmp_path):
    from lmforge.rundir import CKPT, complete_checkpoints, latest_checkpoint, latest_state, mark_complete

    assert latest_state(tmp_path) is None and latest_checkpoint(tmp_path) is None
    for step in (5, 10, 100):
        (tmp_path / CKPT / f"step_{step:08d}").mkdir(parents=True)
    (tmp_path / CKPT / "step_00000010_universal").mkdir()
    mark_complete(tmp_path / CKPT / "step_00000005", {"step": 5})
    mark_complete(tmp_path / CKPT / "step_00000010", {"step": 10})  # step 100: a save killed half-way
    assert [d.name for d in complete_checkpoints(tmp_path)] == ["step_00000005", "step_00000010"]
    assert latest_checkpoint(tmp_path).name == "step_00000010"
    assert latest_state(tmp_path) == {"tag": "step_00000010", "step": 10}
    (tmp_path / CKPT / "step_00000010" / "trainer_state.json").write_text("{torn")
    assert latest_state(tmp_path) is None  # never mistaken for a complete checkpoint
    json.loads((tmp_path / CKPT / "step_00000005" / "trainer_state.json").read_text())


def test_the_run_directory_module_imports_no_torch():
    code = "import sys, lmforge.rundir; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_paths_of_the_format_come_from_rundir(tmp_path):
    from lmforge.rundir import (
        checkpoint_dir,
        checkpoints_dir,
        is_run_dir,
        is_step_dir,
        latest_checkpoint,
        latest_file,
        mark_complete,
        run_dir_of,
        state_file,
    )

    step = checkpoint_dir(tmp_path, 7)
    assert step == checkpoint_dir(tmp_path, "step_00000007") and step.parent == checkpoints_dir(tmp_path)
    assert run_dir_of(step) == tmp_path and not is_run_dir(tmp_path) and not latest_file(tmp_path).exists()
    step.mkdir(parents=True)
    assert is_run_dir(tmp_path) and is_step_dir(step) and not is_step_dir(tmp_path)
    assert is_step_dir(checkpoints_dir(tmp_path) / "step_00000007_universal")  # a conversion: a step dir too
    mark_complete(step, {"step": 7})
    assert state_file(step).is_file() and latest_file(tmp_path).read_text().strip() == step.name
    assert latest_checkpoint(tmp_path) == step
    other = tmp_path / "elsewhere"  # a step directory copied out of its run: recognised by its state
    other.mkdir()
    state_file(other).write_text("{}")
    assert is_step_dir(other)
