"""The training loop: read it top to bottom in :meth:`Trainer.fit`.

The loop is the same for every stage; what it optimises is an :class:`~pretrain.objective.Objective`
(pretraining's language modelling, fine-tuning's tasks). The trainer owns run state (step, tokens
seen, skipped steps) and nothing else; logging, evaluation output and checkpoints hang off it as
callbacks, and so do the faults tests inject (a NaN loss, a failing rank).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from lmforge.errors import LmforgeError
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


class Objective:
    """What the loop optimises: the stage-specific half of a training run (pretraining's language
    modelling in :mod:`pretrain.objective`, fine-tuning's tasks in :mod:`finetune.objective`).
    :meth:`attach` gives it the trainer (engine, rank, batch plan, step) once the runtime is built;
    every other method is called by the loop."""

    trainer: Trainer
    #: what the checkpoint records, and a resume checks (a different tokenizer or data is refused)
    tokenizer_sha256: str
    special_ids: dict[str, int]
    data_name = "training data"  # for messages: "the shards changed since ..."

    def attach(self, trainer: Trainer) -> None:
        self.trainer = trainer

    @property
    def loader(self) -> Any:
        """The resumable batch source (its ``fingerprint`` identifies the data)."""
        raise NotImplementedError

    def next_batch(self) -> Any:
        """This rank's next micro-batch (what :meth:`loss` takes)."""
        raise NotImplementedError

    def loss(self, batch: Any, micro_step: int, train: bool = True) -> torch.Tensor:
        """The scalar loss of one micro-batch (kept on the device)."""
        raise NotImplementedError

    def step_tokens(self) -> int:
        """Training tokens of the step just taken, all ranks together."""
        return self.trainer.plan.tokens_per_step

    def has_validation(self) -> bool:
        return False

    def eval_every(self) -> int:
        """Steps between evaluations (0: only at the end)."""
        return self.trainer.cfg.train.eval_every

    def evaluate(self) -> dict[str, float]:
        """Validation metrics (``eval/*``), computed on every rank."""
        return {}

    def done(self) -> bool:
        """A stop condition besides ``train.max_steps``."""
        return False

    def step_metrics(self) -> dict[str, float]:
        """Extra ``train/*`` metrics of the step just taken."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The resumable state, merged into the checkpoint's trainer state (``loader`` at least)."""
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, sd: dict[str, Any], allow_data_change: bool = False) -> None:
        self.loader.load_state_dict(sd["loader"], allow_data_change=allow_data_change)


class Callback:
    """Hooks called on every rank; a callback that writes files checks ``trainer.dist.is_main``."""

    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_loss(self, trainer: Trainer, loss: torch.Tensor, micro_step: int) -> torch.Tensor:
        """The training loss of one micro-batch, before the backward (fault injection in tests)."""
        return loss
    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...
    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...


class Trainer:
    """``cfg`` is the stage's resolved, frozen config; the loop reads ``cfg.train`` (max_steps,
    eval_every, log_every, max_skipped_steps, exit_interval, progress), ``cfg.run_dir`` and, through the
    callbacks and checkpoints, ``checkpoint``, ``zero``, ``precision`` and ``model``."""

    def __init__(self, cfg, engine, objective: Objective, dist_info: DistInfo, plan: BatchPlan,
                 callbacks: list[Callback] | None = None):
        self.cfg, self.engine, self.objective, self.dist, self.plan = cfg, engine, objective, dist_info, plan
        self.callbacks = callbacks or []
        self.state = TrainState()
        self.stop_requested = False  # a callback (e.g. a signal handler) may ask for a clean stop
        self.preempted = False  # stopped by a signal: the job is expected to be requeued
        objective.attach(self)
        self._has_val = objective.has_validation()
        self._loss_hooks = [cb for cb in self.callbacks if getattr(type(cb), "on_loss", Callback.on_loss) is not Callback.on_loss]

    @property
    def loader(self):
        return self.objective.loader

    @property
    def tokenizer_sha256(self) -> str:
        return self.objective.tokenizer_sha256

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
        every = self.objective.eval_every()
        if not self.stop_requested and (every == 0 or self.state.step % every):
            self.evaluate()  # finish with a fresh evaluation (not when stopping early for a signal)
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.state

    def _done(self) -> bool:
        return self.state.step >= self.cfg.train.max_steps or self.objective.done()

    def _eval_due(self) -> bool:
        every = self.objective.eval_every()
        return bool(every) and self.state.step % every == 0 and self._has_val

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; skipped on a non-finite loss."""
        t0 = time.perf_counter()
        self.engine.train()
        losses: list[torch.Tensor] = []
        skip = False
        last_good = None
        for k in range(self.plan.grad_accum_steps):
            batch = self.objective.next_batch()
            if skip:
                continue  # the step is skipped: consume its data so the position stays exact
            loss = self.train_loss(batch, k)
            if self._nonfinite_on_any_rank(loss):
                if k == 0:
                    skip = True  # nothing accumulated yet: skip the whole step on every rank
                    continue
                # Gradients of earlier micro-batches are already inside DeepSpeed's buffers: drop
                # only this micro-batch by back-propagating an exactly-zero loss through a good one.
                self.state.dropped_microbatches += 1
                loss = self.objective.loss(last_good, micro_step=k) * 0.0
            else:
                losses.append(loss.detach().float())
                last_good = batch
            self.engine.backward(loss)
            self.engine.step()
        self.state.step += 1
        step_tokens = self.objective.step_tokens()
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
        metrics.update(self.objective.step_metrics())
        metrics["train/step_tokens"] = float(step_tokens)  # for tokens/s and MFU (not logged itself)
        return metrics

    def train_loss(self, batch, micro_step: int) -> torch.Tensor:
        """The objective's loss of one training micro-batch, passed through the callbacks' ``on_loss``."""
        loss = self.objective.loss(batch, micro_step=micro_step)
        for cb in self._loss_hooks:
            loss = cb.on_loss(self, loss, micro_step)
        return loss

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

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """The objective's validation metrics; the callbacks see them (best checkpoint, TensorBoard)."""
        if not self._has_val:
            return {}
        self.engine.eval()
        try:
            metrics = self.objective.evaluate()
        finally:
            self.engine.train()
        for cb in self.callbacks:
            cb.on_eval_end(self, metrics)
        return metrics

    # ------------------------------------------------------------------ run state
    def state_dict(self) -> dict[str, Any]:
        return {"trainer": asdict(self.state), **self.objective.state_dict()}

    def load_state_dict(self, sd: dict[str, Any], allow_data_change: bool = False) -> None:
        self.state = TrainState(**sd["trainer"])
        self.objective.load_state_dict(sd, allow_data_change=allow_data_change)
