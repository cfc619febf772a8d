"""The import graph of meddx: no cycle, and no import against the layer order.

Every ``import``/``from ... import`` in ``meddx/`` counts: at the top of a module, inside a
function (a lazy import still runs, and still ties the two modules together) and inside an
``if TYPE_CHECKING:`` block (a type named from a higher layer is a dependency on it; a lower
module that needs a higher one's type names a protocol instead, as ``models.checkpoint`` does).
There are no exceptions for any of them, in the cycle check or in the order check.

A module may import modules of its own layer or of lower layers. :data:`LAYERS` maps module
prefixes to layers (the longest prefix wins); ``docs/design.md`` ("Layers") says the same in
prose. A new module must fall under one of the prefixes, so that someone places it on purpose.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "meddx"

# prefix -> layer, bottom (0) to top (6); a module may import only from its own layer or lower.
LAYERS: dict[str, int] = {
    # 0 base: no meddx imports beyond this layer; nothing heavy at import time
    **dict.fromkeys(
        (
            "meddx._version",
            "meddx.errors",
            "meddx.files",
            "meddx.progress",
            "meddx.config_files",
            "meddx.specs",
            "meddx.text_model",
        ),
        0,
    ),
    # 1 the data model and settings
    **dict.fromkeys(
        (
            "meddx.records",
            "meddx.config",
            "meddx.cohort",
            "meddx.splits",
            "meddx.arguments",
            "meddx.predictions",
            "meddx.dicom_times",  # when a DICOM file says it was acquired (the readers and the PACS query)
            # the manifest's remote-source cells (parsed by the cohort); the clients that use them are layer 2
            "meddx.dicomweb.ref",
            "meddx.fhirclient.ref",
        ),
        1,
    ),
    # 2 ingest and the sources it reads (files, a PACS, a FHIR server), the record cache and alignment
    **dict.fromkeys(
        ("meddx.ingest", "meddx.dicomweb", "meddx.fhirclient", "meddx.cache", "meddx.align"),
        2,
    ),
    # 3 the data path: prepared cohorts, tensor stores, streaming
    **dict.fromkeys(("meddx.data", "meddx.streaming"), 3),
    # 4 models, what they compute for a cohort (embeddings) and what scores them
    **dict.fromkeys(("meddx.models", "meddx.embeddings", "meddx.calibration", "meddx.metrics"), 4),
    # 5 jobs: training, evaluation, batch diagnosis, exports, synthetic data
    **dict.fromkeys(
        (
            "meddx.training",
            "meddx.evaluate",
            "meddx.report",
            "meddx.batch",
            "meddx.export",
            "meddx.synth",
            "meddx.model_card",
        ),
        5,
    ),
    # 6 applications: the CLI, pipelines, the demo, the JSON schemas of every file a user writes
    # (manifest, config, model folder, pipeline), and the package's lazy public names
    **dict.fromkeys(
        (
            "meddx.cli",
            "meddx.cli_errors",
            "meddx.cli_remote",
            "meddx.pipelines",
            "meddx.demo",
            "meddx.schemas",
            "meddx",
        ),
        6,
    ),
}


@dataclass(frozen=True)
class Import:
    """One import of a meddx module by another, where it is written."""

    importer: str
    imported: str
    line: int

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported}"


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``package`` (``__init__`` names the package)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _base_of(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` import names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    parts = importer.split(".") if is_package else importer.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _known(name: str, modules: Iterable[str]) -> str | None:
    """``name`` or its nearest enclosing module that exists (``meddx.x.func`` -> ``meddx.x``)."""
    known = set(modules)
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(importer: str, source: str, is_package: bool, modules: Iterable[str]) -> list[Import]:
    """Every import of a meddx module in ``source``, wherever it is written (functions, TYPE_CHECKING)."""
    modules = set(modules)
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base_of(importer, is_package, node)
            # "from meddx.ingest import audio" imports the submodule; "from meddx.x import f" the module x
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            if name != "meddx" and not name.startswith("meddx."):
                continue
            target = _known(name, modules)
            if target is not None and target != importer:
                found.append(Import(importer, target, node.lineno))
    return list(dict.fromkeys(found))  # "from a import x, y" is one import of a


def import_graph(package: Path) -> list[Import]:
    """Every import between the modules of ``package``."""
    modules = module_files(package)
    found = []
    for name, path in modules.items():
        found += imports_of(name, path.read_text(encoding="utf-8"), path.name == "__init__.py", modules)
    return found


def layer_of(module: str, layers: Mapping[str, int]) -> int | None:
    """The layer of the longest prefix of ``module`` in ``layers`` (None when none matches)."""
    name = module
    while name:
        if name in layers:
            return layers[name]
        name = name.rpartition(".")[0]
    return None


def upward_imports(edges: Iterable[Import], layers: Mapping[str, int]) -> list[Import]:
    """The imports of a module from a higher layer than its own."""
    found = []
    for e in edges:
        own, theirs = layer_of(e.importer, layers), layer_of(e.imported, layers)
        if own is not None and theirs is not None and own < theirs:  # unplaced modules fail on their own
            found.append(e)
    return found


def cycles(edges: Iterable[Import]) -> dict[str, list[str]]:
    """The strongly connected components of more than one module, each with one cycle through them.

    Returns ``{"a <-> b <-> c": ["a", "b", "a"]}``: the component's members, sorted, name it.

    Tarjan's algorithm (iterative); each component is reported as a closed path
    ``a -> b -> ... -> a`` found by a breadth-first search inside it, so the message shows
    which imports to remove.
    """
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.importer, set()).add(e.imported)
        graph.setdefault(e.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: dict[str, list[str]] = {}
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components[" <-> ".join(sorted(component))] = _cycle_through(sorted(component), graph)
    return components


def _cycle_through(component: list[str], graph: Mapping[str, set[str]]) -> list[str]:
    """A shortest closed path from the component's first module back to itself, inside the component."""
    inside = set(component)
    start = component[0]
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & inside):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    return component  # not reached: a strongly connected component always closes


# --------------------------------------------------------------------------- the checks on meddx


@pytest.fixture(scope="module")
def edges() -> list[Import]:
    return import_graph(PACKAGE)


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in module_files(PACKAGE) if layer_of(m, LAYERS) is None)
    assert unplaced == [], f"modules outside every layer of LAYERS (add their prefix): {unplaced}"


def test_no_import_cycle(edges) -> None:
    found = [" -> ".join(path) for path in cycles(edges).values()]
    assert found == [], "import cycles (imports inside functions and TYPE_CHECKING blocks count):\n" + "\n".join(found)


def test_no_import_against_the_layer_order(edges) -> None:
    upward = upward_imports(edges, LAYERS)
    files = module_files(PACKAGE)
    unexpected = sorted(
        f"{files[e.importer].relative_to(PACKAGE.parent)}:{e.line}: {e} "
        f"(layer {layer_of(e.importer, LAYERS)} imports layer {layer_of(e.imported, LAYERS)})"
        for e in upward
    )
    assert unexpected == [], "imports from a higher layer:\n" + "\n".join(unexpected)


def test_the_base_layer_imports_only_the_standard_library_at_load() -> None:
    """Layer 0 is what everything stands on: loading it must not pull in numpy, torch or pydantic."""
    import sys

    heavy = []
    for name, path in module_files(PACKAGE).items():
        if layer_of(name, LAYERS) != 0:
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level, not in functions
            if isinstance(node, ast.Import):
                tops = [alias.name.partition(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.partition(".")[0]]
            else:
                continue
            heavy += [
                f"{name}:{node.lineno} imports {top}"
                for top in tops
                if top != "meddx" and top not in sys.stdlib_module_names
            ]
    assert heavy == [], f"import these inside the functions that use them: {heavy}"


# --------------------------------------------------------------------------- the checker itself


SYNTHETIC = {
    "meddx": "",
    "meddx.low": "from meddx import mid\n",  # upward (0 imports 1) and part of a cycle
    "meddx.mid": "def f():\n    from meddx.low import thing\n",  # an import inside a function
    "meddx.top": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from meddx.mid import X\nimport os\n",
    "meddx.pkg": "from . import leaf\n",
    "meddx.pkg.leaf": "from ..low import y\n",
}
SYNTHETIC_LAYERS = {"meddx.low": 0, "meddx.mid": 1, "meddx.top": 2, "meddx.pkg": 2, "meddx": 2}


def _synthetic_edges() -> list[Import]:
    found = []
    for name, source in SYNTHETIC.items():
        is_package = name in ("meddx", "meddx.pkg")
        found += imports_of(name, source, is_package, SYNTHETIC)
    return found


def test_the_checker_resolves_function_type_checking_and_relative_imports() -> None:
    assert sorted(map(str, _synthetic_edges())) == [
        "meddx.low -> meddx.mid",
        "meddx.mid -> meddx.low",
        "meddx.pkg -> meddx.pkg.leaf",
        "meddx.pkg.leaf -> meddx.low",
        "meddx.top -> meddx.mid",
    ]


def test_the_checker_catches_a_cycle_and_an_upward_import() -> None:
    edges = _synthetic_edges()
    assert cycles(edges) == {"meddx.low <-> meddx.mid": ["meddx.low", "meddx.mid", "meddx.low"]}
    assert [str(e) for e in upward_imports(edges, SYNTHETIC_LAYERS)] == ["meddx.low -> meddx.mid"]
    assert layer_of("meddx.pkg.leaf", SYNTHETIC_LAYERS) == 2


def test_the_checker_finds_a_longer_cycle_as_a_path() -> None:
    edges = [Import("a", "b", 1), Import("b", "c", 1), Import("c", "a", 1), Import("c", "d", 1)]
    assert cycles(edges) == {"a <-> b <-> c": ["a", "b", "c", "a"]}
    assert cycles([Import("a", "b", 1), Import("b", "c", 1)]) == {}
