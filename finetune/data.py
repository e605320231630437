"""Reading task data: CSV/TSV, JSONL, JSON, parquet, `datasets` directories, CoNLL and SQuAD files.

Every record keeps where it came from (file and row), so bad input is reported as
``FILE row N: what is wrong; what to do`` and nothing is silently dropped.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import DataError


@dataclass
class Example:
    source: str  # "FILE row N": where to look when something is wrong with it
    fields: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- generic records
def _open_text(path: Path):
    if path.suffix == ".gz":
        import gzip

        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _stem_suffix(path: Path) -> str:
    return Path(path.name[:-3]).suffix.lower() if path.suffix == ".gz" else path.suffix.lower()


def read_records(path: str | Path) -> list[Example]:
    """Rows of a CSV/TSV, JSONL, JSON (a list of objects), parquet file or `datasets` directory."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory; check the --data.* path")
    if p.is_dir():
        return _read_datasets_dir(p)
    ext = _stem_suffix(p)
    try:
        if ext in (".csv", ".tsv"):
            rows = _read_csv(p, "\t" if ext == ".tsv" else ",")
        elif ext in (".jsonl", ".ndjson"):
            rows = _read_jsonl(p)
        elif ext == ".json":
            rows = _read_json_list(p)
        elif ext == ".parquet":
            import pyarrow.parquet as pq

            rows = [(i + 1, r) for i, r in enumerate(pq.read_table(p).to_pylist())]
        else:
            raise DataError(f"{p}: unknown format '{ext}'; use .csv, .tsv, .jsonl, .json, .parquet or a datasets directory")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); re-encode the file as UTF-8") from None
    if not rows:
        raise DataError(f"{p}: no records (empty file); give a file with data")
    return [Example(f"{p} row {n}", r) for n, r in rows]


def _read_csv(p: Path, delimiter: str) -> list[tuple[int, dict[str, Any]]]:
    with _open_text(p) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            return []
        rows = []
        for i, row in enumerate(reader):
            if None in row:  # more cells than header columns
                raise DataError(f"{p} row {i + 1}: {len(reader.fieldnames) + len(row[None])} cells for "
                                f"{len(reader.fieldnames)} header columns; quote cells that contain '{delimiter}'")
            rows.append((i + 1, row))
        return rows


def _read_jsonl(p: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with _open_text(p) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p} row {i + 1}: invalid JSON ({e.msg}); fix or remove the line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p} row {i + 1}: expected a JSON object, got {type(obj).__name__}")
            rows.append((i + 1, obj))
    return rows


def _load_json(p: Path) -> Any:
    with _open_text(p) as f:
        text = f.read()
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: invalid JSON ({e.msg}, line {e.lineno}); fix the file") from None


def _read_json_list(p: Path) -> list[tuple[int, dict[str, Any]]]:
    obj = _load_json(p)
    if obj is None:
        return []
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"{p}: expected a JSON list of objects (or JSON lines in a .jsonl file)")
    return [(i + 1, r) for i, r in enumerate(obj)]


def _read_datasets_dir(p: Path) -> list[Example]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{p}: not a dataset saved with save_to_disk ({e}); pass a file or such a directory") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{p}: holds splits {sorted(ds)}; pass one of them, e.g. {p / sorted(ds)[0]}")
    if len(ds) == 0:
        raise DataError(f"{p}: no records (empty dataset)")
    return [Example(f"{p} row {i + 1}", r) for i, r in enumerate(ds)]


def column(ex: Example, name: str, *aliases: str, required: bool = True) -> Any:
    """The value of a column (or of its first present alias); a missing one is a one-line error."""
    for n in (name, *aliases):
        if n in ex.fields and ex.fields[n] is not None:
            return ex.fields[n]
    if not required:
        return None
    have = ", ".join(sorted(ex.fields)) or "none"
    raise DataError(f"{ex.source}: no column '{name}' (columns: {have}); rename it or set the --data.*_column key")


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded (train, validation) split of ``examples``."""
    if len(examples) < 2:
        raise DataError(f"{examples[0].source.rsplit(' row', 1)[0]}: {len(examples)} example(s) cannot be split into "
                        "train and validation; give --data.validation or more data")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    val = sorted(order[:n_val])
    keep = sorted(order[n_val:])
    return [examples[i] for i in keep], [examples[i] for i in val]


# ---------------------------------------------------------------- CoNLL
def read_conll(path: str | Path) -> list[Example]:
    """CoNLL-style tagging data: one ``token ... tag`` per line, a blank line between sentences;
    ``-DOCSTART-`` lines are skipped. A ``.jsonl``/``.json`` file with ``tokens`` and ``tags``
    (or ``ner_tags``) columns is read too."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory; check the --data.* path")
    if p.is_dir() or _stem_suffix(p) in (".jsonl", ".json", ".ndjson", ".parquet"):
        out = []
        for ex in read_records(p):
            tokens = column(ex, "tokens")
            tags = column(ex, "tags", "ner_tags")
            if not isinstance(tokens, list) or not isinstance(tags, list) or len(tokens) != len(tags):
                raise DataError(f"{ex.source}: 'tokens' and 'tags' must be lists of the same length")
            out.append(Example(ex.source, {"tokens": [str(t) for t in tokens], "tags": [str(t) for t in tags]}))
        return out
    sentences: list[Example] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 1

    def flush(line_no: int) -> None:
        nonlocal tokens, tags, start
        if tokens:
            sentences.append(Example(f"{p} row {start}", {"tokens": tokens, "tags": tags}))
        tokens, tags, start = [], [], line_no + 1

    with _open_text(p) as f:
        for i, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                flush(i)
                continue
            if parts[0] == "-DOCSTART-":
                flush(i)
                continue
            if len(parts) < 2:
                raise DataError(f"{p} row {i}: expected 'token tag' (whitespace-separated), got {line.strip()!r}")
            if not tokens:
                start = i
            tokens.append(parts[0])
            tags.append(parts[-1])
        flush(i if sentences or tokens else 0)
    if not sentences:
        raise DataError(f"{p}: no sentences (empty file); give CoNLL data: 'token tag' lines, blank between sentences")
    return sentences


# ---------------------------------------------------------------- SQuAD
def read_squad(path: str | Path) -> list[Example]:
    """Extractive QA: SQuAD JSON ({"data": [{"paragraphs": [{"context", "qas": [...]}]}]}) or flat
    records (JSONL/JSON/`datasets`) with id, question, context, answers {text: [...], answer_start: [...]}.
    Every answer must sit at its character offset in the context."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory; check the --data.* path")
    out: list[Example] = []
    obj = _load_json(p) if p.is_file() and _stem_suffix(p) == ".json" else None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list) and obj["data"] and "paragraphs" in obj["data"][0]:
        for a_i, article in enumerate(obj["data"]):
            for p_i, para in enumerate(article.get("paragraphs", [])):
                context = para.get("context")
                for q_i, qa in enumerate(para.get("qas", [])):
                    where = f"{p} data[{a_i}].paragraphs[{p_i}].qas[{q_i}]"
                    answers = [(a.get("text"), a.get("answer_start")) for a in qa.get("answers", [])]
                    out.append(_qa_example(where, qa.get("id", where), qa.get("question"), context, answers))
    else:
        for ex in read_records(p):
            ans = column(ex, "answers")
            if isinstance(ans, dict):
                texts, starts = ans.get("text", []), ans.get("answer_start", [])
                pairs = list(zip(texts, starts)) if len(texts) == len(starts) else None
            elif isinstance(ans, list):
                pairs = [(a.get("text"), a.get("answer_start")) for a in ans if isinstance(a, dict)]
            else:
                pairs = None
            if pairs is None:
                raise DataError(f"{ex.source}: 'answers' must be {{text: [...], answer_start: [...]}} of equal length")
            out.append(_qa_example(ex.source, ex.fields.get("id", ex.source), column(ex, "question"),
                                   column(ex, "context"), pairs))
    if not out:
        raise DataError(f"{p}: no questions (empty file); give SQuAD-format data")
    return out


def _qa_example(where: str, qid: Any, question: Any, context: Any, answers: list[tuple[Any, Any]]) -> Example:
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: missing or empty 'question'")
    if not isinstance(context, str) or not context:
        raise DataError(f"{where}: missing or empty 'context'")
    if not answers:
        raise DataError(f"{where}: no answers; extractive QA needs at least one answer per question")
    for text, start in answers:
        if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool):
            raise DataError(f"{where}: an answer needs 'text' (string) and 'answer_start' (int), got {text!r}, {start!r}")
        if start < 0 or start + len(text) > len(context):
            raise DataError(f"{where}: answer {text!r} at offset {start} lies outside the context "
                            f"({len(context)} characters); fix answer_start")
        if context[start:start + len(text)] != text:
            raise DataError(f"{where}: answer {text!r} is not at offset {start} of the context "
                            f"(found {context[start:start + len(text)]!r}); fix answer_start")
    return Example(where, {"id": str(qid), "question": question, "context": context, "answers": answers})

