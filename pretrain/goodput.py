"""``python -m pretrain.goodput RUN_DIR`` — where a run's wall time went, across all its restarts and requeues.

Every start of a job is a *segment*. Its rank 0 keeps one small record in the run directory
(:func:`lmforge.rundir.goodput_segment_file`, rewritten atomically at every logging step, checkpoint save
and at the end by :class:`pretrain.monitor.GoodputMonitor`): when the process started, when the record was
last written, seconds per part, the step reached, and the productive seconds at every checkpoint it saved.
A segment killed with SIGKILL leaves its last record; the next segment says which checkpoint it resumed
from, and the steps trained after that checkpoint count as *lost* (the resume trains them again).

Parts (seconds; they add up to the wall time, the sum over segments of last record - process start):

- ``productive``: optimizer steps (forward, backward, update, the step's agreement), minus data waits and
  lost work;
- ``startup``: process start (imports included) to the first training step, less the parts below;
- ``data``: waiting for the next batch; ``eval``; ``checkpoint_save``; ``checkpoint_load``;
- ``conversion``: world-size conversions of a checkpoint (DeepSpeed's universal format);
- ``lost``: steps trained after the last checkpoint before a crash (or a loss-spike rollback);
- ``other``: the rest (logging, callbacks, teardown).

Pure Python (no torch): cheap to import from ``slurm.status``.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError, run_cli
from lmforge.rundir import goodput_segment_files

USAGE = __doc__.strip().splitlines()[0].split(" — ")[0].strip("`")

# measured parts of a segment's record, in table order (productive first; lost and other are derived)
PARTS = ("productive", "startup", "data", "eval", "checkpoint_save", "checkpoint_load", "conversion")
TABLE = (*PARTS[:1], "lost", *PARTS[1:], "other")

#: seconds of this process's work done before the trainer exists (world-size conversion in ``prepare``),
#: read by the goodput callback when training starts
PROCESS_SECONDS: defaultdict[str, float] = defaultdict(float)


@contextmanager
def timed(part: str) -> Iterator[None]:
    """Counts the block's wall seconds into :data:`PROCESS_SECONDS` (e.g. ``with timed("conversion"):``)."""
    t0 = time.time()
    try:
        yield
    finally:
        PROCESS_SECONDS[part] += time.time() - t0


def read_segments(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's segment records, oldest first (an unreadable one is skipped: it is rewritten atomically,
    so that only happens to a file damaged by other means)."""
    out = []
    for f in goodput_segment_files(run_dir):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    return out


def lost_seconds(seg: dict[str, Any], resumed_from: int | None) -> float:
    """Productive seconds of ``seg`` that the next segment, resuming from step ``resumed_from`` (None: from
    scratch), trains again: those after its save of that step, or all of them if the step is older."""
    productive = seg["seconds"].get("productive", 0.0)
    saved = seg.get("saved", {})
    if resumed_from is not None and str(resumed_from) in saved:
        return max(0.0, productive - saved[str(resumed_from)])
    first, last = seg.get("first_step", 0), seg.get("step", 0)
    if resumed_from is not None and resumed_from >= last:
        return 0.0  # everything it trained was kept (a save after its last record)
    if resumed_from is None or resumed_from <= first or last <= first:
        return productive
    return productive * (last - resumed_from) / (last - first)  # a save it did not record: by steps


def account(segments: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over ``segments`` (oldest first): ``{"wall", "parts": {part: s}, "fraction", "rows": [...]}``.
    A segment's lost work is known once the next one says where it resumed; the last one has none yet."""
    rows = []
    for i, seg in enumerate(segments):
        wall = max(0.0, seg["updated"] - seg["start"])
        parts = {p: float(seg["seconds"].get(p, 0.0)) for p in PARTS}
        nxt = segments[i + 1] if i + 1 < len(segments) else None
        lost = lost_seconds(seg, nxt.get("resumed_from")) if nxt is not None else 0.0
        lost += seg.get("rolled_back", 0.0)  # steps a loss-spike rollback inside the segment trained again
        parts["lost"] = min(lost, parts["productive"])
        parts["productive"] -= parts["lost"]
        parts["other"] = wall - sum(parts.values())
        gap = max(0.0, nxt["start"] - seg["updated"]) if nxt is not None else 0.0
        rows.append({"segment": seg.get("segment", i), "start": seg["start"], "wall": wall, "parts": parts,
                     "first_step": seg.get("first_step", 0), "step": seg.get("step", 0),
                     "resumed_from": seg.get("resumed_from"), "world_size": seg.get("world_size"),
                     "ended": seg.get("ended"), "host": seg.get("host", "?"), "gap_after": gap})
    wall = sum(r["wall"] for r in rows)
    totals = {p: sum(r["parts"][p] for r in rows) for p in TABLE}
    return {"wall": wall, "parts": totals, "fraction": totals["productive"] / wall if wall > 0 else 0.0,
            "rows": rows, "between_segments": sum(r["gap_after"] for r in rows)}


def scalars(acc: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard view of :func:`account`: ``goodput/fraction``, ``goodput/wall_s``, ``goodput/<part>_s``."""
    out = {"goodput/fraction": acc["fraction"], "goodput/wall_s": acc["wall"], "goodput/segments": len(acc["rows"])}
    out.update({f"goodput/{p}_s": v for p, v in acc["parts"].items()})
    return out


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def table(run_dir: str | Path, acc: dict[str, Any]) -> str:
    """The report ``python -m pretrain.goodput`` prints."""
    rows = acc["rows"]
    lines = [f"goodput of {run_dir}: {acc['fraction']:.1%} of {acc['wall']:.1f} s wall ({_hms(acc['wall'])}) "
             f"over {len(rows)} segment(s)", ""]
    head = f"  {'part':<16}{'seconds':>11}{'share':>8}" + "".join(f"{'seg ' + str(r['segment']):>10}" for r in rows)
    lines.append(head)
    for p in TABLE:
        v = acc["parts"][p]
        share = v / acc["wall"] if acc["wall"] > 0 else 0.0
        lines.append(f"  {p:<16}{v:>11.1f}{share:>8.1%}" + "".join(f"{r['parts'][p]:>10.1f}" for r in rows))
    lines.append(f"  {'wall':<16}{acc['wall']:>11.1f}{1:>8.0%}" + "".join(f"{r['wall']:>10.1f}" for r in rows))
    lines.append("")
    for r in rows:
        resumed = "fresh start" if r["resumed_from"] is None else f"resumed from step {r['resumed_from']}"
        ended = r["ended"] or "no end recorded (killed, or still running)"
        lines.append(f"  segment {r['segment']}: {resumed}, steps {r['first_step']}→{r['step']}, "
                     f"{r['world_size']} rank(s) on {r['host']}, {ended}"
                     + (f"; then {r['gap_after']:.1f} s until the next start" if r["gap_after"] else ""))
    lines.append(f"  not in the wall time: {acc['between_segments']:.1f} s between segments (queueing, requeues, "
                 "and what a killed segment did after its last record)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0].startswith("-"):
        raise ConfigError(f"usage: {USAGE}")
    run_dir = Path(argv[0])
    if not run_dir.is_dir():
        raise ConfigError(f"run dir {run_dir} does not exist")
    segments = read_segments(run_dir)
    if not segments:
        print(f"{run_dir}: no goodput records yet (written by rank 0 once training starts)")
        return 0
    print(table(run_dir, account(segments)))
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
