"""The training loop: read it top to bottom in :meth:`Trainer.fit`.

The trainer owns run state (step, tokens seen, skipped steps) and nothing else; logging,
evaluation output and (later) checkpoints hang off it as callbacks.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_pipeline.loader import ShardLoader, eval_batches
from data_pipeline.shards import Manifest
from lmforge.errors import LmforgeError
from pretrain.config import PretrainConfig
from pretrain.dist import DistInfo
from pretrain.engine import BatchPlan


class NonFiniteLossError(LmforgeError):
    """Too many consecutive steps had a NaN/inf loss."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps attempted (skipped ones included: their data was consumed)
    tokens_seen: int = 0  # training tokens consumed, all ranks together
    skipped_steps: int = 0  # steps skipped for a non-finite loss
    consecutive_skips: int = 0
    dropped_microbatches: int = 0  # non-finite micro-batches dropped inside an accumulation window


class Callback:
    """Hooks called on every rank; a callback that writes files checks ``trainer.dist.is_main``."""

    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...
    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...


class Trainer:
    def __init__(
        self,
        cfg: PretrainConfig,
        engine,
        loader: ShardLoader,
        dist_info: DistInfo,
        plan: BatchPlan,
        special_ids: dict[str, int],
        callbacks: list[Callback] | None = None,
        tokenizer_sha256: str | None = None,
    ):
        self.cfg, self.engine, self.loader, self.dist, self.plan = cfg, engine, loader, dist_info, plan
        self.special_ids = special_ids
        self.callbacks = callbacks or []
        self.tokenizer_sha256 = tokenizer_sha256
        self.state = TrainState()
        self.stop_requested = False  # a callback (e.g. a signal handler) may ask for a clean stop
        self.preempted = False  # stopped by a signal: the job is expected to be requeued
        self._nan_steps = _parse_nan_hook(os.environ.get("LMFORGE_INJECT_NAN"), dist_info.rank)
        self._has_val = self.has_validation()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainState:
        for cb in self.callbacks:
            cb.on_train_start(self)
        while not self._done():
            metrics = self.train_step()
            if self._eval_due():
                metrics.update(self.evaluate())
            for cb in self.callbacks:
                cb.on_step_end(self, metrics)
            if self.stop_requested:
                break
        if not self.stop_requested and (self.cfg.train.eval_every == 0 or self.state.step % self.cfg.train.eval_every):
            self.evaluate()  # finish with a fresh evaluation (not when stopping early for a signal)
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.state

    def _done(self) -> bool:
        t = self.cfg.train
        return self.state.step >= t.max_steps or (t.max_tokens is not None and self.state.tokens_seen >= t.max_tokens)

    def has_validation(self) -> bool:
        return any(Manifest(s).tokens("val") > 0 for s in self.cfg.data.shards)

    def next_batch(self):
        """The next micro-batch of this rank (what :meth:`loss` takes)."""
        return torch.from_numpy(self.loader.next_batch())  # (B, T+1) int64

    def _eval_due(self) -> bool:
        every = self.cfg.train.eval_every
        return bool(every) and self.state.step % every == 0 and self._has_val


    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; skipped on a non-finite loss."""
        t0 = time.perf_counter()
        self.engine.train()
        losses: list[torch.Tensor] = []
        skip = False
        last_good: torch.Tensor | None = None
        for k in range(self.plan.grad_accum_steps):
            batch = self.next_batch()
            if skip:
                continue  # the step is skipped: consume its data so the position stays exact
            loss = self.loss(batch, micro_step=k)
            if self._nonfinite_on_any_rank(loss):
                if k == 0:
                    skip = True  # nothing accumulated yet: skip the whole step on every rank
                    continue
                # Gradients of earlier micro-batches are already inside DeepSpeed's buffers: drop
                # only this micro-batch by back-propagating an exactly-zero loss through a good one.
                self.state.dropped_microbatches += 1
                loss = self.loss(last_good, micro_step=k) * 0.0
            else:
                losses.append(loss.detach().float())
                last_good = batch
            self.engine.backward(loss)
            self.engine.step()
        self.state.step += 1
        step_tokens = self.step_tokens()
        self.state.tokens_seen += step_tokens
        if skip:
            self.state.skipped_steps += 1
            self.state.consecutive_skips += 1
            if self.state.consecutive_skips >= self.cfg.train.max_skipped_steps:
                raise NonFiniteLossError(
                    f"{self.state.consecutive_skips} consecutive steps had a non-finite loss (last: step "
                    f"{self.state.step}); lower optim.lr, use precision=bf16/fp32, or check the data"
                )
        else:
            self.state.consecutive_skips = 0
        metrics = self._step_metrics(losses, skip, time.perf_counter() - t0)
        metrics["train/step_tokens"] = float(step_tokens)  # for tokens/s and MFU (not logged itself)
        return metrics

    def step_tokens(self) -> int:
        """Training tokens of the step just taken, all ranks together (packed windows: all of them)."""
        return self.plan.tokens_per_step

    def _step_metrics(self, losses: list[torch.Tensor], skipped: bool, seconds: float) -> dict[str, float]:
        loss = torch.stack(losses).mean() if losses else torch.tensor(float("nan"))
        if self.dist.world_size > 1 and not skipped:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG if self.dist.device.type == "cuda" else dist.ReduceOp.SUM)
            if self.dist.device.type != "cuda":  # gloo has no AVG
                loss /= self.dist.world_size
        m: dict[str, float] = {
            "train/loss": float(loss),
            "train/lr": float(self.engine.get_lr()[0]),
            "train/step_time": seconds,
            "train/tokens_seen": float(self.state.tokens_seen),
            "train/skipped_steps": float(self.state.skipped_steps),
        }
        gn = None if skipped else self.engine.get_global_grad_norm()
        if gn is not None:
            m["train/grad_norm"] = float(gn)
        if self.cfg.precision == "fp16":
            m["train/loss_scale"] = float(getattr(self.engine.optimizer, "cur_scale", getattr(self.engine.optimizer, "loss_scale", 0.0)))
        return m

    def _nonfinite_on_any_rank(self, loss: torch.Tensor) -> bool:
        bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0], device=self.dist.device)
        if self.dist.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # the decision is the same on every rank
        return bool(bad.item())

    # ------------------------------------------------------------------ objectives
    def loss(self, batch: torch.Tensor, micro_step: int = 0, train: bool = True) -> torch.Tensor:
        """Mean cross-entropy of one micro-batch (fp32 logits) for the configured objective."""
        batch = batch.to(self.dist.device)
        if self.cfg.model.kind == "causal":
            inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each
        else:
            inputs, targets = self._mlm(batch[:, :-1], micro_step, train)
        kwargs = {"use_cache": False} if self.cfg.model.kind == "causal" else {}  # no KV cache in training
        logits = self.engine(input_ids=inputs, **kwargs).logits  # (B, T, V)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        if train and (self.state.step + 1) in self._nan_steps and micro_step == 0:
            loss = loss * float("nan")  # test hook: LMFORGE_INJECT_NAN=step[,step][@rank]
        return loss

    def _mlm(self, tokens: torch.Tensor, micro_step: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from pretrain.model import apply_mlm_masking

        # Masks are a pure function of (seed, step, micro-step, rank): resume reproduces them.
        g = torch.Generator().manual_seed(
            hash((self.cfg.train.seed, self.state.step if train else -1, micro_step, self.dist.rank)) & 0x7FFFFFFF
        )
        specials = [v for k, v in self.special_ids.items() if k != "mask"]
        inputs, labels = apply_mlm_masking(
            tokens.cpu(), self.special_ids["mask"], self.engine.module.config.vocab_size, specials,
            probability=self.cfg.model.mlm_probability, generator=g,
        )
        return inputs.to(tokens.device), labels.to(tokens.device)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted loss and perplexity over ``train.eval_samples`` validation windows."""
        if not self._has_val:
            return {}
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.dist.device)  # (sum of losses, tokens)
        batches = eval_batches(
            self.cfg.data.shards, self.cfg.data.seq_len, self.plan.micro_batch_per_rank, self.dist.rank,
            self.dist.world_size, max_samples=self.cfg.train.eval_samples, tokenizer_sha256=self.tokenizer_sha256,
        )
        for i, arr in enumerate(batches):
            batch = torch.from_numpy(arr)
            loss = self.loss(batch, micro_step=i, train=False)
            n = batch.shape[0] * (batch.shape[1] - 1)
            if self.cfg.model.kind == "masked":
                n = max(1, int(round(n * self.cfg.model.mlm_probability)))
            total += torch.tensor([float(loss) * n, n], dtype=torch.float64, device=self.dist.device)
        if self.dist.world_size > 1:
            dist.all_reduce(total)
        mean = float(total[0] / total[1])
        metrics = {"eval/loss": mean, "eval/ppl": math.exp(min(mean, 50.0))}
        for cb in self.callbacks:
            cb.on_eval_end(self, metrics)
        self.engine.train()
        return metrics

    # ------------------------------------------------------------------ run state
    def state_dict(self) -> dict[str, Any]:
        return {"trainer": asdict(self.state), "loader": self.loader.state_dict()}

    def load_state_dict(self, sd: dict[str, Any], allow_data_change: bool = False) -> None:
        self.state = TrainState(**sd["trainer"])
        self.loader.load_state_dict(sd["loader"], allow_data_change=allow_data_change)


def _parse_nan_hook(spec: str | None, rank: int) -> set[int]:
    """``"5,9@1"`` → steps {5, 9} on rank 1 only; ``"5"`` → step 5 on every rank."""
    if not spec:
        return set()
    steps, _, only_rank = spec.partition("@")
    if only_rank and int(only_rank) != rank:
        return set()
    return {int(s) for s in steps.split(",") if s}


