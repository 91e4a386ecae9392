"""Receptive fields measured by backpropagation: which input pixels can change one unit.

Stride and kernel arithmetic breaks down on residual branches, custom modules and models written
with functional calls, so the field is measured instead: the gradient of one unit's activation
(the centre position of a layer's map, summed over its channels) with respect to the input, on a
float64 copy of the model in which every path is open, and its nonzero support is the field.

- Every path open: weights drawn positive (uniform 0.5-1.5 over fan-in), biases 0, norm layers
  at identity statistics, a positive random input. Every activation is then positive, so no ReLU
  blocks a gradient; `nn.MaxPool2d` becomes the average pool of the same window (a max sends its
  gradient to one winner, its field is the whole window); max pooling called as a function picks
  different winners in different channels, which the channel sum covers.
- Spatial statistics are cut: global pooling, squeeze-and-excitation gates and GroupNorm make
  every unit depend a little on every pixel, which says nothing about where a unit looks, so
  their reductions are detached while measuring.
- The field's size, stride and position come from the centre unit and its neighbour; when the
  field is cut off by the border of a small input, the model is measured again on a larger one,
  up to the working size (a convolutional network's geometry does not depend on the input size).
A unit whose field covers the whole working input is "global".
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..activations import Activations, capture

log = logging.getLogger(__name__)

_REDUCTIONS = {"mean", "sum", "amax", "max", "adaptive_avg_pool2d", "adaptive_max_pool2d", "adaptive_avg_pool1d"}


@dataclass(frozen=True)
class ReceptiveField:
    """Where the units of one layer look, in pixels of the model's input.

    Unit (i, j) sees rows `first[0] + stride[0] * i` up to `size[0]` rows on (and the same for
    columns), clipped to the image; `first` may be negative where the field starts in the padding.
    """

    layer: str
    input_size: tuple[int, int]  # (H, W) of the working input
    map_size: tuple[int, int] | None  # (h, w) of the layer's map; None for a vector (pooled) output
    size: tuple[int, int]  # field height and width (the input size for a vector output)
    stride: tuple[int, int]
    first: tuple[int, int]  # top-left corner of unit (0, 0)'s field
    is_global: bool
    exact: bool = True  # False: the border cut the field off even at the working size; `size` is a lower bound

    def box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of unit (i, j)'s field, half-open, clipped to the input."""
        if self.map_size is None:
            return 0, 0, self.input_size[0], self.input_size[1]
        top, left = self.first[0] + self.stride[0] * i, self.first[1] + self.stride[1] * j
        return (max(0, top), max(0, left), min(self.input_size[0], top + self.size[0]),
                min(self.input_size[1], left + self.size[1]))

    @property
    def label(self) -> str:
        if self.is_global:
            return "global"
        return f"{self.size[0]}x{self.size[1]}" if self.exact else f">={self.size[0]}x{self.size[1]}"

    def to_dict(self) -> dict:
        return {"layer": self.layer, "receptive_field": self.label, "height": self.size[0], "width": self.size[1],
                "stride_y": self.stride[0], "stride_x": self.stride[1], "first_y": self.first[0],
                "first_x": self.first[1], "global": self.is_global, "exact": self.exact}


class _Measured(NamedTuple):
    size: tuple[int, int]
    stride: tuple[int, int]  # 0 where no edge showed it
    corner: tuple[int, int]  # top-left of the centre unit's field
    unit: tuple[int, int]  # the centre unit's position in the map
    clipped: bool  # the centre unit's field touches the border: its size is a lower bound


MIN_SIDE = 32  # the smallest input a field is measured on


def measure_receptive_fields(model: nn.Module, layers: list[str], input_size: tuple[int, int],
                             in_chans: int = 3, seed: int = 0, device: torch.device | str = "cpu"
                             ) -> dict[str, ReceptiveField]:
    """The receptive field of each named layer for inputs of `input_size` (H, W).

    Measured first on a small input (the working size halved while it stays even and >= 32 px),
    then on larger ones for the layers whose field the border cut off: up to the working size,
    where a field that covers the image is "global", and once more at twice the working size for
    a field the border cuts off without covering the image. A convolutional network's field
    geometry does not depend on the input size, so the small measurements hold. `device`: where
    the float64 copy runs (a GPU is much faster; MPS has no float64, so it runs on the CPU).
    """
    device = torch.device(device)
    device = torch.device("cpu") if device.type == "mps" else device
    input_size = (int(input_size[0]), int(input_size[1]))
    maps = _map_sizes(model, layers, input_size, in_chans)
    work = _open_paths(model, seed).to(device)
    fields: dict[str, ReceptiveField] = {}
    pending = list(layers)
    for size in _probe_sizes(input_size):
        try:
            measured = _measure_at(work, pending, size, in_chans, seed)
        except Exception as exc:
            if size == input_size:
                raise
            log.debug("receptive field: the model refuses a %s input (%s)", size, exc)
            continue
        for name, m in measured.items():
            if m is None or maps[name] is None:  # a vector, or cut off from the input by a global reduction
                fields[name] = ReceptiveField(name, input_size, None, input_size, input_size, (0, 0), True)
            elif not m.clipped or size == input_size or name not in fields:
                fields[name] = _field(name, m, input_size, maps[name])
            if not (m is not None and m.clipped and not fields[name].is_global):
                pending.remove(name)
        if not pending:
            break
    return {name: fields[name] for name in layers}


def _probe_sizes(input_size: tuple[int, int]) -> list[tuple[int, int]]:
    """Smallest first: halvings of the working size, the working size, then twice it."""
    sizes = [input_size]
    while all(side % 2 == 0 and side // 2 >= MIN_SIDE for side in sizes[-1]):
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    return sizes[::-1] + [(input_size[0] * 2, input_size[1] * 2)]


def _map_sizes(model: nn.Module, layers: list[str], input_size, in_chans) -> dict[str, tuple[int, int] | None]:
    """Each layer's map (h, w) at the working size (None for vectors), from one forward without gradients."""
    param = next(model.parameters(), None)
    x = torch.zeros((1, in_chans, *input_size), device=param.device if param is not None else "cpu",
                    dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32)
    with torch.no_grad():
        outputs = capture(model, x, layers)
    return {name: tuple(t.shape[2:]) if torch.is_tensor(t) and t.dim() == 4 else None for name, t in outputs.items()}


def _field(name: str, m: _Measured, input_size: tuple[int, int], map_size: tuple[int, int]) -> ReceptiveField:
    # a stride no edge could show: the ratio of input to map, as for a field that covers the image
    stride = tuple(s or max(1, round(side / n)) for s, side, n in zip(m.stride, input_size, map_size))
    first = tuple(c - s * u for c, s, u in zip(m.corner, stride, m.unit))
    field = ReceptiveField(name, input_size, map_size, m.size, stride, first, False, not m.clipped)
    top, left, bottom, right = field.box(map_size[0] // 2, map_size[1] // 2)
    covers = top == 0 and left == 0 and bottom == input_size[0] and right == input_size[1]
    return dataclasses.replace(field, is_global=covers)


def _measure_at(work: nn.Module, layers: list[str], size: tuple[int, int], in_chans: int,
                seed: int) -> dict[str, _Measured | None]:
    """Each layer's field on positive random inputs of `size`, in one forward and one backward:
    sample 3k+0 backpropagates from layer k's centre unit, 3k+1 from the unit above it and 3k+2
    from the unit left of it (samples do not mix in eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(work.parameters()).device
    x = (0.5 + torch.rand((3 * len(layers), in_chans, *size), generator=gen, dtype=torch.float64))
    x = x.to(device).requires_grad_(True)
    with _CutSpatialStatistics(), Activations(work, layers) as acts:
        work(x)
    objective, units = x.new_zeros(()), {}
    for k, name in enumerate(layers):
        act = acts.outputs[name]
        if not torch.is_tensor(act) or act.dim() != 4 or not act.requires_grad:
            continue  # a vector, or a map cut off from the input by a global reduction: it sees everything
        h, w = act.shape[2:]
        ci, cj = h // 2, w // 2
        units[name] = [(ci, cj), (ci - 1, cj), (ci, cj - 1)]  # -1 where the map has one row or column
        for n, (i, j) in enumerate(units[name]):
            if 0 <= i < h and 0 <= j < w:
                objective = objective + act[3 * k + n, :, i, j].sum()
    if not units:
        return dict.fromkeys(layers)
    (grad,) = torch.autograd.grad(objective, x, allow_unused=True)
    support = (grad.abs().sum(1) > 0).cpu() if grad is not None else torch.zeros((len(x), *size), dtype=torch.bool)
    return {name: _measure_layer(support[3 * k:3 * k + 3], units[name], size) if name in units else None
            for k, name in enumerate(layers)}


def _measure_layer(support: torch.Tensor, units: list[tuple[int, int]], size: tuple[int, int]) -> _Measured | None:
    centre, above, left = (_bbox(m) for m in support)
    if centre is None:  # nothing reaches this unit from the input: a constant
        return None
    (ci, cj), (ni, _), (_, nj) = units
    sy = _shift(centre, above if ni >= 0 else None, 0, size[0])
    sx = _shift(centre, left if nj >= 0 else None, 1, size[1])
    clipped = centre[0] == 0 or centre[1] == 0 or centre[2] == size[0] or centre[3] == size[1]
    return _Measured((centre[2] - centre[0], centre[3] - centre[1]), (sy, sx), centre[:2], (ci, cj), clipped)


def _bbox(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right), half-open, of the True pixels."""
    rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    if len(rows) == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _shift(centre, previous, axis: int, side: int) -> int:
    """The stride along one axis: how far the field moves from the previous unit to the centre
    one, read from an edge the border cuts off in neither (0, unknown, when there is no such edge)."""
    if previous is not None:
        if previous[axis] > 0:  # then the centre's start is not cut off either
            return max(1, centre[axis] - previous[axis])
        if centre[axis + 2] < side:
            return max(1, centre[axis + 2] - previous[axis + 2])
    return 0


def _open_paths(model: nn.Module, seed: int) -> nn.Module:
    """A float64 CPU copy in eval mode in which every path passes a gradient (see the module doc)."""
    work = copy.deepcopy(model).cpu().double().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in work.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.dim() >= 2:
                    p.copy_((0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype)) / p[0].numel())
                else:
                    p.fill_(0.0 if "bias" in name else 1.0)
            for name, b in module.named_buffers(recurse=False):
                if name == "running_mean":
                    b.zero_()
                elif name == "running_var":
                    b.fill_(1.0)
            if getattr(module, "inplace", None) is True:
                module.inplace = False
    _replace_max_pools(work)
    return work


def _replace_max_pools(model: nn.Module) -> None:
    for name, child in list(model.named_children()):
        if type(child) is nn.MaxPool2d and child.dilation in (1, (1, 1)):
            setattr(model, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode))
        elif type(child) is nn.AdaptiveMaxPool2d:
            setattr(model, name, nn.AdaptiveAvgPool2d(child.output_size))
        else:
            _replace_max_pools(child)


class _CutSpatialStatistics(TorchFunctionMode):
    """Detach reductions over all spatial positions (global pooling, SE gates) and GroupNorm's
    statistics while a field is measured: they reach every pixel but say nothing about where a
    unit looks."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "group_norm":
            return _group_norm_without_statistics(*args, **kwargs)
        out = func(*args, **kwargs)
        x = args[0] if args else None
        if (name in _REDUCTIONS and torch.is_tensor(x) and x.dim() == 4 and x.shape[2] * x.shape[3] > 1
                and torch.is_tensor(out) and out.numel() == x.shape[0] * x.shape[1]):
            return out.detach()
        return out


def _group_norm_without_statistics(x, num_groups, weight=None, bias=None, eps=1e-5):
    n = x.shape[0]
    groups = x.reshape(n, num_groups, -1)
    mean = groups.mean(-1, keepdim=True).detach()
    var = groups.var(-1, unbiased=False, keepdim=True).detach()
    y = ((groups - mean) / (var + eps).sqrt()).reshape_as(x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y
