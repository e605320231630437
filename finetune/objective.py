"""Fine-tuning's objective on the shared runtime: task batches, the task loss (plus an optional
λ-weighted LM loss), task evaluation and generation. The loop (step, skip-on-NaN, gradient
accumulation), checkpoints, signals and TensorBoard are pretraining's :class:`~pretrain.trainer.Trainer`,
unchanged; :class:`TaskObjective` plugs into it like pretraining's language modelling does.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from finetune.data import Example
from finetune.tasks import IGNORE, SFT, Task
from lmforge.errors import CheckpointError, ConfigError
from lmforge.log import progress_enabled
from pretrain.objective import mlm_inputs
from pretrain.trainer import Callback, Objective, Trainer


class TaskLoader:
    """Deterministic, resumable, rank-sharded batches of encoded features.

    The global order is a seeded permutation per epoch; optimizer step s uses global samples
    [s·G, (s+1)·G) (G = global batch), micro-batch k of rank r the slice
    ``k·(micro·ranks) + r·micro`` of it — independent of how many ranks there are, like the
    pretraining loader. Its state is the number of samples consumed.
    """

    def __init__(self, feats: list[dict[str, Any]], micro: int, grad_accum: int, rank: int, world: int, seed: int,
                 collate):
        self.feats, self.micro, self.accum, self.rank, self.world, self.seed = feats, micro, grad_accum, rank, world, seed
        self.collate = collate
        self.consumed = 0  # global samples of completed optimizer steps
        self._micro_calls = 0  # micro-batches served since the last step boundary
        self._perm_cache: dict[int, np.ndarray] = {}
        h = hashlib.sha256(json.dumps([f["input_ids"] for f in feats]).encode())
        h.update(json.dumps([f.get("labels", f.get("start_positions")) for f in feats]).encode())
        self.fingerprint = h.hexdigest()

    @property
    def global_batch(self) -> int:
        return self.micro * self.world * self.accum

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.feats))}
        return self._perm_cache[epoch]

    def next_batch(self) -> dict[str, torch.Tensor]:
        k = self._micro_calls
        start = self.consumed + k * self.micro * self.world + self.rank * self.micro
        idx = []
        for g in range(start, start + self.micro):
            epoch, pos = divmod(g, len(self.feats))
            idx.append(int(self._perm(epoch)[pos]))
        self._micro_calls += 1
        if self._micro_calls == self.accum:
            self._micro_calls = 0
            self.consumed += self.global_batch
        rows = [self.feats[i] for i in idx]
        self.last_tokens = sum(len(f["input_ids"]) for f in rows)  # real tokens: the collate pads after them
        return self.collate(rows)

    @property
    def epoch(self) -> float:
        return self.consumed / len(self.feats)

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "seed": self.seed, "fingerprint": self.fingerprint}

    def load_state_dict(self, sd: dict[str, Any], allow_data_change: bool = False) -> None:
        if sd["fingerprint"] != self.fingerprint and not allow_data_change:
            raise CheckpointError("the fine-tuning data changed since the checkpoint was saved; "
                                     "pass --resume.allow_data_change=true to continue on the new data")
        self.consumed, self._micro_calls = sd["consumed"], 0


class TaskObjective(Objective):
    """A task's batches, loss and evaluation. ``cfg`` is the resolved, frozen fine-tuning config."""

    data_name = "fine-tuning data"

    def __init__(self, cfg, task: Task, splits: dict[str, tuple[list[Example], list[dict[str, Any]]]],
                 loader: TaskLoader, special_ids: dict[str, int], tokenizer_sha256: str):
        self.cfg, self.task, self.splits, self._loader = cfg, task, splits, loader
        self.special_ids, self.tokenizer_sha256 = special_ids, tokenizer_sha256
        self.best: dict[str, Any] | None = None  # {"metric", "value", "step"}
        self.evals_without_improvement = 0
        self.early_stopped = False
        self._local_tokens = 0
        self._last_parts: dict[str, torch.Tensor] = {}
        self.last_generations: list[dict[str, str]] = []

    @property
    def loader(self) -> TaskLoader:
        return self._loader

    def has_validation(self) -> bool:
        return bool(self.splits.get("validation", ([], []))[1])

    def next_batch(self):
        batch = self._loader.next_batch()
        self._local_tokens += self._loader.last_tokens
        return batch

    def local_step_tokens(self) -> int:
        """This rank's real (unpadded) tokens of the step (summed over ranks in the step's one collective)."""
        n, self._local_tokens = self._local_tokens, 0
        return n

    def eval_every(self) -> int:
        return self.cfg.train.eval_every or self.steps_per_epoch

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self._loader.feats) / self._loader.global_batch))

    # ------------------------------------------------------------------ objective
    def _prepare(self, batch: dict[str, torch.Tensor], micro_step: int, train: bool) -> dict[str, torch.Tensor]:
        t = self.trainer
        batch = {k: v.to(t.dist.device) for k, v in batch.items()}
        if self.cfg.transfer.aux_lm_weight and self.task.kind == "masked":
            # pretraining's own masking (seeded by step, micro-step and rank)
            batch["mlm_input_ids"], batch["mlm_labels"] = mlm_inputs(
                batch["input_ids"], self.special_ids, t.engine.module.config.vocab_size, self.cfg.model.mlm_probability,
                self.cfg.train.seed, t.state.step if train else -1, micro_step, t.dist.rank)
        return batch

    def loss(self, batch, micro_step: int = 0, train: bool = True) -> torch.Tensor:
        out = self.trainer.engine(**self._prepare(batch, micro_step, train))
        self._last_parts = {k: out[k].detach() for k in ("task_loss", "lm_loss") if k in out}  # read when logged
        return out["loss"]

    def step_metrics(self) -> dict[str, Any]:
        m = {f"train/{k}": v for k, v in self._last_parts.items()}  # this rank's last micro-batch
        m["train/epoch"] = self._loader.epoch
        return m

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def run_split(self, split: str) -> tuple[dict[str, float], list[Any]]:
        """Loss and task metrics over a whole split; every rank runs the same number of batches
        (ZeRO-3 gathers parameters collectively), padding its last one with ignored rows."""
        t = self.trainer
        examples, feats = self.splits[split]
        t.engine.eval()
        B = t.plan.micro_batch_per_rank
        # batches of similar lengths pad less (eval is forward-only, so order does not change any result)
        mine = sorted(range(t.dist.rank, len(feats), t.dist.world_size), key=lambda i: len(feats[i]["input_ids"]))
        n_batches = math.ceil(math.ceil(len(feats) / t.dist.world_size) / B)
        preds: list[tuple[int, Any]] = []
        total = torch.zeros(2, dtype=torch.float64, device=t.dist.device)  # (loss sum, label units)
        enabled = progress_enabled() if self.cfg.train.progress is None else (self.cfg.train.progress and t.dist.is_main)
        bar = tqdm(total=n_batches, desc=f"{split}", unit="batch", leave=False, dynamic_ncols=True,
                   disable=not enabled or n_batches < 10)
        for b in range(n_batches):
            bar.update(1)
            idx = mine[b * B:(b + 1) * B]
            rows = [feats[i] for i in idx] + [_ignored(feats[idx[0] if idx else 0])] * (B - len(idx))
            batch = self._prepare(self.task.collate(rows), b, train=False)
            out = t.engine(**batch)
            units = _label_units(batch)
            if units:
                total += torch.tensor([float(out["task_loss"]) * units, units], dtype=torch.float64,
                                      device=t.dist.device)
            if idx:
                real = len(idx)
                p = self.task.predictions({k: v[:real] for k, v in out.items() if v.dim() > 0},
                                          {k: v[:real] for k, v in batch.items()})
                preds += list(zip(idx, p))
        bar.close()
        if t.dist.world_size > 1:
            dist.all_reduce(total)
            gathered: list[Any] = [None] * t.dist.world_size
            dist.all_gather_object(gathered, preds)
            preds = [x for g in gathered for x in g]
        preds.sort(key=lambda t: t[0])
        metrics = {"loss": float(total[0] / total[1]) if total[1] else float("nan")}
        metrics.update(self.task.score(examples, feats, [p for _, p in preds]))
        t.engine.train()
        return metrics, preds

    def evaluate(self) -> dict[str, float]:
        m, _ = self.run_split("validation")
        metrics = {f"eval/{k}": v for k, v in m.items()}
        if isinstance(self.task, SFT):
            metrics.update({f"eval/{k}": v for k, v in self.generate_samples("validation", self.cfg.task.num_samples).items()})
        return metrics

    # ------------------------------------------------------------------ generation (sft)
    @torch.no_grad()
    def generate(self, prompts: list[list[int]]) -> list[list[int]]:
        """Greedy continuations of token-id prompts (left-padded, no KV cache); every rank runs the
        same number of forward passes, so it works under ZeRO-3."""
        tr = self.trainer
        tr.engine.eval()
        out: list[list[int]] = []
        pad, eos = self.special_ids["pad"], self.special_ids["eos"]
        B = tr.plan.micro_batch_per_rank
        for s in range(0, len(prompts), B):
            chunk = prompts[s:s + B]
            n = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (n - len(p)) + p for p in chunk], device=tr.dist.device)
            mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in chunk], device=tr.dist.device)
            done = torch.zeros(len(chunk), dtype=torch.bool, device=tr.dist.device)
            new: list[list[int]] = [[] for _ in chunk]
            for _ in range(self.cfg.task.max_new_tokens):
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                h = tr.engine.module.task_model.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                                        use_cache=False).last_hidden_state
                nxt = tr.engine.module.task_model.lm_head(h[:, -1]).argmax(-1)
                for i, t in enumerate(nxt.tolist()):
                    if not done[i]:
                        if t == eos:
                            done[i] = True
                        else:
                            new[i].append(t)
                ids = torch.cat([ids, nxt[:, None]], 1)
                mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
            out += new
        tr.engine.train()
        return out

    def generate_samples(self, split: str, limit: int | None) -> dict[str, float]:
        """Generate for the first ``limit`` prompts of ``split`` (all ranks the same ones) and score them."""
        task: SFT = self.task  # type: ignore[assignment]
        examples = self.splits[split][0][:limit] if limit else self.splits[split][0]
        if not examples:
            return {}
        prompts = [[self.special_ids["bos"], *self.task.tok.encode(task.prompt(task._pair(ex)[0]))] for ex in examples]
        texts = [self.task.tok.decode(g) for g in self.generate(prompts)]
        self.last_generations = [{"instruction": task._pair(ex)[0], "reference": task._pair(ex)[1], "generated": t}
                                 for ex, t in zip(examples, texts)]
        return task.score_generations(examples, texts)

    # ------------------------------------------------------------------ run state
    def state_dict(self) -> dict[str, Any]:
        return {"loader": self._loader.state_dict(),
                "finetune": {"best": self.best, "evals_without_improvement": self.evals_without_improvement}}

    def load_state_dict(self, sd: dict[str, Any], allow_data_change: bool = False) -> None:
        self._loader.load_state_dict(sd["loader"], allow_data_change)
        ft = sd.get("finetune") or {}
        self.best = ft.get("best")
        self.evals_without_improvement = ft.get("evals_without_improvement", 0)


def _ignored(feat: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``feat`` whose targets are all ignored (pads a rank's last evaluation batch)."""
    f = dict(feat)
    if "labels" in f:
        f["labels"] = [IGNORE] * len(f["labels"]) if isinstance(f["labels"], list) else IGNORE
    for k in ("start_positions", "end_positions"):
        if k in f:
            f[k] = 10**9  # clamped to the sequence length: the ignored index of the QA loss
    return f


def _label_units(batch: dict[str, torch.Tensor]) -> int:
    """How many targets the batch's task loss averages over."""
    if "start_positions" in batch:
        return int((batch["start_positions"] < batch["input_ids"].shape[1]).sum())
    return int((batch["labels"] != IGNORE).sum())  # (sft: position 0 is never a target, so the shift changes nothing)


class BestCheckpoint(Callback):
    """After each validation: keep the best checkpoint (by ``train.select_metric``) and stop early
    after ``early_stopping_patience`` validations without improvement."""

    def __init__(self, metric: str, checkpointer):
        self.metric = metric if metric.startswith("eval/") else f"eval/{metric}"
        self.lower_is_better = self.metric.endswith("loss") or self.metric.endswith("ppl")
        self.checkpointer = checkpointer

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        from lmforge.rundir import checkpoint_dir, mark_best

        if self.metric not in metrics:
            raise ConfigError(f"train.select_metric: '{self.metric}' is not among the validation metrics "
                                     f"{sorted(metrics)}")
        obj: TaskObjective = trainer.objective
        value = metrics[self.metric]
        best = obj.best
        better = best is None or (value < best["value"] if self.lower_is_better else value > best["value"])
        if better:
            obj.best = {"metric": self.metric, "value": value, "step": trainer.state.step}
            obj.evals_without_improvement = 0
            self.checkpointer._save(trainer, "best")
            if trainer.dist.is_main:
                mark_best(trainer.cfg.run_dir, checkpoint_dir(trainer.cfg.run_dir, trainer.state.step), obj.best)
        else:
            obj.evals_without_improvement += 1
            patience = trainer.cfg.train.early_stopping_patience
            if patience and obj.evals_without_improvement >= patience:
                trainer.stop_requested = obj.early_stopped = True
