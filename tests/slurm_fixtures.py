"""The ``slurm_cluster`` fixture: a real SLURM cluster on localhost (slurm/local_cluster.sh) for one test session.

Usage (conftest.py imports the fixture)::

    def test_x(slurm_cluster, monkeypatch):
        subprocess.run(["sbatch", ...], env=slurm_environ(slurm_cluster))      # subprocesses
        for k, v in slurm_cluster.items(): monkeypatch.setenv(k, v)          # in-process submitit

The fixture yields ``{"SLURM_CONF": ..., "PATH": "<repo>/slurm:" + PATH, "LMFORGE_SLURM_DIR": ...}``:
PATH puts the ``sacct`` stand-in first (there is no slurmdbd). The cluster (nodes n1, n2, partition
debug) lives in a fresh short folder under /tmp (unix socket paths must stay short) and is stopped at
the end of the session; the folder is removed unless the stop failed. If the cluster cannot start,
every test that uses it errors (it is never skipped) with the script's output and log tails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "local_cluster.sh"


def _clean_environ() -> dict[str, str]:
    """os.environ without SLURM_* variables inherited from an outer job (they would point srun at it)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def slurm_environ(cluster: dict[str, str], **extra: str) -> dict[str, str]:
    """The full environment for a subprocess that talks to the test cluster."""
    return {**_clean_environ(), **cluster, **extra}


def _run(cmd: str, cluster_dir: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), cmd, "--dir", str(cluster_dir)], env=_clean_environ(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, str]]:
    cluster_dir = Path(tempfile.mkdtemp(prefix="lmf-slurm-", dir="/tmp" if os.path.isdir("/tmp") else None))
    # 600 s: the first start on a fresh machine installs the Debian packages
    start = _run("start", cluster_dir, timeout=600)
    if start.returncode != 0:
        _run("stop", cluster_dir, timeout=120)  # whatever did come up; the folder stays for its logs
        pytest.fail(f"local SLURM cluster did not start (rc {start.returncode}, logs in {cluster_dir}/log):\n"
                    f"{start.stdout}\n{start.stderr}", pytrace=False)
    env = {"LMFORGE_SLURM_DIR": str(cluster_dir)}
    for line in start.stdout.splitlines():  # the script's own `export NAME=value` lines
        if line.startswith("export ") and "=" in line:
            name, value = line[len("export "):].split("=", 1)
            env[name] = value.replace("$PATH", os.environ.get("PATH", ""))
    assert {"SLURM_CONF", "PATH"} <= env.keys(), start.stdout
    try:
        yield env
    finally:
        stop = _run("stop", cluster_dir, timeout=120)
        if stop.returncode == 0:
            shutil.rmtree(cluster_dir, ignore_errors=True)
        else:
            print(f"local SLURM cluster stop failed (folder kept: {cluster_dir}):\n{stop.stdout}\n{stop.stderr}")
