"""`cnnxfer inspect filters`: the first layer's filters as an image grid, and with --compare what
fine-tuning changed, layer by layer.

Each filter is one tile: its weights mapped to 0..255 with 0 at mid-grey (128), the largest |w| of
the filter (--scale filter) or of the layer (--scale layer) at 0 or 255; RGB for three input
channels, grey for one, and for any other number the channels side by side. Tiles are enlarged
by whole pixels (nearest neighbour) and laid out row by row with a one-pixel white gap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import models
from ..activations import Activations, StopForward
from ..config import InspectConfig
from ..errors import ModelError, UsageError
from . import subject as subj

TILE_PIXELS = 32  # a filter is enlarged to about this many pixels across


@dataclass
class FiltersResult:
    layer: str  # the first convolution the input meets
    weight_shape: tuple[int, ...]
    scale: str
    grid: np.ndarray  # (H, W, 3) uint8
    weights: str
    compare: str | None = None
    compare_grid: np.ndarray | None = None
    changes: list[dict] = field(default_factory=list)  # per parameter group: stage, parameters, relative_change
    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable images, with the reason


def first_conv(model: nn.Module, input_size: tuple[int, int], in_chans: int) -> str:
    """The name of the first nn.Conv2d a forward pass runs (module order can differ from it)."""
    device = next(model.parameters()).device

    def stop(name, module, args, output):
        raise StopForward()

    with torch.no_grad(), Activations(model, lambda n, m: isinstance(m, nn.Conv2d), keep=None, on_output=stop) as acts:
        try:
            model(torch.zeros((1, in_chans, *input_size), device=device))
        except StopForward:
            pass
    if not acts.order:
        raise ModelError("the model has no nn.Conv2d layer: no filters to show")
    return acts.order[0]


def filter_grid(weight: torch.Tensor, scale: str = "filter", zoom: int | None = None, gap: int = 1) -> np.ndarray:
    """(out, in, kh, kw) weights -> an (H, W, 3) uint8 grid, one tile per output filter (see module doc)."""
    w = weight.detach().float().cpu()
    out_ch, in_ch, kh, kw = w.shape
    peak = w.abs().amax(dim=(1, 2, 3), keepdim=True) if scale == "filter" else w.abs().max().expand(out_ch, 1, 1, 1)
    pixels = (127.5 + 127.5 * w / peak.clamp_min(1e-12)).round().clamp(0, 255).to(torch.uint8).numpy()
    zoom = zoom or max(1, TILE_PIXELS // max(kh, kw))
    pixels = np.repeat(np.repeat(pixels, zoom, axis=2), zoom, axis=3)
    return grid([_tile(f, gap) for f in pixels], cols=math.ceil(math.sqrt(out_ch)), gap=gap)


def _tile(f: np.ndarray, gap: int) -> np.ndarray:
    """(in, kh, kw) uint8 -> (kh, w, 3): RGB, grey, or the channels side by side."""
    if f.shape[0] == 3:
        return f.transpose(1, 2, 0)
    if f.shape[0] == 1:
        return np.repeat(f[0][:, :, None], 3, axis=2)
    kh, kw = f.shape[1:]
    out = np.full((kh, f.shape[0] * (kw + gap) - gap, 3), 255, np.uint8)
    for c, channel in enumerate(f):
        out[:, c * (kw + gap):c * (kw + gap) + kw] = channel[:, :, None]
    return out


def grid(tiles: list[np.ndarray], cols: int, gap: int = 1, background: int = 255) -> np.ndarray:
    """Equal-sized (h, w, 3) tiles row by row: tile k at row k // cols, column k % cols, with `gap`
    pixels of `background` around and between them."""
    h, w = tiles[0].shape[:2]
    rows = math.ceil(len(tiles) / cols)
    out = np.full((gap + rows * (h + gap), gap + cols * (w + gap), 3), background, np.uint8)
    for k, tile in enumerate(tiles):
        top, left = gap + (k // cols) * (h + gap), gap + (k % cols) * (w + gap)
        out[top:top + h, left:left + w] = tile
    return out


def weight_changes(after: nn.Module, before: nn.Module) -> list[dict]:
    """Per group of parameters (stem, each stage, what follows, the head): the relative change
    ||after - before|| / ||before||; parameters whose shapes differ (a new head) are left out."""
    own = dict(before.named_parameters())
    stages = subj.stages(after)
    head = models.head_parameter_names(after)
    sums: dict[str, list[float]] = {}
    seen_stage = False
    for name, p in after.named_parameters():
        stage = next((s for s in stages if name == s or name.startswith(s + ".")), None)
        seen_stage = seen_stage or stage is not None
        group = "head" if name in head else stage or ("after stages" if seen_stage else "stem")
        entry = sums.setdefault(group, [0.0, 0.0, 0, 0])
        other = own.get(name)
        if other is None or other.shape != p.shape:
            entry[3] += p.numel()
            continue
        entry[0] += float((p.detach().double().cpu() - other.detach().double().cpu()).pow(2).sum())
        entry[1] += float(other.detach().double().cpu().pow(2).sum())
        entry[2] += p.numel()
    return [{"stage": g, "parameters": int(c), "not_compared": int(n),
             "relative_change": math.sqrt(d / b) if b > 0 else (0.0 if d == 0 else math.inf)}
            for g, (d, b, c, n) in sums.items()]


def inspect_filters(subject: subj.Subject, scale: str = "filter", compare: str | None = None) -> FiltersResult:
    layer = first_conv(subject.model, subject.input_size, subject.in_chans)
    weight = subject.model.get_submodule(layer).weight
    result = FiltersResult(layer, tuple(weight.shape), scale, filter_grid(weight, scale), subject.loaded.weights)
    if compare:
        other = _load_other(subject, compare)
        if layer not in dict(other.named_modules()) or other.get_submodule(layer).weight.shape != weight.shape:
            raise UsageError(f"--compare {compare}: its {layer} does not have the shape {tuple(weight.shape)}")
        result.compare, result.compare_grid = other_source(compare), filter_grid(other.get_submodule(layer).weight, scale)
        result.changes = weight_changes(subject.model, other)
    return result


def other_source(spec: str) -> str:
    return spec if spec in (models.HUB, models.NONE) else str(Path(spec).resolve())


def _load_other(subject: subj.Subject, spec: str) -> nn.Module:
    """The same architecture with other weights (a run directory, a file, hub or none)."""
    from .. import rundir

    if rundir.is_run_dir(spec):
        loaded = models.load_model(None, spec)
        if loaded.arch != subject.loaded.arch:
            raise UsageError(f"--compare {spec} is a {loaded.arch}; the inspected model is a {subject.loaded.arch}")
        return loaded.model.eval()
    return models.load_model(subject.loaded.arch, spec).model.eval()


def save_filters(result: FiltersResult, out: Path) -> list[Path]:
    from .. import report

    files = [report.save_image(result.grid, out / "filters.png")]
    if result.compare_grid is not None:
        files.append(report.save_filters_comparison(result, out / "filters_compare.png"))
        files.append(report.save_table(result.changes, out / "weight_change.csv"))
    files.append(report.save_json({"layer": result.layer, "weight_shape": list(result.weight_shape), "scale": result.scale,
                                   "weights": result.weights, "compare": result.compare, "changes": result.changes},
                                  out / "filters.json"))
    result.files = files
    return files


def run_filters(config: InspectConfig) -> FiltersResult:
    """`cnnxfer inspect filters`: load, draw, write."""
    subject = subj.load_subject(config)
    out = subj.output_dir(config, "filters")
    result = inspect_filters(subject, config.filter_scale.value, config.compare)
    save_filters(result, out)
    return result
