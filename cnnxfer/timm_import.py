"""`import timm` without loading `torch._dynamo`, which nothing cnnxfer runs needs.

Every command builds its model with timm, and `import timm` cost 1.6 s on a 2-core Xeon after
torch's 1.3 s, 1.1-1.2 s of it `torch._dynamo` (torch.compile's frontend), loaded twice over
while timm imports: torchvision's `ops/roi_align.py` does `from torch._dynamo.utils import
is_compile_supported`, and timm 1.0.31 decorates naflexvit and gemma methods with
`torch.compiler.disable`, which imports `torch._dynamo` to build its wrapper.

`import_timm` defers both for the length of that one import and restores torch as it was:

- `torch.compiler.disable` is, meanwhile, a decorator whose wrapper calls the real one's wrapper,
  built on the first call (a function disabled for torch.compile stays disabled: dynamo meets the
  real disabled function inside; outside torch.compile it is a plain call either way);
- `torch._dynamo.utils` is, meanwhile, a stand-in module whose one name, `is_compile_supported`,
  calls the real function (which roi_align consults only when torchvision's C++ ops are missing).

Afterwards `torch._dynamo` is absent from `sys.modules`, and the first real use (torch.compile,
torch.export) imports it as usual. If anything is other than expected (another torch or timm,
`torch._dynamo` already loaded, an error during the import), timm is imported the ordinary way.
"""
from __future__ import annotations

import functools
import importlib
import logging
import sys
import types

log = logging.getLogger(__name__)

_DYNAMO, _UTILS = "torch._dynamo", "torch._dynamo.utils"


def import_timm():
    """The timm module, imported without torch._dynamo where that can be done safely."""
    if "timm" in sys.modules or _DYNAMO in sys.modules:
        return importlib.import_module("timm")
    import torch
    import torch.compiler

    real_disable = getattr(torch.compiler, "disable", None)
    if real_disable is None:
        return importlib.import_module("timm")
    before = set(sys.modules)
    stand_ins = _stand_in_modules()
    sys.modules.update(stand_ins)
    torch.compiler.disable = _deferred(real_disable)
    try:
        timm = importlib.import_module("timm")
    except Exception as exc:  # an unexpected use of torch._dynamo while timm imports: the ordinary way
        log.debug("timm imported without its deferral (%s)", exc)
        _restore(torch, real_disable, stand_ins)
        for name in set(sys.modules) - before:
            del sys.modules[name]
        return importlib.import_module("timm")
    _restore(torch, real_disable, stand_ins)
    return timm


def _stand_in_modules() -> dict[str, types.ModuleType]:
    dynamo = types.ModuleType(_DYNAMO)
    dynamo.__path__ = []  # a package, so that its `utils` is taken from sys.modules
    utils = types.ModuleType(_UTILS)

    def is_compile_supported(device_type):
        from torch._dynamo.utils import is_compile_supported as real

        return real(device_type)

    utils.is_compile_supported = is_compile_supported
    return {_DYNAMO: dynamo, _UTILS: utils}


def _restore(torch, real_disable, stand_ins: dict) -> None:
    torch.compiler.disable = real_disable
    for name, module in stand_ins.items():
        if sys.modules.get(name) is module:
            del sys.modules[name]
    if torch.__dict__.get("_dynamo") is stand_ins[_DYNAMO]:
        del torch._dynamo


def _deferred(real_disable):
    """torch.compiler.disable, building the real disabled function on its first call."""

    def disable(fn=None, recursive=True, **kwargs):
        if fn is None:
            return lambda f: disable(f, recursive, **kwargs)
        built = []

        @functools.wraps(fn)
        def call(*args, **kw):
            if not built:
                built.append(real_disable(fn, recursive, **kwargs))
            return built[0](*args, **kw)

        return call

    return disable
