"""The layers of minilora, checked on the source: imports point down, and no import cycle.

``LAYERS`` below is the one table of the layers; docs/architecture.md shows the same drawing (a test
here renders the table and finds it there, so the two cannot drift apart). Every module under
minilora/ is read with ``ast``: module-level and function-level imports alike, relative imports
resolved to absolute module names, ``import minilora.x`` and ``from minilora import x`` both
understood (``from minilora import Tensor`` is an import of the package ``minilora`` itself, the top
layer). A module may import from its own layer and the layers below; the whole import graph must have
no cycle (its strongly connected components, Tarjan 1972, are single modules).

The checker's own logic is tested on a small fake package built in a temporary folder, with an
upward import, a cycle and a module missing from the table: so these tests cannot pass vacuously.
The rule that only backend.py imports CuPy is checked in tests/test_backend.py.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "minilora"

# The layers, bottom (0) to top. An entry is a file directly under minilora/ ("tensor.py") or a
# folder with everything in it ("lora/"). "__init__.py" is minilora/__init__.py alone: each
# subpackage's __init__.py belongs to its folder's layer.
LAYERS = [
    ("backend", ["backend.py", "settings.py", "fileio.py", "gguf.py"]),
    ("autograd", ["tensor.py", "ops.py", "autograd.py", "checkpoint.py"]),
    ("fast", ["fast/"]),
    ("functional", ["functional.py", "testing.py"]),
    ("nn", ["nn/", "optim.py", "data/"]),
    ("models", ["models/"]),
    ("lora", ["lora/", "quant/", "paged_optim.py"]),
    ("train", ["train.py", "resume.py", "data_parallel.py", "memory.py", "dpo.py"]),
    ("teaching", ["teaching/", "viz.py"]),
    ("commands", ["commands/"]),
    ("cli", ["cli.py", "__main__.py", "__init__.py"]),
]


def render_layers(layers) -> str:
    """The drawing of ``layers``, top layer first: number, name, members (as docs/architecture.md
    shows it)."""
    return "\n".join(f"{i:2d} {name:<11}{'  '.join(entries)}"
                     for i, (name, entries) in reversed(list(enumerate(layers))))


# ---------------------------------------------------------------- reading a package's imports
def read_modules(pkg_dir: Path) -> dict:
    """{dotted module name: path} for every .py file under ``pkg_dir`` (a package's __init__.py is
    the package's own name)."""
    modules = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        parts = list(path.relative_to(pkg_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _existing(name: str, modules: dict) -> str:
    """``name`` if it is a module of the package, else its longest dotted prefix that is one (the
    package whose attribute ``name`` names)."""
    while name not in modules and "." in name:
        name = name.rpartition(".")[0]
    return name


def imports_of(name: str, path: Path, modules: dict, package: str) -> list:
    """[(line, imported module)] for every import of a module of ``package`` anywhere in the file:
    at module level, inside functions and classes, under ``if``/``try``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    found.append((node.lineno, _existing(alias.name, modules)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # `from . import x` is relative to the module's package; each further dot goes up one
                base = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            if base != package and not base.startswith(package + "."):
                continue
            for alias in node.names:
                # `from pkg.lora import layer` imports the module pkg.lora.layer; `from pkg.lora
                # import LoraLinear` imports an attribute of the package pkg.lora
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in modules else _existing(base, modules)))
    return found


def import_graph(pkg_dir: Path) -> tuple:
    """(modules, {importer: [(line, imported), ...]}) for the package in ``pkg_dir``."""
    modules = read_modules(pkg_dir)
    return modules, {m: imports_of(m, p, modules, pkg_dir.name) for m, p in modules.items()}


# ---------------------------------------------------------------- the two rules
def layer_of(path: Path, pkg_dir: Path, layers) -> tuple | None:
    """(layer number, layer name) of the file at ``path``, or None when the table has no entry."""
    rel = path.relative_to(pkg_dir).parts
    entry = rel[0] + "/" if len(rel) > 1 else rel[0]
    for i, (layer, entries) in enumerate(layers):
        if entry in entries:
            return i, layer
    return None


def layer_violations(pkg_dir: Path, layers) -> list:
    """One message per module missing from ``layers`` and per import that points up a layer."""
    modules, graph = import_graph(pkg_dir)
    rel = {m: p.relative_to(pkg_dir.parent).as_posix() for m, p in modules.items()}
    where = {m: layer_of(p, pkg_dir, layers) for m, p in modules.items()}
    problems = [f"{rel[m]} is in no layer: add it to LAYERS in tests/test_layers.py and to the "
                f"drawing in docs/architecture.md" for m in modules if where[m] is None]
    for m, imported in graph.items():
        for _, target in imported:
            if where[m] is None or where[target] is None:
                continue
            if where[target][0] > where[m][0]:
                problems.append(f"{rel[m]} imports {target}: layer {where[m][1]!r} may not import "
                                f"from layer {where[target][1]!r} (docs/architecture.md)")
    return sorted(set(problems))


def strongly_connected_components(graph: dict) -> list:
    """Tarjan's algorithm (iterative, so a deep graph cannot hit the recursion limit): the lists of
    nodes that can all reach one another. ``graph`` is {node: iterable of successor nodes}."""
    index, low, on_stack, stack, comps = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, succ = work[-1]
            for nxt in succ:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(graph.get(nxt, ()))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    comps.append(sorted(comp))
    return comps


def _cycle_through(start: str, comp: set, graph: dict) -> list:
    """A shortest import path start -> ... -> start inside one component (breadth-first)."""
    parent, frontier = {}, [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in graph[node]:
                if nxt not in comp or nxt in parent:
                    continue
                parent[nxt] = node
                if nxt == start:
                    path = [start]
                    while path[-1] != start or len(path) == 1:
                        path.append(parent[path[-1]])
                    return path[::-1]
                nxt_frontier.append(nxt)
        frontier = nxt_frontier
    raise AssertionError(f"{start} is in a component but on no cycle")  # Tarjan guarantees one


def import_cycles(pkg_dir: Path) -> list:
    """One message per import cycle: the path round it, each step with the file and line."""
    modules, graph = import_graph(pkg_dir)
    succ = {m: sorted({t for _, t in imported if t != m}) for m, imported in graph.items()}
    line = {(m, t): ln for m, imported in graph.items() for ln, t in reversed(imported)}
    messages = []
    for comp in strongly_connected_components(succ):
        if len(comp) < 2:
            continue
        path = _cycle_through(comp[0], set(comp), succ)
        steps = " -> ".join(
            f"{a} ({modules[a].relative_to(pkg_dir.parent).as_posix()}:{line[(a, b)]})"
            for a, b in zip(path, path[1:])) + f" -> {path[-1]}"
        messages.append(f"import cycle among {len(comp)} modules {comp}: {steps}; move what both "
                        f"need into a module below them (docs/architecture.md)")
    return messages


# ---------------------------------------------------------------- minilora itself
def test_every_import_points_down_a_layer():
    problems = layer_violations(ROOT / PACKAGE, LAYERS)
    assert not problems, "\n".join(problems)


def test_the_import_graph_has_no_cycle():
    cycles = import_cycles(ROOT / PACKAGE)
    assert not cycles, "\n".join(cycles)


def test_the_graph_is_really_read():
    """Guards the two tests above against passing on an empty or misread graph."""
    modules, graph = import_graph(ROOT / PACKAGE)
    assert len(modules) > 40

    def targets(m):
        return {t for _, t in graph[m]}
    assert "minilora.backend" in targets("minilora.optim")                        # `from . import`
    assert "minilora.backend" in targets("minilora.teaching.exercises.checker")    # `from ... import`
    assert "minilora.teaching.exercises.registry" in targets("minilora.teaching.exercises.checker")
    assert sum(len(v) for v in graph.values()) > 100


def test_docs_architecture_shows_the_layer_table():
    drawing = render_layers(LAYERS)
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert drawing in text, ("docs/architecture.md must show the layers exactly as LAYERS in "
                             "tests/test_layers.py renders them:\n" + drawing)


# ---------------------------------------------------------------- the checker, on a fake package
FAKE_LAYERS = [("low", ["a.py", "util/"]), ("high", ["b.py", "c/", "__init__.py"])]
FAKE_FILES = {
    "__init__.py": "VERSION = 1\n",
    "a.py": "import os\n\ndef f():\n    from .b import g   # upward, inside a function\n    return g\n",
    "b.py": "from fakepkg.c import d\nfrom fakepkg import util\n\ndef g():\n    return d\n",
    "c/__init__.py": "",
    "c/d.py": "import fakepkg.b\nfrom .. import util\n",     # fakepkg.b imports this module: a cycle
    "util/__init__.py": "from fakepkg import VERSION\n",      # an attribute of the top package
    "e.py": "",                                                # in no layer
}


@pytest.fixture
def fake_package(tmp_path):
    pkg = tmp_path / "fakepkg"
    for rel, text in FAKE_FILES.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return pkg


def test_fake_package_imports_are_resolved(fake_package):
    modules, graph = import_graph(fake_package)
    assert set(modules) == {"fakepkg", "fakepkg.a", "fakepkg.b", "fakepkg.c", "fakepkg.c.d",
                            "fakepkg.util", "fakepkg.e"}
    assert graph["fakepkg.a"] == [(4, "fakepkg.b")]        # function level; `import os` is not ours
    assert graph["fakepkg.b"] == [(1, "fakepkg.c.d"), (2, "fakepkg.util")]
    assert graph["fakepkg.c.d"] == [(1, "fakepkg.b"), (2, "fakepkg.util")]
    assert graph["fakepkg.util"] == [(1, "fakepkg")]        # an attribute: the package itself
    assert graph["fakepkg"] == []


def test_fake_package_upward_imports_and_missing_modules_are_caught(fake_package):
    assert layer_violations(fake_package, FAKE_LAYERS) == [
        "fakepkg/a.py imports fakepkg.b: layer 'low' may not import from layer 'high' "
        "(docs/architecture.md)",
        "fakepkg/e.py is in no layer: add it to LAYERS in tests/test_layers.py and to the drawing "
        "in docs/architecture.md",
        "fakepkg/util/__init__.py imports fakepkg: layer 'low' may not import from layer 'high' "
        "(docs/architecture.md)",
    ]


def test_fake_package_cycle_is_caught_with_its_path(fake_package):
    assert import_cycles(fake_package) == [
        "import cycle among 2 modules ['fakepkg.b', 'fakepkg.c.d']: fakepkg.b (fakepkg/b.py:1) -> "
        "fakepkg.c.d (fakepkg/c/d.py:1) -> fakepkg.b; move what both need into a module below them "
        "(docs/architecture.md)"]


def test_tarjan_finds_separate_cycles_and_ignores_chains():
    graph = {1: [2], 2: [3], 3: [1, 4], 4: [5], 5: [4], 6: [1]}
    assert sorted(strongly_connected_components(graph)) == [[1, 2, 3], [4, 5], [6]]
