import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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
