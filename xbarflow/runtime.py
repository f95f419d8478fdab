"""Process-level settings for xbarflow's entry points (``run.py``, ``scripts/``).

Nothing here runs on import: an application calls it once at start.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading

__all__ = ["tune_allocator", "memory_limit_bytes", "quiet_known_noise", "raise_on_sigterm", "sigterm_left_to_lightning"]

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


# Lightning's rank-zero info lines (device summary, the litlogger tip, "`Trainer.fit` stopped") all
# go through this one logger; its warnings go through the warnings module, not here.
LIGHTNING_INFO_LOGGER = "pytorch_lightning.utilities.rank_zero"
# MLflow's "Creating initial MLflow database tables..." / "Updating database tables" on a new SQLite
# store: info lines about MLflow's schema, on the first run of every fresh folder
MLFLOW_DB_LOGGER = "mlflow.store.db.utils"
# torch 2.14 deprecates LeafSpec; Lightning 2.6 still builds one on every fit, in this module
_PYTREE_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
_PYTREE_MODULE = r"pytorch_lightning\.utilities\._pytree\Z"


def quiet_known_noise() -> None:
    """Silence the known console noise of the libraries underneath a run, each at its source, and
    nothing else.

    - Lightning's info lines (``GPU available: False, used: False``, ``TPU available: ...``,
      ``💡 Tip: ... try installing litlogger``, which it prints whenever no LitLogger is
      configured and has no switch for, and ``Trainer.fit stopped: max_epochs reached``): its
      rank-zero logger is set to WARNING. Lightning's warnings are not logged there and still show.
    - MLflow's two info lines when it creates the tables of a new database store: its
      ``mlflow.store.db.utils`` logger is set to WARNING (a failed migration still shows).
    - torch's FutureWarning ``isinstance(treespec, LeafSpec) is deprecated``, which Lightning's
      own ``pytorch_lightning/utilities/_pytree.py`` triggers on every fit and no argument avoids:
      ignored for that message from that module only.

    Lightning's two warnings about ``fit(ckpt_path=None)`` are not filtered: they are avoided by
    the trainer's callbacks (:class:`xbarflow.training.checkpoints.InterruptedCheckpoint`).
    Cheap (imports neither torch nor Lightning) and idempotent; ``run.py`` calls it in every job.
    """
    import logging
    import warnings

    logging.getLogger(LIGHTNING_INFO_LOGGER).setLevel(logging.WARNING)
    logging.getLogger(MLFLOW_DB_LOGGER).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=_PYTREE_DEPRECATION, category=FutureWarning, module=_PYTREE_MODULE)


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


def raise_on_sigterm(exception: type) -> None:
    """SIGTERM raises ``exception(143)`` (a ``SystemExit``), so the job's run is marked KILLED.

    Lightning turns SIGTERM into ``SIGTERMException`` only inside ``fit``; elsewhere in a job
    (converter calibration, BatchNorm re-estimation, evaluation over chips and read times, an
    hour on a large study cell) Python's default action would end the process at once and
    leave its MLflow run RUNNING. ``run.py`` calls this with Lightning's ``SIGTERMException``
    before the job starts; :func:`sigterm_left_to_lightning` hands the signal back to Lightning
    for the fit. A no-op outside the main thread (signal handlers can only be set there).
    """
    def handler(signum, frame):
        raise exception(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def sigterm_left_to_lightning():
    """SIGTERM at its default inside the block, the handler before it restored afterwards.

    Lightning's trainer installs its own SIGTERM handling in ``fit`` (checkpoint at the next
    batch boundary, then ``SIGTERMException``) and composes it with any handler already set:
    with :func:`raise_on_sigterm`'s it would raise mid-step instead.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
