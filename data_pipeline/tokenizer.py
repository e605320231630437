"""A lossless SentencePiece tokenizer, trained on a bounded sample of a document stream, plus
Hugging Face files (``tokenizer.json`` & co.) that give exactly the same ids.

Why the training options look the way they do:

* SentencePiece's defaults lose text (NFKC, collapsed whitespace, a dummy leading space). We use the
  identity normalizer, keep all whitespace, add no dummy prefix, allow whitespace-only pieces (code
  indentation) and fall back to UTF-8 byte pieces for characters never seen in training.
* ``\\n`` and ``\\t`` are user-defined symbols while training, so no learned piece spans a line or a
  tab. Afterwards they become ordinary one-character pieces: every id sequence stays the same, but
  the unigram lattice no longer gets SentencePiece's off-grid user-symbol bonus (see below).
* SentencePiece decodes every ``▁`` (U+2581) as a space, so a literal U+2581 in a document would come
  back as a space. The wrapper cuts documents at it and emits a dedicated control id instead.
* Exact Hugging Face parity for unigram: SentencePiece keeps best-path scores in float32, `tokenizers`
  in float64, so (near-)ties are resolved differently. We round unigram scores to
  multiples of 1/64 and encode in chunks of at most ``_CHUNK_CHARS`` characters, cut only where every
  segmentation has a boundary anyway (after ``\\n``, before a space that follows a non-space, next to
  a digit); then both sums are exact and both Viterbi passes break ties identically.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_copy, atomic_write_bytes, atomic_write_text
from lmforge.log import print0

SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}  # ids 0, 1, 2, 3
MASK_TOKEN = "<mask>"  # the extra special token a masked LM needs (--extra-special-tokens '<mask>')
LITERAL_SPACE_MARK = "<U+2581>"  # control piece standing for a literal U+2581 in the text
MODEL_FILE = "tokenizer.model"
DEFAULT_TRAIN_THREADS = 4  # fixed, not os.cpu_count(): SentencePiece's output depends on the thread count
HF_MODEL_MAX_LENGTH = int(1e30)  # transformers' "no limit" value; the sequence length is set by the trainer

_SPACE = "\u2581"
_LAYOUT = ("\n", "\t")
_REQUIRED_CHARS = "".join(chr(c) for c in range(0x21, 0x7F))  # printable ASCII always has its own piece
_SCORE_GRID = 64  # unigram scores are multiples of 1/64: float32 sums stay exact below 2**18
_CHUNK_CHARS = 4096  # <= 4096 lattice nodes * |score| < ~60 keeps every sum far below 2**18
_SENTENCE_CHARS = 4096  # training "sentences" are cut to this (max_sentence_length is in bytes)
_HF_NEVER = -float(2**20)  # HF score of control/byte pieces, so text like "<s>" never matches them
_Piece = model_pb2.ModelProto.SentencePiece
_BYTE_PIECE = re.compile("<0x[0-9A-F]{2}>")


# ---------------------------------------------------------------- training
def sample_documents(docs: Iterable[str], sample_docs: int, max_chars: int, seed: int) -> list[str]:
    """Reservoir-sample at most ``sample_docs`` documents holding at most ``max_chars`` characters.

    Deterministic for the same stream and seed. When the kept text outgrows ``max_chars``, every kept
    document is cut to a random window of ``max_chars // (2 * kept)`` characters and later ones are cut
    to that size on arrival, so memory stays bounded and small corpora are kept whole.
    """
    rng = random.Random(seed)
    kept: list[str] = []
    total, cap = 0, max_chars
    for i, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise DataError(f"train_tokenizer: document #{i} is a {type(doc).__name__}, not str; decode it first")
        slot = i if i < sample_docs else rng.randrange(i + 1)
        if slot >= sample_docs:
            continue
        doc = _window(doc, cap, rng)
        if slot == len(kept):
            kept.append(doc)
        else:
            total -= len(kept[slot])
            kept[slot] = doc
        total += len(doc)
        if total > max_chars:
            cap = max(1, max_chars // (2 * len(kept)))
            kept = [_window(d, cap, rng) for d in kept]
            total = sum(map(len, kept))
    return kept


def _window(doc: str, cap: int, rng: random.Random) -> str:
    if len(doc) <= cap:
        return doc
    start = rng.randrange(len(doc) - cap + 1)
    return doc[start : start + cap]


def _training_sentences(sample: list[str], cut: re.Pattern[str]) -> Iterator[str]:
    """Pieces of the sampled documents between symbols (so no piece spans one), at most _SENTENCE_CHARS."""
    for doc in sample:
        for seg in cut.split(doc):
            for i in range(0, len(seg), _SENTENCE_CHARS):
                yield seg[i : i + _SENTENCE_CHARS]


def train_tokenizer(
    docs: Iterable[str],
    out_dir: str | Path,
    vocab_size: int,
    model_type: str = "unigram",
    sample_docs: int = 100_000,
    extra_special_tokens: Sequence[str] = (),
    seed: int = 0,
    num_threads: int | None = None,
    max_sample_chars: int = 200_000_000,
) -> Tokenizer:
    """Train SentencePiece on a deterministic sample of the `docs` stream and write out_dir.

    ``out_dir`` gets ``tokenizer.model`` plus the Hugging Face files. The same stream, arguments and
    ``num_threads`` give a byte-identical model (its sha256 is ``Tokenizer.fingerprint``); SentencePiece
    splits its work by thread, so another thread count gives a (equally good) different model.
    """
    if model_type not in ("unigram", "bpe"):
        raise ConfigError(f"model_type: must be 'unigram' or 'bpe', got {model_type!r}")
    if sample_docs < 1 or max_sample_chars < 1:
        raise ConfigError("sample_docs and max_sample_chars must be >= 1")
    extras = _check_extra_tokens(extra_special_tokens)
    reserved = len(SPECIAL_TOKENS) + 1 + len(_LAYOUT) + len(extras) + 256 + len(_REQUIRED_CHARS)
    if vocab_size <= reserved:
        raise ConfigError(f"vocab_size: {vocab_size} is too small; special, byte and ASCII pieces take {reserved}")
    sample = sample_documents(docs, sample_docs, max_sample_chars, seed)
    if not any(s.strip() for s in sample):
        raise DataError("train_tokenizer: the document stream is empty; check the inputs")
    print0(f"tokenizer: training SentencePiece {model_type} ({vocab_size} pieces) on {len(sample):,} sampled documents "
           f"({sum(map(len, sample)) / 1e6:.1f} M characters); SentencePiece reports no progress, this is the long part")
    symbols = sorted([*_LAYOUT, *extras, _SPACE, "\0"], key=len, reverse=True)
    cut = re.compile("|".join(map(re.escape, symbols)))
    buf = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(sample, cut), model_writer=buf, model_type=model_type,
            vocab_size=vocab_size, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, byte_fallback=True, allow_whitespace_only_pieces=True, split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, control_symbols=[LITERAL_SPACE_MARK],
            user_defined_symbols=[*_LAYOUT, *extras], required_chars=_REQUIRED_CHARS,
            max_sentence_length=4 * _SENTENCE_CHARS, num_threads=num_threads or DEFAULT_TRAIN_THREADS,
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise DataError(f"train_tokenizer: SentencePiece failed on the sampled text ({msg}); "
                        "use more text or a smaller vocab_size") from e
    proto = model_pb2.ModelProto.FromString(buf.getvalue())
    _finalize_scores(proto)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / MODEL_FILE, proto.SerializeToString())
    tok = Tokenizer.load(out)
    tok.save(out)
    return tok


def _check_extra_tokens(tokens: Sequence[str]) -> list[str]:
    """Extra tokens become user-defined symbols: matched in text, always one id each."""
    tokens = [tokens] if isinstance(tokens, str) else list(tokens)
    specials = set(SPECIAL_TOKENS.values())
    for t in tokens:
        if not isinstance(t, str) or not t or t in specials or t == LITERAL_SPACE_MARK or _BYTE_PIECE.fullmatch(t):
            raise ConfigError(f"extra_special_tokens: {t!r} is empty or already a reserved token")
        if any(c.isspace() or c in ",\0" or c == _SPACE for c in t):
            raise ConfigError(f"extra_special_tokens: {t!r} must not contain whitespace, ',', NUL or U+2581")
        # Hugging Face skips over special tokens in text as whole matches; an extra token overlapping one
        # could then be missed there while SentencePiece matches it.
        if any(t in s or any(s.endswith(t[:k]) for k in range(1, len(t))) for s in specials):
            raise ConfigError(f"extra_special_tokens: {t!r} overlaps one of {sorted(specials)}")
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"extra_special_tokens: duplicates in {tokens}")
    return tokens


def _finalize_scores(proto: model_pb2.ModelProto) -> None:
    """Grid the unigram scores and turn \\n / \\t into normal pieces (why: see the module docstring)."""
    normal = [p for p in proto.pieces if p.type == _Piece.NORMAL]
    if proto.trainer_spec.model_type == model_pb2.TrainerSpec.UNIGRAM:
        for p in normal:
            p.score = round(p.score * _SCORE_GRID) / _SCORE_GRID
    lowest = min(p.score for p in normal)  # keeps SentencePiece's min_score (its unknown-piece score)
    for p in proto.pieces:
        if p.type == _Piece.USER_DEFINED and p.piece in _LAYOUT:
            p.type, p.score = _Piece.NORMAL, lowest


# ---------------------------------------------------------------- the tokenizer
class Tokenizer:
    """A trained tokenizer: ``Tokenizer.load(dir)`` once per process, then ``encode_batch`` many times."""

    def __init__(self, model_path: Path, model_bytes: bytes, num_threads: int | None = None):
        self.model_path = model_path
        self._bytes = model_bytes
        self._num_threads = num_threads
        self.fingerprint = hashlib.sha256(model_bytes).hexdigest()
        self._proto = model_pb2.ModelProto.FromString(model_bytes)
        threads = -1 if num_threads is None else num_threads  # -1: SentencePiece uses every core
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes, num_threads=threads)
        self.vocab_size = self._sp.get_piece_size()
        self.unk_id, self.bos_id = self._sp.unk_id(), self._sp.bos_id()
        self.eos_id, self.pad_id = self._sp.eos_id(), self._sp.pad_id()
        self.extra_special_tokens = tuple(
            p.piece for p in self._proto.pieces if p.type == _Piece.USER_DEFINED and p.piece not in _LAYOUT
        )
        lit = self.token_to_id(LITERAL_SPACE_MARK)
        self._literal_space_id = lit if lit is not None and self._sp.is_control(lit) else None
        # Ids of the strings the wrapper cuts text at; each becomes exactly one id.
        self._symbol_ids = {t: self._sp.piece_to_id(t) for t in self.extra_special_tokens}
        if self._literal_space_id is not None:
            self._symbol_ids[_SPACE] = self._literal_space_id
        alts = sorted(self._symbol_ids, key=len, reverse=True)  # longest first = leftmost-longest match
        self._symbol_re = re.compile("|".join(map(re.escape, alts))) if alts else None
        self._only_space = alts == [_SPACE]
        self._chunkable = _cuts_are_boundaries(self._proto)

    @classmethod
    def load(cls, path: str | Path, num_threads: int | None = None) -> Tokenizer:
        """Load from a tokenizer dir (holding tokenizer.model) or the .model file itself.

        ``num_threads`` bounds SentencePiece's batch encoding threads (None: all cores); pass 1 in
        multi-process workers.
        """
        p = Path(path)
        model = p / MODEL_FILE if p.is_dir() else p
        if not model.is_file():
            raise DataError(f"tokenizer not found: {p} (need a dir with {MODEL_FILE} or the .model file); "
                            "train one with `lmforge-data train-tokenizer`")
        try:
            return cls(model, model.read_bytes(), num_threads)
        except (OSError, RuntimeError, DecodeError) as e:
            msg = " ".join(str(e).split())
            raise DataError(f"cannot read tokenizer {model}: {msg}; retrain or recopy it") from e

    def __reduce__(self):  # picklable (e.g. sent to worker processes) without re-reading the file
        return (Tokenizer, (self.model_path, self._bytes, self._num_threads))

    def token_to_id(self, token: str) -> int | None:
        """Id of a piece (e.g. an extra special token), or None if the vocabulary has no such piece."""
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added. ``decode(encode(text)) == text`` for any str."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text; all chunks of all texts go to SentencePiece as one multi-threaded call."""
        plans = [self._plan(t) for t in texts]
        flat = [part for plan in plans for part in plan if isinstance(part, str)]
        encoded = iter(self._encode_chunks(flat))
        out: list[list[int]] = []
        for plan in plans:
            if len(plan) == 1 and isinstance(plan[0], str):
                out.append(next(encoded))  # the common case: one chunk, no symbol to splice in
                continue
            ids: list[int] = []
            for part in plan:
                if isinstance(part, str):
                    ids += next(encoded)
                else:
                    ids.append(part)
            out.append(ids)
        return out

    def encode_concat(self, texts: list[str], dtype, append_id: int | None = None,
                      max_chars: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
        """The ids of every text (each followed by ``append_id`` when given) concatenated into one ``dtype``
        array, and each text's number of ids: the ids of :meth:`encode_batch`, but SentencePiece gets at most
        about ``max_chars`` characters per call and its lists go into numpy at once, so the memory is
        bounded by ``max_chars``, not by the longest text (Python's lists cost ~36 bytes per id)."""
        pieces: list[np.ndarray | None] = []
        lengths = np.zeros(len(texts), dtype=np.int64)
        pending: list[tuple[int, int, str]] = []  # (slot in pieces, text index, chunk)
        chars = 0

        def flush() -> None:
            for (slot, owner, _), ids in zip(pending, self._encode_chunks([c for _, _, c in pending])):
                pieces[slot] = np.asarray(ids, dtype=dtype)
                lengths[owner] += len(ids)
            pending.clear()

        for i, text in enumerate(texts):
            for part in self._plan(text):
                if isinstance(part, str):
                    pending.append((len(pieces), i, part))
                    pieces.append(None)
                    chars += len(part)
                    if chars >= max_chars:
                        flush()
                        chars = 0
                else:
                    pieces.append(np.array([part], dtype=dtype))
                    lengths[i] += 1
            if append_id is not None:
                pieces.append(np.array([append_id], dtype=dtype))
                lengths[i] += 1
        flush()
        return (np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)), lengths

    def _encode_chunks(self, chunks: list[str]) -> list[list[int]]:
        try:
            return self._sp.encode(chunks) if chunks else []
        except TypeError:
            for c in chunks:
                if isinstance(c, str) and not c.isascii():
                    try:
                        c.encode("utf-8")
                    except UnicodeEncodeError as e:  # e.g. a JSON "\\ud800" escape: no UTF-8 form, no ids
                        raise DataError(f"cannot tokenize text with a lone surrogate ({e.object[e.start]!r}); "
                                        "replace invalid characters when reading the source") from e
            raise

    def _plan(self, text: str) -> list[str | int]:
        """`text` as chunks to encode (str) and ids of the symbols between them (int)."""
        if self._symbol_re is None or (self._only_space and _SPACE not in text):
            return self._chunks(text)  # fast path: no extra tokens and no literal U+2581
        plan: list[str | int] = []
        pos = 0
        for m in self._symbol_re.finditer(text):
            plan += self._chunks(text[pos : m.start()])
            plan.append(self._symbol_ids[m.group()])
            pos = m.end()
        plan += self._chunks(text[pos:])
        return plan

    def _chunks(self, seg: str) -> list[str]:
        if len(seg) <= _CHUNK_CHARS or not self._chunkable:
            return [seg]
        out, pos = [], 0
        while len(seg) - pos > _CHUNK_CHARS:
            cut = _boundary(seg, pos, pos + _CHUNK_CHARS)
            if cut is None:  # no safe cut: SentencePiece sees the rest whole (exact parity not guaranteed)
                break
            out.append(seg[pos:cut])
            pos = cut
        out.append(seg[pos:])
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; BOS/EOS/PAD decode to nothing."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        lit = self._literal_space_id
        if lit is None or lit not in ids:
            return self._sp.decode(ids)
        parts, start = [], 0
        for k, i in enumerate(ids + [lit]):
            if i == lit:
                parts.append(self._sp.decode(ids[start:k]))
                start = k + 1
        return _SPACE.join(parts)

    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.model and the Hugging Face files into out_dir (e.g. a run directory)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if not (out / MODEL_FILE).exists() or not os.path.samefile(out / MODEL_FILE, self.model_path):
            atomic_copy(self.model_path, out / MODEL_FILE)
        _write_hf_files(self._proto, out)


def _cuts_are_boundaries(proto: model_pb2.ModelProto) -> bool:
    """True when no normal piece spans a cut point of `_boundary` (true for models trained here)."""
    return not any(
        ("\n" in p and p != "\n") or re.search("[^\u2581]\u2581", p) or (len(p) > 1 and re.search("[0-9]", p))
        for p in (q.piece for q in proto.pieces if q.type == _Piece.NORMAL)
    )


_NON_SPACE_THEN_SPACE = re.compile(r"[^ ](?= )")
_DIGIT = re.compile("[0-9]")


def _boundary(seg: str, lo: int, hi: int) -> int | None:
    """A cut in (lo, hi] that every segmentation has: after \\n, before ' ' after a non-space, at a digit."""
    nl = seg.rfind("\n", lo, hi)
    if nl != -1:
        return nl + 1
    for pattern in (_NON_SPACE_THEN_SPACE, _DIGIT):
        last = None
        for m in pattern.finditer(seg, lo, hi):
            last = m
        if last is not None and last.end() > lo:
            return last.end() if pattern is _NON_SPACE_THEN_SPACE else max(last.start(), lo + 1)
    return None


# ---------------------------------------------------------------- Hugging Face files
def _hf_tokenizer(proto: model_pb2.ModelProto):
    """A `tokenizers.Tokenizer` giving SentencePiece's ids (as encoded by `Tokenizer`) for every text.

    No normalizer or pre-tokenizer: pieces carry real spaces instead of ``▁``, so the name ``▁`` is free
    for the literal-U+2581 piece, and no text character can be confused with an escaped space.
    Newline, tab, literal U+2581 and extra tokens are non-special added tokens (cut out first, like the
    wrapper does); <s> etc. are not added tokens, so "<s>" in text is ordinary text, as in SentencePiece.
    """
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as HFTokenizer

    names = []
    for p in proto.pieces:
        if p.piece == LITERAL_SPACE_MARK and p.type == _Piece.CONTROL:
            names.append(_SPACE)
        elif p.type in (_Piece.NORMAL, _Piece.USER_DEFINED):
            names.append(p.piece.replace(_SPACE, " "))
        else:
            names.append(p.piece)
    if proto.trainer_spec.model_type == model_pb2.TrainerSpec.UNIGRAM:
        vocab = [(n, p.score if p.type == _Piece.NORMAL else _HF_NEVER) for n, p in zip(names, proto.pieces)]
        model = models.Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=True)
    else:
        ids = {n: i for i, n in enumerate(names)}
        merges = _bpe_merges(proto, names, ids)
        model = models.BPE(vocab=ids, merges=merges, unk_token=names[proto.trainer_spec.unk_id], byte_fallback=True)
    tok = HFTokenizer(model)
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    symbols = [n for n, p in zip(names, proto.pieces) if p.type == _Piece.USER_DEFINED or n in (*_LAYOUT, _SPACE)]
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in symbols])
    return tok


def _bpe_merges(proto: model_pb2.ModelProto, names: list[str], ids: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, best merged-piece score first.

    SentencePiece's BPE encoder repeatedly merges the adjacent pair whose concatenation is the
    highest-scoring piece, whatever two parts it came from; listing every split reproduces that.
    """
    normal = {n: p.score for n, p in zip(names, proto.pieces) if p.type == _Piece.NORMAL}
    merges = []
    for piece, score in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                merges.append((-score, ids[left], ids[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def _write_hf_files(proto: model_pb2.ModelProto, out: Path) -> None:
    specials = {f"{k}_token": v for k, v in SPECIAL_TOKENS.items()}
    masked = any(p.piece == MASK_TOKEN and p.type == _Piece.USER_DEFINED for p in proto.pieces)
    if masked:
        # a masked-LM tokenizer: what pipeline("fill-mask") and BERT-style heads look up (the masked model
        # reads <s> as its [CLS] and </s> as its [SEP])
        specials.update(mask_token=MASK_TOKEN, cls_token=SPECIAL_TOKENS["bos"], sep_token=SPECIAL_TOKENS["eos"])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": HF_MODEL_MAX_LENGTH,
        **specials,
        # "<s>" in text is text (as in SentencePiece), not BOS; but a masked LM's "<mask>" in text must be the
        # mask (fill-mask), and transformers 5 splits every declared special token alike: there, as in BERT,
        # special tokens written in the text are those tokens
        "split_special_tokens": not masked,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    atomic_write_text(out / "tokenizer.json", _hf_tokenizer(proto).to_str(pretty=True))
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(out / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")
