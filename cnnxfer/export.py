"""`cnnxfer export`: a trained model as an ONNX or TorchScript file, verified, with its preprocessing.

The exported graph takes what cnnxfer's loader produces: RGB images as uint8 (N, 3, H, W), 0-255,
resized and centre-cropped as the file's metadata says, and normalises them inside (the same
`preprocess.Normalize` module training used), returning float32 logits (N, C). Taking uint8 keeps
the one step a deployer most often gets wrong (mean/std, 0-1 or 0-255, RGB or BGR) inside the file
and moves a quarter of the bytes of a float input. The batch axis is dynamic; height and width are
fixed at the run's input size.

The file carries what a deployer needs (`ExportInfo`: class names, input size, mean/std,
interpolation, crop, and the run's calibration: the temperature to divide the logits by and the
conformal scores of `predict --coverage`): as ONNX metadata_props, or for TorchScript as an extra file inside the archive
plus a JSON sidecar `<file>.json`. `cnnxfer predict --weights model.onnx` needs nothing else.

Every export is verified before it is kept: the exported file (onnxruntime, torch.jit.load) and the
PyTorch model in fp32 run on the same images (the run's data, or `--data`), at batch 16 and at
batch 1 (the dynamic axis); the largest logit difference must be within the tolerance. Within it,
top-1 can only differ on an image whose two best logits are closer than twice that difference.
A model that cannot be exported (an operator without an ONNX translation, a custom op that a
TorchScript file could not load without your Python code) is refused with the operator's name.

`OnnxPredictor` and `TorchScriptPredictor` run exported files behind predictor.Predictor, beside
the PyTorch one.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import io
import json
import logging
import re
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoint, data, device as dev, models, rundir
from .config import ExportConfig, ExportFormat, Precision, Tta
from .errors import CnnxferError, DeviceError, ModelError, UsageError
from .predictor import Predictor, TorchPredictor, predict_images
from .preprocess import Normalize
from .session import Session, resolve_session

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INPUT, OUTPUT = "images", "logits"
EXTRA = "cnnxfer.json"  # the metadata inside a TorchScript archive
EXTRA_HINT = "pip install 'cnnxfer[export]'"
TOLERANCE = {"float32": 1e-3, "float16": 5e-2}  # max abs logit difference to the fp32 PyTorch model
VERIFY_IMAGES = 64  # at most this many images, spread evenly over the data folder
VERIFY_BATCH = 16
BUILTIN_NAMESPACES = ("aten", "prim")  # TorchScript operators that load without the user's code


class ExportError(CnnxferError):
    """The exported file does not compute what the PyTorch model computes."""

    exit_code = 1


@dataclass
class ExportInfo:
    """What an exported file carries besides its graph: how to prepare its input, what its outputs are."""

    classes: list[str]
    input_size: tuple[int, int, int]  # (channels, height, width)
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    crop_mode: str
    precision: str = "float32"  # of the computation; the input is uint8 either way
    input_dtype: str = "uint8"  # RGB, 0-255, (N, C, H, W); normalised inside
    model: str = ""  # the architecture (a timm name or file.py:factory)
    source: str = ""  # the run directory or weights file exported
    opset: int | None = None  # ONNX only
    cnnxfer_version: str = ""
    torch_version: str = ""
    calibration: dict | None = None  # the run's temperature and conformal scores: divide the logits by "temperature"
    format_version: int = FORMAT_VERSION

    @property
    def data_config(self) -> dict:
        return {"input_size": self.input_size, "interpolation": self.interpolation, "mean": self.mean,
                "std": self.std, "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}

    def to_dict(self) -> dict:
        return {"cnnxfer_format_version" if f.name == "format_version" else f.name: _plain(getattr(self, f.name))
                for f in dataclasses.fields(self)}

    def to_props(self) -> dict[str, str]:
        """ONNX metadata_props: strings as they are, everything else as JSON."""
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.to_dict().items()}

    @classmethod
    def from_dict(cls, values: dict, source: Path) -> "ExportInfo":
        values = dict(values)
        if "cnnxfer_format_version" not in values:
            raise UsageError(f"{source} carries no cnnxfer metadata (classes, preprocessing): export it with `cnnxfer export`")
        values["format_version"] = values.pop("cnnxfer_format_version")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) and k != "classes" else v for k, v in values.items() if k in names}
        return cls(**values)

    @classmethod
    def from_props(cls, props: dict[str, str], source: Path) -> "ExportInfo":
        strings = {f.name for f in dataclasses.fields(cls) if f.type in ("str", str)}
        return cls.from_dict({k: v if k in strings else json.loads(v) for k, v in props.items()}, source)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass
class Verification:
    """The exported file against the PyTorch model (fp32) on the same images."""

    images: int
    source: str  # where the images came from, in words
    max_abs_diff: float  # largest |logit difference| over every image and class
    top1_agreement: float  # fraction of images with the same top class
    tolerance: float
    max_abs_logit: float  # the scale of the logits, to read the difference against
    batch_sizes: list[int] = field(default_factory=list)


@dataclass
class ExportResult:
    out: Path
    format: str
    info: ExportInfo
    verification: Verification
    seconds: float
    bytes: int
    sidecar: Path | None = None  # TorchScript's JSON beside the file
    notes: list[str] = field(default_factory=list)


class ExportedClassifier(nn.Module):
    """What is exported: uint8 images -> normalised (in `dtype`) -> the model -> float32 logits."""

    def __init__(self, model: nn.Module, mean, std, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.normalize, self.model, self.dtype = Normalize(mean, std), model, dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images).to(self.dtype)).float()


# ---------------------------------------------------------------- export

def export_model(config: ExportConfig) -> ExportResult:
    """Export `config.run_dir` (or `config.model` + `config.weights`) to `config.out`, verified."""
    start = time.perf_counter()
    fmt = ExportFormat(config.format)
    out = Path(config.out or default_out(fmt))
    _check_options(config, out, fmt)
    if fmt == ExportFormat.onnx:
        require_extra()
    loaded, classes, notes = _load(config)
    mean, std = loaded.data_config["mean"], loaded.data_config["std"]
    reference = ExportedClassifier(loaded.model, mean, std).eval()
    # the exporters' example input: a batch of 2, since an axis of size 1 would be taken for a constant
    example = torch.randint(0, 256, (2, *loaded.data_config["input_size"]), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    classes = _class_names(reference, example, classes, notes)
    # where the exported file is verified: fp16 on the GPU (--half), else fp32 on the CPU
    session = resolve_session("cuda" if config.half else "cpu", "fp32", 0)
    module, device, precision = reference, session.device, "float32"
    if config.half:  # a copy: the reference stays fp32 on the CPU
        precision = "float16"
        module = ExportedClassifier(copy.deepcopy(loaded.model).half(), mean, std, torch.float16).eval().to(device)
    info = _info(loaded, classes, precision)
    if config.run_dir is not None:  # the run's temperature and conformal scores travel in the metadata
        info = dataclasses.replace(info, calibration=rundir.read_config(config.run_dir).calibration)
    tolerance = config.tolerance if config.tolerance is not None else TOLERANCE[precision]
    sidecar = out.with_name(out.name + ".json") if fmt == ExportFormat.torchscript else None
    with tempfile.TemporaryDirectory(prefix="cnnxfer-export-") as scratch, checkpoint.atomic_path(out) as tmp:
        if fmt == ExportFormat.onnx:
            _write_onnx(module, example.to(device), tmp, info)
            exported = OnnxPredictor(tmp, info, session)
        else:
            notes += _write_torchscript(module, example.to(device), tmp, info)
            exported = TorchScriptPredictor(tmp, info, session)
        images, source = _verify_images(config, loaded, Path(scratch), notes)
        # the reference is the model as `predict` runs it from a run directory, normalised outside the graph
        verification = verify(TorchPredictor(loaded.model, loaded.data_config, classes, _fp32_cpu()), exported, images,
                              source, tolerance, config.max_image_pixels)
        size = tmp.stat().st_size
    if sidecar is not None:
        checkpoint.atomic_write_json(sidecar, info.to_dict())
    return ExportResult(out, fmt.value, info, verification, time.perf_counter() - start, size, sidecar, notes)


def default_out(fmt: ExportFormat | str) -> Path:
    return Path("model.onnx" if ExportFormat(fmt) == ExportFormat.onnx else "model.pt")


def _check_options(config: ExportConfig, out: Path, fmt: ExportFormat) -> None:
    """Every option checked before anything is loaded or written."""
    if config.run_dir is not None:
        if not rundir.is_run_dir(config.run_dir):
            raise UsageError(f"{config.run_dir} is not a cnnxfer run directory (needs config.json and model.safetensors)")
        given = [name for name, value in (("--model", config.model), ("--weights", config.weights),
                                          ("--classes", config.classes), ("--img-size", config.img_size)) if value]
        if given:
            raise UsageError(f"{config.run_dir} carries its model, weights, classes and preprocessing: leave "
                             f"{', '.join(given)} out")
    elif not config.model:
        raise UsageError("give a run directory (RUN_DIR), or --model with --weights")
    elif config.weights is None:
        raise UsageError("--model needs --weights: a weights file (.safetensors/.pth), hub or none")
    if config.half and not torch.cuda.is_available():
        raise UsageError("--half exports fp16 for GPUs and needs CUDA on this machine (none found); leave it out for fp32")
    if config.tolerance is not None and not config.tolerance > 0:
        raise UsageError(f"--tolerance must be above 0 (got {config.tolerance})")
    for option, path in (("--data", config.data), ("--classes", config.classes)):
        if path is not None and not Path(path).exists():
            raise UsageError(f"{option} {path}: no such file or folder")
    if (out.suffix.lower() == ".onnx") != (fmt == ExportFormat.onnx):  # predict tells the formats apart by it
        raise UsageError(f"--out {out}: an ONNX file's name ends in .onnx, a TorchScript file's does not (model.pt)")
    checkpoint.prepare_output(out, config.overwrite)
    if fmt == ExportFormat.torchscript:
        checkpoint.prepare_output(out.with_name(out.name + ".json"), config.overwrite)


def require_extra() -> None:
    """onnx, onnxruntime and onnxscript (the exporter's translator), or a UsageError naming the extra."""
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UsageError(f"ONNX needs {', '.join(missing)}, not installed here: {EXTRA_HINT}")


def _load(config: ExportConfig) -> tuple[models.LoadedModel, list[str] | None, list[str]]:
    """The model in fp32 eval mode on the CPU, its class names (None: not given) and notes."""
    if config.run_dir is not None:
        loaded = models.load_model(None, str(config.run_dir))
        return loaded, loaded.classes, list(loaded.notes)
    models.check_model_options(config.model, config.weights)
    classes = None
    if config.classes is not None:
        classes = [line.strip() for line in Path(config.classes).read_text(encoding="utf-8").splitlines() if line.strip()]
    # a weights file's head must have as many outputs as --classes has names (timm's hub weights
    # keep their own head: asked for another size, timm would put a random one in its place)
    num_classes = len(classes) if classes and config.weights != models.HUB else None
    loaded = models.load_model(config.model, config.weights, num_classes, img_size=config.img_size)
    if any("re-initialised" in note for note in loaded.notes):  # load_weights' note on a head of another size
        raise UsageError(f"the classifier in {config.weights} has another number of outputs than "
                         f"{f'--classes lists ({len(classes)})' if classes else 'the model builds'}: give --classes "
                         f"with one name per output")
    loaded.model.float().eval()
    return loaded, classes, list(loaded.notes)


def _class_names(module: nn.Module, example: torch.Tensor, classes: list[str] | None, notes: list[str]) -> list[str]:
    """The class names, checked against the model's outputs on `example` (0..C-1 when not given)."""
    with torch.inference_mode():
        logits = module(example)
    if logits.dim() != 2 or logits.shape[0] != len(example):
        raise ModelError(f"the model returns {tuple(logits.shape)} for a batch of {len(example)}: a classifier returns "
                         f"(batch, classes) logits")
    count = logits.shape[1]
    if classes is None:
        notes.append(f"no --classes file: the {count} classes are named 0 to {count - 1}")
        return [str(i) for i in range(count)]
    if len(classes) != count:
        raise UsageError(f"--classes lists {len(classes)} names for a model with {count} outputs")
    return classes


def _info(loaded: models.LoadedModel, classes: list[str], precision: str) -> ExportInfo:
    from . import __version__

    c = loaded.data_config
    return ExportInfo(list(classes), tuple(int(v) for v in c["input_size"]), c["interpolation"],
                      tuple(float(v) for v in c["mean"]), tuple(float(v) for v in c["std"]), float(c["crop_pct"]),
                      c.get("crop_mode") or "center", precision, model=loaded.arch, source=str(loaded.weights),
                      cnnxfer_version=__version__, torch_version=torch.__version__)


def _fp32_cpu() -> Session:
    """The reference: eager PyTorch, fp32, NCHW, on the CPU, one process."""
    return Session(dev.Runtime(torch.device("cpu"), None, False, 0, 0, False))


# ---------------------------------------------------------------- formats

def _write_onnx(module: nn.Module, example: torch.Tensor, path: Path, info: ExportInfo) -> None:
    """torch.onnx.export with the dynamo exporter (torch's default) at its own default opset, the
    one its operator translations are written for; `info.opset` records it."""
    import onnx

    size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    if size >= 2**31 - 2**24:  # protobuf's 2 GB, less room for the graph; weights beside the file are not written
        raise ModelError(f"the model's weights take {size / 2**30:.1f} GiB, over the 2 GB an ONNX file can hold; "
                         f"export --format torchscript")
    chatter = io.StringIO()  # on failure torch writes its whole traced graph to stderr: to the debug log instead
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (example,), dynamo=True, verbose=False, input_names=[INPUT],
                                        output_names=[OUTPUT], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        external_data=False)
    except Exception as exc:
        log.debug("torch.onnx.export said:\n%s", chatter.getvalue())
        raise ModelError(f"cannot export to ONNX: {_export_failure(exc)}") from exc
    proto = program.model_proto
    info.opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    del proto.metadata_props[:]
    for key, value in info.to_props().items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save_model(proto, str(path))


def _export_failure(exc: BaseException) -> str:
    """Why the ONNX exporter failed, in one line: the operators it could not translate, by name, or
    the first error below its own wrappers (torch.export's, say)."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = "\n".join(map(str, chain))
    ops = sorted(set(re.findall(r"No ONNX function found for <OpOverload\(op='([\w.]+)'", text)))
    if ops:
        names = ", ".join(op.replace(".", "::", 1) for op in ops)
        return (f"operator {names} has no ONNX translation (a custom op, or one the exporter does not cover); "
                f"replace it with standard PyTorch operations")
    cause = next((e for e in chain if not type(e).__module__.startswith("torch.onnx")), exc)
    first = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
    first = re.sub(r"\x1b\[[0-9;]*m", "", first)  # the exporter colours its messages
    where = "torch.export could not capture the model: " if cause is not exc else ""
    return f"{where}{type(cause).__name__}: {first}"


def _write_torchscript(module: nn.Module, example: torch.Tensor, path: Path, info: ExportInfo) -> list[str]:
    """torch.jit.trace, refused when the graph holds operators that are not PyTorch's own; the
    metadata goes inside the archive. Returns notes (the tracer's warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            traced = torch.jit.trace(module, example, check_trace=False)
        except Exception as exc:
            raise ModelError(f"cannot trace the model for TorchScript: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
        foreign = sorted({n.kind() for n in traced.inlined_graph.nodes()
                          if n.kind().split("::")[0] not in BUILTIN_NAMESPACES})
        if foreign:
            raise ModelError(f"cannot export to TorchScript: operator {', '.join(foreign)} is not built into PyTorch (a "
                             f"custom op): the file would not load where the Python code that defines it is not imported")
        torch.jit.save(traced, str(path), _extra_files={EXTRA: json.dumps(info.to_dict())})
    # torch.jit is deprecated upstream (it still works, and TorchScript is what was asked for): its
    # deprecation warnings are not the user's concern; what the tracer says about the model is
    tracer = {str(w.message).splitlines()[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning)}
    return [f"the tracer warned: {message}" for message in sorted(tracer)[:3]]


# ---------------------------------------------------------------- verification

def verify(reference: Predictor, exported: Predictor, images: data.ImageList, source: str, tolerance: float,
           max_pixels: int = data.DEFAULT_MAX_IMAGE_PIXELS) -> Verification:
    """Both predictors on the same images (`source` says where from) through the one batch loop, at
    VERIFY_BATCH and the exported one at batch 1 too (the dynamic axis); ExportError when the largest
    logit difference is above `tolerance`."""
    ref = predict_images(reference, images, batch_size=VERIFY_BATCH, max_pixels=max_pixels)
    got = predict_images(exported, images, batch_size=VERIFY_BATCH, max_pixels=max_pixels)
    first = images.subset(ref.indices[:1].tolist())
    single = predict_images(exported, first, batch_size=1, max_pixels=max_pixels)
    if not len(ref.logits) or not np.array_equal(ref.indices, got.indices):
        raise ExportError(f"no verification image could be read from {source}")
    diff = float(np.abs(got.logits - ref.logits).max())
    diff = max(diff, float(np.abs(single.logits[0] - ref.logits[0]).max()))
    agreement = float((got.logits.argmax(1) == ref.logits.argmax(1)).mean())
    scale = float(np.abs(ref.logits).max())
    result = Verification(len(ref.logits), source, diff, agreement, tolerance, scale,
                          sorted({min(VERIFY_BATCH, len(ref.logits)), 1}))
    if not diff <= tolerance:  # NaN fails too
        raise ExportError(f"verification failed: the exported model's logits differ from PyTorch's by up to {diff:.3g} "
                          f"(logits up to {scale:.3g}; --tolerance {tolerance:g}) on {result.images} images from "
                          f"{source}; top-1 agrees on {agreement:.1%}. Nothing was written")
    return result


def _verify_images(config: ExportConfig, loaded: models.LoadedModel, scratch: Path,
                   notes: list[str]) -> tuple[data.ImageList, str]:
    """(images, where from): up to VERIFY_IMAGES real images spread evenly over --data or the run's
    data folder; else random ones written into `scratch` (with a note)."""
    folder = config.data
    if folder is None and loaded.run_config:
        recorded = loaded.run_config.train_config.get("data")
        folder = Path(recorded) if recorded and Path(recorded).exists() else None
        if folder is None:
            notes.append(f"the run's data folder {recorded} is gone: verified on random images; give --data for real ones")
    if folder is None:
        if config.run_dir is None:
            notes.append("verified on random images: give --data for real ones")
        return _random_images(scratch, loaded.data_config["input_size"]), "random images"
    images = data.discover(Path(folder), labelled=None)
    n = len(images)
    chosen = sorted(set(np.linspace(0, n - 1, min(n, VERIFY_IMAGES)).round().astype(int).tolist()))
    return images.subset(chosen), str(folder)


def _random_images(folder: Path, input_size, count: int = 8) -> data.ImageList:
    """`count` seeded noise PNGs at the input size in `folder`."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, (input_size[1], input_size[2], 3), dtype=np.uint8)
        paths.append(folder / f"{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return data.ImageList(paths, [None] * count, [], folder)


# ---------------------------------------------------------------- running exported files

def is_exported(path) -> bool:
    """Whether `path` is a file `cnnxfer export` wrote (by its form, before reading its metadata):
    an .onnx file, or a TorchScript archive with cnnxfer's metadata inside."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".onnx":
        return True
    return _torchscript_extra(path) is not None


def _torchscript_extra(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith(f"/extra/{EXTRA}")), None)
            return archive.read(name).decode("utf-8") if name else None
    except (OSError, zipfile.BadZipFile):
        return None


def read_info(path: Path) -> ExportInfo:
    """The metadata of an exported file (ONNX metadata_props, or the TorchScript archive's own)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        require_extra()
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise UsageError(f"{path}: not a readable ONNX file: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        return ExportInfo.from_props({p.key: p.value for p in proto.metadata_props}, path)
    extra = _torchscript_extra(path)
    if extra is None:
        raise UsageError(f"{path} is not a TorchScript file from `cnnxfer export`")
    return ExportInfo.from_dict(json.loads(extra), path)


def load_predictor(path: Path, session: Session, *, precision: Precision | str = Precision.auto,
                   tta: Tta | str = Tta.none) -> Predictor:
    """The backend for an exported file on `session`'s device: onnxruntime for .onnx, torch.jit for
    TorchScript. The file computes in the precision it was exported in: `precision` (--precision)
    other than auto must name that one."""
    info = read_info(path)
    precision = Precision(precision)
    if precision != Precision.auto and dev.precision_dtype_name(precision) != info.precision:
        raise UsageError(f"--precision {precision.value}: {path} computes in {info.precision}, as it was exported; "
                         f"leave --precision out")
    kind = OnnxPredictor if Path(path).suffix.lower() == ".onnx" else TorchScriptPredictor
    predictor = kind(path, info, session, tta)
    predictor.calibration = info.calibration
    return predictor


class OnnxPredictor(Predictor):
    """An exported .onnx file in onnxruntime (CPU, or CUDA where onnxruntime-gpu provides it)."""

    backend = "onnxruntime"

    def __init__(self, path: Path, info: ExportInfo, session: Session, tta: Tta | str = Tta.none):
        require_extra()
        import onnxruntime as ort

        where, providers = _ort_providers(ort, session.runtime)
        if info.precision == "float16" and where == "cpu":
            raise UsageError(f"{path} was exported in fp16 for GPUs: predict with --device cuda (onnxruntime-gpu), or "
                             f"export again without --half")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings about providers are not the user's concern
        self.ort = ort.InferenceSession(str(path), options, providers=providers)
        super().__init__(info.classes, info.data_config, session, where, info.precision, tta)

    def _logits(self, images) -> np.ndarray:
        x = images.numpy() if isinstance(images, torch.Tensor) else images
        return self.ort.run([OUTPUT], {INPUT: np.ascontiguousarray(x, dtype=np.uint8)})[0]


def _ort_providers(ort, runtime: dev.Runtime) -> tuple[str, list]:
    """(device in words, onnxruntime providers) for the session's device (under torchrun already
    this process's own GPU). --device auto runs on the CPU where onnxruntime has no CUDA provider."""
    device = runtime.device
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device.type == "cuda" and has_cuda:
        index = device.index or 0
        return f"cuda:{index}", [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    if device.type == "cpu" or runtime.auto_device:
        return "cpu", ["CPUExecutionProvider"]
    if device.type == "cuda":
        raise DeviceError(f"device {device}: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
    raise DeviceError(f"device {device}: an ONNX file runs on cpu or cuda[:N] in onnxruntime")


class TorchScriptPredictor(Predictor):
    """An exported TorchScript file, loaded with torch.jit.load (no Python model code needed)."""

    backend = "torchscript"

    def __init__(self, path: Path, info: ExportInfo, session: Session, tta: Tta | str = Tta.none):
        where = session.device
        if info.precision == "float16" and where.type == "cpu":
            raise UsageError(f"{path} was exported in fp16 for GPUs: predict with --device cuda, or export again "
                             f"without --half")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's own deprecation notice
            self.module = torch.jit.load(str(path), map_location=where).eval()
        self.where = where
        self.pin_memory = where.type == "cuda"
        super().__init__(info.classes, info.data_config, session, str(where), info.precision, tta)

    @torch.inference_mode()
    def _logits(self, images: torch.Tensor) -> np.ndarray:
        return self.module(images.to(self.where, non_blocking=True)).float().cpu().numpy()
