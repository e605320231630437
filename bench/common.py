"""Shared pieces of every lmforge benchmark: the result record, output, and subprocess measurement.

A benchmark produces a list of records, each a JSON object::

    {"name": "data_pipeline.build.w2",      # unique, dotted: <benchmark>.<what>[.<variant>]
     "metric": "tokens_per_s",              # what is measured
     "value": 1234567.0,
     "unit": "tokens/s",
     "baseline": "data_pipeline.limit.w2",  # name of the record compared with, or null
     "ratio": 0.91,                         # value / baseline's value, or null
     "config": {...}}                       # everything needed to interpret / reproduce the figure

:func:`emit` prints the records as JSON on stdout, writes them to ``bench/results/<name>.json``
(git-ignored; the latest run) and appends them, with a timestamp, to ``bench/results/history.jsonl``.
It also stamps every record's config with ``bench_command`` (the exact ``python -m bench.X ...`` that
produced it), ``measured_at`` and ``loadavg_1_5_15`` at the end, and writes the machine's description
to ``bench/results/machine.json``; ``python -m bench.report`` turns all of it into bench/REPORT.md.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CACHE_DIR = RESULTS_DIR / "cache"
FIELDS = ("name", "metric", "value", "unit", "baseline", "ratio", "config")


def record(
    name: str,
    metric: str,
    value: float,
    unit: str,
    baseline: dict[str, Any] | str | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One result. ``baseline`` is the record compared with (its ratio is computed) or just its name."""
    ratio = None
    base_name = baseline
    if isinstance(baseline, dict):
        base_name = baseline["name"]
        b = baseline["value"]
        ratio = value / b if b and math.isfinite(b) else None
    return {
        "name": name,
        "metric": metric,
        "value": float(value),
        "unit": unit,
        "baseline": base_name,
        "ratio": None if ratio is None else round(ratio, 4),
        "config": dict(config or {}),
    }


def validate(records: Sequence[dict[str, Any]]) -> None:
    """Raise ValueError when a record does not follow the schema (keys, types, unique names)."""
    seen = set()
    for r in records:
        if tuple(r) != FIELDS:
            raise ValueError(f"record keys must be {FIELDS}, got {tuple(r)}")
        if not isinstance(r["name"], str) or r["name"] in seen:
            raise ValueError(f"record name missing or duplicated: {r['name']!r}")
        seen.add(r["name"])
        if not isinstance(r["value"], (int, float)):
            raise ValueError(f"{r['name']}: value must be a number")
        if r["baseline"] is not None and not isinstance(r["baseline"], str):
            raise ValueError(f"{r['name']}: baseline must be a record name or null")
        if r["ratio"] is not None and not isinstance(r["ratio"], (int, float)):
            raise ValueError(f"{r['name']}: ratio must be a number or null")
        if not isinstance(r["config"], dict):
            raise ValueError(f"{r['name']}: config must be a dict")


def bench_command(module: str, argv: Sequence[str] | None) -> str:
    """The command line that runs ``bench.<module>`` with ``argv`` (sys.argv[1:] when None)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m bench." + module, *(shlex.quote(a) for a in args)])


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, RAM, OS and Python of this machine (what the figures depend on)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    try:
        import psutil

        ram = psutil.virtual_memory().total
    except ImportError:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpus": os.cpu_count(), "cpu_model": model, "ram_gib": round(ram / 2**30, 1),
            "os": platform.platform(), "python": platform.python_version(), "hostname": platform.node()}


def emit(records: Sequence[dict[str, Any]], name: str, results_dir: Path | None = None,
         command: str | None = None) -> Path:
    """Print ``records`` as JSON (stdout), write ``<results>/<name>.json``, append to history.jsonl.

    ``command`` (see :func:`bench_command`) is stored in every record's config as ``bench_command``.
    """
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load = [round(x, 2) for x in os.getloadavg()]
    for r in records:
        for key, value in {"bench_command": command, "measured_at": stamp, "loadavg_1_5_15": load}.items():
            r["config"].setdefault(key, value)  # records kept from an earlier run keep their own
    validate(records)
    out_dir = Path(results_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "machine.json").write_text(json.dumps(machine_info(), indent=1) + "\n")
    text = json.dumps(list(records), indent=1)
    print(text, flush=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    with open(out_dir / "history.jsonl", "a") as f:
        for r in records:
            if r["config"]["measured_at"] == stamp:  # not the records kept from an earlier run
                f.write(json.dumps({"time": stamp, "benchmark": name, **r}) + "\n")
    return path


def fmt_value(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x == 0 or 0.01 <= abs(x) < 1e5:
            return f"{x:,.3f}".rstrip("0").rstrip(".") if abs(x) < 100 else f"{x:,.1f}"
        return f"{x:,.0f}" if abs(x) >= 1e5 else f"{x:.3g}"
    return str(x)


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A plain-text table: name, value + unit, baseline, ratio (and the config's "goal" when present)."""
    rows = [("name", "value", "unit", "vs", "ratio", "goal")]
    for r in records:
        goal = r["config"].get("goal", "")
        rows.append((r["name"], fmt_value(r["value"]), r["unit"], r["baseline"] or "-", fmt_value(r["ratio"]), str(goal)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {1, 4}
    lines = []
    for k, row in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(records: Sequence[dict[str, Any]], file=None) -> None:
    print(format_table(records), file=file or sys.stdout, flush=True)


def run_measured(
    cmd: Sequence[str],
    env: dict[str, str] | None = None,
    interval: float = 0.05,
    cwd: str | os.PathLike[str] | None = None,
    capture: bool = True,
) -> dict[str, Any]:
    """Run ``cmd`` to completion; wall seconds, peak RSS (MB) of its whole process tree, return code.

    Also "cpu_seconds": user + system CPU time of the tree (every descendant that was waited for),
    a figure that other load on the machine disturbs much less than the wall clock.

    Every ``interval`` seconds the RSS of the process and all its descendants is summed; the peak of
    those sums is reported. (RSS counts pages shared between forked processes once per process, so the
    sum is an upper bound of the physical memory used.) ``env`` entries are added to os.environ.
    With ``capture`` the child's stdout/stderr come back as "stdout"/"stderr" (text).
    """
    import psutil

    full_env = {**os.environ, **(env or {})}
    out = subprocess.PIPE if capture else None
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=full_env, cwd=cwd, stdout=out, stderr=out, text=True)
    peak = 0
    # Drain the pipes in threads so a chatty child never blocks on a full pipe.
    chunks: dict[str, list[str]] = {"stdout": [], "stderr": []}
    readers = []
    if capture:
        for key, stream in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            t = threading.Thread(target=lambda s=stream, k=key: chunks[k].append(s.read()), daemon=True)
            t.start()
            readers.append(t)
    try:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                procs = []
            for p in procs:
                try:
                    total += p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            peak = max(peak, total)
            time.sleep(interval)
    except psutil.NoSuchProcess:  # exited before the first poll
        pass
    finally:
        rc = proc.wait()
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    for t in readers:
        t.join()
    result: dict[str, Any] = {"seconds": seconds, "peak_rss_mb": peak / 2**20, "returncode": rc, "cpu_seconds": cpu}
    if capture:
        result["stdout"], result["stderr"] = "".join(chunks["stdout"]), "".join(chunks["stderr"])
    return result
