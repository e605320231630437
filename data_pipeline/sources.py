"""Stream documents (str) from raw corpora: text files, JSON lines, JSON arrays, Parquet, Hugging Face datasets.

Inputs are files, directories (recursive), globs, saved ``datasets`` directories (``path`` or ``path:split``)
and ``hf:PATH[:split]`` specs read with ``datasets.load_dataset(..., streaming=True)``. Order is deterministic
(listings and glob results are sorted) and memory stays flat: record formats are read line by line or batch
by batch; only a plain text file, which is one document, is read whole. Bad input raises :class:`DataError`.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
import random
import re
import sysconfig
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import zstandard

from lmforge.errors import DataError

# A file with one of these suffixes is one document. ".json" is deliberately absent: it holds records.
TEXT_SUFFIXES = frozenset(
    ".txt .text .md .markdown .rst .adoc .tex .py .pyi .c .h .cc .cpp .cxx .hpp .hh .cu .js .jsx .ts .tsx "
    ".java .kt .scala .go .rs .rb .php .pl .lua .swift .r .jl .hs .ml .sh .bash .zsh .sql .html .htm .xml "
    ".css .scss .yaml .yml .toml .ini .cfg".split()
)
RECORD_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
KINDS = ("text", "jsonl", "json", "parquet", "hf_dataset")  # Source.kind

_BATCH_ROWS = 1024  # Parquet / Arrow rows per batch: small enough to keep memory flat
_JSON_CHUNK = 1 << 20  # characters read at a time from a JSON array
_GLOB_CHARS = re.compile(r"[*?\[]")
_RANGE = re.compile(r"(?P<path>.+)#(?P<unit>bytes|row_groups)=(?P<start>\d+)-(?P<stop>\d+)")
_WS = re.compile(r"\s*")


@dataclass(frozen=True, slots=True)  # slots: a corpus of 100,000 files is 100,000 of these
class Source:
    """One readable input. ``split`` only applies to ``hf_dataset`` sources.

    ``start``/``stop`` select part of a large file (a job-array build splits one file over tasks):
    for uncompressed JSON lines the records whose first byte lies in ``[start, stop)`` (any offsets
    work: ranges that tile the file read every record exactly once), for Parquet the row groups
    ``[start, stop)``. Written as an input spec: ``PATH#bytes=START-STOP`` / ``PATH#row_groups=START-STOP``.
    """

    path: str
    kind: str
    compression: str | None = None
    split: str | None = None
    start: int | None = None
    stop: int | None = None

    @property
    def spec(self) -> str:
        """The input spec that expands to exactly this source."""
        if self.kind == "hf_dataset":
            saved = _saved_kind(Path(self.path))
            return self.path + (f":{self.split}" if self.split else "") if saved else \
                f"hf:{self.path}" + (f":{self.split}" if self.split else "")
        if self.start is None:
            return self.path
        unit = "row_groups" if self.kind == "parquet" else "bytes"
        return f"{self.path}#{unit}={self.start}-{self.stop}"


@dataclass
class SourceStats:
    files: int = 0
    documents: int = 0
    empty_skipped: int = 0
    short_skipped: int = 0
    invalid_utf8_docs: int = 0  # documents in which invalid bytes were replaced (U+FFFD)
    bytes_read: int = 0  # decompressed bytes for text/JSON; Arrow buffer bytes of the column for Parquet/datasets

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def default_corpus_paths() -> list[str]:
    """The embedded default corpus: every .py file of the running Python's standard library, sorted.

    It is real code and prose present on every machine, so demos and tests need no download. Its
    ``test/`` package is kept (more text); installed third-party packages and caches are not.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    if not files:
        raise DataError(f"no Python standard library sources found under {root}; pass --input explicitly")
    return [str(f) for f in sorted(files, key=lambda f: f.relative_to(root).parts)]


def expand_inputs(paths: Sequence[str | os.PathLike[str] | Source]) -> list[Source]:
    """Resolve input specs into sources, in input order; each directory or glob is expanded sorted
    (a :class:`Source`, already resolved, is kept as it is)."""
    out: list[Source] = []
    for spec in paths:
        out += [spec] if isinstance(spec, Source) else _expand_one(os.fspath(spec))
    return out


def _expand_one(spec: str) -> list[Source]:
    if spec.startswith("hf:"):
        return [_hf_source(spec)]
    if (m := _RANGE.fullmatch(spec)) and Path(m["path"]).is_file():
        return [_range_source(spec, m)]
    p = Path(spec)
    if p.is_dir():
        return _expand_dir(p)
    if p.is_file():
        return [_file_source(p, explicit=True)]
    if _GLOB_CHARS.search(spec):
        return _expand_glob(spec)
    if ":" in spec and _saved_kind(Path(spec.rsplit(":", 1)[0])):
        return [_saved_source(*spec.rsplit(":", 1))]
    if p.exists():
        raise DataError(f"{spec}: not a regular file or directory; pass files, directories or globs")
    raise DataError(f"{spec}: no such file or directory; check the path (inputs are files, dirs, globs or hf:PATH)")


def _file_source(p: Path, explicit: bool) -> Source | None:
    """The source for a file, or None for an unknown suffix found while listing (binaries, images ...)."""
    if not os.access(p, os.R_OK):
        raise DataError(f"{p}: not readable (permission denied); fix its permissions or leave it out")
    name = p.name.lower()
    inner, compression = Path(name).suffix, None
    if inner in COMPRESSION_SUFFIXES:
        compression = COMPRESSION_SUFFIXES[inner]
        inner = Path(name[: -len(inner)]).suffix
    kind = RECORD_SUFFIXES.get(inner) or ("text" if inner in TEXT_SUFFIXES or explicit else None)
    if kind == "parquet" and compression:
        raise DataError(f"{p}: compressed Parquet is not supported (Parquet compresses internally); decompress it")
    return Source(str(p), kind, compression) if kind else None


def _range_source(spec: str, m: re.Match[str]) -> Source:
    src = _file_source(Path(m["path"]), explicit=True)
    start, stop = int(m["start"]), int(m["stop"])
    want = "parquet" if m["unit"] == "row_groups" else "jsonl"
    if src.kind != want or (src.compression and start):
        raise DataError(f"{spec}: #{m['unit']}= ranges apply to {'Parquet' if want == 'parquet' else 'JSON lines'} "
                        "files only, and in a compressed file only from 0 (it cannot seek); drop the range")
    if start > stop:
        raise DataError(f"{spec}: range start {start} is after its stop {stop}")
    return Source(src.path, src.kind, src.compression, None, start, stop)


def _expand_dir(root: Path) -> list[Source]:
    if _saved_kind(root):
        return [_saved_source(str(root), None)]
    out: list[Source] = []
    _walk(root, out, set())
    if not out:
        raise DataError(
            f"{root}: directory holds no readable documents (known suffixes: text, .jsonl, .json, .parquet, "
            "optionally .gz/.zst); name other files explicitly"
        )
    return out


def _walk(d: Path, out: list[Source], seen: set[str]) -> None:
    real = os.path.realpath(d)
    if real in seen:  # a symlink loop
        return
    seen.add(real)
    try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"{d}: cannot list directory ({e.strerror}); fix its permissions or leave it out") from e
    for e in entries:
        if e.name.startswith("."):  # .git, .cache and friends are never corpus
            continue
        p = Path(e.path)
        if e.is_dir():
            if _saved_kind(p):
                out.append(_saved_source(e.path, None))
            else:
                _walk(p, out, seen)
        elif e.is_file() and (src := _file_source(p, explicit=False)):
            out.append(src)


def _expand_glob(pattern: str) -> list[Source]:
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        raise DataError(f"{pattern}: glob matched nothing; check the pattern (quote it so the shell leaves it alone)")
    # "data/*.log" names its suffix, so such files are read as text; "data/*" only picks known suffixes.
    suffix = Path(pattern).suffix
    explicit = bool(suffix) and not _GLOB_CHARS.search(suffix)
    out: dict[Source, None] = {}  # ordered set: "**" matches a directory and its files
    for m in matches:
        p = Path(m)
        if p.is_dir():
            out.update(dict.fromkeys(_expand_dir(p)))
        elif p.is_file() and not any(_saved_kind(a) for a in p.parents[:2]):
            if src := _file_source(p, explicit):
                out[src] = None
    if not out:
        raise DataError(f"{pattern}: glob matched no readable documents (only unknown suffixes); name them explicitly")
    return list(out)


def _saved_kind(d: Path) -> str | None:
    """'dataset' / 'dataset_dict' for a directory written by ``save_to_disk``, else None."""
    if (d / "dataset_dict.json").is_file():
        return "dataset_dict"
    if (d / "state.json").is_file() and (d / "dataset_info.json").is_file():
        return "dataset"
    return None


def _saved_source(path: str, split: str | None) -> Source:
    kind = _saved_kind(Path(path))
    if kind == "dataset" and split:
        raise DataError(f"{path}: is a single saved Dataset without splits; drop ':{split}'")
    if kind == "dataset_dict":
        splits = json.loads(Path(path, "dataset_dict.json").read_text()).get("splits", [])
        want = split or "train"
        if want not in splits:
            raise DataError(f"{path}: no split {want!r} (splits: {', '.join(splits)}); select one with {path}:SPLIT")
    return Source(path, "hf_dataset", None, split)


def _hf_source(spec: str) -> Source:
    path, split = spec[3:], None
    if not Path(path).exists() and ":" in path:
        path, split = path.rsplit(":", 1)
    if not Path(path).exists():
        raise DataError(
            f"{spec}: {path} does not exist; hf: sources must be local (a save_to_disk directory, a folder of "
            "data files or a loading script) because lmforge never downloads"
        )
    return _saved_source(path, split) if _saved_kind(Path(path)) else Source(path, "hf_dataset", None, split)


def source_bytes(src: Source) -> int:
    """The size of a source on disk (compressed files: compressed; a saved dataset: its files), at least 1."""
    if src.kind == "hf_dataset":
        p = Path(src.path)
        return max(1, sum(f.stat().st_size for f in p.rglob("*") if f.is_file())) if p.is_dir() else 1
    return max(1, os.path.getsize(src.path))


def split_source(src: Source, target: int) -> list[tuple[str, int]]:
    """One source as (input spec, bytes) pieces of about ``target`` bytes where its format can be split
    (uncompressed JSON lines by byte range, Parquet by row group); other sources are one piece."""
    size = source_bytes(src)
    if size <= target or src.compression or src.start is not None:
        return [(src.spec, size)]
    if src.kind == "jsonl":
        k = -(-size // target)
        cuts = [size * i // k for i in range(k + 1)]
        return [(f"{src.path}#bytes={a}-{b}", b - a) for a, b in zip(cuts[:-1], cuts[1:])]
    if src.kind == "parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(src.path).metadata
        out, start, acc = [], 0, 0
        for i in range(meta.num_row_groups):
            acc += max(1, meta.row_group(i).total_byte_size)
            if acc >= target or i == meta.num_row_groups - 1:
                out.append((f"{src.path}#row_groups={start}-{i + 1}", acc))
                start, acc = i + 1, 0
        return out or [(src.spec, size)]
    return [(src.spec, size)]


def sample_inputs(inputs: Sequence[str | os.PathLike[str]], read_bytes: int, seed: int = 0,
                  piece_bytes: int = 16 << 20) -> list[str]:
    """Input specs for about ``read_bytes`` of the inputs, spread over all of them: each input cut into
    pieces of about ``piece_bytes`` (files, byte ranges, row groups; of a compressed JSON-lines file, its
    first ``piece_bytes`` decompressed), a seeded random choice of those that fit, in input order. All of
    the inputs when they are no larger."""
    pieces: list[tuple[str, int]] = []
    for src in expand_inputs(inputs):
        if src.kind == "jsonl" and src.compression and src.start is None and source_bytes(src) > piece_bytes:
            pieces.append((f"{src.path}#bytes=0-{piece_bytes}", piece_bytes))  # a prefix: it cannot seek
        else:
            pieces += split_source(src, piece_bytes)
    if sum(w for _, w in pieces) <= read_bytes:
        return [spec for spec, _ in pieces]
    order = list(range(len(pieces)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for i in order:
        if total + pieces[i][1] > read_bytes:
            continue  # a piece that would overshoot; a smaller one may still fit
        chosen.append(i)
        total += pieces[i][1]
    if not chosen:  # every piece is larger than the budget: the smallest
        chosen = [min(range(len(pieces)), key=lambda i: pieces[i][1])]
    return [pieces[i][0] for i in sorted(chosen)]


def iter_documents(
    paths: Sequence[str | os.PathLike[str] | Source],
    text_field: str = "text",
    min_chars: int = 0,
    stats: SourceStats | None = None,
) -> Iterator[str]:
    """Yield every document of ``paths`` in order; empty ones and those under ``min_chars`` are counted and skipped."""
    stats = stats if stats is not None else SourceStats()
    for src in expand_inputs(paths):
        stats.files += 1
        for text, replaced in _read_guarded(src, text_field, stats):
            if text is None or not text.strip():
                stats.empty_skipped += 1
            elif len(text) < min_chars:
                stats.short_skipped += 1
            else:
                stats.documents += 1
                stats.invalid_utf8_docs += replaced
                yield text


def _read_guarded(src: Source, field: str, stats: SourceStats) -> Iterator[tuple[str | None, bool]]:
    """Read one source; low-level read failures become one-line DataErrors naming the file."""
    readers = {"text": _read_text, "jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet}
    try:
        yield from readers.get(src.kind, _read_hf)(src, field, stats)
    except DataError:
        raise
    except (OSError, EOFError, ValueError, zstandard.ZstdError) as e:
        what = f"{src.compression} " if src.compression else ""
        msg = " ".join(str(e).split())[:300]
        raise DataError(
            f"{src.path}: cannot read as {what}{src.kind} ({type(e).__name__}: {msg}); check the file is complete "
            "and in that format"
        ) from e


def _open(src: Source) -> IO[bytes]:
    if src.compression == "gzip":
        return gzip.open(src.path, "rb")
    f = open(src.path, "rb")
    if src.compression == "zstd":
        # read_across_frames: files made by concatenating .zst chunks (e.g. `pzstd`, `cat`) are common
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True))
    return f


def _decode(raw: bytes) -> tuple[str, bool]:
    """UTF-8 text and whether invalid bytes were replaced; a leading BOM is not content."""
    try:
        return raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8-sig", errors="replace"), True


def _read_text(src: Source, field: str, stats: SourceStats) -> Iterator[tuple[str | None, bool]]:
    with _open(src) as f:
        raw = f.read()  # one file is one document, so it has to be whole anyway
    stats.bytes_read += len(raw)
    yield _decode(raw)


def _read_jsonl(src: Source, field: str, stats: SourceStats) -> Iterator[tuple[str | None, bool]]:
    with _open(src) as f:
        if src.start is None:
            yield from _jsonl_lines(f, src.path, field, stats)
        else:
            yield from _jsonl_lines(_lines_starting_in(f, src.start, src.stop), src.path, field, stats, src.start)


def _lines_starting_in(f: IO[bytes], start: int, stop: int) -> Iterator[bytes]:
    """The lines of ``f`` whose first byte lies in ``[start, stop)``: the line that straddles ``start``
    belongs to the range before (the one it starts in)."""
    pos = start
    if start > 0:
        f.seek(start - 1)
        if f.read(1) != b"\n":
            pos += len(f.readline())  # the rest of a line that began before start
    while pos < stop:
        line = f.readline()
        if not line:
            return
        yield line
        pos += len(line)


def _jsonl_lines(f: Iterable[bytes], path: str, field: str, stats: SourceStats, offset: int | None = None):
    """Records of JSON lines; errors name the line (``offset``: a byte range's lines are named by byte offset)."""
    for lineno, raw in enumerate(f, 1):
        where = f"{path}:{lineno}" if offset is None else f"{path} (line at byte {offset})"
        if offset is not None:
            offset += len(raw)
        stats.bytes_read += len(raw)
        if not raw.strip():
            continue
        line, replaced = _decode(raw)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); fix or remove the line") from e
        text = _field(obj, field, where)
        # the bad bytes may sit in another field; only count documents that show a replacement
        yield text, replaced and text is not None and "\ufffd" in text


def _read_json(src: Source, field: str, stats: SourceStats) -> Iterator[tuple[str | None, bool]]:
    """A JSON array of objects (parsed incrementally), or JSON lines saved as .json."""
    with _open(src) as f:
        head = f.peek(64).removeprefix(codecs.BOM_UTF8).lstrip()
        if not head.startswith(b"["):
            yield from _jsonl_lines(f, src.path, field, stats)
            return
        text = io.TextIOWrapper(f, encoding="utf-8-sig", errors=_COUNTING_REPLACE)
        yield from _json_array(iter(lambda: text.read(_JSON_CHUNK), ""), src.path, field, stats)


def _json_array(chunks: Iterator[str], path: str, field: str, stats: SourceStats):
    """Yield the array's elements one by one; about one element plus one chunk is held in memory."""
    dec = json.JSONDecoder()
    buf, pos, line, state = "", 0, 1, "["
    seen, pending = _replacements(), 0
    while True:
        m = _WS.match(buf, pos)
        line, pos = line + buf.count("\n", pos, m.end()), m.end()
        if pos == len(buf):
            if (more := next(chunks, None)) is None:
                raise DataError(f"{path}:{line}: JSON array ends early (missing ']'); fix or re-export the file")
            stats.bytes_read += len(more)
            buf, pos = more, 0
            continue
        c = buf[pos]
        if state == "[":
            if c != "[":
                raise DataError(f"{path}:{line}: expected a JSON array or JSON lines; fix the file")
            pos, state = pos + 1, "value_or_end"
            continue
        if c == "]" and state != "value":  # after a comma a value must follow: "[1,]" is malformed
            return
        if state == "comma_or_end":
            if c != ",":
                raise DataError(f"{path}:{line}: malformed JSON (expected ',' or ']'); fix the array")
            pos, state = pos + 1, "value"
            continue
        obj, end, buf, pos = _decode_value(dec, buf, pos, chunks, path, line, stats)
        text = _field(obj, field, f"{path}:{line}")
        line, pos, state = line + buf.count("\n", pos, end), end, "comma_or_end"
        # bytes are decoded a chunk ahead of parsing, so pin replacements on the documents that show them
        now = _replacements()
        pending, seen = pending + now - seen, now
        hit = bool(pending) and text is not None and "\ufffd" in text
        pending = max(0, pending - text.count("\ufffd")) if hit else pending
        yield text, hit


def _decode_value(dec, buf: str, pos: int, chunks: Iterator[str], path: str, line: int, stats: SourceStats):
    """Decode the value at ``buf[pos]``, pulling more chunks while the buffer's end cuts it off."""
    while True:
        err = None
        try:
            obj, end = dec.raw_decode(buf, pos)
            if end < len(buf):  # a number right at the end might continue in the next chunk
                return obj, end, buf, pos
        except json.JSONDecodeError as e:
            # an error well inside the buffer is real; near its end (or an open string) it may be truncation
            if e.pos < len(buf) - 16 and not e.msg.startswith("Unterminated string"):
                raise DataError(f"{path}:{line + buf.count(chr(10), pos, e.pos)}: malformed JSON ({e.msg}); "
                                "fix or remove the array element") from e
            err = e
        parts, need = [buf[pos:]], max(_JSON_CHUNK, len(buf) - pos)  # grow geometrically: linear work
        while need > 0 and (more := next(chunks, None)) is not None:
            parts.append(more)
            need -= len(more)
            stats.bytes_read += len(more)
        if len(parts) == 1:  # end of file
            if err is None:
                return obj, end, buf, pos
            raise DataError(f"{path}:{line}: malformed JSON ({err.msg}); fix or remove the array element") from err
        buf, pos = "".join(parts), 0


_COUNTING_REPLACE = "lmforge-count-replace"
_replaced = threading.local()  # per thread, so streams read on other threads keep their own count


def _count_replace(e: UnicodeDecodeError) -> tuple[str, int]:
    """errors="replace" that also counts, so a JSON array can tell which documents had invalid bytes."""
    _replaced.n = _replacements() + 1
    return "\ufffd", e.end


def _replacements() -> int:
    return getattr(_replaced, "n", 0)


codecs.register_error(_COUNTING_REPLACE, _count_replace)


def _field(obj: Any, field: str, where: str) -> str | None:
    """The document text of a record; None (a null value) counts as an empty document."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with a {field!r} field, got {type(obj).__name__}")
    if field not in obj:
        keys = ", ".join(map(str, list(obj)[:20])) or "none"
        raise DataError(f"{where}: no {field!r} field (fields: {keys}); pass --text-field to choose another")
    value = obj[field]
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return _decode(value)[0]
    raise DataError(f"{where}: field {field!r} is a {type(value).__name__}, not a string; pass --text-field")


def _read_parquet(src: Source, field: str, stats: SourceStats) -> Iterator[tuple[str | None, bool]]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(src.path) as pf:
        _check_column(src.path, field, pf.schema_arrow.names)
        groups = None
        if src.start is not None:
            n = pf.metadata.num_row_groups
            if src.stop > n:
                raise DataError(f"{src.spec}: the file has {n} row groups; the range must end at or before {n}")
            groups = range(src.start, src.stop)
            if not groups:
                return
        batches = pf.iter_batches(batch_size=_BATCH_ROWS, columns=[field], row_groups=groups)
        yield from _arrow_rows(batches, src.path, field, stats)


def _read_hf(src: Source, field: str, stats: SourceStats) -> Iterator[tuple[str | None, bool]]:
    import datasets

    kind = _saved_kind(Path(src.path))
    if kind:  # load_from_disk memory-maps the Arrow files, so batches are read from disk as we go
        ds = datasets.load_from_disk(src.path)
        ds = ds[src.split or "train"] if kind == "dataset_dict" else ds
        _check_column(src.path, field, ds.column_names)
        ds = ds.select_columns([field])
    else:
        try:
            ds = datasets.load_dataset(src.path, split=src.split or "train", streaming=True)
        except (OSError, ValueError, ImportError) as e:
            msg = " ".join(str(e).split())[:300]
            raise DataError(f"hf:{src.path}: datasets cannot load it ({type(e).__name__}: {msg})") from e
        if ds.column_names is not None:  # unknown until read for some formats; then _arrow_rows checks
            _check_column(f"hf:{src.path}", field, ds.column_names)
    yield from _arrow_rows(ds.with_format("arrow").iter(batch_size=_BATCH_ROWS), src.path, field, stats)


def _check_column(where: str, field: str, names: Sequence[str]) -> None:
    if field not in names:
        raise DataError(f"{where}: no column {field!r} (columns: {', '.join(names)}); pass --text-field to choose one")


def _arrow_rows(batches: Iterable[Any], path: str, field: str, stats: SourceStats):
    """Rows of one string column from Arrow record batches / tables."""
    row = 0
    for batch in batches:
        _check_column(path, field, batch.schema.names)
        col = batch.column(field)
        stats.bytes_read += col.nbytes
        for value in col.to_pylist():
            row += 1
            if isinstance(value, bytes):
                yield _decode(value)
            elif value is None or isinstance(value, str):
                yield value, False
            else:
                raise DataError(f"{path}: row {row}: column {field!r} holds {type(value).__name__}, not strings; "
                                "pass --text-field")
