"""Fine-tuning with real DeepSpeed engines: restore from sharded pretraining checkpoints (another
world size, ZeRO-3), the four tasks beat chance, freezing, the auxiliary LM loss, best-checkpoint
selection, metrics.json + TensorBoard, and the exported model in transformers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import finetune_data as fd
import pytest
import torch
from conftest import REPO, pretrain_tiny, read_scalars, run_stage, slowed_env, stage_env

FAST = ["--precision=fp32", "--optim.lr=2e-3", "--optim.warmup_steps=10", "--task.max_seq_len=64",
        "--train.log_every=5"]


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory, shards_dir) -> Path:
    return pretrain_tiny(tmp_path_factory.mktemp("pre") / "masked", shards_dir, 1, "--model.kind=masked",
                     "--model.dropout=0.0")


def _finetune(preset: str, run_dir: Path, init_from: Path, train: Path, test: Path | None, *extra: str,
              nproc: int = 1, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = [f"configs/finetune/{preset}.yaml", f"--run_dir={run_dir}", f"--init_from={init_from}",
            f"--data.train={train}", *([f"--data.test={test}"] if test else []), *FAST, *extra]
    return run_stage("finetune", args, nproc=nproc, check=check, env=env)


def _cfg(**kw):
    from finetune.config import FinetuneConfig
    from lmforge.config import from_dict

    return from_dict(FinetuneConfig, {"init_from": "x", "data": {"train": "x"}, **kw})


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _pretrained_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from pretrain.checkpoint import latest_checkpoint
    from pretrain.export import fp32_state_dict

    return fp32_state_dict(latest_checkpoint(run_dir))


def _safetensors(d: Path) -> dict[str, torch.Tensor]:
    from finetune.model import load_hf_weights

    return load_hf_weights(d)


# ---------------------------------------------------------------- restore
def test_restored_backbone_equals_the_2rank_zero3_checkpoint(tmp_path, causal_zero3):
    from finetune.model import build_module, resolve_backbone
    from finetune.tasks import SequenceClassification, Vocab

    state = json.loads((causal_zero3 / "checkpoints" / "step_00000020" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["zero_stage"] == 3
    cfg = _cfg(run_dir=str(tmp_path / "ft"), init_from=str(causal_zero3))
    backbone = resolve_backbone(cfg, rank=0)
    assert backbone.model.kind == "causal" and backbone.source["world_size"] == 2
    task = SequenceClassification(cfg, None, Vocab(1, 2, 3), "causal")
    task.labels = ["a", "b"]
    module = build_module(cfg, task, backbone)
    pre = _pretrained_weights(causal_zero3)
    base = module.task_model.model.state_dict()
    compared = 0
    for k, v in pre.items():
        if k.startswith("model."):
            assert torch.equal(base[k[len("model."):]], v), k
            compared += 1
    assert compared == len([k for k in base if "rotary" not in k]) > 10


def test_classification_from_zero3_checkpoint_frozen_backbone_is_bit_identical(tmp_path, causal_zero3):
    """2-rank ZeRO-3 pretrain → 1-process fine-tune of the head only, the task model built partitioned
    (zero.Init) and the weights copied in: the exported backbone is exactly the pretrained one."""
    train, test = fd.classification(tmp_path / "train.csv", 200, 1), fd.classification(tmp_path / "test.csv", 80, 2)
    run = tmp_path / "head_only"
    _finetune("classify", run, causal_zero3 / "checkpoints" / "step_00000020", train, test,
              "--transfer.freeze_backbone=true", "--train.max_steps=10", "--zero.stage=3", "--zero.partitioned_init=true")
    exported = _safetensors(run / "export")
    pre = _pretrained_weights(causal_zero3)
    for k, v in pre.items():
        if k.startswith("model."):
            assert torch.equal(exported[k], v), k
    m = _metrics(run)
    assert m["n_trainable_params"] == 2 * 128 and m["init_from"]["zero_stage"] == 3 and m["world_size"] == 1


def test_zero3_partitioned_build_trains_exactly_like_the_whole_build(tmp_path, masked_run):
    """2-rank ZeRO-3 fine-tune with the task model built partitioned (default) and built whole on every
    rank: the same weights go in, so the same losses come out, with the aux MLM head and per-layer groups.
    (The causal partitioned load is checked bit for bit by the frozen-backbone ZeRO-3 test.)"""
    train = fd.classification(tmp_path / "train.csv", 120, 1)
    src = masked_run
    common = ["--zero.stage=3", "--train.max_steps=6", "--train.log_every=1", "--train.micro_batch_size=4",
              "--transfer.aux_lm_weight=0.3", "--transfer.layerwise_lr_decay=0.8"]
    runs = {}
    for name, extra in {"partitioned": ["--zero.partitioned_init=true"], "whole": ["--zero.partitioned_init=false"]}.items():
        proc = _finetune("classify", tmp_path / name, src, train, None, *common, *extra, nproc=2)
        runs[name] = (proc.stdout, read_scalars(tmp_path / name))
    def banner(out: str) -> list[str]:  # "fine-tune RUN_DIR: what, params, ..." less the run dir
        return [ln.split(": ", 1)[1] for ln in out.splitlines() if ln.startswith("fine-tune ")]

    part, whole = banner(runs["partitioned"][0]), banner(runs["whole"][0])
    assert len(part) == 1 and "ZeRO-3 (built partitioned)," in part[0] and "ZeRO-3," in whole[0]
    assert part[0].replace(" (built partitioned)", "") == whole[0]
    for tag in ("train/loss", "train/task_loss", "train/lm_loss"):
        assert len(runs["partitioned"][1][tag]) == 6
        assert runs["partitioned"][1][tag] == runs["whole"][1][tag], tag


def test_zero3_finetune_resumed_on_one_rank_continues_the_two_rank_curve(tmp_path, causal_zero3):
    """A 2-rank ZeRO-3 fine-tune (per-layer lr groups: the groups DeepSpeed's universal load mixes up)
    checkpointed at step 4, resumed on 1 rank through the universal format by the same restore path as
    pretraining: the loss curve continues the uninterrupted 2-rank run's."""
    train = fd.classification(tmp_path / "train.csv", 200, 1)
    common = ["--zero.stage=3", "--train.max_steps=8", "--train.log_every=1", "--train.global_batch_size=8",
              "--transfer.layerwise_lr_decay=0.8", "--checkpoint.interval_steps=4", "--checkpoint.keep_every=4"]
    straight = tmp_path / "straight"
    _finetune("classify", straight, causal_zero3, train, None, *common, "--train.micro_batch_size=4", nproc=2)
    resumed = tmp_path / "resumed"
    out = _finetune("classify", resumed, causal_zero3, train, None, *common, "--train.micro_batch_size=4",
                    f"--resume={straight / 'checkpoints' / 'step_00000004'}", nproc=1)
    assert "universal: 2 → 1 ranks" in out.stdout and "at step 4" in out.stdout
    want, got = dict(read_scalars(straight)["train/loss"]), dict(read_scalars(resumed)["train/loss"])
    assert sorted(got) == [5, 6, 7, 8]  # the resumed run starts after the checkpoint
    assert abs(got[5] - want[5]) < 1e-5  # the restored weights: the first loss after the resume is the same
    # then within fp32 noise (the 1-rank run sums 2 micro-batches where 2 ranks reduced 1 each); a drift
    # of the optimizer's step counter, or weight decay on every group, shows as ~1e-3 here
    for step in (6, 7, 8):
        assert abs(got[step] - want[step]) < 1e-4, (step, got[step], want[step])
    state = json.loads((resumed / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["loader"]["consumed"] == 8 * 8  # the data position continued


# ---------------------------------------------------------------- the tasks
def test_sequence_classification_beats_chance_and_exports(tmp_path, causal_zero3):
    from transformers import AutoModelForSequenceClassification

    from data_pipeline.tokenizer import Tokenizer
    from finetune.data import read_records
    from finetune.tasks import SequenceClassification, Vocab

    train, test = fd.classification(tmp_path / "train.csv", 300, 1), fd.classification(tmp_path / "test.csv", 100, 2)
    run = tmp_path / "cls"
    proc = _finetune("classify", run, causal_zero3, train, test, "--train.epochs=4", "--optim.lr=null")
    m = _metrics(run)
    # the preset's lr is scaled with the backbone's width (tiny: d 128), and the run says so first
    assert "fine-tuning lr 3.00e-04 (auto: 5e-05 x 768 / hidden_size 128" in proc.stdout
    assert m["lr"] == pytest.approx(3e-4) and m["pooling"] == "last"
    assert m["test/accuracy"] >= 0.85 and m["test/macro_f1"] >= 0.85, m  # chance: 0.5
    assert {"eval/loss", "eval/accuracy", "test/loss"} <= m.keys() and m["labels"] == ["bad", "good"]
    assert m["examples"] == {"train": 270, "validation": 30, "test": 100}  # validation split from train
    best = json.loads((run / "checkpoints" / "best").read_text())
    assert best["metric"] == "eval/accuracy" and m["checkpoint"] == best["tag"]
    tags = read_scalars(run)
    assert {"train/loss", "train/lr", "train/tokens_per_sec", "eval/accuracy", "test/accuracy"} <= tags.keys()
    assert tags["test/accuracy"][-1][1] == pytest.approx(m["test/accuracy"])

    # the export loads in transformers with its label names and reproduces the test accuracy
    model = AutoModelForSequenceClassification.from_pretrained(run / "export").eval()
    assert model.config.id2label == {0: "bad", 1: "good"}
    tok = Tokenizer.load(run / "export")
    task = SequenceClassification(_cfg(task={"max_seq_len": 64}),
                                  tok, Vocab(tok.bos_id, tok.eos_id, tok.pad_id), "causal")
    task.labels = ["bad", "good"]
    feats = task.encode(read_records(test), "test")
    with torch.no_grad():
        batch = task.collate(feats)
        pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    # compare counts of right answers, not float32 means (0.9700000286 != 0.97 on another CPU)
    correct = int((pred == batch["labels"]).sum())
    assert correct == round(m["test/accuracy"] * len(feats)), (correct, m["test/accuracy"], len(feats))
    # and through transformers' own tokenizer (pipeline("text-classification")), the same ids: <s> text
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(run / "export")
    texts = [r.fields["text"] for r in read_records(test)]
    assert [hf(t)["input_ids"] for t in texts] == [f["input_ids"] for f in feats]


def test_masked_pairs_on_two_ranks_with_partial_freezing(tmp_path, masked_run):
    """BERT-style backbone, text pairs from JSONL, 2 ranks ZeRO-2; the first layer frozen: it stays
    bit-identical, the rest moves. Both exports (the backbone at the start, the fine-tuned model at
    the end) are slowed past the process-group timeout, as at 7B: no collective may wait on them."""
    train = fd.classification(tmp_path / "train.jsonl", 300, 1, fmt="jsonl", pair=True)
    test = fd.classification(tmp_path / "test.jsonl", 100, 2, fmt="jsonl", pair=True)
    run = tmp_path / "bert"
    slow = slowed_env(tmp_path / "site", {"pretrain.export:export": 12, "finetune.model:export_task_model": 12})
    _finetune("classify", run, masked_run, train, test, "--train.epochs=6", "--zero.stage=2", "--optim.lr=1e-3",
              "--train.micro_batch_size=8", "--dist.timeout_s=6",
              "--transfer.freeze_layers=1", nproc=2, env=slow)
    m = _metrics(run)
    assert m["test/accuracy"] >= 0.8, m
    pre, out = _pretrained_weights(masked_run), _safetensors(run / "export")
    frozen = [k for k in pre if k.startswith("bert.encoder.layer.0.")]
    moved = [k for k in pre if k.startswith("bert.encoder.layer.1.")]
    assert frozen and moved
    for k in frozen:
        assert torch.equal(out[k], pre[k]), k
    assert all(not torch.equal(out[k], pre[k]) for k in moved if k.endswith(".weight"))
    # transformers' tokenizer of the export frames a pair as fine-tuning did: <s> A </s> B </s>, B typed 1
    from transformers import AutoTokenizer

    from data_pipeline.tokenizer import Tokenizer
    from finetune.data import read_records
    from finetune.tasks import SequenceClassification, Vocab

    tok = Tokenizer.load(run / "export")
    task = SequenceClassification(_cfg(task={"max_seq_len": 256}), tok, Vocab(tok.bos_id, tok.eos_id, tok.pad_id), "masked")
    task.labels = sorted({r.fields["label"] for r in read_records(test)})
    feats = task.encode(read_records(test), "test")
    hf = AutoTokenizer.from_pretrained(run / "export")
    enc = [hf(r.fields["text"], r.fields["text_pair"], return_token_type_ids=True) for r in read_records(test)]
    assert [e["input_ids"] for e in enc] == [f["input_ids"] for f in feats]
    assert [e["token_type_ids"] for e in enc] == [f["token_type_ids"] for f in feats]


def test_token_classification_conll(tmp_path, causal_zero3):
    from transformers import AutoModelForTokenClassification

    train, test = fd.conll(tmp_path / "train.conll", 300, 1), fd.conll(tmp_path / "test.conll", 100, 2)
    run = tmp_path / "ner"
    _finetune("ner", run, causal_zero3, train, test, "--train.epochs=5", "--transfer.freeze_embeddings=true")
    m = _metrics(run)
    emb = "model.embed_tokens.weight"
    assert torch.equal(_safetensors(run / "export")[emb], _pretrained_weights(causal_zero3)[emb])  # frozen
    assert m["test/entity_f1"] >= 0.8, m  # the entity types are random to a model that has not learned
    assert set(m["labels"]) == {"O", "B-PER", "B-LOC", "I-LOC"} and m["labels"][0] == "O"
    model = AutoModelForTokenClassification.from_pretrained(run / "export")
    assert set(model.config.label2id) == set(m["labels"])


def test_question_answering_with_long_contexts(tmp_path, causal_zero3):
    train, test = fd.squad(tmp_path / "train.json", 250, 1), fd.squad(tmp_path / "test.json", 60, 2)
    run = tmp_path / "qa"
    _finetune("qa", run, causal_zero3, train, test, "--task.doc_stride=16", "--train.epochs=4")
    m = _metrics(run)
    assert m["test/exact_match"] >= 0.7 and m["test/f1"] >= 0.7, m  # chance: ~0
    assert m["features"]["test"] > m["examples"]["test"] == 60  # long contexts were split into windows


def test_sft_from_an_hf_export(tmp_path, causal_zero3):
    export = tmp_path / "hf"
    run_stage("pretrain.export", [str(causal_zero3), "--out", str(export)])
    train, test = fd.sft(tmp_path / "train.jsonl", 300, 1), fd.sft(tmp_path / "test.jsonl", 24, 2)
    run = tmp_path / "sft"
    _finetune("sft", run, export, train, test, "--train.epochs=10", "--task.max_new_tokens=4", "--task.num_samples=2")
    m = _metrics(run)
    assert m["test/exact_match"] >= 0.5 and m["eval/loss"] < 0.5, m  # 6 colours: chance ~0 for free generation
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and sum(s["generated"] == s["reference"] for s in samples) / 24 == m["test/exact_match"]
    assert m["init_from"]["hf_dir"] == str(export.resolve())


# ---------------------------------------------------------------- the auxiliary LM loss
@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_aux_lm_loss_is_task_plus_lambda_lm(tmp_path, causal_zero3, masked_run, kind):
    """L = L_task + λ L_lm, with L_task as transformers' task model computes it and L_lm as the
    pretrained LM computes it on the same text."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from data_pipeline.tokenizer import Tokenizer
    from finetune.model import build_module, resolve_backbone
    from finetune.tasks import SequenceClassification, Vocab
    from pretrain.model import apply_mlm_masking

    src = causal_zero3 if kind == "causal" else masked_run
    cfg = _cfg(run_dir=str(tmp_path / "ft"), init_from=str(src), transfer={"aux_lm_weight": 0.5},
               task={"max_seq_len": 64})
    backbone = resolve_backbone(cfg, rank=0)
    tok = Tokenizer.load(backbone.hf_dir)
    task = SequenceClassification(cfg, tok, Vocab(tok.bos_id, tok.eos_id, tok.pad_id), kind)
    task.labels = ["bad", "good"]
    fd.classification(tmp_path / "d.csv", 6, 3)
    from finetune.data import read_records

    batch = task.collate(task.encode(read_records(tmp_path / "d.csv"), "train"))
    torch.manual_seed(0)
    module = build_module(cfg, task, backbone).eval()
    extra = {}
    if kind == "masked":
        mask = tok.token_to_id("<mask>")
        inputs, labels = apply_mlm_masking(batch["input_ids"], mask, tok.vocab_size, [0, 1, 2, 3],
                                           generator=torch.Generator().manual_seed(1))
        extra = {"mlm_input_ids": inputs, "mlm_labels": labels}
    with torch.no_grad():
        out = module(**batch, **extra)
        ref_task = module.task_model(**{k: v for k, v in batch.items()}).loss
        if kind == "causal":
            lm = AutoModelForCausalLM.from_pretrained(backbone.hf_dir).eval()
            targets = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            ref_lm = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=targets).loss
        else:
            lm = AutoModelForMaskedLM.from_pretrained(backbone.hf_dir).eval()
            ref_lm = lm(input_ids=extra["mlm_input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch["token_type_ids"], labels=extra["mlm_labels"]).loss
    assert out["task_loss"].item() == pytest.approx(ref_task.item(), rel=1e-5)
    assert out["lm_loss"].item() == pytest.approx(ref_lm.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["task_loss"].item() + 0.5 * out["lm_loss"].item(), rel=1e-6)
    assert out["lm_loss"].item() < math.log(tok.vocab_size)  # the pretrained head, not a fresh one


def test_aux_lm_weight_in_training_logs_both_parts(tmp_path, causal_zero3):
    train = fd.classification(tmp_path / "train.csv", 100, 1)
    run = tmp_path / "aux"
    _finetune("classify", run, causal_zero3, train, None, "--transfer.aux_lm_weight=0.3", "--train.max_steps=6",
              "--train.log_every=1")
    s = read_scalars(run)
    assert {"train/task_loss", "train/lm_loss"} <= s.keys()
    assert all(v > 0 for _, v in s["train/lm_loss"])


# ---------------------------------------------------------------- units: metrics, encodings, groups
def test_entity_f1_matches_seqeval_semantics():
    from finetune.metrics import entities, entity_prf

    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3)}
    assert entities(["I-PER", "I-PER", "B-PER"]) == {("PER", 0, 1), ("PER", 2, 2)}  # I after O starts a chunk
    assert entities(["B-PER", "I-LOC"]) == {("PER", 0, 0), ("LOC", 1, 1)}
    assert entities(["S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC"], "BIOES") == {
        ("PER", 0, 0), ("LOC", 1, 3), ("LOC", 4, 4)}
    r = entity_prf([["B-PER", "O", "B-LOC"]], [["B-PER", "O", "B-ORG"]])
    assert r["entity_precision"] == 0.5 and r["entity_recall"] == 0.5 and r["entity_f1"] == 0.5


def test_squad_metrics():
    from finetune.metrics import squad_scores

    s = squad_scores(["The Eiffel tower!", "blue"], [["eiffel tower"], ["dark blue", "navy"]])
    assert s["exact_match"] == 0.5 and s["f1"] == pytest.approx((1 + 2 / 3) / 2)


def _task(kind_of_task: str, tok_dir: Path, **task_kw):
    from data_pipeline.tokenizer import Tokenizer
    from finetune.tasks import TASK_CLASSES, Vocab

    tok = Tokenizer.load(tok_dir)
    cfg = _cfg(task={"type": kind_of_task, **task_kw})
    return TASK_CLASSES[kind_of_task](cfg, tok, Vocab(tok.bos_id, tok.eos_id, tok.pad_id), "causal"), tok


def test_the_default_lr_scales_with_the_width():
    from finetune.config import auto_lr

    assert auto_lr(768)[0] == pytest.approx(5e-5)  # BERT-base's recipe at BERT-base's width
    assert auto_lr(128)[0] == pytest.approx(3e-4) and auto_lr(4096)[0] == pytest.approx(9.375e-6)
    assert auto_lr(128, freeze_backbone=True)[0] == pytest.approx(3e-3)


def test_a_causal_classifier_pools_the_last_word_or_a_closing_eos(tmp_path, tokenizer_dir):
    from finetune.data import read_records
    from finetune.tasks import SequenceClassification, Vocab

    rows = read_records(fd.classification(tmp_path / "c.csv", 4, 1))
    last, tok = _task("sequence_classification", tokenizer_dir, max_seq_len=12)  # the default: "last"
    eos, _ = _task("sequence_classification", tokenizer_dir, max_seq_len=12, pooling="eos")
    last.labels = eos.labels = ["bad", "good"]
    for a, b in zip(last.encode(rows, "train"), eos.encode(rows, "train")):
        assert b["input_ids"][-1] == tok.eos_id and a["input_ids"][-1] != tok.eos_id
        assert a["input_ids"][0] == b["input_ids"][0] == tok.bos_id and len(a["input_ids"]) <= 12
        assert a["input_ids"] == b["input_ids"][:-1] or len(b["input_ids"]) == 12  # only truncation differs
    masked = SequenceClassification(last.cfg, tok, Vocab(tok.bos_id, tok.eos_id, tok.pad_id), "masked")
    masked.labels = last.labels
    assert all(f["input_ids"][-1] == tok.eos_id for f in masked.encode(rows, "train"))  # BERT's [SEP] stays


def test_mean_pooling_reads_the_mean_state_of_the_text_whatever_the_padding(tmp_path, tokenizer_dir):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    from finetune.data import read_records
    from finetune.model import FinetuneModule, mean_pool

    rows = read_records(fd.classification(tmp_path / "c.csv", 4, 1))
    mean, tok = _task("sequence_classification", tokenizer_dir, max_seq_len=12, pooling="mean")
    mean.labels = ["bad", "good"]
    feats = mean.encode(rows, "train")
    assert all(f["input_ids"][0] == tok.bos_id and f["input_ids"][-1] != tok.eos_id for f in feats)  # as "last"
    h = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    pooled = mean_pool(h, torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert torch.equal(pooled, torch.stack([h[0, 1:].mean(0), h[1, 1]]))  # neither <s> nor padding counts
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_labels=2, pad_token_id=tok.pad_id)
    module = FinetuneModule(mean, LlamaForSequenceClassification(conf).eval(), "causal", 0.0, None, "mean").eval()
    ids = torch.tensor([feats[0]["input_ids"]])
    alone = module(ids, torch.ones_like(ids), labels=torch.tensor([0]))["logits"]
    padded = torch.cat([ids, torch.full((1, 5), tok.pad_id)], 1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 5, dtype=ids.dtype)], 1)
    assert torch.allclose(module(padded, mask, labels=torch.tensor([0]))["logits"], alone, atol=1e-5)
    last = FinetuneModule(mean, module.task_model, "causal", 0.0, None, "last")
    assert not torch.allclose(last(ids, torch.ones_like(ids), labels=torch.tensor([0]))["logits"], alone)
    # masked: the mean through BERT's pooler
    bert = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=2,
                                                    pad_token_id=tok.pad_id)).eval()
    masked = FinetuneModule(mean, bert, "masked", 0.0, None, "mean").eval()
    alone = masked(ids, torch.ones_like(ids), labels=torch.tensor([0]))["logits"]
    assert torch.allclose(masked(padded, mask, labels=torch.tensor([0]))["logits"], alone, atol=1e-5)
    first = FinetuneModule(mean, bert, "masked", 0.0, None, "last")
    assert not torch.allclose(first(ids, torch.ones_like(ids), labels=torch.tensor([0]))["logits"], alone)


def test_qa_windows_point_at_the_answer(tmp_path, tokenizer_dir):
    from finetune.data import read_squad

    task, tok = _task("question_answering", tokenizer_dir, max_seq_len=48, doc_stride=12)
    exs = read_squad(fd.squad(tmp_path / "q.json", 8, 5, long_every=1))
    feats = task.encode(exs, "train")
    assert len(feats) > len(exs)  # every context is long: split
    hits = 0
    for f in feats:
        ex = exs[f["example"]]
        if f["start_positions"]:
            a, b = f["start_positions"] - f["offset"], f["end_positions"] - f["offset"]
            text = ex.fields["context"][f["spans"][a][0]:f["spans"][b][1]]
            assert text.strip() == ex.fields["answers"][0][0]
            hits += 1
        assert len(f["input_ids"]) <= 48
    assert hits >= len(exs)  # each answer lies whole in at least one window


def test_sft_loss_only_on_the_response_and_packing(tmp_path, tokenizer_dir):
    from finetune.data import read_records

    task, tok = _task("sft", tokenizer_dir, max_seq_len=128)
    exs = read_records(fd.sft(tmp_path / "s.jsonl", 10, 1))
    feats = task.encode(exs, "validation")
    for f, ex in zip(feats, exs):
        resp = [i for i, lab in zip(f["input_ids"], f["labels"]) if lab != -100]
        assert tok.decode(resp) == ex.fields["response"] and resp[-1] == tok.eos_id
        assert tok.decode(f["input_ids"][: f["prompt_len"]]).endswith("### Response:\n")
    task.cfg.task.packing = True
    packed = task.encode(exs, "train")
    assert len(packed) < len(feats) and all(len(p["input_ids"]) <= 128 for p in packed)
    assert sum(len(p["input_ids"]) for p in packed) == sum(len(f["input_ids"]) for f in feats)


def test_layerwise_lr_decay_groups(tmp_path, causal_zero3):
    from finetune.model import build_module, param_groups, resolve_backbone
    from finetune.tasks import SequenceClassification, Vocab

    cfg = _cfg(run_dir=str(tmp_path / "ft"), init_from=str(causal_zero3), transfer={"layerwise_lr_decay": 0.5},
               optim={"lr": 1.0})
    task = SequenceClassification(cfg, None, Vocab(1, 2, 3), "causal")
    task.labels = ["a", "b"]
    module = build_module(cfg, task, resolve_backbone(cfg, rank=0))
    groups = param_groups(module, cfg)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(module.named_parameters())
    L = 4
    assert lr_of[id(named["task_model.model.embed_tokens.weight"])] == 0.5 ** (L + 1)
    assert lr_of[id(named["task_model.model.layers.0.mlp.up_proj.weight"])] == 0.5 ** L
    assert lr_of[id(named["task_model.model.layers.3.mlp.up_proj.weight"])] == 0.5
    assert lr_of[id(named["task_model.score.weight"])] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(list(module.parameters()))


# ---------------------------------------------------------------- bad input
def test_bad_input_is_one_line_naming_file_and_row(tmp_path, causal_zero3):
    from finetune.data import read_conll, read_records, read_squad
    from lmforge.errors import DataError

    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty.csv: no records"):
        read_records(tmp_path / "empty.csv")
    (tmp_path / "empty.conll").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty.conll: no sentences"):
        read_conll(tmp_path / "empty.conll")
    q = json.loads(fd.squad(tmp_path / "q.json", 3, 1).read_text())
    q["data"][0]["paragraphs"][1]["qas"][0]["answers"][0]["answer_start"] = 10_000
    (tmp_path / "bad.json").write_text(json.dumps(q))
    with pytest.raises(DataError, match=r"bad.json data\[0\].paragraphs\[1\].qas\[0\]: answer .* outside the context"):
        read_squad(tmp_path / "bad.json")

    train = fd.classification(tmp_path / "train.csv", 40, 1)
    (tmp_path / "nolabel.csv").write_text("text,category\nsome words,good\nmore words,bad\nother words,good\n")
    (tmp_path / "newlabel.csv").write_text("text,label\nsome words,good\nother words,neutral\n")
    cases = [
        (["--data.train=" + str(tmp_path / "nolabel.csv")], r"nolabel.csv row \d: no column 'label' \(columns: category, text\)"),
        (["--data.train=" + str(train), "--data.test=" + str(tmp_path / "newlabel.csv")],
         r"newlabel.csv row 2: label 'neutral' is not among the training labels"),
        (["--data.train=" + str(train), "--task.labels=[good,meh]"], r"train.csv row \d+: label 'bad' is not one of task.labels"),
        (["--data.train=" + str(tmp_path / "empty.csv")], r"empty.csv: no records"),
    ]
    for i, (args, pattern) in enumerate(cases):
        proc = subprocess.run([sys.executable, "-m", "finetune", "configs/finetune/classify.yaml",
                               f"--run_dir={tmp_path / f'r{i}'}", f"--init_from={causal_zero3}", *args, *FAST],
                              cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and __import__("re").search(pattern, last), last


# ---------------------------------------------------------------- resume, early stop
def test_interrupted_finetune_resumes_exactly(tmp_path, causal_zero3):
    train, test = fd.classification(tmp_path / "train.csv", 120, 1), fd.classification(tmp_path / "test.csv", 40, 2)
    common = ["--train.max_steps=12", "--train.log_every=1", "--train.micro_batch_size=8", "--zero.stage=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    _finetune("classify", straight, causal_zero3, train, test, *common, nproc=2)
    first = _finetune("classify", split, causal_zero3, train, test, *common, "--train.exit_interval=5", nproc=2)
    assert "stopped at step 5" in first.stdout and not (split / "metrics.json").exists()
    second = _finetune("classify", split, causal_zero3, train, test, *common, nproc=2)
    assert "resumed from" in second.stdout
    a, b = read_scalars(straight)["train/loss"], read_scalars(split)["train/loss"]
    assert [s for s, _ in b] == list(range(1, 13)) and a == b  # one continuous, identical curve
    ma, mb = _metrics(straight), _metrics(split)
    assert ma["test/accuracy"] == mb["test/accuracy"] and ma["best"] == mb["best"]
    third = _finetune("classify", split, causal_zero3, train, test, *common, nproc=2)
    assert "is finished" in third.stdout  # a finished run is reported, not redone


def test_early_stopping(tmp_path, causal_zero3):
    train = fd.classification(tmp_path / "train.csv", 64, 1)
    run = tmp_path / "es"
    proc = _finetune("classify", run, causal_zero3, train, None, "--train.max_steps=60", "--train.eval_every=2",
                     "--train.early_stopping_patience=2", "--train.select_metric=loss", "--optim.lr=0",
                     "--optim.warmup_steps=0")
    # lr 0: the validation loss never improves after the first evaluation → stop after 2 more
    assert "early stop at step 6" in proc.stdout, proc.stdout[-2000:]
    m = _metrics(run)
    assert m["steps"] == 6 and m["best"]["step"] == 2 and m["checkpoint"] == "step_00000002"


def test_readers_datasets_dir_and_tagging_jsonl(tmp_path):
    import datasets

    from finetune.data import read_conll, read_records, split_validation
    from lmforge.errors import DataError

    datasets.Dataset.from_list([{"text": f"t{i}", "label": i % 2} for i in range(5)]).save_to_disk(tmp_path / "ds")
    exs = read_records(tmp_path / "ds")
    assert [e.fields["label"] for e in exs] == [0, 1, 0, 1, 0] and exs[2].source.endswith("ds row 3")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a", "label": 0}])}).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataError, match=r"dd: holds splits \['train'\]; pass one of them"):
        read_records(tmp_path / "dd")
    (tmp_path / "t.jsonl").write_text(json.dumps({"tokens": ["alice", "went"], "ner_tags": ["B-PER", "O"]}) + "\n")
    assert read_conll(tmp_path / "t.jsonl")[0].fields == {"tokens": ["alice", "went"], "tags": ["B-PER", "O"]}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"tokens": ["alice", "went"], "tags": ["B-PER"]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl row 1: 'tokens' and 'tags' must be lists of the same length"):
        read_conll(tmp_path / "bad.jsonl")
    a, b = split_validation(exs, 0.4, seed=3)
    a2, b2 = split_validation(exs, 0.4, seed=3)
    assert len(b) == 2 and len(a) == 3 and [e.source for e in b] == [e.source for e in b2]  # seeded
