"""Probes ``bench/gpu_check.py`` runs in their own processes; each prints one JSON object as its last line.

``python -m bench._gpu_check_probe device``
    the accelerator, process-group backend and device lmforge's ``init_distributed`` chooses here, the
    precision ``auto`` resolves to, and the MFU peak the GPU table gives for this device in bf16.
``python -m bench._gpu_check_probe sdpa PRESET VOCAB [--flash] [--override=value ...]``
    builds the preset's model (``pretrain.model.build_model``; on the GPU in bf16) and runs a forward pass
    with no attention mask, recording every ``scaled_dot_product_attention`` call: a mask that reaches it
    would stop the flash kernel. ``--flash`` runs it under ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``
    (flash only: PyTorch raises when the call cannot use it).
``python -m bench._gpu_check_probe logits RUN_DIR EXPORT_DIR``
    the training engine's logits (restored from the run's latest checkpoint) against those of the Hugging
    Face export loaded with ``AutoModelForCausalLM`` on the same device, for the run's first sample.
"""

from __future__ import annotations

import json
import math
import sys


def _emit(obj: dict) -> int:
    print(json.dumps(obj), flush=True)
    return 0


def device() -> int:
    import os

    import torch

    from pretrain.callbacks import gpu_peak_flops
    from pretrain.dist import init_distributed, shutdown
    from pretrain.engine import resolve_precision

    info = init_distributed()
    out = {"accelerator": os.environ.get("DS_ACCELERATOR"), "backend": torch.distributed.get_backend(),
           "device": str(info.device), "cuda_available": torch.cuda.is_available(),
           "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
           "precision_auto": resolve_precision("auto"), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if info.device.type == "cuda":
        name = torch.cuda.get_device_name(info.device)
        peak, source = gpu_peak_flops(name, "bf16")
        props = torch.cuda.get_device_properties(info.device)
        out.update(device_name=name, capability=list(torch.cuda.get_device_capability(info.device)),
                   memory_gib=round(props.total_memory / 2**30, 1), peak_flops_bf16=peak, peak_source=source)
    shutdown(True)
    return _emit(out)


def sdpa(preset: str, vocab: int, flash: bool, overrides: list[str]) -> int:
    import torch
    import torch.nn.functional as F

    from lmforge.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.model import build_model

    cfg = load_config(PretrainConfig, preset, overrides)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab, device=dev, dtype=dtype).eval()
    calls: list[dict] = []
    original = F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, *args, **kwargs):
        calls.append({"mask": attn_mask is not None, "is_causal": bool(kwargs.get("is_causal", False)),
                      "dtype": str(query.dtype), "shape": list(query.shape)})
        return original(query, key, value, attn_mask, *args, **kwargs)

    ids = torch.randint(8, vocab, (2, cfg.data.seq_len), device=dev)
    out = {"device": str(dev), "dtype": str(dtype), "seq_len": cfg.data.seq_len, "flash": False}
    F.scaled_dot_product_attention = recording
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits  # no attention_mask: SDPA gets is_causal=True and no mask
        out["logits_finite"] = bool(torch.isfinite(logits).all())
        if flash:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            before = len(calls)
            try:
                with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    flash_logits = model(input_ids=ids).logits
                out["flash"] = True
                out["flash_calls"] = len(calls) - before
                out["flash_max_abs_diff"] = float((flash_logits.float() - logits.float()).abs().max())
                out["flash_logits_finite"] = bool(torch.isfinite(flash_logits).all())
            except RuntimeError as e:  # "No available kernel. Aborting execution." and its warnings' reasons
                out["flash_error"] = str(e).strip().splitlines()[0][:400]
    finally:
        F.scaled_dot_product_attention = original
    out.update(calls=len(calls), calls_with_mask=sum(c["mask"] for c in calls),
               calls_causal=sum(c["is_causal"] for c in calls), first_call=calls[0] if calls else None)
    return _emit(out)


def logits(run_dir: str, export_dir: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from lmforge.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.dist import init_distributed, shutdown
    from pretrain.run import build

    cfg = load_config(PretrainConfig, f"{run_dir}/config.yaml", ["--resume=auto", "--metrics.tensorboard=false"])
    info = init_distributed()
    ok = False
    try:
        trainer = build(cfg, info)
        ids = torch.from_numpy(trainer.loader.sample(0)[None, :-1].astype("int64")).to(info.device)
        trainer.engine.eval()
        with torch.no_grad():
            want = trainer.engine(input_ids=ids).logits.float()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trainer.cfg.precision, torch.float32)
        model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=dtype).to(info.device).eval()
        with torch.no_grad():
            got = model(input_ids=ids).logits.float()
        diff = (got - want).abs()
        out = {"device": str(info.device), "precision": trainer.cfg.precision,
               "hf_dtype": str(next(model.parameters()).dtype), "hf_class": type(model).__name__,
               "step": trainer.state.step, "tokens": ids.shape[1], "max_abs_diff": float(diff.max()),
               "mean_abs_diff": float(diff.mean()), "max_abs_logit": float(want.abs().max()),
               "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
               "finite": bool(torch.isfinite(got).all() and torch.isfinite(want).all())}
        ok = True
    finally:
        shutdown(ok)
    if not math.isfinite(out["max_abs_diff"]):
        out["finite"] = False
    return _emit(out)


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    what, rest = argv[0], argv[1:]
    if what == "device":
        return device()
    if what == "sdpa":
        flash = "--flash" in rest
        rest = [a for a in rest if a != "--flash"]
        return sdpa(rest[0], int(rest[1]), flash, rest[2:])
    if what == "logits":
        return logits(rest[0], rest[1])
    raise SystemExit(f"unknown probe {what!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
