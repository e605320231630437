"""The SentencePiece tokenizer: lossless on real code and odd text, Hugging Face parity, determinism."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from data_pipeline.sources import default_corpus_paths
from data_pipeline.tokenizer import (
    LITERAL_SPACE_MARK,
    SPECIAL_TOKENS,
    Tokenizer,
    sample_documents,
    train_tokenizer,
)
from lmforge.errors import ConfigError, DataError

VOCAB = 1000
EXTRAS = ["<|endoftext|>", "<mask>"]
ODD = [
    "",
    " ",
    "\n",
    "  leading and trailing  ",
    "a\tb\t\tc\n\n\n",
    "crlf\r\nline\r\n\r\n",
    "run   of    spaces  ",
    "    def f(x):\n        return x  # trailing   \n\t\n",
    "emoji 👍🏽 👨‍👩‍👧 🇺🇸",
    "CJK 日本語のテキスト、中文。한국어",
    "combining e\u0301 a\u0308 \u0915\u094d\u0937",
    "controls \x00\x01\x07\x1b[31m\x7f\u200b\u2028\ufeff\x0b\x0c",
    "never seen: \U0001f9ec \u16a0 \U00013000",
    "lookalikes <s> </s> <pad> <unk> <0x41> <U+2581> <s",
    "literal \u2581 mark\u2581\u2581 \u2581x\u2581",
    "<|endoftext|>x<mask><mask>y<|endoftext",
    "digits 1234567890 3.14159e-10",
    "x" * 5000,
    "word " * 2000,
    "9" * 6000,
    "中" * 6000,
    " " * 300 + "\n" * 50 + "\t" * 20,
]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """300 real standard-library files (deterministic choice)."""
    paths = default_corpus_paths()
    chosen = paths[:: max(1, len(paths) // 300)][:300]
    return [Path(p).read_text(encoding="utf-8", errors="replace") for p in chosen]


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def trained(request, tmp_path_factory, docs) -> Tokenizer:
    out = tmp_path_factory.mktemp(f"tok_{request.param}")
    return train_tokenizer(
        iter(docs[::2]), out, VOCAB, request.param, sample_docs=150, extra_special_tokens=EXTRAS,
        max_sample_chars=1_500_000,
    )


def test_lossless_round_trip(trained, docs):
    texts = ODD + docs
    ids = trained.encode_batch(texts)
    assert [trained.decode(x) for x in ids] == texts
    assert [trained.encode(t) for t in ODD] == ids[: len(ODD)]
    flat = {i for x in ids for i in x}
    assert max(flat) < VOCAB and trained.unk_id not in flat  # byte fallback: never <unk>
    assert {trained.bos_id, trained.eos_id, trained.pad_id}.isdisjoint(flat)  # no BOS/EOS added, "<s>" is text


def test_hugging_face_gives_sentencepiece_ids(trained, docs):
    from tokenizers import Tokenizer as RawHF
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(trained.model_path.parent)
    assert hf.is_fast and len(hf) == VOCAB
    texts = ODD + docs + ["".join(docs[:100])]  # the last one is long enough to need exact chunking
    ids = trained.encode_batch(texts)
    # These tokenizers have <mask>: a masked LM's HF tokenizer reads special tokens written in the text as
    # those tokens, as BERT's do (fill-mask needs "<mask>" matched, and transformers 5 splits every declared
    # special token or none), so the ids agree on every text without a literal <s>, </s>, <pad> or <unk>.
    literal = [i for i, t in enumerate(texts) if any(s in t for s in ("<s>", "</s>", "<pad>", "<unk>"))]
    assert literal and len(literal) < 5
    wrong = [i for i, (t, x) in enumerate(zip(texts, ids)) if i not in literal
             and hf.encode(t, add_special_tokens=False) != x]
    assert wrong == [], f"ids differ for texts {wrong[:5]}"
    assert hf.encode("<s>x<mask>", add_special_tokens=False)[0] == trained.bos_id
    assert hf.encode("<s>x<mask>", add_special_tokens=False)[-1] == trained.token_to_id("<mask>") == hf.mask_token_id
    wrong = [i for i, (t, x) in enumerate(zip(texts, ids)) if hf.decode(x) != t]
    assert wrong == [], f"HF decode differs for texts {wrong[:5]}"
    raw = RawHF.from_file(str(trained.model_path.parent / "tokenizer.json"))  # tokenizers alone, no transformers
    assert [raw.encode(t, add_special_tokens=False).ids for t in ODD] == ids[: len(ODD)]


def test_special_ids_and_vocab_size(trained):
    from transformers import AutoTokenizer

    assert trained.vocab_size == VOCAB
    assert (trained.unk_id, trained.bos_id, trained.eos_id, trained.pad_id) == (0, 1, 2, 3)
    assert [trained.token_to_id(t) for t in SPECIAL_TOKENS.values()] == [0, 1, 2, 3]
    hf = AutoTokenizer.from_pretrained(trained.model_path.parent)
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert (hf.unk_token, hf.bos_token, hf.eos_token, hf.pad_token) == tuple(SPECIAL_TOKENS.values())
    assert trained.decode([trained.bos_id, *trained.encode("hi"), trained.eos_id, trained.pad_id]) == "hi"


def test_extra_special_tokens_are_single_tokens(trained):
    from transformers import AutoTokenizer

    eot, mask = (trained.token_to_id(t) for t in EXTRAS)
    assert (eot, mask) == (7, 8) and trained.extra_special_tokens == tuple(EXTRAS)
    assert trained.token_to_id("<not-a-token>") is None
    ids = trained.encode("a<mask>b<|endoftext|><mask>")
    assert ids.count(mask) == 2 and ids.count(eot) == 1 and ids[-2:] == [eot, mask]
    assert trained.decode(ids) == "a<mask>b<|endoftext|><mask>"
    hf = AutoTokenizer.from_pretrained(trained.model_path.parent)
    assert hf.encode("a<mask>b<|endoftext|><mask>", add_special_tokens=False) == ids


def test_literal_u2581_has_its_own_id(trained):
    lit = trained.token_to_id(LITERAL_SPACE_MARK)
    assert trained.encode("\u2581") == [lit] and trained.encode(" ") != [lit]
    assert trained.decode(trained.encode("a\u2581 b")) == "a\u2581 b"


def test_lone_surrogate_is_a_data_error(trained):
    with pytest.raises(DataError, match="surrogate"):
        trained.encode_batch(["fine", "bad \ud800 text"])


def test_load_by_model_file_save_copy_and_pickle(trained, tmp_path):
    again = Tokenizer.load(trained.model_path)
    assert again.fingerprint == trained.fingerprint
    trained.save(tmp_path / "copy")
    names = sorted(p.name for p in (tmp_path / "copy").iterdir())
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    copy = Tokenizer.load(tmp_path / "copy")
    assert copy.fingerprint == trained.fingerprint
    original = trained.model_path.parent / "tokenizer.json"
    assert (tmp_path / "copy" / "tokenizer.json").read_bytes() == original.read_bytes()
    clone = pickle.loads(pickle.dumps(trained))
    assert clone.encode_batch(ODD) == trained.encode_batch(ODD)


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_training_is_deterministic(tmp_path, docs, model_type):
    def fit(name: str, seed: int) -> Tokenizer:
        return train_tokenizer((d for d in docs[:80]), tmp_path / name, 700, model_type, sample_docs=40, seed=seed,
                               max_sample_chars=400_000)

    a, b, c = fit("a", 0), fit("b", 0), fit("c", 1)
    assert a.fingerprint == b.fingerprint
    assert a.model_path.read_bytes() == b.model_path.read_bytes()
    assert c.fingerprint != a.fingerprint  # another seed samples other documents


def test_sampling_is_bounded_and_deterministic():
    def stream():  # a generator: sampling must not need the whole corpus at once
        for i in range(5000):
            yield f"doc {i} " + "x" * (i % 700)

    a = sample_documents(stream(), 100, 20_000, seed=3)
    assert a == sample_documents(stream(), 100, 20_000, seed=3)
    assert a != sample_documents(stream(), 100, 20_000, seed=4)
    assert len(a) == 100 and sum(map(len, a)) <= 20_000
    small = [f"d{i} " * 50 for i in range(10)]
    assert sorted(sample_documents(iter(small), 100, 10**6, seed=0)) == sorted(small)  # small corpora stay whole


def test_missing_or_broken_tokenizer_is_a_data_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        Tokenizer.load(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="tokenizer not found"):
        Tokenizer.load(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.model").write_bytes(b"\x0a\xffnot a model")
    with pytest.raises(DataError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path / "bad")


def test_bad_training_arguments(tmp_path):
    with pytest.raises(ConfigError, match="model_type"):
        train_tokenizer(iter(["x"]), tmp_path, 1000, "wordpiece")
    with pytest.raises(ConfigError, match="too small"):
        train_tokenizer(iter(["x"]), tmp_path, 300)
    for bad in (["has space"], ["<s"], ["<s>"], ["<a>", "<a>"], [""], ["<0x41>"], ["a,b"]):
        with pytest.raises(ConfigError, match="extra_special_tokens"):
            train_tokenizer(iter(["x"]), tmp_path, 1000, extra_special_tokens=bad)
    with pytest.raises(DataError, match="empty"):
        train_tokenizer(iter([]), tmp_path, 1000)
    with pytest.raises(DataError, match="vocab_size"):
        train_tokenizer(iter(["tiny corpus"]), tmp_path, 5000)


def test_without_a_mask_token_special_lookalikes_in_text_stay_text_in_hugging_face(tmp_path, docs):
    from transformers import AutoTokenizer

    tok = train_tokenizer(iter(docs[:60]), tmp_path, 600, "bpe", sample_docs=60, max_sample_chars=300_000)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    text = "lookalikes <s> </s> <pad> <unk> <mask>"
    assert hf.mask_token is None and hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert tok.bos_id not in tok.encode(text)


def test_encode_concat_equals_encode_batch_for_any_call_size(tokenizer_dir, stdlib_files):
    """The build's encoder: the same ids as encode_batch (EOS after each text), whatever the characters per
    SentencePiece call, also for texts far longer than one call."""
    import numpy as np

    tok = Tokenizer.load(tokenizer_dir)
    texts = [Path(f).read_text(errors="replace") for f in stdlib_files[:12]]
    texts += ["", "x", "".join(texts)]  # an empty text, one character, one text of ~all the others
    want = [ids + [tok.eos_id] for ids in tok.encode_batch(texts)]
    for max_chars in (1, 1000, 1 << 16, 1 << 30):
        flat, lengths = tok.encode_concat(texts, np.uint16, append_id=tok.eos_id, max_chars=max_chars)
        assert lengths.tolist() == [len(w) for w in want]
        assert flat.tolist() == [i for w in want for i in w]
