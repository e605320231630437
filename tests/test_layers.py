"""The architecture, checked on the source (ast, no imports): who may import whom, no import cycle, and only
``lmforge/rundir.py`` knowing the run directory's checkpoint file names.

Layers, from the bottom: lmforge (foundation) → data_pipeline → pretrain → finetune → slurm → demo (and
bench/ on top). An import may point down or sideways within a package, never up, and the module graph
(every import, also those inside functions) has no cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from conftest import REPO

LAYERS = ["lmforge", "data_pipeline", "pretrain", "finetune", "slurm", "demo"]  # bottom first
SOURCE_DIRS = [*LAYERS, "bench"]
SKIP_DIRS = {"results", "__pycache__", ".cache", "cache", "node_modules"}

RUNDIR = REPO / "lmforge" / "rundir.py"
FILE_NAMES = {"trainer_state.json", "latest", "checkpoints", "best"}  # what lmforge.rundir calls STATE, LATEST, …
CONSTANTS = {"CKPT", "LATEST", "STATE", "BEST"}
PATH_CALLS = {"Path", "PurePath", "PosixPath", "joinpath", "join", "glob", "rglob", "with_name", "open"}


def python_files(top: str) -> Iterator[Path]:
    root = REPO / top
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).parts[:-1]
        if not any(p in SKIP_DIRS or p.startswith(".") for p in rel):
            yield f


def _where(f: Path, node: ast.AST, root: Path = REPO) -> str:
    return f"{f.relative_to(root)}:{node.lineno}"


# ---------------------------------------------------------------- the run-directory names
def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _path_parts(tree: ast.AST) -> set[int]:
    """The string constants used as path components: an operand of ``/`` or an argument of a path call."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            out |= {id(node.left), id(node.right)}
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name in PATH_CALLS:
                out |= {id(a) for a in node.args}
    return out


def _names_a_run_file(value: str, path_part: bool) -> bool:
    """``"trainer_state.json"`` anywhere; ``"checkpoints"``, ``"latest"``, ``"best"`` as path parts; and
    strings that hold one as a path component (``"/latest"``, ``"checkpoints/step_1"``, ``"run/best"``).
    A leading ``latest/`` or ``best/`` is a TensorBoard tag prefix (``best/accuracy``), not a path."""
    if value == "trainer_state.json" or (path_part and value in FILE_NAMES):
        return True
    if "/" not in value:
        return False
    parts = value.split("/")
    return parts[0] in {"checkpoints", "trainer_state.json"} or any(p in FILE_NAMES for p in parts[1:])


def run_dir_name_uses(f: Path, root: Path = REPO) -> list[str]:
    """"file:line: what" for every place ``f`` names a checkpoint file or imports the names' constants."""
    tree = ast.parse(f.read_text(), str(f))
    docs, paths = _docstrings(tree), _path_parts(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if _names_a_run_file(node.value, id(node) in paths):
                hits.append((node.lineno, f"the literal {node.value!r}"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LAYERS:
            # from lmforge.rundir, or from a module that re-exports them (pretrain.checkpoint)
            hits += [(node.lineno, f"imports {a.name} from {node.module}") for a in node.names if a.name in CONSTANTS]
        elif isinstance(node, ast.Attribute) and node.attr in CONSTANTS:
            hits.append((node.lineno, f"uses .{node.attr}"))
    return [f"{f.relative_to(root)}:{line}: {what}" for line, what in sorted(hits)]


def test_the_name_checker_sees_paths_not_prose_or_tags(tmp_path):
    f = tmp_path / "x.py"
    f.write_text('"""Reads RUN_DIR/checkpoints/latest."""\n'
                 "from lmforge.rundir import CKPT, LATEST, latest_state\n"
                 "from pathlib import Path\n"
                 "def g(run, tag):\n"
                 '    """Its ``checkpoints/best`` file."""\n'
                 '    a = run / "checkpoints" / tag\n'
                 '    b = Path(run, "latest")\n'
                 '    c = f"{run}/checkpoints/{tag}"\n'
                 '    d = {"best": 1, "latest": 2}\n'
                 '    e = "eval/loss".replace("eval/", "best/")\n'
                 '    h = ("checkpoints", str(run))\n'
                 '    i = "no complete checkpoint under checkpoints/; train first"\n'
                 '    return run / "trainer_state.json"\n')
    assert run_dir_name_uses(f, tmp_path) == [
        "x.py:2: imports CKPT from lmforge.rundir", "x.py:2: imports LATEST from lmforge.rundir",
        "x.py:6: the literal 'checkpoints'", "x.py:7: the literal 'latest'", "x.py:8: the literal '/checkpoints/'",
        "x.py:13: the literal 'trainer_state.json'"]


def test_no_file_outside_rundir_names_checkpoint_files():
    hits = [h for top in SOURCE_DIRS for f in python_files(top) if f != RUNDIR for h in run_dir_name_uses(f)]
    assert not hits, ("only lmforge/rundir.py knows the run directory's checkpoint file names; use its functions "
                      "(checkpoints_dir, checkpoint_dir, latest_file, state_file, is_run_dir, is_step_dir, "
                      "run_dir_of, latest_checkpoint, latest_state, read_state, mark_complete, mark_best, …):\n  "
                      + "\n  ".join(hits))


# ---------------------------------------------------------------- layers and cycles
def module_files() -> dict[str, Path]:
    out = {}
    for top in LAYERS:
        for f in python_files(top):
            parts = list(f.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _type_only(tree: ast.AST) -> set[int]:
    """The imports under ``if TYPE_CHECKING:`` (they count, but the report says so)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return out


def import_edges(modules: dict[str, Path]) -> dict[str, dict[str, str]]:
    """{module: {imported project module: "file:line" of its first import (", type-only" if all are)}}."""
    edges: dict[str, dict[str, str]] = {m: {} for m in modules}
    for mod, f in modules.items():
        package = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(f.read_text(), str(f))
        type_only = _type_only(tree)
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node in sorted(imports, key=lambda n: n.lineno):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = ".".join(p for p in (base, node.module or "") if p)
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # `import pretrain.run.x` → the longest prefix that is a module
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    runtime = id(node) not in type_only
                    if t not in edges[mod] or (runtime and edges[mod][t].endswith(", type-only")):
                        edges[mod][t] = _where(f, node) + ("" if runtime else ", type-only")
    return edges


def _layer(mod: str) -> int:
    return LAYERS.index(mod.split(".")[0])


def find_cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) for every strongly connected component (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    cycles = []
    for comp in comps:  # a shortest way back to the component's first module (breadth first inside it)
        start, members = comp[0], set(comp)
        prev: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in prev:
            nxt = []
            for v in frontier:
                for w in sorted(edges[v]):
                    if w in members and w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        while path[-1] != start or len(path) == 1:
            path.append(prev[path[-1]])
        cycles.append(path[::-1])
    return sorted(cycles)


def test_the_cycle_finder_reports_a_path_back():
    edges = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:1", "d": "b.py:2"}, "c": {"a": "c.py:1"}, "d": {}, "e": {"a": "e.py:1"}}
    assert find_cycles(edges) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b": ""}, "b": {}}) == []


def test_layers_and_no_cycles():
    modules = module_files()
    edges = import_edges(modules)
    upward = sorted(f"{where}: {src} imports {dst} ({dst.split('.')[0]} is above {src.split('.')[0]})"
                    for src, out in edges.items() for dst, where in out.items() if _layer(dst) > _layer(src))
    cycles = [" → ".join(f"{a} ({edges[a][b]})" for a, b in zip(c, c[1:])) + f" → {c[-1]}" for c in find_cycles(edges)]
    problems = ([f"upward import: {u}" for u in upward] + [f"import cycle: {c}" for c in cycles])
    assert not problems, f"layers: {' → '.join(LAYERS)} (an import may only point down):\n  " + "\n  ".join(problems)
