"""The package layering of `harmony/`, read from the source with `ast` so it never regresses.

Every top-level unit (a package such as `harmony.data`, or a module such as `harmony.config`) sits on a
layer and may import only units on lower layers or its own. Lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "harmony"

# lowest first; a unit may import units of strictly lower layers (and itself)
LAYERS: list[set[str]] = [
    {"core"},  # shared helpers: the user-facing errors, devices, collectives, ramps, colours, checkpoint files
    {"typed", "outputs"},  # config typing, output checks
    {"models"},  # towers and heads, plain arguments
    {"objective_config", "eval_config"},  # the objectives' and evaluation's config sections (torch-free)
    {"config"},
    {"presets"},
    {"objectives"},  # the objective registry and plug-ins
    {"data"},  # views (from objectives' Needs), sources, loader
    {"factory"},  # models from a config
    {"weights"},  # other libraries' weights to start a run from (--init)
    {"train"},
    {"loading"},  # trained encoders back from checkpoints
    {"export"},
    {"eval", "check"},
    {"repro"},
    {"cli", "__init__"},
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}
MAX_LINES = 450


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "harmony":
            if node.module == "harmony":
                found |= {f"harmony.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "harmony"}
    return found


def _edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        source = _unit(".".join(rel.parts))
        for module in _imports(path):
            target = _unit(module)
            if target != source:
                edges[(source, target)].append(str(path.relative_to(ROOT.parent)))
    return edges


def test_every_unit_has_a_layer() -> None:
    units = {_unit(".".join(p.relative_to(ROOT.parent).with_suffix("").parts)) for p in ROOT.rglob("*.py")}
    assert units <= set(LAYER_OF), f"give these a layer: {sorted(units - set(LAYER_OF))}"


def test_packages_import_only_lower_layers() -> None:
    upward = {
        f"{source} -> {target}": files
        for (source, target), files in _edges().items()
        if LAYER_OF[target] >= LAYER_OF[source]
    }
    assert not upward, f"imports against the layering: {upward}"


def test_no_import_cycle_between_units() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for source, target in _edges():
        graph[source].add(target)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            unit = todo.pop()
            if unit == goal:
                return True
            if unit not in seen:
                seen.add(unit)
                todo.extend(graph.get(unit, ()))
        return False

    cycles = sorted(f"{s} <-> {t}" for s, targets in graph.items() for t in targets if reaches(t, s))
    assert not cycles


def test_no_module_over_the_size_limit() -> None:
    long = {
        str(p.relative_to(ROOT.parent)): n
        for p in ROOT.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long
