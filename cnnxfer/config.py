"""Frozen configs with every default: the one source of truth for the CLI and the library.

Each config is saved as JSON beside its outputs, so a run can be reproduced from its folder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

# Pillow's own default (~ a 9459 x 9459 image). Defined here rather than in data.py so that the
# CLI can show it in --help without importing numpy and Pillow.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Pool(str, Enum):
    avg = "avg"
    max = "max"
    avgmax = "avgmax"


class Tta(str, Enum):
    none = "none"
    flip = "flip"


class Strategy(str, Enum):
    auto = "auto"  # the probe, then probe-then-fine-tune; the run keeps whichever validates better
    linear = "linear"
    gradual = "gradual"
    full = "full"


class HeadInit(str, Enum):
    probe = "probe"  # the probe fitted on the frozen backbone's features (probe-then-fine-tune, LP-FT)
    zero = "zero"  # zeros: every class equally likely, the loss starts at ln(classes)


class BnStats(str, Enum):
    auto = "auto"  # frozen when fine-tuning a pretrained backbone, update from scratch (recipe.resolve_bn_stats)
    update = "update"  # BatchNorm normalises with each batch's statistics and updates its running ones
    frozen = "frozen"  # the pretrained running statistics are kept (BatchNorm in eval mode; its scale and shift train)


class Optimizer(str, Enum):
    sgd = "sgd"
    adamw = "adamw"


class CacheImages(str, Enum):
    auto = "auto"  # when the decoded images fit data.cache_budget() and the run would decode them every epoch
    on = "on"
    off = "off"


class ExportFormat(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"


class Balance(str, Enum):
    none = "none"
    loss = "loss"
    sampler = "sampler"


def _coerce(config) -> None:
    """Accept plain strings for enum fields and str paths, so Python callers can write
    TrainConfig(data="photos", strategy="gradual"); a bad value names the field and the choices."""
    import typing

    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        args = typing.get_args(hint) or (hint,)
        enum = next((a for a in args if isinstance(a, type) and issubclass(a, Enum)), None)
        if enum is not None and isinstance(value, str) and not isinstance(value, enum):
            try:
                value = enum(value)
            except ValueError:
                from .errors import UsageError

                raise UsageError(f"{f.name} '{value}' is not one of {', '.join(e.value for e in enum)}") from None
        elif Path in args and isinstance(value, str):
            value = Path(value)
        elif f.name in ("layers", "only", "transforms") and isinstance(value, (list, str)):
            value = tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else tuple(value)
        elif f.name == "units" and isinstance(value, (list, str)):
            value = _parse_units(value)
        elif f.name == "budget" and isinstance(value, str):
            value = parse_duration(value, "--budget")
        object.__setattr__(config, f.name, value)


def parse_duration(text: str, option: str) -> float:
    """Seconds from "90", "90s", "10m", "2h" or "1h30m"; UsageError naming `option` otherwise."""
    import re

    spoken = str(text).strip().lower().replace(" ", "")
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", spoken)
    if not spoken or parts is None or not any(parts.groups()):
        from .errors import UsageError

        raise UsageError(f"{option} takes a duration such as 90s, 10m, 2h or 1h30m; got '{text}'")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def _parse_units(value) -> tuple[int, ...]:
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    try:
        units = tuple(int(v) for v in items)
    except ValueError:
        from .errors import UsageError

        raise UsageError(f"--units takes unit (channel) numbers separated by commas, e.g. 0,3,7; got '{value}'") from None
    if any(u < 0 for u in units):
        from .errors import UsageError

        raise UsageError(f"--units must be 0 or more; got '{value}'")
    return units


def to_dict(config) -> dict:
    """JSON-ready dict of a config (paths and enums as strings)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Enum):
            value = value.value
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


@dataclass(frozen=True)
class ExtractConfig:
    data: Path
    out: Path
    model: str | None = None
    weights: str | None = "hub"
    layers: tuple[str, ...] = ()
    pool: Pool | None = None  # None: the model's own pooling for the final features, avg for layers
    tta: Tta = Tta.none
    img_size: int | None = None
    batch_size: int = 64
    num_workers: int | None = None
    device: str = "auto"
    precision: Precision = Precision.auto
    resume: bool = False
    overwrite: bool = False
    strict: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    part_size: int = 1024  # images per finished Parquet part: the most a kill can cost
    reduced_decode: bool = True  # decode at the working resolution (False: every pixel of the file, e.g. to compare)

    def __post_init__(self):
        _coerce(self)


@dataclass(frozen=True)
class TrainConfig:
    """finetune and train share this; they differ only in `weights` and `strategy`."""

    data: Path
    out: Path
    model: str | None = None
    weights: str | None = "hub"
    strategy: Strategy = Strategy.full
    epochs: int | None = None  # None: from the dataset size (recipe.resolve_schedule); the run records the choice
    batch_size: int | None = None  # None: likewise (64, fewer on small datasets)
    lr: float | None = None  # None: per optimizer and strategy (recipe.resolve_hparams)
    backbone_lr_mult: float = 0.1  # fine-tuning: the pretrained backbone learns 10x slower than the head
    optimizer: Optimizer | None = None  # None: SGD when training from scratch, AdamW when fine-tuning
    momentum: float = 0.9
    weight_decay: float | None = None  # None: 5e-4 for SGD, 0.05 for AdamW
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    dropout: float = 0.0
    grad_clip: float | None = None
    balance: Balance = Balance.none
    augment: bool = True
    hflip: float = 0.5
    cache_features: bool = True  # linear strategy: compute frozen-backbone features once
    cache_images: CacheImages = CacheImages.auto  # decode the images once and keep them in memory
    head_epochs: int = 1  # gradual: epochs with the backbone frozen before unfreezing starts
    head_init: HeadInit = HeadInit.probe  # a new head on a pretrained backbone: where it starts
    bn_stats: BnStats = BnStats.auto
    val_split: float = 0.2
    patience: int | None = None  # early stopping on validation loss
    img_size: int | None = None
    seed: int = 0
    num_workers: int | None = None
    device: str = "auto"
    precision: Precision = Precision.auto
    strict: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_steps: int | None = None  # stop after this many optimizer steps (sanity checks, tests)
    checkpoint_every: float = 30.0  # seconds between checkpoint writes (0: every epoch); see epochs.Checkpoints
    reduced_decode: bool = True  # decode at the working resolution (False: every pixel of the file, e.g. to compare)
    sync_bn: bool = False  # several GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)
    # seconds of wall time for the whole command (budget.py): the schedule is sized to fit, and the
    # run stops in time. "90s", "10m", "1h30m" are accepted too.
    budget: float | None = None

    def __post_init__(self):
        _coerce(self)
        _check_ranges(self)


# With --epochs and --batch-size left out (recipe.resolve_schedule): the batch size on datasets of
# 8 or more such batches, the epochs of a fine-tuning / from-scratch run when the dataset is large,
# and the fewest optimizer steps a run gets on a small one.
BATCH_SIZE = 64
FINETUNE_EPOCHS = 5
TRAIN_EPOCHS = 30
MIN_STEPS = 300
MIN_FINETUNE_STEPS = 30


def _check_ranges(config: TrainConfig) -> None:
    """Values no run can use, refused before any image is read."""
    from .errors import UsageError

    if not 0.0 <= config.val_split < 1.0:
        raise UsageError(f"--val-split must be at least 0 and below 1 (got {config.val_split})")
    if config.budget is not None and not config.budget > 0:
        raise UsageError(f"--budget must be more than 0 seconds (got {config.budget})")
    for name, low in (("epochs", 1), ("batch_size", 1), ("patience", 1), ("head_epochs", 0)):
        value = getattr(config, name)
        if value is not None and value < low:
            raise UsageError(f"{option_flag(name)} must be at least {low} (got {value})")


# What --resume does with the options given beside it. The run's own settings decide its result;
# these only say where and how it computes, so a resumed run takes them as given (images held in
# memory or read every epoch give the same batches: tests/test_engine.py checks it).
# --budget beside --resume is the time the continuation may take (without it: what the run had left).
RUN_FIELDS = frozenset({"device", "num_workers", "checkpoint_every", "cache_images", "strict", "budget"})
# `data` says where the images are now (fit checks they are the same images); `precision` is
# taken when it trains in the run's own dtype (fit checks that, on the device resolved).
WHERE_FIELDS = frozenset({"data", "precision"})
_FLAGS = {"data": "DATA", "num_workers": "--workers", "cache_features": "--cache/--no-cache",
          "augment": "--augment/--no-augment"}


def option_flag(name: str) -> str:
    """The command-line spelling of a TrainConfig field (num_workers -> --workers)."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def resumed_config(saved: "RunConfig", out: Path, given: dict | None = None) -> TrainConfig:
    """The TrainConfig that continues the interrupted run whose config.json is `saved`.

    Every setting is the run's own, except the options in `given` (TrainConfig field -> value)
    that say where and how to run (RUN_FIELDS, WHERE_FIELDS). A given option that would change
    the result raises UsageError naming it: --resume never ignores an option silently.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in saved.train_config.items() if k in names}
    values["model"] = values.get("model") or saved.model  # older runs named the architecture only at the top
    from .device import dtype_name_precision  # here, not at import: --help never loads torch

    if dtype_name_precision(saved.precision):  # the dtype it trained in, whatever "auto" gives on this device
        values["precision"] = Precision(dtype_name_precision(saved.precision))
    values["out"] = Path(out)
    run = TrainConfig(**values)
    changes, refused = {}, []
    for name, value in (given or {}).items():
        if name == "overwrite":  # how a new run is started, not a setting: with --resume, a contradiction
            if value:
                refused.append(_refusal(name, value, False))
            continue
        wanted = getattr(dataclasses.replace(run, **{name: value}), name)  # coerced like the run's own value
        if name in RUN_FIELDS or name in WHERE_FIELDS:
            changes[name] = wanted
        elif not _same(name, wanted, getattr(run, name)):
            refused.append(_refusal(name, wanted, getattr(run, name)))
    if refused:
        from .errors import UsageError

        raise UsageError(f"--resume {out} continues the run with its own settings, and these would change its result: "
                         f"{'; '.join(refused)}. Leave them out to resume, or start a new run (finetune --weights "
                         f"{out} starts from its best weights)")
    return dataclasses.replace(run, **changes)


def is_custom_spec(spec: str) -> bool:
    """`file.py:factory` or `package.module:factory` name a user's model; anything else is timm."""
    return ":" in spec


def absolute_spec(spec: str | None) -> str | None:
    """`file.py:factory` with the file's absolute path (what a run records, so that it resumes from
    any folder); timm names and `package.module:factory` as they are."""
    if spec is None or not is_custom_spec(spec):
        return spec
    target, _, name = spec.rpartition(":")
    return f"{Path(target).resolve()}:{name}" if target.endswith(".py") else spec


def _same(name: str, given, saved) -> bool:
    """Whether a given option is the run's own setting, however spelt (a relative path, say)."""
    if name == "model":
        return absolute_spec(given) == absolute_spec(saved)
    paths = name == "out" or (name == "weights" and given not in ("hub", "none", None) and saved not in ("hub", "none", None))
    if paths:
        return Path(given).resolve() == Path(saved).resolve()
    return given == saved


def _refusal(name: str, given, saved) -> str:
    if name == "overwrite":
        return "--overwrite (it would start the run again)"
    if name == "out":
        return f"--out {given} (the run is in {saved})"
    if isinstance(given, bool):  # --augment/--no-augment: the spelling that was given, and the run's
        on, _, off = option_flag(name).partition("/")
        return f"{on if given else off} (the run has {on if saved else off})"
    show = lambda v: "the default" if v is None else getattr(v, "value", v)  # noqa: E731
    return f"{option_flag(name)} {show(given)} (the run has {show(saved)})"


@dataclass(frozen=True)
class RunConfig:
    """What a run directory's config.json records: enough to rebuild the model, resume the run,
    evaluate and report on it. One type for every reader (models, evaluate, resume, report)."""

    model: str  # the architecture as built: a timm name or an absolute path/to/file.py:factory
    classes: list[str]
    data_config: dict  # timm's preprocessing keys (preprocess.Preprocess.from_data_config)
    train_config: dict = field(default_factory=dict)  # TrainConfig as run: absolute paths, batch size and epochs as chosen
    weights_source: str | None = None
    hparams: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    best_rule: str = ""
    final: dict | None = None
    status: str = "running"  # "finished" once the best weights were evaluated and reported
    train_images: int = 0
    val_images: int = 0
    class_counts: dict = field(default_factory=dict)
    data_fingerprint: str = ""
    precision: str = "float32"  # the dtype it trained in
    device: str = "cpu"
    world_size: int = 1  # processes it trained with (torchrun)
    versions: dict = field(default_factory=dict)
    probe: dict | None = None  # the probe fitted at epoch 0, when there was one (probing.ProbeStage.summary)
    selection: dict | None = None  # auto without validation images: probe vs fine-tuning by cross-validation
    calibration: dict | None = None  # temperature and conformal scores fitted on held-out images (calibration.fit)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["num_classes"] = self.num_classes  # for readers of the file outside cnnxfer
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        """From a config.json, older ones included (fields they lack take their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in values.items() if k in names and v is not None or k == "final"}
        known.setdefault("model", (values.get("train_config") or {}).get("model") or "")
        known.setdefault("classes", [])
        known.setdefault("data_config", {})
        return cls(**known)


SANITY_CHECKS = ("data", "init_loss", "overfit", "gradcheck", "gradient_flow", "modes", "cost", "lr_find")


@dataclass(frozen=True)
class SanityConfig:
    """`cnnxfer sanity-check`: which checks, on what data and model, with which budgets."""

    data: Path
    model: str | None = None
    weights: str | None = "none"  # the setup about to be trained: random init unless told otherwise
    only: tuple[str, ...] = ()  # empty: every check except lr_find (which --lr-find adds)
    lr_find: bool = False
    lr: float | None = None  # the learning rate you plan to train with (checked by lr_find)
    optimizer: Optimizer | None = None
    img_size: int | None = None
    batch_size: int = 16  # the overfit subset: one batch drawn across classes
    overfit_steps: int = 300  # always run (unless memorised sooner); more while the loss falls clearly (overfit.py)
    overfit_seconds: float = 120.0  # no more steps past this, beyond overfit_steps
    overfit_loss: float = 0.05
    gradcheck_size: int = 32  # input side for the float64 finite-difference check
    val_split: float = 0.2
    seed: int = 0
    num_workers: int | None = None
    device: str = "auto"
    precision: Precision = Precision.auto
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    json_path: Path | None = None
    out_dir: Path | None = None  # where lr_find.png and the skipped list go (default: beside --json or cwd)

    def __post_init__(self):
        _coerce(self)


class Method(str, Enum):
    pca = "pca"
    tsne = "tsne"
    both = "both"


class FilterScale(str, Enum):
    filter = "filter"  # each filter to its own largest |weight|: every filter's shape shows
    layer = "layer"  # one scale for the layer: filter magnitudes compare


INVARIANCE_TRANSFORMS = ("hflip", "vflip", "scale", "rot90")


@dataclass(frozen=True)
class InspectConfig:
    """`cnnxfer inspect ...` and `cnnxfer report`: which model, which images, where the views go,
    and every view's options (each view reads the fields it needs)."""

    model: str | None = None
    weights: str | None = None  # a run directory, a weights file, hub or none
    data: Path | None = None  # images (class folders, flat folder or CSV manifest)
    out: Path | None = None  # None: <run dir>/inspect/<view> for a run directory, else inspect/<view>
    img_size: int | None = None
    batch_size: int = 64
    max_images: int | None = None  # None: the view's own default (all images for patches, errors, layers)
    num_workers: int | None = None
    device: str = "auto"
    precision: Precision = Precision.auto  # forward passes over images; gradients are always fp32
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    overwrite: bool = False
    seed: int = 0
    # filters
    compare: str | None = None  # other weights of the same architecture (before fine-tuning)
    filter_scale: FilterScale = FilterScale.filter
    # patches (and class-model's --layer/--unit)
    layer: str | None = None
    units: tuple[int, ...] = ()  # empty: the first `max_units`
    max_units: int = 8
    top: int = 8
    # class-model
    class_name: str | None = None
    unit: int | None = None
    steps: int = 200
    lr: float = 0.05
    l2: float = 1e-3  # lambda in S_c(I) - lambda ||I||^2, on the normalised input
    jitter: int = 4  # pixels of random shift per step (scaled to the input size)
    blur_every: int = 4  # a light Gaussian blur every this many steps (0: never)
    # embedding
    features: Path | None = None  # a Parquet file from `cnnxfer extract` instead of DATA + weights
    method: Method = Method.both
    perplexity: float = 30.0
    knn: int = 5
    thumbnails: int = 120
    # invariance
    threshold: float = 0.9
    layers: tuple[str, ...] = ()  # empty: the model's stages
    transforms: tuple[str, ...] = INVARIANCE_TRANSFORMS

    def __post_init__(self):
        _coerce(self)


@dataclass(frozen=True)
class ExportConfig:
    """`cnnxfer export`: a run directory (or a model and its weights) to an ONNX or TorchScript file."""

    run_dir: Path | None = None  # a cnnxfer run directory: model, weights, classes and preprocessing
    format: ExportFormat = ExportFormat.onnx
    out: Path | None = None  # None: model.onnx / model.pt in the current folder
    model: str | None = None  # without a run directory: a timm name or file.py:factory ...
    weights: str | None = None  # ... its weights (a file, hub or none) ...
    classes: Path | None = None  # ... a text file with one class name per line (default: 0..C-1) ...
    img_size: int | None = None  # ... and the input size (default: the model's own)
    data: Path | None = None  # images to verify on (default: the run's data folder)
    half: bool = False  # fp16 for GPUs (needs CUDA)
    tolerance: float | None = None  # max abs logit difference to PyTorch (None: 1e-3 in fp32, 5e-2 in fp16)
    overwrite: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self):
        _coerce(self)


def _check_at_least(config, **lows: int) -> None:
    """Counts no command can use (--batch-size 0, --workers -1), refused before any image is read."""
    for name, low in lows.items():
        value = getattr(config, name)
        if value is not None and value < low:
            from .errors import UsageError

            least = "0 or more" if low == 0 else f"at least {low}"
            raise UsageError(f"{option_flag(name)} must be {least} (got {value})")


def _check_share(config, *names: str) -> None:
    """Probabilities a user gives (--min-confidence, --coverage): strictly between 0 and 1."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not 0 < value < 1:
            from .errors import UsageError

            raise UsageError(f"{option_flag(name)} must be between 0 and 1, e.g. 0.9 (got {value})")


@dataclass(frozen=True)
class PredictConfig:
    """`cnnxfer predict`: a trained model (a run directory or a file from `cnnxfer export`) over images."""

    images: Path  # one image, a folder (flat or class subfolders) or a CSV manifest
    weights: str  # a run directory or an exported file (.onnx, TorchScript)
    out: Path = Path("predictions.csv")  # .csv or .parquet
    top_k: int = 5
    tta: Tta = Tta.none
    batch_size: int = 64
    num_workers: int | None = None
    device: str = "auto"
    precision: Precision = Precision.auto  # an exported file computes in its own: auto, or that one
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    overwrite: bool = False
    strict: bool = False
    calibrated: bool = True  # the model's fitted temperature applied (--no-calibration: raw softmax)
    min_confidence: float | None = None  # below it, the row's prediction is "abstained"
    coverage: float | None = None  # a conformal prediction set per image holding the true class with this probability

    def __post_init__(self):
        _coerce(self)
        object.__setattr__(self, "weights", str(self.weights))
        _check_at_least(self, top_k=1, batch_size=1, num_workers=0, max_image_pixels=1)
        _check_share(self, "min_confidence", "coverage")


@dataclass(frozen=True)
class EvaluateConfig:
    """`cnnxfer evaluate`: accuracy, per-class report and confusion matrix of a trained model on
    labelled images."""

    data: Path  # class subfolders named like the model's classes (or train/ + val/: val/ is scored), or a CSV
    weights: str  # a run directory or an exported file (.onnx, TorchScript)
    json_path: Path | None = None  # the metrics as JSON
    skipped_path: Path | None = None  # the unreadable images (None: beside json_path, else evaluate.skipped.csv)
    tta: Tta = Tta.none
    batch_size: int = 64
    num_workers: int | None = None
    device: str = "auto"
    precision: Precision = Precision.auto  # an exported file computes in its own: auto, or that one
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    strict: bool = False
    calibrated: bool = True  # the model's fitted temperature applied (--no-calibration: raw softmax)
    min_confidence: float | None = None  # accuracy and coverage of the images at or above it
    coverage: float | None = None  # empirical coverage and mean size of the conformal prediction sets
    unknown: Path | None = None  # images of classes the model never saw: how well confidence separates them

    def __post_init__(self):
        _coerce(self)
        object.__setattr__(self, "weights", str(self.weights))
        _check_at_least(self, batch_size=1, num_workers=0, max_image_pixels=1)
        _check_share(self, "min_confidence", "coverage")


@dataclass(frozen=True)
class CalibrateConfig:
    """`cnnxfer calibrate`: fit a run's temperature and conformal scores again on other labelled images."""

    run: Path  # a run directory from finetune or train
    data: Path  # labelled images of the run's classes that it did not train on
    tta: Tta = Tta.none
    batch_size: int = 64
    num_workers: int | None = None
    device: str = "auto"
    precision: Precision = Precision.auto
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self):
        _coerce(self)
        _check_at_least(self, batch_size=1, num_workers=0, max_image_pixels=1)


@dataclass(frozen=True)
class AuditConfig:
    """`cnnxfer audit`: the images (and the features, extracted or given), where the findings go,
    and every detector's threshold. The defaults were measured on planted damage (benchmarks/audit.py)."""

    data: Path | None = None  # class folders (train/ + val/ for the split), or a CSV manifest; None with `features`
    out: Path = Path("audit")
    model: str | None = None
    weights: str | None = "hub"
    features: Path | None = None  # a cnnxfer extract Parquet file with labels, instead of a model
    against: Path | None = None  # a second folder (a test set): its duplicates of DATA are leakage
    folds: int = 5  # of the cross-validated probe whose held-out probabilities confident learning reads
    rank_by: str = "self_confidence"  # or "margin"
    filter_by: str = "below_threshold"  # confident.FILTERS: which images confident learning flags
    duplicate_threshold: float = 0.95  # cosine similarity of embeddings from which a pair is a near-duplicate
    neighbours: int = 10  # k of the k-NN distances of the outlier checks
    outlier_z: float = 4.0  # robust SDs of the log k-NN distance above its class's median
    val_split: float = 0.2  # without train/ and val/ folders: the split finetune would make, for leakage
    seed: int = 0
    dark: float = 0.25
    overexposed: float = 0.9
    blur_z: float = 4.0
    min_entropy: float = 1.0
    max_aspect: float = 3.0
    img_size: int | None = None
    batch_size: int = 64
    num_workers: int | None = None
    device: str = "auto"
    precision: Precision = Precision.auto
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    overwrite: bool = False
    resume: bool = False  # keep an earlier audit's features (finish an interrupted extraction); make the findings again

    def __post_init__(self):
        from .errors import UsageError

        _coerce(self)
        if self.data is None and self.features is None:
            raise UsageError("audit needs DATA (an image folder or manifest) or --features FILE.parquet")
        if self.filter_by not in ("below_threshold", "both", "prune_by_noise_rate", "confident_joint"):
            raise UsageError(f"--filter-by must be below_threshold, both, prune_by_noise_rate or confident_joint (got {self.filter_by})")
        if self.rank_by not in ("self_confidence", "margin"):
            raise UsageError(f"--rank-by must be self_confidence or margin (got {self.rank_by})")
        if not 0.0 < self.duplicate_threshold <= 1.0:
            raise UsageError(f"--duplicate-threshold must be in (0, 1] (got {self.duplicate_threshold})")
        _check_at_least(self, folds=2, neighbours=1, batch_size=1)
