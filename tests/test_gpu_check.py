"""bench/gpu_check.sh, the GPU smoke test, in its CPU dry mode: the whole sequence runs (data, ZeRO-2 and
ZeRO-3 pretraining, SIGUSR1 → checkpoint → resume, export against the engine, ZeRO-3 classify fine-tune,
optimizer offload) with the GPU-only checks marked skipped; and a failing check fails the script loudly."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import REPO, stage_env

from bench.gpu_check import GPU_ONLY, NAMES

SCRIPT = str(REPO / "bench" / "gpu_check.sh")


def _run(*args: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, env=stage_env(**env), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_dry_mode_runs_every_check_on_the_cpu(tmp_path):
    proc = _run("--dry", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out.json"))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads((tmp_path / "out.json").read_text())
    assert json.loads(proc.stdout) == result  # one JSON object on stdout, the same in --out
    assert result["ok"] and result["mode"] == "dry" and result["failed"] == []
    checks = {c["name"]: c for c in result["checks"]}
    assert [c["name"] for c in result["checks"]] == NAMES
    assert set(GPU_ONLY) == {"accelerator_cuda", "backend_nccl", "precision_auto_bf16", "flash_sdpa", "mfu_h200"}
    for name, c in checks.items():
        assert c["ok"] is True, c
        assert isinstance(c["seconds"], float)
        assert (c.get("skipped") == "cpu dry mode") == (name in GPU_ONLY), c  # everything else really ran
    assert "ZeRO-2, fp32, engine settings ds_configs/zero2.json" in checks["pretrain_zero2"]["banner"]
    assert "ZeRO-3 (built partitioned), fp32, engine settings ds_configs/zero3.json" in checks["pretrain_zero3"]["banner"]
    for stage in ("pretrain_zero2", "pretrain_zero3"):
        c = checks[stage]
        assert c["loss_last"] < c["loss_first"] and c["tokens_per_sec"] > 0 and c["peak_mem_gb"] > 0 and c["mfu"] > 0
    assert checks["sdpa_no_mask"]["calls"] > 0 and checks["sdpa_no_mask"]["calls_with_mask"] == 0
    sig = checks["signal_resume"]
    assert "saved (signal" in sig["saved"] and "at step 4" in sig["resumed"]
    assert sig["max_abs_loss_diff"] <= 1e-5  # fp32 on the CPU: the resumed curve is the uninterrupted one
    exp = checks["export_logits"]
    assert exp["hf_class"] == "LlamaForCausalLM" and exp["device"] == "cpu" and exp["max_abs_diff"] <= 1e-5
    ft = checks["finetune_classify_zero3"]
    assert "ZeRO-3 (built partitioned)" in ft["banner"] and any("accuracy" in k for k in ft["metrics"])
    assert "offload: optimizer states → cpu" in checks["offload_step"]["banner"]
    assert (tmp_path / "work" / "dry" / "runs" / "classify" / "metrics.json").is_file()


def test_a_failing_check_fails_the_script_and_names_itself(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = tmp_path / "out.json"
    # the work directory cannot be created (under a file): `data` fails, and pretrain_zero2, which needs it, is not run
    proc = _run("--dry", "--only", "pretrain_zero2", "--work", str(blocker / "work"), "--out", str(out), timeout=120)
    assert proc.returncode == 1
    assert "gpu_check: FAILED data: cannot use the work directory" in proc.stderr
    assert "gpu_check: FAILED pretrain_zero2: not run: needs data" in proc.stderr
    result = json.loads(out.read_text())
    assert not result["ok"] and result["failed"] == ["data", "pretrain_zero2"]
    assert [c["name"] for c in result["checks"]] == ["accelerator_cuda", "data", "pretrain_zero2"]  # + prerequisites

    bad = _run("--dry", "--only", "no_such_check", "--out", str(out), timeout=120)
    assert bad.returncode == 2 and "unknown check(s) no_such_check" in bad.stderr


def test_gpu_mode_without_a_gpu_fails_on_the_accelerator(tmp_path):
    out = tmp_path / "out.json"
    # no GPU visible (on a GPU machine too: hidden from the script)
    proc = _run("--only", "pretrain_zero2", "--work", str(tmp_path / "work"), "--out", str(out), timeout=300,
                CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 1
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("gpu_check: FAILED accelerator_cuda:"))
    assert "not cuda" in line and "--dry" in line
    result = json.loads(out.read_text())
    assert result["mode"] == "gpu" and result["failed"] == ["accelerator_cuda", "data", "pretrain_zero2"]
    assert not (tmp_path / "work" / "gpu" / "data").exists()  # nothing else was tried
