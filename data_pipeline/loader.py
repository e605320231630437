"""Deterministic, resumable, rank-sharded loader of packed token windows.

Samples: each shard set's token stream (documents separated by EOS) is cut into windows of
``seq_len + 1`` tokens that overlap by one token, so sample j is tokens ``[j*L, j*L + L + 1)`` and
every token is a prediction target exactly once per epoch. Windows cross document boundaries.

Global order: sample ``g`` of the global sequence depends only on (manifests, weights, seed,
seq_len) — never on the number of ranks. A micro-step consumes ``micro_batch * world`` consecutive
global samples; rank r takes its contiguous slice. The loader state is the global cursor, so a
run resumed on another world size (same global batch) sees the same samples per optimizer step.

Mixtures: the interleaving of several shard sets follows a fixed, seeded schedule of ``block``
slots (source counts by largest remainder of the weights), repeated. Each source walks its own
seeded permutation, epoch after epoch. All positions are computed in closed form, so
``load_state_dict`` is O(1): nothing is replayed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.shards import Manifest
from lmforge.errors import DataError

MAX_OPEN_SHARDS = 64  # files one loader keeps open (shared among its shard sets): far below any ulimit -n


class TokenStore:
    """Random access to one split of a shard set, each shard verified before its first use.

    At most ``max_open`` shard files are open at once (least recently used closed first): a 7B run
    reads ~8,000 shards and clusters often allow 1,024 open files per process. Reads are ``pread``
    calls on the open descriptors: no seek position is shared (safe across ``fork``), nothing is
    mapped (no ``vm.max_map_count`` to hit), and a shard that shrinks under a run is a DataError,
    not a SIGBUS.
    """

    def __init__(self, root: str | Path, split: str = "train", verify: bool = True, max_open: int = MAX_OPEN_SHARDS):
        if max_open < 1:
            raise DataError(f"max_open {max_open}: a token store needs at least one open shard file")
        self.manifest = Manifest(root)
        self.split = split
        self.shards = self.manifest.shards(split)
        self.manifest.check_sizes(split)  # cheap: catches truncation and missing files at start-up
        self.verify = verify
        self.max_open = max_open
        self.offsets = np.cumsum([0] + [s.tokens for s in self.shards])
        self._fds: OrderedDict[int, int] = OrderedDict()  # shard index -> descriptor, least recent first
        self._verified: set[int] = set()  # a reopened shard is not hashed again

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])

    def _fd(self, i: int) -> int:
        fd = self._fds.get(i)
        if fd is not None:
            self._fds.move_to_end(i)
            return fd
        s = self.shards[i]
        if self.verify and i not in self._verified:
            if problem := self.manifest.verify_shard(s):
                # The full hash runs once per shard per process, before any of its tokens is used.
                raise DataError(f"refusing to train on a damaged shard: {problem}; rebuild or restore it")
            self._verified.add(i)
        if len(self._fds) >= self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        try:
            fd = os.open(s.path, os.O_RDONLY)
        except OSError as e:
            todo = (f"raise `ulimit -n` (this store keeps at most {self.max_open} shard files open)"
                    if e.errno in (errno.EMFILE, errno.ENFILE) else "check its permissions or restore it")
            raise DataError(f"cannot open shard {s.path}: {e.strerror}; {todo}") from None
        self._fds[i] = fd
        return fd

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as int64, across shard boundaries."""
        dtype = self.manifest.dtype
        out = np.empty(length, dtype=np.int64)
        pos = 0
        i = int(np.searchsorted(self.offsets, start, side="right") - 1)
        while pos < length:
            local = start + pos - int(self.offsets[i])
            n = min(length - pos, self.shards[i].tokens - local)
            data = os.pread(self._fd(i), n * dtype.itemsize, local * dtype.itemsize)
            if len(data) != n * dtype.itemsize:  # a regular file returns all of it unless it ends first
                raise DataError(
                    f"shard {self.shards[i].path} ends before its manifest size (read {len(data)} of "
                    f"{n * dtype.itemsize} bytes at token {local}): it changed during the run; rebuild or restore it"
                )
            out[pos : pos + n] = np.frombuffer(data, dtype=dtype)
            pos += n
            i += 1
        return out

    def close(self) -> None:
        """Close the open shard files (a later read reopens what it needs)."""
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # also at interpreter exit, when modules may be gone
            self.close()


def _rng(*key: int | str) -> np.random.Generator:
    """A generator seeded by a tuple of ints/strings (stable across processes and machines)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class _Source:
    """One shard set: a seeded permutation of its windows per epoch."""

    def __init__(self, store: TokenStore, seq_len: int, seed: int, index: int):
        self.store, self.seq_len, self.seed, self.index = store, seq_len, seed, index
        self.n = (store.tokens - 1) // seq_len
        if self.n <= 0:
            raise DataError(
                f"seq_len {seq_len} is longer than the data: {store.manifest.root} ({store.split}) has "
                f"{store.tokens} tokens, one sample needs {seq_len + 1}; use a shorter seq_len or more data"
            )
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def window(self, local: int, shuffle: bool = True) -> np.ndarray:
        epoch, q = divmod(local, self.n)
        if shuffle:
            if epoch != self._perm_epoch:
                self._perm = _rng("perm", self.seed, self.index, epoch).permutation(self.n)
                self._perm_epoch = epoch
            assert self._perm is not None
            q = int(self._perm[q])
        return self.store.read(q * self.seq_len, self.seq_len + 1)


class _Schedule:
    """Which source serves global sample g, and its index within that source, in O(1)."""

    def __init__(self, weights: Sequence[float], seed: int, block: int = 1000):
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or np.any(w < 0) or w.sum() <= 0:
            raise DataError(f"mixture weights {list(weights)}: need non-negative weights with a positive sum")
        w = w / w.sum()
        block = block if len(w) > 1 else 1
        counts = np.floor(w * block).astype(np.int64)
        # largest remainder: the leftover slots go to the sources that lost the most to rounding
        for i in np.argsort(-(w * block - counts), kind="stable")[: block - counts.sum()]:
            counts[i] += 1
        slots = np.repeat(np.arange(len(w)), counts)
        self.slots = _rng("mix", seed).permutation(slots) if len(w) > 1 else slots
        self.counts = counts
        self.block = block
        # before[k, s] = how many of the first k slots belong to source s
        onehot = np.zeros((block + 1, len(w)), dtype=np.int64)
        onehot[np.arange(1, block + 1), self.slots] = 1
        self.before = np.cumsum(onehot, axis=0)

    def locate(self, g: int) -> tuple[int, int]:
        b, k = divmod(g, self.block)
        s = int(self.slots[k])
        return s, b * int(self.counts[s]) + int(self.before[k, s])


class ShardLoader:
    """Micro-batches ``(micro_batch, seq_len + 1)`` of int64 token ids for one data-parallel rank.

    ``shards`` is one shard directory or several with ``weights`` (a mixture). Every shard set
    must come from the same tokenizer; ``tokenizer_sha256`` (when given) must match it too.
    ``max_open`` bounds the shard files kept open, shared among the shard sets.
    """

    def __init__(
        self,
        shards: str | Path | Sequence[str | Path],
        seq_len: int,
        micro_batch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        weights: Sequence[float] | None = None,
        split: str = "train",
        tokenizer_sha256: str | None = None,
        verify: bool = True,
        max_open: int = MAX_OPEN_SHARDS,
    ):
        roots = [shards] if isinstance(shards, str | Path) else list(shards)
        if not roots:
            raise DataError("no shard directories given: pass at least one built with `python -m data_pipeline build`")
        if weights is not None and len(weights) != len(roots):
            raise DataError(f"{len(roots)} shard directories but {len(weights)} weights: give one weight per directory")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} outside world size {world_size}")
        self.seq_len, self.micro_batch, self.seed = int(seq_len), int(micro_batch), int(seed)
        self.rank, self.world_size = rank, world_size
        stores = [TokenStore(r, split, verify, _per_store(max_open, len(roots))) for r in roots]
        _check_tokenizers(stores, tokenizer_sha256)
        self.sources = [_Source(s, self.seq_len, self.seed, i) for i, s in enumerate(stores)]
        self.schedule = _Schedule(weights or [1.0] * len(roots), self.seed)
        self.fingerprint = _fingerprint([s.manifest.fingerprint for s in stores], weights, split)
        self.cursor = 0  # global samples consumed by all ranks together
        self.skips: list[tuple[int, int]] = []  # global sample ranges never served (see add_skip)

    @property
    def samples_per_epoch(self) -> int:
        return sum(s.n for s in self.sources)

    def sample(self, g: int) -> np.ndarray:
        """Global sample g (the same on every rank and world size)."""
        s, local = self.schedule.locate(g)
        return self.sources[s].window(local)

    def add_skip(self, start: int, end: int) -> None:
        """Never serve global samples ``[start, end)``: the cursor jumps over them (a loss-spike rollback's
        data, or ranges a user leaves out). Both ends are multiples of micro batch x ranks, so the cursor
        stays on a step boundary."""
        unit = self.micro_batch * self.world_size
        if start % unit or end % unit or not 0 <= start < end:
            raise DataError(f"skip range [{start}, {end}) of global samples: both ends must be multiples of micro "
                            f"batch x ranks = {unit} (give whole steps: multiples of the global batch)")
        self.skips = sorted({*self.skips, (int(start), int(end))})

    def next_batch(self) -> np.ndarray:
        for a, b in self.skips:  # sorted: a jump may land in a later range
            if a <= self.cursor < b:
                self.cursor = b
        start = self.cursor + self.rank * self.micro_batch
        batch = np.stack([self.sample(start + i) for i in range(self.micro_batch)])
        self.cursor += self.micro_batch * self.world_size
        return batch

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "cursor": self.cursor,
            "epoch": self.cursor // self.samples_per_epoch,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any], allow_data_change: bool = False) -> None:
        for key in ("seed", "seq_len"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"loader state has {key}={state[key]} but this loader uses {getattr(self, key)}: "
                    "resume with the same data settings"
                )
        if state["fingerprint"] != self.fingerprint and not allow_data_change:
            raise DataError(
                "the shards differ from the ones this run was trained on (manifest fingerprint changed); "
                "resume with the original shards or allow a data change explicitly"
            )
        step = self.micro_batch * self.world_size
        if state["cursor"] % step:
            raise DataError(
                f"loader cursor {state['cursor']} is not a multiple of micro_batch x world_size = {step}: "
                "keep the global batch size when resuming on another number of ranks"
            )
        self.cursor = int(state["cursor"])


def eval_batches(
    shards: str | Path | Sequence[str | Path],
    seq_len: int,
    micro_batch: int,
    rank: int = 0,
    world_size: int = 1,
    max_samples: int | None = None,
    split: str = "val",
    tokenizer_sha256: str | None = None,
    max_open: int = MAX_OPEN_SHARDS,
    verify: bool = True,
) -> Iterator[np.ndarray]:
    """Validation windows in order, spread evenly over the split when ``max_samples`` is smaller
    than it; every rank gets the same count. The shard files are closed when the pass ends.
    ``verify``: hash each shard before its first use in this pass (training verifies once per job instead)."""
    roots = [shards] if isinstance(shards, str | Path) else list(shards)
    held = [r for r in roots if Manifest(r).tokens(split) > 0]
    stores = [TokenStore(r, split, verify, _per_store(max_open, len(held))) for r in held]
    if not stores:
        raise DataError(f"no '{split}' tokens in {', '.join(map(str, roots))}: build with --val-docs N to evaluate")
    _check_tokenizers(stores, tokenizer_sha256)
    srcs = [_Source(st, seq_len, 0, i) for i, st in enumerate(stores)]
    bounds = np.cumsum([0] + [src.n for src in srcs])  # window j lives in srcs[searchsorted(bounds, j)]
    total = int(bounds[-1])
    n = total if max_samples is None else min(total, max_samples)
    per_step = micro_batch * world_size
    n -= n % per_step
    if n == 0:
        raise DataError(
            f"the '{split}' split holds {total} windows of {seq_len + 1} tokens, fewer than one eval step "
            f"(micro_batch {micro_batch} x {world_size} ranks); hold out more documents or lower seq_len"
        )

    # n windows spread evenly over the split (not its first documents only), in order
    picks = (np.arange(n, dtype=np.int64) * total) // n

    def window(j: int) -> np.ndarray:
        i = int(np.searchsorted(bounds, j, side="right") - 1)
        return srcs[i].window(j - int(bounds[i]), shuffle=False)

    try:
        for start in range(0, n, per_step):
            first = start + rank * micro_batch
            yield np.stack([window(int(picks[k])) for k in range(first, first + micro_batch)])
    finally:  # also when the caller stops early: evaluation every N steps must not pile up open files
        for st in stores:
            st.close()


def _per_store(max_open: int, stores: int) -> int:
    """One loader's open-file budget split among its shard sets (at least one file each)."""
    return max(1, max_open // max(1, stores))


def _check_tokenizers(stores: list[TokenStore], expected: str | None) -> None:
    for st in stores:
        got = st.manifest.tokenizer_sha256
        want = expected or stores[0].manifest.tokenizer_sha256
        if got != want:
            raise DataError(
                f"shards in {st.manifest.root} were built with tokenizer {got[:12]}, but this run uses "
                f"tokenizer {want[:12]}: rebuild the shards with the run's tokenizer or use matching shards"
            )


def _fingerprint(parts: list[str], weights: Sequence[float] | None, split: str) -> str:
    return hashlib.sha256(repr((parts, list(weights) if weights else None, split)).encode()).hexdigest()
