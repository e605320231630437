"""The four tasks: how examples become features, how features batch, and how predictions score.

A feature is a dict of python lists/ints (``input_ids``, ``labels``, ...) plus ``example``, the index
of the example it came from (a long QA context gives several features). Heads and losses are in
:mod:`finetune.model`; everything here is plain Python and runs without a model.

Input layout (both backbones): ``<s> text </s>`` or ``<s> text </s> pair </s>``; the causal model
pools the last token (the closing ``</s>``), the masked one the first (``<s>``, BERT's [CLS]).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from finetune import metrics as M
from finetune.config import FinetuneConfig
from finetune.data import Example, column, read_conll, read_records, read_squad
from lmforge.errors import ConfigError, DataError

IGNORE = -100


@dataclass
class Vocab:
    bos: int
    eos: int
    pad: int


def _int_like(values: Sequence[str]) -> bool:
    return all(v.lstrip("-").isdigit() for v in values)


def _label_names(cfg_labels: list[str] | None, seen: Sequence[str], what: str, first: str | None = None) -> list[str]:
    if cfg_labels:
        return [str(x) for x in cfg_labels]
    uniq = sorted(set(seen), key=(lambda v: int(v)) if _int_like(list(set(seen))) else None)
    if first is not None and first in uniq:
        uniq.remove(first)
        uniq.insert(0, first)
    if len(uniq) < 2:
        raise DataError(f"{what}: found {len(uniq)} distinct label(s) {uniq}; a classifier needs at least 2")
    return uniq


def _truncate_pair(a: list[int], b: list[int] | None, budget: int) -> tuple[list[int], list[int] | None]:
    """Longest-first truncation to ``budget`` content tokens."""
    a = list(a)
    b = list(b) if b is not None else None
    while len(a) + (len(b) if b is not None else 0) > budget:
        if b is not None and len(b) > len(a):
            b.pop()
        else:
            a.pop()
    return a, b


class Task(ABC):
    """Base: labels, reading, encoding, collating, scoring. Subclasses fill in the specifics."""

    name = ""
    default_metric = "loss"  # validation metric selecting the best checkpoint

    def __init__(self, cfg: FinetuneConfig, tok, vocab: Vocab, backbone_kind: str):
        self.cfg, self.tok, self.vocab, self.kind = cfg, tok, vocab, backbone_kind
        self.labels: list[str] = []

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    # -- data
    def read(self, path: str) -> list[Example]:
        return read_records(path)

    def fit_labels(self, train: list[Example]) -> None:
        """Decide the label set from the config or the training data (before encoding anything)."""
        self.labels = []  # tasks without classes (sft)

    @abstractmethod
    def encode(self, examples: list[Example], split: str) -> list[dict[str, Any]]:
        ...

    # -- batching
    def collate(self, feats: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-padded tensors: input_ids, attention_mask (and token_type_ids), labels..."""
        n = max(len(f["input_ids"]) for f in feats)
        pad = self.vocab.pad
        out = {
            "input_ids": torch.tensor([f["input_ids"] + [pad] * (n - len(f["input_ids"])) for f in feats]),
            "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * (n - len(f["input_ids"])) for f in feats]),
        }
        if self.kind == "masked":
            out["token_type_ids"] = torch.tensor([f.get("token_type_ids", [0] * len(f["input_ids"]))
                                                  + [0] * (n - len(f["input_ids"])) for f in feats])
        for key in self.label_keys():
            vals = [f[key] for f in feats]
            if isinstance(vals[0], list):
                out[key] = torch.tensor([v + [IGNORE] * (n - len(v)) for v in vals])
            else:
                out[key] = torch.tensor(vals)
        return out

    def label_keys(self) -> tuple[str, ...]:
        return ("labels",)

    # -- scoring
    @abstractmethod
    def predictions(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> list[Any]:
        """One prediction per feature of the batch (python objects, to be gathered across ranks)."""
        ...

    @abstractmethod
    def score(self, examples: list[Example], feats: list[dict[str, Any]], preds: list[Any]) -> dict[str, float]:
        ...

    def hf_label_maps(self) -> dict[str, Any]:
        if not self.labels:
            return {}
        return {"id2label": dict(enumerate(self.labels)), "label2id": {v: i for i, v in enumerate(self.labels)}}

    # -- helpers
    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.tok.encode_batch(texts)


# ---------------------------------------------------------------- sequence classification
class SequenceClassification(Task):
    name = "sequence_classification"
    default_metric = "accuracy"

    def _label(self, ex: Example) -> str:
        v = column(ex, self.cfg.data.label_column)
        if isinstance(v, bool) or not isinstance(v, int | str | float):
            raise DataError(f"{ex.source}: label {v!r} is not a string or an integer")
        if isinstance(v, float):
            if not v.is_integer():
                raise DataError(f"{ex.source}: label {v!r} is not an integer; use class names or ids")
            v = int(v)
        return str(v).strip()

    def fit_labels(self, train: list[Example]) -> None:
        seen = [self._label(ex) for ex in train]
        self.labels = _label_names(self.cfg.task.labels, seen, f"{train[0].source.rsplit(' row', 1)[0]}")
        known = set(self.labels)
        for ex, lab in zip(train, seen):
            if lab not in known:
                raise DataError(f"{ex.source}: label {lab!r} is not one of task.labels {self.labels}; "
                                "fix the data or the task.labels key")

    @property
    def closes_with_eos(self) -> bool:
        """Whether a text ends with ``</s>``: always for a masked model (BERT's [SEP]); for a causal one only
        when its head reads that token (``task.pooling=eos``)."""
        return not (self.kind == "causal" and self.cfg.task.pooling in ("last", "mean"))

    def encode(self, examples: list[Example], split: str) -> list[dict[str, Any]]:
        d = self.cfg.data
        texts = [str(column(ex, d.text_column)) for ex in examples]
        pairs = [column(ex, d.text_pair_column, required=False) for ex in examples]
        ids_a = self._ids(texts)
        has_pair = [p is not None for p in pairs]
        ids_b_list = self._ids([str(p) for p in pairs if p is not None])
        it = iter(ids_b_list)
        label_id = {v: i for i, v in enumerate(self.labels)}
        feats = []
        for i, (ex, a) in enumerate(zip(examples, ids_a)):
            b = next(it) if has_pair[i] else None
            lab = self._label(ex)
            if lab not in label_id:
                raise DataError(f"{ex.source}: label {lab!r} is not among the training labels {self.labels}; "
                                f"fix the {split} data or list every class in task.labels")
            # a causal model pools its rightmost token (task.pooling): </s> ("eos"), or the last word ("last":
            # no closing </s>, which pretraining taught to forget the document it ends)
            close = [self.vocab.eos] if self.closes_with_eos else []
            budget = self.cfg.task.max_seq_len - 1 - len(close) - (1 if b is not None else 0)
            a, b = _truncate_pair(a, b, budget)
            ids = [self.vocab.bos, *a, *(close if b is None else [self.vocab.eos])]
            types = [0] * len(ids)
            if b is not None:
                ids += [*b, *close]
                types += [1] * (len(b) + len(close))
            feats.append({"input_ids": ids, "token_type_ids": types, "labels": label_id[lab], "example": i})
        return feats

    def predictions(self, out, batch):
        return out["logits"].argmax(-1).tolist()

    def score(self, examples, feats, preds):
        gold = [f["labels"] for f in feats]
        return {"accuracy": M.accuracy(preds, gold), "macro_f1": M.macro_f1(preds, gold, self.num_labels)}


# ---------------------------------------------------------------- token classification
class TokenClassification(Task):
    name = "token_classification"
    default_metric = "entity_f1"

    def read(self, path: str) -> list[Example]:
        return read_conll(path)

    def _check_scheme(self, ex: Example) -> None:
        allowed = ("B", "I") if self.cfg.task.tag_scheme == "BIO" else ("B", "I", "E", "S")
        for t in ex.fields["tags"]:
            if t != "O" and (t.partition("-")[0] not in allowed or not t.partition("-")[2]):
                raise DataError(f"{ex.source}: tag {t!r} is not a {self.cfg.task.tag_scheme} tag "
                                f"(O or {'/'.join(allowed)}-TYPE); set task.tag_scheme or fix the data")

    def fit_labels(self, train: list[Example]) -> None:
        seen = []
        for ex in train:
            self._check_scheme(ex)
            seen += ex.fields["tags"]
        self.labels = _label_names(self.cfg.task.labels, seen, train[0].source.rsplit(" row", 1)[0], first="O")
        known = set(self.labels)
        for ex in train:
            bad = [t for t in ex.fields["tags"] if t not in known]
            if bad:
                raise DataError(f"{ex.source}: tag {bad[0]!r} is not one of task.labels {self.labels}")

    def encode(self, examples, split):
        label_id = {v: i for i, v in enumerate(self.labels)}
        words = [w for ex in examples for w in ex.fields["tokens"]]
        firsts = [i == 0 for ex in examples for i in range(len(ex.fields["tokens"]))]
        pieces = iter(self._ids([w if first else " " + w for w, first in zip(words, firsts)]))
        budget = self.cfg.task.max_seq_len - 2
        feats = []
        for i, ex in enumerate(examples):
            self._check_scheme(ex)
            ids, labels, word_index = [self.vocab.bos], [IGNORE], []
            for _w, tag in enumerate(ex.fields["tags"]):
                if tag not in label_id:
                    raise DataError(f"{ex.source}: tag {tag!r} is not among the training tags {self.labels}; "
                                    f"fix the {split} data or list every tag in task.labels")
                p = next(pieces) or [self.tok.unk_id]
                if len(ids) - 1 + len(p) > budget:
                    continue  # truncated: the word is scored as predicted 'O'
                # One labelled piece per word, the rest ignored: the first piece for the bidirectional
                # (masked) model; the last for the causal one, whose first piece (often a bare '▁')
                # has not seen the word yet.
                k = len(p) - 1 if self.kind == "causal" else 0
                word_index.append(len(ids) + k)
                labels += [IGNORE] * k + [label_id[tag]] + [IGNORE] * (len(p) - 1 - k)
                ids += p
            ids.append(self.vocab.eos)
            labels.append(IGNORE)
            feats.append({"input_ids": ids, "labels": labels, "word_pos": word_index, "example": i})
        return feats

    def predictions(self, out, batch):
        return out["logits"].argmax(-1).tolist()

    def score(self, examples, feats, preds):
        pred_tags, gold_tags = [], []
        for f, p in zip(feats, preds):
            ex = examples[f["example"]]
            tags = ["O"] * len(ex.fields["tags"])
            for w, pos in enumerate(f["word_pos"]):
                tags[w] = self.labels[p[pos]]
            pred_tags.append(tags)
            gold_tags.append(ex.fields["tags"])
        out = M.entity_prf(pred_tags, gold_tags, self.cfg.task.tag_scheme)
        flat_p = [t for s in pred_tags for t in s]
        flat_g = [t for s in gold_tags for t in s]
        out["token_accuracy"] = sum(a == b for a, b in zip(flat_p, flat_g)) / max(len(flat_g), 1)
        return out


# ---------------------------------------------------------------- extractive QA
class QuestionAnswering(Task):
    name = "question_answering"
    default_metric = "f1"

    def read(self, path: str) -> list[Example]:
        return read_squad(path)

    def _context_pieces(self, context: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of the context and each token's character span (words keep their leading space)."""
        import re

        words = [(m.start(), m.end()) for m in re.finditer(r"\S+", context)]
        texts = [(" " if k else "") + context[s:e] for k, (s, e) in enumerate(words)]
        ids, spans = [], []
        for (s, e), text, p in zip(words, texts, self._ids(texts)):
            shift = s - (len(text) - (e - s))  # the char position of text[0] in the context
            prev = 0
            for k in range(1, len(p) + 1):
                end = len(self.tok.decode(p[:k])) if k < len(p) else len(text)
                a, b = max(prev + shift, s), max(min(end + shift, e), s)
                ids.append(p[k - 1])
                spans.append((a, b))
                prev = end
        return ids, spans

    def encode(self, examples, split):
        t = self.cfg.task
        q_ids = self._ids([ex.fields["question"] for ex in examples])
        feats = []
        for i, (ex, q) in enumerate(zip(examples, q_ids)):
            q = q[: t.max_seq_len // 2]
            ctx_ids, spans = self._context_pieces(ex.fields["context"])
            room = t.max_seq_len - len(q) - 3
            ans_text, ans_start = ex.fields["answers"][0]  # training target: the first answer
            a0, a1 = ans_start, ans_start + len(ans_text)
            inside = [j for j, (b0, b1) in enumerate(spans) if b0 < a1 and b1 > a0]  # tokens overlapping it
            start = 0
            while True:
                window = range(start, min(start + room, len(ctx_ids)))
                offset = len(q) + 2  # <s> q </s>
                ids = [self.vocab.bos, *q, self.vocab.eos, *(ctx_ids[j] for j in window), self.vocab.eos]
                s_pos = e_pos = 0  # the answer is not (wholly) in this window: point at <s>
                if inside and window.start <= inside[0] and inside[-1] < window.stop:
                    s_pos, e_pos = inside[0] - window.start + offset, inside[-1] - window.start + offset
                feats.append({"input_ids": ids, "start_positions": s_pos, "end_positions": e_pos, "example": i,
                              "offset": offset, "spans": [spans[j] for j in window]})
                if window.stop >= len(ctx_ids):
                    break
                start = max(window.stop - t.doc_stride, window.start + 1)
        return feats

    def label_keys(self):
        return ("start_positions", "end_positions")

    def predictions(self, out, batch):
        """Per feature: the best span (score, first token, last token) among context tokens."""
        preds = []
        s_all, e_all = out["start_logits"].float(), out["end_logits"].float()
        mask = batch["attention_mask"]
        for b in range(s_all.shape[0]):
            n = int(mask[b].sum())
            s, e = s_all[b, :n], e_all[b, :n]
            preds.append((s.tolist(), e.tolist()))
        return preds

    def score(self, examples, feats, preds):
        best: dict[int, tuple[float, str]] = {}
        max_len = self.cfg.task.max_answer_tokens
        for f, (s, e) in zip(feats, preds):
            off, spans = f["offset"], f["spans"]
            n_ctx = len(spans)
            s_ctx, e_ctx = torch.tensor(s[off:off + n_ctx]), torch.tensor(e[off:off + n_ctx])
            scores = s_ctx[:, None] + e_ctx[None, :]
            valid = torch.ones_like(scores, dtype=torch.bool).triu() & ~torch.ones_like(scores, dtype=torch.bool).triu(max_len)
            scores = scores.masked_fill(~valid, float("-inf"))
            k = int(scores.argmax())
            i, j = divmod(k, n_ctx)
            value = float(scores[i, j])
            context = examples[f["example"]].fields["context"]
            text = context[spans[i][0]:spans[j][1]]
            if f["example"] not in best or value > best[f["example"]][0]:
                best[f["example"]] = (value, text)
        pred_texts = [best.get(i, (0.0, ""))[1] for i in range(len(examples))]
        golds = [[a for a, _ in ex.fields["answers"]] for ex in examples]
        return M.squad_scores(pred_texts, golds)


# ---------------------------------------------------------------- instruction tuning
class SFT(Task):
    name = "sft"
    default_metric = "loss"

    def _pair(self, ex: Example) -> tuple[str, str]:
        d = self.cfg.data
        instr = str(column(ex, d.instruction_column, "prompt", "instruction"))
        extra = column(ex, "input", required=False)
        if extra:
            instr = f"{instr}\n\n{extra}"
        resp = str(column(ex, d.response_column, "completion", "output", "response"))
        return instr, resp

    def prompt(self, instruction: str) -> str:
        return self.cfg.task.prompt_template.format(instruction=instruction)

    def encode(self, examples, split):
        pairs = [self._pair(ex) for ex in examples]
        p_ids = self._ids([self.prompt(i) for i, _ in pairs])
        r_ids = self._ids([r for _, r in pairs])
        L = self.cfg.task.max_seq_len
        feats = []
        for i, (_ex, p, r) in enumerate(zip(examples, p_ids, r_ids)):
            prompt = [self.vocab.bos, *p][: L - 2]  # keep room for at least one response token and </s>
            resp = [*r, self.vocab.eos][: L - len(prompt)]
            ids = prompt + resp
            labels = [IGNORE] * len(prompt) + resp  # loss on the response (and its </s>) only
            feats.append({"input_ids": ids, "labels": labels, "prompt_len": len(prompt), "example": i})
        if self.cfg.task.packing and split == "train":
            feats = self._pack(feats, L)
        return feats

    @staticmethod
    def _pack(feats: list[dict[str, Any]], L: int) -> list[dict[str, Any]]:
        """Greedy packing of whole examples into windows of at most L tokens (attention spans the
        window, as in common SFT packing; every label still belongs to its own example)."""
        out, cur_ids, cur_lab = [], [], []
        for f in feats:
            if cur_ids and len(cur_ids) + len(f["input_ids"]) > L:
                out.append({"input_ids": cur_ids, "labels": cur_lab, "example": f["example"]})
                cur_ids, cur_lab = [], []
            cur_ids = cur_ids + f["input_ids"]
            cur_lab = cur_lab + f["labels"]
        if cur_ids:
            out.append({"input_ids": cur_ids, "labels": cur_lab, "example": feats[-1]["example"]})
        return out

    def predictions(self, out, batch):
        return [None] * batch["input_ids"].shape[0]

    def score(self, examples, feats, preds):
        return {}

    def score_generations(self, examples: list[Example], generated: list[str]) -> dict[str, float]:
        golds = [self._pair(ex)[1] for ex in examples]
        return {"exact_match": sum(M.exact_match(g, r) for g, r in zip(generated, golds)) / max(len(golds), 1)}


TASK_CLASSES = {c.name: c for c in (SequenceClassification, TokenClassification, QuestionAnswering, SFT)}


def make_task(cfg: FinetuneConfig, tok, vocab: Vocab, backbone_kind: str) -> Task:
    if cfg.task.type == "sft" and backbone_kind != "causal":
        raise ConfigError("task.type=sft needs a causal backbone; init_from holds a masked (BERT-style) model")
    return TASK_CLASSES[cfg.task.type](cfg, tok, vocab, backbone_kind)
