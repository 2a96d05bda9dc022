"""The package's import boundaries (docs/design.md, "Layout"): imports go down the stack only.

data and losses never import model; model, losses, data and metrics never import lit, cli or engine;
the pure-torch parts never import Lightning.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sam3_train"

# package -> the sam3_train packages and modules it may not import
FORBIDDEN = {
    "data": ("sam3_train.model", "sam3_train.losses", "sam3_train.lit", "sam3_train.cli", "sam3_train.engine"),
    "losses": ("sam3_train.model", "sam3_train.data.datamodule", "sam3_train.lit", "sam3_train.cli", "sam3_train.engine"),
    "metrics": ("sam3_train.model", "sam3_train.lit", "sam3_train.cli", "sam3_train.engine"),
    "model": ("sam3_train.lit", "sam3_train.cli", "sam3_train.engine"),
}
# Pure torch: no Lightning anywhere in these packages (the DataModule is data's one Lightning module).
NO_LIGHTNING = {"model": (), "losses": (), "data": ("datamodule.py",)}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_down_the_stack(package):
    offending = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in sorted((PACKAGE / package).glob("*.py"))
        for name in _imports(path)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[package])
    ]
    assert not offending, "\n".join(offending)


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
