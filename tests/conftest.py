import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# `make test` runs the suite in parallel workers (pytest-xdist, one per core): each worker, and every
# run.py it starts, gets its share of the cores, set before torch is imported, since OpenMP threads
# spinning on oversubscribed cores made steps 10-40x slower here.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_share))
CONF = REPO / "conf"


def compose(overrides=(), return_hydra_config=False):
    """Compose conf/config.yaml with overrides, exactly as run.py does (schema included)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from xbarflow.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides),
                             return_hydra_config=return_hydra_config)


def run_cli(args, cwd, env_extra=None, timeout=600):
    """Run ``python run.py ARGS`` in ``cwd`` (a temporary folder); returns the CompletedProcess."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def workdir(tmp_path):
    """A temporary start directory: mlflow.db, outputs/ and multirun/ land here."""
    return tmp_path



# `make test` gives each test file to one parallel worker (pytest-xdist --dist loadfile), so that
# a module-scoped fixture that costs tens of seconds (a tracking server, a PostgreSQL cluster, a
# trained run) is built once, not once per worker. (xdist_group with --dist loadgroup would be
# finer, but it silently stopped grouping with pytest 9.2: pytest-xdist issue #1386.) The files
# that take longest (measured with --durations, 2 workers) start first, so no worker is left with
# one of them at the end while the other idles.
LONGEST_FIRST = ("test_bad_input.py", "test_tracking_store.py", "test_tracking_postgres.py", "test_scaleout.py",
                 "test_overrides.py", "test_faults.py", "test_source.py", "test_safe_loading.py", "test_run.py",
                 "test_data.py", "test_memory.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept
