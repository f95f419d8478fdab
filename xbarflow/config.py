"""Typed schema of every config group, registered in Hydra's ConfigStore.

OmegaConf checks types and rejects unknown keys (struct mode); the ranges are
checked here, after composition, by :func:`validate`, which names the offending
key in one line (e.g. ``xbar.r_source must be >= 0 (got -5.0)``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

# defined in xbarflow.errors (builders and datasets raise them too, without importing this module);
# re-exported here, where the entry points and tests have always imported them from
from .errors import ConfigError
from .errors import DatasetUnavailable as DatasetUnavailable


def init_from_file(path: str, start_dir: Optional[str] = None) -> Path:
    """The file ``training.init_from`` names, a relative path taken from the directory the run
    started in (``start_dir``).

    Raises:
        ConfigError: one line, when there is no such file.
    """
    file = Path(path)
    if not file.is_absolute() and start_dir:
        file = Path(start_dir) / file
    if not file.is_file():
        raise ConfigError(f"training.init_from={path}: no such file")
    return file


def _rng(ge=None, gt=None, le=None, lt=None, choices=None, integer=False):
    return {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "integer": integer}


def rf(default=MISSING, **check):
    """A dataclass field with a range check in its metadata."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=_rng(**check))
    return field(default=default, metadata=_rng(**check))




@dataclass
class DatasetConfig:
    # the builder, a function (dataset config -> xbarflow.data.DataSplits); see conf/dataset/
    _target_: str = "xbarflow.data.datasets.tensor_splits"
    name: str = "mnist5k"                        # which dataset the builder reads (mnist5k, cifar10, ...)
    root: str = "data"                           # where torchvision datasets are stored/downloaded
    download: bool = True
    val_fraction: float = rf(0.1, ge=0.0, lt=1.0)
    test_fraction: float = rf(0.2, gt=0.0, lt=1.0)   # only for datasets without a test split
    split_seed: int = rf(0, ge=0, le=2**32 - 1)   # as seed
    num_workers: int = rf(0, ge=0)               # DataLoader worker processes
    subset: Optional[int] = rf(None, ge=1)       # keep only the first N training images (quick runs)
    files: Optional[str] = None                  # mnist / fashion_mnist: a folder of IDX files (*-idx?-ubyte[.gz])
    path: Optional[str] = None                   # image_folder: the folder (class sub-folders, or train/ + test/)
    image_size: Optional[int] = rf(None, ge=1)   # bring images to image_size x image_size; null = as they are
    resize_mode: str = rf("pad", choices=("pad", "resize"))   # centred zero padding, or bilinear resizing
    crop_padding: int = rf(0, ge=0)              # train augmentation: random crop after this zero padding
    hflip: bool = False                          # train augmentation: random horizontal flip
    normalize_mean: Optional[List[float]] = None   # per channel; null = images stay in [0, 1]
    normalize_std: Optional[List[float]] = rf(None, gt=0.0)
    test_subset: Optional[int] = rf(None, ge=1)  # keep only the first N test images (quick runs)


# Upper bounds of the physical values (the simulation runs in float32):
# - resistances, ohm, <= 1e12 (1 TOhm, an open circuit; memristive devices span ~1 kOhm .. 1 GOhm), and
#   device resistances >= 1 ohm (a short): beyond, conductances and currents leave float32 (1e300 ohm overflows);
# - sigmas of log-conductance (lognormal factors exp(sigma z)) <= 3.0: measured ones are <= ~1; at 3.0 a
#   6-sigma device is already exp(18) ~ 7e7 times its programmed conductance, and larger sigmas overflow.
MAX_OHM = 1e12
MAX_LOG_SIGMA = 3.0


@dataclass
class HardwareConfig:
    name: str = MISSING
    r_on: float = rf(MISSING, ge=1.0, le=MAX_OHM)    # ohm, lowest device resistance
    r_off: float = rf(MISSING, ge=1.0, le=MAX_OHM)   # ohm, highest device resistance
    c2c: float = rf(MISSING, ge=0.0, le=MAX_LOG_SIGMA)   # sigma of log chip-wide conductance factor
    d2d: float = rf(MISSING, ge=0.0, le=MAX_LOG_SIGMA)   # sigma of log per-device conductance factor
    # further device effects; defaults are "absent", so a device file may leave them out
    levels: Optional[int] = rf(None, ge=2)       # programmable conductances in [1/r_off, 1/r_on]; null = continuous
    stuck_on: float = rf(0.0, ge=0.0, le=1.0)    # probability a device is stuck at r_on
    stuck_off: float = rf(0.0, ge=0.0, le=1.0)   # probability a device is stuck at r_off
    read_noise: float = rf(0.0, ge=0.0)          # sigma of relative conductance noise per read
    drift_nu: float = rf(0.0, ge=0.0)            # mean drift exponent: G(t) = G0 (t / t0)^-nu
    drift_nu_std: float = rf(0.0, ge=0.0)        # device-to-device sigma of nu
    drift_t0: float = rf(1.0, gt=0.0)            # seconds; drift starts at t0
    # seconds, read pulse: how long a read applies the row voltages (energy: t_read V^T Y V; latency);
    # each device file gives its technology's value and source; the default is a 100 ns crossbar read
    t_read: float = rf(1.0e-7, gt=0.0, le=1.0)


@dataclass
class XbarLayersConfig:
    # glob patterns on module names (fnmatch). A selection that puts no layer on crossbars is refused
    # (a pattern that matches nothing is a typo), except include=[]: no crossbars, on purpose
    include: List[str] = field(default_factory=lambda: ["*"])
    exclude: List[str] = field(default_factory=list)            # e.g. ["fc", "*shortcut*"]; may match nothing
    first_last_digital: bool = False             # keep the first and last convertible layer digital


@dataclass
class XbarConfig:
    size: int = rf(64, ge=1)                     # side of a square tile
    rows: Optional[int] = rf(None, ge=1)         # overrides size for the word lines
    cols: Optional[int] = rf(None, ge=1)         # overrides size for the bit lines
    r_source: float = rf(1000.0, ge=0.0, le=MAX_OHM)   # ohm, row driver output resistance
    r_sink: float = rf(1000.0, ge=0.0, le=MAX_OHM)     # ohm, neuron input resistance
    r_wire: float = rf(0.0, ge=0.0, le=MAX_OHM)        # ohm, per wire segment between cells
    v_read: float = rf(0.2, gt=0.0)              # volt, read voltage of the largest input
    mapping: str = rf("separate", choices=("separate", "interleaved"))
    # weight clipping range; null = max |W| per layer. At most 1e6: a weight of 1 then uses 1e-6 of the
    # conductance window, about float32's resolution; far above it, the output scale overflows (NaN)
    w_max: Optional[float] = rf(None, gt=0.0, le=1e6)
    # peripherals (used when nonideality.dac / nonideality.adc are on)
    dac_bits: int = rf(8, ge=1, le=32)           # row DAC resolution
    # DAC full scale (input units, which are O(1): outside 1e-6..1e6 every input rounds to 0 or to
    # full scale, and at the extremes the scale leaves float32); null = max |x| per sample
    dac_range: Optional[float] = rf(None, ge=1e-6, le=1e6)
    adc_bits: int = rf(8, ge=1, le=32)           # column ADC resolution (one ADC per differential pair)
    # ADC full scale / (rows * (g_max - g_min) * v_read), the largest differential current a tile can
    # produce, so at most 1 (fixed mode; start value)
    adc_range: float = rf(0.25, gt=0.0, le=1.0)
    # how the ADC range is set: auto = learned for tech_aware, calibrated for standard training;
    # fixed = adc_range for every converter; calibrated = a percentile of the nominal array's outputs
    # on training images, per tile or column pair; learned = calibrated, then trained (LSQ gradient)
    adc_range_mode: str = rf("auto", choices=("auto", "fixed", "calibrated", "learned"))
    adc_granularity: str = rf("tile", choices=("tile", "column"))   # one range per tile, or per column pair
    adc_percentile: float = rf(99.9, gt=0.0, le=100.0)              # of |I+ - I-| over the calibration batch
    dac_range_mode: str = rf("per_sample", choices=("per_sample", "fixed", "calibrated"))
    dac_percentile: float = rf(99.9, gt=0.0, le=100.0)              # of a layer's |inputs|
    calibration_samples: int = rf(512, ge=1)                        # training images that calibrate the converters
    # program-and-verify with pair compensation: the partner of each stuck device is programmed to
    # keep the pair's difference (the chip's stuck map is found when it is programmed)
    stuck_compensation: bool = False
    # which Linear / Conv2d layers go on crossbars (the rest, and grouped convs, stay digital)
    layers: XbarLayersConfig = field(default_factory=XbarLayersConfig)


@dataclass
class NonidealityConfig:
    name: str = "paper"
    r_source: bool = True
    r_sink: bool = True
    r_wire: bool = False
    c2c: bool = True
    d2d: bool = True
    levels: bool = False                         # round programmed conductances to hardware.levels
    stuck: bool = False                          # stuck-at-on / stuck-at-off cells per chip
    read_noise: bool = False                     # fresh conductance noise at every read
    drift: bool = False                          # conductance drift, evaluated at eval.times
    dac: bool = False                            # xbar.dac_bits row DACs
    adc: bool = False                            # xbar.adc_bits column ADCs, per tile before the digital sum


@dataclass
class WeightNoiseConfig:
    """Weight noise of ``training=noise_aware``: a fresh draw per step on the crossbar layers' weights.

    After IBM aihwkit 1.1.0's ``WeightModifierParameter`` (``std_dev``, ``pdrop``;
    ``WeightModifierType.MULT_NORMAL`` / ``ADD_NORMAL``); see conf/training/noise_aware.yaml.
    """
    mult_std: float = rf(0.0, ge=0.0, le=MAX_LOG_SIGMA)   # sigma of a lognormal factor exp(sigma z) per weight (cf. d2d)
    add_std: float = rf(0.0, ge=0.0)             # std of additive Gaussian noise, in units of the layer's w_max
    pdrop: float = rf(0.0, ge=0.0, lt=1.0)       # drop connect: probability that a weight is 0 for the step


@dataclass
class TrainingConfig:
    mode: str = rf("tech_aware", choices=("standard", "noise_aware", "tech_aware"))
    optimizer: str = rf("adam", choices=("adam", "sgd"))
    lr: float = rf(1e-3, gt=0.0)
    momentum: float = rf(0.9, ge=0.0, lt=1.0)
    weight_decay: float = rf(0.0, ge=0.0)
    scheduler: str = rf("cosine", choices=("none", "cosine"))
    epochs: int = rf(10, ge=1)
    batch_size: int = rf(128, ge=1)
    resample_chip: bool = True                   # tech_aware: a fresh chip per step when variation is on
    pretrain_epochs: int = rf(0, ge=0)           # tech_aware: first epochs ideal (standard), then on the crossbar
    column_gain: bool = True                     # tech_aware: calibrate and learn a digital gain per output column
    init_from: Optional[str] = None              # a state_dict (.pt) or logged weights (.safetensors) to start from
    noise: WeightNoiseConfig = field(default_factory=WeightNoiseConfig)   # noise_aware: weight noise per step
    # standard: evaluate the weights of a finished run of the experiment that trained the same network
    # (same model, data, recipe and seed; the crossbar does not matter) instead of training it again
    reuse: bool = False


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    num_nodes: int = rf(1, ge=1)
    precision: str = "32-true"
    limit_train_batches: Optional[float] = rf(None, gt=0.0)   # <= 1: fraction; > 1: number of batches
    limit_val_batches: Optional[float] = rf(None, gt=0.0)
    log_every_n_steps: int = rf(10, ge=1)
    # last.ckpt also within an epoch (resume=true continues from that batch): every this many
    # optimizer steps, and/or when this many minutes have passed since the last save; null: off
    checkpoint_every_n_steps: Optional[int] = rf(None, ge=1)
    checkpoint_every_minutes: Optional[float] = rf(10.0, gt=0.0)
    enable_progress_bar: bool = True
    deterministic: bool = True
    # memory the crossbar simulation may use, GB; null: this machine's (or the GPU's) memory
    memory_limit_gb: Optional[float] = rf(None, gt=0.0)
    # extra Lightning callbacks, each a dict with `_target_` (instantiated by Hydra)
    callbacks: List[Any] = field(default_factory=list)


@dataclass
class LoggerConfig:
    tracking_uri: Optional[str] = None          # null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the start dir
    experiment_name: str = "xbarflow"
    log_weights: bool = True


@dataclass
class EvalConfig:
    n_chips: int = rf(5, ge=1)
    chip_seed: int = 1000                        # chip i of the evaluation has seed chip_seed + i
    batch_size: int = rf(1000, ge=1)
    # seconds after programming at which chips are also evaluated when drift is on
    # (metrics test/acc_xbar_{mean,std,min}_at_<t>s)
    times: List[float] = rf([3600.0, 86400.0, 31536000.0], gt=0.0)
    # digital periphery calibrated per chip and read time on training images (never test images):
    # none; global (one scalar per layer, to the nominal crossbar's output); column (least-squares
    # gain per output column, to the software layer's output)
    compensation: str = rf("none", choices=("none", "global", "column"))
    calibration_samples: int = rf(256, ge=1)     # training images of the calibration batch
    # BatchNorm on the chip (model note, section 11): none (the trained running statistics); chip
    # (re-estimated per chip and read time on bn_samples training images read through that chip,
    # after compensation; the trained statistics are restored afterwards)
    bn_recalibration: str = rf("none", choices=("none", "chip"))
    bn_samples: int = rf(512, ge=2)              # training images of the BatchNorm re-estimation
    # mode=evaluate: the source's learned ADC ranges and column gains. auto: kept on the crossbar
    # they were trained for, recalibrated (ranges from a calibration, gains by least squares) where
    # a hardware., xbar. or nonideality. setting differs; keep: kept on any crossbar of the same
    # tile size, as when one effect is switched off in an evaluation-only ablation
    source_periphery: str = rf("auto", choices=("auto", "keep"))


@dataclass
class EnergyConfig:
    """Energy and latency per image of the crossbar layers (model note, section 10; xbarflow/nn/energy.py).

    The converters' and the digital periphery's numbers; their sources are in conf/energy/*.yaml.
    The read pulse is the technology's (``hardware.t_read``), the ADC resolution ``xbar.adc_bits``.
    """
    enabled: bool = True                         # measure (on the nominal crossbar) and log energy/* and latency/*
    samples: int = rf(256, ge=1)                 # first test images, one pass: the layers' input statistics
    adc_fom_j: float = rf(5.0e-14, ge=0.0)       # J, ADC Walden figure of merit per conversion step (E = FOM 2^bits)
    dac_energy_j: float = rf(3.1e-12, ge=0.0)    # J, per DAC conversion (one driven row, one read)
    digital_add_j: float = rf(9.0e-13, ge=0.0)   # J, per digital addition (partial sums, bias)
    digital_mult_j: float = rf(3.7e-12, ge=0.0)  # J, per digital multiplication (column gain)
    t_conv_s: float = rf(7.8e-10, ge=0.0)        # seconds, per ADC conversion
    columns_per_adc: int = rf(1, ge=1)           # columns sharing one ADC (converted in turn: latency, not count)
    tiles: str = rf("parallel", choices=("parallel", "sequential"))   # how a layer's tiles are read


OBJECTIVES = tuple(f"{split}/acc_{what}" for split in ("test", "val")
                   for what in ("xbar_mean", "xbar_nominal", "xbar_min", "software"))


@dataclass
class Config:
    # The network: a `_target_` (a class or function) and its keyword arguments, free-form because a
    # user's own network has arbitrary ones; checked against the target's signature by
    # xbarflow.builders.check_model_config. The pipeline adds `in_shape` and `num_classes`.
    model: Dict[str, Any] = field(default_factory=dict)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    xbar: XbarConfig = field(default_factory=XbarConfig)
    nonideality: NonidealityConfig = field(default_factory=NonidealityConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    seed: int = rf(0, ge=0, le=2**32 - 1)        # NumPy's seed range (Lightning seeds NumPy with it)
    run_name: Optional[str] = None
    resume: bool = False                         # continue the run in hydra.run.dir from its last checkpoint
    # train: train, then evaluate; evaluate: evaluate the trained weights of `source` (no training)
    mode: str = rf("train", choices=("train", "evaluate"))
    source: Optional[str] = None                 # mode=evaluate: run id, runs:/<id>/<artifact> URI or weights file
    # modules whose `_target_`s a stored config (a logged model's card, a source run's params) may name,
    # besides xbarflow.models, xbarflow.data and torchvision.models: e.g. [my_package.models]. A stored
    # target is someone else's choice of a callable; anything outside these is refused (xbarflow/targets.py)
    trusted_targets: List[str] = field(default_factory=list)
    # the metric run.py returns to the sweeper (Optuna maximises it); val/* are computed only when asked
    objective: str = rf("test/acc_xbar_mean", choices=OBJECTIVES)


GROUP_SCHEMAS = {
    "dataset": DatasetConfig, "hardware": HardwareConfig, "xbar": XbarConfig,
    "nonideality": NonidealityConfig, "training": TrainingConfig, "trainer": TrainerConfig,
    "logger": LoggerConfig, "eval": EvalConfig, "energy": EnergyConfig,
}


def register_configs() -> None:
    """Register the top-level schema (``config_schema``) that ``conf/config.yaml`` extends."""
    cs = ConfigStore.instance()
    node = OmegaConf.structured(Config)
    # the model node stays open in Hydra's struct mode: `model.depth=3` may add a user model's argument
    OmegaConf.set_struct(node.model, False)
    cs.store(name="config_schema", node=node)


def _check_value(key: str, value, meta) -> None:
    if value is None or value is MISSING:
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_value(f"{key}[{i}]", v, meta)
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))} (got {value!r})")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number (got {value})")
    for op, bound, ok in (
        ("ge", meta.get("ge"), lambda v, b: v >= b), ("gt", meta.get("gt"), lambda v, b: v > b),
        ("le", meta.get("le"), lambda v, b: v <= b), ("lt", meta.get("lt"), lambda v, b: v < b),
    ):
        if bound is not None and not ok(value, bound):
            sym = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[op]
            shown = f"{bound:g}" if isinstance(bound, float) and abs(bound) >= 1e6 else bound  # 1e+12, not 1000000000000.0
            raise ConfigError(f"{key} must be {sym} {shown} (got {value})")


def _check_node(prefix: str, node) -> None:
    for f in fields(node):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(node, f.name)
        if is_dataclass(value):
            _check_node(key, value)
        else:
            _check_value(key, value, f.metadata)


def validate(cfg: DictConfig) -> Config:
    """Check every value of a composed config; return it as typed dataclasses.

    Raises:
        ConfigError: one line naming the first offending key and its allowed range.
    """
    try:
        obj = OmegaConf.to_object(cfg)
    except Exception as e:  # MissingMandatoryValue, ValidationError: keep OmegaConf's key, one line
        msg = str(e).splitlines()[0]
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{key}: {msg}" if key else msg) from None
    _check_node("", obj)
    from .builders import check_model_config

    check_model_config(obj.model)
    t = obj.training
    if t.mode == "tech_aware" and t.pretrain_epochs >= t.epochs:
        raise ConfigError(f"training.pretrain_epochs must be < training.epochs (got {t.pretrain_epochs} >= {t.epochs})")
    if obj.xbar.dac_range_mode == "fixed" and obj.xbar.dac_range is None:
        raise ConfigError("xbar.dac_range must be set (> 0) when xbar.dac_range_mode is fixed (got null)")
    ds = obj.dataset
    if (ds.normalize_mean is None) != (ds.normalize_std is None) or (
            ds.normalize_mean is not None and len(ds.normalize_mean) != len(ds.normalize_std)):
        raise ConfigError(f"dataset.normalize_std must have one value per dataset.normalize_mean value "
                          f"(got {ds.normalize_mean} and {ds.normalize_std})")
    if obj.mode == "evaluate" and not obj.source:
        raise ConfigError("source must be set (a run id, a runs:/<id>/<artifact> URI or a weights file) "
                          "when mode is evaluate (got null)")
    if obj.mode == "train" and obj.source:
        raise ConfigError(f"source is read only with mode=evaluate (got mode=train, source={obj.source})")
    hw = obj.hardware
    if not hw.r_off > hw.r_on:
        raise ConfigError(f"hardware.r_off must be > hardware.r_on (got r_on={hw.r_on}, r_off={hw.r_off})")
    if hw.stuck_on + hw.stuck_off > 1.0:
        raise ConfigError(f"hardware.stuck_off must be <= 1 - hardware.stuck_on "
                          f"(got stuck_on={hw.stuck_on}, stuck_off={hw.stuck_off})")
    # the core's own checks of the crossbar it will build (e.g. interleaved mapping needs even cols)
    from .hardware import crossbar_spec

    try:
        crossbar_spec(obj)
    except ValueError as e:
        raise ConfigError(f"xbar.{e}") from None
    return obj
