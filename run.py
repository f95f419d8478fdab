"""Entry point: ``python run.py [group=option ...] [key=value ...] [-m]``.

Composes ``conf/`` with Hydra, validates every value, then trains and evaluates one
configuration per job and logs it to MLflow (see README.md).
"""
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

# Only light modules here: bad input is answered before torch, Lightning and MLflow load
# (about 1 s instead of 6 s); the pipeline is imported once the config has passed.
from xbarflow.config import ConfigError, DatasetUnavailable, init_from_file, register_configs, validate

register_configs()


def _refuse(error: Exception, hc, multirun: bool) -> float:
    """Bad input: one line; exit 2, or in a sweep record the job as rejected. No MLflow run is
    created, except by a setting found bad only while it ran (a diverged training): that run is FAILED."""
    from xbarflow import tracking

    print(f"error: {tracking.redact(error)}", file=sys.stderr, flush=True)
    if not multirun:
        sys.exit(2)
    tracking.record_failure(hc.sweep.dir, hc.job.num, " ".join(hc.overrides.task), f"rejected: {error}")
    return float("nan")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from xbarflow import tracking
    from xbarflow.runtime import quiet_known_noise

    quiet_known_noise()  # here, in every job: a sweep's jobs may run in other processes
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if hc.output_subdir:  # Hydra's copy of the config and overrides: no credentials on disk either
        tracking.redact_files(Path(hc.runtime.output_dir) / hc.output_subdir)
    if multirun:  # the sweeper's copy, at once: a sweep killed before its end leaves no secret behind
        tracking.redact_files(Path(hc.sweep.dir), "multirun.yaml")
    try:  # both again in run_experiment; here before the heavy imports
        typed = validate(cfg)
        if typed.training.init_from:
            init_from_file(typed.training.init_from, hc.runtime.cwd)
    except ConfigError as e:
        return _refuse(e, hc, multirun)
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from xbarflow.pipeline import run_experiment
    from xbarflow.runtime import raise_on_sigterm

    raise_on_sigterm(SIGTERMException)  # outside fit too: a job stopped while it evaluates is KILLED

    n_jobs = hc.launcher.get("n_jobs", 1) if multirun else 1
    if isinstance(n_jobs, int) and n_jobs > 1:
        # parallel local jobs share the cores: one job's intra-op threads should not oversubscribe them
        import os

        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_jobs))
    try:
        metrics = run_experiment(
            cfg,
            output_dir=hc.runtime.output_dir,
            start_dir=hc.runtime.cwd,
            parent_run_id=tracking.parent_run_id(hc.sweep.dir) if multirun else None,
            job_num=hc.job.num if multirun else None,
            overrides=tracking.redact(" ".join(hc.overrides.task)),
        )
    except (ConfigError, DatasetUnavailable) as e:  # found later: a memory limit, a missing file
        return _refuse(e, hc, multirun)
    except Exception as e:
        if not multirun:
            # Hydra would print the traceback as is; exception messages (a database driver's,
            # a failed request's) can carry the tracking URI with its password
            import traceback

            print(tracking.redact("".join(traceback.format_exception(e))), file=sys.stderr, flush=True)
            sys.exit(1)
        # the run is already marked FAILED in MLflow; let the other jobs of the sweep go on
        print(tracking.redact(f"error: job {hc.job.num} failed: {type(e).__name__}: {e}"), file=sys.stderr, flush=True)
        tracking.record_failure(hc.sweep.dir, hc.job.num, " ".join(hc.overrides.task), f"{type(e).__name__}: {e}")
        return float("nan")
    except SIGTERMException:
        # pre-emption: the run is marked KILLED (and checkpointed, if it was training); resume=true continues it
        print("interrupted by SIGTERM: run marked KILLED; rerun with resume=true to continue", file=sys.stderr)
        sys.exit(143)
    # what a sweeper (Optuna) optimises: `objective`, test/acc_xbar_mean unless set
    return metrics[cfg.objective]


if __name__ == "__main__":
    from xbarflow.cli import check_composition, check_overrides
    from xbarflow.runtime import tune_allocator

    conf_dir = Path(__file__).resolve().parent / "conf"
    error = check_overrides(sys.argv[1:], conf_dir) or check_composition(sys.argv[1:], conf_dir)
    if error:
        print(error, file=sys.stderr)
        sys.exit(2)
    tune_allocator()
    main()
