"""Reading a run's TensorBoard event files back, in one place (the demo, SLURM status, tests, benchmarks).

Both stages write ``RUN_DIR/tensorboard/events.out.tfevents.*`` with torch's ``SummaryWriter``; this
module reads them with tensorboard's own ``EventAccumulator`` (imported when called: importing
this module costs nothing and pulls in neither tensorboard nor torch).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

TB_DIR = "tensorboard"  # RUN_DIR/tensorboard


def tensorboard_dir(run_dir: str | Path) -> Path:
    """``RUN_DIR/tensorboard``: where a run's event files go."""
    return Path(run_dir) / TB_DIR


def _accumulator(path: str | Path, size_guidance: dict[str, int]) -> Any | None:
    """A loaded EventAccumulator of ``path`` (a run directory or its event-file folder); None when there
    is no such folder."""
    p = Path(path)
    folder = tensorboard_dir(p) if tensorboard_dir(p).is_dir() else p
    if not folder.is_dir():
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance=size_guidance)
    acc.Reload()
    return acc


def read_scalars(path: str | Path, tags: Iterable[str] | None = None, newest_only: bool = False,
                 wall_time: bool = False) -> dict[str, list[tuple]]:
    """Every scalar of the event files of ``path``: ``{tag: [(step, value), …]}`` in the order written.

    ``path`` is a run directory (its ``tensorboard/`` folder is read) or the folder of event files itself;
    a path that does not exist reads as ``{}``. ``tags`` keeps only those tags (the others are still
    parsed, not returned; a tag never written is absent). ``newest_only`` keeps one point per tag, the
    last one written, without holding the others in memory (cheap on a long run).
    ``wall_time`` makes every point ``(step, value, wall_time)`` (seconds since the epoch).
    A resumed run's events past its checkpoint, which the resumed writer purges, are dropped here too.
    """
    acc = _accumulator(path, {"scalars": 1 if newest_only else 0})  # size 1: the reservoir keeps the newest
    if acc is None:
        return {}
    wanted = set(tags) if tags is not None else None
    out: dict[str, list[tuple]] = {}
    for tag in acc.Tags()["scalars"]:
        if wanted is None or tag in wanted:
            out[tag] = [(e.step, e.value, e.wall_time) if wall_time else (e.step, e.value) for e in acc.Scalars(tag)]
    return out


def read_text(path: str | Path) -> dict[str, list[tuple[int, str]]]:
    """Every text summary (``SummaryWriter.add_text``) of ``path`` (as for :func:`read_scalars`):
    ``{tag: [(step, text), …]}``; a text logged as ``"config"`` has the tag ``"config/text_summary"``."""
    acc = _accumulator(path, {"tensors": 0})
    if acc is None:
        return {}
    try:
        text_tags = acc.PluginTagToContent("text")
    except KeyError:  # no text was logged
        return {}
    return {tag: [(e.step, "\n".join(b.decode("utf-8", "replace") for b in e.tensor_proto.string_val))
                  for e in acc.Tensors(tag)] for tag in text_tags}
