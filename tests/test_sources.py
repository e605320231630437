"""data_pipeline.sources: every input format, its errors, filters, stats and deterministic order."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipeline.sources import Source, SourceStats, default_corpus_paths, expand_inputs, iter_documents
from lmforge.errors import DataError

DOCS = ["first document\nwith two lines", "second — non-ASCII ✓", "third"]


def _jsonl(docs: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def _compress(data: bytes, how: str) -> bytes:
    return {"": data, ".gz": gzip.compress(data), ".zst": zstandard.ZstdCompressor().compress(data)}[how]


def _docs(paths, **kw) -> list[str]:
    return list(iter_documents([str(p) for p in paths], **kw))


@pytest.mark.parametrize("comp", ["", ".gz", ".zst"])
def test_text_jsonl_json_formats_plain_and_compressed(tmp_path, comp):
    (tmp_path / f"a.txt{comp}").write_bytes(_compress(DOCS[0].encode(), comp))
    (tmp_path / f"b.jsonl{comp}").write_bytes(_compress(_jsonl(DOCS), comp))
    (tmp_path / f"c.json{comp}").write_bytes(_compress(json.dumps([{"text": d} for d in DOCS], indent=2).encode(), comp))
    (tmp_path / f"d.json{comp}").write_bytes(_compress(_jsonl(DOCS), comp))  # JSON lines named .json
    srcs = expand_inputs([str(tmp_path)])
    assert [(Path(s.path).name, s.kind, s.compression) for s in srcs] == [
        (f"a.txt{comp}", "text", {"": None, ".gz": "gzip", ".zst": "zstd"}[comp]),
        (f"b.jsonl{comp}", "jsonl", srcs[0].compression),
        (f"c.json{comp}", "json", srcs[0].compression),
        (f"d.json{comp}", "json", srcs[0].compression),
    ]
    stats = SourceStats()
    assert _docs([tmp_path], stats=stats) == [DOCS[0]] + DOCS * 3
    assert stats.files == 4 and stats.documents == 10 and stats.bytes_read > 0


def test_json_array_streams_large_and_odd_layouts(tmp_path, monkeypatch):
    import data_pipeline.sources as sources

    monkeypatch.setattr(sources, "_JSON_CHUNK", 7)  # force elements, strings and numbers across chunk edges
    docs = [f"doc {i} " + "x" * (i * 13 % 40) for i in range(60)]
    recs = [{"n": 12345678901234567890, "text": d, "meta": {"a": [1, 2.5e10, None]}} for d in docs]
    f = tmp_path / "big.json"
    f.write_bytes(b"\xef\xbb\xbf \n" + json.dumps(recs, indent=1).encode())  # BOM and leading blank
    assert _docs([f]) == docs
    (tmp_path / "empty.json").write_text("[ ]")
    assert _docs([tmp_path / "empty.json"]) == []


def test_parquet_is_read_in_batches(tmp_path):
    texts = [f"row {i}" for i in range(2500)] + [None, ""]
    pq.write_table(pa.table({"id": list(range(2502)), "content": texts}), tmp_path / "x.parquet", row_group_size=700)
    stats = SourceStats()
    assert _docs([tmp_path / "x.parquet"], text_field="content", stats=stats) == texts[:2500]
    assert stats.empty_skipped == 2 and stats.documents == 2500
    with pytest.raises(DataError, match=r"x\.parquet: no column 'text' \(columns: id, content\).*--text-field"):
        _docs([tmp_path / "x.parquet"])


def test_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"text": DOCS, "n": [1, 2, 3]}).save_to_disk(str(tmp_path / "ds"))
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}), "validation": datasets.Dataset.from_dict({"text": ["v1"]})}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert expand_inputs([str(tmp_path / "ds")]) == [Source(str(tmp_path / "ds"), "hf_dataset")]
    assert _docs([tmp_path / "ds"]) == DOCS
    assert _docs([tmp_path / "dd"]) == ["t1", "t2"]  # train by default
    assert _docs([f"{tmp_path / 'dd'}:validation"]) == ["v1"]
    assert _docs([f"hf:{tmp_path / 'dd'}:validation"]) == ["v1"]
    # a directory holding saved datasets reads each as one source, never their Arrow/JSON internals
    assert [s.kind for s in expand_inputs([str(tmp_path)])] == ["hf_dataset", "hf_dataset"]
    with pytest.raises(DataError, match=r"dd: no split 'test' \(splits: train, validation\)"):
        expand_inputs([f"{tmp_path / 'dd'}:test"])
    with pytest.raises(DataError, match="no column 'body'"):
        _docs([tmp_path / "ds"], text_field="body")


def test_hf_prefix_streams_a_local_data_folder(tmp_path):
    d = tmp_path / "folder"
    d.mkdir()
    (d / "part-0.jsonl").write_bytes(_jsonl(DOCS[:2]))
    (d / "part-1.jsonl").write_bytes(_jsonl(DOCS[2:]))
    assert _docs([f"hf:{d}"]) == DOCS
    assert _docs([f"hf:{d}:train"]) == DOCS
    with pytest.raises(DataError, match=r"hf:/nowhere/ds.*never downloads"):
        expand_inputs(["hf:/nowhere/ds"])


def test_nested_dirs_sorted_and_binaries_skipped(tmp_path):
    for rel in ["b/z.md", "b/a.py", "a.txt", "c/d/e.rst", ".git/HEAD.txt", "b/x.pyc", "img.png", "noext"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"content of {rel}")
    names = [Path(s.path).relative_to(tmp_path).as_posix() for s in expand_inputs([str(tmp_path)])]
    assert names == ["a.txt", "b/a.py", "b/z.md", "c/d/e.rst"]
    # a file named explicitly is read as text whatever its suffix
    assert _docs([tmp_path / "noext"]) == ["content of noext"]
    assert expand_inputs([str(tmp_path / "b/x.pyc")])[0].kind == "text"


def test_globs(tmp_path):
    for name in ["b.txt", "a.txt", "c.log", "d.bin"]:
        (tmp_path / name).write_text(name)
    assert _docs([tmp_path / "*.txt"]) == ["a.txt", "b.txt"]
    assert _docs([tmp_path / "*.log"]) == ["c.log"]  # the pattern names the suffix, so it is wanted
    assert _docs([tmp_path / "*"]) == ["a.txt", "b.txt"]  # a bare * only picks known suffixes
    assert _docs([tmp_path / "**"]) == ["a.txt", "b.txt"]  # directory and its files are not read twice
    with pytest.raises(DataError, match=r"nothing-\*\.txt: glob matched nothing"):
        expand_inputs([str(tmp_path / "nothing-*.txt")])


def test_missing_path_and_empty_dir_are_named(tmp_path):
    with pytest.raises(DataError, match=r"does-not-exist\.jsonl: no such file or directory"):
        expand_inputs([str(tmp_path / "does-not-exist.jsonl")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: directory holds no readable documents"):
        list(iter_documents([str(tmp_path / "empty")]))


def test_empty_short_and_invalid_utf8_are_counted(tmp_path):
    (tmp_path / "0.txt").write_text("")
    (tmp_path / "1.txt").write_text("  \n\t ")
    (tmp_path / "2.txt").write_text("tiny")
    (tmp_path / "3.txt").write_bytes(b"caf\xe9 latin-1, not UTF-8 \xff\xfe")
    (tmp_path / "4.jsonl").write_bytes(b'{"text": "bad \xc3 byte here"}\n\n{"text": ""}\n{"text": null}\n')
    stats = SourceStats()
    docs = _docs([tmp_path], min_chars=5, stats=stats)
    assert docs == ["caf\ufffd latin-1, not UTF-8 \ufffd\ufffd", "bad \ufffd byte here"]
    assert stats.as_dict() == {
        "files": 5, "documents": 2, "empty_skipped": 4, "short_skipped": 1, "invalid_utf8_docs": 2,
        "bytes_read": stats.bytes_read,
    }


def test_invalid_utf8_in_json_array_is_replaced_and_counted(tmp_path):
    body = b'[{"text": "good"}, {"text": "bad \xff one"}, {"text": "also good \xef\xbf\xbd"}]'
    (tmp_path / "a.json").write_bytes(body)
    stats = SourceStats()
    assert _docs([tmp_path / "a.json"], stats=stats) == ["good", "bad \ufffd one", "also good \ufffd"]
    assert stats.invalid_utf8_docs == 1


def test_malformed_json_names_file_and_line(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": oops}\n')
    it = iter_documents([str(f)])
    assert next(it) == "ok"  # streamed: documents before the bad line arrive first
    with pytest.raises(DataError, match=r"m\.jsonl:4: malformed JSON \(.*\); fix or remove the line"):
        list(it)
    g = tmp_path / "g.jsonl.gz"
    g.write_bytes(gzip.compress(b'{"text": "a"}\n[1, 2\n'))
    with pytest.raises(DataError, match=r"g\.jsonl\.gz:2: malformed JSON"):
        _docs([g])
    a = tmp_path / "a.json"
    a.write_text('[\n {"text": "a"},\n {"text": "b"}\n {"text": "c"}\n]')
    with pytest.raises(DataError, match=r"a\.json:4: malformed JSON \(expected ',' or '\]'\)"):
        _docs([a])
    a.write_text('[\n {"text": "a"},\n {"text": tru}\n' + " " * 100 + "]")
    with pytest.raises(DataError, match=r"a\.json:3: malformed JSON"):
        _docs([a])
    a.write_text('[{"text": "a"},')
    with pytest.raises(DataError, match=r"a\.json:1: JSON array ends early"):
        _docs([a])


def test_missing_or_wrong_field(tmp_path):
    f = tmp_path / "f.jsonl"
    f.write_text('{"text": "ok"}\n{"content": "x", "id": 1}\n')
    with pytest.raises(DataError, match=r"f\.jsonl:2: no 'text' field \(fields: content, id\); pass --text-field"):
        _docs([f])
    f.write_text('{"body": 3}\n')
    with pytest.raises(DataError, match=r"f\.jsonl:1: field 'body' is a int, not a string"):
        _docs([f], text_field="body")
    f.write_text('["not", "an object"]\n')
    with pytest.raises(DataError, match=r"f\.jsonl:1: expected a JSON object"):
        _docs([f])


def test_corrupt_compressed_file_is_a_data_error(tmp_path):
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(b"hello world")[:-6])
    with pytest.raises(DataError, match=r"t\.txt\.gz: cannot read as gzip text"):
        _docs([tmp_path / "t.txt.gz"])
    (tmp_path / "z.jsonl.zst").write_bytes(b"definitely not zstd")
    with pytest.raises(DataError, match=r"z\.jsonl\.zst: cannot read as zstd jsonl"):
        _docs([tmp_path / "z.jsonl.zst"])
    (tmp_path / "p.parquet").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"p\.parquet: cannot read as parquet"):
        _docs([tmp_path / "p.parquet"])


def test_default_corpus_is_big_and_readable():
    paths = default_corpus_paths()
    assert len(paths) >= 500 and all(p.endswith(".py") for p in paths)
    assert not any("site-packages" in p or "__pycache__" in p for p in paths)
    assert sum(Path(p).stat().st_size for p in paths) > 3_000_000
    assert paths == default_corpus_paths()  # deterministic
    stats = SourceStats()
    docs = list(iter_documents(paths[:50], stats=stats))
    assert len(docs) + stats.empty_skipped == 50 and sum(map(len, docs)) > 10_000


def test_order_is_deterministic(tmp_path):
    names = [f"f{i:02d}.txt" for i in range(30)]
    for n in reversed(names):  # creation order must not matter
        (tmp_path / n).write_text(n)
    mixed = [str(tmp_path / "f2*.txt"), str(tmp_path / "f05.txt"), str(tmp_path)]
    first = _docs(mixed)
    assert first == _docs(mixed)
    assert first[:11] == [f"f2{i}.txt" for i in range(10)] + ["f05.txt"]  # input order, each expansion sorted
    assert first[11:] == names
