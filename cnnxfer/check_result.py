"""The result type shared by every sanity check, and the helpers that keep checks side-effect free:
a check leaves the model's parameters, buffers, `.grad`, train/eval flags and the caller's RNG
stream as it found them."""
from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn


PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
ERROR = "ERROR"  # the check itself raised: reported as what it was, not as a finding about the setup


@dataclass
class CheckResult:
    """The outcome of one check; `details` holds only JSON-serialisable values."""

    name: str
    status: str  # PASS | WARN | FAIL | SKIP | ERROR
    summary: str
    hint: str = ""
    details: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


def _jsonable(value):
    """Plain JSON types; non-finite floats become None (strict JSON has no NaN/inf)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def _timed(check):
    """Time a check and run it under a forked RNG (dropout and sampling draw random numbers)."""

    @functools.wraps(check)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            result = check(*args, **kwargs)
        result.seconds = round(time.perf_counter() - start, 4)
        return result

    return wrapper


@contextlib.contextmanager
def _restored(model: nn.Module, buffers: bool = False):
    """Restore every module's training flag (and optionally all buffers) on exit."""
    modes = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()] if buffers else []
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _to_model(model, x, y=None):
    device = _model_device(model)
    x = x.to(device)
    return (x, y.to(device)) if y is not None else x
