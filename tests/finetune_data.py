"""Small synthetic task data for the fine-tuning tests: learnable by a 1M-parameter model in a few
hundred steps, with a known chance level. Deterministic (seeded)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

FILLER = ("def class import self return value list data file name path index item text line open "
          "string number object module method result error test type args kwargs print format").split()
POS = ["sorted", "append", "extend", "update"]
NEG = ["raise", "except", "assert", "finally"]


def classification(path: Path, n: int, seed: int, fmt: str = "csv", pair: bool = False) -> Path:
    """Label 'good' iff the text holds a word of POS (else one of NEG); chance = 0.5."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["good", "bad"])
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 10))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POS if label == "good" else NEG))
        row = {"text": " ".join(words), "label": label}
        if pair:
            row["text_pair"] = " ".join(rng.choice(FILLER) for _ in range(4))
        rows.append(row)
    _write(path, rows, fmt)
    return path


PER = ["alice", "bob", "carol", "dave"]
LOC = [["paris"], ["london"], ["new", "york"], ["rio", "de", "janeiro"]]


def conll(path: Path, n: int, seed: int, scheme: str = "BIO") -> Path:
    """Sentences of filler words with person names (1 word) and places (1-3 words)."""
    rng = random.Random(seed)
    lines = ["-DOCSTART- O", ""]
    for _ in range(n):
        toks: list[tuple[str, str]] = [(rng.choice(FILLER), "O") for _ in range(rng.randint(3, 8))]
        for _ in range(rng.randint(1, 2)):
            pos = rng.randrange(len(toks) + 1)
            if rng.random() < 0.5:
                ent = [(rng.choice(PER), "S-PER" if scheme == "BIOES" else "B-PER")]
            else:
                words = rng.choice(LOC)
                ent = [(w, _tag(i, len(words), "LOC", scheme)) for i, w in enumerate(words)]
            toks[pos:pos] = ent
        lines += [f"{w} {t}" for w, t in toks] + [""]
    path.write_text("\n".join(lines))
    return path


def _tag(i: int, n: int, kind: str, scheme: str) -> str:
    if scheme == "BIOES":
        return f"S-{kind}" if n == 1 else f"B-{kind}" if i == 0 else f"E-{kind}" if i == n - 1 else f"I-{kind}"
    return f"B-{kind}" if i == 0 else f"I-{kind}"


def squad(path: Path, n: int, seed: int, long_every: int = 4) -> Path:
    """SQuAD JSON: 'what is the number ?' over filler text with one number in it; every
    ``long_every``-th context is long enough to be split into windows."""
    rng = random.Random(seed)
    paragraphs = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(60, 90) if i % long_every == 0 else rng.randint(8, 20))]
        number = str(rng.randint(100, 9999))
        words.insert(rng.randrange(len(words) + 1), number)
        context = " ".join(words) + " ."
        start = context.index(f" {number} ") + 1 if f" {number} " in context else context.index(number)
        paragraphs.append({"context": context, "qas": [{"id": f"q{i}", "question": "what is the number ?",
                                                        "answers": [{"text": number, "answer_start": start}]}]})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "synthetic", "paragraphs": paragraphs}]}))
    return path


FACTS = {"apple": "red", "banana": "yellow", "grass": "green", "sky": "blue", "snow": "white", "coal": "black"}


def sft(path: Path, n: int, seed: int) -> Path:
    """JSONL instruction → response: the colour of a thing (6 facts, phrasings vary)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        thing = rng.choice(sorted(FACTS))
        q = rng.choice(["colour of {}", "what colour is {}", "{} colour"]).format(thing)
        rows.append({"instruction": q, "response": FACTS[thing]})
    _write(path, rows, "jsonl")
    return path


def _write(path: Path, rows: list[dict], fmt: str) -> None:
    if fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
