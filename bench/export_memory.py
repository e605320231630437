"""Peak host memory of the Hugging Face export against the bytes it writes: the whole-model path vs
the streaming ``pretrain.export``, on the 350m preset (the largest this machine's ~6 GB budget holds).

``python -m bench.export_memory [--quick] [--preset NAME] [--keep]`` — two real DeepSpeed checkpoints of
the preset at the bench's 8192 vocab, bf16, saved right after the engine is built (the initial weights,
in the files a training run writes; made once, cached):

- ``zero0``: ZeRO-0 on 1 process (one ``mp_rank_00_model_states.pt`` with the bf16 module);
- ``zero3``: ZeRO-3 on 2 processes (the fp32 master weights partitioned over two optimizer files).

Each export then runs alone in its own process; the figure is its peak RSS (VmHWM):

- ``floor``: the same process importing everything and exporting nothing;
- ``whole``: the export as it was before streaming (a randomly initialised fp32 model, the whole fp32
  state dict beside it, ``load_state_dict``, ``.to(bf16)``, ``save_pretrained``), writing bf16;
- ``stream``: ``python -m pretrain.export RUN --out DIR`` (bf16, the run's precision, by default);
- ``stream_fp32``: the same with ``--dtype fp32`` (twice the bytes written).

Each record's config holds the bytes written, the largest tensor written and the peak above the floor.
``--quick``: the small preset (24M). Exports go to bench/results/cache/scratch and are deleted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

from bench._train_common import SCRATCH, VOCAB, check, ensure_shards, free_port, load_average, log, run_tree
from bench.common import CACHE_DIR, bench_command, emit, print_table, record
from lmforge.rundir import latest_checkpoint, latest_file

NAME = "export_memory"
MB = 2**20
CASES = {"zero0": 1, "zero3": 2}  # ZeRO stage name → processes that save the checkpoint
MODES = ("floor", "whole", "stream", "stream_fp32")


# ---------------------------------------------------------------- inside the measured processes
def make_checkpoint(config: str, overrides: list[str]) -> int:
    """``python -m bench.export_memory checkpoint CONFIG OVERRIDES...``: build the run, save step 0, stop."""
    from lmforge.config import load_config
    from pretrain.checkpoint import save
    from pretrain.config import PretrainConfig
    from pretrain.dist import init_distributed, shutdown
    from pretrain.run import build

    cfg = load_config(PretrainConfig, config, overrides)
    info = init_distributed()
    try:
        save(build(cfg, info), "bench")  # no step: the optimizer states exist already, the activations never do
    finally:
        shutdown()
    return 0


def whole_model_export(run_dir: Path, out: Path, dtype: str) -> None:
    """The export before streaming, kept as the baseline: every weight held twice in fp32, then cast."""
    import torch

    from lmforge.config import load_config
    from lmforge.rundir import read_state
    from pretrain.config import PretrainConfig
    from pretrain.export import build_hf_model, find_step, fp32_state_dict, load_weights

    step_dir = find_step(run_dir, None)
    cfg = load_config(PretrainConfig, run_dir / "config.yaml")
    model, tok = build_hf_model(run_dir, read_state(step_dir), cfg)  # randomly initialised, fp32
    load_weights(model, fp32_state_dict(step_dir), step_dir)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    tok.save(out)


def export_main(mode: str, run_dir: str, out: str) -> int:
    """``python -m bench.export_memory export MODE RUN_DIR OUT``: one export (or none, for the floor)."""
    import deepspeed.utils.zero_to_fp32  # noqa: F401  (the whole path's reader: part of the floor)
    import safetensors.torch  # noqa: F401
    from transformers import BertForMaskedLM, LlamaForCausalLM  # noqa: F401

    from pretrain.export import main as export_cli

    if mode == "whole":
        whole_model_export(Path(run_dir), Path(out), "bf16")
    elif mode in ("stream", "stream_fp32"):
        return export_cli([run_dir, "--out", out, *(["--dtype", "fp32"] if mode == "stream_fp32" else [])])
    return 0


# ---------------------------------------------------------------- the benchmark
def checkpoint_run(preset: str, case: str, shards: Path) -> Path:
    """A bf16 run of ``preset`` with one checkpoint at step 0, saved by ``CASES[case]`` processes (cached)."""
    run = CACHE_DIR / f"{NAME}-{Path(preset).stem}-{case}"
    if latest_file(run).is_file():
        return run
    shutil.rmtree(run, ignore_errors=True)
    nproc = CASES[case]
    args = [preset, f"--run_dir={run}", f"--data.shards=[{shards}]", f"--model.vocab_size={VOCAB}",
            f"--zero.stage={case[-1]}", "--precision=bf16", "--data.seq_len=64", "--train.micro_batch_size=1",
            f"--train.global_batch_size={nproc}", "--metrics.tensorboard=false", "--train.progress=false"]
    log(NAME, f"{case}: saving a {Path(preset).stem} checkpoint from {nproc} process(es) → {run} (once)")
    me = ["-m", f"bench.{NAME}", "checkpoint", *args]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *me] if nproc > 1 else [sys.executable, *me])
    check(NAME, f"{case} checkpoint", run_tree(cmd))
    return run


def tensor_bytes(hf_dir: Path) -> list[int]:
    """The size of every tensor in a directory's safetensors files (read from their headers)."""
    sizes = []
    for f in hf_dir.glob("*.safetensors"):
        with open(f, "rb") as h:
            header = json.loads(h.read(struct.unpack("<Q", h.read(8))[0]))
        sizes += [end - start for k, v in header.items() if k != "__metadata__" for start, end in [v["data_offsets"]]]
    return sizes


def measure_case(run: Path, case: str) -> dict[str, dict]:
    out = {}
    for mode in MODES:
        dest = SCRATCH / f"{NAME}-{case}-{mode}"
        shutil.rmtree(dest, ignore_errors=True)
        log(NAME, f"{case} {mode} (load {load_average()})")
        r = run_tree([sys.executable, "-m", f"bench.{NAME}", "export", mode, str(run), str(dest)])
        check(NAME, f"{case} {mode}", r)
        sizes = tensor_bytes(dest) if dest.is_dir() else []
        r.update(written=sum(sizes), largest=max(sizes, default=0))
        shutil.rmtree(dest, ignore_errors=True)
        out[mode] = r
    return out


def records(preset: str, case: str, run: Path, res: dict[str, dict]) -> list[dict]:
    ckpt = latest_checkpoint(run)
    common = {"preset": preset, "vocab_size": VOCAB, "zero_stage": int(case[-1]), "saved_by_processes": CASES[case],
              "precision": "bf16", "checkpoint_mb": round(sum(f.stat().st_size for f in ckpt.iterdir()) / MB, 1)}
    floor = res["floor"]["peak_rss_mb_per_proc"]
    recs, whole = [], None
    for mode in MODES:
        r = res[mode]
        above = r["peak_rss_mb_per_proc"] - floor
        cfg = {**common, "written_mb": round(r["written"] / MB, 1), "largest_tensor_mb": round(r["largest"] / MB, 1),
               "above_floor_mb": round(above, 1), "seconds": round(r["seconds"], 1),
               "above_floor_per_written": round(above * MB / r["written"], 3) if r["written"] else None,
               "command": f"python -m bench.{NAME} export {mode} RUN OUT"}
        rec = record(f"{NAME}.{case}.peak_rss.{mode}", "peak_rss", r["peak_rss_mb_per_proc"], "MB",
                     whole if mode != "floor" else None, config=cfg)
        whole = rec if mode == "whole" else whole
        recs.append(rec)
    return recs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["checkpoint"]:
        return make_checkpoint(argv[1], argv[2:])
    if argv[:1] == ["export"]:
        return export_main(*argv[1:4])
    ap = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: the small preset instead of 350m")
    ap.add_argument("--preset", default=None, help="configs/pretrain/<preset>.yaml (default 350m; --quick small)")
    ap.add_argument("--keep", action="store_true", help="keep the cached checkpoints (~5 GB at 350m)")
    a = ap.parse_args(argv)
    preset = f"configs/pretrain/{a.preset or ('small' if a.quick else '350m')}.yaml"
    shards = ensure_shards(NAME)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    recs = []
    for case in CASES:
        run = checkpoint_run(preset, case, shards)
        recs += records(preset, case, run, measure_case(run, case))
        if not a.keep:
            shutil.rmtree(run, ignore_errors=True)
    emit(recs, NAME + ("-quick" if a.quick else ""), command=bench_command(NAME, argv))
    print_table(recs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
