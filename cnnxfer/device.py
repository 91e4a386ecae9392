"""Device, precision and decode-thread selection: one Runtime per command.

`auto` picks CUDA, then Apple MPS, then CPU. Precision `auto` uses autocast where it pays:
bf16 on CUDA GPUs that support it (fp16 + GradScaler on older ones) and on CPUs with native
bf16 instructions (measured on a 2-core AMD EPYC with avx512_bf16: resnet18 fp32 36 img/s,
bf16 + channels_last 86 img/s, features at cosine 0.99999 to fp32); fp32 everywhere else.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
from dataclasses import dataclass

import torch

from .errors import DeviceError, UsageError

log = logging.getLogger(__name__)

_DEVICE_RE = re.compile(r"^(auto|cpu(:0)?|mps|cuda(:\d+)?)$")


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn "auto" | "cpu" | "cuda" | "cuda:N" | "mps" into a usable torch.device.

    The chosen device is checked with a tiny allocation (torchtune does the same) so that a
    broken driver fails here, with the device named, rather than deep inside a run.
    """
    spec = (spec or "auto").strip().lower()
    if not _DEVICE_RE.match(spec):
        raise UsageError(f"unknown device '{spec}'; use auto, cpu, cuda, cuda:N or mps")
    if spec == "auto":
        if torch.cuda.is_available():
            spec = "cuda"
        elif _mps_available():
            spec = "mps"
        else:
            spec = "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device cuda is not available on this machine (torch.cuda.is_available() is False)")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {spec} is not available: this machine has {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
    if device.type == "mps" and not _mps_available():
        raise DeviceError("device mps is not available on this machine (needs Apple silicon and a torch build with MPS)")
    try:
        torch.zeros(1, device=device)
    except Exception as exc:  # a driver or runtime fault: name the device
        raise DeviceError(f"device {device} failed a test allocation: {exc}") from exc
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def cpu_has_native_bf16() -> bool:
    """True when the CPU executes bf16 natively (x86 avx512_bf16/AMX, Arm bf16)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags)) or (
        platform.machine() == "aarch64" and re.search(r"\bbf16\b", flags) is not None
    )


def _option(precision) -> str:
    """--precision as a plain lower-case string (a config's Precision enum, or a str)."""
    return (precision or "auto").strip().lower()


# The two vocabularies of precision: the --precision options and the names of the dtypes they
# compute in (what runs, Parquet metadata and exported files record).
_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_OPTIONS = {name: option for option, name in _DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype | None) -> str:
    """An autocast dtype as recorded: torch.bfloat16 -> "bfloat16"; None (no autocast) -> "float32"."""
    return str(dtype).replace("torch.", "") if dtype else "float32"


def precision_dtype_name(precision) -> str | None:
    """--precision -> the name of the dtype it computes in: fp32 -> "float32", bf16 -> "bfloat16",
    fp16 -> "float16"; None for auto (the device decides) and for an unknown option."""
    return _DTYPE_NAMES.get(_option(precision))


def dtype_name_precision(name: str) -> str | None:
    """A recorded dtype name -> the --precision option that computes in it: "bfloat16" -> "bf16";
    None for a name no option gives."""
    return _OPTIONS.get(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype for `precision` on `device`, or None for plain fp32."""
    precision = _option(precision)
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type == "cpu":
            raise UsageError("--precision fp16 is not supported on CPU; use bf16 or fp32")
        return torch.float16
    raise UsageError(f"unknown precision '{precision}'; use auto, fp32, bf16 or fp16")


def training_dtype(runtime: "Runtime", model: torch.nn.Module, precision: str) -> torch.dtype | None:
    """The dtype of training steps: the runtime's, except under --precision auto on a CPU for a
    model with depthwise convolutions, which trains in fp32. bf16 autocast's backward pass through
    depthwise convolutions is slow on CPUs: a training step of EfficientNet-Lite0 / EfficientNet-B0 /
    MobileNetV3 / ConvNeXt-atto ran at 0.72 / 0.74 / 0.56 / 0.83x its fp32 speed at 224 px, ResNet-18's
    at 1.94x (2-core Intel Xeon with AMX bf16, batch 16, channels_last). Inference keeps bf16, 1.8-2.7x
    faster than fp32 for all of them."""
    if _option(precision) != "auto" or runtime.device.type != "cpu" or runtime.dtype != torch.bfloat16:
        return runtime.dtype
    depthwise = any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules())
    return None if depthwise else runtime.dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for `dtype`, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_channels_last(device: torch.device) -> bool:
    """channels_last pays on CUDA tensor cores and on CPU oneDNN convolutions (36 -> 46 img/s here)."""
    return device.type in ("cuda", "cpu")


def to_input(images: torch.Tensor, device: torch.device, normalizer=None, channels_last: bool = False) -> torch.Tensor:
    """A batch as the loaders give it (uint8 images, or float features) -> the model's input on
    `device`: normalised (uint8 needs `normalizer`), channels_last for 4-d image batches when asked.
    The one copy of this step: Session.to_input (inference) and engine.to_device (training) call it."""
    x = images.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        assert normalizer is not None, "uint8 images need a Normalize module"
        x = normalizer(x)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_decode_threads(device: torch.device) -> int:
    """Image decoding threads: every core. On a CPU they take turns with the model, each using all
    the cores (see loader.py); feeding a GPU, decoding is what limits, so all of them decode."""
    return usable_cores()


@dataclass(frozen=True)
class Runtime:
    """Where and how a command computes, resolved once for the whole command."""

    device: torch.device
    dtype: torch.dtype | None  # the autocast dtype; None for plain fp32
    channels_last: bool
    decode_threads: int  # 0: decode in the calling thread
    ahead: int  # batches decoded ahead of the model: 0 on a CPU (decoders and model take turns)
    pin_memory: bool
    # --device auto chose the device: a backend that cannot use it (onnxruntime without its CUDA
    # provider) may then run on the CPU instead of refusing
    auto_device: bool = False

    @property
    def precision(self) -> str:
        return dtype_name(self.dtype)

    def autocast(self):
        return autocast(self.device, self.dtype)


def resolve_runtime(device: str = "auto", precision: str = "auto", workers: int | None = None) -> Runtime:
    """The Runtime for `--device`, `--precision` and `--workers` (decode threads; None: every
    core, shared among the processes of a torchrun job on this machine, each on its own GPU)."""
    from . import distributed

    rank = distributed.from_environment()
    torch_device = resolve_device(rank_device_spec(device, rank, torch.cuda.is_available()))
    dtype = resolve_precision(precision, torch_device)
    if workers is not None and workers < 0:
        raise UsageError(f"--workers must be 0 or more (got {workers})")
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) if rank.enabled else 1
    threads = max(1, default_decode_threads(torch_device) // local_processes) if workers is None else workers
    cpu = torch_device.type == "cpu"
    return Runtime(torch_device, dtype, use_channels_last(torch_device), threads, 0 if cpu else 3,
                   torch_device.type == "cuda", (device or "auto").strip().lower() == "auto")


def rank_device_spec(device: str | None, rank, cuda_available: bool) -> str:
    """--device for this process (`rank`: its distributed.Dist): under torchrun `auto` and `cuda`
    mean this process's own GPU, cuda:LOCAL_RANK (one GPU per process on each machine); any
    other spelling is kept as given (lower-cased) for resolve_device to check."""
    spec = (device or "auto").strip().lower()
    if rank.enabled and spec in ("auto", "cuda") and cuda_available:
        return f"cuda:{rank.local_rank}"
    return spec


@dataclass(frozen=True)
class EnvironmentInfo:
    """What `cnnxfer info` reports."""

    versions: dict
    device: str
    device_name: str
    memory_gib: float | None
    precision: str
    channels_last: bool
    threads: int
    workers: int


def describe_environment(device_spec: str = "auto", precision: str = "auto") -> EnvironmentInfo:
    from .timm_import import import_timm

    timm = import_timm()
    import torchvision

    device = resolve_device(device_spec)
    dtype = resolve_precision(precision, device)
    name, memory = platform.processor() or platform.machine(), None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, memory = props.name, props.total_memory / 2**30
    elif device.type == "mps":
        name = "Apple MPS"
    return EnvironmentInfo(
        versions={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "timm": timm.__version__,
            "cuda": torch.version.cuda or "-",
        },
        device=str(device),
        device_name=name,
        memory_gib=memory,
        precision=dtype_name(dtype),
        channels_last=use_channels_last(device),
        threads=torch.get_num_threads(),
        workers=default_decode_threads(device),
    )
