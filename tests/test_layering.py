"""The import layering (DESIGN.md, "Layers, bottom up"), read from the source with ``ast``.

Every module under src/convgap belongs to a *unit* (its first name under ``convgap``: the
package ``ops``, the module ``timing``; the package root itself is ``""``), and every unit to
a layer of :data:`LAYERS`. The rules:

* a module imports only from its own layer or below;
* a kernel (:mod:`convgap.kernels`) imports only :data:`KERNEL_IMPORTS`;
* no module imports a private name (a ``_name`` module or attribute) of another unit;
* nothing imports :mod:`convgap.cli` (but ``python -m convgap``'s ``__main__``);
* other units take from :mod:`convgap.einsum.evaluate` only :data:`EVALUATE_EXPORTS` (it
  runs plans; what it runs them on lives in :mod:`convgap.ops`).

Every import counts: at the top, inside functions, under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "convgap"

# bottom up: a module imports only from its own layer or below
LAYERS: list[tuple[str, frozenset[str]]] = [
    ("base", frozenset({"errors", "config", "timing", "cache", "allocator", "progress"})),
    ("runtime", frozenset({"ops", "hardware", "count", "blocks", "choice"})),
    ("operations", frozenset({"kernels", "einsum", "algorithms", "models"})),
    ("layers", frozenset({"layers"})),
    ("model tools", frozenset({"transforms", "analysis", "predict", "train", "data",
                                "dynamic"})),
    # the package root re-exports the public API; __main__ runs the command line
    ("entry points", frozenset({"cli", "__main__", ""})),
]
LAYER_OF = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}
# kernels import only the shared runtime and errors; cache names their build directory
KERNEL_IMPORTS = frozenset({"kernels", "ops", "errors", "cache"})
# the package root's names any layer may read (metadata, set before any import)
ROOT_METADATA = frozenset({"__version__"})
EVALUATE = "convgap.einsum.evaluate"
EVALUATE_EXPORTS = frozenset({"run_plan"})
# what the command line may be imported by
CLI_IMPORTERS = frozenset({"convgap.__main__"})

# Violations in code this branch does not own, each to be removed where it is fixed (the
# test fails on an entry that no longer matches, so the list cannot go stale).
KNOWN: frozenset[str] = frozenset()


def unit_of(module: str) -> str:
    """'convgap.ops.guard' -> 'ops'; 'convgap' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _is_module(name: str, root: Path = SRC) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def _private(segment: str) -> bool:
    return segment.startswith("_") and not (segment.startswith("__") and
                                            segment.endswith("__"))


def imports(module: str, is_package: bool, source: str,
            root: Path = SRC) -> list[tuple[str, str | None]]:
    """Every convgap import in ``source`` (the text of ``module``; ``is_package``: it is an
    ``__init__.py``) as (target module, imported name or None), relative imports
    resolved; a name that is a submodule becomes the target module."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names
                      if a.name == "convgap" or a.name.startswith("convgap.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target != "convgap" and not target.startswith("convgap."):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((sub, None) if _is_module(sub, root) else (target, a.name))
    return found


def violations(module: str, is_package: bool, source: str, root: Path = SRC) -> list[str]:
    """What in ``source`` (the text of ``module``) breaks the layering rules."""
    out = []
    unit = unit_of(module)
    for target, name in imports(module, is_package, source, root):
        tunit = unit_of(target)
        what = target if name is None else f"{target}.{name}"
        if tunit == "" and name in ROOT_METADATA:
            continue
        if tunit not in LAYER_OF:
            out.append(f"{module}: {what} is in no layer (add its unit to LAYERS)")
            continue
        if LAYER_OF[tunit] > LAYER_OF[unit]:
            out.append(f"{module}: imports {what} from the higher layer "
                       f"'{LAYERS[LAYER_OF[tunit]][0]}'")
        if unit == "kernels" and tunit not in KERNEL_IMPORTS:
            out.append(f"{module}: a kernel imports {what} (kernels import only "
                       f"{sorted(KERNEL_IMPORTS)})")
        if tunit != unit and any(_private(s) for s in what.split(".")[1:]):
            out.append(f"{module}: private name {what} of unit '{tunit}'")
        if tunit == "cli" and module not in CLI_IMPORTERS:
            out.append(f"{module}: imports the command line ({what})")
        if target == EVALUATE and unit != "einsum" and name not in EVALUATE_EXPORTS:
            out.append(f"{module}: takes {what} from the plan runner (only "
                       f"{sorted(EVALUATE_EXPORTS)}; shared helpers live in convgap.ops)")
    return out


def _modules(root: Path = SRC):
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        yield ".".join(parts), is_package, path.read_text()


def test_every_module_keeps_the_layering():
    found = []
    for module, is_package, source in _modules():
        if unit_of(module) not in LAYER_OF:
            found.append(f"{module} is in no layer (add its unit to LAYERS)")
        found += violations(module, is_package, source)
    assert sorted(set(found) - KNOWN) == []
    assert sorted(KNOWN - set(found)) == [], "fixed: remove from KNOWN"


def test_the_package_has_modules_in_every_kind_of_layer():
    """The walk sees the tree (a wrong SRC would pass vacuously)."""
    units = {unit_of(m) for m, _, _ in _modules()}
    assert {"ops", "kernels", "einsum", "layers", "errors", ""} <= units


def _check(module: str, source: str, is_package: bool = False) -> list[str]:
    return violations(module, is_package, source)


def test_relative_imports_resolve_to_their_modules():
    src = ("from .. import choice\nfrom ..ops.memo import reuse\nfrom . import dispatch\n"
           "from .factorizations import family\nimport convgap.errors\n"
           "from .. import ops\n")
    assert imports("convgap.layers.tensorial", False, src) == [
        ("convgap.choice", None), ("convgap.ops.memo", "reuse"),
        ("convgap.layers.dispatch", None), ("convgap.layers.factorizations", "family"),
        ("convgap.errors", None), ("convgap.ops", None)]
    # in a package's __init__, one dot is the package itself
    assert imports("convgap.kernels.cpu", True, "from .build import library\n") == \
        [("convgap.kernels.cpu.build", "library")]


@pytest.mark.parametrize("module, source, expect", [
    # a lower layer importing a higher one, also inside a function
    ("convgap.ops.guard", "from ..layers import dispatch\n", "higher layer 'layers'"),
    ("convgap.ops.memo", "def f():\n    from .. import transforms\n", "higher layer"),
    ("convgap.timing", "import convgap.hardware\n", "higher layer 'runtime'"),
    # kernels take only ops, errors and cache
    ("convgap.kernels.cpu.pdp", "from ...einsum.parse import Expression\n",
     "a kernel imports"),
    ("convgap.kernels.cpu.pdp", "from ...choice import pick\n", "a kernel imports"),
    # private names of another unit
    ("convgap.layers.tensorial", "from ..einsum import _plan\n", "private name"),
    ("convgap.layers.tensorial", "from ..models._registry import register\n",
     "private name"),
    # the command line is imported by nothing (the root is in its layer)
    ("convgap", "from . import cli\n", "imports the command line"),
    # the plan runner lends no helpers
    ("convgap.layers.flattened", "from ..einsum.evaluate import Program\n",
     "from the plan runner"),
    # a unit missing from the table
    ("convgap.layers.dispatch", "from ..newthing import x\n", "in no layer"),
])
def test_a_violation_is_reported(module, source, expect):
    found = _check(module, source, is_package=module == "convgap")
    assert len(found) == 1 and expect in found[0], found


@pytest.mark.parametrize("module, source", [
    ("convgap.kernels.cpu.build", "from ...cache import cache_dir\n"),
    ("convgap.kernels.cpu.pcp", "from ...ops.memo import reuse\nfrom . import planar\n"),
    ("convgap.models", "from ._registry import register\n"),
    ("convgap.analysis.analyze", "from .. import __version__\n"),
    ("convgap.transforms.swap", "from ..count import tensors as _tensors\n"),
    ("convgap.layers.tensorial", "from ..einsum.evaluate import run_plan\n"),
    ("convgap.__main__", "from .cli import main\n"),
])
def test_allowed_imports_pass(module, source):
    assert _check(module, source, is_package=module == "convgap.models") == []
