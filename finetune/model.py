"""Restoring the pretrained backbone, putting a task head on it, freezing, and exporting.

``init_from`` may be a pretrain run directory (its ``latest`` checkpoint), one
``checkpoints/step_N`` directory, or a Hugging Face directory made by ``pretrain.export``. A
DeepSpeed checkpoint — any ZeRO stage, any world size — is merged once by rank 0 with
``pretrain.export`` into ``RUN_DIR/backbone/`` (a Hugging Face directory); every rank then loads that.

The trained module is :class:`FinetuneModule`: the transformers task model (e.g.
``LlamaForSequenceClassification``) whose heads are applied here to the backbone's hidden states,
plus the pretrained LM head for the auxiliary loss. Its ``task_model`` is what gets exported.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune.config import FinetuneConfig
from finetune.tasks import IGNORE, Task
from lmforge.config import load_config
from lmforge.errors import CheckpointError, ConfigError
from lmforge.io import atomic_write_text, staged_dir
from lmforge.log import print0
from lmforge.rundir import (
    checkpoints_dir,
    is_complete,
    is_run_dir,
    is_step_dir,
    latest_checkpoint,
    read_state,
    run_dir_of,
    state_file,
)
from pretrain.config import ModelConfig, PretrainConfig
from pretrain.dist import rank0_work

BACKBONE = "backbone"
SOURCE = "lmforge_source.json"  # in RUN_DIR/backbone: which checkpoint it was made from


@dataclass(frozen=True)
class Backbone:
    hf_dir: Path  # a Hugging Face directory with the pretrained LM (weights, config, tokenizer)
    model: ModelConfig
    source: dict[str, Any]  # where it came from (for metrics.json and resume checks)


# ---------------------------------------------------------------- init_from
def _is_hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def find_checkpoint(init_from: str) -> Path | None:
    """The step directory ``init_from`` names (a run dir → its latest), or None for an HF dir."""
    p = Path(init_from)
    if not p.exists():
        raise ConfigError(f"init_from: {p} does not exist; give a pretrain run dir, a checkpoints/step_N dir or an HF export")
    if _is_hf_dir(p):
        return None
    if is_run_dir(p):
        step = latest_checkpoint(p)
        if step is None:
            raise CheckpointError(f"init_from: {p} has no complete checkpoint in {checkpoints_dir(p)}; pretrain first")
        return step
    if is_step_dir(p):
        if not is_complete(p):
            raise CheckpointError(f"init_from: {p} is incomplete (no {state_file(p).name}: its save was interrupted); "
                                  "pick another step")
        return p
    raise ConfigError(f"init_from: {p} is neither a pretrain run dir, a checkpoint step dir nor a Hugging Face "
                      "directory (config.json + *.safetensors)")


def resolve_backbone(cfg: FinetuneConfig, rank: int) -> Backbone:
    """Make sure an HF directory of the pretrained model exists (rank 0 exports a checkpoint once)."""
    step_dir = find_checkpoint(cfg.init_from)
    if step_dir is None:
        hf_dir = Path(cfg.init_from)
        return Backbone(hf_dir, model_config_from_hf(hf_dir), {"hf_dir": str(hf_dir.resolve())})
    pre_run = run_dir_of(step_dir)
    state = read_state(step_dir)
    source = {"run_dir": str(pre_run.resolve()), "step": state["step"], "world_size": state["world_size"],
              "zero_stage": state["zero_stage"], "saved_at": state["saved_at"]}
    out = Path(cfg.run_dir) / BACKBONE
    done = out / SOURCE

    def export_backbone() -> None:
        from pretrain.export import export

        print0(f"restoring {step_dir} (ZeRO-{state['zero_stage']}, {state['world_size']} rank(s)) → {out}")
        export(pre_run, out, step=state["step"], dtype="fp32")  # the fp32 master weights, not a bf16 copy
        atomic_write_text(done, json.dumps(source, indent=1))  # last: the completion marker

    def exported() -> bool:
        try:
            return json.loads(done.read_text()) == source
        except (OSError, ValueError):
            return False

    # before the process group exists (finetune.run): a 7B export outlasts any collective timeout
    rank0_work(f"exporting the backbone {step_dir.name}", export_backbone, exported, cfg.run_dir, rank)
    model = load_config(PretrainConfig, pre_run / "config.yaml").model
    return Backbone(out, model, source)


def model_config_from_hf(hf_dir: Path) -> ModelConfig:
    """The lmforge ModelConfig of an exported Llama/BERT directory (for checks and FLOP counts)."""
    c = json.loads((hf_dir / "config.json").read_text())
    if c.get("model_type") == "llama":
        return ModelConfig(kind="causal", hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                           num_heads=c["num_attention_heads"], num_kv_heads=c.get("num_key_value_heads"),
                           intermediate_size=c["intermediate_size"], max_seq_len=c["max_position_embeddings"],
                           tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                           rope_theta=float((c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 1e4))))
    if c.get("model_type") == "bert":
        return ModelConfig(kind="masked", hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                           num_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
                           max_seq_len=c["max_position_embeddings"], dropout=c.get("hidden_dropout_prob", 0.0))
    raise ConfigError(f"init_from: {hf_dir} holds a '{c.get('model_type')}' model; lmforge fine-tunes llama and bert")


def load_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory, read now."""
    return dict(HFWeights(hf_dir))


# ---------------------------------------------------------------- the task model
def task_model_class(task: Task, kind: str):
    import transformers as T

    names = {
        ("sequence_classification", "causal"): "LlamaForSequenceClassification",
        ("sequence_classification", "masked"): "BertForSequenceClassification",
        ("token_classification", "causal"): "LlamaForTokenClassification",
        ("token_classification", "masked"): "BertForTokenClassification",
        ("question_answering", "causal"): "LlamaForQuestionAnswering",
        ("question_answering", "masked"): "BertForQuestionAnswering",
        ("sft", "causal"): "LlamaForCausalLM",
    }
    return getattr(T, names[(task.name, kind)])


def base_of(task_model: nn.Module) -> nn.Module:
    return getattr(task_model, task_model.base_model_prefix)


def blocks_of(base: nn.Module) -> nn.ModuleList:
    return base.layers if hasattr(base, "layers") else base.encoder.layer


def embeddings_of(base: nn.Module) -> list[nn.Module]:
    return [base.embed_tokens] if hasattr(base, "embed_tokens") else [base.embeddings]


class FinetuneModule(nn.Module):
    """Backbone + task head (+ the pretrained LM head for ``aux_lm_weight``); returns its loss."""

    def __init__(self, task: Task, task_model: nn.Module, kind: str, aux_weight: float, lm_head: nn.Module | None,
                 pooling: str = "last"):
        super().__init__()
        self.task_name, self.kind, self.aux_weight, self.pooling = task.name, kind, aux_weight, pooling
        self.task_model = task_model
        self.lm_head = lm_head  # causal: Linear(d, V); masked: BERT's MLM head; None without the auxiliary loss

    @property
    def config(self):
        return self.task_model.config

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.task_model.gradient_checkpointing_enable(**kwargs)

    def _hidden(self, input_ids, attention_mask, token_type_ids):
        base = base_of(self.task_model)
        if self.kind == "causal":
            out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        else:
            out = base(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None, start_positions=None,
                end_positions=None, mlm_input_ids=None, mlm_labels=None) -> dict[str, torch.Tensor]:
        tm = self.task_model
        out = self._hidden(input_ids, attention_mask, token_type_ids)
        h = out.last_hidden_state  # (B, T, d), after the final norm
        res: dict[str, torch.Tensor] = {}
        if self.task_name == "sequence_classification":
            if self.kind == "causal" and self.pooling == "mean":  # the mean state of the text's tokens (not <s>)
                logits = tm.score(mean_pool(h, attention_mask))
            elif self.kind == "causal":  # as LlamaForSequenceClassification: the rightmost non-pad token
                logits = tm.score(h)
                non_pad = (input_ids != tm.config.pad_token_id).int()
                last = (torch.arange(input_ids.shape[1], device=h.device) * non_pad).argmax(-1)
                logits = logits[torch.arange(h.shape[0], device=h.device), last]
            elif self.pooling == "mean":  # BERT's pooler layer (dense + tanh) on the mean state instead of [CLS]'s
                pooler = base_of(tm).pooler
                logits = tm.classifier(tm.dropout(pooler.activation(pooler.dense(mean_pool(h, attention_mask)))))
            else:  # as BertForSequenceClassification: the pooled first token
                logits = tm.classifier(tm.dropout(out.pooler_output))
            res["logits"] = logits
            loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        elif self.task_name == "token_classification":
            head = tm.score if self.kind == "causal" else tm.classifier
            logits = head(tm.dropout(h))
            res["logits"] = logits
            loss = (F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
                    if labels is not None else None)
        elif self.task_name == "question_answering":
            s, e = tm.qa_outputs(h).float().split(1, dim=-1)
            s, e = s.squeeze(-1), e.squeeze(-1)
            res["start_logits"], res["end_logits"] = s, e
            loss = None
            if start_positions is not None:
                n = s.shape[1]
                loss = (F.cross_entropy(s, start_positions.clamp(0, n), ignore_index=n)
                        + F.cross_entropy(e, end_positions.clamp(0, n), ignore_index=n)) / 2
        else:  # sft
            logits = tm.lm_head(h)
            res["logits"] = logits
            loss = None
            if labels is not None:
                loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
        if loss is None:
            return res
        res["task_loss"] = loss
        if self.aux_weight and self.lm_head is not None:
            lm = self.aux_lm_loss(h, input_ids, attention_mask, token_type_ids, mlm_input_ids, mlm_labels)
            res["lm_loss"] = lm
            loss = loss + self.aux_weight * lm
        res["loss"] = loss
        return res

    def aux_lm_loss(self, h, input_ids, attention_mask, token_type_ids, mlm_input_ids, mlm_labels) -> torch.Tensor:
        """Causal: next-token loss of the task text (same forward). Masked: MLM on a masked copy."""
        if self.kind == "causal":
            logits = self.lm_head(h[:, :-1]).float()
            targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE)
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        h2 = self._hidden(mlm_input_ids, attention_mask, token_type_ids).last_hidden_state
        logits = self.lm_head(h2).float()
        return F.cross_entropy(logits.flatten(0, 1), mlm_labels.flatten(), ignore_index=IGNORE)


def mean_pool(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean hidden state over each row's real tokens after the leading ``<s>`` (B, T, d) → (B, d): every
    causal state after the first has read ``<s>``, whose own state carries no text."""
    mask = attention_mask.clone()
    mask[:, 0] = 0  # <s>
    mask = mask.to(h.dtype).unsqueeze(-1)
    return (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class HFWeights(Mapping[str, torch.Tensor]):
    """The tensors of a Hugging Face directory's ``*.safetensors``, read one at a time when asked for;
    names (less ``prefix``) and shapes are known without reading any. Under ZeRO-3 only rank 0 reads."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        self._where: dict[str, tuple[str, str]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in sorted(Path(hf_dir).glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for key in h.keys():
                    self._where[key] = (str(f), key)
                    self.shapes[key] = tuple(h.get_slice(key).get_shape())

    def under(self, prefix: str) -> HFWeights:
        """The tensors whose names start with ``prefix``, named without it (no file is read)."""
        view = object.__new__(HFWeights)
        view._where = {k[len(prefix):]: v for k, v in self._where.items() if k.startswith(prefix)}
        view.shapes = {k[len(prefix):]: v for k, v in self.shapes.items() if k.startswith(prefix)}
        return view

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path, key = self._where[name]
        with safe_open(path, "pt") as h:
            return h.get_tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def build_module(cfg: FinetuneConfig, task: Task, backbone: Backbone, ds_config: dict | None = None,
                 device: str | torch.device = "cpu") -> FinetuneModule:
    """The task model with the pretrained weights (seed first: heads are freshly initialised).

    ``ds_config`` (ZeRO-3 engine settings): every module is built already partitioned and the weights
    are copied in one tensor at a time from rank 0, so no rank holds the whole model; the result equals
    the plain build's (tested). Otherwise it is built on ``device`` (the rank's GPU) and the weights are
    copied there one tensor at a time, never as a whole model in host memory.
    """
    from contextlib import nullcontext

    from transformers import AutoConfig

    from pretrain.model import partitioned_construction

    kind = backbone.model.kind
    conf = AutoConfig.from_pretrained(backbone.hf_dir)
    if task.labels:
        conf.num_labels = task.num_labels
        conf.update(task.hf_label_maps())
    cls = task_model_class(task, kind)
    device = torch.device(device)
    if ds_config is not None:
        construct = lambda: partitioned_construction(ds_config)  # noqa: E731
    elif device.type != "cpu":
        construct = lambda: device  # noqa: E731  (a torch.device is a context manager: tensors are made there)
    else:
        construct = nullcontext
    with construct():
        tm = cls(conf)
    weights = HFWeights(backbone.hf_dir)
    if not cfg.transfer.random_init:
        _load_backbone(tm, task, kind, weights, backbone.hf_dir)
    lm_head = None
    if cfg.transfer.aux_lm_weight:
        with construct():
            lm_head = _new_lm_head(kind, conf)
        _fill_lm_head(lm_head, tm, kind, conf, weights, cfg)
    module = FinetuneModule(task, tm, kind, cfg.transfer.aux_lm_weight, lm_head, cfg.task.pooling)
    apply_freezing(module, cfg)
    return module


def _load_backbone(tm: nn.Module, task: Task, kind: str, weights: HFWeights, where: Path) -> None:
    from pretrain.export import load_weights
    from pretrain.model import load_state

    if task.name == "sft":
        load_weights(tm, weights, where)
        return
    missing, unexpected = load_state(base_of(tm), weights.under("model." if kind == "causal" else "bert."))
    missing = [k for k in missing if not k.startswith("pooler.")]  # BERT's pooler is part of the new head
    if missing or unexpected:
        raise CheckpointError(f"{where}: backbone weights do not fit the {type(tm).__name__} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def _new_lm_head(kind: str, conf) -> nn.Module:
    if kind == "causal":
        return nn.Linear(conf.hidden_size, conf.vocab_size, bias=False)
    from transformers.models.bert.modeling_bert import BertOnlyMLMHead

    return BertOnlyMLMHead(conf)


def _fill_lm_head(head: nn.Module, tm: nn.Module, kind: str, conf, weights: HFWeights, cfg: FinetuneConfig) -> None:
    """The pretrained LM head (tied to the input embeddings where the backbone ties them)."""
    from pretrain.model import load_state

    if kind == "causal":
        if getattr(conf, "tie_word_embeddings", False) or "lm_head.weight" not in weights:
            tie_lm_head(head, tm, kind)
        elif not cfg.transfer.random_init:
            load_state(head, weights.under("lm_head."))  # its "weight"
        return
    if not cfg.transfer.random_init:
        missing, _ = load_state(head, weights.under("cls."))
        if [k for k in missing if k not in ("predictions.decoder.weight", "predictions.decoder.bias")]:
            raise CheckpointError(f"the backbone has no complete MLM head for aux_lm_weight (missing {missing[:3]})")
    tie_lm_head(head, tm, kind)


def tie_lm_head(head: nn.Module, tm: nn.Module, kind: str) -> None:
    """Share the aux LM head's matrix with the input embeddings: causal where the backbone ties them,
    masked always (with the head's own bias), as in BertForMaskedLM."""
    base = base_of(tm)
    if kind == "causal":
        head.weight = base.embed_tokens.weight
    else:
        head.predictions.decoder.weight = base.embeddings.word_embeddings.weight
        head.predictions.decoder.bias = head.predictions.bias


def apply_freezing(module: FinetuneModule, cfg: FinetuneConfig) -> None:
    t = cfg.transfer
    base = base_of(module.task_model)
    blocks = blocks_of(base)
    if t.freeze_layers > len(blocks):
        raise ConfigError(f"transfer.freeze_layers {t.freeze_layers} exceeds the backbone's {len(blocks)} layers")
    frozen: list[nn.Module] = []
    if t.freeze_backbone:
        frozen += [m for name, m in base.named_children() if name != "pooler"]  # BERT's pooler is a new head layer
    if t.freeze_embeddings:
        frozen += embeddings_of(base)
    frozen += list(blocks[: t.freeze_layers])
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)


def layer_id(name: str, num_layers: int) -> int:
    """0 = embeddings, i+1 = block i, L+1 = final norm, pooler and heads (for layer-wise lr decay)."""
    import re

    if "embed" in name:
        return 0
    m = re.search(r"\.(?:layers|layer)\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return num_layers + 1


def param_groups(module: FinetuneModule, cfg: FinetuneConfig) -> list[dict[str, Any]] | None:
    """Per-layer groups for layer-wise lr decay (None: the engine's default two groups)."""
    from pretrain.engine import param_ndim

    decay = cfg.transfer.layerwise_lr_decay
    if decay == 1.0:
        return None
    L = len(blocks_of(base_of(module.task_model)))
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    seen: set[int] = set()
    for name, p in module.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        lid = layer_id(name, L)
        wd = param_ndim(p) >= 2
        g = groups.setdefault((lid, wd), {"params": [], "lr": cfg.optim.lr * decay ** (L + 1 - lid),
                                           "weight_decay": cfg.optim.weight_decay if wd else 0.0})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


# ---------------------------------------------------------------- export
def export_task_model(state_dict: dict[str, torch.Tensor], task: Task, backbone: Backbone, out: Path, tok) -> Path:
    """Write the fine-tuned task model as a Hugging Face directory (label names in its config)."""
    import shutil

    from transformers import AutoConfig

    from pretrain.export import load_weights

    conf = AutoConfig.from_pretrained(backbone.hf_dir)
    if task.labels:
        conf.num_labels = task.num_labels
        conf.update(task.hf_label_maps())
    if task.name == "sequence_classification" and task.cfg.task.pooling == "mean":
        # transformers' classifiers read the rightmost (Llama) or first (BERT) token: this head was trained on the
        # mean state (lmforge only)
        conf.lmforge_pooling = "mean"
        print0(f"warning: {out}: this classifier reads the mean state (task.pooling=mean), transformers' "
               f"{'rightmost' if backbone.model.kind == 'causal' else 'first'}-token classifier does not: "
               "scores of the export through transformers differ from lmforge's (its config says lmforge_pooling: mean)")
    tm = task_model_class(task, backbone.model.kind)(conf)
    sd = {k[len("task_model."):]: v for k, v in state_dict.items() if k.startswith("task_model.")}
    load_weights(tm, sd, out)
    with staged_dir(out) as tmp:  # a reader never sees a half-written export
        tm.save_pretrained(tmp, safe_serialization=True)
        if (backbone.hf_dir / "generation_config.json").is_file() and task.name == "sft":
            shutil.copy(backbone.hf_dir / "generation_config.json", tmp / "generation_config.json")
        tok.save(tmp)
        if task.name == "sequence_classification":
            classifier_template(tmp / "tokenizer.json", tok, close=task.closes_with_eos)
    return out


def classifier_template(tokenizer_json: Path, tok, close: bool) -> None:
    """Make the exported tokenizer frame a text as fine-tuning did (:meth:`SequenceClassification.encode`):
    ``<s> A`` and ``<s> A </s> B``, each closed by ``</s>`` when the classifier was trained to read it, so
    ``pipeline("text-classification")`` feeds the export the ids its head was trained on (without it, a
    transformers tokenizer adds no ``<s>``, and an ``eos`` classifier reads the last word instead)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.processors import TemplateProcessing

    from data_pipeline.tokenizer import SPECIAL_TOKENS

    bos, eos = SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"]
    hf = HFTokenizer.from_file(str(tokenizer_json))
    hf.post_processor = TemplateProcessing(single=f"{bos} $A" + (f" {eos}" if close else ""),
                                           pair=f"{bos} $A {eos} $B:1" + (f" {eos}:1" if close else ""),
                                           special_tokens=[(bos, tok.bos_id), (eos, tok.eos_id)])
    atomic_write_text(tokenizer_json, hf.to_str(pretty=True))


def task_flops_per_token(m: ModelConfig, vocab_size: int, seq_len: float, head: int, frozen_layers: int = 0,
                         grads_below: bool = False, aux_lm: bool = False) -> float:
    """Training FLOPs per token of a task model, counted like :func:`pretrain.model.flops_per_token` (PaLM:
    2 per matmul parameter forward, 4 backward) but for what really runs: ``head`` task-head matmul
    parameters instead of the LM head (unless ``aux_lm`` adds it back, or the head *is* it: sft), and the
    first ``frozen_layers`` blocks forward only (2·N, attention 4·d·T) — or forward plus activation gradients
    (4·N, 12·d·T) when ``grads_below``: trainable embeddings under them still need those."""
    from pretrain.model import param_breakdown

    parts = param_breakdown(m, vocab_size)
    L, d = m.num_layers, m.hidden_size
    k = min(max(frozen_layers, 0), L)
    per_layer = parts["blocks"] / L
    attn = d * seq_len  # QKᵀ and softmax·V: 4·d·T FLOPs forward per token and layer, 8·d·T backward
    trained = (L - k) * (6 * per_layer + 12 * attn)
    frozen = k * ((4 * per_layer + 12 * attn) if grads_below else (2 * per_layer + 4 * attn))
    other = parts["other"] * (6 if k < L else 2)  # final norm
    lm = 0.0
    if aux_lm:
        lm = 6.0 * (vocab_size * d + ((d * d + d) if m.kind == "masked" else 0))  # (BERT's MLM transform too)
    return float(trained + frozen + other + 6 * head + lm)


def finetune_flops_per_token(cfg: FinetuneConfig, task: Task, vocab_size: int, mean_len: float) -> float:
    """:func:`task_flops_per_token` of a fine-tuning run, at the mean real length of its training features
    (MFU counts real tokens only: padding is not useful work)."""
    m, t, d = cfg.model, cfg.transfer, cfg.model.hidden_size
    if task.name == "sft":
        head = vocab_size * d  # the LM head is the task head
    elif task.name == "question_answering":
        head = 2 * d  # start and end logits
    else:
        head = task.num_labels * d
        if m.kind == "masked" and task.name == "sequence_classification":
            head += d * d  # BERT's pooler
    k = m.num_layers if t.freeze_backbone else t.freeze_layers
    grads_below = k > 0 and not (t.freeze_backbone or t.freeze_embeddings)
    return task_flops_per_token(m, vocab_size, mean_len, head, k, grads_below,
                                aux_lm=bool(t.aux_lm_weight) and task.name != "sft")
