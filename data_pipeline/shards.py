"""The shard contract between ``data_pipeline`` and ``pretrain``.

A shard directory holds ``manifest.json`` and flat little-endian token files. The manifest is the
completeness marker: it is written last (temp file + fsync + rename), so a directory without one is
an unfinished build and is never read as data.

manifest.json::

    {"format": "lmforge-shards", "format_version": 1, "dtype": "uint16",
     "tokenizer": {"sha256": ..., "vocab_size": ..., "eos_id": ...},
     "splits": {"train": {"tokens": T, "documents": D, "shards": [
                    {"file": "train_00000.bin", "tokens": n, "documents": d, "sha256": h}, ...]},
                "val": {...}},
     "fingerprint": sha256 over tokenizer hash + every shard hash, ...}

A shard's ``file`` is a path relative to the directory. The data is the **token stream** of a split: its
shards' tokens in manifest order. Shard boundaries are not part of it: a job-array build
(``data_pipeline/array.py``; its manifest has an ``"array"`` entry and lists ``parts/NNNNN/train_*.bin``
and ``head/train_*.bin``) holds the same stream as a one-machine build of the same inputs and settings,
cut into other shards, so its ``fingerprint`` (which hashes the shards) differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import DataError

FORMAT = "lmforge-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int, requested: str = "auto") -> str:
    """uint16 when every id fits, else uint32; a too-small requested dtype is an error."""
    fits16 = vocab_size <= 2**16
    if requested == "auto":
        return "uint16" if fits16 else "uint32"
    if requested not in DTYPES:
        raise DataError(f"--dtype {requested}: expected auto, uint16 or uint32")
    if requested == "uint16" and not fits16:
        raise DataError(
            f"tokenizer vocab size {vocab_size} does not fit --dtype uint16 (max 65536 ids); "
            "use --dtype uint32 or auto"
        )
    return requested


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_fingerprint(manifest: dict[str, Any]) -> str:
    """Identity of the data: tokenizer + dtype + every shard's hash, in order."""
    h = hashlib.sha256()
    h.update(manifest["tokenizer"]["sha256"].encode())
    h.update(manifest["dtype"].encode())
    for split in sorted(manifest["splits"]):
        for s in manifest["splits"][split]["shards"]:
            h.update(f"{split}/{s['file']}:{s['sha256']}".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    tokens: int
    documents: int
    sha256: str


class Manifest:
    """A read-only view of ``manifest.json`` with path resolution and integrity checks."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not self.root.is_dir():
            raise DataError(f"shard directory {self.root} does not exist: run `python -m data_pipeline build`")
        if not path.is_file():
            raise DataError(
                f"{self.root} has no {MANIFEST}: the build is unfinished or this is not a shard directory; "
                "re-run `python -m data_pipeline build` with the same --out to complete it"
            )
        try:
            self.data: dict[str, Any] = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); rebuild the shards") from None
        if self.data.get("format") != FORMAT or self.data.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{path}: unsupported shard format {self.data.get('format')!r} v{self.data.get('format_version')!r} "
                f"(this lmforge reads {FORMAT} v{FORMAT_VERSION}); rebuild the shards"
            )

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.data["dtype"]]

    @property
    def tokenizer_sha256(self) -> str:
        return self.data["tokenizer"]["sha256"]

    @property
    def vocab_size(self) -> int:
        return int(self.data["tokenizer"]["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.data["tokenizer"]["eos_id"])

    @property
    def fingerprint(self) -> str:
        return self.data["fingerprint"]

    def splits(self) -> list[str]:
        return list(self.data["splits"])

    def shards(self, split: str = "train") -> list[ShardInfo]:
        if split not in self.data["splits"]:
            raise DataError(f"{self.root / MANIFEST} has no '{split}' split (has: {', '.join(self.splits())})")
        return [
            ShardInfo(self.root / s["file"], int(s["tokens"]), int(s["documents"]), s["sha256"])
            for s in self.data["splits"][split]["shards"]
        ]

    def tokens(self, split: str = "train") -> int:
        return sum(s.tokens for s in self.shards(split)) if split in self.data["splits"] else 0

    def check_sizes(self, split: str = "train") -> None:
        """Cheap check (stat only) that every shard file exists with the manifest's byte size."""
        for s in self.shards(split):
            expected = s.tokens * self.dtype.itemsize
            if not s.path.is_file():
                raise DataError(f"shard {s.path} listed in {self.root / MANIFEST} is missing; rebuild or restore it")
            actual = s.path.stat().st_size
            if actual != expected:
                raise DataError(
                    f"shard {s.path} is {actual} bytes, manifest says {expected}: truncated or overwritten; "
                    "rebuild it (re-run build) or restore it"
                )

    def verify_shard(self, s: ShardInfo) -> str | None:
        """None when the shard is intact, else a one-line description of what is wrong."""
        if not s.path.is_file():
            return f"{s.path}: missing"
        expected = s.tokens * self.dtype.itemsize
        if s.path.stat().st_size != expected:
            return f"{s.path}: {s.path.stat().st_size} bytes, expected {expected} (truncated)"
        if sha256_file(s.path) != s.sha256:
            return f"{s.path}: sha256 mismatch (corrupt)"
        return None

    def verify_tokenizer(self) -> str | None:
        """None when the tokenizer copy next to the shards is the manifest's (its sha256), else what is wrong."""
        model = self.root / "tokenizer" / "tokenizer.model"
        if not model.is_file():
            return f"{model}: missing (the tokenizer the shards were built with)"
        if sha256_file(model) != self.tokenizer_sha256:
            return f"{model}: sha256 mismatch with {self.root / MANIFEST} (corrupt or replaced tokenizer)"
        return None

    def verify(self) -> list[str]:
        """Re-hash every file the manifest depends on (the tokenizer copy and every shard of every split);
        a list of problems (empty when all is well)."""
        problems = [p] if (p := self.verify_tokenizer()) else []
        return problems + [p for split in self.splits() for s in self.shards(split) if (p := self.verify_shard(s))]
