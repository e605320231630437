"""MFU that can be believed: FLOPs counted for the model that really trains, against the peak of the
precision it trains in (issue: a `classify` fine-tune of `tiny` logged `mfu 140%` on a 2-core CPU in bf16)."""

from __future__ import annotations

import finetune_data as fd
import pytest
from conftest import read_scalars, run_stage

TINY = "configs/pretrain/tiny.yaml"


def _mfu(run_dir) -> list[float]:
    return [v for _, v in read_scalars(run_dir)["train/mfu"]]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, shards_dir):
    rd = tmp_path_factory.mktemp("mfu") / "pre"
    run_stage("pretrain", [TINY, f"--run_dir={rd}", f"--data.shards=[{shards_dir}]", "--data.seq_len=64",
                           "--train.max_steps=6", "--train.log_every=1", "--train.eval_every=0",
                           "--train.eval_samples=8", "--train.micro_batch_size=4", "--precision=bf16"])
    return rd


def test_pretraining_mfu_is_at_most_one_in_bf16(bf16_run):
    mfu = _mfu(bf16_run)
    assert len(mfu) == 6 and all(0.0 < m <= 1.0 for m in mfu), mfu


def test_classify_finetune_mfu_is_at_most_one_in_bf16(tmp_path, bf16_run):
    """The task model has no LM head (the tiny preset's 6·V·d per token was most of the count), pads its
    batches (only real tokens count) and may freeze the backbone (no weight gradients there)."""
    train = fd.classification(tmp_path / "train.csv", 120, 1)
    for name, extra in {"full": [], "frozen": ["--transfer.freeze_backbone=true"]}.items():
        rd = tmp_path / name
        out = run_stage("finetune", ["configs/finetune/classify.yaml", f"--run_dir={rd}", f"--init_from={bf16_run}",
                                     f"--data.train={train}", "--precision=bf16", "--train.max_steps=6",
                                     "--train.log_every=1", "--task.max_seq_len=64", "--train.micro_batch_size=8",
                                     *extra])
        assert "MFU peak:" in out.stdout and "bf16" in out.stdout.split("MFU peak:")[1].splitlines()[0]
        mfu = _mfu(rd)
        assert len(mfu) == 6 and all(0.0 < m <= 1.0 for m in mfu), (name, mfu)


def test_task_flops_count_the_head_that_trains_and_skip_frozen_gradients():
    from finetune.model import task_flops_per_token
    from pretrain.config import ModelConfig
    from pretrain.model import flops_per_token

    m = ModelConfig(kind="causal", hidden_size=128, num_layers=4, num_heads=4)
    V, T, d = 32000, 64, 128
    lm = flops_per_token(m, V, T)
    cls = task_flops_per_token(m, V, T, head=5 * d)
    assert cls < lm / 2  # no 6·V·d LM head: 24.6 MFLOP of the tiny preset's ~37
    assert task_flops_per_token(m, V, T, head=V * d) == pytest.approx(lm)  # sft: the LM head trains
    frozen = task_flops_per_token(m, V, T, head=5 * d, frozen_layers=4)
    assert frozen < cls / 2.5  # forward only below the head (2·N instead of 6·N, 4·d·T instead of 12·d·T)
    part = task_flops_per_token(m, V, T, head=5 * d, frozen_layers=2)
    below = task_flops_per_token(m, V, T, head=5 * d, frozen_layers=2, grads_below=True)
    assert frozen < part < below < cls  # trainable embeddings need activation gradients through frozen blocks
    assert task_flops_per_token(m, V, T, head=5 * d, aux_lm=True) == pytest.approx(cls + 6 * V * d)


def test_cpu_peak_is_measured_in_the_run_precision(monkeypatch):
    import torch

    from pretrain import callbacks

    seen = []
    monkeypatch.setattr(callbacks, "measured_cpu_flops", lambda dtype=torch.float32: seen.append(dtype) or 1e9)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32), ("fp16", torch.float16)):
        peak, source = callbacks.device_peak_flops(None, precision)
        assert peak == 1e9 and dtype in seen[-2:] and precision in source  # (bf16, fp16: and fp32's)
    assert callbacks.device_peak_flops(5e12, "bf16") == (5e12, "config")


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H100 NVL", "bf16", 835e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100-PCIE-40GB", "fp16", 312e12),
    ("NVIDIA A100-SXM4-40GB", "fp32", 156e12),  # TF32 tensor cores (lmforge enables TF32)
    ("NVIDIA L40S", "bf16", 362e12),
    ("NVIDIA A10G", "bf16", 70e12),
])
def test_gpu_peak_table_matches_exact_device_names(name, precision, peak):
    from pretrain.callbacks import gpu_peak_flops

    got, key = gpu_peak_flops(name, precision)
    assert got == pytest.approx(peak, rel=0.01), key
    assert gpu_peak_flops("NVIDIA GeForce GTX 1080", "bf16")[0] == 0.0  # unknown: MFU off, with a message


def test_the_cpu_peak_is_the_faster_of_the_runs_dtype_and_fp32():
    """A CPU without native bf16 (no AVX512-BF16/AMX) multiplies bf16 far slower than fp32, yet training's bf16
    layers beat that probe: its peak must be fp32's (else MFU read 3.2 there). With native bf16, bf16's."""
    import torch

    from pretrain.callbacks import cpu_peak

    no_native_bf16 = {torch.bfloat16: 1e10, torch.float32: 1e11}.__getitem__
    assert cpu_peak("bf16", no_native_bf16) == (1e11, "measured CPU fp32 matmul, faster than bf16 on this CPU")
    native_bf16 = {torch.bfloat16: 2.3e11, torch.float32: 1e11}.__getitem__
    assert cpu_peak("bf16", native_bf16) == (2.3e11, "measured CPU bf16 matmul")
    assert cpu_peak("fp32", native_bf16) == (1e11, "measured CPU fp32 matmul")
