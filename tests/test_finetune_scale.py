"""Fine-tuning defaults that fit at scale: ``zero.stage: auto`` (finetune/estimate.py) and the
``python -m finetune ... --dry-run`` memory table, planned from a pretrain run's config.yaml alone.

The "7b run" here is a run directory without weights: the resolved ``configs/pretrain/7b.yaml`` and a
checkpoint step that holds only ``trainer_state.json`` (what ``find_checkpoint`` looks for). A dry
run that tried to export or read weights would fail on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import finetune_data as fd
import pytest
from conftest import REPO, run_stage

from pretrain.estimate import GiB

P7B = 6_738_415_616  # Llama-2-7B's shape at vocab 32000 (configs/pretrain/7b.yaml's own comment)
D7B, V7B = 4096, 32000


def _fake_run(root: Path, preset: str, *overrides: str, zero_stage: int = 3) -> Path:
    """A pretrain run dir with a resolved config.yaml and an empty step dir: its shape, no weights."""
    from lmforge.config import dump_yaml, load_config
    from pretrain.config import PretrainConfig

    root.mkdir(parents=True)
    (root / "config.yaml").write_text(dump_yaml(load_config(PretrainConfig, REPO / preset, list(overrides))))
    step = root / "checkpoints" / "step_00064300"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"step": 64300, "world_size": 512, "zero_stage": zero_stage}))
    (root / "checkpoints" / "latest").write_text(step.name)
    return root


@pytest.fixture(scope="module")
def run_7b(tmp_path_factory) -> Path:
    return _fake_run(tmp_path_factory.mktemp("pre") / "7b", "configs/pretrain/7b.yaml")


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def _dry_run(capsys, preset: str, init_from: Path, *args: str) -> tuple[dict, str]:
    from finetune.cli import main

    assert main([f"configs/finetune/{preset}.yaml", f"--init_from={init_from}", "--dry-run", *args]) == 0
    out = capsys.readouterr().out
    yaml_part, _, rest = out.partition("# --- dry run ---\n")
    info, _ = json.JSONDecoder().raw_decode(rest)
    return info, yaml_part


@pytest.mark.parametrize("preset, n_params", [
    ("sft", P7B),  # LlamaForCausalLM: the pretrained model itself
    ("classify", P7B - V7B * D7B + 2 * D7B),  # no LM head; a d x 2 score head (labels unset: 2 assumed)
])
def test_dry_run_of_7b_on_8x80gb_picks_partitioned_zero3_and_fits(capsys, tmp_path, run_7b, preset, n_params):
    before = _files(run_7b)
    info, yaml_part = _dry_run(capsys, preset, run_7b, f"--run_dir={tmp_path / 'ft'}", "--ranks=8",
                               "--gpu_memory_gb=80")
    assert info["n_params"] == info["n_trainable_params"] == n_params
    assert info["zero_stage"] == 3 and info["partitioned_build"] and info["fits"], info
    mem = info["memory_per_rank_gb"]
    # ZeRO-0: 16 bytes per parameter on every GPU (bf16 + fp32 master + Adam): over the 40 GiB budget
    assert mem["zero0"] == pytest.approx(16 * n_params / GiB, abs=1e-3) and mem["zero0"] > info["budget_gb"] == 40
    assert mem["zero3"] == pytest.approx(16 * n_params / 8 / GiB, abs=1e-3) == info["chosen_stage_gb"]["total"]
    assert "stage: 3" in yaml_part  # the printed config is the resolved one
    assert _files(run_7b) == before and not (tmp_path / "ft").exists()  # nothing exported, nothing written


def test_small_model_keeps_zero0_by_default(capsys, tmp_path):
    run = _fake_run(tmp_path / "small", "configs/pretrain/small.yaml", "--model.vocab_size=8192")
    for preset in ("classify", "sft"):
        info, yaml_part = _dry_run(capsys, preset, run)  # no --ranks / --gpu_memory_gb: the defaults
        assert info["zero_stage"] == 0 and info["fits"] and not info["partitioned_build"], info
        assert 20e6 < info["n_params"] < 30e6 and "stage: 0" in yaml_part


def test_auto_stage_follows_device_memory_and_what_trains(capsys, tmp_path, run_7b):
    run_1b3 = _fake_run(tmp_path / "1b3", "configs/pretrain/1b3.yaml", "--model.vocab_size=32000")
    big_gpu, _ = _dry_run(capsys, "sft", run_1b3, "--ranks=8", "--gpu_memory_gb=80")
    small_gpu, _ = _dry_run(capsys, "sft", run_1b3, "--ranks=8", "--gpu_memory_gb=24")
    assert (big_gpu["zero_stage"], small_gpu["zero_stage"]) == (0, 3)  # ~19.6 GiB of ZeRO-0 states vs 40 / 12 GiB
    # a frozen backbone keeps bf16 weights only: a head-only 7b fine-tune fits ZeRO-0 on one GPU
    head_only, _ = _dry_run(capsys, "classify", run_7b, "--ranks=1", "--gpu_memory_gb=80",
                            "--transfer.freeze_backbone=true")
    n = head_only["n_params"]
    assert head_only["n_trainable_params"] == 2 * D7B and head_only["zero_stage"] == 0
    assert head_only["memory_per_rank_gb"]["zero0"] == pytest.approx((2 * n + 14 * 2 * D7B) / GiB, abs=1e-3)
    explicit, yaml_part = _dry_run(capsys, "sft", run_7b, "--ranks=8", "--gpu_memory_gb=80", "--zero.stage=2")
    assert explicit["zero_stage"] == 2 and "set in the config" in explicit["zero_stage_reason"]


def test_run_time_choice_is_an_int_and_a_resume_keeps_its_checkpoints_stage(capsys, tmp_path, run_7b):
    from finetune.config import FinetuneConfig
    from finetune.estimate import resolve_zero_stage
    from finetune.model import Backbone
    from lmforge.config import from_dict, load_config
    from pretrain.config import PretrainConfig
    from pretrain.model import hf_config

    model = load_config(PretrainConfig, run_7b / "config.yaml").model
    hf_dir = tmp_path / "hf"
    hf_config(model, V7B).save_pretrained(hf_dir)  # config.json only: the run reads the shape from there
    backbone = Backbone(hf_dir, model, {})
    cfg = from_dict(FinetuneConfig, {"init_from": str(run_7b), "data": {"train": "x"}, "task": {"type": "sft"},
                                     "run_dir": str(tmp_path / "ft"), "precision": "bf16"})
    assert cfg.zero.stage == "auto"
    assert resolve_zero_stage(cfg, backbone, 8, device_bytes=80 * GiB) == 3
    assert resolve_zero_stage(cfg, backbone, 8, device_bytes=400 * GiB) == 0  # 100 GiB of states < 200
    assert "zero.stage auto → ZeRO-0: its model states (100.4 GiB per rank)" in capsys.readouterr().out
    # the run dir already holds a ZeRO-0 checkpoint: the stage is kept (a ZeRO-0 ↔ 3 restore is refused)
    _fake_run(tmp_path / "ft_resumed", "configs/pretrain/7b.yaml", zero_stage=0)
    cfg.run_dir = str(tmp_path / "ft_resumed")
    assert resolve_zero_stage(cfg, backbone, 8, device_bytes=80 * GiB) == 0
    assert "the stage of" in capsys.readouterr().out


def test_a_small_fine_tune_runs_zero0_and_says_why(tmp_path, tokenizer_dir):
    """The run itself: `auto` is decided before config.yaml and the engine, and said in the first lines."""
    import torch

    from data_pipeline.tokenizer import Tokenizer
    from pretrain.config import ModelConfig
    from pretrain.model import build_model
    from pretrain.objective import special_ids

    tok = Tokenizer.load(tokenizer_dir)
    hf = tmp_path / "hf"
    torch.manual_seed(0)
    ids = special_ids(tok, "causal")
    build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, max_seq_len=64), tok.vocab_size,
                bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"]).save_pretrained(hf)
    tok.save(hf)
    train = fd.classification(tmp_path / "train.csv", 40, 1)
    proc = run_stage("finetune", ["configs/finetune/classify.yaml", f"--run_dir={tmp_path / 'ft'}", f"--init_from={hf}",
                                  f"--data.train={train}", "--precision=fp32", "--train.max_steps=2",
                                  "--task.max_seq_len=32", "--train.micro_batch_size=4", "--metrics.tensorboard=false"])
    lines = proc.stdout.splitlines()
    said = [i for i, ln in enumerate(lines) if ln.startswith("zero.stage auto → ZeRO-0: its model states")]
    assert said and said[0] < 5, proc.stdout[:2000]
    assert "stage: 0" in (tmp_path / "ft" / "config.yaml").read_text()
    assert any(ln.startswith("fine-tune ") and "ZeRO-0," in ln for ln in lines)
