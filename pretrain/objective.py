"""Pretraining's objective, :class:`LanguageModeling` (causal next-token or masked LM), plugged into the
shared loop as a :class:`~pretrain.trainer.Objective`; and the token helpers both stages use (the
shards' tokenizer, special ids, MLM masking). Fine-tuning's objective is
:class:`finetune.objective.TaskObjective`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmforge.errors import ConfigError, DataError
from pretrain.trainer import Objective

if TYPE_CHECKING:
    from data_pipeline.loader import ShardLoader


# ---------------------------------------------------------------- tokens
def shard_tokenizer(shards: list[str], vocab_size: int | None = None):
    """The tokenizer stored with the first shard directory (all must share it; the loader checks)."""
    from data_pipeline.shards import Manifest
    from data_pipeline.tokenizer import Tokenizer

    if not shards:
        raise ConfigError("data.shards is empty: pass --data.shards=DIR (built with `python -m data_pipeline build`)")
    m = Manifest(shards[0])
    tok = Tokenizer.load(Path(shards[0]) / "tokenizer")
    if tok.fingerprint != m.tokenizer_sha256 or tok.vocab_size != m.vocab_size:
        raise DataError(f"{shards[0]}/tokenizer does not match its manifest.json; rebuild the shards")
    if vocab_size is not None and vocab_size != tok.vocab_size:
        raise DataError(
            f"model.vocab_size {vocab_size} does not match the vocab of the tokenizer of "
            f"{shards[0]} ({tok.vocab_size}); drop the override or rebuild the shards"
        )
    return tok


def verify_shards_once(shards: list[str], run_dir: str | Path, rank: int, world_size: int) -> None:
    """Hash every shard file (all splits) once per job, striped over the ranks, before training reads any.

    A shard this run already hashed, whose size and modification time have not changed since, is not
    hashed again (a requeued job starts at once). One collective gathers the ranks' findings: every
    rank stops with the same one-line error naming the damaged shard(s).
    """
    from data_pipeline.shards import Manifest
    from lmforge.log import print0
    from lmforge.rundir import mark_shards_verified, verified_shards

    known = verified_shards(run_dir)
    files = [(m, s) for root in shards for m in [Manifest(root)] for split in m.splits() for s in m.shards(split)]

    def stamp(s) -> list:
        st = s.path.stat()
        return [s.sha256, st.st_size, st.st_mtime_ns]

    todo = [(m, s) for m, s in files if not s.path.is_file() or known.get(str(s.path)) != stamp(s)]
    problems, done = [], {}
    for m, s in todo[rank::world_size]:
        if problem := m.verify_shard(s):
            problems.append(problem)
        else:
            done[str(s.path)] = stamp(s)
    if world_size > 1:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, (problems, done))
        problems = [p for g in gathered for p in g[0]]
        done = {k: v for g in gathered for k, v in g[1].items()}
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"refusing to train on a damaged shard: {sorted(problems)[0]}{more}; rebuild or restore it")
    if rank == 0 and done:
        mark_shards_verified(run_dir, done)
    print0(f"shards verified: {len(todo)} hashed on {world_size} rank(s), {len(files) - len(todo)} already "
           "verified by this run")


def special_ids(tok, kind: str, need_mask: bool | None = None) -> dict[str, int]:
    """bos/eos/pad/unk (and ``mask`` for a masked LM) of a tokenizer. ``need_mask`` (default: a masked
    model needs one) raises a clear error when the tokenizer has no ``<mask>``."""
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "unk": tok.unk_id}
    if kind == "masked":
        mask = tok.token_to_id("<mask>")
        if mask is not None:
            ids["mask"] = mask
        elif need_mask is None or need_mask:
            raise DataError(
                "a masked LM needs a '<mask>' token: train the tokenizer with --extra-special-tokens '<mask>'"
            )
    return ids


def mlm_inputs(tokens: torch.Tensor, ids: dict[str, int], vocab_size: int, probability: float, seed: int, step: int,
               micro_step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-LM inputs and labels of a micro-batch. The masks are a pure function of (seed, step,
    micro-step, rank), so a resume reproduces them (``step`` -1: evaluation)."""
    from pretrain.model import apply_mlm_masking

    g = torch.Generator().manual_seed(hash((seed, step, micro_step, rank)) & 0x7FFFFFFF)
    specials = [v for k, v in ids.items() if k != "mask"]
    inputs, labels = apply_mlm_masking(tokens.cpu(), ids["mask"], vocab_size, specials, probability=probability,
                                       generator=g)
    return inputs.to(tokens.device), labels.to(tokens.device)


# ---------------------------------------------------------------- pretraining
class LanguageModeling(Objective):
    """Causal next-token or masked-LM cross-entropy over packed windows of the token shards."""

    data_name = "shards"

    def __init__(self, kind: str, loader: ShardLoader, special_ids: dict[str, int], tokenizer_sha256: str,
                 shards: list[str], seq_len: int, seed: int, mlm_probability: float, eval_samples: int,
                 max_tokens: int | None):
        self.kind, self._loader, self.special_ids = kind, loader, special_ids
        self.tokenizer_sha256 = tokenizer_sha256
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.mlm_probability, self.eval_samples, self.max_tokens = mlm_probability, eval_samples, max_tokens
        from data_pipeline.shards import Manifest

        self._has_val = any(Manifest(s).tokens("val") > 0 for s in shards)

    @property
    def loader(self) -> ShardLoader:
        return self._loader

    def next_batch(self) -> torch.Tensor:
        return torch.from_numpy(self._loader.next_batch())  # (B, T+1) int64

    def data_position(self) -> int:
        return self._loader.cursor

    def skip_data(self, start: int, end: int) -> None:
        self._loader.add_skip(start, end)

    def done(self) -> bool:
        return self.max_tokens is not None and self.trainer.state.tokens_seen >= self.max_tokens

    def has_validation(self) -> bool:
        return self._has_val

    def loss(self, batch: torch.Tensor, micro_step: int, train: bool = True) -> torch.Tensor:
        """Mean cross-entropy of one micro-batch (fp32 logits)."""
        t = self.trainer
        batch = batch.to(t.dist.device)
        if self.kind == "causal":
            inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each
        else:
            inputs, targets = mlm_inputs(batch[:, :-1], self.special_ids, t.engine.module.config.vocab_size,
                                         self.mlm_probability, self.seed, t.state.step if train else -1, micro_step,
                                         t.dist.rank)
        kwargs = {"use_cache": False} if self.kind == "causal" else {}  # no KV cache in training
        logits = t.engine(input_ids=inputs, **kwargs).logits  # (B, T, V)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted loss and perplexity over ``train.eval_samples`` validation windows."""
        from data_pipeline.loader import eval_batches

        t = self.trainer
        total = torch.zeros(2, dtype=torch.float64, device=t.dist.device)  # (sum of losses, tokens)
        batches = eval_batches(self.shards, self.seq_len, t.plan.micro_batch_per_rank, t.dist.rank, t.dist.world_size,
                               max_samples=self.eval_samples, tokenizer_sha256=self.tokenizer_sha256,
                               verify=False)  # verified once per job (verify_shards_once), or not asked for
        for i, arr in enumerate(batches):
            batch = torch.from_numpy(arr)
            loss = self.loss(batch, micro_step=i, train=False)
            n = batch.shape[0] * (batch.shape[1] - 1)
            if self.kind == "masked":
                n = max(1, int(round(n * self.mlm_probability)))
            total += torch.tensor([float(loss) * n, n], dtype=torch.float64, device=t.dist.device)
        if t.dist.world_size > 1:
            dist.all_reduce(total)
        mean = float(total[0] / total[1])
        return {"eval/loss": mean, "eval/ppl": math.exp(min(mean, 50.0))}
