"""The trained network as a logged model that loads without pickle: ``xbarflow.load_model("runs:/<id>/model")``.

What is logged (``runs:/<run id>/model``, an MLflow model of our own flavor ``xbarflow``):

- ``weights.safetensors``: the converted network's state_dict (software weights, converter
  ranges, column gains), tensors only. The safetensors format is a JSON header and raw bytes:
  reading it can run no code, whoever wrote the file.
- ``card.json``: the model card, what the network is and what it was trained for: the resolved
  ``model`` config (its ``_target_`` and arguments), the input shape and number of classes, and
  the ``hardware``, ``xbar``, ``nonideality``, ``training`` and ``dataset`` sections, plus the
  card's tags (also on the MLflow logged model, with a description).
- ``MLmodel`` (flavor ``xbarflow``, signature, input example), written by MLflow.

:func:`load_model` rebuilds the network from the card (``model._target_`` instantiated only when
trusted: :mod:`xbarflow.targets`), converts it to crossbar layers for the card's crossbar and
loads the weights, strictly. ``set_mode(model, "nominal")`` then runs it on that crossbar.

Why a flavor of our own, and not:

- ``mlflow.pytorch`` with ``serialization_format="pickle"`` (what xbarflow logged before): loading
  unpickles, which runs whatever the file holds (issue 27). Such models are refused; their run's
  ``weights.pt`` is read instead when it has one.
- ``mlflow.pytorch`` with ``pt2`` (``torch.export``): checked with mlflow 3.17.2 and torch 2.14.1,
  exporting the converted FCN in ``ideal`` mode gives a ``GraphModule`` with no crossbar layer left
  (0 ``XbarLinear``; the parameters survive as graph constants such as ``1.log_column_gain``, but
  ``set_mode`` has nothing to switch): a trace of the software network only. Exporting in ``nominal``
  mode fails (``GuardOnDataDependentSymNode``: the circuit reads a tensor's value with ``.item()``).
  So pt2 still drops the crossbar layers, and its archive is unpickled with torch's weights-only
  unpickler in any case.
- MLflow's models-from-code: loading executes the Python file stored in the artifact, the very
  thing to avoid with a colleague's model.
- plain run artifacts: no MLflow logged model (no model page, no card as searchable tags, no
  signature). A flavor keeps all of that, while its content stays data that our loader reads
  itself (JSON, YAML with ``safe_load``, safetensors) without MLflow's flavor dispatch.

There is no ``pyfunc`` flavor: ``mlflow.pyfunc.load_model`` would import the loader module that the
artifact's MLmodel names. Loading needs ``xbarflow`` installed (``make install``).
"""
from __future__ import annotations

import copy
import json
import re
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .config import ConfigError
from .nn.convert import set_mode, xbar_layers

MODEL_NAME = "model"
FLAVOR = "xbarflow"
FORMAT = "xbarflow-model/1"
CARD_FILE = "card.json"
WEIGHTS_FILE = "weights.safetensors"
# the config sections the card keeps: what the network is (model), what rebuilds its crossbar layers
# (hardware, xbar, nonideality, training.mode through the ADC range mode) and what it was trained on
SECTIONS = ("model", "dataset", "hardware", "xbar", "nonideality", "training")
RUN_ID = re.compile(r"[0-9a-f]{32}")


class ModelLoadError(ConfigError):
    """A logged model that xbarflow does not load; the message is one line."""


class PickledModel(ModelLoadError):
    """An MLflow PyTorch model saved as a pickle (logged by xbarflow before issue 27, or by anyone)."""


PICKLE_WHY = ("an MLflow PyTorch model saved as a pickle, which xbarflow does not load (it could run code)")


def _version() -> str:
    """xbarflow's version, from its installed metadata (not from the package: ``xbarflow.load_model``
    imports this module, which must not import the package back)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xbarflow")
    except PackageNotFoundError:
        return "unknown"


def portable_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A CPU copy of ``model`` in ``ideal`` mode with no chip and no cached effective weight.

    The cache is keyed by the weight's storage address, meaningless in another process, and a
    chip holds per-device tensors as large as the arrays: neither belongs in a saved model.
    """
    saved = [(layer, layer.chip, layer._cache_key, layer._cache_weight) for layer in xbar_layers(model)]
    for layer, *_ in saved:  # detach the heavy state before copying, so it is never copied
        layer.chip, layer._cache_key, layer._cache_weight = None, None, None
    try:
        out = copy.deepcopy(model).cpu().eval()
    finally:
        for layer, chip, key, weight in saved:
            layer.chip, layer._cache_key, layer._cache_weight = chip, key, weight
    set_mode(out, "ideal")
    return out


def model_card(typed) -> Dict[str, str]:
    """Tags of the logged model: what it was trained for (hardware, crossbar, non-idealities)."""
    x, hw, ni = typed.xbar, typed.hardware, typed.nonideality
    rows, cols = x.rows or x.size, x.cols or x.size
    effects = [k for k in ("r_source", "r_sink", "r_wire", "c2c", "d2d", "levels", "stuck", "read_noise", "drift",
                           "dac", "adc") if getattr(ni, k)]
    return {
        "training": typed.training.mode, "model": str(typed.model["_target_"]).rsplit(".", 1)[-1], "dataset": typed.dataset.name,
        "hardware": hw.name, "r_on_ohm": f"{hw.r_on:g}", "r_off_ohm": f"{hw.r_off:g}",
        "crossbar": f"{rows}x{cols} tiles, r_source={x.r_source:g} ohm, r_sink={x.r_sink:g} ohm, "
                    f"r_wire={x.r_wire:g} ohm, v_read={x.v_read:g} V, mapping={x.mapping}",
        "nonideality": f"{ni.name}: {', '.join(effects) or 'none'}",
    }


def describe(card: Dict[str, str]) -> str:
    """One paragraph for the model's description (markdown)."""
    text = (f"{card['model']} trained ({card['training']}) on {card['dataset']} for {card['hardware']} "
            f"(R_on {card['r_on_ohm']} ohm, R_off {card['r_off_ohm']} ohm); crossbar: {card['crossbar']}; "
            f"non-idealities: {card['nonideality']}. Load with xbarflow.load_model('runs:/<run id>/model') "
            f"(weights and card only, no pickle); xbarflow.nn.convert.set_mode(model, 'nominal') runs it on the crossbar.")
    if card["training"] != "standard":
        # users read acc_software as the software network's accuracy; here it is not (seen in the
        # ResNet study: 44-74 % beside a 92.5 % software network)
        text += (" Its test/acc_software reads these weights in ideal arithmetic, with the digital periphery"
                 " (column gains, any BatchNorm statistics) learned alongside them: it is not the software"
                 " network's accuracy. Gaps are measured from a standard-trained run's test/acc_software.")
    return text


def card_document(typed, in_shape: Sequence[int], num_classes: int) -> Dict[str, Any]:
    """The model card written as ``card.json``: the resolved config sections, shapes and tags."""
    from .tracking import redact_config

    config = {"model": dict(typed.model)}
    config.update({k: asdict(getattr(typed, k)) for k in SECTIONS if k != "model"})
    return {"format": FORMAT, "xbarflow_version": _version(), "weights": WEIGHTS_FILE,
            "in_shape": [int(s) for s in in_shape], "num_classes": int(num_classes),
            "config": redact_config(config), "tags": model_card(typed)}


# ---------------------------------------------------------------- writing (an MLflow flavor)
def save_model(path, mlflow_model, *, model: torch.nn.Module, card: Dict[str, Any], signature=None,
               input_example=None, **_ignored) -> None:
    """Write the model folder: ``weights.safetensors``, ``card.json`` and ``MLmodel``.

    The ``save_model`` of the ``xbarflow`` flavor (``mlflow.models.Model.log`` calls it).
    """
    from mlflow.models.utils import _save_example
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    (out / CARD_FILE).write_text(json.dumps(card, indent=1, sort_keys=True))
    if signature is not None:
        mlflow_model.signature = signature
    if input_example is not None:
        _save_example(mlflow_model, input_example, str(out))
    mlflow_model.add_flavor(FLAVOR, weights=WEIGHTS_FILE, card=CARD_FILE, format=FORMAT,
                            xbarflow_version=_version(), torch_version=torch.__version__.split("+")[0])
    mlflow_model.save(str(out / "MLmodel"))


def log_model(run, typed, model: torch.nn.Module, example: torch.Tensor) -> Optional[str]:
    """Log ``model`` as ``runs:/<run id>/model`` with a signature, an input example and its card.

    Args:
        run: the :class:`~xbarflow.tracking.TrackedRun`.
        typed: the run's typed config.
        model: the trained converted network.
        example: a few input images, ``(n, *in_shape)``.

    Returns:
        The model URI, or None when the store could not take it (``weights.pt`` is kept).
    """
    import mlflow
    from mlflow.models import Model, infer_signature

    portable = portable_copy(model)
    x = example[:2].detach().cpu().float()
    with torch.no_grad():
        y = portable(x)
    signature = infer_signature(x.numpy(), y.numpy())
    tags = model_card(typed)
    card = card_document(typed, x.shape[1:], y.shape[-1])
    if run.record.offline:  # the store went away during the run: the weights are kept on disk
        print("warning: the tracking store is lost: model not logged (weights.pt is kept)", file=sys.stderr, flush=True)
        return None
    from .tracking import redacted_stdout

    try:
        with redacted_stdout():  # MLflow prints "View run ... at: <tracking URI>", credentials included
            mlflow.set_tracking_uri(run.uri)
            stored = run.client.get_run(run.run_id)
            # created here, in the run's experiment (Model.log alone would use the default experiment,
            # where runs:/<id>/model is not looked up), then filled by our flavor's save_model
            logged = mlflow.initialize_logged_model(name=MODEL_NAME, source_run_id=run.run_id, tags=tags,
                                                    params=dict(stored.data.params),
                                                    experiment_id=stored.info.experiment_id)
            Model.log(artifact_path=None, name=MODEL_NAME, flavor=sys.modules[__name__], flavor_name=FLAVOR,
                      run_id=run.run_id, model_id=logged.model_id,
                      model=portable, card=card, signature=signature, input_example=x.numpy(),
                      # there is no pyfunc flavor to serve the example with
                      validate_serving_input=False, metadata={"description": describe(tags), **tags})
            run.client.set_tag(run.run_id, "mlflow.note.content", describe(tags))
            from .sweep_view import set_model_training_kind

            set_model_training_kind(run.client, run.client.get_run(run.run_id).info.experiment_id)
    except Exception as e:  # the store failed while logging the model: the run goes on
        print(f"warning: model not logged ({type(e).__name__}); weights.pt is kept", file=sys.stderr, flush=True)
        return None
    return f"runs:/{run.run_id}/{MODEL_NAME}"


# ---------------------------------------------------------------- reading (no pickle anywhere)
def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:200]


def _flavors(mlmodel: Path) -> Dict[str, Any]:
    import yaml

    try:
        doc = yaml.safe_load(mlmodel.read_text())  # plain data: no tags that construct objects
    except Exception as e:
        raise ModelLoadError(f"unreadable MLmodel ({_first_line(e)})") from None
    flavors = doc.get("flavors") if isinstance(doc, dict) else None
    return flavors if isinstance(flavors, dict) else {}


def _refuse_other(folder: Path) -> ModelLoadError:
    """Why a folder without a card is not loaded: a pickled PyTorch model, another flavor, or nothing."""
    if not (folder / "MLmodel").is_file():
        return ModelLoadError(f"no {CARD_FILE} or MLmodel in {folder} (not a model logged by xbarflow)")
    flavors = _flavors(folder / "MLmodel")
    if "pytorch" in flavors:
        return PickledModel(PICKLE_WHY)
    return ModelLoadError(f"an MLflow model of flavor {', '.join(sorted(flavors)) or 'none'}, not {FLAVOR} "
                          f"(no {CARD_FILE})")


def read_folder(folder: Path) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The card and the weights of a model folder, read as data (JSON and safetensors).

    Raises:
        PickledModel: the folder is an MLflow PyTorch model (a pickle).
        ModelLoadError: anything else that is not a readable xbarflow model.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CARD_FILE).is_file():
        raise _refuse_other(folder)
    try:
        card = json.loads((folder / CARD_FILE).read_text())
    except Exception as e:
        raise ModelLoadError(f"unreadable {CARD_FILE} ({_first_line(e)})") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        got = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise ModelLoadError(f"{CARD_FILE} is not an xbarflow model card of format {FORMAT} (got {got!r})")
    name = card.get("weights", WEIGHTS_FILE)
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
        raise ModelLoadError(f"{CARD_FILE} names weights {name!r}, not a .safetensors file beside it")
    try:
        state = load_file(str(folder / name))
    except Exception as e:
        raise ModelLoadError(f"unreadable weights {name} ({_first_line(e)})") from None
    return card, state


def card_params(card: Dict[str, Any]) -> Dict[str, str]:
    """The card's config flattened as a run's params (``model.hidden`` -> ``[500]``)."""
    from .tracking import flatten

    config = card.get("config")
    return flatten(config) if isinstance(config, dict) else {}


def build(card: Dict[str, Any], state: Dict[str, torch.Tensor], trusted_targets: Sequence[str] = ()) -> torch.nn.Module:
    """The converted network the card describes, with ``state`` loaded (strictly), in ``ideal`` mode.

    Every ``_target_`` of the card is checked (:func:`xbarflow.targets.check_stored`) before
    anything is imported or called.

    Raises:
        ConfigError: one line (an untrusted target, a card of another version, weights that do not fit).
    """
    from omegaconf import OmegaConf

    from .builders import build_model
    from .config import Config, validate
    from .hardware import crossbar_spec, layer_selection
    from .nn.convert import convert
    from .targets import check_stored

    config = card.get("config")
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in SECTIONS):
        raise ModelLoadError(f"the model card lacks the config sections {', '.join(SECTIONS)}")
    check_stored(config, "", "the model card", trusted_targets)
    in_shape, num_classes = card.get("in_shape"), card.get("num_classes")
    if not (isinstance(in_shape, list) and len(in_shape) == 3 and all(isinstance(s, int) and s > 0 for s in in_shape)
            and isinstance(num_classes, int) and num_classes > 0):
        raise ModelLoadError(f"the model card's in_shape {in_shape!r} and num_classes {num_classes!r} "
                             f"are not three sizes and a count")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), {k: config[k] for k in SECTIONS})
    except Exception as e:
        raise ModelLoadError(f"the model card does not fit this xbarflow ({_first_line(e)})") from None
    typed = validate(cfg)
    net = build_model(typed.model, tuple(in_shape), num_classes)
    model = convert(net, crossbar_spec(typed), layers=layer_selection(typed))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ModelLoadError(f"the weights do not fit the card's model ({(lines[-1] if lines else '')[:200]})") from None
    set_mode(model, "ideal")
    return model.eval()


def _download(uri: str, name: str, dst: Path, tracking_uri: Optional[str]) -> Path:
    """One file of the model at ``uri``, as ``dst/name``."""
    import shutil

    import mlflow
    import mlflow.artifacts

    # restored as found: unset stays unset (get_tracking_uri() would give the default made absolute
    # against today's folder, and setting that would pin it, and MLFLOW_TRACKING_URI, for the process)
    before = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    if tracking_uri:  # MLflow 3 resolves runs:/<id>/model through models:/<model id> with the global URI
        mlflow.set_tracking_uri(tracking_uri)
    try:
        with tempfile.TemporaryDirectory(dir=dst) as tmp:
            got = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{name}", dst_path=tmp,
                                                      tracking_uri=tracking_uri)
            shutil.move(got, dst / name)
    finally:
        if tracking_uri:
            mlflow.set_tracking_uri(before)  # type: ignore[arg-type]  # None: unset again
    return dst / name


def fetch(uri: str, dst: Path, tracking_uri: Optional[str] = None) -> Path:
    """A local folder holding the model's card and weights (downloaded: only those two files).

    ``uri``: a folder, a run id (its ``model``), ``runs:/<id>/<name>`` or ``models:/...``.

    Raises:
        PickledModel, ModelLoadError: one line, for a model that is not an xbarflow model.
    """
    import os

    if Path(uri).is_dir():
        return Path(uri)
    if RUN_ID.fullmatch(uri):
        uri = f"runs:/{uri}/{MODEL_NAME}"
    if ":/" not in uri:
        raise ModelLoadError("not a model folder, a run id (32 hex digits), runs:/<run id>/model or models:/ URI")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    base, dst = uri.rstrip("/"), Path(dst)
    try:
        card = _download(base, CARD_FILE, dst, tracking_uri)
    except Exception:
        try:  # no card: say what it is instead (only MLmodel is read, never the model's data)
            _download(base, "MLmodel", dst, tracking_uri)
        except Exception as e:
            raise ModelLoadError(f"no logged model there ({_first_line(e)})") from None
        raise _refuse_other(dst) from None
    try:
        doc = json.loads(card.read_text())
    except Exception as e:
        raise ModelLoadError(f"unreadable {CARD_FILE} ({_first_line(e)})") from None
    name = doc.get("weights", WEIGHTS_FILE) if isinstance(doc, dict) else WEIGHTS_FILE
    if isinstance(name, str) and Path(name).name == name and name.endswith(".safetensors"):
        try:
            _download(base, name, dst, tracking_uri)
        except Exception as e:
            raise ModelLoadError(f"no weights {name} beside {CARD_FILE} ({_first_line(e)})") from None
    return dst  # read_folder checks the card and the weights' name again


def load_model(uri: str, *, tracking_uri: Optional[str] = None, trusted_targets: Sequence[str] = ()) -> torch.nn.Module:
    """Load a model logged by xbarflow: weights and model card only, nothing unpickled, nothing run.

    Args:
        uri: ``runs:/<run id>/model``, a run id, a ``models:/`` URI or a local model folder.
        tracking_uri: the store (default: MLflow's, ``$MLFLOW_TRACKING_URI``).
        trusted_targets: modules whose ``_target_`` the card may name besides xbarflow's and
            torchvision's models (your own network's module, e.g. ``["my_package.models"]``).

    Returns:
        The converted network on the CPU, in ``ideal`` mode and eval; ``set_mode(model, "nominal")``
        runs it on the crossbar it was trained for.

    Raises:
        ConfigError: one line starting with ``uri``: an untrusted target, a pickled model, no model there.
    """
    with tempfile.TemporaryDirectory() as tmp:
        try:
            card, state = read_folder(fetch(uri, Path(tmp), tracking_uri))
        except ModelLoadError as e:
            raise type(e)(f"{uri}: {e}") from None
    try:
        return build(card, state, trusted_targets)
    except ConfigError as e:  # an untrusted target, a card of another version, weights that do not fit
        raise type(e)(f"{uri}: {e}") from None
