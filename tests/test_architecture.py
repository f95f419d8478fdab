"""The floors of the code base hold: the physics imports no framework, the layers no Hydra,
Lightning or MLflow, and no two modules of xbarflow import each other, directly or round a
longer circle (shared/docs/layout.md). Read from the source with ``ast``, so an import inside a
function counts too."""
import ast
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

import pytest
from conftest import REPO

FRAMEWORKS = ("hydra", "omegaconf", "pytorch_lightning", "lightning", "mlflow", "torchmetrics")


def import_statements(path: Path, package: str) -> Iterable[Tuple[str, List[str]]]:
    """``(module, names taken from it)`` for every import in ``path``, at any depth (relative
    imports resolved in ``package``): ``import a.b`` gives ``("a.b", [])``, ``from . import x, y``
    in package ``p`` gives ``("p", ["x", "y"])``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = package.split(".") + [path.stem]  # "__init__" too: level 1 is then the package itself
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if node.level:
                base = parts[: len(parts) - node.level]
                yield ".".join(base + ([node.module] if node.module else [])), names
            else:
                yield node.module or "", names


def imported_modules(path: Path, package: str) -> Iterable[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved in ``package``)."""
    return (module for module, _ in import_statements(path, package))


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


# ---------------------------------------------------------------- no import circle
def import_graph(package_dir: Path, package: str) -> Dict[str, Set[str]]:
    """Module -> the modules of ``package`` it imports (at any depth: a lazy import inside a
    function closes a circle just as well, it only hides it until the call).

    A package is named by its ``__init__`` (``xbarflow.data``). ``from . import x`` is an import
    of the submodule ``x`` where ``x`` is a module, else of the package (a name its ``__init__``
    defines); ``from .m import name`` is an import of ``m``. Importing a submodule runs its parent
    packages' ``__init__`` first, but that is no edge here: a package that re-exports its
    submodules would otherwise be in a circle with each of them.
    """
    files = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir).with_suffix("").parts
        name = ".".join([package, *rel[:-1]] + ([] if rel[-1] == "__init__" else [rel[-1]]))
        files[name] = (path, ".".join([package, *rel[:-1]]))
    graph: Dict[str, Set[str]] = {}
    for name, (path, sub) in files.items():
        edges = set()
        for module, names in import_statements(path, sub):
            if module not in files:
                continue
            submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in files]
            edges.update(submodules)
            if not names or len(submodules) < len(names):  # a name the module itself defines
                edges.add(module)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import circle as ``[a, b, ..., a]`` (starting at its first module in sorted order), or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done (no circle through it)
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):]
                first = cycle.index(min(cycle))
                cycle = cycle[first:] + cycle[:first]
                return cycle + [cycle[0]]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle_in_xbarflow():
    graph = import_graph(REPO / "xbarflow", "xbarflow")
    assert "xbarflow.tracking.run" in graph["xbarflow.tracking"]  # the graph sees the package's modules
    assert "xbarflow.builders" in graph["xbarflow.config"]  # and the imports inside functions
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("file,line,circle", [
    # the two circles this check was written against, put back
    ("builders.py", "from .config import ConfigError", ["xbarflow.builders", "xbarflow.config", "xbarflow.builders"]),
    ("data/images.py", "from .datasets import DataSplits",
     ["xbarflow.data.datasets", "xbarflow.data.images", "xbarflow.data.datasets"]),
    # a module builders imports importing builders back, as a submodule of the package
    ("errors.py", "from . import builders", ["xbarflow.builders", "xbarflow.errors", "xbarflow.builders"]),
    # hidden in a function, round three modules
    ("data/splits.py", "def _later():\n    from .datasets import tensor_splits\n",
     ["xbarflow.data.datasets", "xbarflow.data.images", "xbarflow.data.splits", "xbarflow.data.datasets"]),
    ("tracking/redaction.py", "def _later():\n    from .upload import upload_record\n",
     ["xbarflow.tracking.record", "xbarflow.tracking.redaction", "xbarflow.tracking.upload",
      "xbarflow.tracking.record"]),
], ids=["config-builders", "datasets-images", "errors-builders", "lazy-splits-datasets", "lazy-tracking"])
def test_an_added_import_circle_is_caught(tmp_path, file, line, circle):
    """A copy of xbarflow with one import added that closes a circle fails the check, naming the circle."""
    import shutil

    copy = tmp_path / "xbarflow"
    shutil.copytree(REPO / "xbarflow", copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert find_cycle(import_graph(copy, "xbarflow")) is None
    (copy / file).write_text((copy / file).read_text() + "\n" + line + "\n")
    assert find_cycle(import_graph(copy, "xbarflow")) == circle
