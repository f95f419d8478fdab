"""The floors of the code base hold: the physics imports no framework, the layers no Hydra,
Lightning or MLflow (shared/docs/layout.md). Read from the source with ``ast``, so an import
inside a function counts too."""
import ast
from pathlib import Path
from typing import Iterable, List

import pytest
from conftest import REPO

FRAMEWORKS = ("hydra", "omegaconf", "pytorch_lightning", "lightning", "mlflow", "torchmetrics")


def imported_modules(path: Path, package: str) -> Iterable[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved in ``package``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = package.split(".") + [path.stem]  # "__init__" too: level 1 is then the package itself
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - node.level]
                yield ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.module or ""


def violations(package_dir: Path, package: str, allowed_internal: str, forbidden: Iterable[str]) -> List[str]:
    """``file: module`` for every import of a forbidden framework, or of ``xbarflow`` outside
    ``allowed_internal`` (a package prefix), by the modules under ``package_dir``."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        sub = ".".join([package, *path.relative_to(package_dir).parent.parts]).rstrip(".")
        for module in imported_modules(path, sub):
            top = module.split(".")[0]
            if top in forbidden:
                found.append(f"{path.relative_to(package_dir.parent)}: {module}")
            elif top == "xbarflow" and not (module == allowed_internal or module.startswith(allowed_internal + ".")):
                found.append(f"{path.relative_to(package_dir.parent)}: {module}")
    return found


FLOORS = [
    # package, may import from xbarflow only, forbidden third parties
    ("xbarflow.crossbar", "xbarflow.crossbar", FRAMEWORKS),
    ("xbarflow.nn", "xbarflow", ("hydra", "omegaconf", "pytorch_lightning", "lightning", "mlflow")),
]


@pytest.mark.parametrize("package,allowed,forbidden", FLOORS, ids=[f[0] for f in FLOORS])
def test_floors_hold(package, allowed, forbidden):
    package_dir = REPO / Path(*package.split("."))
    assert violations(package_dir, package, allowed, forbidden) == []


def test_nn_imports_only_the_physics_below_it():
    package_dir = REPO / "xbarflow" / "nn"
    internal = [v for v in violations(package_dir, "xbarflow.nn", "xbarflow.nn", ())
                if not v.split(": ")[1].startswith("xbarflow.crossbar")]
    assert internal == []


@pytest.mark.parametrize("line", [
    "import mlflow",
    "from pytorch_lightning import Trainer",
    "from omegaconf import OmegaConf",
    "from ..config import validate",
    "from xbarflow.tracking import log_params",
    "def f():\n    import hydra\n",
])
def test_an_added_forbidden_import_is_caught(tmp_path, line):
    """A copy of the physics package with one forbidden import added fails the check."""
    import shutil

    copy = tmp_path / "xbarflow" / "crossbar"
    shutil.copytree(REPO / "xbarflow" / "crossbar", copy)
    assert violations(copy, "xbarflow.crossbar", "xbarflow.crossbar", FRAMEWORKS) == []
    (copy / "circuit.py").write_text((copy / "circuit.py").read_text() + "\n" + line + "\n")
    found = violations(copy, "xbarflow.crossbar", "xbarflow.crossbar", FRAMEWORKS)
    assert len(found) == 1 and found[0].startswith("crossbar/circuit.py: "), found
