"""Engine settings per accelerator: ``ds_configs/gpu/*.json`` on CUDA, ``ds_configs/*.json`` on the CPU.

GPU jobs are recreated here by patching the accelerator check (``pretrain.engine._cpu_accelerator``);
the GPU files' keys are checked by a real DeepSpeed engine on the CPU accelerator (DeepSpeed refuses an
unknown key inside ``zero_optimization``), and every key of every file needs a reason in
``ds_configs/README.md``.

Run as a script (``python tests/test_engine_settings.py``), this file builds an engine from each GPU
file and takes one optimizer step (see the last test).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_stage, stage_env

DS = REPO / "ds_configs"
GPU_FILES = ("zero0", "zero1", "zero2", "zero3", "zero3_offload")


def _cfg(*overrides: str):
    from lmforge.config import load_config
    from pretrain.config import PretrainConfig

    return load_config(PretrainConfig, str(REPO / "configs" / "pretrain" / "tiny.yaml"),
                       ["--model.vocab_size=256", "--data.seq_len=16", "--precision=bf16", *overrides])


def _merged(*overrides: str) -> dict:
    from pretrain.engine import EngineSpec, ds_config, plan_batches

    return ds_config(EngineSpec.of(_cfg(*overrides)), plan_batches(2, 4, 1, 16))


@pytest.fixture
def on_gpu(monkeypatch):
    """What a CUDA job sees: DeepSpeed's accelerator is not the CPU."""
    import pretrain.engine

    monkeypatch.setattr(pretrain.engine, "_cpu_accelerator", lambda: False)


def test_gpu_jobs_get_the_gpu_engine_settings(on_gpu):
    from pretrain.engine import ds_config_path

    for stage in (1, 2):
        assert ds_config_path(_cfg(f"--zero.stage={stage}").zero) == DS / "gpu" / f"zero{stage}.json"
        zero = _merged(f"--zero.stage={stage}")["zero_optimization"]
        assert zero["stage"] == stage and zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
        assert 2e8 <= zero["reduce_bucket_size"] <= 5e8 and 2e8 <= zero["allgather_bucket_size"] <= 5e8
    zero = _merged("--zero.stage=3")["zero_optimization"]
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_max_live_parameters",
                "stage3_max_reuse_distance", "stage3_param_persistence_threshold"):
        assert zero[key] == json.loads((DS / "gpu" / "zero3.json").read_text())["zero_optimization"][key] > 0
    # a layer of the 7b preset (4·4096² + 3·4096·11008 ≈ 2.0e8 parameters) is prefetched whole
    assert zero["stage3_prefetch_bucket_size"] >= 4 * 4096**2 + 3 * 4096 * 11008
    offload = _merged("--zero.stage=3", "--zero.offload_param=true", "--zero.offload_optimizer=true")
    assert ds_config_path(_cfg("--zero.stage=3", "--zero.offload_param=true").zero) == DS / "gpu" / "zero3_offload.json"
    assert offload["zero_optimization"]["overlap_comm"] is True


def test_cpu_runs_keep_the_cpu_engine_settings():
    from pretrain.engine import ds_config_path

    for stage in (0, 1, 2, 3):
        assert ds_config_path(_cfg(f"--zero.stage={stage}").zero) == DS / f"zero{stage}.json"
        want = json.loads((DS / f"zero{stage}.json").read_text())
        got = _merged(f"--zero.stage={stage}")
        assert got["zero_optimization"] == want["zero_optimization"]
        assert {k: got[k] for k in want} == want
    assert _merged("--zero.stage=2")["zero_optimization"]["reduce_bucket_size"] == 5e7  # tuned on a 2-core CPU


def test_an_explicit_ds_config_wins_on_any_accelerator(tmp_path, monkeypatch):
    import pretrain.engine
    from pretrain.engine import ds_config_path, engine_settings_name

    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 12345}}))
    for cpu in (True, False):
        monkeypatch.setattr(pretrain.engine, "_cpu_accelerator", lambda cpu=cpu: cpu)
        assert ds_config_path(_cfg("--zero.stage=2", f"--zero.ds_config={own}").zero) == own
        assert _merged("--zero.stage=2", f"--zero.ds_config={own}")["zero_optimization"]["reduce_bucket_size"] == 12345
        assert engine_settings_name(_cfg("--zero.stage=2", f"--zero.ds_config={own}").zero) == str(own)
    monkeypatch.setattr(pretrain.engine, "_cpu_accelerator", lambda: False)
    assert engine_settings_name(_cfg("--zero.stage=2").zero) == "ds_configs/gpu/zero2.json"


def _leaves(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _reason_rows() -> list[tuple[str, str, set[str], str]]:
    """(key, value, files, why) of the table in ds_configs/README.md."""
    rows = []
    for line in (DS / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            key, value, files, why = (c.strip("`") for c in cells)
            rows.append((key, value, set(re.findall(r"[\w/]+", files)), why))
    return rows


def _same(cell: str, value: object) -> bool:
    """A table cell (``2e8``, ``true``, ``"cpu"``) against the JSON value."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(cell) == value
    return json.loads(cell) == value


def test_every_key_of_every_engine_json_has_its_reason():
    rows = _reason_rows()
    files = sorted(DS.rglob("*.json"))
    assert {f.relative_to(DS).with_suffix("").as_posix() for f in files} >= {f"gpu/{n}" for n in GPU_FILES}
    for f in files:
        name = f.relative_to(DS).with_suffix("").as_posix()
        for key, value in _leaves(json.loads(f.read_text())).items():
            match = [r for r in rows if r[0] == key and name in r[2]]
            assert len(match) == 1, f"{name}: {key}: {len(match)} rows in ds_configs/README.md (want one)"
            _, cell, _, why = match[0]
            assert _same(cell, value), f"{name}: {key} is {value}, the table says {cell}"
            assert len(why) > 20, f"{name}: {key}: no reason given"
    # no stale rows: every row names a key that its files really have
    for key, _, names, _ in rows:
        for name in names:
            assert key in _leaves(json.loads((DS / f"{name}.json").read_text())), f"{name}: no key {key}"


def test_deepspeed_builds_an_engine_from_every_gpu_json():
    """A real engine per GPU file (on DeepSpeed's CPU accelerator): every key accepted, one step taken."""
    env = stage_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()))
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = dict(ln.split(": ", 1) for ln in proc.stdout.splitlines() if ln.startswith("gpu/"))
    assert set(got) == {f"gpu/{n}" for n in GPU_FILES}
    for name, line in got.items():
        assert line.startswith("stepped"), (name, line)
    # the settings that differ from the CPU's really reached the engine
    assert "overlap_comm=True" in got["gpu/zero2"] and "reduce_bucket_size=200000000" in got["gpu/zero2"]
    assert "max_live_parameters=1000000000 prefetch_bucket_size=250000000" in got["gpu/zero3"]


def test_the_start_up_line_names_the_engine_settings(tmp_path, shards_dir):
    proc = run_stage("pretrain", ["configs/pretrain/tiny.yaml", f"--run_dir={tmp_path}", f"--data.shards=[{shards_dir}]",
                                  "--train.max_steps=1", "--zero.stage=1", "--data.seq_len=32",
                                  "--train.micro_batch_size=2", "--train.eval_every=0"])
    banner = next(ln for ln in proc.stdout.splitlines() if ln.startswith(f"run {tmp_path}:"))
    assert "ZeRO-1, fp32, engine settings ds_configs/zero1.json" in banner, banner


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_each() -> None:
    import deepspeed
    import torch

    from pretrain.engine import EngineSpec, ds_config, plan_batches
    from pretrain.model import build_model

    deepspeed.init_distributed(dist_backend="gloo")
    for name in GPU_FILES:
        stage = int(name[4])
        offload = ["--zero.offload_param=true", "--zero.offload_optimizer=true"] if "offload" in name else []
        cfg = _cfg(f"--zero.stage={stage}", f"--zero.ds_config={DS / 'gpu' / name}.json", *offload)
        conf = ds_config(EngineSpec.of(cfg), plan_batches(2, 2, 1, 16))
        model = build_model(cfg.model, 256)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=conf)
        z = engine.zero_optimization() and engine._config.zero_config
        x = torch.randint(0, 256, (2, 16))
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
        seen = "" if not z else (f" overlap_comm={z.overlap_comm} reduce_bucket_size={z.reduce_bucket_size} "
                                 f"max_live_parameters={z.max_live_parameters} prefetch_bucket_size={z.prefetch_bucket_size}")
        print(f"gpu/{name}: stepped{seen}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _build_each()


def test_fused_adamw_and_tf32_on_cuda_only(monkeypatch):
    """On CUDA the engine's AdamW is torch's fused one (DeepSpeed passes the flag on), and fp32 matmuls use
    TF32 from Ampere on; the CPU accelerator and optimizer offload keep the foreach AdamW."""
    import torch

    import pretrain.engine as engine
    from lmforge.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.dist import enable_tf32

    cfg = load_config(PretrainConfig, "configs/pretrain/tiny.yaml", ["--zero.stage=2", "--precision=bf16"])
    plan = engine.plan_batches(2, None, 2, 64)
    assert "fused" not in engine.ds_config(engine.EngineSpec.of(cfg), plan)["optimizer"]["params"]
    monkeypatch.setattr(engine, "_cpu_accelerator", lambda: False)
    assert engine.ds_config(engine.EngineSpec.of(cfg), plan)["optimizer"]["params"]["fused"] is True
    off = load_config(PretrainConfig, "configs/pretrain/tiny.yaml", ["--zero.stage=2", "--zero.offload_optimizer=true"])
    assert "fused" not in engine.ds_config(engine.EngineSpec.of(off), plan)["optimizer"]["params"]
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        assert enable_tf32((9, 0)) and torch.backends.cuda.matmul.allow_tf32  # H100/H200
        assert enable_tf32((8, 0)) and torch.backends.cudnn.allow_tf32  # A100
        assert not enable_tf32((7, 0)) and not torch.backends.cuda.matmul.allow_tf32  # V100: no TF32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
