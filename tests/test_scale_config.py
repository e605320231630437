"""Presets at scale: batch splits at any rank count, interval saves, fp32 gradient accumulation for bf16.

Run as a script (``python tests/test_scale_config.py STAGES``), this file builds DeepSpeed engines for
a bf16 config and prints where each ZeRO stage sums the micro-steps' gradients (see the last test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_stage, stage_env

PRESETS = sorted(p.stem for p in (REPO / "configs" / "pretrain").glob("*.yaml") if not p.stem.startswith("_"))
SMALL = {"tiny", "small", "demo"}  # CPU presets: short runs, no interval saves needed
RANKS = (1, 2, 8, 24, 32, 64, 256)


def _load(preset: str, *overrides: str):
    from lmforge.config import load_config
    from pretrain.config import PretrainConfig

    return load_config(PretrainConfig, str(REPO / "configs" / "pretrain" / f"{preset}.yaml"), list(overrides))


def _dry_run(preset: str, ranks: int, capsys) -> tuple[dict, list[str]]:
    """The dry-run's JSON and its lines after it (batch, saves)."""
    from pretrain.cli import main

    vocab = [] if _load(preset).model.vocab_size else ["--model.vocab_size=1024"]  # tiny/small take it from shards
    assert main([str(REPO / "configs" / "pretrain" / f"{preset}.yaml"), "--dry-run", f"--ranks={ranks}", *vocab]) == 0
    out = capsys.readouterr().out.split("# --- dry run ---\n", 1)[1]
    end = out.index("\n}\n") + 2
    return json.loads(out[:end]), out[end + 1:].splitlines()


# ---------------------------------------------------------------- item 6: batches that split at any rank count
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_dry_runs_at_any_rank_count(preset, capsys):
    cfg = _load(preset)
    for ranks in RANKS:
        info, lines = _dry_run(preset, ranks, capsys)
        micro, accum, used = info["micro_batch_size"], info["grad_accum_steps"], info["global_batch_size"]
        assert used == micro * accum * ranks and 1 <= micro <= cfg.train.micro_batch_size, (ranks, info)
        assert [ln.split(":")[0] for ln in lines[-3:]] == ["network", "compute", "bound"]  # tests/test_comm_estimate.py
        asked = cfg.train.global_batch_size
        if asked is None:
            assert (micro, accum) == (cfg.train.micro_batch_size, 1)
            continue
        # the smallest multiple of the ranks that is not below the recipe's batch (rounded up, never down)
        assert used == -(-asked // ranks) * ranks, (ranks, info)
        batch = next(ln for ln in lines if ln.startswith("batch: "))
        if used != asked:
            assert f"global batch {used} instead of train.global_batch_size {asked}" in batch


def test_plan_takes_the_largest_micro_batch_that_splits_exactly():
    from lmforge.errors import ConfigError
    from pretrain.engine import plan_batches

    # finetune/run.py calls plan_batches(micro, global, world, seq_len) positionally
    p = plan_batches(4, 10, 1, 128)  # micro 4 does not divide 10: micro 2 x 5 micro-steps, the same global batch
    assert (p.micro_batch_per_rank, p.grad_accum_steps, p.global_batch, p.tokens_per_step) == (2, 5, 10, 1280)
    assert "train.global_batch_size=12 would run micro 4" in p.note
    p = plan_batches(16, 256, 24, 1)  # 125m at 24 ranks: 256 / 24 is not whole
    assert (p.micro_batch_per_rank, p.grad_accum_steps, p.global_batch) == (11, 1, 264)
    p = plan_batches(2, 4, 8, 1)  # more ranks than sequences: one each
    assert (p.micro_batch_per_rank, p.grad_accum_steps, p.global_batch) == (1, 1, 8)
    p = plan_batches(8, None, 3, 1)  # unset: micro x ranks, nothing to say
    assert (p.micro_batch_per_rank, p.grad_accum_steps, p.global_batch, p.note) == (8, 1, 24, "")
    with pytest.raises(ConfigError, match="train.global_batch_size: must be positive"):
        plan_batches(8, -4, 2, 1)


# ---------------------------------------------------------------- item 9: interval saves and their cost
@pytest.mark.parametrize("preset", sorted(set(PRESETS) - SMALL))
def test_presets_past_small_save_on_an_interval(preset, capsys, monkeypatch):
    assert _load(preset).checkpoint.interval_minutes > 0
    info, lines = _dry_run(preset, 8, capsys)
    c = info["checkpoint"]
    saves = next(ln for ln in lines if ln.startswith("saves: "))
    assert f"every {c['interval_minutes']:g} min" in saves and f"{c['save_gib']:g} GiB per save" in saves
    assert f"~{c['save_seconds']:g} s at an assumed 1 GiB/s" in saves
    # 16-bit weights on rank 0 (not at ZeRO-3) + fp32 master and Adam m, v over all ranks: 12-14 bytes a parameter
    assert 12 <= c["save_gib"] * 2**30 / info["n_params"] <= 14.01
    monkeypatch.setenv("LMFORGE_SAVE_GIBPS", "4")
    faster, _ = _dry_run(preset, 8, capsys)
    assert faster["checkpoint"]["assumed_write_gib_per_s"] == 4
    assert faster["checkpoint"]["save_seconds"] == pytest.approx(c["save_seconds"] / 4, abs=0.1)


def test_checkpoint_estimate_matches_a_real_bf16_save_with_accumulation(tmp_path, shards_dir):
    """2 ranks, bf16, ZeRO-1 (DeepSpeed's BF16_Optimizer once gradients accumulate in fp32), 2 micro-steps."""
    from pretrain.estimate import checkpoint_bytes

    args = ["configs/pretrain/tiny.yaml", f"--run_dir={tmp_path}", f"--data.shards=[{shards_dir}]", "--precision=bf16",
            "--zero.stage=1", "--train.max_steps=2", "--train.micro_batch_size=2", "--train.global_batch_size=7",
            "--data.seq_len=64", "--train.eval_every=0", "--train.log_every=1"]
    proc = run_stage("pretrain", args, nproc=2)
    # 7 sequences do not split over 2 ranks: 8, said once at start-up
    assert proc.stdout.count("global batch 8 instead of train.global_batch_size 7") == 1, proc.stdout
    assert "(micro 2 x accum 2 x 2 ranks)" in proc.stdout and "done: 2 steps" in proc.stdout
    state = json.loads((tmp_path / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["global_batch"] == 8
    files = {f.name: f.stat().st_size for f in (tmp_path / "checkpoints" / "step_00000002").iterdir()}
    ds_files = {k: v for k, v in files.items() if k.endswith(("model_states.pt", "optim_states.pt"))}
    banner = next(ln for ln in proc.stdout.splitlines() if ln.startswith(f"run {tmp_path}:"))
    n_params = int(banner.split(" params")[0].rsplit(" ", 1)[1].replace(",", ""))
    want = checkpoint_bytes(n_params, 2, 1, "bf16")
    rank0 = sum(v for k, v in ds_files.items() if "rank_0_" in k or k.startswith("mp_rank"))
    # torch.save adds a few kB of pickle framing and tensor metadata per file to the tensor bytes
    assert sum(ds_files.values()) == pytest.approx(want["total"], rel=0.01), ds_files
    assert rank0 == pytest.approx(want["rank0"], rel=0.01), ds_files


# ---------------------------------------------------------------- item 11: fp32 gradient accumulation for bf16
@pytest.mark.parametrize("preset", sorted(set(PRESETS) - SMALL))
def test_bf16_presets_accumulate_gradients_in_fp32(preset):
    from pretrain.engine import EngineSpec, accumulation_note, batch_plan, ds_config, resolve_precision

    cfg = _load(preset)
    cfg.precision = resolve_precision(cfg.precision, cuda=True)  # what a GPU job resolves `auto` to
    assert cfg.precision == "bf16"  # the GPU presets; tiny and small are fp32 (CPU)
    plan = batch_plan(cfg, 8)
    conf = ds_config(EngineSpec.of(cfg), plan)
    assert cfg.zero.stage >= 1  # ZeRO-0 cannot accumulate bf16 gradients in fp32 (engine.BF16_GRAD_ACCUM_DTYPE)
    assert conf["bf16"] == {"enabled": True} and conf["data_types"]["grad_accum_dtype"] == "fp32"
    assert accumulation_note(EngineSpec.of(cfg), plan) == ""


def test_zero0_bf16_keeps_bf16_sums_and_says_so():
    from pretrain.engine import EngineSpec, accumulation_note, batch_plan, ds_config

    cfg = _load("7b", "--zero.stage=0", "--precision=bf16")
    plan = batch_plan(cfg, 8)
    assert "data_types" not in ds_config(EngineSpec.of(cfg), plan)  # DeepSpeed 0.19 refuses it there (checked by the next test)
    assert "ZeRO-0 sums the 16 micro-steps' gradients in bf16" in accumulation_note(EngineSpec.of(cfg), plan)


def test_deepspeed_sums_bf16_gradients_in_fp32_at_zero_1_2_3():
    """Real engines from our merged config: where the micro-steps' gradients are summed, per stage."""
    env = stage_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()))
    proc = subprocess.run([sys.executable, __file__, "0,1,2,3"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = dict(ln.split(": ", 1) for ln in proc.stdout.splitlines() if ln.startswith("stage "))
    assert got["stage 0"].startswith("refused: unsupported mix of model_dtype=torch.bfloat16 and grad_accum_dtype")
    assert got["stage 1"] == "BF16_Optimizer torch.float32"
    assert got["stage 2"] == "DeepSpeedZeroOptimizer torch.float32"
    assert got["stage 3"] == "DeepSpeedZeroOptimizer_Stage3 torch.float32"


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accumulation_buffer(opt):
    """The tensor that holds the summed gradients between micro-steps, by DeepSpeed 0.19 wrapper."""
    if hasattr(opt, "fp32_groups_gradients_flat"):  # BF16_Optimizer (bf16_optimizer.py:191)
        return opt.fp32_groups_gradients_flat[0]
    if hasattr(opt, "grad_partitions_flat_buffer"):  # ZeRO-3 (zero/stage3.py:791)
        return opt.grad_partitions_flat_buffer
    if hasattr(opt, "averaged_gradients"):  # ZeRO-1/2: the fp32 partition buffer (stage_1_and_2.py:1259)
        group = opt.averaged_gradients.get(0)
        return group.flat_partition if group is not None else opt.grads_in_partition
    return next(p.grad for group in opt.param_groups for p in group["params"])  # ZeRO-0: the params' .grad


def _engine_check(stages: list[int]) -> None:
    import deepspeed
    import torch

    from pretrain.engine import EngineSpec, ds_config, plan_batches
    from pretrain.model import build_model

    deepspeed.init_distributed(dist_backend="gloo")
    for stage in stages:
        cfg = _load("tiny", f"--zero.stage={stage}", "--precision=bf16", "--model.vocab_size=256", "--data.seq_len=16")
        plan = plan_batches(2, 4, 1, 16)  # 2 micro-steps
        conf = ds_config(EngineSpec.of(cfg), plan)
        if stage == 0:  # ds_config leaves it out there; ask anyway, to see DeepSpeed's answer
            conf["data_types"] = {"grad_accum_dtype": "fp32"}
        model = build_model(cfg.model, 256)
        try:
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=conf)
        except NotImplementedError as e:
            print(f"stage {stage}: refused: {e}", flush=True)
            continue
        x = torch.randint(0, 256, (2, 16))
        engine.backward(engine(input_ids=x, labels=x).loss)  # first micro-step: not a boundary, no step
        buf = _accumulation_buffer(engine.optimizer)
        print(f"stage {stage}: {type(engine.optimizer).__name__} {getattr(buf, 'dtype', None)}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _engine_check([int(s) for s in sys.argv[1].split(",")])
