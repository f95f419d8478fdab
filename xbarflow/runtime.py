"""Process-level settings for xbarflow's entry points (``run.py``, ``scripts/``).

Nothing here runs on import: an application calls it once at start.
"""
from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["tune_allocator", "memory_limit_bytes"]

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
    """Keep freed large blocks in glibc's heap instead of handing them back to the kernel.

    A training step allocates and frees the same tensor sizes over and over. With glibc's
    defaults, blocks of a few MB are returned to the system (heap trimming, mmap), and the
    next step pays a page fault for every 4 KiB of them again. With mmap reserved for
    blocks above 256 MiB and trimming above 1 GiB, a technology-aware step of the FCN on
    64x64 tiles takes 24-29 ms instead of 36-38 ms on a 2-core machine
    (``scripts/bench_crossbar.py``). The cost is resident memory that stays with the
    process after a peak.

    Set ``XBARFLOW_MALLOC=default`` to leave the allocator alone. A no-op where the C
    library is not glibc.

    Returns:
        whether the settings were applied.
    """
    if os.environ.get("XBARFLOW_MALLOC", "") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, 256 * 1024 ** 2)) and bool(mallopt(_M_TRIM_THRESHOLD, 1024 ** 3))


def memory_limit_bytes(accelerator: str = "cpu") -> float:
    """Memory a run may use, bytes: the GPU's with a CUDA accelerator, else this machine's.

    The machine's is the smaller of its physical memory and the cgroup's limit (a container
    or a SLURM allocation).
    """
    import torch

    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    limit = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, float(text))
    return limit
