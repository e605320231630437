"""Task metrics: accuracy and macro-F1, entity-level F1 (seqeval's default mode), SQuAD EM/F1."""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    return sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1)


def macro_f1(pred: Sequence[int], gold: Sequence[int], num_labels: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in gold or predictions."""
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        if tp + fp + fn == 0:
            continue  # the class appears nowhere: it does not count (as in scikit-learn's labels=present)
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s) if f1s else 0.0


# ---------------------------------------------------------------- entities
def _split_tag(tag: str) -> tuple[str, str]:
    if tag == "O" or "-" not in tag:
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return prefix, kind


def entities(tags: Sequence[str], scheme: str = "BIO") -> set[tuple[str, int, int]]:
    """(type, first, last) chunks of a tag sequence, as conlleval/seqeval (default mode) read them:
    a chunk starts at B/S, at I/E after O, or at a type change; it ends before O, B, S, or a type change,
    and after E/S (BIOES)."""
    chunks: set[tuple[str, int, int]] = set()
    start, kind = None, ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, k = _split_tag(tag)
        end_before = start is not None and (prefix in ("O", "B", "S") or k != kind)
        if end_before:
            chunks.add((kind, start, i - 1))
            start = None
        if prefix in ("B", "S") or (prefix in ("I", "E") and start is None):
            start, kind = i, k
        if scheme == "BIOES" and prefix in ("E", "S") and start is not None:
            chunks.add((kind, start, i))
            start = None
    return chunks


def entity_prf(pred: Sequence[Sequence[str]], gold: Sequence[Sequence[str]], scheme: str = "BIO") -> dict[str, float]:
    """Micro-averaged entity precision, recall and F1 over sentences."""
    tp = n_pred = n_gold = 0
    for p, g in zip(pred, gold):
        pe, ge = entities(p, scheme), entities(g, scheme)
        tp += len(pe & ge)
        n_pred += len(pe)
        n_gold += len(ge)
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_gold if n_gold else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"entity_precision": prec, "entity_recall": rec, "entity_f1": f1}


# ---------------------------------------------------------------- SQuAD
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


def squad_scores(preds: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean over questions of the best EM / F1 against any gold answer (as SQuAD v1.1's evaluator)."""
    n = max(len(preds), 1)
    em = sum(max(exact_match(p, g) for g in gs) for p, gs in zip(preds, golds)) / n
    f1 = sum(max(token_f1(p, g) for g in gs) for p, gs in zip(preds, golds)) / n
    return {"exact_match": em, "f1": f1}
