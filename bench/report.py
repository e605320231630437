"""``python -m bench.report [--quick]`` — write bench/REPORT.md from the saved JSON, without re-running.

Reads ``bench/results/<benchmark>.json`` (full runs) or ``<benchmark>-quick.json`` (``--quick``), each a
list of records in the shared schema (see bench/common.py), plus ``machine.json``; checks every file
against the schema (a bad file is an error naming it) and writes one Markdown page: the machine, then
per benchmark the command that ran it, when, the load average then, a table of its figures, and the
exact command behind each figure. ``make bench`` ends by running this.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, fmt_value, validate

REPORT = Path(__file__).resolve().parent / "REPORT.md"
REPO = REPORT.parents[1]
QUICK_SUFFIX = "-quick"


def load_results(results_dir: Path, quick: bool) -> dict[str, list[dict[str, Any]]]:
    """{benchmark: records} of every results file of the mode, each validated; sorted by name."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        if path.name == "machine.json" or path.stem.endswith(QUICK_SUFFIX) != quick:
            continue
        try:
            records = json.loads(path.read_text())
            if not isinstance(records, list):
                raise ValueError("expected a JSON list of records")
            validate(records)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path}: {e}") from None
        out[path.stem.removesuffix(QUICK_SUFFIX)] = records
    return out


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """One row per record: figure, value, unit, compared with, ratio, goal, goal met."""
    lines = ["| figure | value | unit | vs | ratio | goal | met |", "|---|--:|---|---|--:|---|---|"]
    for r in records:
        c = r["config"]
        met = {True: "yes", False: "**no**"}.get(c.get("meets_goal"), "")
        row = [f"`{r['name']}`", fmt_value(r["value"]), r["unit"], f"`{r['baseline']}`" if r["baseline"] else "-",
               fmt_value(r["ratio"]), c.get("goal", ""), met]
        lines.append("| " + " | ".join(_cell(x) for x in row) + " |")
    return "\n".join(lines)


_CHECKOUT = re.compile(r"/[^\s=\[\]]+/(?=bench/results/)")


def _commands(records: Sequence[dict[str, Any]]) -> list[str]:
    """Each distinct command behind the figures (paths relative to the repository), with its figures."""
    by_cmd: dict[str, list[str]] = {}
    for r in records:
        cmd = r["config"].get("command")
        # the checkout the benchmark ran in (this one or a fresh clone) → paths from the repository root
        cmd = f"`{_CHECKOUT.sub('', cmd.replace(str(REPO) + '/', ''))}`" if cmd else \
            "in the benchmark's own process (see its `what`)"
        by_cmd.setdefault(cmd, []).append(r["name"])
    return [f"- {cmd} → {', '.join(f'`{n}`' for n in names)}" for cmd, names in by_cmd.items()]


def _first(records: Sequence[dict[str, Any]], key: str) -> Any:
    return next((r["config"][key] for r in records if r["config"].get(key) is not None), None)


_GOAL_ROW = re.compile(r"^\| `([^`]+)` \|.*\| (yes|\*\*no\*\*) \|$", re.M)


def old_sections(path: Path) -> dict[str, str]:
    """{benchmark: its section's Markdown} of an existing report (empty when there is none)."""
    text = Path(path).read_text() if Path(path).is_file() else ""
    parts = re.split(r"(?m)^## ", text)[1:]
    return {p.split("\n", 1)[0].strip(): "## " + p.rstrip() + "\n" for p in parts}


def render(results: dict[str, list[dict[str, Any]]], machine: dict[str, Any] | None, quick: bool,
           generated: str | None = None, kept: dict[str, str] | None = None) -> str:
    """The whole REPORT.md text for ``results`` ({benchmark: records}); ``kept`` ({benchmark: Markdown}) are
    sections of benchmarks without results here, carried over from the previous report as they were
    (their own date and load line included), so a ``--only`` run on another machine loses nothing."""
    kept = {k: v for k, v in (kept or {}).items() if k not in results}
    generated = generated or time.strftime("%Y-%m-%d %H:%M %Z")
    m = machine or {}
    mode = ("**Quick mode** (`--quick`): smoke-sized runs that check the machinery; the figures are NOT "
            "representative. `make bench` replaces them with full runs." if quick else
            "Full runs (`make bench`).")
    out = [
        "# lmforge benchmarks",
        "",
        f"Generated {generated} by `python -m bench.report{' --quick' if quick else ''}` from "
        f"`bench/results/*{QUICK_SUFFIX if quick else ''}.json` (git-ignored). {mode}",
        "",
        f"Machine: {m.get('cpus', '?')} cores, {m.get('cpu_model', '?')}, {m.get('ram_gib', '?')} GiB RAM; "
        f"{m.get('os', '?')}; Python {m.get('python', '?')}.",
        "",
        "Regenerate: `make bench` runs every benchmark (`python -m bench`) and rewrites this page; "
        "`python -m bench.report` rewrites it from the saved JSON alone. A benchmark's figures are "
        "measured on a shared machine: see the load average next to each. No figure is asserted.",
        "",
    ]
    goals = [(r["name"], bool(r["config"]["meets_goal"])) for recs in results.values() for r in recs
             if "meets_goal" in r["config"]]
    goals += [(m.group(1), m.group(2) == "yes") for section in kept.values() for m in _GOAL_ROW.finditer(section)]
    if goals:
        met = sum(ok for _, ok in goals)
        out += [f"Goals met: {met} of {len(goals)}"
                + (" (not met: " + ", ".join(f"`{n}`" for n, ok in sorted(goals) if not ok) + ")"
                   if met < len(goals) else "") + ".", ""]
    if not results and not kept:
        out += ["No results yet: run `make bench` (or `python -m bench --quick`).", ""]
    for name in sorted({*results, *kept}):
        if name in kept:
            out += [kept[name].rstrip(), ""]
            continue
        recs = results[name]
        load = _first(recs, "loadavg_1_5_15")
        out += [
            f"## {name}",
            "",
            f"Produced by `{_first(recs, 'bench_command') or '?'}` at {_first(recs, 'measured_at') or '?'}; "
            f"load average (1/5/15 min) at the end: {' / '.join(map(str, load)) if load else '?'}.",
            "",
            markdown_table(recs),
            "",
            "Commands behind the figures (run from the repository root; config `what` in the JSON says "
            "exactly what each figure measures):",
            "",
            *_commands(recs),
            "",
        ]
    return "\n".join(out).rstrip() + "\n"


def write_report(quick: bool, results_dir: Path = RESULTS_DIR, out: Path = REPORT) -> Path:
    results = load_results(results_dir, quick)
    machine_path = Path(results_dir) / "machine.json"
    machine = json.loads(machine_path.read_text()) if machine_path.is_file() else None
    text = render(results, machine, quick, kept=old_sections(out))
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="report the quick-mode results (*-quick.json)")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of the JSON results")
    ap.add_argument("--out", type=Path, default=REPORT, help="the Markdown file to write")
    args = ap.parse_args(argv)
    try:
        path = write_report(args.quick, args.results, args.out)
    except ValueError as e:
        print(f"bench.report: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
