"""``python -m slurm.submit build``: the data build as a job array on the local SLURM cluster (2 nodes).

An array of 4 parts over 2 nodes, one task SIGKILLed mid-part: the merge refuses and names the part,
the same command again runs that part alone (resuming it), and the merged token stream equals the
one-machine build's.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from conftest import stage_env
from slurm_fixtures import slurm_environ
from submitit.slurm.slurm import SlurmJob

from data_pipeline import array
from data_pipeline.build import build_shards
from data_pipeline.cli import main as data_cli
from data_pipeline.shards import Manifest
from lmforge.errors import ConfigError, DataError
from slurm import submit
from slurm.jobs import wait
from slurm.launch import read_records

BUILD = ["--shard-tokens", "20000", "--val-docs", "10", "--val-every", "10"]


def stream(root, split="train") -> np.ndarray:
    m = Manifest(root)
    return np.concatenate([np.fromfile(s.path, dtype=m.dtype) for s in m.shards(split)])


@pytest.fixture
def cluster(slurm_cluster, monkeypatch) -> dict[str, str]:
    for k, v in {**stage_env(), **slurm_cluster}.items():  # tests/ on PYTHONPATH: the jobs import hooks
        monkeypatch.setenv(k, v)
    return slurm_cluster


def test_array_of_4_over_2_nodes_with_a_killed_task_builds_the_one_machine_stream(
        cluster, tmp_path, corpus_dir, tokenizer_dir, monkeypatch, capsys):
    ref = tmp_path / "one"
    build_shards([str(corpus_dir)], tokenizer_dir, ref, workers=1, shard_tokens=20000, val_docs=10, val_every=10)
    out = tmp_path / "arr"
    # 2 cores per task = a whole node of the test cluster: the first two tasks start on n1 and n2
    cmd = ["build", "--nodes", "2", "--partition", "debug", "--time", "10", "--array", "4", "--cpus-per-task", "2",
           "--poll", "1", "--input", str(corpus_dir), "--tokenizer", str(tokenizer_dir), "--out", str(out), *BUILD]

    monkeypatch.setenv("LMFORGE_BUILD_HOOK", "hooks:kill_part")
    monkeypatch.setenv("LMFORGE_TEST_KILL_PART", "1@2")  # part 1's task dies after its 2nd shard
    assert submit.main(cmd) == 0
    job = read_records(out, "jobs.jsonl")[-1]
    with pytest.raises(ConfigError, match=f"merge job {job['merge_job_id']}.* is still (PENDING|RUNNING)"):
        submit.main(cmd)  # a second submission now would build the same parts twice at once
    assert wait(SlurmJob(folder=out / "slurm", job_id=job["merge_job_id"]), 1) == 1
    err = capsys.readouterr().err
    assert "1 of 4 parts are not complete: 1 (partial)" in err and "submit the same command again" in err
    assert not (out / "manifest.json").exists()
    assert job["parts"] == [0, 1, 2, 3]
    rows = subprocess.run(["sacct", "-P", "-n", "-o", "JobID,State,NodeList", "-j", job["job_id"]],
                          env=slurm_environ(cluster), capture_output=True, text=True, check=True).stdout.split()
    tasks = {r.split("|")[0]: r.split("|")[1:] for r in rows}
    assert {t: s for t, (s, _) in tasks.items()} == {f"{job['job_id']}_{i}": "FAILED" if i == 1 else "COMPLETED"
                                                     for i in range(4)}
    assert {n for _, n in tasks.values()} == {"n1", "n2"}  # the array ran over both nodes
    kept = {f.name: f.stat().st_mtime_ns for f in array.part_dir(out, 1).glob("train_*.bin")}
    assert sorted(kept) == ["train_00000.bin", "train_00001.bin"]  # what the killed task had finished

    monkeypatch.delenv("LMFORGE_TEST_KILL_PART")
    assert submit.main([*cmd, "--wait"]) == 0
    printed = capsys.readouterr().out
    assert "1 of 4 part(s) (1)" in printed  # the failed part alone ran again
    assert {f: array.part_dir(out, 1).joinpath(f).stat().st_mtime_ns for f in kept} == kept  # and resumed
    for split in ("train", "val"):
        assert np.array_equal(stream(out, split), stream(ref, split))
    assert json.loads((out / "manifest.json").read_text())["array"]["parts"] == 4
    assert data_cli(["inspect", str(out), "--verify"]) == 0
    assert submit.main(cmd) == 0 and "already built" in capsys.readouterr().out


def test_dry_run_prints_the_plan_and_the_array_and_writes_nothing(tmp_path, corpus_dir, tokenizer_dir, capsys):
    out = tmp_path / "arr"
    assert submit.main(["build", "--nodes", "4", "--cores-per-node", "32", "--cpus-per-task", "8", "--partition", "cpu",
                        "--time", "2:00:00", "--dry-run", "--input", str(corpus_dir), "--tokenizer",
                        str(tokenizer_dir), "--out", str(out), *BUILD]) == 0
    text = capsys.readouterr().out
    assert text.count("# part ") == 16 and "[missing]" in text  # 4 nodes x 32 / 8 = 16 tasks at a time
    assert "#SBATCH --array=0-15%16" in text and "#SBATCH --cpus-per-task=8" in text
    assert not out.exists()
    small = ["build", "--nodes", "1", "--cores-per-node", "2", "--partition", "cpu", "--time", "10", "--dry-run",
             "--tokenizer", str(tokenizer_dir), "--out", str(out)]
    with pytest.raises(ConfigError, match="unrecognized arguments: --workers 3"):  # the array sets it: --cpus-per-task
        submit.main([*small, "--workers", "3"])
    with pytest.raises(DataError, match="--dedup cannot run as a job array"):
        submit.main([*small, "--dedup"])
    # --cpus-per-task without --cores-per-node: no sinfo (this partition does not exist), one part per node
    assert submit.main(["build", "--nodes", "3", "--cpus-per-task", "2", "--partition", "nosuch", "--time", "10",
                        "--dry-run", "--input", str(corpus_dir), "--tokenizer", str(tokenizer_dir), "--out",
                        str(tmp_path / "o2")]) == 0
    assert "#SBATCH --array=0-2%3" in capsys.readouterr().out
