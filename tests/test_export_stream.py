"""The streaming Hugging Face export (``pretrain.export``): the weights it writes equal the whole-model
fp32 weights at every ZeRO stage and load in transformers with the same logits, a bf16 run exports
bf16 unless told otherwise, and peak memory follows the largest tensor, not the model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_stage, stage_env

TINY = "configs/pretrain/tiny.yaml"
# 8 layers of width 256: ~7M params (27 MiB in fp32) whose largest tensor (the 1024 x 256 embedding) is 1 MiB,
# so a whole-model export (80-100 MiB above its start) and a streaming one (2-5 MiB) are far apart
WIDE = ("--model.hidden_size=256", "--model.num_layers=8", "--model.num_heads=4")


def _args(run_dir, shards, *extra: str) -> list[str]:
    return [TINY, f"--run_dir={run_dir}", f"--data.shards=[{shards}]", "--train.log_every=1", "--train.eval_every=0",
            "--train.eval_samples=8", "--data.seq_len=64", "--train.global_batch_size=4", "--optim.warmup_steps=3",
            "--train.max_steps=1", "--train.micro_batch_size=2", "--train.progress=false", *extra]


RUNS = {  # name → (processes, overrides): one step each, trained once per module
    "zero0": (1, ("--zero.stage=0", "--precision=fp32", *WIDE)),
    "zero2-untied": (2, ("--zero.stage=2", "--precision=fp32", "--model.tie_embeddings=false", *WIDE)),
    "zero3-bf16-masked": (2, ("--zero.stage=3", "--precision=bf16", "--model.kind=masked")),
    # bf16 at ZeRO-1 accumulates in fp32 through DeepSpeed's BF16_Optimizer: bf16_zero_pp_rank_* files
    "zero1-bf16": (2, ("--zero.stage=1", "--precision=bf16")),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export_runs")
    for name, (nproc, extra) in RUNS.items():
        run_stage("pretrain", _args(root / name, shards_dir, *extra), nproc=nproc)
    return {name: root / name for name in RUNS}


def _step_dir(run_dir: Path) -> Path:
    from pretrain.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir)


def _written(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _reference(run_dir: Path, ref_dir: Path):
    """The whole-model path: a randomly initialised model filled with fp32_state_dict, and its save_pretrained."""
    from lmforge.config import load_config
    from pretrain.checkpoint import read_state
    from pretrain.config import PretrainConfig
    from pretrain.export import build_hf_model, fp32_state_dict, load_weights

    step_dir = _step_dir(run_dir)
    model, _ = build_hf_model(run_dir, read_state(step_dir), load_config(PretrainConfig, run_dir / "config.yaml"))
    load_weights(model, fp32_state_dict(step_dir), step_dir)
    model.save_pretrained(ref_dir, safe_serialization=True)
    return model.eval()


@pytest.mark.parametrize("name, shard", [("zero0", "2GB"), ("zero2-untied", "300KB"), ("zero3-bf16-masked", "2GB")])
def test_streaming_export_equals_the_fp32_weights_and_loads_in_transformers(runs, tmp_path, name, shard):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from pretrain.export import export, fp32_state_dict

    out = export(runs[name], tmp_path / "hf", dtype="fp32", max_shard_size=shard)
    ref = _reference(runs[name], tmp_path / "ref")
    got, want = _written(out), fp32_state_dict(_step_dir(runs[name]))
    assert got.keys() == _written(tmp_path / "ref").keys()  # what save_pretrained writes: no tied copies
    assert all(torch.equal(got[k], want[k]) for k in got), [k for k in got if not torch.equal(got[k], want[k])][:3]
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "ref" / "config.json").read_text())
    if shard != "2GB":  # sharded as transformers shards: numbered files and an index naming each tensor's file
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1 and index["weight_map"].keys() == got.keys()
    auto = AutoModelForMaskedLM if "masked" in name else AutoModelForCausalLM
    model = auto.from_pretrained(out).eval()
    ids = torch.arange(10, 40)[None]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_the_run_precision_is_the_default_dtype(runs, tmp_path, capsys):
    from transformers import AutoModelForMaskedLM

    from pretrain.export import fp32_state_dict, main

    bf16_run = runs["zero3-bf16-masked"]
    assert main([str(bf16_run), "--out", str(tmp_path / "bf16")]) == 0
    assert "bfloat16 weights (the run's precision)" in capsys.readouterr().out
    got, want = _written(tmp_path / "bf16"), fp32_state_dict(_step_dir(bf16_run))
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert all(torch.equal(got[k], want[k].to(torch.bfloat16)) for k in got)  # the fp32 masters, rounded once
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForMaskedLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    assert main([str(runs["zero0"]), "--out", str(tmp_path / "fp32")]) == 0  # an fp32 run stays fp32
    assert "float32 weights (the run's precision)" in capsys.readouterr().out
    assert {t.dtype for t in _written(tmp_path / "fp32").values()} == {torch.float32}
    assert main([str(bf16_run), "--out", str(tmp_path / "asked"), "--dtype", "fp32"]) == 0
    assert "float32 weights (--dtype)" in capsys.readouterr().out


def test_a_masked_export_fills_masks_through_the_transformers_pipeline(runs, tmp_path):
    from transformers import AutoTokenizer, pipeline

    from data_pipeline.tokenizer import Tokenizer
    from pretrain.export import export

    out = export(runs["zero3-bf16-masked"], tmp_path / "hf", dtype="fp32")
    hf = AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.load(out)
    assert (hf.mask_token, hf.cls_token, hf.sep_token) == ("<mask>", "<s>", "</s>")
    assert hf.mask_token_id == ours.token_to_id("<mask>")
    fill = pipeline("fill-mask", model=str(out), tokenizer=hf, device="cpu")
    guesses = fill(f"def f(x):\n    return {hf.mask_token} + 1\n", top_k=3)
    assert len(guesses) == 3 and all(g["token"] != hf.mask_token_id and 0 < g["score"] <= 1 for g in guesses)
    assert guesses[0]["sequence"].startswith("def f(x):")


def test_a_checkpoint_missing_a_partition_is_refused_with_what_to_do(runs, tmp_path):
    from pretrain.checkpoint import CheckpointError
    from pretrain.export import export

    run = tmp_path / "run"
    shutil.copytree(runs["zero2-untied"], run)
    next(_step_dir(run).glob("zero_pp_rank_1_*optim_states.pt")).unlink()  # one rank's save never landed
    with pytest.raises(CheckpointError, match="holds 1 optimizer partitions of the 2 it was saved with; .* export "
                                              "another step"):
        export(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()


# Run in a fresh process: export once (imports, first-use allocations), then measure a second export's
# peak RSS above the RSS it starts from. clear_refs=5 resets the kernel's high-water mark (VmHWM).
_PEAK = r"""
import json, sys
from pretrain.export import export
run, out = sys.argv[1], sys.argv[2]
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
export(run, out + "_warm")
start = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
export(run, out)
print(json.dumps({"start": start, "peak": status("VmHWM:")}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
@pytest.mark.parametrize("name", ["zero0", "zero2-untied"])
def test_peak_memory_follows_the_largest_tensor_not_the_model(runs, tmp_path, name):
    # glibc returns every freed block above 64 KiB at once, so the starting RSS is not inflated by the
    # warm-up's freed heap (which would hide a whole-model export's growth)
    env = stage_env(MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(runs[name]), str(tmp_path / "hf")], cwd=REPO, env=env,
                          capture_output=True, text=True, check=True)
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    weights = _written(tmp_path / "hf")
    model_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    largest = max(t.numel() * t.element_size() for t in weights.values())
    # the largest tensor twice (its mapped source pages and the copy written out) and slack for the page
    # cache's large folios, which the kernel maps whole (up to 2 MiB around a page read)
    bound = 2 * largest + 8 * 2**20
    assert bound < model_bytes / 2  # a whole-model export grows by 2-4x the model (80-100 MiB measured here)
    growth = m["peak"] - m["start"]
    assert growth < bound, f"peak {growth / 2**20:.1f} MiB above the start for a {model_bytes / 2**20:.1f} MiB model"


def test_a_zero1_bf16_checkpoint_exports_its_fp32_master_weights(runs, tmp_path):
    # DeepSpeed's zero_to_fp32 refuses BF16_Optimizer files, and the module file holds only the bf16
    # copy: an fp32 export (and a fine-tune's backbone) must still get the fp32 masters
    from pretrain.export import export, fp32_state_dict

    step_dir = _step_dir(runs["zero1-bf16"])
    assert any(step_dir.glob("bf16_zero_pp_rank_*optim_states.pt"))
    module = torch.load(next(step_dir.glob("mp_rank_00_model_states.pt")), weights_only=False)["module"]
    masters = fp32_state_dict(step_dir)
    got = _written(export(runs["zero1-bf16"], tmp_path / "hf", dtype="fp32"))
    assert got.keys() <= masters.keys() and all(torch.equal(got[k], masters[k]) for k in got)
    assert all(torch.equal(masters[k].to(torch.bfloat16), module[k].to(torch.bfloat16)) for k in module)
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in got.values())  # not a bf16 copy


def test_a_frozen_zero1_bf16_fine_tune_from_it_exports(runs, tmp_path):
    # the fine-tune's backbone comes from BF16_Optimizer files, and so does its own export, whose frozen
    # layer no optimizer partition holds (it is read from the module file)
    import finetune_data as fd
    from conftest import run_stage

    train = fd.classification(tmp_path / "train.csv", 60, 1)
    run = tmp_path / "ft"
    run_stage("finetune", ["configs/finetune/classify.yaml", f"--run_dir={run}", f"--init_from={runs['zero1-bf16']}",
                           f"--data.train={train}", "--zero.stage=1", "--precision=bf16", "--transfer.freeze_layers=1",
                           "--train.max_steps=2", "--task.max_seq_len=64", "--train.micro_batch_size=4"], nproc=2)
    backbone, out = _written(run / "backbone"), _written(run / "export")
    frozen = [k for k in backbone if ".layers.0." in k]
    assert frozen and all(torch.equal(out[k].float(), backbone[k].to(torch.bfloat16).float()) for k in frozen)
