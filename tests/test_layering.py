"""The import graph follows the layers of docs/CONTRACTS.md, read from the source with ``ast``.

Layers, each importing only the ones below it (and its own room):

1. ``core``                         configs, paths, weights, Ray start-up, the temporal segment rule
2. ``pipelines`` | ``models``       data | networks (two rooms of one layer: neither imports the other)
3. ``inference``                    the sampler
4. ``training`` | ``serve`` | ``demo_parts``   jobs, the service and the demo's parts (none imports another)
5. entry points                     ``train.py``, ``demo.py``, ``evaluate.py``

``pipelines/ingest.py`` is an entry point too (nothing may import it), but it sits in its room's
layer: it imports only ``pipelines`` and ``core`` (its MLflow run goes through
``core.run_logging``), never a layer above.

Also checked: the project's own modules are imported at the top of a file (never inside a
function), and no module edits ``sys.path``. ``tests/`` and ``benchmarks/`` may import anything.
"""
from __future__ import annotations

import ast
import gc
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.paths import PROJECT_ROOT

LAYERS = {"core": 1, "pipelines": 2, "models": 2, "inference": 3, "training": 4, "serve": 4, "demo_parts": 4}
ENTRY_POINTS = {"train": 5, "demo": 5, "evaluate": 5, "pipelines.ingest": 2}
OWN_TOP = set(LAYERS) | {"train", "demo", "evaluate"}
CHECKED_DIRS = tuple(LAYERS)
CHECKED_FILES = ("train.py", "demo.py", "evaluate.py")


@dataclass(frozen=True)
class Edge:
    src: str  # importing module, dotted
    dst: str  # imported module, dotted (the longest project module the import names)
    line: int
    top_level: bool


def module_name(path: Path) -> str:
    rel = path.relative_to(PROJECT_ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> tuple[str, int]:
    """(room, layer) of a project module; a top-level entry point is its own room at layer 5, one
    inside a room (``pipelines.ingest``) is in that room at the room's layer."""
    if module in ENTRY_POINTS:
        return module.split(".")[0], ENTRY_POINTS[module]
    room = module.split(".")[0]
    return room, LAYERS[room]


def parse(source: str) -> ast.Module:
    """``ast.parse`` with the garbage collector paused: CPython 3.11.7 can raise "SystemError: AST
    constructor recursion depth mismatch" when something interrupts the AST's construction (its
    error path does not restore the depth counter: python/cpython gh-106905, fixed in later
    releases). In the full suite a finalizer run by the collector in the middle of the parse did it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source)
    finally:
        if enabled:
            gc.enable()


def edges_of(source: str, module: str) -> list[Edge]:
    tree = parse(source)
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from pipelines import ingest`` names pipelines.ingest
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] in OWN_TOP:
                out.append(Edge(module, name, node.lineno, id(node) in top))
    return out


def violation(edge: Edge) -> str | None:
    """Why ``edge`` breaks the layering, or None."""
    if edge.dst in ENTRY_POINTS:
        return None if edge.src == edge.dst else f"{edge.src}:{edge.line} imports the entry point {edge.dst}"
    src_room, src_layer = layer_of(edge.src)
    dst_room, dst_layer = layer_of(edge.dst.split(".")[0])
    if src_room == dst_room or dst_layer < src_layer:
        return None
    return f"{edge.src}:{edge.line} (layer {src_layer}, {src_room}) imports {edge.dst} (layer {dst_layer}, {dst_room})"


def project_sources() -> list[Path]:
    files = [PROJECT_ROOT / name for name in CHECKED_FILES]
    for folder in CHECKED_DIRS:
        files += sorted((PROJECT_ROOT / folder).rglob("*.py"))
    return [f for f in files if f.is_file()]


def all_edges() -> list[Edge]:
    edges = []
    for path in project_sources():
        edges += edges_of(path.read_text(), module_name(path))
    return edges


def test_the_checker_sees_upward_cross_and_entry_point_edges():
    """The rule itself, on constructed sources (so the real check below can fail)."""
    bad = {
        "models.sampler": "from training.tracking import x\n",  # 2 -> 4
        "pipelines.reader.source": "from models.temporal_segment import T\n",  # sideways in layer 2
        "core.config": "import serve.config\n",  # 1 -> 4
        "serve.app": "from pipelines import ingest\n",  # an entry point
        "pipelines.ingest": "from training.tracking import RunLogger\n",  # 2 -> 4 from an entry point
    }
    for module, source in bad.items():
        found = [violation(e) for e in edges_of(source, module)]
        assert any(found), (module, source)
    good = {"inference.sampler": "from pipelines.media.audio_decode import f\nfrom core.paths import p\n",
            "pipelines.ingest": "from pipelines.dataset.manifest import m\nfrom core.config import c\n",
            "train": "from training.stages import s\n"}
    for module, source in good.items():
        assert not any(violation(e) for e in edges_of(source, module)), (module, source)
    lazy = edges_of("def f():\n    from core.paths import p\n", "models.loopy")
    assert lazy and not lazy[0].top_level


def test_no_import_runs_upward_or_sideways():
    edges = all_edges()
    assert len(edges) > 100  # the walk found the project
    problems = sorted({v for v in map(violation, edges) if v})
    assert not problems, "layering violations:\n" + "\n".join(problems)


def test_no_two_rooms_import_each_other():
    rooms = set()
    for e in all_edges():
        a, b = layer_of(e.src)[0], layer_of(e.dst.split(".")[0])[0]
        if a != b:
            rooms.add((a, b))
    both = sorted({tuple(sorted(pair)) for pair in rooms if (pair[1], pair[0]) in rooms})
    assert not both, f"rooms importing each other: {both}"


def test_project_imports_are_at_the_top_of_files():
    lazy = sorted(f"{e.src}:{e.line} imports {e.dst} inside a function" for e in all_edges() if not e.top_level)
    assert not lazy, "\n".join(lazy)


@pytest.mark.parametrize("path", project_sources() + sorted((PROJECT_ROOT / "cluster").glob("*.py")),
                         ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_no_module_edits_sys_path(path):
    tree = parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys":
            pytest.fail(f"{path.name}:{node.lineno} touches sys.path")


def test_console_scripts_resolve_to_main_functions():
    """Every ``[project.scripts]`` entry names an importable ``main(argv=None) -> int``."""
    import importlib
    import inspect

    import tomllib

    scripts = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"loopy-ingest", "loopy-train", "loopy-sample", "loopy-serve", "loopy-demo"} <= set(scripts)
    for name, target in scripts.items():
        module, func = target.split(":")
        fn = getattr(importlib.import_module(module), func)
        params = inspect.signature(fn).parameters
        assert "argv" in params and params["argv"].default is None, f"{name}: {target} takes no argv=None"


# Inside the data room: building blocks below, the jobs that use them above (pipelines/__init__.py).
PIPELINE_FLOORS = {"errors": 0, "media": 1, "faces": 1, "encoders": 1, "dataset": 1,
                   "ingestion": 2, "reader": 2, "samples": 2, "metrics": 2, "ingest": 3}


def pipeline_violation(edge: Edge) -> str | None:
    """Why an import between sub-rooms of ``pipelines`` runs up or sideways, or None."""
    if not (edge.src.startswith("pipelines.") and edge.dst.startswith("pipelines.")):
        return None
    a, b = edge.src.split(".")[1], edge.dst.split(".")[1]
    if a == b or PIPELINE_FLOORS[b] < PIPELINE_FLOORS[a]:
        return None
    return f"{edge.src}:{edge.line} (pipelines/{a}) imports {edge.dst} (pipelines/{b})"


def test_pipelines_sub_rooms_import_only_downward():
    found = {e.src.split(".")[1] for e in all_edges() if e.src.startswith("pipelines.")}
    assert found <= set(PIPELINE_FLOORS), f"sub-rooms without a floor: {sorted(found - set(PIPELINE_FLOORS))}"
    assert pipeline_violation(Edge("pipelines.faces.crop", "pipelines.ingestion.quality", 1, True))
    assert pipeline_violation(Edge("pipelines.reader.source", "pipelines.samples.talking_heads", 1, True))
    assert not pipeline_violation(Edge("pipelines.reader.source", "pipelines.faces.motion_stats", 1, True))
    problems = sorted({v for v in map(pipeline_violation, all_edges()) if v})
    assert not problems, "\n".join(problems)


def test_pipelines_has_no_flat_modules_but_its_command_and_error():
    """The data room is read from its folder names: only ``ingest.py`` and ``errors.py`` sit flat."""
    flat = sorted(p.name for p in (PROJECT_ROOT / "pipelines").glob("*.py") if p.name != "__init__.py")
    assert flat == ["errors.py", "ingest.py"], flat
