"""One run as a straight line of named steps.

config -> validate -> data -> model (converted to crossbars) -> source (mode=evaluate, or a
reused standard training) -> memory check -> tracked run -> train (or deploy the source) ->
calibrate -> energy -> evaluate -> log results and the model. Every step that can reject the input
runs before the MLflow run is opened, so bad input leaves no run behind; a failure after that marks the run
FAILED (or KILLED on interrupt), never RUNNING (:func:`xbarflow.tracking.open_run`).
"""
from __future__ import annotations

import json
import logging
import sys
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from . import source as source_module
from . import sweep_view, tracking
from .builders import build_model
from .config import Config, ConfigError, init_from_file, validate
from .data import DataSplits, EpochShuffleSampler, ResumableLoader, SeededDraws, build_datasets
from .evaluation import calibration_loader, evaluate
from .hardware import adc_range_mode, crossbar_spec, energy_params, layer_selection, make_chip
from .logged_model import log_model
from .nn.calibration import calibrate_converters, calibrated_by, converter_ranges
from .nn.convert import LayerSelection, convert, convertible_layers, xbar_layers
from .nn.energy import EnergyReport, measure_energy
from .nn.layers import CROSSBAR_ONLY_PARAMS
from .nn.memory import model_memory
from .runtime import memory_limit_bytes, sigterm_left_to_lightning
from .training import CrossbarClassifier

# Above this fraction of the memory limit a run starts, with a warning.
MEMORY_WARN_FRACTION = 0.8


def run_experiment(cfg: DictConfig, *, output_dir: str, start_dir: Optional[str] = None,
                   parent_run_id: Optional[str] = None, job_num: Optional[int] = None,
                   overrides: str = "") -> Dict[str, float]:
    """Train and evaluate one configuration; log everything to MLflow.

    Returns:
        The section-8 metrics (accuracies in percent).

    Raises:
        ConfigError, DatasetUnavailable: bad input, before any run is created; or
            :class:`~xbarflow.training.module.TrainingDiverged` (a ConfigError) while training,
            and the run is marked FAILED.
    """
    typed = validate(cfg)
    seed_everything(typed.seed)
    data = build_datasets(typed.dataset)
    model = build_crossbar_model(typed, data, start_dir)
    source = load_source(typed, cfg, model, start_dir)
    memory_gb = check_memory(typed, model, data, trains=source is None)
    check_trainer(typed)
    with tracking.open_run(typed, cfg, output_dir=output_dir, start_dir=start_dir, parent_run_id=parent_run_id,
                           job_num=job_num, overrides=overrides,
                           extra_params={"xbar_memory_gb": f"{memory_gb:.3f}",
                                         "adc_range_mode_effective": adc_range_mode(typed)}) as run:
        tracking.log_layer_table(run.record, model)
        if parent_run_id and not typed.run_name:
            sweep_view.name_child(run.client, run.run_id, parent_run_id, overrides)
        if source is None:
            device = train(typed, cfg, model, data, run).device
            source_module.mark_trained(run, cfg)
        else:
            device = source_module.deploy(run, typed, cfg, model, data, source)
        calibrate_periphery(typed, model, data, device)
        # energy first: it solves the nominal arrays, and the evaluation's nominal pass reuses that solve
        energy = measure_energy_per_image(typed, model, data, device)
        metrics, per_chip = evaluate_on_test(typed, model, data, device)
        if typed.objective.startswith("val/"):
            metrics.update(evaluate_on_val(typed, model, data, device))
        log_results(run, typed, model, metrics, per_chip, n_test=len(data.test))
        log_energy(run, energy)
        log_model(run, typed, model, torch.stack([data.calibration_images[i][0] for i in range(2)]))
    return metrics


# ------------------------------------------------------------------ the steps
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (and the dataloader workers) from the run's seed."""
    import pytorch_lightning as pl

    pl.seed_everything(seed, workers=True, verbose=False)


def build_crossbar_model(typed: Config, data: DataSplits, start_dir: Optional[str] = None) -> torch.nn.Module:
    """The network for the data, converted to crossbar layers, optionally from ``training.init_from``."""
    model = build_model(typed.model, data.in_shape, data.num_classes)
    selection = layer_selection(typed)
    check_layer_selection(selection, model)
    xmodel = convert(model, crossbar_spec(typed), layers=selection)
    if typed.training.init_from:
        load_initial_weights(xmodel, typed.training.init_from, start_dir)
    return xmodel


def check_layer_selection(selection: LayerSelection, model: torch.nn.Module) -> None:
    """Refuse an ``xbar.layers`` selection that puts no layer of the model on crossbars: a run
    without crossbars is asked for by ``xbar.layers.include=[]`` only (a pattern that matches
    nothing is a typo, not a choice). A pattern of ``exclude`` that matches nothing is fine.

    Raises:
        ConfigError: one line with the patterns and the model's layer names.
    """
    if not selection.include or selection.chosen(model):
        return
    names = convertible_layers(model)
    on_purpose = "xbar.layers.include=[] runs the network without crossbars on purpose"
    if not names:
        raise ConfigError(f"xbar.layers.include={list(selection.include)}: the model has no layer a crossbar can hold "
                          f"(nn.Linear, ungrouped nn.Conv2d); {on_purpose}")
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    if not LayerSelection(include=selection.include).chosen(model):
        why = "matches no layer of the model"
    else:
        left_out = [f"xbar.layers.exclude={list(selection.exclude)}"] if selection.exclude else []
        left_out += ["xbar.layers.first_last_digital=true"] if selection.first_last_digital else []
        why = f"selects no layer once {' and '.join(left_out)} {'are' if len(left_out) > 1 else 'is'} applied"
    raise ConfigError(f"xbar.layers.include={list(selection.include)} {why} (its layers: {shown}); {on_purpose}")


def load_initial_weights(model: torch.nn.Module, path: str, start_dir: Optional[str] = None) -> None:
    """Load ``weights.pt`` of an earlier run, a plain model's state_dict, a Lightning checkpoint or a
    logged model's ``weights.safetensors`` (read as tensors only: nothing in the file runs).

    Crossbar-only parameters absent from the file, or of another shape (converter ranges of
    another tile size), keep their initial values for calibration to set.

    Raises:
        ConfigError: one line, when the file is missing, unreadable or does not fit the model.
    """
    key = "training.init_from"
    file = init_from_file(path, start_dir)
    state = source_module.read_weights_file(file, key, path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a Lightning checkpoint
        state = {k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")}
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{key}={path}: not a state_dict of tensors (got {type(state).__name__})")
    try:  # converter ranges of another tile size are left for calibration to set
        missing, unexpected = model.load_state_dict(source_module.fitting_state(model, state), strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ConfigError(f"{key}={path}: does not fit the model ({str(e).splitlines()[-1].strip()[:200]})") from None
    missing = [k for k in missing if not k.endswith(CROSSBAR_ONLY_PARAMS)]
    if unexpected or missing:
        raise ConfigError(f"{key}={path}: does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def check_memory(typed: Config, model: torch.nn.Module, data: DataSplits, trains: bool = True) -> float:
    """Estimated peak memory of the crossbar simulation in GB; refuse a run that cannot fit.

    The arrays of every layer, and what grows with each phase's batch (activations, the
    ADC's partial outputs): evaluation at ``eval.batch_size``, converter calibration on
    ``xbar.calibration_samples`` images, a training step at ``training.batch_size``.

    Args:
        trains: the run trains (not a deployment of an earlier run's weights).

    Raises:
        ConfigError: one line naming the phase, the largest layer and the estimate.
    """
    # only technology-aware training holds the arrays for a backward pass (not a run that deploys
    # earlier weights: mode=evaluate, or training.reuse; `trains` implies mode=train)
    tech_aware = typed.training.mode == "tech_aware" and trains
    train_batch = min(typed.training.batch_size, len(data.train)) if trains else 0
    specs = [layer.spec for layer in xbar_layers(model)]
    # after training, calibrated ranges and DAC scales are set on xbar.calibration_samples images
    # (calibrate_periphery); technology-aware training calibrates on its first crossbar batch
    after = any(calibrated_by(s, learned=False) for s in specs)
    during = tech_aware and any(calibrated_by(s, learned=True) for s in specs)
    calibration_batch = max(min(typed.xbar.calibration_samples, len(data.train)) if after else 0,
                            train_batch if during else 0)
    estimate = model_memory(model, train_through_crossbar=tech_aware, in_shape=data.in_shape,
                            train_batch=train_batch, calibration_batch=calibration_batch,
                            eval_batch=min(typed.eval.batch_size, max(len(data.test), len(data.val))))
    gb = estimate.peak_bytes / 1e9
    if not estimate.layers:
        return gb
    limit_gb = (typed.trainer.memory_limit_gb or memory_limit_bytes(typed.trainer.accelerator) / 1e9)
    name, (fan_in, fan_out), arrays = estimate.largest()
    batch_key = {"evaluate": "eval.batch_size", "calibrate": "xbar.calibration_samples",
                 "train": "training.batch_size"}[estimate.phase]
    what = (f"largest: layer '{name}', {fan_in}x{fan_out} weights on a {arrays.grid[0]}x{arrays.grid[1]} grid of "
            f"{arrays.tile[0]}x{arrays.tile[1]} tiles, {arrays.arrays} arrays, "
            f"{(arrays.train_bytes if estimate.phase == 'train' else arrays.eval_bytes) / 1e9:.3g} GB; "
            f"activations{' and ADC partial outputs' if estimate.activations and estimate.activations.adc_partials else ''}"
            f" at {batch_key}: {estimate.batch_bytes / 1e9:.3g} GB")
    step = {"evaluate": "evaluate", "calibrate": "calibrate the converters", "train": "train"}[estimate.phase]
    if gb > limit_gb:
        # name the knob of the larger part: the tiles (arrays) or the phase's batch
        key, knob = ((batch_key, f"lower {batch_key}") if estimate.batch_bytes > estimate.peak_bytes / 2
                     else ("xbar.size/rows/cols", "use smaller tiles"))
        raise ConfigError(f"{key}: the crossbar simulation needs about {gb:.3g} GB to {step} ({what}), more than "
                          f"the {limit_gb:.3g} GB available (trainer.memory_limit_gb); {knob}")
    if gb > MEMORY_WARN_FRACTION * limit_gb:
        print(f"warning: the crossbar simulation needs about {gb:.3g} GB of the {limit_gb:.3g} GB available "
              f"to {step} ({what})", file=sys.stderr, flush=True)
    return gb


def check_trainer(typed: Config) -> None:
    """Let Lightning check the accelerator, devices, strategy and precision before any run exists.

    Raises:
        ConfigError: one line with Lightning's reason (an accelerator this machine lacks, ...).
    """
    import pytorch_lightning as pl

    tc = typed.trainer
    log = logging.getLogger("pytorch_lightning")
    level = log.level
    log.setLevel(logging.WARNING)  # its "GPU available ..." lines come once, from the real Trainer
    try:
        pl.Trainer(accelerator=tc.accelerator, devices=tc.devices, strategy=tc.strategy, num_nodes=tc.num_nodes,
                   precision=tc.precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"trainer (accelerator={tc.accelerator}, devices={tc.devices}, strategy={tc.strategy}, "
                          f"precision={tc.precision}): {reason}") from None
    finally:
        log.setLevel(level)


def data_loaders(typed: Config, data: DataSplits) -> Tuple[DataLoader, DataLoader, DataLoader]:
    """Train, val and test loaders. The training images are drawn, and augmented, as functions of
    (seed, epoch, position) only (:mod:`xbarflow.data.draws`): a resumed run reads the same batches."""
    workers = typed.dataset.num_workers
    train_loader = ResumableLoader(SeededDraws(data.train, typed.seed), batch_size=typed.training.batch_size,
                                   sampler=EpochShuffleSampler(len(data.train), typed.seed), num_workers=workers)
    val_loader = DataLoader(data.val, batch_size=typed.eval.batch_size, num_workers=workers)
    test_loader = DataLoader(data.test, batch_size=typed.eval.batch_size, num_workers=workers)
    return train_loader, val_loader, test_loader


def build_trainer(typed: Config, cfg: DictConfig, run: "tracking.TrackedRun"):
    """A Lightning Trainer that logs to the run and checkpoints into its folder every epoch, and
    within an epoch as ``trainer.checkpoint_every_n_steps`` / ``_minutes`` ask."""
    import hydra.utils
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from .training.checkpoints import InterruptedCheckpoint, MidEpochCheckpoint

    tc = typed.trainer
    logger = tracking.record_logger(run.record)  # training metrics survive a lost tracking server
    callbacks = [
        # save_top_k=1 without a monitor keeps the newest epoch; Lightning writes last.ckpt only
        # alongside a top-k save. No version counter: last.ckpt is also written within an epoch
        # (MidEpochCheckpoint), and with the counter the epoch's end would go to last-v1.ckpt
        # beside it, leaving resume=true the older, mid-epoch state
        ModelCheckpoint(dirpath=run.ckpt_dir, filename="epoch{epoch}", auto_insert_metric_name=False, save_last=True,
                        save_top_k=1, every_n_epochs=1, enable_version_counter=False),
        # SIGTERM (SLURM pre-emption) and Ctrl-C: keep the interrupted state for inspection (not
        # Lightning's OnExceptionCheckpoint: with it, fit(ckpt_path=None) resumes from the folder's
        # newest checkpoint; resuming is resume=true's, from run.resume_ckpt)
        InterruptedCheckpoint(dirpath=str(run.ckpt_dir), filename="interrupted"),
        MidEpochCheckpoint(str(run.ckpt_dir / "last.ckpt"), every_n_steps=tc.checkpoint_every_n_steps,
                           every_minutes=tc.checkpoint_every_minutes),
        *[hydra.utils.instantiate(c) for c in cfg.trainer.callbacks],
    ]
    return pl.Trainer(
        accelerator=tc.accelerator, devices=tc.devices, strategy=tc.strategy, num_nodes=tc.num_nodes,
        precision=tc.precision, max_epochs=typed.training.epochs,
        limit_train_batches=_limit(tc.limit_train_batches), limit_val_batches=_limit(tc.limit_val_batches),
        log_every_n_steps=tc.log_every_n_steps, enable_progress_bar=tc.enable_progress_bar,
        deterministic=tc.deterministic, logger=logger, default_root_dir=str(run.output_dir),
        enable_model_summary=False, callbacks=callbacks,
    )


def train(typed: Config, cfg: DictConfig, model: torch.nn.Module, data: DataSplits,
          run: "tracking.TrackedRun") -> CrossbarClassifier:
    """Fit the model in its training mode (resuming from the run's last checkpoint when asked)."""
    module = CrossbarClassifier(model, typed.training, data.num_classes,
                                lambda seed: make_chip(typed, seed, train=True), seed=typed.seed)
    train_loader, val_loader, _ = data_loaders(typed, data)
    with warnings.catch_warnings():
        if run.resume_ckpt is not None:
            check_resume_checkpoint(run.resume_ckpt)
            # resuming writes into the folder holding last.ckpt on purpose; in a fresh run the
            # warning (older checkpoints beside the new ones) stays
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        # weights_only: Lightning's default unpickles the checkpoint, which can run code
        with sigterm_left_to_lightning():
            build_trainer(typed, cfg, run).fit(module, train_loader, val_loader, ckpt_path=run.resume_ckpt,
                                               weights_only=True)
    return module


def check_resume_checkpoint(path: str) -> None:
    """Refuse, in one line, a checkpoint that ``resume=true`` cannot read without unpickling.

    A run's checkpoints hold tensors and plain containers only, so they load with
    ``torch.load(weights_only=True)``; a file that needs anything else (a tampered or foreign
    ``last.ckpt``) is refused before Lightning reads it, and nothing in it runs.

    Raises:
        ConfigError: naming the file and the first line of the loader's reason.
    """
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"resume=true: {path} is not a checkpoint of plain tensors and containers, "
                          f"refused without unpickling ({reason})") from None


def load_source(typed: Config, cfg: DictConfig, model: torch.nn.Module,
                start_dir: Optional[str] = None) -> Optional[source_module.Source]:
    """``mode=evaluate``: the weights of ``source`` loaded into the model; with ``training.reuse``,
    those of an earlier run that trained the same standard network (else None: train).

    Raises:
        ConfigError: one line, for a missing source or one trained for another model or dataset.
    """
    uri = tracking.tracking_uri(typed.logger, start_dir)
    if typed.mode != "evaluate":
        return source_module.find_trained(typed, cfg, model, uri)
    return source_module.prepare(cfg, typed, model, uri, start_dir)


def calibrate_periphery(typed: Config, model: torch.nn.Module, data: DataSplits, device) -> None:
    """Calibrate the converters of the trained network, as a deployed chip would after programming.

    ``xbar.calibration_samples`` training images (a seeded draw from the training split, never
    the test split) on the nominal array set every calibrated DAC scale and ADC range; learned
    ADC ranges keep what training gave them.
    """
    images = data.calibration_images
    n = min(typed.xbar.calibration_samples, len(images))
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(typed.seed))[:n]
    x = torch.stack([images[int(i)][0] for i in pick]).to(device)
    model.eval()
    calibrate_converters(model, x, learned=False)


def evaluate_on_test(typed: Config, model: torch.nn.Module, data: DataSplits,
                     device) -> Tuple[Dict[str, float], List[float]]:
    """Section-8 metrics on the test split: software, nominal crossbar, ``eval.n_chips`` chips.

    ``eval.compensation`` is fitted on ``eval.calibration_samples`` images of the training split,
    then ``eval.bn_recalibration`` re-estimates BatchNorm on ``eval.bn_samples`` of them.
    """
    _, _, test_loader = data_loaders(typed, data)
    return _evaluate(typed, model, data, device, test_loader, "test/")


def evaluate_on_val(typed: Config, model: torch.nn.Module, data: DataSplits, device) -> Dict[str, float]:
    """The section-8 metrics on the validation split (``val/...``): what a hyperparameter search may see,
    with the same compensation and BatchNorm re-estimation as the test split."""
    _, val_loader, _ = data_loaders(typed, data)
    return _evaluate(typed, model, data, device, val_loader, "val/")[0]


def _evaluate(typed: Config, model: torch.nn.Module, data: DataSplits, device, loader: DataLoader,
              prefix: str) -> Tuple[Dict[str, float], List[float]]:
    def training_images(n: int) -> DataLoader:
        return calibration_loader(data.calibration_images, n, seed=typed.seed, batch_size=typed.eval.batch_size,
                                  num_workers=typed.dataset.num_workers)

    return evaluate(model, loader, num_classes=data.num_classes, n_chips=typed.eval.n_chips,
                    chip_seed=typed.eval.chip_seed, make_chip=lambda seed: make_chip(typed, seed), device=device,
                    prefix=prefix, times=typed.eval.times, compensation=typed.eval.compensation,
                    calibration_loader=training_images(typed.eval.calibration_samples),
                    bn_recalibration=typed.eval.bn_recalibration, bn_loader=training_images(typed.eval.bn_samples))


def log_results(run: "tracking.TrackedRun", typed: Config, model: torch.nn.Module,
                metrics: Dict[str, float], per_chip: List[float], n_test: int) -> None:
    """Metrics, the per-chip figure and the trained weights into the run; a summary line on stdout."""
    record = run.record
    # the test-set size sets every accuracy's standard error (model note, section 9)
    record.log_metrics({**metrics, "test/n_images": float(n_test)})
    for i, acc in enumerate(per_chip):
        record.log_metrics({"test/acc_xbar_chip": acc}, step=i)
    tracking.log_figure(record, _chip_figure(per_chip, metrics), "chip_accuracy.png")
    ranges = converter_ranges(model)
    if ranges:
        record.log_text(json.dumps(ranges, indent=1), "converter_ranges.json")
        record.log_metrics(_range_metrics(ranges))
        if any("adc_range" in r for r in ranges.values()):
            tracking.log_figure(record, _adc_range_figure(ranges), "adc_ranges.png")
    if typed.logger.log_weights:
        path = run.output_dir / "weights.pt"
        torch.save(model_state(model), path)
        record.log_artifact(str(path))
    print(" ".join(f"{k}={v:.2f}" for k, v in metrics.items()), flush=True)


def measure_energy_per_image(typed: Config, model: torch.nn.Module, data: DataSplits,
                             device) -> Optional[EnergyReport]:
    """Energy and latency per image of the crossbar layers (model note, section 10), or None
    (``energy.enabled`` off, or no layer on crossbars).

    One pass of the first ``energy.samples`` test images through the nominal crossbar gives every
    layer's row-voltage statistics; the array energy is the exact circuit's (``xbarflow.nn.energy``).
    It solves each layer's nominal tiles once, for their admittance and the effective weight the
    pass goes through; the layers keep that weight where it is bitwise their own, so the
    evaluation's nominal pass that follows costs no second solve (and gives the same bits as
    without this step). The column gain's multiplication is counted where the gains are not 1, or
    for every layer when ``eval.compensation`` fits gains on the chip.
    """
    if not typed.energy.enabled or not any(True for _ in xbar_layers(model)):
        return None
    n = min(typed.energy.samples, len(data.test))
    loader = DataLoader(Subset(data.test, range(n)), batch_size=typed.eval.batch_size,
                        num_workers=typed.dataset.num_workers)
    return measure_energy(model, (x.to(device) for x, _ in loader), energy_params(typed),
                          column_gain=True if typed.eval.compensation != "none" else None)


def log_energy(run: "tracking.TrackedRun", report: Optional[EnergyReport]) -> None:
    """``energy/*_pj_per_image``, ``latency/ns_per_image``, ``energy/tops_per_w`` and the per-layer
    table (energy.md, energy.json) into the run; a summary line on stdout."""
    if report is None:
        return
    run.record.log_metrics(report.metrics())
    run.record.log_text(report.to_markdown(), "energy.md")
    run.record.log_text(report.to_json(), "energy.json")
    m = report.metrics()
    print(f"energy {m['energy/total_pj_per_image']:.4g} pJ/image ({report.dominant()} dominates), "
          f"latency {m['latency/ns_per_image']:.4g} ns/image, {m['energy/tops_per_w']:.3g} TOPS/W", flush=True)


# ------------------------------------------------------------------ helpers
def model_state(model) -> Dict[str, torch.Tensor]:
    """The software weights (the values to program) and digital column gains; `training.init_from` loads them."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


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


def _range_metrics(ranges: dict) -> Dict[str, float]:
    """``adc_range/<layer>/{min,median,max}`` (fractions of a tile's largest current) and
    ``dac_scale/<layer>`` of the calibrated DACs."""
    out = {}
    for name, r in ranges.items():
        if "adc_range" in r:
            t = torch.tensor(r["adc_range"]).flatten()
            out.update({f"adc_range/{name}/min": float(t.min()), f"adc_range/{name}/median": float(t.median()),
                        f"adc_range/{name}/max": float(t.max())})
        if r["dac_range_mode"] == "calibrated":
            out[f"dac_scale/{name}"] = r["dac_scale"]
    return out


def _adc_range_figure(ranges: dict):
    """Every converter's full scale, layer by layer (fraction of a tile's largest current, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in ranges.items() if "adc_range" in r]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 3.6))
    for i, name in enumerate(names):
        values = torch.tensor(ranges[name]["adc_range"]).flatten()
        jitter = (torch.rand(len(values), generator=torch.Generator().manual_seed(i)) - 0.5) * 0.3
        ax.scatter(i + jitter, values, s=6, alpha=0.5)
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("ADC full scale / tile's largest current")
    ax.set_title(f"ADC ranges ({ranges[names[0]]['adc_range_mode']}, {ranges[names[0]]['adc_bits']} bits)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _limit(v):
    """Lightning's convention: a float <= 1 is a fraction of the batches, an int a count."""
    if v is None:
        return None
    return float(v) if v <= 1.0 else int(v)
