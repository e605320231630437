"""Tokenize a document stream into fixed-size, checksummed token shards, in parallel and resumably.

Order and determinism: the main process reads documents in a fixed order and hands batches to W
worker processes; results are consumed in submission order, so the output bytes do not depend on W.
At most ``2 * W`` batches are in flight, so memory does not grow with the corpus.

Resumability: after each completed train shard (written to ``*.tmp``, fsynced, renamed), a small
``progress.json`` records where the document stream stands. A re-run after ``kill -9`` re-verifies
the finished shards, fast-forwards the stream without tokenizing, and writes the same bytes.
Validation documents go to an append-only spill file whose length is part of the progress record;
``manifest.json`` is written last and is the only completeness marker.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import sources
from data_pipeline.shards import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    dtype_for_vocab,
    manifest_fingerprint,
    sha256_file,
)
from data_pipeline.tokenizer import Tokenizer
from lmforge.errors import DataError
from lmforge.io import atomic_write_text, fsync_dir
from lmforge.log import progress_enabled

PROGRESS = "progress.json"
VAL_SPILL = "val.partial"


@dataclass
class BuildSettings:
    """Everything that determines the output bytes (a re-run must match to resume)."""

    inputs: list[str]
    tokenizer_sha256: str
    dtype: str
    shard_tokens: int = 1 << 24  # tokens per shard (the last one of each split is shorter)
    val_docs: int = 0  # documents held out for validation
    val_every: int = 100  # every val_every-th kept document is held out, until val_docs
    dedup: bool = False  # drop exact duplicate documents
    min_chars: int = 0  # drop documents shorter than this
    text_field: str = "text"  # JSON/parquet/datasets column holding the text
    seq_len: int | None = None  # when given, the build checks that both splits can fill one window


@dataclass
class _Progress:
    docs_read: int = 0  # raw documents consumed from the stream (before filtering)
    skip_tokens: int = 0  # tokens of document `docs_read` already written (it spans a shard boundary)
    kept_docs: int = 0
    dup_docs: int = 0
    train_shards: list[dict[str, Any]] = field(default_factory=list)
    val_tokens: int = 0
    val_docs: int = 0


# ---------------------------------------------------------------- worker side
_TOK: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _TOK
    # A forked worker inherits the parent's Python signal handlers: under SLURM (submitit) a SIGTERM handler
    # that only logs, so the pool's terminate() could not end a worker and the build hung at its end.
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    _TOK = Tokenizer.load(tokenizer_path, num_threads=1)  # W workers = W threads, no oversubscription


def _encode(texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of each text followed by EOS, concatenated; plus per-document lengths (with EOS)."""
    assert _TOK is not None
    return _TOK.encode_concat(texts, DTYPES[dtype], append_id=_TOK.eos_id)  # memory bounded per call, not per text


# ---------------------------------------------------------------- main side
def _ordered_map(batches: Iterator[list[str]], workers: int, tokenizer_path: str, dtype: str):
    """Yield (texts, (tokens, lengths)) in input order, with at most 2*workers batches in flight."""
    if workers <= 1:
        _init_worker(tokenizer_path)
        for b in batches:
            yield b, _encode(b, dtype)
        return
    ctx = mp.get_context("spawn" if os.environ.get("LMFORGE_MP_SPAWN") else "fork")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        pending: deque = deque()
        for b in batches:
            pending.append((b, pool.apply_async(_encode, (b, dtype))))
            if len(pending) >= 2 * workers:
                texts, res = pending.popleft()
                yield texts, res.get()
        while pending:
            texts, res = pending.popleft()
            yield texts, res.get()


class ShardFile:
    """One shard file written as its tokens arrive (to ``NAME.tmp``: fsynced and renamed by :meth:`finish`),
    hashed on the way: memory does not grow with the shard size."""

    def __init__(self, out: Path, name: str, capacity: int, eos_id: int):
        self.path, self.capacity, self.eos_id = out / name, capacity, eos_id
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.f = open(self.tmp, "wb", buffering=1 << 20)
        self.sha = hashlib.sha256()
        self.fill = self.documents = 0

    @property
    def room(self) -> int:
        return self.capacity - self.fill

    def write(self, tokens: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(tokens)).cast("B")
        self.f.write(data)
        self.sha.update(data)
        self.fill += len(tokens)
        self.documents += int(np.count_nonzero(tokens == self.eos_id))

    def finish(self) -> dict[str, Any]:
        """Durable under its final name (the caller syncs the directory); the manifest entry."""
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "tokens": self.fill, "documents": self.documents, "sha256": self.sha.hexdigest()}

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


class _Writer:
    """Streams train tokens into fixed-size shards and val tokens into the spill file."""

    def __init__(self, out: Path, settings: BuildSettings, eos_id: int, progress: _Progress, on_shard=None):
        self.out, self.s, self.eos_id, self.p, self.on_shard = out, settings, eos_id, progress, on_shard
        self.shard: ShardFile | None = None
        self.val = open(out / VAL_SPILL, "ab")

    def add_val(self, tokens: np.ndarray) -> None:
        self.val.write(tokens.tobytes())
        self.p.val_tokens += len(tokens)
        self.p.val_docs += 1

    def add_train_run(self, tokens: np.ndarray, ends: np.ndarray, doc_ids: np.ndarray, written: int = 0) -> None:
        """Append consecutive documents (each with EOS): ``tokens`` their concatenation, ``ends`` each one's
        end offset in it, ``doc_ids`` their raw stream indices; ``written`` tokens of the first one were
        written before (a resumed build). A full shard is flushed, mid-document if so."""
        pos = 0
        while pos < len(tokens):
            if self.shard is None:
                name = f"train_{len(self.p.train_shards):05d}.bin"
                self.shard = ShardFile(self.out, name, self.s.shard_tokens, self.eos_id)
            n = min(len(tokens) - pos, self.shard.room)
            self.shard.write(tokens[pos : pos + n])
            pos += n
            if not self.shard.room:
                # The stream position after this shard: the document the shard ends in, and how many of its
                # tokens are written (0 when the shard ends with it: then the next document, from its start).
                j = int(np.searchsorted(ends, pos))
                start = int(ends[j - 1]) if j else -written
                done = ends[j] == pos
                self.flush(next_doc=int(doc_ids[j]) + (1 if done else 0), skip=0 if done else pos - start)

    def flush(self, next_doc: int, skip: int) -> None:
        if self.shard is None:
            return
        self.p.train_shards.append(self.shard.finish())  # the progress record syncs the directory
        self.shard = None
        self.p.docs_read, self.p.skip_tokens = next_doc, skip
        self.val.flush()
        os.fsync(self.val.fileno())
        atomic_write_text(self.out / PROGRESS, json.dumps({"settings": asdict(self.s), "progress": asdict(self.p)}))
        if self.on_shard is not None:
            self.on_shard(self.out, len(self.p.train_shards))

    def close(self) -> None:
        if self.shard is not None:  # an error mid-shard: the next run starts this shard again
            self.shard.abort()
        self.val.close()


def _load_progress(out: Path, settings: BuildSettings) -> _Progress:
    """Progress of an interrupted build with the same settings (verified), or a fresh start."""
    path = out / PROGRESS
    if not path.is_file():
        return _Progress()
    saved = json.loads(path.read_text())
    if saved["settings"] != json.loads(json.dumps(asdict(settings))):
        raise DataError(
            f"{out} holds an unfinished build with different settings ({path}); "
            "re-run with the same arguments to resume it, or choose another --out"
        )
    p = _Progress(**saved["progress"])
    for s in p.train_shards:  # a finished shard is re-used only if its bytes are intact
        f = out / s["file"]
        if not f.is_file() or sha256_file(f) != s["sha256"]:
            raise DataError(f"finished shard {f} is missing or corrupt; delete {out} and rebuild")
    return p


def _clean_partial(out: Path, p: _Progress, itemsize: int) -> None:
    keep = {s["file"] for s in p.train_shards}
    for f in out.iterdir():
        if f.name.endswith(".tmp") or (f.name.startswith("train_") and f.name not in keep):
            f.unlink()
    spill = out / VAL_SPILL
    with open(spill, "ab") as fh:  # creates it when missing; drops val tokens written after the record
        fh.truncate(p.val_tokens * itemsize)


def build_shards(
    inputs: Sequence[str],
    tokenizer: str | Path,
    out: str | Path,
    workers: int = 1,
    shard_tokens: int = 1 << 24,
    val_docs: int = 0,
    val_every: int = 100,
    dedup: bool = False,
    min_chars: int = 0,
    text_field: str = "text",
    seq_len: int | None = None,
    dtype: str = "auto",
    progress: bool | None = None,
    on_shard: Callable[[Path, int], None] | None = None,
    allow_empty: bool = False,
) -> dict[str, Any]:
    """Build (or resume, or recognise as done) a shard directory; returns the manifest dict.

    ``on_shard(out, n)`` runs after the n-th train shard is durably recorded (monitoring, fault
    injection); ``allow_empty`` accepts a build without training tokens (one part of a job-array build).
    """
    tok = Tokenizer.load(tokenizer)
    out = Path(out)
    inputs = list(inputs) or sources.default_corpus_paths()
    srcs = sources.expand_inputs(inputs)  # fail fast, with the path named, before any output exists
    settings = make_settings(inputs, tok, shard_tokens=shard_tokens, val_docs=val_docs, val_every=val_every,
                             dedup=dedup, min_chars=min_chars, text_field=text_field, seq_len=seq_len, dtype=dtype)
    done = finished_build(out, settings)
    if done is not None:
        return done
    out.mkdir(parents=True, exist_ok=True)
    p = _load_progress(out, settings)
    _clean_partial(out, p, DTYPES[settings.dtype].itemsize)
    stats = sources.SourceStats()
    t0 = time.time()
    _run(settings, srcs, tok, out, p, stats, workers, progress, on_shard)
    manifest = _finalize(out, settings, tok, p, stats, time.time() - t0, allow_empty)
    return manifest


def make_settings(inputs: Sequence[str], tok: Tokenizer, shard_tokens: int = 1 << 24, val_docs: int = 0,
                  val_every: int = 100, dedup: bool = False, min_chars: int = 0, text_field: str = "text",
                  seq_len: int | None = None, dtype: str = "auto") -> BuildSettings:
    """The settings of a build of ``inputs`` with ``tok`` (the keyword arguments of :func:`build_shards`)."""
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens {shard_tokens}: must be positive")
    return BuildSettings(
        inputs=[str(i) for i in inputs], tokenizer_sha256=tok.fingerprint, dtype=dtype_for_vocab(tok.vocab_size, dtype),
        shard_tokens=int(shard_tokens), val_docs=int(val_docs), val_every=max(1, int(val_every)), dedup=bool(dedup),
        min_chars=int(min_chars), text_field=text_field, seq_len=seq_len,
    )


def finished_build(out: Path, settings: BuildSettings) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("build") != json.loads(json.dumps(asdict(settings))):
        raise DataError(
            f"{out} already holds a finished build with different settings; choose another --out "
            "or delete it to rebuild"
        )
    return manifest


def _run(settings, srcs, tok, out, p: _Progress, stats, workers: int, progress: bool | None, on_shard=None) -> None:
    seen: set[bytes] = set()
    resume_at, skip = p.docs_read, p.skip_tokens
    counters = {"raw": 0, "kept": 0, "dups": 0}

    def filtered() -> Iterator[tuple[int, bool, str]]:
        """(raw index, is_val, text) for documents that pass the filters; counters stay in sync."""
        for text in sources.iter_documents(srcs, text_field=settings.text_field, min_chars=settings.min_chars, stats=stats):
            i = counters["raw"]
            counters["raw"] += 1
            if settings.dedup:
                h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                if h in seen:
                    counters["dups"] += 1
                    continue
                seen.add(h)
            k = counters["kept"]
            counters["kept"] += 1
            is_val = bool(is_held_out(k, settings))
            yield i, is_val, text

    stream = filtered()
    if resume_at:  # fast-forward without tokenizing; the dedup set and counters are rebuilt on the way
        stream = _skip_until(stream, resume_at)

    writer = _Writer(out, settings, tok.eos_id, p, on_shard)
    bar = _progress_bar(progress)
    try:
        items = _with_meta(stream)
        for (meta, texts), (tokens, lengths) in _ordered_map_meta(items, workers, settings, tok):
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            ids = np.fromiter((i for i, _ in meta), dtype=np.int64, count=len(meta))
            run = 0  # documents [run, j) of the batch are consecutive train documents not yet written
            for j, (i, is_val) in enumerate(meta):
                if is_val or (i == resume_at and skip):
                    writer.add_train_run(tokens[offsets[run] : offsets[j]], offsets[run + 1 : j + 1] - offsets[run], ids[run:j])
                    run = j + 1
                    doc = tokens[offsets[j] : offsets[j + 1]]
                    if is_val:
                        writer.add_val(doc)
                    else:  # continue the document that spans the shard boundary
                        writer.add_train_run(doc[skip:], np.array([len(doc) - skip]), ids[j : j + 1], written=skip)
                        skip = 0
            writer.add_train_run(tokens[offsets[run] :], offsets[run + 1 :] - offsets[run], ids[run:])
            if bar is not None:
                bar.update(len(texts))
                bar.set_postfix(tokens=int(offsets[-1]), refresh=False)
        writer.flush(next_doc=counters["raw"], skip=0)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    p.kept_docs, p.dup_docs = counters["kept"], counters["dups"]


def _skip_until(stream, resume_at: int):
    """The stream from raw document index `resume_at` on (earlier items are consumed, not tokenized)."""
    for item in stream:
        if item[0] >= resume_at:
            yield item
            break
    yield from stream


def _with_meta(stream) -> Iterator[tuple[list[tuple[int, bool]], list[str]]]:
    meta: list[tuple[int, bool]] = []
    texts: list[str] = []
    size = 0
    for i, is_val, text in stream:
        meta.append((i, is_val))
        texts.append(text)
        size += len(text)
        # small batches (256 KiB): the pipeline fills fast and the last batch leaves no worker idle for long
        if len(texts) >= 256 or size >= 1 << 18:
            yield meta, texts
            meta, texts, size = [], [], 0
    if texts:
        yield meta, texts


def _ordered_map_meta(items, workers: int, settings: BuildSettings, tok: Tokenizer):
    """_ordered_map that carries each batch's metadata along."""
    metas: deque = deque()

    def texts_only():
        for meta, texts in items:
            metas.append(meta)
            yield texts

    for texts, result in _ordered_map(texts_only(), workers, str(tok.model_path), settings.dtype):
        yield (metas.popleft(), texts), result


def _progress_bar(progress: bool | None):
    if progress is None:
        progress = progress_enabled()
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(unit="doc", desc="build", dynamic_ncols=True)


def _finalize(out: Path, s: BuildSettings, tok: Tokenizer, p: _Progress, stats, seconds: float,
              allow_empty: bool = False) -> dict[str, Any]:
    itemsize = DTYPES[s.dtype].itemsize
    val_shards = split_spill(out, s, tok.eos_id, itemsize)
    train_tokens = sum(x["tokens"] for x in p.train_shards)
    if train_tokens == 0 and not allow_empty:
        raise DataError(
            f"no training tokens: every document of {', '.join(s.inputs)} was empty, filtered or held out "
            f"({stats.empty_skipped} empty, {stats.short_skipped} short, {p.dup_docs} duplicates)"
        )
    stats_all = {**stats.as_dict(), "kept_documents": p.kept_docs, "duplicate_documents": p.dup_docs}
    manifest = make_manifest(s, tok, p.train_shards, val_shards, stats_all, seconds)
    tok.save(out / "tokenizer")  # the shard dir describes itself: inspect/pretrain need only its path
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    for name in (PROGRESS, VAL_SPILL):
        (out / name).unlink(missing_ok=True)
    fsync_dir(out)
    return manifest


def make_manifest(s: BuildSettings, tok: Tokenizer, train: list[dict[str, Any]], val: list[dict[str, Any]],
                  stats: dict[str, int], seconds: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a finished build (``extra``: further top-level entries); refuses a ``seq_len`` longer
    than a split."""
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": s.dtype,
        "tokenizer": {
            "sha256": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
            "pad_id": tok.pad_id,
        },
        "splits": {"train": split_summary(train), "val": split_summary(val)},
        "stats": stats,
        "build": json.loads(json.dumps(asdict(s))),
        **(extra or {}),
        "seconds": round(seconds, 3),
    }
    manifest["fingerprint"] = manifest_fingerprint(manifest)
    if s.seq_len is not None:
        for split in ("train", "val"):
            n = manifest["splits"][split]["tokens"]
            if n and n < s.seq_len + 1:
                raise DataError(
                    f"--seq-len {s.seq_len} is longer than the data: the {split} split has {n} tokens "
                    f"(needs at least {s.seq_len + 1}); use a shorter --seq-len or more data"
                )
    return manifest


def is_held_out(k, s: BuildSettings):
    """Whether kept document ``k`` (an int, or an array of them) is a validation document: every
    ``val_every``-th kept one, until ``val_docs`` of them."""
    return (k % s.val_every == s.val_every - 1) & (k // s.val_every < s.val_docs)


def split_summary(shards: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "tokens": sum(x["tokens"] for x in shards),
        "documents": sum(x["documents"] for x in shards),
        "shards": shards,
    }


def split_spill(out: Path, s: BuildSettings, eos_id: int, itemsize: int) -> list[dict[str, Any]]:
    """Cut the validation spill into shards of shard_tokens (streamed in blocks, never loaded whole)."""
    spill = out / VAL_SPILL
    total = spill.stat().st_size // itemsize if spill.exists() else 0
    shards = []
    dtype = DTYPES[s.dtype]
    block = 1 << 20
    for idx, start in enumerate(range(0, total, s.shard_tokens)):
        shard = ShardFile(out, f"val_{idx:05d}.bin", s.shard_tokens, eos_id)
        end = min(start + s.shard_tokens, total)
        for a in range(start, end, block):
            shard.write(np.fromfile(spill, dtype=dtype, count=min(block, end - a), offset=a * itemsize))
        shards.append(shard.finish())
    return shards
