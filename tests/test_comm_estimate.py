"""The dry run's communication estimate: bytes each rank sends per optimizer step, their time at an assumed
network bandwidth next to the compute time, and presets that are compute-bound on 4 x 8 H100 at 400 Gb/s."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

P7B = 6_738_415_616  # Llama-2-7B's shape at vocab 32000 (configs/pretrain/7b.yaml)
H100_BF16 = 989e12  # pretrain.callbacks.GPU_PEAKS, H100 SXM dense bf16


def _dry_run(preset: str, ranks: int, capsys, *args: str) -> tuple[dict, list[str]]:
    """The dry-run's JSON and the lines after it."""
    from pretrain.cli import main

    assert main([str(REPO / "configs" / "pretrain" / f"{preset}.yaml"), "--dry-run", f"--ranks={ranks}", *args]) == 0
    out = capsys.readouterr().out.split("# --- dry run ---\n", 1)[1]
    end = out.index("\n}\n") + 2
    return json.loads(out[:end]), out[end + 1:].splitlines()


def _line(lines: list[str], head: str) -> str:
    return next(ln for ln in lines if ln.startswith(head))


def test_bytes_per_rank_by_hand_for_every_stage():
    from pretrain.estimate import comm_bytes_per_rank

    # 1000 bf16 parameters (S = 2000 bytes) over 4 ranks, 3 micro-steps per optimizer step. A ring all-gather or
    # reduce-scatter sends (N-1)/N x S = 1500 bytes from each rank, an all-reduce twice that (3000).
    want = {  # stage: (total, not overlapped with backward, repeated every micro-step)
        0: (3000, 3000, 0),  # one all-reduce at the boundary, after backward
        1: (4500, 4500, 0),  # BF16_Optimizer: all-reduce after the last backward + all-gather after the step
        2: (3 * 3000 + 1500, 1500, 3000),  # an all-reduce in every backward + the all-gather after the step
        3: (3 * 3 * 1500, 0, 4500),  # every micro-step: 2 all-gathers (forward, backward) + 1 reduce-scatter
    }
    for stage, (total, exposed, per_micro) in want.items():
        c = comm_bytes_per_rank(1000, 4, stage, 3, "bf16", bf16_optimizer=True)
        assert (c["total"], c["not_overlapped"], c["per_micro_step"]) == (total, exposed, per_micro), stage
        assert sum(x["count"] * x["bytes"] for x in c["collectives"]) == total
    # the ZeRO optimizer (no BF16_Optimizer: fp16, fp32 or optimizer offload) reduces in the last backward's hooks
    assert comm_bytes_per_rank(1000, 4, 1, 3, "bf16")["not_overlapped"] == 1500
    assert comm_bytes_per_rank(1000, 4, 3, 3, "fp32")["total"] == 2 * 13500  # fp32 sends 4 bytes an element
    for stage in range(4):
        assert comm_bytes_per_rank(1000, 1, stage, 3, "bf16")["total"] == 0  # one rank: nothing to send


def test_7b_at_32_ranks_is_compute_bound_and_its_old_settings_were_not(capsys):
    info, lines = _dry_run("7b", 32, capsys)
    n = info["network"]
    assert (info["zero_stage"], info["micro_batch_size"], info["grad_accum_steps"]) == (3, 8, 4)
    assert n["bound"] == "compute" and n["comm_seconds"] <= 0.5 * n["compute_seconds"], n
    assert info["memory_per_rank_gb"]["zero3"] < 80
    assert _line(lines, "bound: ").startswith("bound: compute-bound (comm 3.13 s vs compute 7.1 s)")

    # the preset before: ZeRO-3, micro 2 x accumulation 16 at 32 ranks
    old, lines = _dry_run("7b", 32, capsys, "--train.micro_batch_size=2")
    o = old["network"]
    assert (old["micro_batch_size"], old["grad_accum_steps"]) == (2, 16)
    per_micro = 3 * 2 * P7B * 31 / 32  # 2 parameter all-gathers + 1 gradient reduce-scatter, bf16
    assert o["gb_per_rank_per_micro_step"] == pytest.approx(per_micro / 1e9, abs=0.05) == 39.2
    assert o["gb_per_rank"] == pytest.approx(16 * per_micro / 1e9, abs=0.05)  # 626.7 GB a step
    assert o["comm_seconds"] == pytest.approx(16 * per_micro / 50e9, abs=0.01)  # 400 Gb/s = 50 GB/s: 12.5 s
    compute = old["flops_per_token"] * 16 * 2 * 2048 / (0.4 * H100_BF16)  # a rank's tokens at 40% MFU: 7.1 s
    assert o["compute_seconds"] == pytest.approx(compute, abs=0.01) == n["compute_seconds"]
    assert o["bound"] == "communication"
    bound = _line(lines, "bound: ")
    assert bound.startswith("bound: communication-bound (comm 12.5 s vs compute 7.1 s): raise train.micro_batch_size")
    assert "train.micro_batch_size=4 would send 313 GB" in bound  # the smallest micro-batch that is compute-bound
    network = _line(lines, "network: ")
    assert network.startswith("network: 626.7 GB sent per rank per step") and "400 Gb/s per GPU" in network
    assert "16 micro-steps x 39.2 GB" in network
    assert _line(lines, "compute: ").startswith("compute: ~7.1 s per step")


@pytest.mark.parametrize("preset", ["1b3", "2b7"])
def test_1b3_and_2b7_at_32_ranks_are_compute_bound(preset, capsys):
    info, lines = _dry_run(preset, 32, capsys)
    n = info["network"]
    assert n["bound"] == "compute" and n["comm_seconds"] <= 0.5 * n["compute_seconds"], n
    assert info["memory_per_rank_gb"][f"zero{info['zero_stage']}"] < 80
    assert _line(lines, "bound: ").startswith("bound: compute-bound")


def test_bandwidth_mfu_and_peak_are_settings(capsys):
    from lmforge.errors import ConfigError

    base, _ = _dry_run("7b", 32, capsys)
    slow, lines = _dry_run("7b", 32, capsys, "--net_gbps=100", "--mfu=0.5", "--metrics.peak_flops=2e15")
    b, s = base["network"], slow["network"]
    assert (s["assumed_gbps_per_rank"], s["assumed_mfu"], s["assumed_peak_flops"]) == (100, 0.5, 2e15)
    assert s["gb_per_rank"] == b["gb_per_rank"] and s["comm_seconds"] == pytest.approx(4 * b["comm_seconds"], abs=0.01)
    assert s["compute_seconds"] == pytest.approx(b["compute_seconds"] * 0.4 / 0.5 * H100_BF16 / 2e15, abs=0.01)
    assert "at an assumed 100 Gb/s per GPU" in _line(lines, "network: ")
    assert s["bound"] == "communication"
    for bad in ("--net_gbps=0", "--mfu=1.5", "--mfu=x"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            _dry_run("7b", 32, capsys, bad)


def test_a_global_batch_that_splits_badly_is_named_as_the_remedy(capsys):
    # 1024 sequences over 24 ranks: 43 each, a prime, so micro 1 x 43 micro-steps, each gathering the whole model
    info, lines = _dry_run("7b", 24, capsys)
    assert (info["micro_batch_size"], info["grad_accum_steps"]) == (1, 43)
    assert info["network"]["bound"] == "communication"
    assert "train.global_batch_size=1152 (micro 8 x accum 6)" in _line(lines, "bound: ")


def test_one_rank_sends_nothing(capsys):
    info, lines = _dry_run("7b", 1, capsys)
    assert info["network"]["gb_per_rank"] == 0 and info["network"]["bound"] == "compute"
    assert _line(lines, "network: ").startswith("network: nothing sent (1 rank)")


def test_a_share_too_small_for_the_network_asks_for_a_larger_global_batch(capsys):
    # 1b3 at 256 ranks: 2 sequences a rank in one micro-step, ZeRO-2's least traffic (all-reduce + all-gather)
    info, lines = _dry_run("1b3", 256, capsys)
    assert (info["micro_batch_size"], info["grad_accum_steps"], info["network"]["bound"]) == (2, 1, "communication")
    bound = _line(lines, "bound: ")
    assert "raise train.global_batch_size to 1024 or more at one micro-step (train.micro_batch_size=4" in bound
    fixed, _ = _dry_run("1b3", 256, capsys, "--train.global_batch_size=1024", "--train.micro_batch_size=4")
    assert fixed["network"]["bound"] == "compute"
    # ZeRO-1 sends the same bytes a step whatever its tokens: 4.5x the tokens make it compute-bound
    _, lines = _dry_run("7b", 256, capsys, "--zero.stage=1", "--train.global_batch_size=128")
    assert "raise train.global_batch_size to 1024 or more, or run on fewer ranks" in _line(lines, "bound: ")
