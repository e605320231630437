"""The local SLURM cluster (slurm/local_cluster.sh) and the sacct stand-in, against real slurmctld/slurmd."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import submitit
from slurm_fixtures import SCRIPT, slurm_environ
from submitit.slurm.slurm import SlurmInfoWatcher


def sh(cluster, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    # cwd: the cluster's folder takes the slurm-<job>.out files of jobs without -o
    proc = subprocess.run(list(cmd), env=slurm_environ(cluster), cwd=cluster["LMFORGE_SLURM_DIR"],
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_for(pred, timeout: float, what: str, step: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def sacct_info(cluster, *job_ids: str) -> dict[str, dict[str, str]]:
    """Exactly submitit's call and parser."""
    cmd = ["sacct", "-o", "JobID,State,NodeList", "--parsable2"]
    for j in job_ids:
        cmd += ["-j", j]
    return SlurmInfoWatcher().read_info(sh(cluster, *cmd).stdout)


def node_states(cluster) -> dict[str, str]:
    out = sh(cluster, "sinfo", "-h", "-N", "-o", "%N %t %P").stdout
    return {n: f"{s} {p}" for n, s, p in (line.split() for line in out.splitlines())}


def test_two_idle_nodes_in_default_partition(slurm_cluster):
    assert Path(slurm_cluster["SLURM_CONF"]).is_file()
    assert slurm_cluster["PATH"].startswith(str(SCRIPT.parent) + ":")
    assert sh(slurm_cluster, "which", "sacct").stdout.strip() == str(SCRIPT.parent / "sacct")
    assert wait_for(lambda: node_states(slurm_cluster) == {"n1": "idle debug*", "n2": "idle debug*"}, 30,
                    "two idle nodes")


def test_status_and_idempotent_start(slurm_cluster):
    d = slurm_cluster["LMFORGE_SLURM_DIR"]
    pid = Path(d, "run", "slurmctld.pid").read_text()
    status = sh(slurm_cluster, "bash", str(SCRIPT), "status", "--dir", d)
    assert "UP" in status.stdout and "n1" in status.stdout and "n2" in status.stdout
    t0 = time.monotonic()
    again = sh(slurm_cluster, "bash", str(SCRIPT), "start", "--dir", d)
    assert time.monotonic() - t0 < 10
    assert f"export SLURM_CONF={slurm_cluster['SLURM_CONF']}" in again.stdout
    assert Path(d, "run", "slurmctld.pid").read_text() == pid, "start on a running cluster restarted it"
    # a folder with no cluster: status says down with exit 3, stop is a no-op
    assert sh(slurm_cluster, "bash", str(SCRIPT), "status", "--dir", d + "-none", check=False).returncode == 3
    assert sh(slurm_cluster, "bash", str(SCRIPT), "stop", "--dir", d + "-none").returncode == 0


def test_srun_spans_both_nodes(slurm_cluster):
    out = sh(slurm_cluster, "srun", "-N2", "-n2", "-t", "1", "bash", "-c",
             "echo $SLURM_PROCID $SLURM_NODEID $SLURMD_NODENAME $SLURM_NNODES").stdout
    assert sorted(out.split("\n")[:2]) == ["0 0 n1 2", "1 1 n2 2"], out


def test_sbatch_inner_srun_and_sacct_states(slurm_cluster, tmp_path):
    script = tmp_path / "two_nodes.sh"
    script.write_text("#!/bin/bash\n#SBATCH -N2 -n2 -t 1\n"
                      "srun bash -c 'echo task $SLURM_PROCID on $SLURMD_NODENAME node $SLURM_NODEID'\n")
    out = tmp_path / "out-%j.txt"
    ok = sh(slurm_cluster, "sbatch", "--parsable", "-o", str(out), str(script)).stdout.strip()
    bad = sh(slurm_cluster, "sbatch", "--parsable", "-t", "1", "--wrap", "exit 3").stdout.strip()
    arr = sh(slurm_cluster, "sbatch", "--parsable", "-t", "1", "--array=0-2", "--wrap", "true").stdout.strip()
    ids = [ok, bad, *(f"{arr}_{i}" for i in range(3))]
    # what submitit does: poll sacct until no job is in an unfinished state
    unfinished = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "UNKNOWN"}
    info = wait_for(lambda: (i := sacct_info(slurm_cluster, ok, bad, arr)) and
                    all(j in i and i[j]["State"] not in unfinished for j in ids) and i, 30, "the jobs to end")
    lines = sorted(Path(str(out).replace("%j", ok)).read_text().splitlines())
    assert lines == ["task 0 on n1 node 0", "task 1 on n2 node 1"]
    assert info[ok] == {"JobID": ok, "State": "COMPLETED", "NodeList": "n[1-2]"}
    assert info[bad]["State"] == "FAILED"
    assert [info[f"{arr}_{i}"]["State"] for i in range(3)] == ["COMPLETED"] * 3
    # the stand-in's other answers: unknown job -> header only, like real sacct; bad field -> error
    assert sh(slurm_cluster, "sacct", "-P", "-j", "999999").stdout.splitlines() == [
        "JobID|JobName|Partition|Account|AllocCPUS|State|ExitCode"]
    assert sh(slurm_cluster, "sacct", "-o", "nosuchfield", check=False).returncode == 1
    fixed = sh(slurm_cluster, "sacct", "-j", bad, "-o", "jobid,state,exitcode").stdout.splitlines()
    assert fixed[0].split() == ["JobID", "State", "ExitCode"] and fixed[2].split() == [bad, "FAILED", "3:0"]


def test_requeue_restarts_job(slurm_cluster, tmp_path):
    out = tmp_path / "requeue.txt"
    job = sh(slurm_cluster, "sbatch", "--parsable", "-t", "2", "--requeue", "--open-mode=append", "-o", str(out),
             "--wrap", "echo restart=${SLURM_RESTART_COUNT:-0}; sleep 120").stdout.strip()
    try:
        wait_for(lambda: out.exists() and "restart=0" in out.read_text(), 30, "the first run")
        sh(slurm_cluster, "scontrol", "requeue", job)
        # the requeued job waits for cred_expire (10 s) before it may start again
        wait_for(lambda: "restart=1" in out.read_text(), 45, "the restart")
        restarts = sh(slurm_cluster, "sacct", "-n", "-P", "-j", job, "-o", "State,Restarts").stdout.strip()
        assert restarts == "RUNNING|1"
    finally:
        sh(slurm_cluster, "scancel", job)
    state = wait_for(lambda: sacct_info(slurm_cluster, job)[job]["State"].startswith("CANCELLED") and
                     sacct_info(slurm_cluster, job)[job]["State"], 30, "the cancel")
    assert state == "CANCELLED by 0"


def test_submitit_job_on_two_nodes(slurm_cluster, tmp_path, monkeypatch):
    for k, v in slurm_cluster.items():
        monkeypatch.setenv(k, v)
    ex = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    ex.update_parameters(nodes=2, tasks_per_node=1, timeout_min=2, slurm_partition="debug")
    job = ex.submit(lambda: (submitit.JobEnvironment().global_rank, submitit.JobEnvironment().hostname))
    results = job.results()  # returns once the result files exist
    assert sorted(r[0] for r in results) == [0, 1]
    # the job's state as submitit reads it through the sacct stand-in
    wait_for(lambda: job.watcher.get_state(job.job_id, mode="force") == "COMPLETED", 20, "COMPLETED")
    assert job.done()
