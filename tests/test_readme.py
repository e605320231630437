"""The README cannot drift: every command of its ```bash blocks runs, in order, with tiny settings.

The commands run in a scratch directory that links ``configs/``, ``ds_configs/`` and ``slurm/`` from
the repository and holds small inputs under the names the README uses (``data/…``, ``corpus/``,
``more/``). "Tiny settings" are the rewrites in ``TINY`` below (fewer steps, smaller vocabularies, a
small corpus instead of the whole embedded one); nothing else is changed. Commands that cannot run
inside a test (the two top-level make targets, a TensorBoard server, blocks marked as needing a GPU
cluster) are listed in ``NOT_RUN`` with the reason, and the test checks that nothing else is skipped.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import finetune_data as fd
import pytest
from conftest import REPO, stage_env

NOT_RUN = {
    "make demo": "the demo itself (≈10 min; CI runs `make test`, which runs this file)",
    "make test": "this test suite",
    "make bench": "the benchmarks (minutes of timing runs; bench/ has its own smoke test)",
    "make lint": "ruff over the repository (run by developers)",
    "tensorboard --logdir": "a server that never exits",
}
EXAMPLE_MARK = "# example"  # a block whose first line starts with this needs hardware a test does not have

# (pattern, replacement): what "tiny settings" means, nothing else is rewritten
TINY: list[tuple[str, str]] = [
    (r"--vocab-size \d+", "--vocab-size 600 --sample-docs 60"),
    (r"--train\.max_steps=(\d+)", lambda m: f"--train.max_steps={max(2, int(m.group(1)) // 100)}"),
    (r"step_0*(\d+)", lambda m: f"step_{max(2, int(m.group(1)) // 100):08d}"),
    (r"--checkpoint\.interval_steps=\d+", "--checkpoint.interval_steps=1"),
    (r"--train\.epochs=\d+", "--train.max_steps=3"),
    (r"(python -m data_pipeline build --tokenizer out/tok --out out/shards)", r"\1 --input corpus/"),
    (r"--val-docs \d+", "--val-docs 4"),
    (r"--seq-len 2048", "--seq-len 64"),
]
TINY_TRAIN = ["--data.seq_len=64", "--train.micro_batch_size=2", "--train.eval_every=0", "--train.eval_samples=4"]
TINY_FT = ["--task.max_seq_len=64", "--train.micro_batch_size=4"]


def readme_blocks() -> list[tuple[list[str], bool]]:
    """(commands, runnable) for every ```bash block, continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        example = block.lstrip().startswith(EXAMPLE_MARK)
        joined = re.sub(r"\\\n\s*", " ", block)
        cmds = [c for c in (_strip_comment(line).strip() for line in joined.splitlines()) if c]
        out.append((cmds, not example))
    return out


def _strip_comment(line: str) -> str:
    """The line without its trailing ``# comment`` (a '#' inside quotes or a word is kept)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def tiny(cmd: str) -> str:
    for pat, rep in TINY:
        cmd = re.sub(pat, rep, cmd)
    if re.search(r"-m pretrain\b(?!\.)", cmd) and "--dry-run" not in cmd:
        cmd += " " + " ".join(TINY_TRAIN)
    if re.search(r"-m finetune\b(?!\.)", cmd):
        cmd += " " + " ".join(TINY_FT) + (" --task.doc_stride=16" if "qa.yaml" in cmd else "")
    return cmd


def _inputs(work: Path, stdlib_files: list[str]) -> None:
    for name in ("configs", "ds_configs", "slurm"):
        (work / name).symlink_to(REPO / name)
    corpus = work / "corpus"
    corpus.mkdir()
    for i, f in enumerate(stdlib_files[:40]):
        (corpus / f"doc_{i:03d}.py").write_bytes(Path(f).read_bytes())
    data = work / "data"
    data.mkdir()
    texts = [Path(f).read_text(errors="replace")[:2000] for f in stdlib_files[40:80]]
    with gzip.open(data / "part-0.jsonl.gz", "wt") as g:
        g.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    (work / "more").mkdir()
    import datasets

    datasets.Dataset.from_list([{"text": t} for t in texts[:20]]).to_parquet(str(work / "more" / "part-0.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": t} for t in texts[20:]])}).save_to_disk(
        str(data / "my_dataset"))
    fd.classification(data / "train.csv", 60, 1)
    fd.classification(data / "test.csv", 20, 2)
    fd.conll(data / "train.conll", 40, 1)
    fd.conll(data / "test.conll", 20, 2)
    fd.squad(data / "squad_train.json", 30, 1)
    fd.squad(data / "squad_dev.json", 10, 2)
    fd.sft(data / "sft.jsonl", 30, 1)
    with open(data / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], ["a b", "x"]])


BLOCKS = readme_blocks()


@pytest.fixture(scope="module")
def readme_work(tmp_path_factory, stdlib_files):
    """The scratch directory and environment every block runs in (state carries from block to block)."""
    work = tmp_path_factory.mktemp("readme") / "work"
    work.mkdir()
    _inputs(work, stdlib_files)
    env = stage_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "LMFORGE_SLURM"))}
    yield work, env
    # a README block that started the local cluster and failed before its `stop`
    subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "stop"], env=env, capture_output=True, timeout=120)


def test_readme_blocks_are_all_run_or_excused():
    runnable = [c for cmds, ok in BLOCKS if ok for c in cmds]
    excused = [c for c in runnable if any(c.startswith(k) for k in NOT_RUN)]
    assert {c.split()[0] for c in excused} <= {"make", "tensorboard"}
    assert len(runnable) - len(excused) >= 20  # the tour really runs
    assert any("slurm.submit" in c for c in runnable) and any(c.startswith("sbatch") for c in runnable)
    assert any(not ok for _, ok in BLOCKS)  # the GPU-cluster example block is recognised, not run


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}-{c[0].split()[0]}" for i, (c, _) in enumerate(BLOCKS)])
def test_readme_block_runs(readme_work, index):
    """Each block runs as one shell script (``set -e``), in README order, in one scratch directory."""
    work, env = readme_work
    cmds, runnable = BLOCKS[index]
    script = [tiny(c) for c in cmds if runnable and not any(c.startswith(k) for k in NOT_RUN)]
    if not script:  # nothing to run here: the block is only excused commands (make …) or a GPU-cluster example
        assert not runnable or all(any(c.startswith(k) for k in NOT_RUN) for c in cmds)
        return
    body = "set -euo pipefail\n" + "\n".join(script)
    proc = subprocess.run(["bash", "-c", body], cwd=work, env=env, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, (f"README block failed ({proc.returncode}):\n{body}\n--- stdout\n"
                                  f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")
