"""Evaluation-only runs: the trained weights of another run, on this run's hardware.

``mode=evaluate source=<run id | runs:/<id>/<artifact> | weights file>`` loads the source's
weights instead of training. The source is resolved and checked before any MLflow run is
opened, so a source that does not exist or was trained for another model or dataset is
refused with one line and leaves no run behind.

Nothing a source holds runs code: weights are read as tensors only (``weights.safetensors``,
or ``torch.load(weights_only=True)``), a logged model through its card and weights
(:mod:`xbarflow.logged_model`), and a model artifact that is a pickle (an MLflow PyTorch model,
as xbarflow logged before) is never unpickled: its run's ``weights.pt`` is read instead, or the
source is refused. ``_target_`` values in the source's params or card are checked against the
trusted modules (:mod:`xbarflow.targets`); they are compared with this run's config, never called.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError
from .logged_model import PickledModel
from .nn.calibration import calibrate_column_gains, calibrate_converters
from .nn.convert import set_mode
from .nn.layers import CROSSBAR_ONLY_PARAMS

KEY = "source"
RUN_ID = re.compile(r"[0-9a-f]{32}")
# a source ending so is a file, never a run id
WEIGHTS_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")
# What the weights must have been trained for: the network's shape and the data split (a
# source trained on another split of the same images has seen this run's test images).
MUST_MATCH = ("model.", "dataset.name", "dataset.split_seed", "dataset.val_fraction", "dataset.test_fraction",
              "dataset.subset")
# The crossbar a column gain was learned for; another one gets least-squares gains.
CROSSBAR_KEYS = ("hardware.", "xbar.", "nonideality.")


@dataclass
class Source:
    """Trained weights and what is known of how they were trained.

    Attributes:
        spec: the ``source`` value as given.
        state: the state_dict (software weights, column gains, converter ranges).
        run_id: the source's MLflow run, or None for a weights file.
        params: the source run's parameters (flattened config), empty for a weights file.
        training: the source's ``training.mode``, or None when unknown.
        converters_loaded: whether every converter range of the model came from the source.
    """

    spec: str
    state: Dict[str, torch.Tensor]
    run_id: Optional[str] = None
    params: Dict[str, str] = field(default_factory=dict)
    training: Optional[str] = None
    converters_loaded: bool = True


def _fail(spec: str, why: str) -> ConfigError:
    return ConfigError(f"{KEY}={spec}: {why}")


def _as_state(obj, spec: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # a Lightning checkpoint
        obj = {k[len("model."):]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise _fail(spec, f"not a state_dict of tensors (got {type(obj).__name__})")
    return {k: v.detach().cpu() for k, v in obj.items()}


PICKLE_REFUSED = ("the run has no weights.pt and its model artifact is a pickle, which xbarflow does not load "
                  "(it could run code); log the weights with this version")


def read_weights_file(path: Path, key: str, value: str):
    """Tensors from a weights file: safetensors, or torch's weights-only unpickler (which refuses
    anything but tensors and plain containers, so a pickled object's code never runs).

    ``key`` and ``value`` name the setting that gave the file (``source``, ``training.init_from``)
    in the one-line error.

    Raises:
        ConfigError: ``<key>=<value>: <why>``, for a file that is not a weights file of tensors.
    """
    def fail(why: str) -> ConfigError:
        return ConfigError(f"{key}={value}: {why}")

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise fail(f"not a safetensors file ({reason})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Weights only load failed" in str(e):
            raise fail("a pickle holding more than tensors (a pickled model?), which xbarflow does not load "
                       "(it could run code); give a state_dict (weights.pt, *.safetensors) or a model folder "
                       "logged by this version") from None
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise fail(f"not a PyTorch checkpoint or state_dict ({reason})") from None


def _load_file(path: Path, spec: str):
    return read_weights_file(path, KEY, spec)


def _check_targets(params: Dict[str, str], spec: str, where: str, trusted, exact) -> None:
    """Refuse a source whose recorded model or dataset names an untrusted ``_target_``."""
    from .targets import check_target

    for key in sorted(params):
        if key.startswith(("model.", "dataset.")) and key.endswith("_target_"):
            try:
                check_target(params[key], key, where, trusted, exact)
            except ConfigError as e:
                raise _fail(spec, str(e)) from None


def _from_folder(folder: Path, spec: str, trusted, exact) -> Source:
    """A model folder logged by this version (card and weights); a pickled MLflow model is refused."""
    from .logged_model import ModelLoadError, card_params, read_folder

    try:
        card, state = read_folder(folder)
    except ModelLoadError as e:
        raise _fail(spec, str(e)) from None
    params = card_params(card)
    _check_targets(params, spec, "the model card", trusted, exact)
    return Source(spec, _as_state(state, spec), None, params, params.get("training.mode"))


def _from_logged_model(run_id: str, tracking_uri: str, spec: str) -> Dict[str, torch.Tensor]:
    """The weights of the run's logged model, downloaded as card and weights only (never its pickle).

    Raises:
        PickledModel: the model artifact is an MLflow PyTorch model (a pickle).
        ConfigError: no readable model.
    """
    from .logged_model import MODEL_NAME, ModelLoadError, fetch, read_folder

    with tempfile.TemporaryDirectory() as tmp:
        try:
            _, state = read_folder(fetch(f"runs:/{run_id}/{MODEL_NAME}", Path(tmp), tracking_uri))
        except PickledModel:
            raise
        except ModelLoadError as e:
            raise _fail(spec, f"no loadable logged model ({e})") from None
    return _as_state(state, spec)


def looks_like_path(spec: str) -> bool:
    """Whether ``source`` names a file (a weights suffix, a folder separator, ``.`` or ``~`` first)
    rather than a run: such a source that does not exist is a missing file."""
    return (Path(spec).suffix.lower() in WEIGHTS_SUFFIXES or "/" in spec or os.sep in spec
            or spec.startswith((".", "~")))


def resolve_source(spec: str, tracking_uri: str, start_dir: Optional[str] = None, trusted: Sequence[str] = (),
                   exact: Sequence[str] = ()) -> Source:
    """Find the source's weights: a weights file, a model folder, a run id (its ``weights.pt``,
    else its logged model) or ``runs:/<run id>/<artifact>`` (``model``: the logged model, or the
    run's ``weights.pt`` when that model is a pickle of older xbarflow; else a weights file).

    Args:
        trusted, exact: the modules and targets a stored ``_target_`` may name
            (:func:`xbarflow.targets.check_target`).

    Raises:
        ConfigError: one line, when the source cannot be found or read, or is a pickle.
    """
    file = Path(spec)
    if not file.is_absolute() and start_dir:
        file = Path(start_dir) / file
    if not spec.startswith("runs:/") and file.is_dir():
        return _from_folder(file, spec, trusted, exact)
    if not spec.startswith("runs:/") and file.is_file():
        return Source(spec, _as_state(_load_file(file, spec), spec))
    if spec.startswith("runs:/"):
        run_id, _, artifact = spec[len("runs:/"):].partition("/")
        artifact = artifact.strip("/") or "model"
    elif RUN_ID.fullmatch(spec):
        run_id, artifact = spec, ""
    elif looks_like_path(spec):
        raise _fail(spec, "no such file")
    else:
        raise _fail(spec, "not a weights file, a model folder, an MLflow run id (32 hex digits) or a "
                          "runs:/<run id>/<artifact> URI")
    from .tracking import client_for

    # MLflow's download progress bar would precede a refusal's one line on stderr
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = client_for(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception:
        raise _fail(spec, f"no run {run_id} in {tracking_uri}") from None
    if run.info.status != "FINISHED":
        raise _fail(spec, f"run {run_id} is {run.info.status}, not FINISHED")
    _check_targets(dict(run.data.params), spec, f"params of run {run_id}", trusted, exact)
    names = {a.path for a in client.list_artifacts(run_id)}
    if not artifact:
        artifact = "weights.pt" if "weights.pt" in names else "model"
    state = None
    if artifact == "model":
        try:
            state = _from_logged_model(run_id, tracking_uri, spec)
        except PickledModel:  # logged by older xbarflow: its weights.pt, if it has one, is plain tensors
            if "weights.pt" not in names:
                raise _fail(spec, PICKLE_REFUSED) from None
            print(f"{KEY}={spec}: the logged model is a pickle (older xbarflow), not loaded; "
                  f"reading the run's weights.pt", flush=True)
            artifact = "weights.pt"
    if state is None:
        if artifact not in names:
            raise _fail(spec, f"run {run_id} has no artifact {artifact} (it has {', '.join(sorted(names)) or 'none'})")
        with tempfile.TemporaryDirectory() as tmp:
            state = _as_state(_load_file(Path(client.download_artifacts(run_id, artifact, tmp)), spec), spec)
    return Source(spec, state, run_id, dict(run.data.params), run.data.params.get("training.mode"))


def _flat(cfg: DictConfig) -> Dict[str, str]:
    from .tracking import flatten

    return flatten(OmegaConf.to_container(cfg, resolve=True))


def check_compatible(source: Source, cfg: DictConfig) -> None:
    """Refuse a source trained for another model or dataset (split included).

    Raises:
        ConfigError: one line naming the first differing key, e.g.
        ``source=<id>: trained for model.hidden=[500], not model.hidden=[50]``.
    """
    here = _flat(cfg)
    for key in sorted(source.params):
        if key.startswith(MUST_MATCH) and key in here and source.params[key] != here[key]:
            raise _fail(source.spec, f"trained for {key}={source.params[key]}, not {key}={here[key]} "
                                     f"(evaluate it with the source's model and dataset)")


def fitting_state(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` without the crossbar-only entries whose shape differs from the model's.

    Converter ranges and column gains are per tile or per column of the crossbar they were
    trained on; on another tile size they do not apply, and calibration sets them again.
    """
    own = model.state_dict()
    return {k: v for k, v in state.items()
            if not (k.endswith(CROSSBAR_ONLY_PARAMS) and k in own and own[k].shape != v.shape)}


def load_source_weights(model: torch.nn.Module, source: Source) -> bool:
    """Load the source's weights into ``model``.

    Crossbar-only parameters of another shape (an ADC range per tile of another tile size)
    or absent are left at their initial values for calibration to set.

    Returns:
        Whether every converter range came from the source.

    Raises:
        ConfigError: one line, when the software weights do not fit the model.
    """
    own = model.state_dict()
    state = fitting_state(model, source.state)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise _fail(source.spec, f"does not fit the model ({str(e).splitlines()[-1].strip()[:200]})") from None
    left = [k for k in missing if not k.endswith(CROSSBAR_ONLY_PARAMS)]
    unexpected = [k for k in unexpected if not k.endswith(CROSSBAR_ONLY_PARAMS)]
    if unexpected or left:
        raise _fail(source.spec, f"does not fit the model (missing {left[:5]}, unexpected {unexpected[:5]})")
    converters = [k for k in own if k.endswith(("log_adc_range", "dac_scale"))]
    return all(k in state for k in converters)


def _trust(typed):
    """The modules (``trusted_targets``) and the targets (the user's own model and dataset) that a
    source's stored ``_target_`` may name."""
    from .targets import own_targets

    return list(typed.trusted_targets), own_targets(typed)


def prepare(cfg: DictConfig, typed, model: torch.nn.Module, tracking_uri: str,
            start_dir: Optional[str] = None) -> Source:
    """Resolve, check and load ``typed.source`` into ``model`` (before any run is opened).

    Raises:
        ConfigError: one line, for a missing, unreadable or mismatched source.
    """
    source = resolve_source(typed.source, tracking_uri, start_dir, *_trust(typed))
    check_compatible(source, cfg)
    source.converters_loaded = load_source_weights(model, source)
    if typed.eval.source_periphery == "keep" and not source.converters_loaded and _learned_gains(source):
        raise ConfigError(f"eval.source_periphery=keep: the converter ranges and column gains of {source.spec} do "
                          "not fit this crossbar (another tile size, or none logged); use eval.source_periphery=auto")
    return source


TRAIN_KEY_TAG = "train_key"
# What standard training depends on: the network, the data, the recipe and the seed; not the
# crossbar (hardware, xbar, nonideality), which it never sees.
TRAINING_INPUTS = ("model.", "dataset.", "training.", "seed", "trainer.limit_train_batches",
                   "trainer.limit_val_batches", "trainer.precision", "trainer.deterministic")


def train_key(cfg: DictConfig) -> str:
    """A digest of everything standard training depends on (``training.reuse`` aside)."""
    import hashlib
    import json

    inputs = {k: v for k, v in _flat(cfg).items() if k.startswith(TRAINING_INPUTS) and k != "training.reuse"}
    return hashlib.sha1(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def find_trained(typed, cfg: DictConfig, model: torch.nn.Module, tracking_uri: str) -> Optional[Source]:
    """``training.reuse`` with standard training: the weights of a FINISHED run of the same
    experiment trained the same way (:func:`train_key`), loaded into ``model``; None when there
    is none (or it cannot be read), and the run trains."""
    if not (typed.training.reuse and typed.training.mode == "standard" and typed.mode == "train"):
        return None
    from .tracking import client_for

    client = client_for(tracking_uri)
    exp = client.get_experiment_by_name(typed.logger.experiment_name)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.{TRAIN_KEY_TAG} = '{train_key(cfg)}' "
                              "and attributes.status = 'FINISHED'", max_results=1,
                              order_by=["attributes.start_time ASC"])
    if not runs:
        return None
    try:
        source = resolve_source(runs[0].info.run_id, tracking_uri, None, *_trust(typed))
        source.converters_loaded = load_source_weights(model, source)
    except ConfigError:
        return None
    return source


def mark_trained(run, cfg: DictConfig) -> None:
    """Tag a run that trained with its :func:`train_key`, so that ``training.reuse`` finds it."""
    run.record.set_tag(TRAIN_KEY_TAG, train_key(cfg))  # through the record: survives a lost store


def _learned_gains(source: Source) -> bool:
    """Whether the source's column gains were learned (not all unity)."""
    gains = [v for k, v in source.state.items() if k.endswith("log_column_gain")]
    return any(bool(g.abs().max() > 0) for g in gains)


def column_gain_policy(source: Source, cfg: DictConfig) -> str:
    """``source`` (keep the source's gains: same crossbar, unity gains, or ``eval.source_periphery=keep``),
    or ``recalibrated`` (gains learned for another or an unknown crossbar: least squares on this one's
    nominal array, and the learned ADC ranges restarted from a calibration)."""
    if not _learned_gains(source):
        return "source"  # unity gains (standard training): nothing was learned for any crossbar
    if cfg.get("eval", {}).get("source_periphery", "auto") == "keep":
        return "source"
    if not source.params:
        return "recalibrated"
    return "source" if not crossbar_differences(source, cfg) else "recalibrated"


def crossbar_differences(source: Source, cfg: DictConfig) -> List[str]:
    """The ``hardware.``/``xbar.``/``nonideality.`` keys whose value here differs from the source run's
    (all of them when the source logged no parameters: a weights file). A key the source did not log
    was added after it ran: that run had the key's default behaviour, so it is compared with the
    schema's default."""
    here = _flat(cfg)
    if not source.params:
        return sorted(k for k in here if k.startswith(CROSSBAR_KEYS))
    defaults = _schema_defaults()
    return sorted(k for k, v in here.items()
                  if k.startswith(CROSSBAR_KEYS) and source.params.get(k, defaults.get(k)) != v)


def _schema_defaults() -> Dict[str, str]:
    """Every key of the config schema with its default, flattened as runs log their parameters."""
    from .config import Config
    from .tracking import flatten

    return flatten(OmegaConf.to_container(OmegaConf.structured(Config), resolve=True))


def evaluation_device(typed) -> torch.device:
    """Where an evaluation-only run computes: the first GPU when the trainer may use one."""
    if typed.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def deploy(run, typed, cfg: DictConfig, model: torch.nn.Module, data, source: Source) -> torch.device:
    """The training step of an evaluation-only run (or of a reused standard training): tag the
    run with its source and set the periphery the source did not bring for this crossbar.

    Converter ranges not taken from the source (another tile size, or ranges it never had) are
    calibrated, learned ones included, on ``xbar.calibration_samples`` training images; column
    gains learned for another crossbar are refitted there by least squares
    (:func:`column_gain_policy`).

    Returns:
        The device the model is on.
    """
    device = evaluation_device(typed)
    model.to(device).eval()
    policy = column_gain_policy(source, cfg)
    if typed.mode == "evaluate":
        tags = {"mode": "evaluate", "source": source.spec, "column_gains": policy}
        if source.run_id:
            tags["source_run"] = source.run_id
    else:  # training.reuse: the same standard training as the source's, not repeated
        tags = {"mode": "reused", "reused_from": source.spec, "column_gains": policy}
    if source.training:
        tags["training"] = source.training  # what the weights are: reports group runs by it
    for k, v in tags.items():
        run.record.set_tag(k, v)
    if source.converters_loaded and policy == "source":
        return device
    if policy == "recalibrated" and source.params:
        # a user switching one effect off expects the same chip without it, not a re-calibrated one
        keys = crossbar_differences(source, cfg)
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        print(f"note: {shown} differ from the source run's; its learned ADC ranges and column gains are "
              "recalibrated on this crossbar (eval.source_periphery=keep holds them)", flush=True)
    images = data.calibration_images
    n = min(typed.xbar.calibration_samples, len(images))
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(typed.seed))[:n]
    x = torch.stack([images[int(i)][0] for i in pick]).to(device)
    with torch.no_grad():
        if not source.converters_loaded or policy == "recalibrated":
            calibrate_converters(model, x, learned=True)
        if policy == "recalibrated":
            set_mode(model, "nominal")
            calibrate_column_gains(model, x)
            set_mode(model, "ideal")
    return device
