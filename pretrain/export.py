"""``python -m pretrain.export RUN_DIR [--step N] --out DIR [--dtype bf16|fp16|fp32]``

Writes a Hugging Face model directory (config.json, model.safetensors — sharded above
``--max-shard-size`` — generation_config.json and the tokenizer files) from a sharded DeepSpeed
checkpoint. It runs on CPU in one process: it needs neither the GPUs nor the world size that
trained the model. The weights are written in the run's precision unless ``--dtype`` says otherwise.

The export streams: the checkpoint files are memory-mapped, each weight is gathered from its ZeRO
partitions, cast and written to its safetensors file before the next one is read, and the model
is built on the meta device only for its key names, shapes and config. Peak memory above the
imports is about twice the largest tensor (the embedding), not the model: at 350m, 47-65 MB against
3.7-5.5 GB for the former whole-model path (``python -m bench.export_memory``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import mmap
import re
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config import load_config
from lmforge.errors import CheckpointError, ConfigError, run_cli
from lmforge.io import staged_dir
from lmforge.rundir import checkpoint_dir, checkpoints_dir, is_complete, latest_checkpoint, read_state
from pretrain.config import PretrainConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# safetensors' names for the dtypes a checkpoint holds (weights, and integer or boolean buffers)
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


def find_step(run_dir: Path, step: int | None) -> Path:
    if step is None:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise CheckpointError(f"{run_dir} has no complete checkpoint in {checkpoints_dir(run_dir)}; train first")
        return found
    d = checkpoint_dir(run_dir, step)
    if not is_complete(d):
        raise CheckpointError(f"{d} is missing or incomplete; pick a step listed in {checkpoints_dir(run_dir)}")
    return d


def _is_zero_partitioned(step_dir: Path) -> bool:
    """ZeRO-1/2/3: the fp32 master weights are partitioned over ``zero_pp_rank_*`` files (DeepSpeed's
    ZeRO optimizer) or ``bf16_zero_pp_rank_*`` files (its BF16_Optimizer: ZeRO-1 + bf16 with fp32
    gradient accumulation, pretrain/engine.py). Otherwise (ZeRO-0) the module states file holds the
    whole model, in the training precision, and that is what is read.
    """
    return any(step_dir.glob("zero_pp_rank_*optim_states.pt")) or _is_bf16_optimizer(step_dir)


def _is_bf16_optimizer(step_dir: Path) -> bool:
    return any(step_dir.glob("bf16_zero_pp_rank_*optim_states.pt"))


def fp32_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from any ZeRO stage's checkpoint, on CPU, all in memory at once (small models)."""
    if _is_bf16_optimizer(step_dir):  # DeepSpeed's zero_to_fp32 refuses these files ("not a zero checkpoint")
        return {k: v.read(torch.float32) for k, v in lazy_weights(step_dir).items()}
    if _is_zero_partitioned(step_dir):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    else:  # ZeRO-0: the module states file holds the whole model
        sd = torch.load(_module_states_file(step_dir), map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in sd.items()}


def _module_states_file(step_dir: Path) -> Path:
    files = sorted(step_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{step_dir} holds no DeepSpeed model states; is it a checkpoint directory?")
    return files[0]


def build_hf_model(run_dir: Path, state: dict, cfg: PretrainConfig, device: str = "cpu"):
    """The transformers model of a run (randomly initialised; ``device="meta"``: shapes only) and its tokenizer."""
    from data_pipeline.tokenizer import Tokenizer
    from pretrain.model import build_model
    from pretrain.objective import special_ids

    tok = Tokenizer.load(run_dir / "tokenizer")
    if tok.fingerprint != state["tokenizer_sha256"]:
        raise CheckpointError(f"{run_dir}/tokenizer differs from the one the checkpoint was trained with")
    ids = special_ids(tok, cfg.model.kind)
    model = build_model(cfg.model, tok.vocab_size, device=device, bos_id=ids["bos"], eos_id=ids["eos"],
                        pad_id=ids["pad"], mask_id=ids.get("mask"))
    return model, tok


def load_weights(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], where: Path) -> None:
    """Strict load, except for keys that are tied to a loaded one (e.g. lm_head = embeddings).

    ``model`` may be whole or built partitioned for ZeRO-3 (``pretrain.model.load_state``)."""
    from pretrain.model import load_state

    missing, unexpected = load_state(model, sd)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])  # a list, or a dict keyed by the tied names
    really_missing = [k for k in missing if k not in tied]
    if really_missing or unexpected:
        raise CheckpointError(
            f"{where}: weights do not match the model (missing {really_missing[:3]}, unexpected {list(unexpected)[:3]})"
        )
    model.tie_weights()


# ---------------------------------------------------------------- reading a checkpoint one tensor at a time
def _madvise():
    """libc's madvise: torch has no call that drops a mapped tensor's pages from the process."""
    if not sys.platform.startswith("linux"):
        return None
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


_MADVISE = _madvise()


@dataclass(frozen=True, eq=False)
class MappedFile:
    """A checkpoint file loaded with ``torch.load(mmap=True)``: its objects, every tensor left in the file.

    A mapped file's pages count in the process's resident memory once touched (and the kernel maps
    up to 64 KiB around each page touched), so :meth:`release` hands all of them back after each
    tensor is read; without it the export's RSS would grow to the size of what it read.
    """

    path: Path
    objects: dict
    span: tuple[int, int] | None  # the mapping's address range; None where it cannot be released

    @classmethod
    def load(cls, path: Path) -> MappedFile:
        objects = torch.load(path, map_location="cpu", mmap=True, weights_only=False)  # DeepSpeed pickles its classes
        return cls(path, objects, _span_of(path, _first_tensor(objects)))

    def release(self) -> None:
        """Drop this file's pages from the process. Safe because the mapping is private and nothing writes
        it: the kernel keeps the pages in its page cache and maps them again if they are read."""
        if self.span is not None:
            _MADVISE(self.span[0], self.span[1] - self.span[0], mmap.MADV_DONTNEED)


def _first_tensor(obj) -> torch.Tensor | None:
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor) and o.numel():
            return o
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, list | tuple):
            stack.extend(o)
    return None


def _span_of(path: Path, anchor: torch.Tensor | None) -> tuple[int, int] | None:
    """The address range of the mapping of ``path`` that holds ``anchor`` (from /proc/self/maps), or None.

    Only a mapping of this very file qualifies: MADV_DONTNEED on anonymous memory would zero it.
    """
    if _MADVISE is None or anchor is None:
        return None
    ptr, name = anchor.data_ptr(), str(path.resolve())
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi:
                return (lo, hi) if len(fields) == 6 and fields[5].strip() == name else None
    return None


@dataclass(frozen=True)
class LazyTensor:
    """A checkpoint tensor not read yet: 1-D pieces whose concatenation, cut to ``shape``'s size, holds it."""

    shape: torch.Size
    dtype: torch.dtype  # as stored
    pieces: tuple[torch.Tensor, ...]
    files: tuple[MappedFile, ...] = ()  # the mapped files the pieces are views of

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def out_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        """The dtype :meth:`read` returns: ``dtype`` for floating-point tensors, integer buffers as stored."""
        return dtype if dtype is not None and self.dtype.is_floating_point else self.dtype

    def read(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor in new memory, cast while it is copied (no second full-size copy)."""
        out = torch.empty(self.numel, dtype=self.out_dtype(dtype))
        pos = 0
        for p in self.pieces:
            take = min(p.numel(), self.numel - pos)
            out[pos:pos + take].copy_(p[:take])
            pos += take
        for f in self.files:
            f.release()
        return out.view(self.shape)


def _whole(t: torch.Tensor, file: MappedFile) -> LazyTensor:
    flat = t.reshape(-1)  # a view of the file when contiguous (as saved), else a copy made now
    return LazyTensor(t.shape, t.dtype, (flat,), (file,) if t.is_contiguous() else ())


def _lazy(name: str, shape, pieces: list[torch.Tensor], files: list[MappedFile], where: Path) -> LazyTensor:
    shape = torch.Size(shape)
    have = sum(p.numel() for p in pieces)
    if have < shape.numel():
        raise CheckpointError(f"{where}: {name} needs {shape.numel()} values, its ZeRO partitions hold {have}; "
                              "the checkpoint is damaged, export another step")
    return LazyTensor(shape, pieces[0].dtype if pieces else torch.float32, tuple(pieces), tuple(files))


def lazy_weights(step_dir: Path) -> dict[str, LazyTensor]:
    """Every weight of a checkpoint by module name (tied ones under each name), nothing read yet.

    The same values as :func:`fp32_state_dict`, in their stored dtype: the fp32 master weights
    of a ZeRO-partitioned checkpoint, the module states file otherwise.
    """
    if _is_zero_partitioned(step_dir):
        return _zero_weights(step_dir)
    file = MappedFile.load(_module_states_file(step_dir))
    return {k: _whole(v, file) for k, v in file.objects["module"].items()}


def _rank_files(step_dir: Path, suffix: str) -> list[Path]:
    """``[bf16_]zero_pp_rank_R_*suffix`` in rank order (a name sort puts rank 10 before rank 2)."""
    files = step_dir.glob(f"*zero_pp_rank_*{suffix}")
    return sorted(files, key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)))


def _zero_weights(step_dir: Path) -> dict[str, LazyTensor]:
    from deepspeed.checkpoint import constants as C

    optim = [MappedFile.load(f) for f in _rank_files(step_dir, "_optim_states.pt")]
    model_file = (_rank_files(step_dir, "_model_states.pt") or [_module_states_file(step_dir)])[0]  # ZeRO-3 / 1-2
    meta = MappedFile.load(model_file)
    counts = optim[0].objects[C.OPTIMIZER_STATE_DICT][C.PARTITION_COUNT]
    world = max(counts) if isinstance(counts, list) else int(counts)
    if len(optim) != world:
        raise CheckpointError(f"{step_dir} holds {len(optim)} optimizer partitions of the {world} it was saved "
                              "with; its save was incomplete, export another step")
    stage = int(optim[0].objects[C.OPTIMIZER_STATE_DICT].get(C.ZERO_STAGE, 1))  # BF16_Optimizer records none: ZeRO-1
    if stage == 3 and meta.objects.get(C.FROZEN_PARAM_SHAPES):
        raise CheckpointError(f"{model_file} holds frozen ZeRO-3 parameters, which the streaming export does not read; "
                              "load it with pretrain.export.fp32_state_dict")
    # buffers; at ZeRO-1/2 also the frozen parameters, which no optimizer partition holds: they are never
    # updated, so the module file's whole copy is theirs (BF16_Optimizer records no frozen_param_shapes)
    trained = {k for group in meta.objects[C.PARAM_SHAPES] for k in group}
    keep = set(meta.objects[C.BUFFER_NAMES]) | (set() if stage == 3 else set(meta.objects["module"]) - trained)
    weights = {k: _whole(v, meta) for k, v in meta.objects["module"].items() if k in keep}
    read = _zero3_params if stage == 3 else _zero12_params
    weights.update(read(meta.objects[C.PARAM_SHAPES], optim, step_dir))
    for alias, source in meta.objects.get("shared_params", {}).items():  # tied weights are stored once
        if source in weights:
            weights[alias] = weights[source]
    return weights


def _zero12_params(param_shapes: list[dict], optim: list[MappedFile], where: Path) -> dict[str, LazyTensor]:
    """ZeRO-1/2: each parameter group is one flat fp32 vector cut into one equal part per rank;
    each rank's ``param_slice_mappings`` says which slice of its part holds which parameter."""
    from deepspeed.checkpoint import constants as C

    out = {}
    for g, shapes in enumerate(param_shapes):
        for name, shape in shapes.items():
            pieces, files = [], []
            for f in optim:  # rank order is the order of the flat vector
                sd = f.objects[C.OPTIMIZER_STATE_DICT]
                frag = sd[C.PARAM_SLICE_MAPPINGS][g].get(name)
                if frag is not None:
                    pieces.append(sd[C.SINGLE_PARTITION_OF_FP32_GROUPS][g].narrow(0, frag.start, frag.numel))
                    files.append(f)
            out[name] = _lazy(name, shape, pieces, files, where)
    return out


def _zero3_params(param_shapes: list[dict], optim: list[MappedFile], where: Path) -> dict[str, LazyTensor]:
    """ZeRO-3: each rank holds ``ceil(numel / world)`` values of every parameter (the last rank's padded),
    the parameters one after the other through its fp32 groups (read here as one vector)."""
    from deepspeed.checkpoint import constants as C

    flats = [f.objects[C.OPTIMIZER_STATE_DICT][C.FP32_FLAT_GROUPS] for f in optim]
    out, offset = {}, 0
    for name, shape in ((k, s) for group in param_shapes for k, s in group.items()):
        part = -(-math.prod(shape) // len(flats))
        pieces = [p for groups in flats for p in _span(groups, offset, part)]
        out[name] = _lazy(name, shape, pieces, optim, where)
        offset += part
    held = sum(g.numel() for g in flats[0])
    if offset != held:
        raise CheckpointError(f"{where}: the parameters take {offset} values per rank, the ZeRO-3 partitions hold "
                              f"{held}; the checkpoint is damaged or not from this model, export another step")
    return out


def _span(groups: Sequence[torch.Tensor], start: int, length: int) -> Iterator[torch.Tensor]:
    """Views of ``length`` values from ``start`` of the concatenation of ``groups``, without concatenating."""
    for g in groups:
        if length <= 0:
            return
        if start >= g.numel():
            start -= g.numel()
            continue
        take = min(length, g.numel() - start)
        yield g.narrow(0, start, take)
        start, length = 0, length - take


# ---------------------------------------------------------------- writing safetensors one tensor at a time
def hf_weight_names(model: torch.nn.Module) -> dict[str, torch.Size]:
    """The names and shapes ``save_pretrained`` writes: the state dict without tied copies (lm_head = embeddings)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # transformers 5: only the ties this config makes
    return {k: v.shape for k, v in sorted(model.state_dict().items()) if k not in tied}


def _check_match(model: torch.nn.Module, names: Mapping[str, torch.Size], weights: Mapping[str, LazyTensor],
                 where: Path) -> None:
    known = model.state_dict().keys()
    missing = [k for k in names if k not in weights]
    unexpected = [k for k in weights if k not in known]
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not match the model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}); export with the config.yaml the run was trained with")
    for k, shape in names.items():
        if weights[k].shape != shape:
            raise CheckpointError(f"{where}: {k} is {tuple(weights[k].shape)} in the checkpoint, {tuple(shape)} in "
                                  "the model of config.yaml; export with the config the run was trained with")


def write_safetensors(path: Path, items: Sequence[tuple[str, LazyTensor]], dtype: torch.dtype | None,
                      bar: Any = None) -> int:
    """One safetensors file: the header first (every shape is known), then each tensor read, cast and
    appended before the next is read. Returns the bytes written; ``bar`` (tqdm) counts them."""
    header: dict = {"__metadata__": {"format": "pt"}}  # what save_pretrained writes; transformers checks it
    offset = 0
    for name, t in items:
        dt = t.out_dtype(dtype)
        if dt not in ST_DTYPES:
            raise CheckpointError(f"{name}: dtype {dt} has no safetensors name; export with --dtype fp32")
        header[name] = {"dtype": ST_DTYPES[dt], "shape": list(t.shape), "data_offsets": [offset, offset + t.numel * dt.itemsize]}
        offset += t.numel * dt.itemsize
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, t in items:
            n = f.write(t.read(dtype).reshape(-1).view(torch.uint8).numpy().data)
            if bar is not None:
                bar.update(n)
        return f.tell()


def _plan_shards(items: Sequence[tuple[str, LazyTensor]], dtype: torch.dtype | None,
                 max_bytes: int) -> list[list[tuple[str, LazyTensor]]]:
    """Tensors in order into files of at most ``max_bytes`` (a larger tensor gets a file of its own)."""
    shards: list[list[tuple[str, LazyTensor]]] = [[]]
    size = 0
    for name, t in items:
        n = t.numel * t.out_dtype(dtype).itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += n
    return shards


def write_weights(out: Path, items: Sequence[tuple[str, LazyTensor]], dtype: torch.dtype | None,
                  max_shard_size: int | str = "2GB") -> int:
    """``model.safetensors``, or numbered shards and ``model.safetensors.index.json`` as transformers
    names them. Returns the bytes written."""
    from transformers.utils.hub import convert_file_size_to_int

    from lmforge.log import progress_enabled

    shards = _plan_shards(items, dtype, convert_file_size_to_int(max_shard_size))
    total = sum(t.numel * t.out_dtype(dtype).itemsize for _, t in items)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    bar = None
    if progress_enabled():
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="export", dynamic_ncols=True)
    written = sum(write_safetensors(out / name, shard, dtype, bar) for name, shard in zip(names, shards))
    if bar is not None:
        bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": sum(t.numel for _, t in items), "total_size": total},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k, _ in shard}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return written


# ---------------------------------------------------------------- the export
def export_dtype(state: Mapping, dtype: str | None = None) -> torch.dtype:
    """``dtype`` (fp32, bf16, fp16), or the precision the checkpoint was trained in (bf16 runs → bf16)."""
    name = dtype or {"bf16": "bf16", "fp16": "fp16"}.get(state.get("precision", ""), "fp32")
    if name not in DTYPES:
        raise ConfigError(f"dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def export(run_dir: str | Path, out: str | Path, step: int | None = None, dtype: str | None = None,
           max_shard_size: str = "2GB") -> Path:
    """Write ``out`` (a Hugging Face directory) from a checkpoint, one tensor at a time.

    ``dtype`` None: the run's precision (bf16 for bf16 runs, fp16 for fp16 runs, fp32 otherwise).
    """
    run_dir, out = Path(run_dir), Path(out)
    step_dir = find_step(run_dir, step)
    state = read_state(step_dir)
    torch_dtype = export_dtype(state, dtype)
    cfg = load_config(PretrainConfig, run_dir / "config.yaml")
    model, tok = build_hf_model(run_dir, state, cfg, device="meta")  # names, shapes and config; no memory
    names = hf_weight_names(model)
    weights = lazy_weights(step_dir)
    _check_match(model, names, weights, step_dir)
    with staged_dir(out) as tmp:  # a reader never sees a half-written export
        write_weights(tmp, [(k, weights[k]) for k in names], torch_dtype, max_shard_size)
        model.config.architectures = [type(model).__name__]  # what save_pretrained records
        model.config.dtype = torch_dtype  # from_pretrained's dtype="auto" loads the weights in it
        model.config.save_pretrained(tmp)
        _save_generation_config(model, tmp)
        tok.save(tmp)
    return out


def _save_generation_config(model, out: Path) -> None:
    from transformers import GenerationConfig

    c = model.config
    if c.model_type == "llama":
        GenerationConfig(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                         do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=128).save_pretrained(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="weight dtype (default: the run's precision: bf16 for bf16 runs, fp32 for fp32 runs)")
    ap.add_argument("--max-shard-size", default="2GB", help="safetensors files are split above this size")
    args = ap.parse_args(argv)
    path = export(args.run_dir, args.out, args.step, args.dtype, args.max_shard_size)
    conf = json.loads((path / "config.json").read_text())
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    how = "--dtype" if args.dtype else "the run's precision"
    print(f"exported {args.run_dir} → {path}: {conf['dtype']} weights ({how}), {size / 1e9:.2f} GB "
          "(load with transformers' AutoModel*/AutoTokenizer.from_pretrained)")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
