"""The training loop: read it top to bottom in :meth:`Trainer.fit`.

The loop is the same for every stage; what it optimises is an :class:`~pretrain.objective.Objective`
(pretraining's language modelling, fine-tuning's tasks). The trainer owns run state (step, tokens
seen, skipped steps) and nothing else; logging, evaluation output and checkpoints hang off it as
callbacks, and so do the faults tests inject (a NaN loss, a failing rank).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmforge.errors import LmforgeError
from lmforge.log import print0
from pretrain.dist import DistInfo
from pretrain.engine import BatchPlan
from pretrain.spike import SpikeGuard, Verdict


class NonFiniteLossError(LmforgeError):
    """Too many consecutive steps had a NaN/inf loss."""


class SpikeError(LmforgeError):
    """A loss-spike rollback found no checkpoint to return to."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps attempted (skipped ones included: their data was consumed)
    tokens_seen: int = 0  # training tokens consumed, all ranks together
    skipped_steps: int = 0  # steps skipped for a non-finite loss or a loss spike
    consecutive_skips: int = 0
    dropped_microbatches: int = 0  # non-finite micro-batches dropped inside an accumulation window
    spikes: int = 0  # loss (or gradient-norm) spikes seen, rolled-back steps included
    rollbacks: int = 0  # loss-spike rollbacks
    skipped_samples: int = 0  # global samples the rollbacks left out


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

    def data_position(self) -> int | None:
        """Global samples consumed so far, or None when the data cannot be skipped (no rollbacks)."""
        return None

    def skip_data(self, start: int, end: int) -> None:
        """Never train on global samples ``[start, end)`` (a loss-spike rollback)."""
        raise NotImplementedError


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
    def on_rollback(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """The run went back to ``record["to_step"]`` (a loss-spike rollback); the trainer state is restored."""
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
        self.spike = SpikeGuard(cfg.spike)
        self._rollback_due = False
        self._grad_norm: Any = None  # the last step's gradient norm (a device tensor, a float or None)
        # ZeRO-0 in fp32 runs torch's optimizer itself, which keeps no gradient norm: it is computed here
        self._own_grad_norm = cfg.zero.stage == 0 and not hasattr(engine.optimizer, "_global_grad_norm")
        # loads a checkpoint dir into this trainer (weights, optimizer, run state, RNG): set by the runtime
        # (pretrain.runtime), which knows the checkpoint format; a loss-spike rollback uses it
        self.restore_checkpoint: Callable[[Path], None] | None = None

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
            if self._rollback_due:
                self.rollback()
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
            if k == accum - 1:
                self._agree(bad, loss_sum / accum)
                if self.agreed["nonfinite"] or self.agreed["spike_skip"]:
                    # every rank: non-finite gradients make DeepSpeed's overflow check skip the whole update
                    loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
        skip = bool(self.agreed["nonfinite"] or self.agreed["spike_skip"])
        if skip and self.engine.skipped_steps == skipped_before:
            raise RuntimeError("DeepSpeed applied an update with non-finite gradients; lmforge relies on its ZeRO "
                               "optimizer skipping it (deepspeed 0.19): check the DeepSpeed version")
        local_loss = torch.full((), float("nan"), device=dev) if self.agreed["nonfinite"] else loss_sum / accum
        return self._finish_step(skip, local_loss, t0)

    def _train_step_checked(self, t0: float) -> dict[str, Any]:
        """ZeRO-0: every micro-batch's loss is agreed on before its backward (the engine would apply NaNs).
        A micro-batch whose loss is a spike (``spike.action`` skip/rollback) is left out the same way."""
        losses: list[torch.Tensor] = []
        skip = False
        last_good = None
        spiked = float("nan")  # the agreed loss of a micro-batch left out as a spike
        accum = self.plan.grad_accum_steps
        for k in range(accum):
            batch = self.next_batch()
            if skip:
                continue  # the step is skipped: consume its data so the position stays exact
            loss = self.train_loss(batch, k)
            nonfinite, mean = self._micro_agree(loss)
            spike = not nonfinite and self.spike.would_skip(mean)
            if spike:
                spiked = mean if spiked != spiked else max(spiked, mean)
            if nonfinite or spike:
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
            if k == accum - 1 and self._own_grad_norm:
                self._grad_norm = self._global_grad_norm()  # before the step clips and clears the gradients
            self.engine.step()
        dev = self.dist.device
        local_loss = torch.stack(losses).mean() if losses else torch.full((), float("nan"), device=dev)
        # the callbacks' votes and the token count; the spike guard judges the step's mean loss (or the
        # spiking micro-batch's, when one was left out)
        self._agree(torch.zeros((), device=dev), local_loss if spiked != spiked else None, spiked_loss=spiked)
        return self._finish_step(skip, local_loss, t0)

    def _global_grad_norm(self) -> torch.Tensor | None:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return None
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    def _micro_agree(self, loss: torch.Tensor) -> tuple[bool, float]:
        """ZeRO-0, one micro-batch: (a non-finite loss on any rank, the loss's mean over ranks), one read."""
        d = loss.detach().float()
        finite = torch.isfinite(d)
        vec = torch.stack([(~finite).float(), torch.where(finite, d, 0.0)])
        if self.dist.world_size > 1:
            dist.all_reduce(vec)
        bad, total = vec.tolist()
        return bad > 0, total / self.dist.world_size

    def _agree(self, nonfinite: torch.Tensor, loss: torch.Tensor | None = None,
               spiked_loss: float = float("nan")) -> dict[str, float]:
        """The step's one collective: sums over ranks of [non-finite losses, the objective's tokens, this
        step's loss, the last step's gradient norm, the callbacks' votes], read back once into
        ``self.agreed``. The spike guard then judges the agreed loss alike on every rank."""
        votes: dict[str, float] = {}
        for cb in self.callbacks:
            votes.update(cb.step_flags(self) if hasattr(cb, "step_flags") else {})
        names = sorted(votes)
        local_tokens = self.objective.local_step_tokens()
        dev = nonfinite.device
        nan = torch.full((), float("nan"), dtype=torch.float64, device=dev)
        gn = nan if self._grad_norm is None else torch.as_tensor(self._grad_norm, dtype=torch.float64).to(dev)
        head = torch.stack([nonfinite.double(), torch.tensor(float(local_tokens or 0), dtype=torch.float64, device=dev),
                            nan if loss is None else loss.detach().double(), gn])
        vec = torch.cat([head, torch.tensor([votes[n] for n in names], dtype=torch.float64, device=dev)])
        if self.dist.world_size > 1:
            dist.all_reduce(vec)
        values = vec.tolist()
        world = self.dist.world_size
        self.agreed = {"nonfinite": values[0] > 0, **dict(zip(names, values[4:]))}
        self.agreed["tokens"] = values[1] if local_tokens is not None else float(self.plan.tokens_per_step)
        step_loss = spiked_loss if spiked_loss == spiked_loss else values[2] / world
        verdict = Verdict() if self.agreed["nonfinite"] else self.spike.observe(
            self.state.step + 1, step_loss, None if values[3] != values[3] else values[3] / world)
        self.agreed["spike_skip"] = verdict.skip
        self.agreed["spikes"] = float(verdict.loss_spike) + float(verdict.grad_spike)
        self._rollback_due = verdict.rollback and self.objective.data_position() is not None
        if verdict.loss_spike or verdict.grad_spike:
            what = (f"loss {step_loss:.4f}" if verdict.loss_spike else "") + \
                   (" and " if verdict.loss_spike and verdict.grad_spike else "") + \
                   (f"gradient norm {values[3] / world:.3g} (step {self.state.step})" if verdict.grad_spike else "")
            act = "update skipped" if verdict.skip else "logged"
            print0(f"spike at step {self.state.step + 1}: {what} ({act}; spike.action={self.cfg.spike.action})")
        return self.agreed

    def _finish_step(self, skip: bool, local_loss: torch.Tensor, t0: float) -> dict[str, Any]:
        self.state.step += 1
        self.state.spikes += int(self.agreed.get("spikes", 0))
        step_tokens = int(self.agreed["tokens"])
        self.state.tokens_seen += step_tokens
        if skip:
            self.state.skipped_steps += 1
            self.state.consecutive_skips += 1
            if self.state.consecutive_skips >= self.cfg.train.max_skipped_steps:
                why = "a loss spike or a non-finite loss" if self.agreed.get("spike_skip") else "a non-finite loss"
                raise NonFiniteLossError(
                    f"{self.state.consecutive_skips} consecutive steps had {why} (last: step "
                    f"{self.state.step}); lower optim.lr, use precision=bf16/fp32, check the data, or raise "
                    "spike.threshold"
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
            "train/spikes": float(self.state.spikes),
            "train/rollbacks": float(self.state.rollbacks),
            "train/skipped_samples": float(self.state.skipped_samples),
        }
        if not self._own_grad_norm:
            self._grad_norm = None if skipped else self.engine.get_global_grad_norm()
        elif skipped:
            self._grad_norm = None
        if self._grad_norm is not None:
            m["train/grad_norm"] = self._grad_norm
        if self.cfg.precision == "fp16":
            m["train/loss_scale"] = float(getattr(self.engine.optimizer, "cur_scale", getattr(self.engine.optimizer, "loss_scale", 0.0)))
        return m

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
    @property
    def rollback_due(self) -> bool:
        """The step just taken ends in a loss-spike rollback (callbacks: do not start a save of it)."""
        return self._rollback_due

    def state_dict(self) -> dict[str, Any]:
        # the last gradient norm too: the guard judges it at the next step, also after a resume
        norm = None if self._grad_norm is None else float(self._grad_norm)
        return {"trainer": asdict(self.state), "spike": {**self.spike.state_dict(), "last_grad_norm": norm},
                **self.objective.state_dict()}

    def load_state_dict(self, sd: dict[str, Any], allow_data_change: bool = False) -> None:
        self.state = TrainState(**sd["trainer"])
        self.spike.load_state_dict(sd.get("spike", {}))
        self._grad_norm = sd.get("spike", {}).get("last_grad_norm")
        self.objective.load_state_dict(sd, allow_data_change=allow_data_change)

    # ------------------------------------------------------------------ loss-spike rollback
    def rollback(self) -> None:
        """Back to the newest checkpoint before the first recent spike, with the data moved past every
        sample trained since (recorded in ``RUN_DIR/data_skips.json``, which a resume applies too)."""
        from lmforge.rundir import (
            abandon_checkpoints_after,
            add_data_skip,
            complete_checkpoints,
            read_state,
            step_of,
        )

        self._rollback_due = False
        spikes, first = list(self.spike.recent), self.spike.first_recent_spike()
        before = [d for d in complete_checkpoints(self.cfg.run_dir) if step_of(d) < first]
        if not before:
            raise SpikeError(
                f"{len(spikes)} loss spikes (steps {', '.join(map(str, spikes))}) and no checkpoint before step "
                f"{first} to roll back to: save more often (checkpoint.interval_steps) or use spike.action=skip")
        step_dir = before[-1]
        if self.restore_checkpoint is None:
            raise SpikeError("spike.action=rollback: this trainer was built without a way to restore checkpoints")
        to_step = step_of(step_dir)
        start, end = read_state(step_dir)["loader"]["cursor"], self.objective.data_position()
        record = {"start": start, "end": end, "from_step": self.state.step, "to_step": to_step,
                  "spike_steps": spikes}
        kept = (self.state.spikes, self.state.rollbacks + 1, self.state.skipped_samples + end - start)
        if self.dist.is_main:
            add_data_skip(self.cfg.run_dir, record)
            abandon_checkpoints_after(self.cfg.run_dir, to_step)
        if self.dist.world_size > 1:
            dist.barrier()  # the record is durable before any rank goes on
        self.restore_checkpoint(step_dir)
        self.objective.skip_data(start, end)
        self.state.spikes, self.state.rollbacks, self.state.skipped_samples = kept
        self.spike.forget_recent()
        print0(f"rollback {self.state.rollbacks}: spikes at steps {spikes} → back to {step_dir.name}; global samples "
               f"[{start}, {end}) are skipped (recorded in data_skips.json)")
        for cb in self.callbacks:
            cb.on_rollback(self, record)
