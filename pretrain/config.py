"""The pretraining config: one dataclass per component, nested into :class:`PretrainConfig`.

YAML presets live in ``configs/pretrain/``; ``--section.key=value`` overrides any field. The config
never changes after start-up: run state (step, tokens seen, loader cursor) lives in the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmforge.errors import ConfigError


@dataclass
class ModelConfig:
    """Architecture. ``kind`` picks the transformers class; the rest are its shape."""

    kind: Literal["causal", "masked"] = "causal"  # LlamaForCausalLM | BertForMaskedLM
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None  # grouped-query attention (causal only); None = num_heads
    intermediate_size: int | None = None  # FFN width; None = SwiGLU 8/3·d rounded up to 64 (causal), 4·d (masked)
    vocab_size: int | None = None  # None = take it from the tokenizer of the shards
    max_seq_len: int = 2048  # position capacity (RoPE base length / BERT position embeddings)
    rope_theta: float = 10000.0
    tie_embeddings: bool = False  # share input embedding and LM head (causal)
    dropout: float = 0.0  # BERT-style dropout (hidden + attention); Llama uses none
    init_std: float = 0.02
    mlm_probability: float = 0.15  # masked LM: fraction of tokens predicted (80% [MASK] / 10% random / 10% kept)
    nominal_params: float | None = None  # the size the preset is named after, for --dry-run reports


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)  # shard directories (python -m data_pipeline build)
    weights: list[float] | None = None  # mixture weights, one per shard directory
    seq_len: int = 256  # tokens per training sample
    seed: int = 1234  # shuffling seed (the global sample order depends on it, not on the world size)
    verify_shards: bool = True  # hash every shard once per job, striped over the ranks, before training (a requeue trusts the record)
    # global sample ranges [start, end) never trained on (multiples of micro batch x ranks); a loss-spike
    # rollback adds its own to RUN_DIR/data_skips.json, which every resume applies as well
    skip_samples: list[list[int]] = field(default_factory=list)


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 3e-5  # learning rate at the end of the decay
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warm-up
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm (0 = off)


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps
    max_tokens: int | None = None  # stop after this many training tokens (whichever comes first)
    micro_batch_size: int = 8  # most sequences per forward/backward per rank; the plan may use fewer to split the global batch
    global_batch_size: int | None = None  # sequences per optimizer step; None = micro × ranks (no accumulation)
    eval_every: int = 100  # steps between evaluations (0 = only at the end)
    eval_samples: int = 256  # validation windows per evaluation
    log_every: int = 10  # steps between TensorBoard/console logs
    seed: int = 1234  # model init and dropout/masking RNG
    activation_checkpointing: bool = False
    max_skipped_steps: int = 10  # consecutive non-finite-loss steps that stop the run
    exit_interval: int = 0  # checkpoint and stop when the step is a multiple of this (chained jobs, tests); 0 = off
    progress: bool | None = None  # tqdm bar on rank 0; None = only on a terminal


@dataclass
class SpikeConfig:
    """The loss-spike guard (pretrain/spike.py): a step whose loss is more than ``threshold`` deviations
    above the mean of the last ``window`` good steps is a spike."""

    action: Literal["off", "log", "skip", "rollback"] = "log"  # skip: leave the update out; rollback: see below
    window: int = 100  # good steps in the running mean and spread
    threshold: float = 6.0  # deviations above the mean
    warmup: int = 50  # good steps before any spike is called (the window fills first)
    min_spread: float = 0.01  # the spread is at least this fraction of the mean (a flat curve is not all spikes)
    grad_norm: bool = True  # watch the gradient norm too (one step late: it counts for rollbacks, is not skipped)
    rollback_after: int = 3  # rollback: this many spikes ...
    rollback_within: int = 50  # ... within this many steps restore the last checkpoint before the first of them


@dataclass
class ZeroConfig:
    stage: int = 0  # DeepSpeed ZeRO stage 0-3
    offload_optimizer: bool = False  # optimizer states (and step) on CPU
    offload_param: bool = False  # ZeRO-3 parameters on CPU
    # ZeRO-3: build the model inside deepspeed.zero.Init, so no rank ever holds all of it; false =
    # build it whole on every rank, then partition; None = on GPUs only (on DeepSpeed's CPU accelerator
    # the whole build is faster and peaks lower: freed full-size tensors stay in the C heap, bench/model_init.py)
    partitioned_init: bool | None = None
    ds_config: str | None = None  # engine settings JSON; None = ds_configs/[gpu/]zero{stage}[_offload].json (gpu/ on CUDA)


@dataclass
class MetricsConfig:
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None = table by GPU name, or measured matmul on CPU
    tensorboard: bool = True
    # warn (naming rank and host) when a rank's mean time to reach the step's agreement over a logging
    # interval exceeds this multiple of the ranks' median (pretrain/monitor.py StragglerMonitor)
    straggler_ratio: float = 1.5


@dataclass
class CheckpointConfig:
    interval_steps: int = 0  # save every N steps (0 = off)
    interval_minutes: float = 0.0  # also save when this much wall time passed since the last save (0 = off)
    keep_last: int = 3  # most recent checkpoints kept; older ones are deleted after a newer one completes
    keep_every: int = 0  # additionally keep every checkpoint whose step is a multiple of this (0 = none)
    save_final: bool = True  # save when training ends (max_steps / max_tokens reached)
    on_signal: bool = True  # SIGUSR1/SIGTERM → save at the next step boundary and exit cleanly
    # interval saves in the background: training waits only while each rank copies its state to host memory
    # (kept for the next save: one more copy of the rank's checkpoint in RAM); a thread writes, fsyncs and
    # hashes it, and the checkpoint is committed (trainer_state.json, latest) once every rank's files are
    # durable. Final, signal and exit_interval saves stay synchronous. On by default: on GPUs training then
    # waits for a copy to host memory instead of the filesystem, and on the CPU it measured better too
    # (bench/checkpoint.py --quick --only-stall, small preset, 2 ranks on a 2-core VM: 0.22 s of stall per
    # save against 1.0 s synchronous, 0.54 s against 0.83 s on the wall clock, the writers sharing the cores)
    async_save: bool = True


@dataclass
class ResumeConfig:
    """``--resume=auto|none|PATH``: auto continues from checkpoints/latest when the run has one."""

    __scalar_field__ = "mode"
    mode: str = "auto"  # auto | none (refuse to reuse a run dir with checkpoints) | path to a run dir or step dir
    allow_data_change: bool = False  # resume even though the shards' fingerprint changed


@dataclass
class DistConfig:
    """Process group settings."""

    # Seconds a collective may wait before every rank is aborted (NCCL's default is 10 min). Work one
    # rank does alone (world-size conversion, exports) runs outside collectives, so this bounds
    # only real hangs: a dead or stuck peer.
    timeout_s: float = 1800.0


@dataclass
class PretrainConfig:
    run_dir: str = "runs/default"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "bf16"  # auto: bf16 on GPUs / AMX CPUs, else fp32
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    # extra callbacks, "module:factory" (called with no arguments, returns a pretrain.trainer.Callback):
    # your own monitors, and the tests' fault injections (tests/hooks.py)
    callbacks: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.dist.timeout_s <= 0:
            raise ConfigError("dist.timeout_s: must be positive (seconds)")
        if self.zero.stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero.stage: expected 0, 1, 2 or 3, got {self.zero.stage}")
        if self.zero.offload_param and self.zero.stage != 3:
            raise ConfigError("zero.offload_param needs zero.stage=3")
        if self.zero.offload_optimizer and self.zero.stage == 0:
            raise ConfigError("zero.offload_optimizer needs zero.stage >= 1")
        if self.data.weights is not None and len(self.data.weights) != len(self.data.shards):
            raise ConfigError(
                f"data.weights has {len(self.data.weights)} entries for {len(self.data.shards)} data.shards"
            )
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len {self.data.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}")
        m = self.model
        if m.hidden_size % m.num_heads:
            raise ConfigError(f"model.hidden_size {m.hidden_size} is not divisible by model.num_heads {m.num_heads}")
        if m.num_kv_heads and m.num_heads % m.num_kv_heads:
            raise ConfigError(f"model.num_heads {m.num_heads} is not divisible by model.num_kv_heads {m.num_kv_heads}")
        for rng in self.data.skip_samples:
            if len(rng) != 2 or not 0 <= rng[0] < rng[1]:
                raise ConfigError(f"data.skip_samples: {rng} is not a range [start, end) of global samples")
        if self.spike.window < 2 or self.spike.threshold <= 0 or self.spike.rollback_after < 1:
            raise ConfigError("spike: window >= 2, threshold > 0 and rollback_after >= 1 are required")
        for name in ("max_steps", "micro_batch_size", "log_every"):
            if getattr(self.train, name) <= 0:
                raise ConfigError(f"train.{name}: must be positive")
