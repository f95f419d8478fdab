"""One run: config -> dataset + converted model -> training -> evaluation -> MLflow."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from . import tracking
from .config import ConfigError, validate
from .data import EpochShuffleSampler, build_datasets
from .evaluation import evaluate
from .hardware import crossbar_spec, layer_selection, make_chip
from .lit import CrossbarClassifier
from .builders import build_model
from .nn.convert import convert


def _chip_figure(per_chip, metrics):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.bar(range(len(per_chip)), per_chip, color="tab:blue", label="chip")
    ax.axhline(metrics["test/acc_software"], color="k", ls="--", label="software")
    ax.axhline(metrics["test/acc_xbar_nominal"], color="tab:orange", ls=":", label="nominal crossbar")
    ax.set_xlabel("chip")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def run_experiment(cfg: DictConfig, *, output_dir: str, start_dir: Optional[str] = None,
                   parent_run_id: Optional[str] = None, job_num: Optional[int] = None,
                   overrides: str = "") -> Dict[str, float]:
    """Train and evaluate one configuration; log everything to MLflow.

    Everything that can reject the input (config ranges, dataset availability) runs
    before the MLflow run is created, so bad input leaves no run behind; a failure
    after that marks the run FAILED (or KILLED on interrupt), never RUNNING.

    Returns:
        The section-8 metrics (accuracies in percent).
    """
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint, OnExceptionCheckpoint
    from pytorch_lightning.loggers import MLFlowLogger

    typed = validate(cfg)
    pl.seed_everything(typed.seed, workers=True, verbose=False)
    data = build_datasets(typed.dataset)
    spec = crossbar_spec(typed)
    model = build_model(typed.model, data.in_shape, data.num_classes)
    xmodel = convert(model, spec, layers=layer_selection(typed))
    if typed.training.init_from:
        # weights.pt of an earlier run (or a plain model's state_dict: gains then start at 1)
        missing, unexpected = xmodel.load_state_dict(torch.load(typed.training.init_from, map_location="cpu"),
                                                     strict=False)
        if unexpected or any(not k.endswith("log_column_gain") for k in missing):
            raise ConfigError(f"training.init_from {typed.training.init_from} does not fit the model "
                              f"(missing {missing}, unexpected {unexpected})")

    def chip(seed):
        return make_chip(typed, seed)

    def train_chip(seed):  # drift: a training chip is read at a random age (see make_chip)
        return make_chip(typed, seed, train=True)

    module = CrossbarClassifier(xmodel, typed.training, data.num_classes, train_chip, seed=typed.seed)
    bs = typed.training.batch_size
    nw = typed.dataset.num_workers
    train_loader = DataLoader(data.train, batch_size=bs, sampler=EpochShuffleSampler(len(data.train), typed.seed),
                              num_workers=nw)
    val_loader = DataLoader(data.val, batch_size=typed.eval.batch_size, num_workers=nw)
    test_loader = DataLoader(data.test, batch_size=typed.eval.batch_size, num_workers=nw)

    import hydra.utils

    extra_callbacks = [hydra.utils.instantiate(c) for c in cfg.trainer.callbacks]
    out = Path(output_dir)
    ckpt_dir, run_file = out / "checkpoints", out / "mlflow_run.json"
    uri = tracking.tracking_uri(typed.logger, start_dir)
    client = tracking.client_for(uri)
    run_id, resume_ckpt = None, None
    if typed.resume:
        # continue the same MLflow run from the last end-of-epoch checkpoint: mid-epoch
        # state cannot be restored exactly with plain dataloaders, an epoch boundary can
        if run_file.exists():
            run_id = json.loads(run_file.read_text())["run_id"]
        if (ckpt_dir / "last.ckpt").exists():
            resume_ckpt = str(ckpt_dir / "last.ckpt")
        print(f"resume: run {run_id or '(new)'} from {resume_ckpt or 'the start'}", flush=True)
    if run_id is None:
        exp_id = tracking.experiment_id(client, typed.logger.experiment_name)
        tags = {
            "training": typed.training.mode, "hardware": typed.hardware.name, "nonideality": typed.nonideality.name,
            "dataset": typed.dataset.name, "model": str(typed.model["_target_"]).rsplit(".", 1)[-1], "overrides": overrides,
            "output_dir": str(output_dir),
        }
        commit = tracking.git_commit(start_dir or os.getcwd())
        if commit:
            tags["git_commit"] = commit
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        if job_num is not None:
            tags["job_num"] = str(job_num)
        run_name = typed.run_name or (overrides or f"{typed.training.mode}-{typed.hardware.name}")
        run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        out.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
        fresh = True
    else:
        client.update_run(run_id, "RUNNING")
        fresh = False
    exc: Optional[BaseException] = None
    try:
        if fresh:
            resolved = OmegaConf.to_container(cfg, resolve=True)
            tracking.log_params(client, run_id, tracking.flatten(resolved))
            client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            tracking.log_layer_table(client, run_id, xmodel)
        logger = MLFlowLogger(experiment_name=typed.logger.experiment_name, tracking_uri=uri, run_id=run_id)
        tc = typed.trainer
        trainer = pl.Trainer(
            accelerator=tc.accelerator, devices=tc.devices, strategy=tc.strategy, num_nodes=tc.num_nodes,
            precision=tc.precision, max_epochs=typed.training.epochs,
            limit_train_batches=_limit(tc.limit_train_batches), limit_val_batches=_limit(tc.limit_val_batches),
            log_every_n_steps=tc.log_every_n_steps, enable_progress_bar=tc.enable_progress_bar,
            deterministic=tc.deterministic, logger=logger, default_root_dir=str(output_dir),
            enable_model_summary=False,
            callbacks=[
                # save_top_k=1 without a monitor keeps the newest epoch; Lightning writes last.ckpt only
                # alongside a top-k save
                ModelCheckpoint(dirpath=ckpt_dir, filename="epoch{epoch}", save_last=True, save_top_k=1, every_n_epochs=1),
                # SIGTERM (SLURM pre-emption) and Ctrl-C: keep the interrupted state for inspection
                OnExceptionCheckpoint(dirpath=str(ckpt_dir), filename="interrupted"),
                *extra_callbacks,
            ],
        )
        trainer.fit(module, train_loader, val_loader, ckpt_path=resume_ckpt)
        metrics, per_chip = evaluate(
            xmodel, test_loader, num_classes=data.num_classes, n_chips=typed.eval.n_chips,
            chip_seed=typed.eval.chip_seed, make_chip=chip, device=module.device, times=typed.eval.times,
        )
        tracking.log_metrics(client, run_id, metrics)
        for i, acc in enumerate(per_chip):
            tracking.log_metrics(client, run_id, {"test/acc_xbar_chip": acc}, step=i)
        fig = _chip_figure(per_chip, metrics)
        client.log_figure(run_id, fig, "chip_accuracy.png")
        import matplotlib.pyplot as plt

        plt.close(fig)
        if typed.logger.log_weights:
            path = Path(output_dir) / "weights.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model_state(xmodel), path)
            client.log_artifact(run_id, str(path))
        print(" ".join(f"{k}={v:.2f}" for k, v in metrics.items()), flush=True)
        return metrics
    except BaseException as e:
        exc = e
        raise
    finally:
        tracking.mark_terminated(client, run_id, exc)


def model_state(model) -> Dict[str, torch.Tensor]:
    """The software weights (the values to program) and digital column gains; `training.init_from` loads them."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _limit(v):
    """Lightning's convention: a float <= 1 is a fraction of the batches, an int a count."""
    if v is None:
        return None
    return float(v) if v <= 1.0 else int(v)
