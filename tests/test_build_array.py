"""The job-array build without SLURM (plan → build-part × N → merge): the same token stream as one machine.

The SLURM run of the same steps (an array of 4 over 2 nodes, a task killed and rerun) is in
tests/test_slurm_build.py.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipeline import array
from data_pipeline.build import build_shards
from data_pipeline.cli import main as cli_main
from data_pipeline.loader import ShardLoader
from data_pipeline.shards import Manifest
from data_pipeline.sources import iter_documents
from lmforge.errors import DataError

SETTINGS = dict(shard_tokens=3_000, val_docs=12, val_every=7, min_chars=20)


def stream(root, split: str = "train") -> np.ndarray:
    m = Manifest(root)
    return np.concatenate([np.fromfile(s.path, dtype=m.dtype) for s in m.shards(split)])


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory, stdlib_files):
    """Text files, a large JSON-lines file (split by byte range), a Parquet file of many row groups (split
    by row group) and a .zst JSON-lines file (never split), from the stdlib's sources."""
    d = tmp_path_factory.mktemp("mixed")
    texts = [open(f, encoding="utf-8").read() for f in stdlib_files[:150]]
    rng = random.Random(0)
    paras = [p for t in texts for p in t.split("\n\n") if p.strip()]
    rng.shuffle(paras)
    (d / "a_text").mkdir()
    for i, t in enumerate(texts[:20]):
        (d / "a_text" / f"{i:02d}.txt").write_text(t)
    with open(d / "b_big.jsonl", "w") as f:
        for p in paras[:3000]:
            f.write(json.dumps({"text": p}) + "\n")
    table = pa.table({"text": paras[3000:5000]})
    pq.write_table(table, d / "c_rows.parquet", row_group_size=100)
    data = "".join(json.dumps({"text": p}) + "\n" for p in paras[5000:6000]).encode()
    (d / "d_small.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    return d


@pytest.fixture(scope="module")
def one_machine(tmp_path_factory, mixed_corpus, tokenizer_dir):
    out = tmp_path_factory.mktemp("one") / "shards"
    build_shards([str(mixed_corpus)], tokenizer_dir, out, workers=1, **SETTINGS)
    return out


def test_byte_ranges_tile_a_jsonl_file_whatever_the_cuts(tmp_path):
    lines = [json.dumps({"text": f"record {i} " + "x" * (i % 37)}) for i in range(500)]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    size = path.stat().st_size
    want = list(iter_documents([str(path)]))
    rng = random.Random(1)
    for _ in range(20):  # cuts anywhere: mid-line, on a newline, at a line start, repeated
        cuts = sorted({0, size, *(rng.randrange(size + 1) for _ in range(rng.randrange(1, 12)))})
        got = [d for a, b in zip(cuts[:-1], cuts[1:]) for d in iter_documents([f"{path}#bytes={a}-{b}"])]
        assert got == want, cuts


def test_row_group_ranges_and_bad_ranges(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(50)]}), path, row_group_size=10)
    assert list(iter_documents([f"{path}#row_groups=1-3"])) == [f"row {i}" for i in range(10, 30)]
    with pytest.raises(DataError, match="has 5 row groups"):
        list(iter_documents([f"{path}#row_groups=2-9"]))
    with pytest.raises(DataError, match="JSON lines files only"):
        list(iter_documents([f"{path}#bytes=0-10"]))


def test_parts_merge_to_the_one_machine_stream(tmp_path, mixed_corpus, tokenizer_dir, one_machine, capsys):
    out = tmp_path / "arr"
    base = ["--input", str(mixed_corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out),
            "--shard-tokens", "3000", "--val-docs", "12", "--val-every", "7", "--min-chars", "20"]
    assert cli_main(["plan", *base, "--parts", "6"]) == 0
    plan = array.load_plan(out)
    specs = [s for part in plan["parts"] for s in part]
    assert len(plan["parts"]) == 6
    assert any("#bytes=" in s for s in specs) and any("#row_groups=" in s for s in specs)  # large files were split
    assert any(s.endswith(".zst") for s in specs)
    for i in reversed(range(6)):  # any order, any machine
        assert cli_main(["build-part", str(out), "--part", str(i), "--workers", "1"]) == 0
    assert cli_main(["merge", str(out)]) == 0
    m, ref = Manifest(out), Manifest(one_machine)
    for split in ("train", "val"):
        assert np.array_equal(stream(out, split), stream(one_machine, split))
        assert m.data["splits"][split]["documents"] == ref.data["splits"][split]["documents"]
    assert [s.tokens for s in m.shards()] != [s.tokens for s in ref.shards()]  # boundaries differ: allowed
    # validation documents come from the first 12 x 7 kept ones: part 0 (17 files) and part 1 were re-cut
    assert m.data["array"] == {"parts": 6, "head_parts": 2}
    for k in ("documents", "empty_skipped", "short_skipped", "kept_documents", "files"):
        assert m.data["stats"][k] == ref.data["stats"][k], k
    # what training reads: inspect --verify and the loader accept it, and the windows are the same
    assert cli_main(["inspect", str(out), "--verify"]) == 0
    assert "verified" in capsys.readouterr().out
    a = ShardLoader([str(out)], seq_len=32, micro_batch=4, seed=3)
    b = ShardLoader([str(one_machine)], seq_len=32, micro_batch=4, seed=3)
    for _ in range(5):
        assert np.array_equal(a.next_batch(), b.next_batch())
    # merging again, or planning the same build again, changes nothing
    before = (out / "manifest.json").read_bytes()
    assert cli_main(["merge", str(out)]) == 0 and (out / "manifest.json").read_bytes() == before
    assert cli_main(["plan", *base, "--parts", "6"]) == 0


def test_validation_spread_over_several_parts(tmp_path, mixed_corpus, tokenizer_dir):
    """Held-out documents in the first three parts: the merge re-cuts all three."""
    kw = dict(SETTINGS, val_docs=400, val_every=5)
    ref = tmp_path / "ref"
    build_shards([str(mixed_corpus)], tokenizer_dir, ref, workers=1, **kw)
    out = tmp_path / "arr"
    plan = array.plan_build([str(mixed_corpus)], tokenizer_dir, out, 8, **kw)
    for i in range(len(plan["parts"])):
        array.build_part(out, i)
    m = array.merge(out)
    assert m["array"]["head_parts"] >= 3
    for split in ("train", "val"):
        assert np.array_equal(stream(out, split), stream(ref, split))


def test_merge_refuses_incomplete_parts_and_a_changed_plan(tmp_path, mixed_corpus, tokenizer_dir):
    out = tmp_path / "arr"
    args = ([str(mixed_corpus)], tokenizer_dir, out, 4)
    array.plan_build(*args, **SETTINGS)
    array.build_part(out, 0)
    (array.part_dir(out, 2)).mkdir(parents=True)  # started, never finished
    with pytest.raises(DataError, match=r"3 of 4 parts are not complete: 1 \(missing\), 2 \(partial\), 3 \(missing\)"):
        array.merge(out)
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="plan of another build"):
        array.plan_build(*args, **dict(SETTINGS, min_chars=5))
    with pytest.raises(DataError, match="--dedup cannot run as a job array"):
        array.plan_build(*args, **SETTINGS, dedup=True)
    with pytest.raises(DataError, match="parts 0 to 3"):
        array.build_part(out, 4)
    with pytest.raises(DataError, match=r"4 parts, this one 3: pass --parts/--array 4"):
        array.plan_build(*args[:3], 3, write=False, **SETTINGS)  # also a dry run compares with the plan


def test_a_part_is_built_by_one_process_at_a_time_and_changed_inputs_are_refused(tmp_path, mixed_corpus,
                                                                                  tokenizer_dir):
    import os

    from lmforge.errors import LmforgeError
    from lmforge.lock import exclusive

    corpus = tmp_path / "c"
    corpus.mkdir()
    for f in sorted((mixed_corpus / "a_text").iterdir())[:8]:
        (corpus / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "arr"
    array.plan_build([str(corpus)], tokenizer_dir, out, 4, **SETTINGS)
    array.part_dir(out, 1).mkdir(parents=True)
    with exclusive(array.part_dir(out, 1) / ".lock", "a test"):  # a task still building part 1
        with pytest.raises(LmforgeError, match="another process is working on part 1"):
            array.build_part(out, 1)
    for i in range(4):
        array.build_part(out, i)
    victim = sorted(corpus.iterdir())[5]
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, edited later
    with pytest.raises(DataError, match=f"{victim.name} changed since the build was planned"):
        array.merge(out)
    with pytest.raises(DataError, match="1 input file.s. changed since"):
        array.plan_build([str(corpus)], tokenizer_dir, out, 4, **SETTINGS)


def test_a_damaged_shard_of_a_re_cut_part_is_refused_not_rehashed(tmp_path, mixed_corpus, tokenizer_dir):
    out = tmp_path / "arr"
    plan = array.plan_build([str(mixed_corpus)], tokenizer_dir, out, 4, **SETTINGS)
    for i in range(len(plan["parts"])):
        array.build_part(out, i)
    shard = sorted(array.part_dir(out, 0).glob("train_*.bin"))[1]  # part 0 holds validation documents
    data = bytearray(shard.read_bytes())
    data[10] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train_00001.bin: sha256 mismatch .* delete .*00000 and run the part again"):
        array.merge(out)
    assert not (out / "manifest.json").exists()


def test_ten_thousand_files_through_a_glob_under_ulimit_256(tmp_path, tokenizer_dir):
    """A glob of 10,000 files: the one-machine build runs under ``ulimit -n 256`` (files are read one at a
    time), and a plan of 4 parts over them merges to the same stream."""
    from conftest import run_stage

    root = tmp_path / "many"
    for i in range(10_000):
        d = root / f"s{i // 1000:02d}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        (d / f"f{i:05d}.jsonl").write_text(json.dumps({"text": f"document {i}: " + "some words " * (i % 7 + 1)}) + "\n")
    glob = f"{root}/**/*.jsonl"
    one = tmp_path / "one"
    run_stage("data_pipeline", ["build", "--input", glob, "--tokenizer", str(tokenizer_dir), "--out", str(one),
                                "--workers", "2", "--shard-tokens", "20000", "--no-progress"], nofile=256)
    assert Manifest(one).data["stats"]["files"] == 10_000
    out = tmp_path / "arr"
    plan = array.plan_build([glob], tokenizer_dir, out, 4, shard_tokens=20_000)
    sizes = [len(p) for p in plan["parts"]]
    assert sum(sizes) == 10_000 and all(abs(n - 2500) < 50 for n in sizes)  # balanced by bytes
    for i in range(4):
        array.build_part(out, i)
    array.merge(out)
    assert np.array_equal(stream(out), stream(one))


def test_tokenizer_training_reads_a_spread_sample_of_big_inputs(tmp_path, mixed_corpus):
    """``train-tokenizer --read-mb``: pieces drawn from every kind of input, about the budget, deterministic."""
    from data_pipeline.sources import SourceStats, sample_inputs

    specs = sample_inputs([str(mixed_corpus)], read_bytes=300_000, seed=0, piece_bytes=60_000)
    assert specs == sample_inputs([str(mixed_corpus)], read_bytes=300_000, seed=0, piece_bytes=60_000)
    assert specs != sample_inputs([str(mixed_corpus)], read_bytes=300_000, seed=1, piece_bytes=60_000)
    assert any("#bytes=" in s for s in specs) and any("a_text" in s for s in specs)  # from several inputs
    stats = SourceStats()
    docs = list(iter_documents(specs, stats=stats))
    everything = SourceStats()
    list(iter_documents([str(mixed_corpus)], stats=everything))
    assert docs and stats.bytes_read < 0.4 * everything.bytes_read
    out = tmp_path / "tok"
    assert cli_main(["train-tokenizer", "--input", str(mixed_corpus), "--read-mb", "0.3", "--vocab-size", "600",
                     "--out", str(out)]) == 0
    assert (out / "tokenizer.model").is_file()
    # compressed files cannot be cut: a prefix of each is a piece, so big .zst inputs are still spread over
    big = tmp_path / "zst"
    big.mkdir()
    rng = random.Random(0)
    for k in range(3):  # ~330 KB each, ~190 KB compressed (random letters barely compress)
        lines = "".join(json.dumps({"text": f"file {k} line {i} " + "".join(rng.choices("abcdefgh ", k=80))}) + "\n"
                        for i in range(3000))
        (big / f"p{k}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    specs = sample_inputs([str(big)], read_bytes=60_000, seed=0, piece_bytes=20_000)
    assert len(specs) == 3 and all(s.endswith("#bytes=0-20000") for s in specs)
    docs = list(iter_documents(specs))
    assert {d.split()[1] for d in docs} == {"0", "1", "2"} and 400 < len(docs) < 800
