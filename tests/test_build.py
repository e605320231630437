"""Shard build: contents, determinism across workers, kill -9 resume, filters, bad input, inspect."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.build import build_shards
from data_pipeline.cli import main as cli_main
from data_pipeline.shards import Manifest, dtype_for_vocab
from data_pipeline.sources import iter_documents
from data_pipeline.tokenizer import Tokenizer
from lmforge.errors import DataError, run_cli

REPO = Path(__file__).resolve().parents[1]


def _tree_bytes(d: Path) -> dict[str, bytes]:
    """Every output file's bytes; the manifest without its timing field."""
    out = {}
    for f in sorted(d.rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            if f.name == "manifest.json":
                m = json.loads(data)
                m.pop("seconds")
                data = json.dumps(m, sort_keys=True).encode()
            out[str(f.relative_to(d))] = data
    return out


def test_shards_hold_every_document_with_eos(shards_dir, corpus_dir, tokenizer_dir):
    m = Manifest(shards_dir)
    tok = Tokenizer.load(tokenizer_dir)
    assert m.data["dtype"] == "uint16" and m.eos_id == tok.eos_id
    assert m.tokenizer_sha256 == tok.fingerprint and m.verify() == []
    train = np.concatenate([np.fromfile(s.path, dtype=m.dtype) for s in m.shards("train")])
    val = np.concatenate([np.fromfile(s.path, dtype=m.dtype) for s in m.shards("val")])
    docs = list(iter_documents([str(corpus_dir)]))
    # every 10th document (index 9, 19, ...) is held out, up to 10 of them
    want_val = [d for k, d in enumerate(docs) if k % 10 == 9][:10]
    want_train = [d for k, d in enumerate(docs) if not (k % 10 == 9 and k // 10 < 10)]

    def split_docs(arr):
        cuts = np.flatnonzero(arr == tok.eos_id)
        assert cuts[-1] == len(arr) - 1  # the stream ends with EOS
        return [tok.decode(arr[a + 1 : b].tolist()) for a, b in zip(np.r_[-1, cuts[:-1]], cuts)]

    assert split_docs(val) == want_val
    assert split_docs(train) == want_train
    assert m.data["splits"]["train"]["documents"] == len(want_train)
    assert len(m.shards("train")) > 3  # several fixed-size shards, the last one shorter
    assert {s.tokens for s in m.shards("train")[:-1]} == {50_000}


def test_output_identical_for_any_worker_count_and_rerun(tmp_path, corpus_dir, tokenizer_dir, shards_dir):
    out2 = tmp_path / "w2"
    build_shards([str(corpus_dir)], tokenizer_dir, out2, workers=2, shard_tokens=50_000, val_docs=10, val_every=10)
    assert _tree_bytes(out2) == _tree_bytes(shards_dir)
    before = {f: f.stat().st_mtime_ns for f in out2.iterdir()}
    build_shards([str(corpus_dir)], tokenizer_dir, out2, workers=2, shard_tokens=50_000, val_docs=10, val_every=10)
    assert {f: f.stat().st_mtime_ns for f in out2.iterdir()} == before  # finished build is recognised


def test_kill_9_mid_build_then_rerun_is_byte_identical(tmp_path, corpus_dir, tokenizer_dir):
    big = tmp_path / "big"
    big.mkdir()
    for rep in range(6):  # ~6x the corpus so the build lasts long enough to be killed mid-way
        for f in sorted(corpus_dir.iterdir()):
            (big / f"r{rep}_{f.name}").write_bytes(f.read_bytes())
    args = ["build", "--input", str(big), "--tokenizer", str(tokenizer_dir), "--shard-tokens", "20000",
            "--val-docs", "30", "--val-every", "7", "--workers", "1", "--no-progress"]
    ref = tmp_path / "ref"
    assert cli_main([*args, "--out", str(ref)]) == 0
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline", *args, "--out", str(out)], cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("train_*.bin"))) < 5:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "build finished before it could be killed; grow the corpus"
    kept = {f.name: f.stat().st_mtime_ns for f in out.glob("train_*.bin")}
    with pytest.raises(DataError, match="has no manifest.json"):
        Manifest(out)  # a killed build is never mistaken for a finished one
    assert cli_main([*args, "--out", str(out)]) == 0
    assert _tree_bytes(out) == _tree_bytes(ref)
    reused = [n for n, t in kept.items() if (out / n).stat().st_mtime_ns == t]
    assert len(reused) >= 4  # finished shards were re-used, not rewritten


def test_dedup_and_min_chars(tmp_path, tokenizer_dir):
    src = tmp_path / "in"
    src.mkdir()
    for i, text in enumerate(["same text here\n", "same text here\n", "short", "another document\n", ""]):
        (src / f"{i}.txt").write_text(text)
    m = build_shards([str(src)], tokenizer_dir, tmp_path / "o", dedup=True, min_chars=8)
    assert m["splits"]["train"]["documents"] == 2
    assert m["stats"]["duplicate_documents"] == 1
    assert m["stats"]["short_skipped"] == 1 and m["stats"]["empty_skipped"] == 1


def test_bad_inputs_give_clear_errors(tmp_path, tokenizer_dir, corpus_dir, capsys):
    with pytest.raises(DataError, match="nope"):
        build_shards([str(tmp_path / "nope")], tokenizer_dir, tmp_path / "o1")
    assert not (tmp_path / "o1").exists()  # nothing written for a failed start
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(DataError, match="no training tokens"):
        build_shards([str(empty)], tokenizer_dir, tmp_path / "o2")
    with pytest.raises(DataError, match="seq-len 100000000 is longer than the data"):
        build_shards([str(corpus_dir)], tokenizer_dir, tmp_path / "o3", seq_len=100_000_000)
    assert not (tmp_path / "o3" / "manifest.json").exists()
    with pytest.raises(DataError, match="does not fit --dtype uint16"):
        dtype_for_vocab(70_000, "uint16")
    assert dtype_for_vocab(70_000) == "uint32" and dtype_for_vocab(65_536) == "uint16"
    with pytest.raises(DataError, match="tokenizer"):
        build_shards([str(corpus_dir)], tmp_path / "no_tokenizer", tmp_path / "o4")
    # the CLI turns it into one line and exit code 2
    rc = run_cli(cli_main, ["build", "--input", str(tmp_path / "nope"), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "o5")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and "nope" in err[0]


def test_changed_settings_refuse_to_mix(tmp_path, corpus_dir, tokenizer_dir):
    out = tmp_path / "o"
    build_shards([str(corpus_dir)], tokenizer_dir, out, shard_tokens=50_000)
    with pytest.raises(DataError, match="different settings"):
        build_shards([str(corpus_dir)], tokenizer_dir, out, shard_tokens=40_000)


def test_inspect_and_verify_name_damaged_shards(tmp_path, corpus_dir, tokenizer_dir, capsys):
    out = tmp_path / "o"
    build_shards([str(corpus_dir)], tokenizer_dir, out, shard_tokens=50_000, val_docs=5, val_every=10)
    assert cli_main(["inspect", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "verified" in text and "train" in text and "sample:" in text
    shard = Manifest(out).shards("train")[1].path
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01  # one flipped bit
    shard.write_bytes(bytes(data))
    assert cli_main(["inspect", str(out), "--verify"]) == 1
    assert f"{shard}: sha256 mismatch" in capsys.readouterr().err
    last = Manifest(out).shards("train")[-1].path
    last.write_bytes(last.read_bytes()[:-10])
    missing = Manifest(out).shards("val")[0].path
    missing.unlink()
    assert cli_main(["inspect", str(out), "--verify"]) == 1
    err = capsys.readouterr().err
    assert f"{last}:" in err and "truncated" in err and f"{missing}: missing" in err


def test_verify_and_training_refuse_a_damaged_tokenizer_copy(tmp_path, corpus_dir, tokenizer_dir, capsys):
    from pretrain.objective import shard_tokenizer

    out = tmp_path / "o"
    build_shards([str(corpus_dir)], tokenizer_dir, out, shard_tokens=200_000, val_docs=5, val_every=10)
    model = out / "tokenizer" / "tokenizer.model"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit: SentencePiece may still load it
    model.write_bytes(bytes(data))
    assert cli_main(["inspect", str(out), "--verify"]) == 1
    assert f"{model}: sha256 mismatch" in capsys.readouterr().err
    with pytest.raises(DataError, match="tokenizer"):
        shard_tokenizer([str(out)])


def test_cli_train_tokenizer_and_build_json_inputs(tmp_path, stdlib_files):
    """The CLI end to end on a JSONL corpus (tiny vocab to stay fast)."""
    rows = [{"text": Path(f).read_text(errors="replace")} for f in stdlib_files[:300]]
    rows = [r for r in rows if r["text"].strip()]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tok = tmp_path / "tok"
    assert cli_main(["train-tokenizer", "--input", str(tmp_path / "c.jsonl"), "--vocab-size", "600", "--out", str(tok)]) == 0
    assert cli_main(["build", "--input", str(tmp_path / "c.jsonl"), "--tokenizer", str(tok), "--out", str(tmp_path / "s"), "--workers", "2"]) == 0
    assert Manifest(tmp_path / "s").data["splits"]["train"]["documents"] == len(rows)


def test_reading_runs_at_most_2w_batches_ahead_of_the_writer(tokenizer_dir):
    """Memory stays flat: the reader is throttled by the writer, not by the size of the corpus."""
    from data_pipeline import build

    pulled = []

    def batches():
        for i in range(100):
            pulled.append(i)
            yield [f"document {i}"]

    gen = build._ordered_map(batches(), 2, str(Tokenizer.load(tokenizer_dir).model_path), "uint16")
    texts, (tokens, lengths) = next(gen)
    assert texts == ["document 0"] and len(lengths) == 1
    assert len(pulled) <= 2 * 2 + 1
    gen.close()


def test_a_document_over_many_shards_resumes_exactly_after_each_interruption(tmp_path, tokenizer_dir):
    """A long document spans 4+ shards; the build is stopped after shard 1, then again after shard 3 (inside
    the same document, already resumed once): the finished bytes equal an uninterrupted build's."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text("short one. " * 20)
    (corpus / "b.txt").write_text(" ".join(f"word{i % 97} and more text" for i in range(4000)))  # ~5 shards
    (corpus / "c.txt").write_text("a tail document. " * 30)
    kw = dict(workers=1, shard_tokens=3000)
    ref = tmp_path / "ref"
    build_shards([str(corpus)], tokenizer_dir, ref, **kw)
    assert Manifest(ref).data["splits"]["train"]["documents"] == 3 and len(Manifest(ref).shards()) >= 5

    class Stop(Exception):
        pass

    def stop_at(k):
        def hook(out, n):
            if n == k:
                raise Stop
        return hook

    out = tmp_path / "out"
    for k in (1, 3):
        with pytest.raises(Stop):
            build_shards([str(corpus)], tokenizer_dir, out, on_shard=stop_at(k), **kw)
        state = json.loads((out / "progress.json").read_text())["progress"]
        assert state["docs_read"] == 1 and state["skip_tokens"] > 0  # stopped inside document b
    build_shards([str(corpus)], tokenizer_dir, out, **kw)
    assert _tree_bytes(out) == _tree_bytes(ref)


def _sigterm_is_default() -> bool:
    import signal

    return signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_tokenizer_workers_do_not_inherit_the_parents_sigterm_handler(tokenizer_dir):
    """A SLURM task (submitit) handles SIGTERM in Python and forked workers inherited the handler: the pool's
    terminate() at the end of a build could not end a worker that was still alive, and the task hung (seen
    on the test cluster: the parent in waitpid, the worker on the pool's queue lock)."""
    import multiprocessing as mp
    import signal

    from data_pipeline import build

    old = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        with mp.get_context("fork").Pool(1, initializer=build._init_worker, initargs=(str(tokenizer_dir),)) as pool:
            assert pool.apply(_sigterm_is_default)
    finally:
        signal.signal(signal.SIGTERM, old)
