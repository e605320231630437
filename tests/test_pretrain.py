"""Pretraining with real DeepSpeed engines on CPU (gloo), single process and torchrun with 2 ranks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import read_scalars, run_stage, stage_env

TINY = "configs/pretrain/tiny.yaml"


def _args(run_dir, shards, *extra: str) -> list[str]:
    return [TINY, f"--run_dir={run_dir}", f"--data.shards=[{shards}]", "--train.log_every=1",
            "--train.eval_every=5", "--train.eval_samples=16", "--data.seq_len=64", *extra]


def _losses(run_dir) -> np.ndarray:
    return np.array([v for _, v in read_scalars(run_dir)["train/loss"]])


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, shards_dir):
    """10 steps of the tiny model on 2 ranks for ZeRO-0, 2 and 3 x {fp32, bf16}, and one with full offload.
    ZeRO-1 is left out for the suite's time budget: the same optimizer class as ZeRO-2 (DeepSpeed's
    stage-1/2 optimizer), and test_checkpoint resumes a 2-rank ZeRO-1 run on 1 rank against its curve."""
    runs = {}
    for precision in ("fp32", "bf16"):
        for stage in (0, 2, 3):
            rd = tmp_path_factory.mktemp(f"z{stage}{precision}")
            # ZeRO-3 builds the model already partitioned (zero.Init), and still starts from the same weights
            # (on CPU only when asked: the default builds it whole there, as the offload run below does)
            proc = run_stage("pretrain", _args(rd, shards_dir, "--train.max_steps=10", f"--zero.stage={stage}",
                                               f"--precision={precision}", "--train.micro_batch_size=4",
                                               "--zero.partitioned_init=true"), nproc=2)
            assert ("ZeRO-3 (built partitioned)," in proc.stdout) == (stage == 3)
            runs[stage, precision] = rd
    # ZeRO-Infinity style: parameters and optimizer states in host memory, the same arithmetic
    rd = tmp_path_factory.mktemp("z3offload")
    proc = run_stage("pretrain", _args(rd, shards_dir, "--train.max_steps=10", "--zero.stage=3", "--precision=bf16",
                                       "--train.micro_batch_size=4", "--zero.offload_optimizer=true",
                                       "--zero.offload_param=true"), nproc=2)
    assert "offload: optimizer states → cpu (AdamW), parameters → cpu" in proc.stdout
    assert "ZeRO-3, bf16" in proc.stdout  # built whole: the default on DeepSpeed's CPU accelerator
    runs["3+offload", "bf16"] = rd
    return runs


def test_zero_stages_and_precisions_give_the_same_curve(zero_runs):
    ref = _losses(zero_runs[0, "fp32"])
    assert len(ref) == 10 and np.all(np.isfinite(ref))
    assert ref[-1] < ref[0] - 0.3  # it learns
    for (stage, precision), rd in zero_runs.items():
        got = _losses(rd)
        tol = 1e-4 if precision == "fp32" else 5e-2
        np.testing.assert_allclose(got, ref, rtol=0, atol=tol, err_msg=f"ZeRO-{stage} {precision}")


def test_tensorboard_holds_every_metric(zero_runs):
    rd = zero_runs[2, "bf16"]
    tags = read_scalars(rd)
    for tag in ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu",
                "train/tokens_seen", "train/step_time", "train/skipped_steps", "eval/loss", "eval/ppl",
                "sys/peak_mem_gb"]:
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert [s for s, _ in tags["train/loss"]] == list(range(1, 11))
    assert tags["train/tokens_seen"][-1][1] == 10 * 4 * 2 * 64  # steps x micro x ranks x seq_len
    eval_loss = dict(tags["eval/loss"])
    assert set(eval_loss) == {5, 10}
    assert math.isclose(dict(tags["eval/ppl"])[10], math.exp(eval_loss[10]), rel_tol=1e-5)
    assert 0 < tags["train/mfu"][-1][1] < 1
    lrs = [v for _, v in tags["train/lr"]]
    assert lrs[0] < lrs[2]  # warm-up
    from lmforge.tensorboard import read_text

    assert any("config" in t for t in read_text(rd))  # the resolved config, as text
    # the gradient norm at every stage, ZeRO-0 included (torch's optimizer keeps none: lmforge computes it)
    ref = [v for _, v in read_scalars(zero_runs[2, "fp32"])["train/grad_norm"]]
    for stage in (0, 3):
        norms = [v for _, v in read_scalars(zero_runs[stage, "fp32"])["train/grad_norm"]]
        np.testing.assert_allclose(norms, ref, rtol=1e-3, err_msg=f"train/grad_norm at ZeRO-{stage}")
    assert (rd / "config.yaml").is_file() and (rd / "tokenizer" / "tokenizer.model").is_file()


def test_fp16_trains_with_dynamic_loss_scale(tmp_path, shards_dir):
    """fp16 where the device supports it (every CUDA GPU); elsewhere a clear one-line refusal."""
    proc = run_stage("pretrain", _args(tmp_path, shards_dir, "--train.max_steps=6", "--precision=fp16", "--zero.stage=2"),
                     check=False)
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        assert proc.returncode == 2 and "precision=fp16 is not supported on this cpu device" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    tags = read_scalars(tmp_path)
    assert np.all(np.isfinite(_losses(tmp_path)))
    assert tags["train/loss_scale"][-1][1] >= 1


def test_gradient_accumulation_matches_a_large_micro_batch(tmp_path, shards_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--train.max_steps=5", "--precision=fp32", "--train.global_batch_size=4"]
    run_stage("pretrain", _args(a, shards_dir, *common, "--train.micro_batch_size=1"))
    run_stage("pretrain", _args(b, shards_dir, *common, "--train.micro_batch_size=4"))
    np.testing.assert_allclose(_losses(a), _losses(b), rtol=0, atol=1e-4)


def test_deepspeed_launcher_runs_the_same_entry_point(tmp_path, shards_dir):
    import subprocess
    import sys

    from conftest import REPO, _free_port

    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port()),
           "--module", "pretrain", *_args(tmp_path, shards_dir, "--train.max_steps=3", "--zero.stage=1",
                                          "--train.micro_batch_size=2")]
    ext = tmp_path / "torch_extensions"  # empty: would DeepSpeed JIT-compile anything to train on CPU?
    proc = subprocess.run(cmd, cwd=REPO, env=stage_env(TORCH_EXTENSIONS_DIR=str(ext)), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout and len(_losses(tmp_path)) == 3
    # nothing: the shm comm op (only used by tensor-parallel inference) is not built, torch_adam needs no op
    assert not ext.exists() or not any(ext.rglob("*.so")), sorted(map(str, ext.rglob("*")))[:10]


def test_masked_lm_trains(tmp_path, shards_dir):
    run_stage("pretrain", _args(tmp_path, shards_dir, "--model.kind=masked", "--train.max_steps=25",
                                "--optim.lr=2e-3", "--optim.warmup_steps=2", "--precision=fp32"))
    losses = _losses(tmp_path)
    assert np.all(np.isfinite(losses)) and losses[-5:].mean() < losses[:5].mean() - 0.3
    assert "eval/loss" in read_scalars(tmp_path)


def test_nan_loss_on_one_rank_skips_that_step_on_both(tmp_path, shards_dir):
    args = _args(tmp_path, shards_dir, "--train.max_steps=6", "--precision=fp32", "--zero.stage=2",
                 "--callbacks=[hooks:nan]")
    proc = run_stage("pretrain", args, nproc=2, env=stage_env(LMFORGE_INJECT_NAN="3@1"))
    tags = read_scalars(tmp_path)
    skipped = dict(tags["train/skipped_steps"])
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[6] == 1
    assert math.isnan(dict(tags["train/loss"])[3])
    lr = dict(tags["train/lr"])
    assert lr[3] == lr[2]  # the optimizer (and its schedule) did not step
    assert "done: 6 steps" in proc.stdout
    # K consecutive non-finite steps stop the run with a clear error on every rank
    bad = run_stage("pretrain", [*args, "--train.max_skipped_steps=2", f"--run_dir={tmp_path / 'b'}"], nproc=2,
                    env=stage_env(LMFORGE_INJECT_NAN="2,3,4@0"), check=False)
    assert bad.returncode != 0
    assert "2 consecutive steps had a non-finite loss" in bad.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("--train.bogus=1", "unknown config key 'train.bogus'"),
        ("--train.global_batch_size=-4", "train.global_batch_size: must be positive"),
        ("--model.vocab_size=999", "model.vocab_size 999 does not match"),
    ],
)
def test_bad_config_is_one_line_and_nonzero(tmp_path, shards_dir, override, message):
    proc = run_stage("pretrain", _args(tmp_path, shards_dir, "--train.micro_batch_size=4", override), check=False)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_missing_shards_is_a_clear_error(tmp_path):
    proc = run_stage("pretrain", [TINY, f"--run_dir={tmp_path}", f"--data.shards=[{tmp_path / 'nope'}]"], check=False)
    assert proc.returncode == 2 and f"shard directory {tmp_path / 'nope'} does not exist" in proc.stderr


@pytest.mark.parametrize("preset, nominal", [("1b3", 1.3e9), ("7b", 6.74e9), ("bert-base", 110e6)])
def test_dry_run_reports_size_flops_and_memory(preset, nominal):
    proc = run_stage("pretrain", [f"configs/pretrain/{preset}.yaml", "--dry-run", "--ranks=8"])
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("n_params:"))
    n = int(line.split(":")[1].replace(",", ""))
    assert abs(n - nominal) / nominal < 0.03
    assert "flops_per_token" in proc.stdout and "zero3" in proc.stdout


def test_auto_precision_is_bf16_only_where_it_is_fast():
    from pretrain.engine import resolve_precision

    assert resolve_precision("auto", cuda=True, cpu_flags=set()) == "bf16"
    assert resolve_precision("auto", cuda=False, cpu_flags={"avx2", "fma"}) == "fp32"  # bf16 emulated: ~10x slower
    assert resolve_precision("auto", cuda=False, cpu_flags={"avx512f", "avx512_bf16"}) == "bf16"
    assert resolve_precision("auto", cuda=False, cpu_flags={"amx_bf16", "amx_tile"}) == "bf16"
    assert resolve_precision("bf16", cuda=False, cpu_flags=set()) == "bf16"  # an explicit choice stands


def test_auto_precision_is_resolved_before_the_run_records_it(tmp_path, shards_dir):
    from pretrain.engine import resolve_precision

    run_stage("pretrain", _args(tmp_path, shards_dir, "--train.max_steps=2", "--precision=auto",
                                "--train.micro_batch_size=4", "--checkpoint.interval_steps=2"))
    want = resolve_precision("auto")
    assert f"precision: {want}" in (tmp_path / "config.yaml").read_text()
    state = json.loads((tmp_path / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["precision"] == want and state["global_batch"] == 4
