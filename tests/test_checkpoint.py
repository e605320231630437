"""Sharded checkpoints with real DeepSpeed: exact resume, kill -9, interrupted saves, other world
sizes, rotation, refusals, and the Hugging Face export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, read_scalars, run_stage, slowed_env, stage_env

TINY = "configs/pretrain/tiny.yaml"


def _args(run_dir, shards, *extra: str) -> list[str]:
    return [TINY, f"--run_dir={run_dir}", f"--data.shards=[{shards}]", "--train.log_every=1", "--train.eval_every=0",
            "--train.eval_samples=8", "--data.seq_len=64", "--train.global_batch_size=4", "--optim.warmup_steps=3",
            *extra]


def _losses(run_dir) -> dict[int, float]:
    return dict(read_scalars(run_dir)["train/loss"])


def _weights(run_dir, step: int | None = None) -> dict[str, torch.Tensor]:
    from pretrain.checkpoint import latest_checkpoint, step_tag
    from pretrain.export import fp32_state_dict

    d = latest_checkpoint(run_dir) if step is None else Path(run_dir) / "checkpoints" / step_tag(step)
    return fp32_state_dict(d)


def test_resume_is_exact_at_the_same_world_size(tmp_path, shards_dir):
    """ZeRO-2, bf16, optimizer states offloaded: stopped by exit_interval, resumed bit-identically (ZeRO-3:
    test_zero3_resume_at_the_same_world_size_is_bit_identical)."""
    stage, offload = 2, ("--zero.offload_optimizer=true",)
    common = [f"--zero.stage={stage}", "--precision=bf16", "--train.max_steps=10", "--train.micro_batch_size=2",
              *offload]
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = run_stage("pretrain", _args(straight, shards_dir, *common), nproc=2)
    if offload:  # the engine really holds the optimizer states in host memory (read from DeepSpeed)
        assert "offload: optimizer states → cpu (AdamW)" in proc.stdout
    first = run_stage("pretrain", _args(split, shards_dir, *common, "--train.exit_interval=5"), nproc=2)
    assert "checkpoint step_00000005 saved (exit_interval" in first.stdout
    second = run_stage("pretrain", _args(split, shards_dir, *common), nproc=2)
    assert "resumed from" in second.stdout and "at step 5" in second.stdout
    a, b = _losses(straight), _losses(split)
    assert sorted(b) == list(range(1, 11))  # one continuous TensorBoard curve across the restart
    assert [a[s] for s in range(1, 11)] == [b[s] for s in range(1, 11)]  # bit-identical
    state = json.loads((split / "checkpoints" / "step_00000010" / "trainer_state.json").read_text())
    assert state["loader"]["cursor"] == 10 * 4 and state["world_size"] == 2 and state["zero_stage"] == stage
    rng_files = list((split / "checkpoints" / "step_00000010").glob("rng_rank*.pt"))
    assert len(rng_files) == 2
    for f in rng_files:  # what lmforge saves itself loads without unpickling code
        assert set(torch.load(f, weights_only=True)) == {"python", "numpy", "torch", "cuda"}


def test_sigkill_mid_training_resumes_to_the_same_weights(tmp_path, shards_dir):
    common = ["--zero.stage=2", "--precision=fp32", "--train.max_steps=16", "--checkpoint.interval_steps=4",
              "--train.micro_batch_size=4"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run_stage("pretrain", _args(ref, shards_dir, *common))
    cmd = [sys.executable, "-m", "pretrain", *_args(killed, shards_dir, *common)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 300
    marker = killed / "checkpoints" / "step_00000008" / "trainer_state.json"
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (killed / "checkpoints" / "step_00000016").exists()
    run_stage("pretrain", _args(killed, shards_dir, *common))
    a, b = _weights(ref), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_save_is_ignored(tmp_path, shards_dir, capfd):
    from pretrain.checkpoint import latest_checkpoint

    rd = tmp_path / "run"
    run_stage("pretrain", _args(rd, shards_dir, "--train.max_steps=6", "--checkpoint.interval_steps=3",
                                "--train.micro_batch_size=4"))
    ckpts = rd / "checkpoints"
    # what a kill during the save of step 9 leaves: DeepSpeed files, no trainer_state.json, latest not moved
    shutil.copytree(ckpts / "step_00000006", ckpts / "step_00000009")
    (ckpts / "step_00000009" / "trainer_state.json").unlink()
    assert latest_checkpoint(rd) == ckpts / "step_00000006"
    assert "ignoring incomplete checkpoint" in capfd.readouterr().out
    # ...and when `latest` itself names an incomplete one, fall back to the newest complete checkpoint
    (ckpts / "latest").write_text("step_00000009\n")
    assert latest_checkpoint(rd) == ckpts / "step_00000006"
    out = run_stage("pretrain", _args(rd, shards_dir, "--train.max_steps=8", "--train.micro_batch_size=4"))
    assert "resumed from" in out.stdout and "at step 6" in out.stdout


# (ZeRO stage, ranks that wrote the checkpoint, ranks that resume it): both directions for ZeRO-3,
# whose partitioned parameters are the hard case, and ZeRO-1 to fewer ranks. ZeRO-2 (the same optimizer
# class as ZeRO-1) goes 4 → 3 → 4 ranks in test_resume_world_sizes, against the curve and sample by sample.
WORLD_CHANGES = [(1, 2, 1), (3, 2, 1), (3, 1, 2)]


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory, shards_dir):
    """12 steps (same global batch) per (stage, ranks) the world-size tests start from, checkpoint at step 6."""
    runs = {}
    for stage, nproc in sorted({(stage, src) for stage, src, _ in WORLD_CHANGES}):
        rd = tmp_path_factory.mktemp(f"s{stage}n{nproc}")
        run_stage("pretrain", _args(rd, shards_dir, f"--zero.stage={stage}", "--precision=fp32",
                                    "--train.max_steps=12", "--checkpoint.interval_steps=6",
                                    f"--train.micro_batch_size={4 // nproc}"), nproc=nproc)
        runs[stage, nproc] = rd
    return runs


def test_zero1_trains_the_same_curve_as_zero3(straight_runs):
    """The same 12 steps (fp32, same global batch, 2 ranks) under ZeRO-1 and ZeRO-3 give the same losses: the
    ZeRO-1 engine settings train what the others do (test_pretrain compares ZeRO-0, 2 and 3)."""
    a, b = _losses(straight_runs[1, 2]), _losses(straight_runs[3, 2])
    assert sorted(a) == sorted(b) == list(range(1, 13))
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=0, atol=1e-4)


def test_zero3_resume_at_the_same_world_size_is_bit_identical(tmp_path, shards_dir, straight_runs):
    """The 2-rank ZeRO-3 run's step-6 checkpoint, resumed on 2 ranks in another run directory: DeepSpeed's own
    partitioned load (no universal conversion), and the curve goes on bit for bit."""
    ref = straight_runs[3, 2]
    rd = tmp_path / "run"
    shutil.copytree(ref / "checkpoints" / "step_00000006", rd / "checkpoints" / "step_00000006")
    (rd / "checkpoints" / "latest").write_text("step_00000006\n")
    out = run_stage("pretrain", _args(rd, shards_dir, "--zero.stage=3", "--precision=fp32", "--train.max_steps=12",
                                      "--checkpoint.interval_steps=6", "--train.micro_batch_size=2"), nproc=2)
    assert "resumed from" in out.stdout and "at step 6" in out.stdout and "universal" not in out.stdout
    assert not list((rd / "checkpoints").glob("*universal*"))  # no conversion at the same world size
    want, got = _losses(ref), _losses(rd)
    assert sorted(got) == list(range(7, 13)) and [got[s] for s in range(7, 13)] == [want[s] for s in range(7, 13)]
    assert len(list((rd / "checkpoints" / "step_00000012").glob("rng_rank*.pt"))) == 2


@pytest.mark.parametrize("stage, src, dst", WORLD_CHANGES)
def test_resume_on_another_number_of_ranks(tmp_path, shards_dir, straight_runs, stage, src, dst):
    ref = straight_runs[stage, src]
    rd = tmp_path / "run"
    shutil.copytree(ref / "checkpoints" / "step_00000006", rd / "checkpoints" / "step_00000006")
    (rd / "checkpoints" / "latest").write_text("step_00000006\n")
    # no global batch given and micro 2: micro x ranks would be 2 on one rank; the checkpoint's 4 is kept
    # (2 micro batches accumulated on 1 rank, 1 on each of 2 ranks)
    args = [a for a in _args(rd, shards_dir, f"--zero.stage={stage}", "--precision=fp32", "--train.max_steps=12",
                             "--train.micro_batch_size=2") if not a.startswith("--train.global_batch_size")]
    env = stage_env()
    if stage == 3:
        # 7B: the conversion outlasts the process-group timeout. Recreated: a conversion slowed to 16 s
        # against an 8 s timeout; it must run where no collective waits on it (issue 13, item 1)
        env = slowed_env(tmp_path / "site", {"argv:deepspeed.checkpoint.ds_to_universal": 16})
        args.append("--dist.timeout_s=8")
    out = run_stage("pretrain", args, nproc=dst, env=env)
    assert f"universal: {src} → {dst} ranks" in out.stdout
    assert f"({len(os.sched_getaffinity(0))} workers)" in out.stdout  # one extract/merge worker per core
    assert "keeping the global batch of step_00000006, 4" in out.stdout or dst * 2 == 4
    want, got = _losses(ref), _losses(rd)
    got, want = [got[s] for s in range(7, 13)], [want[s] for s in range(7, 13)]
    assert abs(got[0] - want[0]) < 1e-5  # restored weights: the first loss after resume is the same
    # every stage continues within fp32 noise (accumulation sums in another order). ZeRO-3 drifted by
    # ~1e-3 here until restore() gave each optimizer group its own step counter (DeepSpeed's universal
    # load shares one, which AdamW then advanced once per group)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 if dst == src * 2 else 1e-4)
    state = json.loads((rd / "checkpoints" / "step_00000012" / "trainer_state.json").read_text())
    assert state["loader"]["cursor"] == 12 * 4 and state["world_size"] == dst  # the data position continued


def test_keep_last_and_permanent_checkpoints(tmp_path, shards_dir):
    rd = tmp_path / "run"
    run_stage("pretrain", _args(rd, shards_dir, "--train.max_steps=10", "--checkpoint.interval_steps=2",
                                "--checkpoint.keep_last=2", "--checkpoint.keep_every=4", "--train.micro_batch_size=4"))
    names = sorted(d.name for d in (rd / "checkpoints").iterdir() if d.is_dir())
    assert names == ["step_00000004", "step_00000008", "step_00000010"]
    assert (rd / "checkpoints" / "latest").read_text().strip() == "step_00000010"


def test_wrong_resumes_are_refused(tmp_path, shards_dir, corpus_dir, tokenizer_dir):
    from data_pipeline.build import build_shards

    rd = tmp_path / "run"
    base = ["--train.max_steps=4", "--train.micro_batch_size=4"]
    run_stage("pretrain", _args(rd, shards_dir, *base))

    def refused(*extra: str, shards=shards_dir) -> str:
        proc = run_stage("pretrain", _args(rd, shards, *base, "--train.max_steps=6", *extra), check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        return proc.stderr

    assert "different model shape (model.num_layers: 4 → 3)" in refused("--model.num_layers=3")
    assert "already holds checkpoints" in refused("--resume=none")
    other = tmp_path / "other_shards"
    build_shards([str(corpus_dir)], tokenizer_dir, other, shard_tokens=30_000, val_docs=10, val_every=10)
    assert "the shards changed" in refused(shards=other)
    # allowed, but said: new shards, and a global batch other than the checkpoint's
    ok = run_stage("pretrain", _args(rd, other, *base, "--train.max_steps=6", "--resume.allow_data_change=true",
                                     "--train.global_batch_size=8"))
    assert "at step 4" in ok.stdout
    assert "step_00000004 was trained with global batch 4; continuing with train.global_batch_size=8" in ok.stdout


_ENGINE_LOGITS = r"""
import sys, numpy as np, torch
from lmforge.config import load_config
from pretrain.config import PretrainConfig
from pretrain.dist import init_distributed, shutdown
from pretrain.run import build
run_dir, out = sys.argv[1], sys.argv[2]
cfg = load_config(PretrainConfig, f"{run_dir}/config.yaml", [f"--run_dir={run_dir}", "--resume=auto",
                  "--metrics.tensorboard=false"])
info = init_distributed()
trainer = build(cfg, info)
batch = torch.from_numpy(trainer.loader.sample(0)[None, :-1])
trainer.engine.eval()
with torch.no_grad():
    logits = trainer.engine(input_ids=batch).logits
np.save(out, np.stack([batch.numpy().astype(np.float32)[0], np.zeros(batch.shape[1], np.float32)]))
np.save(out.replace(".npy", "_logits.npy"), logits.float().numpy())
shutdown()
"""


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_export_round_trip_matches_the_engine(tmp_path, shards_dir, causal_zero3, kind):
    """A 2-rank ZeRO-3 checkpoint (partitioned) exported: transformers' model gives the engine's logits."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, pipeline

    rd = tmp_path / "run"
    if kind == "causal":  # the fine-tuning tests' backbone, copied: the probe below resumes it
        shutil.copytree(causal_zero3, rd)
    else:
        run_stage("pretrain", _args(rd, shards_dir, "--model.kind=masked", "--train.max_steps=6", "--zero.stage=3",
                                    "--train.micro_batch_size=2", "--precision=fp32"), nproc=2)
    run_stage("pretrain.export", [str(rd), "--out", str(tmp_path / "hf")])
    probe = tmp_path / "probe.npy"
    (tmp_path / "probe.py").write_text(_ENGINE_LOGITS)
    subprocess.run([sys.executable, str(tmp_path / "probe.py"), str(rd), str(probe)], cwd=REPO, env=stage_env(),
                   check=True, capture_output=True)
    ids = torch.from_numpy(np.load(probe)[0].astype(np.int64))[None]
    want = torch.from_numpy(np.load(str(probe).replace(".npy", "_logits.npy")))
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    model = auto.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-5
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.eos_token_id == 2
    if kind == "causal":
        text = pipeline("text-generation", model=model, tokenizer=tok)("def main(", max_new_tokens=12,
                                                                         do_sample=False)[0]["generated_text"]
        assert text.startswith("def main(") and len(text) > len("def main(")


def test_a_second_run_on_the_same_run_dir_is_refused(tmp_path, shards_dir):
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "a+") as f:  # what a live training process holds
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("4242\n")
        f.flush()
        proc = run_stage("pretrain", _args(tmp_path, shards_dir, "--train.max_steps=2"), check=False)
    assert proc.returncode == 2 and f"another run is using {tmp_path} (pid 4242)" in proc.stderr
