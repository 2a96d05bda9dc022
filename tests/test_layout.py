"""The package's import boundaries (docs/design.md, "Layout"): imports go down the stack only, and no
module imports itself back through others (no circles).

Every part of ``sam3_train`` (each sub-package and each top-level module) sits on one layer of
``LAYERS``; a part may import parts of lower layers only. A new part must be placed here: the test
fails for a part it does not know. Function-level (lazy) imports count like module-level ones: a lazy
import upwards is still an upward import, it only hides it from the interpreter until run time.
The pure-torch parts never import Lightning.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sam3_train"

# Bottom to top. Parts on one layer do not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("box_ops", "dist", "atomic"),                      # foundations: box formats, ranks, atomic files
    ("data", "losses", "metrics", "visualize", "checkpointing"),  # pure parts, checkpoint file I/O
    ("model", "optim", "resume"),                      # the detector; what a training run is made of
    ("preemption", "callbacks", "ema", "nonfinite", "progress", "finetune"),  # Lightning callbacks
    ("lit",),                                          # the LightningModule composing them
    ("cli", "loading"),                                # Sam3CLI (every LightningCLI builds on it); load_detector
    ("engine", "video", "deploy"),                     # applications built on training and the detector
    ("console",),                                      # the `sam3-train` command: routes to all of them
]
LAYER_OF = {part: level for level, parts in enumerate(LAYERS) for part in parts}

# Pure torch: no Lightning anywhere in these packages (the DataModule is data's one Lightning module).
NO_LIGHTNING = {"model": (), "losses": (), "data": ("datamodule.py",), "metrics": ()}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    """Absolute names a module imports, at any depth (module level and inside functions); for
    ``from a.b import c`` both ``a.b`` and ``a.b.c`` (c may be a module)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "sam3_train" else None


def test_every_part_is_placed_on_a_layer():
    parts = {_part(m) for m in MODULES} - {None}
    unplaced = sorted(parts - set(LAYER_OF))
    assert not unplaced, f"place {unplaced} on a layer in tests/test_layout.py (and docs/design.md's layout)"


@pytest.mark.parametrize("part", sorted({_part(m) for m in MODULES} - {None}))
def test_imports_go_down_the_stack(part):
    offending = []
    for module, path in MODULES.items():
        if _part(module) != part:
            continue
        for name in _imports(path):
            other = _part(name)
            if other is None or other == part or name not in MODULES:
                continue
            if LAYER_OF.get(other, len(LAYERS)) >= LAYER_OF.get(part, -1):
                offending.append(f"{module} imports {name} (layer {LAYER_OF.get(other)} >= {LAYER_OF.get(part)})")
    assert not offending, "\n".join(offending)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
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
                    found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles():
    graph = {m: {n for n in _imports(p) if n in MODULES and n != m} for m, p in MODULES.items()}
    # A package's __init__ re-exporting its own modules is how a package presents itself, not a circle.
    for module in graph:
        graph[module] = {n for n in graph[module] if not module.startswith(n + ".")}
    cycles = _cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", sorted(NO_LIGHTNING))
def test_pure_torch_parts_do_not_import_lightning(package):
    offending = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in sorted((PACKAGE / package).glob("*.py"))
        if path.name not in NO_LIGHTNING[package]
        for name in _imports(path)
        if name.split(".")[0] in ("lightning", "pytorch_lightning")
    ]
    assert not offending, "\n".join(offending)
