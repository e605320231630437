"""The model: a ``ModelConfig`` → a transformers ``LlamaForCausalLM`` or ``BertForMaskedLM``.

Plain single-device modules; ZeRO and activation checkpointing are applied from outside (engine).
Using the transformers classes means a checkpoint exports with ``save_pretrained`` and nothing else.
Also here: exact parameter counts (closed form and counted), FLOPs per token, and BERT masking.

    model = build_model(cfg.model, vocab_size=8192)            # real weights, fp32, CPU
    meta = build_model(cfg.model, vocab_size=32000, device="meta")  # shapes only, no memory
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM, PretrainedConfig

from pretrain.config import ModelConfig

# The lmforge tokenizer's special ids (bos=1, eos=2, pad=3); callers pass the tokenizer's own.
DEFAULT_BOS_ID, DEFAULT_EOS_ID, DEFAULT_PAD_ID = 1, 2, 3
BERT_TYPE_VOCAB = 2  # token-type (segment) embeddings, kept for compatibility with BERT checkpoints


def ffn_size(cfg: ModelConfig) -> int:
    """FFN width: SwiGLU 8/3·d rounded up to a multiple of 64 (causal), 4·d (masked).

    8/3·d keeps SwiGLU's three matrices at the 8·d² of a 4·d GELU MLP, so a block is 12·d² as in GPT-3.
    """
    if cfg.intermediate_size is not None:
        return cfg.intermediate_size
    if cfg.kind == "masked":
        return 4 * cfg.hidden_size
    return -(-8 * cfg.hidden_size // (3 * 64)) * 64


def _head_dim(cfg: ModelConfig) -> int:
    return cfg.hidden_size // cfg.num_heads


def hf_config(
    cfg: ModelConfig,
    vocab_size: int,
    *,
    bos_id: int | None = DEFAULT_BOS_ID,
    eos_id: int | None = DEFAULT_EOS_ID,
    pad_id: int | None = DEFAULT_PAD_ID,
    mask_id: int | None = None,
) -> PretrainedConfig:
    """The transformers config for ``cfg`` (an exporter saves it next to the weights)."""
    d = cfg.hidden_size
    if cfg.kind == "causal":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=d,
            intermediate_size=ffn_size(cfg),
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
            head_dim=_head_dim(cfg),
            hidden_act="silu",
            max_position_embeddings=cfg.max_seq_len,
            initializer_range=cfg.init_std,
            rms_norm_eps=1e-5,  # Llama 2's value
            rope_theta=cfg.rope_theta,  # transformers 5 folds this into rope_parameters
            tie_word_embeddings=cfg.tie_embeddings,
            attention_bias=False,
            mlp_bias=False,
            attention_dropout=cfg.dropout,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            attn_implementation="sdpa",
        )
    conf = BertConfig(
        vocab_size=vocab_size,
        hidden_size=d,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=ffn_size(cfg),
        hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=BERT_TYPE_VOCAB,
        initializer_range=cfg.init_std,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=True,  # BERT's decoder always shares the word embeddings
        attn_implementation="sdpa",
    )
    conf.mask_token_id = mask_id  # not a BertConfig field; stored so the export records it
    return conf


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in ``dtype``; fp32 buffers (RoPE inv_freq) stay fp32, unlike ``.to(dtype)``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(
    cfg: ModelConfig,
    vocab_size: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    bos_id: int | None = DEFAULT_BOS_ID,
    eos_id: int | None = DEFAULT_EOS_ID,
    pad_id: int | None = DEFAULT_PAD_ID,
    mask_id: int | None = None,
) -> torch.nn.Module:
    """A freshly initialised model (seed with ``torch.manual_seed`` first). ``device="meta"`` allocates nothing."""
    conf = hf_config(cfg, vocab_size, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, mask_id=mask_id)
    cls = LlamaForCausalLM if cfg.kind == "causal" else BertForMaskedLM
    device = torch.device(device)
    # No device context on CPU: deepspeed.zero.Init (ZeRO-3) places tensors itself and must not be overridden.
    on_device = contextlib.nullcontext() if device.type == "cpu" else device
    as_dtype = contextlib.nullcontext() if dtype == torch.get_default_dtype() else _default_dtype(dtype)
    with on_device, as_dtype:
        return cls(conf)


@contextlib.contextmanager
def _init_weights_under_zero3() -> Iterator[None]:
    """transformers' ``post_init`` weight init, made to work on ZeRO-3's partitioned parameters.

    Each sub-model's ``post_init`` runs its init when its own construction ends (so ``LlamaModel``'s
    weights are drawn before ``lm_head`` is even built); doing the same, at the same moments,
    draws the same random numbers as a plain build. Rank 0 draws them on each gathered module
    (transformers' ZeRO-3 init) and then hands its RNG state to every rank, so all ranks construct
    the next modules from the same state, exactly as in a plain build on every rank.
    """
    import torch.distributed as dist
    from transformers.integrations.deepspeed import initialize_weights_zero3
    from transformers.modeling_utils import PreTrainedModel

    def init_weights(self) -> None:
        initialize_weights_zero3(self)
        self.tie_weights(recompute_mapping=False)
        cuda = torch.cuda.is_available()
        state = [torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None]
        dist.broadcast_object_list(state, src=0)
        torch.set_rng_state(state[0])
        if cuda:
            torch.cuda.set_rng_state(state[1])

    original = PreTrainedModel.init_weights
    PreTrainedModel.init_weights = init_weights
    try:
        yield
    finally:
        PreTrainedModel.init_weights = original


def build_model_partitioned(cfg: ModelConfig, vocab_size: int, ds_config: dict, **ids: int | None) -> torch.nn.Module:
    """ZeRO-3: the model built inside ``deepspeed.zero.Init``; each rank keeps only its partition.

    Every module is created whole, initialised and partitioned right away, so a rank never holds the
    whole model. On CPU the weights and the RNG state afterwards equal ``build_model``'s for the same
    seed (tested), so ZeRO-3 starts where the other stages do; on a GPU the modules are created on the
    device and drawn from its generator, so the initial values differ from the other stages'.
    """
    conf = hf_config(cfg, vocab_size, **ids)
    cls = LlamaForCausalLM if cfg.kind == "causal" else BertForMaskedLM
    with partitioned_construction(ds_config):
        return cls(conf)


@contextlib.contextmanager
def partitioned_construction(ds_config: dict) -> Iterator[None]:
    """Modules created inside are ZeRO-3 partitioned at once, with the weights a plain build would get."""
    import deepspeed
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    # DeepSpeed's default placement, as transformers uses it: on a GPU the modules are created there
    # and drawn from the GPU's generator (the same distribution as build_model's CPU draws, other values)
    with _init_weights_under_zero3(), prevent_arange_dtype_change(), \
            deepspeed.zero.Init(config_dict_or_path=ds_config):
        yield


def is_partitioned(module: torch.nn.Module) -> bool:
    """Whether the module's parameters are ZeRO-3 parameters already (built by ``partitioned_construction``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def load_state(module: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """``load_state_dict(weights, strict=False)`` for a whole or a partitioned module: (missing, unexpected)."""
    if is_partitioned(module):
        return load_partitioned(module, weights)
    from lmforge.errors import CheckpointError

    # One tensor at a time, straight into the module (on its device): a lazy ``weights`` (a model's
    # safetensors) is never all in host memory at once, as ``load_state_dict(dict(weights))`` would make it.
    targets = module.state_dict(keep_vars=True)  # names → parameters/persistent buffers (tied ones twice)
    names = set(weights)
    with torch.no_grad():
        for name, t in targets.items():
            if name in names:
                w = weights[name]
                if tuple(w.shape) != tuple(t.shape):
                    raise CheckpointError(f"{name}: the checkpoint holds shape {tuple(w.shape)}, the model {tuple(t.shape)}")
                t.copy_(w)
    return [k for k in targets if k not in names], [k for k in names if k not in targets]


def load_partitioned(module: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """``load_state_dict(weights, strict=False)`` for a module built by ``partitioned_construction``.

    One parameter at a time is gathered, filled on rank 0 (the only rank that reads ``weights[name]``
    for a parameter, so ``weights`` may be lazy) and partitioned again. Returns (missing, unexpected).
    """
    import deepspeed
    import torch.distributed as dist

    from lmforge.errors import CheckpointError

    targets = module.state_dict(keep_vars=True)  # names → parameters/persistent buffers (tied ones twice)
    shapes = getattr(weights, "shapes", None) or {k: tuple(v.shape) for k, v in weights.items()}
    for name, t in targets.items():  # on every rank, before any collective
        want = tuple(getattr(t, "ds_shape", t.shape))
        if name in shapes and tuple(shapes[name]) != want:
            raise CheckpointError(f"{name}: the checkpoint holds shape {tuple(shapes[name])}, the model {want}")
    rank0 = dist.get_rank() == 0
    with torch.no_grad():
        for name, t in targets.items():
            if name not in shapes:
                continue
            if hasattr(t, "ds_id"):
                with deepspeed.zero.GatheredParameters([t], modifier_rank=0):
                    if rank0:
                        t.data.copy_(weights[name])
            else:  # buffers are not partitioned: every rank loads them
                t.data.copy_(weights[name])
    return [k for k in targets if k not in shapes], [k for k in shapes if k not in targets]


def count_params(model: torch.nn.Module) -> int:
    """Unique parameters: ``parameters()`` yields a tied weight once. Works on the meta device."""
    return sum(p.numel() for p in model.parameters())


def param_breakdown(cfg: ModelConfig, vocab_size: int) -> dict[str, int]:
    """Closed-form parameter counts by part: embedding (lookup tables), blocks, head, other (norms)."""
    d, n_layers, f, v = cfg.hidden_size, cfg.num_layers, ffn_size(cfg), vocab_size
    if cfg.kind == "causal":
        q = cfg.num_heads * _head_dim(cfg)
        kv = (cfg.num_kv_heads or cfg.num_heads) * _head_dim(cfg)
        attn = d * q + 2 * d * kv + q * d  # q, k, v, o projections, no biases
        block = attn + 3 * d * f + 2 * d  # gate, up, down + two RMSNorm weights
        return {
            "embedding": v * d,
            "blocks": n_layers * block,
            "head": 0 if cfg.tie_embeddings else v * d,
            "other": d,  # final RMSNorm
        }
    ln = 2 * d  # LayerNorm weight + bias
    attn = 4 * (d * d + d) + ln  # q, k, v, output dense with biases, then LayerNorm
    mlp = (d * f + f) + (f * d + d) + ln
    return {
        "embedding": v * d + cfg.max_seq_len * d + BERT_TYPE_VOCAB * d,  # word, position, token-type
        "blocks": n_layers * (attn + mlp),
        "head": (d * d + d) + ln + v,  # transform dense, LayerNorm, decoder bias (decoder weight is tied)
        "other": ln,  # embedding LayerNorm
    }


def count_params_analytic(cfg: ModelConfig, vocab_size: int) -> int:
    """Closed-form count; equals ``count_params(build_model(cfg, vocab_size))`` (tested)."""
    return sum(param_breakdown(cfg, vocab_size).values())


def count_params_nonembedding(cfg: ModelConfig, vocab_size: int) -> int:
    """All parameters except the input lookup tables (an untied LM head counts, as in Kaplan et al.)."""
    parts = param_breakdown(cfg, vocab_size)
    return sum(parts.values()) - parts["embedding"]


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B / Chinchilla convention.

    ``6·N + 12·L·d·T`` where
    - ``N`` = parameters that take part in a matmul: everything except the input lookup tables
      (token/position/type embeddings), plus the LM-head matrix ``V·d`` even when it is tied to
      the embedding (the lookup is free, the output projection is not). Norm weights and biases
      are included (< 0.1 %), as is usual.
    - ``12·L·d·T``: attention scores ``QKᵀ`` and ``softmax·V`` at 2·d·T FLOPs each per token and
      layer, ×3 for forward + backward; computed over the full length ``T = seq_len`` (no
      discount for the causal mask, as in PaLM's MFU).
    Activation recomputation is not counted (this is *model* FLOPs, for MFU).
    """
    parts = param_breakdown(cfg, vocab_size)
    n_matmul = sum(parts.values()) - parts["embedding"]
    if cfg.kind == "masked" or cfg.tie_embeddings:
        n_matmul += vocab_size * cfg.hidden_size  # the tied output projection still multiplies
    return 6.0 * n_matmul + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len


def apply_mlm_masking(
    input_ids: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking → ``(inputs, labels)``, both shaped like ``input_ids`` (B, T).

    Each non-special position is selected with ``probability``; a selected one becomes ``mask_id``
    (80 %), a random non-special token (10 %) or stays (10 %). ``labels`` holds the original token
    at selected positions and -100 elsewhere. Draws are made on the generator's device (CPU when
    None), so a seeded generator gives the same masks whatever device ``input_ids`` is on.
    """
    dev = generator.device if generator is not None else torch.device("cpu")
    ids = input_ids.to(dev)
    excluded = torch.zeros(vocab_size, dtype=torch.bool, device=dev)
    excluded[[i for i in {*special_ids, mask_id} if 0 <= i < vocab_size]] = True
    candidates = ~excluded[ids]  # specials (and a literal <mask>) are never predicted

    selected = (torch.rand(ids.shape, generator=generator, device=dev) < probability) & candidates
    action = torch.rand(ids.shape, generator=generator, device=dev)  # one draw decides mask/random/keep
    allowed = (~excluded).nonzero().squeeze(1)  # random replacements avoid special tokens
    random_tok = allowed[torch.randint(len(allowed), ids.shape, generator=generator, device=dev)]

    inputs = torch.where(selected & (action < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(selected & (action >= 0.8) & (action < 0.9), random_tok, inputs)
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    return inputs.to(input_ids.device), labels.to(input_ids.device)
