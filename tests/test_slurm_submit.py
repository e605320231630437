"""slurm.submit / slurm.status / the sbatch templates against the real local SLURM cluster (CPU, gloo).

Every job trains the tiny preset for 30 steps on 2 nodes x 1 process; its TensorBoard losses must
equal the same run under plain torchrun (nproc 2), interrupted or not.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, read_scalars, run_stage, stage_env
from slurm_fixtures import slurm_environ
from submitit.slurm.slurm import SlurmJob

from lmforge.errors import ConfigError
from slurm import status, submit
from slurm.launch import read_records

STEPS = 30
SUBMIT = ["--nodes", "2", "--gpus-per-node", "0", "--partition", "debug", "--time", "10", "--poll", "1"]


def train_args(run_dir, shards) -> list[str]:
    return ["configs/pretrain/tiny.yaml", f"--run_dir={run_dir}", f"--data.shards=[{shards}]", "--train.log_every=1",
            "--train.eval_every=0", f"--train.max_steps={STEPS}", "--train.global_batch_size=8",
            "--train.micro_batch_size=4"]


def losses(run_dir) -> dict[int, float]:
    return dict(read_scalars(run_dir)["train/loss"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards_dir) -> dict[int, float]:
    """The uninterrupted run under torchrun, 2 processes."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run_stage("pretrain", train_args(run_dir, shards_dir), nproc=2)
    out = losses(run_dir)
    assert sorted(out) == list(range(1, STEPS + 1))
    return out


@pytest.fixture
def cluster(slurm_cluster, monkeypatch) -> dict[str, str]:
    """This process talks to the test cluster; the jobs inherit the CPU training environment."""
    for k, v in {**stage_env(), **slurm_cluster}.items():  # the cluster's PATH: the sacct stand-in first
        monkeypatch.setenv(k, v)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    return slurm_cluster


def submit_job(run_dir: Path, shards, *extra: str) -> SlurmJob:
    assert submit.main(["pretrain", *SUBMIT, *train_args(run_dir, shards), *extra]) == 0
    job_id = read_records(run_dir, "jobs.jsonl")[-1]["job_id"]
    return SlurmJob(folder=run_dir / "slurm", job_id=job_id, tasks=(0, 1))


def log_text(job: SlurmJob, task: int = 0, kind: str = "out") -> str:
    f = job.paths.folder / f"{job.job_id}_{task}_log.{kind}"
    return f.read_text(errors="replace") if f.is_file() else ""


def wait_until(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def training_reached(job: SlurmJob, step: int) -> bool:
    return re.search(rf"^step\s+{step} \|", log_text(job), re.M) is not None


def sacct(cluster, job_id: str, fields: str = "State,Restarts") -> str:
    return subprocess.run(["sacct", "-n", "-P", "-j", job_id, "-o", fields], env=slurm_environ(cluster),
                          capture_output=True, text=True, check=True).stdout.strip()


# ---------------------------------------------------------------- 1. two nodes = torchrun
def test_two_nodes_train_like_torchrun(cluster, tmp_path, shards_dir, reference, capsys):
    run_dir = tmp_path / "run"
    assert submit.main(["pretrain", *SUBMIT, "--wait", *train_args(run_dir, shards_dir)]) == 0
    out = capsys.readouterr().out
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    assert f"job {job_id}: COMPLETED" in out
    log = (run_dir / "slurm" / f"{job_id}_0_log.out").read_text()
    assert "2 rank(s)" in log and f"done: {STEPS} steps" in log  # both ranks took part
    assert "Traceback" not in (run_dir / "slurm" / f"{job_id}_0_log.err").read_text()
    assert (run_dir / "slurm" / f"{job_id}_1_log.out").is_file()  # the second task ran (on n2)
    assert losses(run_dir) == reference
    # status: the job, its state, no requeue, the final checkpoint and the last loss
    capsys.readouterr()
    assert status.main([str(run_dir)]) == 0
    st = capsys.readouterr().out
    assert re.search(rf"job\s+{job_id}\s+pretrain\s+submitit\s+state COMPLETED\s+requeues 0", st), st
    assert f"latest checkpoint: step_{STEPS:08d} (step {STEPS}" in st
    assert f"last metrics (step {STEPS}): " in st and f"train/loss {reference[STEPS]:.4g}" in st


# ---------------------------------------------------------------- 2. preempted, requeued, exact
def test_interrupted_jobs_requeue_and_resume_exactly(cluster, tmp_path, shards_dir, reference, capsys):
    usr2, requeued = tmp_path / "usr2", tmp_path / "requeue"
    jobs = {usr2: submit_job(usr2, shards_dir), requeued: submit_job(requeued, shards_dir)}  # run side by side
    for run_dir, job in jobs.items():
        wait_until(lambda job=job: training_reached(job, 3), 240, f"job {job.job_id} training")
        if run_dir == usr2:
            job._interrupt()  # submitit's preemption: SIGTERM, then USR2 (what --signal=USR2@grace sends)
        else:
            subprocess.run(["scontrol", "requeue", job.job_id], check=True)  # SLURM kills + requeues itself
    for run_dir, job in jobs.items():
        assert submit.wait(job, 1) == 0, log_text(job, kind="err")[-3000:]
        log = log_text(job)
        saved = re.search(r"checkpoint step_(\d+) saved \(signal", log)
        assert saved and 3 <= int(saved.group(1)) < STEPS, log[-3000:]
        assert f"resumed from {run_dir}/checkpoints/step_{saved.group(1)} at step {int(saved.group(1))}" in log
        assert f"done: {STEPS} steps" in log
        assert losses(run_dir) == reference  # one continuous TensorBoard run, equal to the uninterrupted one
        assert sacct(cluster, job.job_id) == "COMPLETED|1"
        events = [(a["restart"], a["event"]) for a in read_records(run_dir, "attempts.jsonl")]
        last_of_first = "requeued" if run_dir == usr2 else "stopped"  # we requeue on USR2; SLURM did on its own
        assert events == [(0, "start"), (0, last_of_first), (1, "start"), (1, "completed")]
    assert f"job {jobs[requeued].job_id} requeued" not in log_text(jobs[requeued])
    assert f"job {jobs[usr2].job_id} requeued (restart 1 of at most 10)" in log_text(jobs[usr2])
    capsys.readouterr()
    status.main([str(usr2)])
    assert re.search(rf"job\s+{jobs[usr2].job_id} .*state COMPLETED\s+requeues 1", capsys.readouterr().out)


# ---------------------------------------------------------------- 3. the sbatch template
def test_sbatch_template_checkpoints_on_usr1_and_requeues(cluster, tmp_path, shards_dir, reference):
    run_dir = tmp_path / "run"
    out = tmp_path / "sbatch-%j.out"
    env = slurm_environ(cluster, **stage_env())
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--nodes", "2", "--partition", "debug", "--time", "10", "-o", str(out),
         "slurm/pretrain.sbatch", *train_args(run_dir, shards_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    log = Path(str(out).replace("%j", job_id))
    text = lambda: log.read_text(errors="replace") if log.is_file() else ""  # noqa: E731
    wait_until(lambda: re.search(r"^step\s+3 \|", text(), re.M), 240, "training under sbatch")
    subprocess.run(["scancel", "-b", "-s", "USR1", job_id], env=env, check=True)
    wait_until(lambda: sacct(cluster, job_id).split("|")[0] in ("COMPLETED", "FAILED", "CANCELLED"), 300,
               "the job to end")
    assert sacct(cluster, job_id) == "COMPLETED|1", text()[-3000:]
    t = text()
    assert "batch shell: USR1 received" in t and "2 rank(s)" in t
    saved = re.search(r"checkpoint step_(\d+) saved \(signal", t)
    assert saved and 3 <= int(saved.group(1)) < STEPS
    assert f"job {job_id} requeued (restart 1" in t
    assert f"at step {int(saved.group(1))}" in t and f"done: {STEPS} steps" in t
    assert losses(run_dir) == reference
    assert [r["job_id"] for r in read_records(run_dir, "jobs.jsonl")] == [job_id]  # registered once


# ---------------------------------------------------------------- 4. failures end the job
def test_failing_training_and_requeue_limit_end_the_job(cluster, tmp_path, shards_dir, capsys, monkeypatch):
    crash, limited = tmp_path / "crash", tmp_path / "limited"
    # training raises at step 2 on every rank: a non-finite loss with max_skipped_steps=1
    monkeypatch.setenv("LMFORGE_INJECT_NAN", "2")
    crash_job = submit_job(crash, shards_dir, "--train.max_skipped_steps=1", "--callbacks=[hooks:nan]")
    monkeypatch.delenv("LMFORGE_INJECT_NAN")
    limited_job = submit_job(limited, shards_dir, "--max-requeues", "0")
    wait_until(lambda: training_reached(limited_job, 3), 240, "the limited job training")
    limited_job._interrupt()
    capsys.readouterr()
    assert submit.wait(crash_job, 1) == 1
    err = capsys.readouterr().err
    assert f"job {crash_job.job_id} ended FAILED: pretrain.trainer.NonFiniteLossError" in err
    assert "Traceback" in log_text(crash_job, kind="err") and "consecutive steps had a non-finite loss" in \
        log_text(crash_job, kind="err")
    assert sacct(cluster, crash_job.job_id) == "FAILED|0"  # not requeued
    assert [a["event"] for a in read_records(crash, "attempts.jsonl")] == ["start", "failed"]

    assert submit.wait(limited_job, 1) == 1
    assert "RequeueLimitError" in capsys.readouterr().err
    assert "--max-requeues 0); not requeued" in log_text(limited_job, kind="err")
    assert sacct(cluster, limited_job.job_id) == "FAILED|0"
    assert [a["event"] for a in read_records(limited, "attempts.jsonl")] == ["start", "requeue_limit"]


def test_one_failing_rank_ends_the_whole_job_with_its_own_error(cluster, tmp_path, shards_dir, capsys, monkeypatch):
    # rank 1 raises at step 3 while rank 0 goes on into step 4's collectives (issue 13, item 12): srun's
    # --kill-on-bad-exit and no barrier after an error end the job; `--wait` quotes rank 1's error
    run_dir = tmp_path / "rank1"
    monkeypatch.setenv("LMFORGE_TEST_FAIL", "3@1")
    job = submit_job(run_dir, shards_dir, "--callbacks=[hooks:fail]")
    wait_until(lambda: training_reached(job, 3) or sacct(cluster, job.job_id).startswith("FAILED"), 240,
               "the job reaching step 3")
    t0 = time.monotonic()
    capsys.readouterr()
    assert submit.wait(job, 1) == 1
    assert time.monotonic() - t0 < 60
    err = capsys.readouterr().err
    assert f"job {job.job_id} ended FAILED: RuntimeError: injected failure on rank 1 at step 3" in err, err
    assert f"{job.job_id}_1_log.err" in err  # the failing task's log, not rank 0's
    assert sacct(cluster, job.job_id) == "FAILED|0"


# ---------------------------------------------------------------- 5. dry run, bad input
def test_dry_run_of_a_4x8_gpu_submission(tmp_path, capsys):
    run_dir = tmp_path / "big"
    rc = submit.main(["pretrain", "configs/pretrain/1b3.yaml", "--nodes", "4", "--gpus-per-node", "8",
                      "--partition", "gpu", "--time", "1-00:00:00", "--account", "proj", "--qos", "high",
                      "--constraint", "h100", "--mem", "0", "--cpus-per-task", "12", "--max-requeues", "5",
                      "--slurm.exclude=node[07-09]", "--dry-run", f"--run_dir={run_dir}", "--train.max_steps=100000"])
    assert rc == 0
    out = capsys.readouterr().out
    sbatch = {ln.split("=", 1)[0][len("#SBATCH --"):]: ln.split("=", 1)[1] if "=" in ln else True
              for ln in out.splitlines() if ln.startswith("#SBATCH --")}
    assert {k: sbatch[k] for k in ("nodes", "ntasks-per-node", "gpus-per-node", "partition", "time", "account",
                                   "qos", "constraint", "mem", "cpus-per-task", "exclude", "requeue", "signal",
                                   "job-name")} == {
        "nodes": "4", "ntasks-per-node": "8", "gpus-per-node": "8", "partition": "gpu", "time": "1440",
        "account": "proj", "qos": "high", "constraint": "h100", "mem": "0", "cpus-per-task": "12",
        "exclude": "'node[07-09]'", "requeue": True, "signal": "USR2@120", "job-name": "lmforge-pretrain"}
    assert sbatch["output"] == f"{run_dir}/slurm/%j_0_log.out"  # logs inside the run directory
    # GPUs: the CUDA accelerator, whatever the submitting shell exported (item 10), and one failed task ends the step
    assert "world size 32" in out and "export DS_ACCELERATOR=cuda\n" in out and "LMFORGE_ACCELERATOR" not in out
    assert "srun --unbuffered" in out and "--kill-on-bad-exit=1" in out.split("srun --unbuffered", 1)[1].splitlines()[0]
    assert f"run_dir: {run_dir}\n" in out and "max_steps: 100000" in out and "hidden_size: 2048" in out
    assert not run_dir.exists()  # nothing submitted, nothing written


@pytest.mark.parametrize("args, message", [
    (["--gpus-per-node", "0", "--partition", "p", "--time", "5"], "required: --nodes"),
    (["--nodes", "2", "--gpus-per-node", "0", "--partition", "p", "--time", "5h"], "--time '5h'"),
    (["--nodes", "0", "--gpus-per-node", "0", "--partition", "p", "--time", "5"], "--nodes 0: must be positive"),
    (["--nodes", "1", "--gpus-per-node", "0", "--partition", "p", "--time", "1", "--grace", "90"], "--grace 90s"),
    (["--nodes", "1", "--gpus-per-node", "0", "--partition", "p", "--time", "5", "--train.nope=1"],
     "unknown config key 'train.nope'"),
    (["--nodes", "1", "--gpus-per-node", "0", "--partition", "p", "--time", "5", "--slurm.BAD KEY=1"],
     "--slurm.BAD KEY: not an sbatch option name"),
])
def test_bad_submissions_name_the_option(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        submit.main(["pretrain", "configs/pretrain/tiny.yaml", *args, "--dry-run"])


def test_unknown_stage_is_refused():
    with pytest.raises(ConfigError, match="unknown stage 'train'"):
        submit.main(["train", "configs/pretrain/tiny.yaml", "--nodes", "1"])
