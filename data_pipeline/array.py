"""A build split into parts that run anywhere (SLURM array tasks, or by hand), then merged.

The merged shard directory holds the same token stream (every shard of a split, in manifest order)
as ``python -m data_pipeline build`` of the same inputs and settings on one machine; only the shard
boundaries differ. Three steps, each its own command:

1. **plan** (``python -m data_pipeline plan``): the inputs, in the one-machine build's order, are cut
   into N contiguous parts of about equal size — by file, and inside a large uncompressed JSON-lines
   file by byte range (records are assigned by the byte they start at), inside a large Parquet file by
   row group. A compressed file or a saved dataset is never split. ``plan.json`` and a copy of the
   tokenizer are written; the plan is a pure function of the inputs and settings, so planning again
   (to rerun failed parts) finds the same one, and a changed input is refused.
2. **build-part** (``python -m data_pipeline build-part OUT --part I``): an ordinary resumable build
   of part I into ``parts/IIIII/`` with no validation hold-out: it survives ``kill -9`` and a rerun
   continues it, and it is complete exactly when its ``manifest.json`` exists.
3. **merge** (``python -m data_pipeline merge OUT``): refuses while a part is incomplete (naming it),
   then writes ``manifest.json``, listing the parts' shards in place (``parts/IIIII/train_NNNNN.bin``).
   The validation hold-out (every ``val_every``-th kept document, up to ``val_docs``) depends on the
   documents of every part before, so only the merge can apply it: the first parts, which hold those
   documents, are re-cut into ``head/`` shards and the validation shards; the rest are not touched.

``--dedup`` is refused: dropping a duplicate needs every document before it (run it on one machine).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import build, sources
from data_pipeline.shards import DTYPES, MANIFEST, Manifest
from data_pipeline.tokenizer import Tokenizer
from lmforge.errors import DataError
from lmforge.io import atomic_write_text, fsync_dir
from lmforge.lock import exclusive

PLAN = "plan.json"
PARTS = "parts"
HEAD = "head"
TOKENIZER = "tokenizer"


# ---------------------------------------------------------------- 1. plan
def split_inputs(inputs: Sequence[str], parts: int) -> tuple[list[list[str]], list[int]]:
    """The inputs as at most ``parts`` contiguous lists of input specs of about equal bytes, and their bytes."""
    if parts < 1:
        raise DataError(f"--parts {parts}: must be positive")
    pieces: list[tuple[str, int]] = []
    # absolute paths: a part may run on another machine, from another directory
    srcs = [dataclasses.replace(s, path=os.path.abspath(s.path)) for s in sources.expand_inputs(inputs)]
    target = max(1, sum(sources.source_bytes(s) for s in srcs) // parts)
    for src in srcs:
        pieces += sources.split_source(src, target)
    total = sum(w for _, w in pieces) or 1
    out: list[list[str]] = [[]]
    weights = [0]
    done = 0
    for spec, w in pieces:
        # a new part starts once this one reached its share of the total
        if out[-1] and len(out) < parts and done >= total * len(out) / parts:
            out.append([])
            weights.append(0)
        out[-1].append(spec)
        weights[-1] += w
        done += w
    return out, weights


def plan_build(inputs: Sequence[str], tokenizer: str | Path, out: str | Path, parts: int, write: bool = True,
               **settings: Any) -> dict[str, Any]:
    """The plan of a job-array build (written to ``OUT/plan.json`` with the tokenizer unless ``write`` is
    False); an existing plan must be this one. ``settings``: the build options of ``build_shards``."""
    if settings.get("dedup"):
        raise DataError("--dedup cannot run as a job array: dropping a duplicate needs every document before it "
                        "on one machine; build without --dedup (or dedup the corpus first)")
    tok = Tokenizer.load(tokenizer)
    out = Path(out)
    inputs = list(inputs) or sources.default_corpus_paths()
    settings = build.make_settings(inputs, tok, **settings)
    specs, weights = split_inputs(inputs, parts)
    plan = {"format": "lmforge-build-plan", "settings": asdict(settings), "parts": specs, "bytes": weights,
            "files": _identities([spec for part in specs for spec in part])}
    plan = json.loads(json.dumps(plan))
    if (out / MANIFEST).is_file():
        build.finished_build(out, settings)  # the same build, already done: fine; another one: refused
        return plan
    if (out / PLAN).is_file():
        old = json.loads((out / PLAN).read_text())
        if old != plan:
            raise DataError(f"{out / PLAN} is the plan of another build ({plan_difference(old, plan)}); rerun with "
                            "the arguments that made it, or choose another --out")
        return plan
    if not write:
        return plan
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / TOKENIZER)  # every part and the merge read this copy: the user's may move
    atomic_write_text(out / PLAN, json.dumps(plan, indent=1))
    return plan


def plan_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two plans, for the user."""
    if old.get("settings") != new["settings"]:
        keys = [k for k in new["settings"] if old.get("settings", {}).get(k) != new["settings"][k]]
        return f"other settings: {', '.join(keys)}"
    if len(old.get("parts", [])) != len(new["parts"]):
        return f"{len(old.get('parts', []))} parts, this one {len(new['parts'])}: pass --parts/--array {len(old.get('parts', []))}"
    changed = [f for f, ident in new["files"].items() if old.get("files", {}).get(f) != ident]
    if changed:
        return f"{len(changed)} input file(s) changed since, e.g. {changed[0]}"
    return "another split of the inputs"


def _spec_path(spec: str) -> str:
    """The file or directory an input spec names (without its range or ``hf:``)."""
    return spec.split("#", 1)[0].removeprefix("hf:")


def _identities(specs: Sequence[str]) -> dict[str, list[int]]:
    """(size, mtime in ns) of every input file or directory a plan names: a changed input is refused."""
    out = {}
    for spec in specs:
        path = _spec_path(spec)
        if os.path.exists(path):
            st = os.stat(path)
            out[path] = [st.st_size, st.st_mtime_ns]
    return out


def check_inputs(plan: dict[str, Any], specs: Sequence[str]) -> None:
    """Refuse to build or merge from inputs that changed since the plan (size or modification time)."""
    now = _identities(specs)
    for path, ident in now.items():
        if plan.get("files", {}).get(path, ident) != ident:
            raise DataError(f"{path} changed since the build was planned (size or modification time); plan the "
                            "build again into a new --out")
    for path in map(_spec_path, specs):
        if path in plan.get("files", {}) and path not in now:
            raise DataError(f"{path} is gone since the build was planned; restore it or plan again into a new --out")


def planned_parts(out: str | Path) -> int | None:
    """The number of parts of the plan in ``out``, if there is one."""
    path = Path(out) / PLAN
    return len(json.loads(path.read_text())["parts"]) if path.is_file() else None


def load_plan(out: str | Path) -> dict[str, Any]:
    path = Path(out) / PLAN
    if not path.is_file():
        raise DataError(f"{path} does not exist: plan the build first (python -m data_pipeline plan ... --out {out})")
    return json.loads(path.read_text())


def part_dir(out: str | Path, index: int) -> Path:
    return Path(out) / PARTS / f"{index:05d}"


def part_states(out: str | Path, plan: dict[str, Any]) -> list[str]:
    """Per part: ``complete`` (its manifest exists), ``partial`` (started, e.g. killed) or ``missing``."""
    states = []
    for i in range(len(plan["parts"])):
        d = part_dir(out, i)
        states.append("complete" if (d / MANIFEST).is_file() else "partial" if d.is_dir() else "missing")
    return states


# ---------------------------------------------------------------- 2. one part
def build_part(out: str | Path, index: int, workers: int = 1,
               on_shard: Callable[[Path, int], None] | None = None) -> dict[str, Any]:
    """Build (or resume, or find complete) part ``index`` of the plan in ``OUT``."""
    out = Path(out)
    plan = load_plan(out)
    n = len(plan["parts"])
    if not 0 <= index < n:
        raise DataError(f"--part {index}: the plan in {out / PLAN} has parts 0 to {n - 1}")
    s = plan["settings"]
    tok_dir = out / TOKENIZER
    if Tokenizer.load(tok_dir).fingerprint != s["tokenizer_sha256"]:
        raise DataError(f"{tok_dir} is not the tokenizer {out / PLAN} was made with; restore it or plan again "
                        "into a new --out")
    check_inputs(plan, plan["parts"][index])
    d = part_dir(out, index)
    d.mkdir(parents=True, exist_ok=True)
    with exclusive(d / ".lock", f"part {index} of {out}"):  # two tasks on one part would delete each other's shards
        return build.build_shards(
            plan["parts"][index], tok_dir, d, workers=workers, shard_tokens=s["shard_tokens"], val_docs=0,
            min_chars=s["min_chars"], text_field=s["text_field"], dtype=s["dtype"], progress=False,
            on_shard=on_shard, allow_empty=True,
        )


# ---------------------------------------------------------------- 3. merge
def merge(out: str | Path, rerun_hint: str | None = None) -> dict[str, Any]:
    """Write ``OUT/manifest.json`` from the complete parts; refuses (naming them) while any is not."""
    out = Path(out)
    load_plan(out)
    with exclusive(out / ".merge.lock", f"the merge of {out}"):
        return _merge(out, rerun_hint)


def _merge(out: Path, rerun_hint: str | None) -> dict[str, Any]:
    plan = load_plan(out)
    s = build.BuildSettings(**plan["settings"])
    final = build.finished_build(out, s)
    if final is not None:
        return final
    states = part_states(out, plan)
    bad = [i for i, st in enumerate(states) if st != "complete"]
    if bad:
        shown = ", ".join(f"{i} ({states[i]})" for i in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        hint = rerun_hint or f"python -m data_pipeline build-part {out} --part N"
        raise DataError(f"{out}: {len(bad)} of {len(states)} parts are not complete: {shown}; run them again "
                        f"({hint}), then merge")
    tok = Tokenizer.load(out / TOKENIZER)
    if tok.fingerprint != s.tokenizer_sha256:
        raise DataError(f"{out / TOKENIZER} is not the tokenizer {out / PLAN} was made with; restore it or rebuild")
    manifests = []
    for i, specs in enumerate(plan["parts"]):
        m = Manifest(part_dir(out, i))
        expect = {"inputs": specs, "tokenizer_sha256": s.tokenizer_sha256, "dtype": s.dtype,
                  "shard_tokens": s.shard_tokens, "min_chars": s.min_chars, "text_field": s.text_field}
        got = m.data.get("build", {})
        if any(got.get(k) != v for k, v in expect.items()):
            raise DataError(f"{m.root} was built with other inputs or settings than part {i} of {out / PLAN}; "
                            f"delete {m.root} and run the part again")
        try:
            m.check_sizes("train")
        except DataError as e:
            raise DataError(f"{e}; part {i} is damaged: delete {m.root} and run it again") from None
        manifests.append(m)
    check_inputs(plan, [spec for part in plan["parts"] for spec in part])

    for f in [out / HEAD, out / build.VAL_SPILL, *out.glob("val_*.bin")]:  # an interrupted merge's leftovers
        shutil.rmtree(f) if f.is_dir() else f.unlink(missing_ok=True)
    head_end = s.val_docs * s.val_every  # every validation document is among the first head_end kept ones
    train, kept = [], 0
    head = _HeadWriter(out, s, tok.eos_id)
    try:
        for i, m in enumerate(manifests):
            n_kept = int(m.data["stats"]["kept_documents"])
            if kept < head_end:
                head.resplit(m, kept)
            else:
                train += [dict(sh, file=f"{PARTS}/{i:05d}/{sh['file']}") for sh in m.data["splits"]["train"]["shards"]]
            kept += n_kept
        head.close()
    except BaseException:
        head.abort()
        raise
    train = head.shards + train
    val = build.split_spill(out, s, tok.eos_id, DTYPES[s.dtype].itemsize)

    stats: dict[str, int] = {}
    for m in manifests:
        for k, v in m.data["stats"].items():
            stats[k] = stats.get(k, 0) + int(v)
    stats["files"] = len({_spec_path(spec) for part in plan["parts"] for spec in part})
    if not sum(x["tokens"] for x in train):
        raise DataError(f"no training tokens: every document of {', '.join(s.inputs)} was empty, filtered or held out "
                        f"({stats.get('empty_skipped', 0)} empty, {stats.get('short_skipped', 0)} short)")
    manifest = build.make_manifest(s, tok, train, val, stats, sum(float(m.data.get("seconds", 0)) for m in manifests),
                                   extra={"array": {"parts": len(manifests), "head_parts": head.parts}})
    fsync_dir(out)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    (out / build.VAL_SPILL).unlink(missing_ok=True)
    fsync_dir(out)
    return manifest


class _HeadWriter:
    """Re-cuts the first parts: validation documents to the spill file, the rest into ``head/`` shards."""

    def __init__(self, out: Path, s: build.BuildSettings, eos_id: int):
        self.out, self.s, self.eos = out, s, eos_id
        self.dtype = DTYPES[s.dtype]
        self.shard: build.ShardFile | None = None
        self.shards: list[dict[str, Any]] = []
        self.parts = 0
        (out / HEAD).mkdir(parents=True, exist_ok=True)
        self.val = open(out / build.VAL_SPILL, "wb")

    def resplit(self, m: Manifest, first_kept: int) -> None:
        """Route part ``m``'s documents (global kept indices from ``first_kept``) to val or head shards."""
        self.parts += 1
        k = first_kept
        carry = np.empty(0, dtype=self.dtype)
        for sh in m.shards("train"):
            data = np.fromfile(sh.path, dtype=self.dtype)
            if hashlib.sha256(memoryview(data).cast("B")).hexdigest() != sh.sha256:  # re-cut: its hash is not kept
                raise DataError(f"{sh.path}: sha256 mismatch with {m.root / MANIFEST} (corrupt); delete {m.root} and "
                                "run the part again")
            buf = np.concatenate([carry, data]) if len(carry) else data
            ends = np.flatnonzero(buf == self.eos) + 1  # every document ends with EOS
            starts = np.concatenate([[0], ends[:-1]])
            pos = 0
            for j in np.flatnonzero(build.is_held_out(k + np.arange(len(ends)), self.s)):
                self._train(buf[pos : starts[j]])
                self.val.write(buf[starts[j] : ends[j]].tobytes())
                pos = ends[j]
            done = ends[-1] if len(ends) else 0
            self._train(buf[pos:done])
            carry = buf[done:].copy()
            k += len(ends)
        if len(carry):
            raise DataError(f"{m.root}: its last document has no end-of-document token; delete {m.root} and run "
                            "the part again")

    def _train(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < len(tokens):
            if self.shard is None:
                name = f"train_{len(self.shards):05d}.bin"
                self.shard = build.ShardFile(self.out / HEAD, name, self.s.shard_tokens, self.eos)
            n = min(len(tokens) - pos, self.shard.room)
            self.shard.write(tokens[pos : pos + n])
            pos += n
            if not self.shard.room:
                self._flush()

    def _flush(self) -> None:
        if self.shard is not None:
            self.shards.append(dict(self.shard.finish(), file=f"{HEAD}/{self.shard.path.name}"))
            self.shard = None

    def close(self) -> None:
        self._flush()
        self.val.flush()
        os.fsync(self.val.fileno())
        self.val.close()
        fsync_dir(self.out / HEAD)

    def abort(self) -> None:
        if self.shard is not None:
            self.shard.abort()
        self.val.close()
