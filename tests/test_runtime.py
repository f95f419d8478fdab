"""Process-level allocator settings of the entry points."""
import platform
import subprocess
import sys

import pytest

from xbarflow.runtime import tune_allocator


def test_opt_out_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("XBARFLOW_MALLOC", "default")
    assert tune_allocator() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning applies to glibc only")
def test_applied_on_glibc():
    # in a child process: the setting is process-wide
    code = "from xbarflow.runtime import tune_allocator; print(tune_allocator())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
