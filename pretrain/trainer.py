"""The training loop: read it top to bottom in :meth:`Trainer.fit`.

The loop is the same for every stage; what it optimises is an :class:`~pretrain.objective.Objective`
(pretraining's language modelling, fine-tuning's tasks). The trainer owns run state (step, tokens
seen, skipped steps) and nothing else; logging, evaluation output and checkpoints hang off it as
callbacks, and so do the faults tests inject (a NaN loss, a failing rank).
"""

from __future__ import annotations

import time
from collections import defaultdict
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

    def local_step_tokens(self) -> int | None:
        """This rank's training tokens in the step just taken, summed over ranks in the step's collective;
        None: every step trains ``plan.tokens_per_step`` (packed windows)."""
        return None

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
    def step_flags(self, trainer: Trainer) -> dict[str, float]:
        """This rank's votes for decisions every rank must take together at the end of the step (e.g.
        ``{"signal": 1.0}``); summed over ranks in the step's one collective into ``trainer.agreed``."""
        return {}
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
        self.agreed: dict[str, float] = {}  # the step's decisions, the same on every rank (see _agree)
        # wall seconds of this process by activity since it started ("data", "eval", "checkpoint_save",
        # "checkpoint_load", ...): host clocks only, no device sync; read by the goodput accounting
        self.timings: defaultdict[str, float] = defaultdict(float)
        # ZeRO >= 1: DeepSpeed's ZeRO optimizers skip an update whose gradients are not finite (0.19:
        # stage_1_and_2.py step(), stage3.py step(), bf16_optimizer.py step(): an invalid global norm is an
        # "overflow"; the engine then counts engine.skipped_steps and holds the lr schedule). ZeRO-0 applies
        # whatever it gets, so there each micro-batch's loss is checked before its backward (a collective each).
        self._engine_skips_nonfinite = cfg.zero.stage >= 1

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
    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; skipped on a non-finite loss.

        One collective per step (:meth:`_agree`, before the last micro-batch's backward) decides what every
        rank must decide alike: a non-finite loss anywhere (then the update is skipped everywhere), the
        callbacks' votes (stop signal, checkpoint due) and the step's token count. Losses stay on the
        device; they are read back on logging steps only (:class:`pretrain.callbacks.MetricsLogger`).
        """
        t0 = time.perf_counter()
        self.engine.train()
        if not self._engine_skips_nonfinite:
            return self._train_step_checked(t0)
        dev = self.dist.device
        bad = torch.zeros((), device=dev)
        loss_sum = torch.zeros((), device=dev)
        skipped_before = self.engine.skipped_steps
        accum = self.plan.grad_accum_steps
        for k in range(accum):
            batch = self.next_batch()
            loss = self.train_loss(batch, k)
            finite = torch.isfinite(loss.detach())
            bad = bad + (~finite).float()
            loss_sum = loss_sum + torch.where(finite, loss.detach().float(), 0.0)
            if k == accum - 1 and self._agree(bad)["nonfinite"]:
                # every rank: non-finite gradients make DeepSpeed's overflow check skip the whole update
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
        skip = bool(self.agreed["nonfinite"])
        if skip and self.engine.skipped_steps == skipped_before:
            raise RuntimeError("DeepSpeed applied an update with non-finite gradients; lmforge relies on its ZeRO "
                               "optimizer skipping it (deepspeed 0.19): check the DeepSpeed version")
        local_loss = torch.full((), float("nan"), device=dev) if skip else loss_sum / accum
        return self._finish_step(skip, local_loss, t0)

    def _train_step_checked(self, t0: float) -> dict[str, Any]:
        """ZeRO-0: every micro-batch's loss is agreed on before its backward (the engine would apply NaNs)."""
        losses: list[torch.Tensor] = []
        skip = False
        last_good = None
        for k in range(self.plan.grad_accum_steps):
            batch = self.next_batch()
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
        self._agree(torch.zeros((), device=self.dist.device))  # the callbacks' votes and the token count
        local_loss = torch.stack(losses).mean() if losses else torch.full((), float("nan"), device=self.dist.device)
        return self._finish_step(skip, local_loss, t0)

    def _agree(self, nonfinite: torch.Tensor) -> dict[str, float]:
        """The step's one collective: sums over ranks of [non-finite losses, the objective's tokens, the
        callbacks' votes], read back once into ``self.agreed``."""
        votes: dict[str, float] = {}
        for cb in self.callbacks:
            votes.update(cb.step_flags(self) if hasattr(cb, "step_flags") else {})
        names = sorted(votes)
        local_tokens = self.objective.local_step_tokens()
        head = torch.stack([nonfinite.double(), torch.tensor(float(local_tokens or 0), dtype=torch.float64,
                                                             device=nonfinite.device)])
        vec = torch.cat([head, torch.tensor([votes[n] for n in names], dtype=torch.float64, device=nonfinite.device)])
        if self.dist.world_size > 1:
            dist.all_reduce(vec)
        values = vec.tolist()
        self.agreed = {"nonfinite": values[0] > 0, **dict(zip(names, values[2:]))}
        self.agreed["tokens"] = values[1] if local_tokens is not None else float(self.plan.tokens_per_step)
        return self.agreed

    def _finish_step(self, skip: bool, local_loss: torch.Tensor, t0: float) -> dict[str, Any]:
        self.state.step += 1
        step_tokens = int(self.agreed["tokens"])
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
        metrics = self._step_metrics(local_loss, skip, time.perf_counter() - t0)
        metrics.update(self.objective.step_metrics())
        metrics["train/step_tokens"] = float(step_tokens)  # for tokens/s and MFU (not logged itself)
        return metrics

    def next_batch(self) -> Any:
        """The objective's next micro-batch; the wait is counted in ``timings["data"]``."""
        t0 = time.perf_counter()
        batch = self.objective.next_batch()
        self.timings["data"] += time.perf_counter() - t0
        return batch

    def train_loss(self, batch, micro_step: int) -> torch.Tensor:
        """The objective's loss of one training micro-batch, passed through the callbacks' ``on_loss``."""
        loss = self.objective.loss(batch, micro_step=micro_step)
        for cb in self._loss_hooks:
            loss = cb.on_loss(self, loss, micro_step)
        return loss

    def _step_metrics(self, local_loss: torch.Tensor, skipped: bool, seconds: float) -> dict[str, Any]:
        """The step's metrics. ``train/loss`` (this rank's mean, NaN when skipped) and ``train/grad_norm``
        may be device tensors: the logger averages them over ranks and reads them on logging steps only."""
        m: dict[str, Any] = {
            "train/loss": local_loss,
            "train/lr": float(self.engine.get_lr()[0]),
            "train/step_time": seconds,
            "train/tokens_seen": float(self.state.tokens_seen),
            "train/skipped_steps": float(self.state.skipped_steps),
        }
        gn = None if skipped else self.engine.get_global_grad_norm()
        if gn is not None:
            m["train/grad_norm"] = gn
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
        t0 = time.perf_counter()
        try:
            metrics = self.objective.evaluate()
        finally:
            self.engine.train()
            self.timings["eval"] += time.perf_counter() - t0
        for cb in self.callbacks:
            cb.on_eval_end(self, metrics)
        return metrics

    # ------------------------------------------------------------------ run state
    def state_dict(self) -> dict[str, Any]:
        return {"trainer": asdict(self.state), **self.objective.state_dict()}

    def load_state_dict(self, sd: dict[str, Any], allow_data_change: bool = False) -> None:
        self.state = TrainState(**sd["trainer"])
        self.objective.load_state_dict(sd, allow_data_change=allow_data_change)
