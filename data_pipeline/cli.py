"""``python -m data_pipeline {train-tokenizer,build,inspect}`` — the data stage's command line.

With no ``--input`` every command uses the embedded default corpus: the running Python's standard
library sources (real code and docstrings, several MB, present on every machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lmforge.errors import DataError, run_cli
from lmforge.log import print0, progress_enabled


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train-tokenizer", help="train a lossless SentencePiece tokenizer (+ Hugging Face files)")
    t.add_argument("--input", nargs="+", default=[], metavar="PATH", help="files, dirs, globs, hf: sources (default: embedded corpus)")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", required=True, help="output dir: tokenizer.model + tokenizer.json & co.")
    t.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    t.add_argument("--sample-docs", type=int, default=100_000, help="documents reservoir-sampled for training")
    t.add_argument("--read-mb", type=float, default=None,
                   help="read only about this many MB of the inputs: pieces (files, byte ranges, row groups) "
                        "drawn from all of them with --seed (default: read everything)")
    t.add_argument("--extra-special-tokens", nargs="*", default=[], metavar="TOKEN")
    t.add_argument("--text-field", default="text", help="JSON/parquet/datasets column with the text")
    t.add_argument("--seed", type=int, default=0)

    b = sub.add_parser("build", help="tokenize a corpus into checksummed shards (parallel, resumable)")
    add_build_options(b)
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (output is identical for any value)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")

    pl = sub.add_parser("plan", help="split a build into N parts for a job array (then build-part, merge)")
    add_build_options(pl)
    pl.add_argument("--parts", type=int, required=True, help="number of parts (array tasks)")

    bp = sub.add_parser("build-part", help="build one part of a planned build (resumable; any machine)")
    bp.add_argument("out", help="the --out of `plan`")
    bp.add_argument("--part", type=int, required=True, help="part index, 0 to parts - 1")
    bp.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")

    mg = sub.add_parser("merge", help="write the manifest of a planned build once every part is complete")
    mg.add_argument("out", help="the --out of `plan`")

    i = sub.add_parser("inspect", help="totals, tokenizer and a decoded sample of a shard dir")
    i.add_argument("shards")
    i.add_argument("--verify", action="store_true", help="re-hash every shard; exit 1 naming corrupt/missing files")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def add_build_options(b: argparse.ArgumentParser) -> None:
    b.add_argument("--input", nargs="+", default=[], metavar="PATH", help="files, dirs, globs, hf: sources (default: embedded corpus)")
    b.add_argument("--tokenizer", required=True, help="tokenizer dir from train-tokenizer")
    b.add_argument("--out", required=True, help="shard directory (manifest.json is written last)")
    b.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard file")
    b.add_argument("--val-docs", type=int, default=0, help="documents held out as the validation split")
    b.add_argument("--val-every", type=int, default=100, help="hold out every N-th document until --val-docs")
    b.add_argument("--seq-len", type=int, default=None, help="check that each split fills at least one window")
    b.add_argument("--dedup", action="store_true", help="drop exact duplicate documents")
    b.add_argument("--min-chars", type=int, default=0, help="drop documents shorter than this")
    b.add_argument("--text-field", default="text")
    b.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto")


def build_settings(args: argparse.Namespace) -> dict:
    """The keyword arguments of a build (``build_shards`` / ``plan_build``) from parsed build options."""
    return dict(shard_tokens=args.shard_tokens, val_docs=args.val_docs, val_every=args.val_every, dedup=args.dedup,
                min_chars=args.min_chars, text_field=args.text_field, seq_len=args.seq_len, dtype=args.dtype)


def fixed_mmap_threshold(nbytes: int = 1 << 18) -> None:
    """glibc raises its mmap threshold each time a large block is freed, after which large blocks (documents,
    batches) come from the heap, which then only grows: fixed, the build's memory stays flat as the corpus
    grows (bench data_pipeline.growth.peak_rss). A no-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("build", "build-part", "merge"):
        fixed_mmap_threshold()
    if args.command == "train-tokenizer":
        return _train_tokenizer(args)
    if args.command == "build":
        return _build(args)
    if args.command in ("plan", "build-part", "merge"):
        return _array_step(args)
    return _inspect(args)


def _train_tokenizer(args) -> int:
    from data_pipeline import sources
    from data_pipeline.tokenizer import train_tokenizer

    inputs = args.input or sources.default_corpus_paths()
    sources.expand_inputs(inputs)
    t0 = time.time()
    if args.read_mb is not None:
        if args.read_mb <= 0:
            raise DataError(f"--read-mb {args.read_mb}: must be positive")
        inputs = sources.sample_inputs(inputs, int(args.read_mb * 2**20), seed=args.seed)
        print0(f"tokenizer: reading {len(inputs):,} piece(s) of the inputs (about {args.read_mb:g} MB, seed {args.seed})")
    docs = sources.iter_documents(inputs, text_field=args.text_field)
    if progress_enabled():
        from tqdm import tqdm

        docs = tqdm(docs, unit="doc", desc="read + sample", dynamic_ncols=True)
    tok = train_tokenizer(
        docs,
        args.out,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        sample_docs=args.sample_docs,
        extra_special_tokens=args.extra_special_tokens,
        seed=args.seed,
    )
    print0(f"tokenizer: {args.model_type}, vocab {tok.vocab_size}, sha256 {tok.fingerprint[:12]} → {args.out} ({time.time() - t0:.1f}s)")
    return 0


def _build(args) -> int:
    from data_pipeline.build import build_shards

    t0 = time.time()
    m = build_shards(args.input, args.tokenizer, args.out, workers=args.workers, **build_settings(args),
                     progress=False if args.no_progress else None)
    _summary(m, args.out, time.time() - t0)
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    # where the CPU went: this process reads, decodes, hands out and writes; the workers tokenize
    print0(f"  cpu: main process {me.ru_utime + me.ru_stime:.2f}s, tokenizer workers {kids.ru_utime + kids.ru_stime:.2f}s")
    return 0


def _array_step(args) -> int:
    from data_pipeline import array

    t0 = time.time()
    if args.command == "plan":
        plan = array.plan_build(args.input, args.tokenizer, args.out, args.parts, **build_settings(args))
        for i, (specs, size) in enumerate(zip(plan["parts"], plan["bytes"])):
            print(f"part {i}: {len(specs)} input(s), {size / 2**20:,.1f} MiB  {specs[0]}{' ...' if len(specs) > 1 else ''}")
        n = len(plan["parts"])
        print(f"plan: {n} part(s) → {args.out}; next: python -m data_pipeline build-part {args.out} --part I "
              f"(I = 0..{n - 1}, anywhere), then python -m data_pipeline merge {args.out}")
        return 0
    if args.command == "build-part":
        m = array.build_part(args.out, args.part, workers=args.workers)
        tr = m["splits"]["train"]
        print(f"part {args.part}: {len(tr['shards'])} shard(s), {tr['tokens']:,} tokens, {tr['documents']:,} docs "
              f"→ {array.part_dir(args.out, args.part)} [{time.time() - t0:.1f}s]")
        return 0
    _summary(array.merge(args.out), args.out, time.time() - t0)
    return 0


def _summary(m: dict, out: str, dt: float) -> None:
    tr, va = m["splits"]["train"], m["splits"]["val"]
    print0(
        f"shards: {len(tr['shards'])} train ({tr['tokens']:,} tokens, {tr['documents']:,} docs), "
        f"{len(va['shards'])} val ({va['tokens']:,} tokens) → {out} "
        f"[{m['dtype']}, {dt:.1f}s, {tr['tokens'] / max(dt, 1e-9):,.0f} tokens/s]"
    )
    st = m["stats"]
    skipped = {k: st[k] for k in ("empty_skipped", "short_skipped", "invalid_utf8_docs", "duplicate_documents") if st.get(k)}
    if skipped:
        print0("  " + ", ".join(f"{k}={v}" for k, v in skipped.items()))


def _inspect(args) -> int:
    from data_pipeline.shards import Manifest

    m = Manifest(args.shards)
    summary = {
        "shards": str(m.root),
        "dtype": m.data["dtype"],
        "tokenizer": m.data["tokenizer"],
        "fingerprint": m.fingerprint,
        "splits": {s: {k: v for k, v in m.data["splits"][s].items() if k != "shards"} | {"files": len(m.shards(s))} for s in m.splits()},
        "stats": m.data.get("stats", {}),
    }
    sample = _decoded_sample(m)
    if args.json:
        print(json.dumps(summary | {"sample": sample}, indent=1))
    else:
        print(f"{m.root}: {m.data['dtype']}, tokenizer {m.tokenizer_sha256[:12]} (vocab {m.vocab_size}, eos {m.eos_id})")
        for s, info in summary["splits"].items():
            print(f"  {s:5s}: {info['files']} shard(s), {info['tokens']:,} tokens, {info['documents']:,} documents")
        print("  sample: " + repr(sample[:300]))
    if args.verify:
        problems = m.verify()
        for p in problems:
            print(f"CORRUPT {p}", file=sys.stderr)
        if problems:
            print(f"error: {len(problems)} damaged file(s) in {m.root}; rebuild them (re-run build into a new --out)",
                  file=sys.stderr)
            return 1
        n = sum(len(m.shards(s)) for s in m.splits())
        print(f"verified: the tokenizer and {n} shard(s), all sha256 match")
    return 0


def _decoded_sample(m, n_tokens: int = 120) -> str:
    """The first tokens of the train split, decoded with the tokenizer stored next to the shards."""
    import numpy as np

    from data_pipeline.tokenizer import Tokenizer

    tok_dir = Path(m.root) / "tokenizer"
    if not (tok_dir / "tokenizer.model").is_file():
        return "(no tokenizer/ next to the shards)"
    shard = m.shards("train")[0]
    if not shard.path.is_file():
        return f"(missing {shard.path})"
    ids = np.fromfile(shard.path, dtype=m.dtype, count=min(n_tokens, shard.tokens))
    try:
        return Tokenizer.load(tok_dir).decode([int(x) for x in ids])
    except DataError as e:
        return f"({e})"


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
