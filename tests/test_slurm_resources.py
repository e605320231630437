"""GPU jobs get their whole node; CPU jobs ask for what they always did (slurm/resources.py).

No cluster: submissions are dry runs (``python -m slurm.submit ... --dry-run``), or go to a stand-in
``sbatch`` / ``sinfo`` on PATH that records what it was given; the torchrun body runs with stand-ins
for ``srun`` and Python. The cluster tests (tests/test_slurm_submit.py) run the CPU jobs for real.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

from lmforge.errors import ConfigError
from slurm import submit

GPU = ["--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "1-00:00:00", "--cores-per-node", "96"]
CPU = ["--nodes", "2", "--gpus-per-node", "0", "--partition", "debug", "--time", "10"]


def _sbatch_header(out: str) -> dict[str, str | bool]:
    return {ln.split("=", 1)[0][len("#SBATCH --"):]: ln.split("=", 1)[1] if "=" in ln else True
            for ln in out.splitlines() if ln.startswith("#SBATCH --")}


def _dry(capsys, preset: str, *args: str, stage: str = "pretrain") -> str:
    config = f"configs/{stage}/{preset}.yaml"
    assert submit.main([stage, config, *args, "--dry-run"]) == 0
    return capsys.readouterr().out


def _signal_s(sbatch: dict) -> int:
    return int(str(sbatch["signal"]).rsplit("@", 1)[1])


def _save_seconds(preset: str, world: int, *overrides: str) -> float:
    """What ``python -m pretrain PRESET --dry-run --ranks=WORLD`` estimates for one save."""
    from lmforge.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.estimate import describe

    cfg = load_config(PretrainConfig, str(REPO / "configs" / "pretrain" / f"{preset}.yaml"), list(overrides))
    return describe(cfg, cfg.model.vocab_size, world)["checkpoint"]["save_seconds"]


@pytest.fixture
def no_slurm_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("SLURM_") or k == "LMFORGE_SAVE_GIBPS":
            monkeypatch.delenv(k)


# ---------------------------------------------------------------- submitit jobs
def test_a_gpu_job_asks_for_the_whole_node(capsys, tmp_path, no_slurm_env):
    out = _dry(capsys, "7b", *GPU, f"--run_dir={tmp_path}")
    sbatch = _sbatch_header(out)
    assert sbatch["exclusive"] is True and sbatch["mem"] == "0"
    assert sbatch["ntasks-per-node"] == "8" and sbatch["cpus-per-task"] == "12"  # 96 cores / 8 GPUs, one task each
    assert "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}" in out
    # 60 s for the step in flight and the exit, and twice the dry run's save time: 75.3 GiB at 1 GiB/s
    save = _save_seconds("7b", 32)
    assert sbatch["signal"] == f"USR2@{math.ceil(60 + 2 * save)}" and _signal_s(sbatch) > 120
    note = next(ln for ln in out.splitlines() if ln.startswith("# whole nodes"))
    assert "12 CPUs per task (96 per node / 8 task(s))" in note and f"{save:g} s" in note


def test_the_signal_grows_with_the_checkpoint_and_never_drops_below_120_s(capsys, tmp_path, monkeypatch, no_slurm_env):
    tiny = _signal_s(_sbatch_header(_dry(capsys, "tiny", *GPU, f"--run_dir={tmp_path}", "--model.vocab_size=1024")))
    small = _signal_s(_sbatch_header(_dry(capsys, "1b3", *GPU, f"--run_dir={tmp_path}")))
    big = _signal_s(_sbatch_header(_dry(capsys, "7b", *GPU, f"--run_dir={tmp_path}")))
    assert tiny == small == 120 < big  # 1b3's 17 GiB save at 1 GiB/s: 60 + 2 x 17 s is still under the floor
    monkeypatch.setenv("LMFORGE_SAVE_GIBPS", "0.25")  # a slow filesystem: four times the save time
    slow = _signal_s(_sbatch_header(_dry(capsys, "7b", *GPU, f"--run_dir={tmp_path}")))
    assert slow == math.ceil(60 + 2 * _save_seconds("7b", 32)) > big


def test_a_cpu_job_asks_for_nothing_a_gpu_job_does(capsys, tmp_path, monkeypatch, no_slurm_env):
    _stand_in(tmp_path / "bin", "sinfo", f"touch {tmp_path}/sinfo.called; exit 1\n")  # a CPU job never asks it
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = _dry(capsys, "tiny", *CPU, f"--run_dir={tmp_path / 'run'}")
    assert not (tmp_path / "sinfo.called").exists()
    sbatch = _sbatch_header(out)
    assert {"exclusive", "mem", "cpus-per-task", "gpus-per-node"}.isdisjoint(sbatch), sbatch
    assert sbatch["signal"] == "USR2@120" and sbatch["ntasks-per-node"] == "1"
    assert "--cpu-bind" not in out and "# whole nodes" not in out
    assert "export DS_ACCELERATOR=cpu" in out and "export LMFORGE_ACCELERATOR=cpu" in out


def test_explicit_options_win_over_the_gpu_defaults(capsys, tmp_path, no_slurm_env):
    out = _dry(capsys, "7b", *GPU, "--mem", "500G", "--cpus-per-task", "4", "--grace", "900", f"--run_dir={tmp_path}")
    sbatch = _sbatch_header(out)
    assert (sbatch["mem"], sbatch["cpus-per-task"], sbatch["signal"]) == ("500G", "4", "USR2@900")
    assert sbatch["exclusive"] is True


def _stand_in(folder: Path, name: str, script: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("#!/bin/bash\n" + script)
    (folder / name).chmod(0o755)


def test_the_cores_per_node_come_from_sinfo(capsys, tmp_path, monkeypatch, no_slurm_env):
    bin_dir = tmp_path / "bin"
    _stand_in(bin_dir, "sinfo", f'echo "$@" > {tmp_path}/sinfo.args\nprintf "128\\n96+\\n"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    args = [a for a in GPU if a not in ("--cores-per-node", "96")]
    out = _dry(capsys, "7b", *args, f"--run_dir={tmp_path / 'run'}")
    assert _sbatch_header(out)["cpus-per-task"] == "12"  # the smallest node of the partition: 96 / 8
    assert "--partition=gpu" in (tmp_path / "sinfo.args").read_text()
    _stand_in(bin_dir, "sinfo", 'echo "sinfo: error: Unable to contact slurm controller" >&2; exit 1\n')
    with pytest.raises(ConfigError, match=r"Unable to contact slurm controller\); pass --cores-per-node N or --cpus-per-task N"):
        _dry(capsys, "7b", *args, f"--run_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match="--cores-per-node 4: fewer cores than the 8 tasks"):
        _dry(capsys, "7b", *args, "--cores-per-node", "4", f"--run_dir={tmp_path / 'run'}")


def test_a_fine_tune_signal_is_sized_from_its_backbone(capsys, tmp_path, no_slurm_env):
    from test_finetune_scale import _fake_run

    run_7b = _fake_run(tmp_path / "7b", "configs/pretrain/7b.yaml")
    args = [*GPU, f"--run_dir={tmp_path / 'ft'}", "--data.train=data/sft.jsonl"]
    big = _sbatch_header(_dry(capsys, "sft", *args, f"--init_from={run_7b}", stage="finetune"))
    assert _signal_s(big) > 120
    # a backbone that is not there yet (a job queued behind its pretraining): the floor, and a line that says so
    assert submit.main(["finetune", "configs/finetune/sft.yaml", *args, f"--init_from={tmp_path / 'nope'}",
                        "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert _sbatch_header(captured.out)["signal"] == "USR2@120"
    assert "checkpoint size unknown" in captured.err and "--grace" in captured.err


# ---------------------------------------------------------------- the torchrun templates
def _template_command(out: str) -> list[str]:
    line = out.split("# --- sbatch command", 1)[1].splitlines()[1]
    return shlex.split(line)


def test_a_gpu_template_job_is_one_task_per_node_with_all_cores(capsys, tmp_path, no_slurm_env):
    out = _dry(capsys, "7b", *GPU, "--launcher", "torchrun", f"--run_dir={tmp_path}", "--train.max_steps=10")
    cmd = _template_command(out)
    env = dict(w.split("=", 1) for w in cmd[:2])
    assert env == {"LMFORGE_REPO": str(REPO), "LMFORGE_MAX_REQUEUES": "10"} and cmd[2:4] == ["sbatch", "--parsable"]
    opts = cmd[4:cmd.index(str(REPO / "slurm" / "pretrain.sbatch"))]
    assert {"--exclusive", "--mem=0", "--gpus-per-node=8", "--ntasks-per-node=1", "--cpus-per-task=96",
            "--nodes=4", "--partition=gpu", "--time=1440"} <= set(opts)
    signal = next(o for o in opts if o.startswith("--signal="))
    assert signal == f"--signal=B:USR1@{math.ceil(60 + 2 * _save_seconds('7b', 32))}"
    assert cmd[-3:] == ["configs/pretrain/7b.yaml", f"--run_dir={tmp_path}", "--train.max_steps=10"]
    cpu = _template_command(_dry(capsys, "tiny", *CPU, "--launcher", "torchrun", f"--run_dir={tmp_path}"))
    assert "--signal=B:USR1@120" in cpu and not {o for o in cpu if o.startswith(("--exclusive", "--mem", "--cpus",
                                                                                 "--gpus"))}


def test_a_template_job_is_submitted_with_sbatch(capsys, tmp_path, monkeypatch, no_slurm_env):
    bin_dir = tmp_path / "bin"
    _stand_in(bin_dir, "sbatch", f'printf "%s\\n" "$@" > {tmp_path}/sbatch.args\n'
                                 f'echo "$LMFORGE_REPO $LMFORGE_MAX_REQUEUES" > {tmp_path}/sbatch.env\necho "4242;c1"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    assert submit.main(["pretrain", "configs/pretrain/7b.yaml", *GPU, "--launcher", "torchrun", "--max-requeues", "3",
                        f"--run_dir={run_dir}"]) == 0
    assert "submitted job 4242" in capsys.readouterr().out
    got = (tmp_path / "sbatch.args").read_text().splitlines()
    assert "--exclusive" in got and f"--output={run_dir}/slurm/lmforge-pretrain-%j.out" in got
    assert (run_dir / "slurm").is_dir()  # where SLURM writes the log: it does not create folders
    assert (tmp_path / "sbatch.env").read_text().split() == [str(REPO), "3"]
    with pytest.raises(ConfigError, match="--wait"):
        submit.main(["pretrain", "configs/pretrain/7b.yaml", *GPU, "--launcher", "torchrun", "--wait",
                     f"--run_dir={run_dir}"])


@pytest.mark.parametrize("gpus", [8, 0])
def test_torchrun_is_started_unbound_with_the_nodes_cores_on_gpu_nodes(tmp_path, gpus):
    """slurm/pretrain.sbatch's body, with stand-ins for srun and Python: what srun is asked to start."""
    bin_dir = tmp_path / "bin"
    _stand_in(bin_dir, "srun", f'printf "%s\\n" "$@" > {tmp_path}/srun.args\necho "OMP=$OMP_NUM_THREADS" >> {tmp_path}/srun.args\n')
    _stand_in(bin_dir, "py", 'case "$3" in rendezvous) echo "n1 29500";; register) echo "{}";; *) exit 1;; esac\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LMFORGE_", "OMP_", "DS_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", LMFORGE_REPO=str(REPO), LMFORGE_PYTHON=str(bin_dir / "py"),
               SLURM_JOB_ID="7", SLURM_NNODES="2", SLURM_CPUS_ON_NODE="96")
    if gpus:
        env["SLURM_GPUS_ON_NODE"] = str(gpus)
    proc = subprocess.run(["bash", str(REPO / "slurm" / "pretrain.sbatch"), "configs/pretrain/tiny.yaml"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert "--kill-on-bad-exit=1" in args and "--ntasks-per-node=1" in args
    if gpus:  # one task per node, all its cores, not pinned: torchrun's 8 workers and their loaders share them
        assert "--cpu-bind=none" in args and "--cpus-per-task=96" in args and "OMP=12" in args
    else:
        assert not [a for a in args if re.match(r"--cpu(-bind|s-per-task)", a)] and "OMP=96" in args
