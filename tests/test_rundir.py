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
