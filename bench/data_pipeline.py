"""Data-pipeline throughput: ``python -m data_pipeline build`` against its limit and a peer, plus memory.

``python -m bench.data_pipeline [--size-mb 50] [--quick]`` — in one run, on the same documents and
the same 8192-piece unigram SentencePiece model (trained once on the embedded default corpus, cached):

* **ours**: ``python -m data_pipeline build --workers W`` as a subprocess (wall clock of the whole
  command: start-up, reading, tokenizing, writing shards, manifest), W = 1, 2;
* **limit**: the bare SentencePiece model's ``encode`` over the documents pre-loaded in memory and
  split evenly (by characters) across W forked processes; only the encode is timed;
* **wrapper** (diagnostic): the same, through lmforge's ``Tokenizer.encode_batch`` (chunking, splicing);
* **peer**: ``datasets.Dataset.from_generator`` over the same documents, then
  ``.map(batched=True, num_proc=W)`` with the same tokenizer, writing Arrow to a fresh cache dir
  (from_generator + map are timed; map alone is in the config);
* ratios ours / limit (goal >= 0.85) and ours / peer (goal > 1.0) for each W;
* **scaling**: ours at W workers against ours at the fewest (tokens/s ratio; ideal = the worker ratio);
* **cost growth**: ``build --workers 2`` on the corpus and on copies 2x and 4x its size: wall seconds
  (linear: seconds per MB stays flat) and peak RSS of the process tree (the build streams: flat).

Token counts include one EOS per document everywhere (the build writes it). The corpora are the
embedded default corpus (the stdlib's .py files) repeated under distinct names until the size is
reached; they, the tokenizer and all scratch outputs live in ``bench/results/cache`` (git-ignored).
``--quick`` shrinks the corpora to 5, 10 and 20 MB for a smoke run.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import multiprocessing as mp
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import CACHE_DIR, bench_command, emit, print_table, record, run_measured

NAME = "data_pipeline"
REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20
VOCAB = 8192
GOAL_VS_LIMIT = 0.85
GOAL_VS_PEER = 1.0
GOAL_RSS_GROWTH = 1.1  # "flat": the 4x corpus may cost at most 10 % more peak memory (issue 18)
GOAL_TIME_GROWTH = 1.1  # "linear": seconds per MB on the larger corpora at most 10 % above the 1x figure
SUB_ENV = {
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "LMFORGE_PROGRESS": "0",
    "PYTHONPATH": str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
}


def log(msg: str) -> None:
    print(f"[bench.{NAME}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- inputs (cached)
def make_corpus(size_mb: float, cache: Path = CACHE_DIR) -> tuple[Path, dict[str, Any]]:
    """A directory of >= size_mb MiB: the default corpus's files copied round after round (r000/, r001/ ...).

    Written once (meta.json marks it complete) and reused while the default corpus is the same.
    """
    from data_pipeline.sources import default_corpus_paths

    files = default_corpus_paths()
    root = Path(os.path.commonpath(files))
    key = hashlib.sha256("\n".join(f"{f}:{os.path.getsize(f)}" for f in files).encode()).hexdigest()[:16]
    base = cache / f"corpus-{size_mb:g}mb"
    meta_path = base / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return base / "docs", meta
    log(f"writing a {size_mb:g} MB corpus to {base} (once)")
    shutil.rmtree(base, ignore_errors=True)
    target, total, n, rounds = int(size_mb * MB), 0, 0, 0
    while total < target:
        for f in files:
            dst = base / "docs" / f"r{rounds:03d}" / Path(f).relative_to(root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
            total += dst.stat().st_size
            n += 1
            if total >= target:
                break
        rounds += 1
    meta = {"key": key, "bytes": total, "files": n, "rounds": rounds, "source": str(root)}
    meta_path.write_text(json.dumps(meta, indent=1))
    return base / "docs", meta


def ensure_tokenizer(cache: Path = CACHE_DIR) -> tuple[Path, dict[str, Any]]:
    """An 8192-piece unigram tokenizer trained on the default corpus with the CLI (once per tokenizer.py)."""
    src = (REPO / "data_pipeline" / "tokenizer.py").read_bytes()
    key = hashlib.sha256(src + f"unigram:{VOCAB}".encode()).hexdigest()[:16]
    out = cache / f"tokenizer-unigram-{VOCAB}"
    meta_path = out / "bench_meta.json"
    if meta_path.is_file() and (out / "tokenizer.model").is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return out, meta
    log(f"training the {VOCAB}-piece unigram tokenizer on the default corpus → {out} (once)")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "data_pipeline", "train-tokenizer", "--vocab-size", str(VOCAB),
           "--model-type", "unigram", "--out", str(out)]
    r = run_measured(cmd, env=SUB_ENV, cwd=REPO)
    if r["returncode"] != 0:
        raise SystemExit(f"train-tokenizer failed ({r['returncode']}):\n{r['stderr'][-3000:]}")
    meta = {"key": key, "command": " ".join(cmd[1:]), "train_seconds": round(r["seconds"], 1),
            "train_peak_rss_mb": round(r["peak_rss_mb"], 1)}
    meta_path.write_text(json.dumps(meta, indent=1))
    return out, meta


# ---------------------------------------------------------------- ours
def run_build(corpus: Path, tok_dir: Path, workers: int, tag: str, cache: Path = CACHE_DIR) -> dict[str, Any]:
    out = cache / "scratch" / f"build-{tag}-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "data_pipeline", "build", "--input", str(corpus), "--tokenizer", str(tok_dir),
           "--out", str(out), "--workers", str(workers), "--no-progress"]
    r = run_measured(cmd, env=SUB_ENV, cwd=REPO)
    if r["returncode"] != 0:
        raise SystemExit(f"build failed ({r['returncode']}): {' '.join(cmd)}\n{r['stderr'][-3000:]}")
    m = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    cpu = re.search(r"cpu: main process ([\d.]+)s, tokenizer workers ([\d.]+)s", r["stdout"])
    tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
    docs = m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"]
    return {
        "seconds": r["seconds"],
        "cpu_seconds": r["cpu_seconds"],
        "seconds_in_process": m["seconds"],
        "peak_rss_mb": r["peak_rss_mb"],
        "tokens": tokens,
        "documents": docs,
        "bytes": m["stats"]["bytes_read"],
        "command": "python " + " ".join(cmd[1:]),
        "stdout": r["stdout"].strip()[-500:],
        "main_cpu_seconds": float(cpu[1]) if cpu else None,
        "worker_cpu_seconds": float(cpu[2]) if cpu else None,
    }


# ---------------------------------------------------------------- the limit (no I/O)
_DOCS: list[str] = []  # set before forking; workers read their slice copy-on-write


def _split_even(docs: list[str], parts: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges holding about the same number of characters each."""
    cum, c = [], 0
    for d in docs:
        c += len(d)
        cum.append(c)
    bounds = [0] + [bisect.bisect_left(cum, c * k / parts) + 1 for k in range(1, parts)] + [len(docs)]
    bounds = [min(max(b, 0), len(docs)) for b in bounds]
    return list(zip(bounds[:-1], bounds[1:]))


def _encode_worker(kind: str, model: str, lo: int, hi: int, barrier, queue, batch: int = 64) -> None:
    if kind == "sentencepiece":
        import sentencepiece as spm

        encode = spm.SentencePieceProcessor(model_file=model, num_threads=1).encode
    else:
        from data_pipeline.tokenizer import Tokenizer

        encode = Tokenizer.load(model, num_threads=1).encode_batch
    encode([_DOCS[lo][:1000]] if lo < hi else ["warm up"])
    barrier.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for i in range(lo, hi, batch):
        for ids in encode(_DOCS[i : min(i + batch, hi)]):
            n += len(ids) + 1  # + EOS, as the build writes it
    queue.put((n, time.perf_counter() - t0, time.process_time() - c0))


def run_encode_only(docs: list[str], model: str, workers: int, kind: str) -> dict[str, Any]:
    """Encode ``docs`` in ``workers`` forked processes; the slowest worker's encode time is the time."""
    global _DOCS
    _DOCS = docs
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_encode_worker, args=(kind, model, lo, hi, barrier, queue))
             for lo, hi in _split_even(docs, workers)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"encode worker failed with exit code {p.exitcode}")
    _DOCS = []
    return {"seconds": max(r[1] for r in results), "tokens": sum(r[0] for r in results),
            "cpu_seconds": sum(r[2] for r in results), "worker_seconds": [round(r[1], 3) for r in results]}


# ---------------------------------------------------------------- the peer (Hugging Face datasets)
_HF_TOK = None


def _hf_docs(path: str):
    from data_pipeline.sources import iter_documents

    for text in iter_documents([path]):
        yield {"text": text}


def _hf_tokenize(batch: dict[str, list], model: str) -> dict[str, list]:
    global _HF_TOK
    if _HF_TOK is None or str(_HF_TOK.model_path) != model:
        from data_pipeline.tokenizer import Tokenizer

        _HF_TOK = Tokenizer.load(model, num_threads=1)
    eos = _HF_TOK.eos_id
    return {"input_ids": [ids + [eos] for ids in _HF_TOK.encode_batch(batch["text"])]}


def run_peer(corpus: Path, model: str, workers: int, cache: Path = CACHE_DIR) -> dict[str, Any]:
    import datasets
    import pyarrow.compute as pc

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    hf_cache = cache / "scratch" / f"hf-w{workers}"
    shutil.rmtree(hf_cache, ignore_errors=True)
    hf_cache.mkdir(parents=True)
    try:
        ru0, c0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.process_time()
        t0 = time.perf_counter()
        ds = datasets.Dataset.from_generator(_hf_docs, gen_kwargs={"path": str(corpus)}, cache_dir=str(hf_cache))
        t1 = time.perf_counter()
        out = ds.map(_hf_tokenize, batched=True, num_proc=workers if workers > 1 else None,
                     remove_columns=["text"], fn_kwargs={"model": model})
        t2 = time.perf_counter()
        ru1, c1 = resource.getrusage(resource.RUSAGE_CHILDREN), time.process_time()
        cpu = c1 - c0 + (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        tokens = int(pc.sum(pc.list_value_length(out.data.column("input_ids"))).as_py())
        docs = len(out)
        dtype = str(out.features["input_ids"].feature.dtype)
        del ds, out
    finally:
        shutil.rmtree(hf_cache, ignore_errors=True)
    return {"seconds": t2 - t0, "cpu_seconds": cpu, "from_generator_seconds": t1 - t0, "map_seconds": t2 - t1,
            "tokens": tokens, "documents": docs, "ids_dtype": dtype, "datasets_version": datasets.__version__}


# ---------------------------------------------------------------- driver
def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = dict(min(runs, key=lambda r: r["seconds"]))
    if len(runs) > 1:
        best["all_seconds"] = [round(r["seconds"], 3) for r in runs]
    if "peak_rss_mb" in best:
        best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return best


def _spread(r: dict[str, Any]) -> dict[str, Any]:
    return {"all_seconds": r["all_seconds"]} if "all_seconds" in r else {}


def _rate(r: dict[str, Any]) -> float:
    return r["tokens"] / r["seconds"]


def run(size_mb: float, growth: list[int], workers: list[int], repeat: int = 1, peer: bool = True,
        wrapper: bool = True) -> list[dict[str, Any]]:
    from data_pipeline.sources import iter_documents

    corpus, cmeta = make_corpus(size_mb)
    bigs = {k: make_corpus(size_mb * k) for k in growth}
    tok_dir, tmeta = ensure_tokenizer()
    model = str(tok_dir / "tokenizer.model")
    docs = list(iter_documents([str(corpus)]))  # also warms the page cache for every contender
    nbytes = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs)
    common = {"corpus": str(corpus.relative_to(REPO)), "corpus_mb": round(cmeta["bytes"] / MB, 2),
              "documents": len(docs), "tokenizer": f"sentencepiece unigram {VOCAB}", "cpus": os.cpu_count(),
              "repeat": repeat, "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; other work skews the figures")
    log(f"corpus {cmeta['bytes'] / MB:.1f} MB, {len(docs)} documents; tokenizer {tok_dir}")

    # Contenders are interleaved round by round, so load from elsewhere hits them alike; fastest round counts.
    contenders = [(f"build --workers {w}", "ours", w, lambda w=w: run_build(corpus, tok_dir, w, "main"))
                  for w in workers]
    for w in workers:
        contenders.append((f"limit: bare SentencePiece encode x{w}", "limit", w,
                           lambda w=w: run_encode_only(docs, model, w, "sentencepiece")))
        if wrapper:
            contenders.append((f"wrapper: Tokenizer.encode_batch x{w}", "wrapper", w,
                               lambda w=w: run_encode_only(docs, model, w, "wrapper")))
        if peer:
            contenders.append((f"peer: datasets from_generator + map(num_proc={w})", "peer", w,
                               lambda w=w: run_peer(corpus, model, w)))
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for k in range(repeat):
        for label, kind, w, fn in contenders:
            r = fn()
            log(f"round {k + 1}/{repeat}: {label}: {r['seconds']:.2f}s, {r['tokens'] / r['seconds']:,.0f} tokens/s")
            runs.setdefault((kind, w), []).append(r)
    best = {key: _best(v) for key, v in runs.items()}
    ours = {w: best["ours", w] for w in workers}
    limit = {w: best["limit", w] for w in workers}
    wrap = {w: best["wrapper", w] for w in workers if wrapper}
    hf = {w: best["peer", w] for w in workers if peer}
    docs = []
    rss_w = max(workers)
    # 1x of the growth series: the median round of ours (the larger corpora run once each, so a
    # best-of-N 1x figure would flatter the ratios)
    grown = {1: (corpus, cmeta, sorted(runs["ours", rss_w], key=lambda r: r["seconds"])[(repeat - 1) // 2])}
    for k, (big, bmeta) in bigs.items():
        for f in big.rglob("*.py"):  # warm the page cache, as the rounds above did for the 1x corpus
            f.read_bytes()
        log(f"build --workers {rss_w} on the {k}x corpus ({bmeta['bytes'] / MB:.0f} MB)")
        grown[k] = (big, bmeta, run_build(big, tok_dir, rss_w, f"x{k}"))

    recs: list[dict[str, Any]] = []
    mbps = lambda r: round(nbytes / MB / r["seconds"], 3)  # noqa: E731
    for w in workers:
        cfg = {**common, "workers": w}
        lim = record(f"{NAME}.limit.w{w}", "tokens_per_s", _rate(limit[w]), "tokens/s", config={
            **cfg, "what": "bare SentencePieceProcessor.encode (num_threads=1) per process, docs in memory, "
                          "split evenly by characters; time of the slowest process",
            "seconds": round(limit[w]["seconds"], 3), "tokens": limit[w]["tokens"],
            "worker_seconds": limit[w]["worker_seconds"], "mb_per_s": mbps(limit[w]), **_spread(limit[w])})
        recs.append(lim)
        if wrapper:
            recs.append(record(f"{NAME}.wrapper.w{w}", "tokens_per_s", _rate(wrap[w]), "tokens/s", lim, config={
                **cfg, "what": "lmforge Tokenizer.encode_batch (num_threads=1), same setup as the limit",
                "seconds": round(wrap[w]["seconds"], 3), "tokens": wrap[w]["tokens"],
                "worker_seconds": wrap[w]["worker_seconds"], "mb_per_s": mbps(wrap[w]), **_spread(wrap[w])}))
        if peer:
            p = hf[w]
            peer_rec = record(f"{NAME}.peer.w{w}", "tokens_per_s", _rate(p), "tokens/s", config={
                **cfg, "what": "datasets.Dataset.from_generator + .map(batched=True, num_proc=W) with the same "
                               "Tokenizer, Arrow written to a fresh cache dir; time of both",
                "seconds": round(p["seconds"], 3), "from_generator_seconds": round(p["from_generator_seconds"], 3),
                "map_seconds": round(p["map_seconds"], 3), "map_only_tokens_per_s": round(p["tokens"] / p["map_seconds"]),
                "tokens": p["tokens"], "ids_dtype": p["ids_dtype"], "datasets": p["datasets_version"],
                "mb_per_s": mbps(p), **_spread(p)})
            recs.append(peer_rec)
        o = ours[w]
        ours_cfg = {
            **cfg, "what": "python -m data_pipeline build (subprocess wall clock, incl. start-up and finalize)",
            "command": o["command"], "seconds": round(o["seconds"], 3),
            "seconds_in_process": o["seconds_in_process"],
            "in_process_tokens_per_s": round(o["tokens"] / o["seconds_in_process"]),
            "ratio_in_process_vs_limit": round(o["tokens"] / o["seconds_in_process"] / _rate(limit[w]), 4),
            "tokens": o["tokens"], "peak_rss_mb": round(o["peak_rss_mb"], 1), "mb_per_s": mbps(o), **_spread(o),
        }
        r = record(f"{NAME}.build.w{w}", "tokens_per_s", _rate(o), "tokens/s", lim,
                   config={**ours_cfg, "goal": f">= {GOAL_VS_LIMIT} x limit"})
        r["config"]["meets_goal"] = r["ratio"] is not None and r["ratio"] >= GOAL_VS_LIMIT
        recs.append(r)
        if peer:
            r = record(f"{NAME}.build_vs_peer.w{w}", "tokens_per_s", _rate(o), "tokens/s", peer_rec,
                       config={**cfg, "what": f"same figure as {NAME}.build.w{w}, compared with the peer",
                               "goal": f"> {GOAL_VS_PEER} x peer"})
            r["config"]["meets_goal"] = r["ratio"] is not None and r["ratio"] > GOAL_VS_PEER
            recs.append(r)

    for w in workers:  # tokens per CPU-second: what each contender costs, little disturbed by other load
        cfg = {**common, "workers": w, "what": "tokens / (user + system CPU seconds of all its processes)"}
        lim = record(f"{NAME}.limit_cpu.w{w}", "tokens_per_cpu_s", limit[w]["tokens"] / limit[w]["cpu_seconds"],
                     "tokens/cpu-s", config={**cfg, "cpu_seconds": round(limit[w]["cpu_seconds"], 3)})
        recs.append(lim)
        if peer:
            recs.append(record(f"{NAME}.peer_cpu.w{w}", "tokens_per_cpu_s", hf[w]["tokens"] / hf[w]["cpu_seconds"],
                               "tokens/cpu-s", lim, config={**cfg, "cpu_seconds": round(hf[w]["cpu_seconds"], 3)}))
        recs.append(record(f"{NAME}.build_cpu.w{w}", "tokens_per_cpu_s", ours[w]["tokens"] / ours[w]["cpu_seconds"],
                           "tokens/cpu-s", lim, config={**cfg, "cpu_seconds": round(ours[w]["cpu_seconds"], 3),
                                                        "includes": "interpreter start-up, imports, finalize"}))
        if w > 1 and ours[w]["main_cpu_seconds"] is not None:  # where the time goes: the build's own CPU split
            split = {**common, "workers": w, "limit_cpu_seconds": round(limit[w]["cpu_seconds"], 3)}
            recs.append(record(f"{NAME}.where.main_cpu.w{w}", "seconds", ours[w]["main_cpu_seconds"], "cpu-s",
                               config={**split, "what": "CPU of the build's main process (listing, reading and "
                                       "decoding documents, handing them to the workers, writing and hashing shards), "
                                       "from its own getrusage; on W cores it competes with the W workers"}))
            recs.append(record(f"{NAME}.where.worker_cpu.w{w}", "seconds", ours[w]["worker_cpu_seconds"], "cpu-s",
                               config={**split, "what": "CPU of the tokenizer worker processes (encode, the wrapper's "
                                       "chunking, receiving texts and sending token arrays); compare limit_cpu_seconds, "
                                       "the bare encode of the same documents"}))

    recs += scaling_records(ours, workers, recs, common)
    recs += growth_records(grown, rss_w, common)
    recs[0]["config"]["tokenizer_meta"] = tmeta
    for r in recs:
        r["config"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return recs


def scaling_records(ours: dict[int, dict[str, Any]], workers: list[int], recs: list[dict[str, Any]],
                    common: dict[str, Any]) -> list[dict[str, Any]]:
    """The build at each worker count against the fewest workers: the same runs as build.wN, compared."""
    w0 = workers[0]
    base = next(r for r in recs if r["name"] == f"{NAME}.build.w{w0}")
    out = []
    for w in workers[1:]:
        r = record(f"{NAME}.scaling.build.w{w}", "tokens_per_s", _rate(ours[w]), "tokens/s", base, config={
            **common, "workers": w, "what": f"same figure as {NAME}.build.w{w}; ratio = speed-up over {w0} worker(s)",
            "ideal_ratio": w / w0, "command": ours[w]["command"]})
        r["config"]["efficiency"] = r["ratio"] and round(r["ratio"] / (w / w0), 4)
        out.append(r)
    return out


def growth_records(grown: dict[int, tuple[Path, dict[str, Any], dict[str, Any]]], workers: int,
                   common: dict[str, Any]) -> list[dict[str, Any]]:
    """Build seconds, seconds per MB and peak RSS at 1x, 2x, 4x ... the corpus (ratios against 1x)."""
    recs: list[dict[str, Any]] = []
    base: dict[str, dict[str, Any]] = {}
    for k, (path, meta, r) in sorted(grown.items()):
        mb = meta["bytes"] / MB
        cfg = {**common, "corpus": str(path.relative_to(REPO)), "corpus_mb": round(mb, 2), "size_factor": k,
               "documents": r["documents"], "tokens": r["tokens"], "workers": workers, "command": r["command"],
               "seconds_in_process": r["seconds_in_process"], "tokens_per_s": round(_rate(r))}
        if k == 1:
            cfg["note"] = "the median round of the build.wN runs"
        figures = [
            ("seconds", r["seconds"], "s", "wall seconds of the build command (incl. interpreter start-up and imports)", None),
            ("seconds_per_mb", r["seconds_in_process"] / mb, "s/MB", "the build's own seconds (manifest `seconds`: "
             "start-up and imports excluded, a fixed cost that would flatter the larger corpora) / corpus MB: flat "
             "when the time is linear", f"linear: <= {GOAL_TIME_GROWTH} x the 1x figure"),
            ("peak_rss", r["peak_rss_mb"], "MB", "peak of the summed RSS of the build's process tree (polled "
             "every 50 ms; shared pages counted once per process)", f"flat: <= {GOAL_RSS_GROWTH} x the 1x figure"),
        ]
        for metric, value, unit, what, goal in figures:
            rec = record(f"{NAME}.growth.{metric}.{k}x", metric, value, unit, base.get(metric),
                         config={**cfg, "what": what})
            if k == 1:
                base[metric] = rec
            elif goal:
                limit = GOAL_TIME_GROWTH if metric == "seconds_per_mb" else GOAL_RSS_GROWTH
                rec["config"]["goal"] = goal
                rec["config"]["meets_goal"] = rec["ratio"] is not None and rec["ratio"] <= limit
            else:
                rec["config"]["size_ratio"] = round(mb / (grown[1][1]["bytes"] / MB), 3)
            recs.append(rec)
    return recs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.data_pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=None, help="corpus size (default 50; 5 with --quick)")
    ap.add_argument("--growth", default="2,4", help="comma-separated size factors of the cost-growth corpora")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--repeat", type=int, default=None,
                    help="runs per contender, the fastest counts (default 3; 1 with --quick)")
    ap.add_argument("--no-peer", action="store_true", help="skip the Hugging Face datasets peer")
    ap.add_argument("--no-wrapper", action="store_true", help="skip the Tokenizer.encode_batch diagnostic")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 5, 10 and 20 MB corpora")
    args = ap.parse_args(argv)
    size = args.size_mb if args.size_mb is not None else (5.0 if args.quick else 50.0)
    workers = sorted({int(w) for w in args.workers.split(",") if w.strip()})
    t0 = time.time()
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    growth = sorted({int(k) for k in args.growth.split(",") if k.strip()} - {1})
    recs = run(size, growth, workers, repeat=max(1, repeat), peer=not args.no_peer,
               wrapper=not args.no_wrapper)
    emit(recs, NAME + ("-quick" if args.quick else ""), command=bench_command(NAME, argv))
    print_table(recs, file=sys.stderr)
    log(f"done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
