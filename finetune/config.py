"""The fine-tuning config. Engine, checkpoint, metrics and resume sections are pretraining's own
classes (the same DeepSpeed engine, checkpoints and TensorBoard logger run both stages).

YAML presets live in ``configs/finetune/``; ``--section.key=value`` overrides any field. The
backbone's shape (``model``) is not configured here: it comes with ``init_from``. ``zero.stage``
may be ``auto`` here (the default): it is decided once the backbone's size is known
(``finetune/estimate.py``), before anything records the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmforge.errors import ConfigError
from pretrain.config import (
    CheckpointConfig,
    DistConfig,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    ResumeConfig,
    SpikeConfig,
    ZeroConfig,
)

TASKS = ("sequence_classification", "token_classification", "question_answering", "sft")


@dataclass
class FinetuneZeroConfig(ZeroConfig):
    """Pretraining's ZeRO section, with ``stage: auto``: a pretrain recipe names its stage next to its
    model size, but a fine-tune recipe serves backbones of any size, so its stage follows the backbone."""

    # auto: ZeRO-0 while its model states fit in half of a device's memory, else ZeRO-3 built partitioned
    # (finetune/estimate.py choose_stage); an integer 0-3 is used as given
    stage: int | Literal["auto"] = "auto"


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """Pretraining's optimizer section; ``lr: null`` (the presets' default) scales BERT-base's 5e-5 with the
    backbone's width: ``5e-5 · 768 / hidden_size`` (:func:`finetune.config.auto_lr`)."""

    lr: float | None = None


AUTO_LR_BASE, AUTO_LR_WIDTH = 5e-5, 768  # BERT-base's fine-tuning lr, at its width


def auto_lr(hidden_size: int, freeze_backbone: bool = False) -> tuple[float, str]:
    """The fine-tuning lr for a backbone of this width, and why. Adam's update size is the lr whatever the
    width, while a wider layer sums more inputs, so the lr that moves its output as much scales as 1/width
    (muP's rule for hidden matrices): BERT-base's 5e-5 at 768 is 3e-4 at the `tiny` preset's 128. A frozen
    backbone trains one linear head, which takes 10x that (a linear probe)."""
    lr = AUTO_LR_BASE * AUTO_LR_WIDTH / hidden_size * (10 if freeze_backbone else 1)
    why = (f"auto: {AUTO_LR_BASE:g} x {AUTO_LR_WIDTH} / hidden_size {hidden_size}"
           + (" x 10 for a head on a frozen backbone" if freeze_backbone else "") + "; set optim.lr to choose")
    return lr, why


@dataclass
class TaskConfig:
    type: Literal["sequence_classification", "token_classification", "question_answering", "sft"] = (
        "sequence_classification"
    )
    labels: list[str] | None = None  # label names in id order; None = the sorted labels of the training data
    max_seq_len: int = 256  # tokens per example (longer ones are truncated; QA contexts are split)
    doc_stride: int = 64  # question answering: tokens shared by consecutive windows of a long context
    max_answer_tokens: int = 30  # question answering: longest predicted span
    tag_scheme: Literal["BIO", "BIOES"] = "BIO"  # token classification: how entity spans are tagged
    # sequence classification with a causal backbone: the token whose state the head reads. "last": the last
    # token of the text; "eos": a closing </s> (in pretraining </s> ends a document, so its state is trained to
    # predict the next, unrelated one); "mean": the mean state of the text's tokens after <s> (causal: no closing
    # </s>; masked: through BERT's pooler layer). "last" and "eos" export as transformers' rightmost-token
    # classifier, and masked backbones otherwise read the first token (BERT's pooler); "mean" applies in lmforge
    # only (finetune's own evaluation): transformers' classifiers do not pool the mean, so the export's config
    # records `lmforge_pooling: mean` and its pipeline() scores differ.
    pooling: Literal["last", "eos", "mean"] = "last"
    packing: bool = False  # sft: pack several examples into one max_seq_len window
    prompt_template: str = "### Instruction:\n{instruction}\n\n### Response:\n"  # sft: {instruction} is filled in
    max_new_tokens: int = 32  # sft: length of the sample generations
    num_samples: int = 4  # sft: validation prompts generated for at each evaluation (and the test set's, at the end)


@dataclass
class FinetuneDataConfig:
    train: str | None = None  # CSV / JSONL / JSON / a `datasets` directory / CoNLL file / SQuAD JSON
    validation: str | None = None  # None = a seeded split of train (validation_fraction)
    test: str | None = None
    validation_fraction: float = 0.1
    max_validation_examples: int | None = None  # a seeded subsample of the validation split (faster evaluations)
    seed: int = 1234  # validation split and shuffling
    text_column: str = "text"
    text_pair_column: str = "text_pair"  # used when present in the data
    label_column: str = "label"
    instruction_column: str = "instruction"  # sft (also accepted: prompt)
    response_column: str = "response"  # sft (also accepted: completion, output)


@dataclass
class TransferConfig:
    """The classic transfer recipe's controls."""

    freeze_embeddings: bool = False
    freeze_layers: int = 0  # freeze the first k transformer blocks
    freeze_backbone: bool = False  # train the task head only
    layerwise_lr_decay: float = 1.0  # lr of block i = lr · decay^(L-i); embeddings decay^(L+1); head 1 (1.0 = off)
    aux_lm_weight: float = 0.0  # λ in L = L_task + λ·L_lm (causal: next-token loss; masked: MLM), on the task text
    random_init: bool = False  # same architecture, fresh random weights (the from-scratch baseline)


@dataclass
class FinetuneTrainConfig:
    max_steps: int | None = None  # optimizer steps; None = from epochs
    epochs: float = 3.0  # passes over the training set when max_steps is None
    micro_batch_size: int = 16
    global_batch_size: int | None = None  # None = micro × ranks
    eval_every: int = 0  # steps between validations; 0 = once per epoch
    log_every: int = 10
    seed: int = 1234  # head init, dropout, masking
    select_metric: str | None = None  # validation metric for the best checkpoint; None = the task's (e.g. accuracy)
    early_stopping_patience: int = 0  # stop after this many validations without improvement (0 = off)
    activation_checkpointing: bool = False
    max_skipped_steps: int = 10
    exit_interval: int = 0
    progress: bool | None = None


@dataclass
class FinetuneConfig:
    run_dir: str = "runs/finetune"
    init_from: str | None = None  # pretrain run dir (its latest checkpoint), one checkpoints/step_N dir, or an HF export dir
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "bf16"  # auto: bf16 on GPUs / AMX CPUs, else fp32
    task: TaskConfig = field(default_factory=TaskConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)  # defaults: configs/finetune/_base.yaml
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    zero: FinetuneZeroConfig = field(default_factory=FinetuneZeroConfig)  # stage resolved at start-up
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)  # log / skip; a rollback needs pretraining's data cursor
    callbacks: list[str] = field(default_factory=list)  # "module:factory" → a pretrain.trainer.Callback (as in pretraining)
    model: ModelConfig = field(default_factory=ModelConfig)  # filled from init_from at start-up; not set by users

    def validate(self) -> None:
        if self.init_from is None:
            raise ConfigError("init_from is not set: pass --init_from=RUN_DIR (a pretrain run, a checkpoint step "
                              "dir, or an exported Hugging Face dir)")
        if self.data.train is None:
            raise ConfigError("data.train is not set: pass --data.train=FILE")
        if self.zero.stage not in (0, 1, 2, 3, "auto"):
            raise ConfigError(f"zero.stage: expected auto, 0, 1, 2 or 3, got {self.zero.stage}")
        if self.zero.offload_param and self.zero.stage not in (3, "auto"):
            raise ConfigError("zero.offload_param needs zero.stage=3 (or auto)")
        if self.zero.offload_optimizer and self.zero.stage == 0:
            raise ConfigError("zero.offload_optimizer needs zero.stage >= 1 (or auto)")
        if not 0.0 < self.data.validation_fraction < 1.0:
            raise ConfigError(f"data.validation_fraction: expected a value in (0, 1), got {self.data.validation_fraction}")
        if self.transfer.freeze_layers < 0:
            raise ConfigError("transfer.freeze_layers: must be >= 0")
        if not 0.0 < self.transfer.layerwise_lr_decay <= 1.0:
            raise ConfigError(f"transfer.layerwise_lr_decay: expected a value in (0, 1], got {self.transfer.layerwise_lr_decay}")
        if self.transfer.aux_lm_weight < 0:
            raise ConfigError("transfer.aux_lm_weight: must be >= 0")
        if self.task.type == "sft" and self.transfer.aux_lm_weight:
            raise ConfigError("transfer.aux_lm_weight: sft already trains the language-modelling loss; leave it at 0")
        if self.train.max_steps is not None and self.train.max_steps <= 0:
            raise ConfigError("train.max_steps: must be positive")
        if self.optim.lr is not None and self.optim.lr < 0:
            raise ConfigError("optim.lr: must be >= 0 (or null: scaled with the backbone's width)")
        if self.spike.action == "rollback":
            raise ConfigError("spike.action=rollback is pretraining's (it moves the shard cursor): use skip or log")
        if self.train.epochs <= 0:
            raise ConfigError("train.epochs: must be positive")
        for name in ("micro_batch_size", "log_every"):
            if getattr(self.train, name) <= 0:
                raise ConfigError(f"train.{name}: must be positive")
        if self.task.type == "question_answering" and self.task.doc_stride >= self.task.max_seq_len // 2:
            raise ConfigError(f"task.doc_stride {self.task.doc_stride} must be below half of task.max_seq_len "
                              f"{self.task.max_seq_len}")
