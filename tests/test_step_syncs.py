"""One synchronisation per optimizer step (issue: every micro-batch did an `isfinite().item()`, an all-reduce
and another `.item()`; the checkpoint callback an all-reduce and a broadcast per step; fine-tuning a `float()`
per micro-batch). Counted in real 2-rank runs with accumulation 4 by a test callback (tests/hooks.py)."""

from __future__ import annotations

import json

import finetune_data as fd
import pytest
from conftest import run_stage, stage_env

TINY = "configs/pretrain/tiny.yaml"


def _rows(folder, rank=0) -> list[dict]:
    return [json.loads(line) for line in (folder / f"rank{rank}.jsonl").read_text().splitlines()]


def _check(folder, steps: int) -> None:
    for rank in (0, 1):
        rows = _rows(folder, rank)
        assert [r["step"] for r in rows] == list(range(1, steps + 1))
        plain = [r for r in rows if not r["logging"] and not r["saved"] and r["step"] < steps]
        assert len(plain) >= steps // 2
        for r in plain:  # the step's agreement: one collective, its result read once
            assert r["collectives"] == 1 and r["reads"] == 1, r


@pytest.mark.parametrize("stage", [2, 0])
def test_pretraining_step_has_one_collective_and_one_read(tmp_path, shards_dir, stage):
    syncs = tmp_path / "syncs"
    syncs.mkdir()
    run_stage("pretrain", [TINY, f"--run_dir={tmp_path / 'run'}", f"--data.shards=[{shards_dir}]", "--data.seq_len=32",
                           "--train.max_steps=10", "--train.micro_batch_size=1", "--train.global_batch_size=8",
                           "--train.log_every=5", "--train.eval_every=0", "--train.eval_samples=8",
                           f"--zero.stage={stage}", "--precision=fp32", "--checkpoint.interval_minutes=5",
                           "--callbacks=[hooks:count_syncs]"],
              nproc=2, env=stage_env(LMFORGE_TEST_SYNCS=str(syncs)))
    if stage == 0:  # ZeRO-0 applies whatever gradients it gets: each micro-batch's loss is agreed on first
        for r in _rows(syncs):
            if not r["logging"] and not r["saved"] and r["step"] < 10:
                assert r["collectives"] == 4 + 1, r
        return
    _check(syncs, 10)


def test_finetune_step_has_one_collective_and_one_read(tmp_path, shards_dir):
    pre = tmp_path / "pre"
    run_stage("pretrain", [TINY, f"--run_dir={pre}", f"--data.shards=[{shards_dir}]", "--data.seq_len=32",
                           "--train.max_steps=2", "--train.eval_every=0", "--train.eval_samples=8"])
    syncs = tmp_path / "syncs"
    syncs.mkdir()
    train = fd.classification(tmp_path / "train.csv", 200, 1)
    run_stage("finetune", ["configs/finetune/classify.yaml", f"--run_dir={tmp_path / 'ft'}", f"--init_from={pre}",
                           f"--data.train={train}", "--precision=fp32", "--task.max_seq_len=32", "--train.max_steps=10",
                           "--train.micro_batch_size=1", "--train.global_batch_size=8", "--train.log_every=5",
                           "--train.eval_every=100", "--zero.stage=2", "--transfer.aux_lm_weight=0.5",
                           "--callbacks=[hooks:count_syncs]"],
              nproc=2, env=stage_env(LMFORGE_TEST_SYNCS=str(syncs)))
    _check(syncs, 10)
