"""`cnnxfer inspect invariance`: per stage, how many units are invariant to a horizontal flip, a
vertical flip, a 2^-1/2 scale and a 90 degree rotation (the lectures' conv1 ... conv5 table).

Definition: a unit's response to an image is its activation averaged over the map's positions
(spatial average pooling). Over the images, the unit is invariant to a transform g when the
Pearson correlation between its responses to x and to g(x) is at least the threshold (0.9 by
default). A unit whose response does not vary over the images (a dead unit, say) has no
correlation: it is counted as constant, neither invariant nor not. Percentages are of all units.

The transforms act on the model's input: hflip and vflip mirror it, rot90 turns it a quarter
(counter-clockwise), scale resizes it to 2^-1/2 of its side (antialiased bilinear; a model that
only takes its own input size gets the smaller image centred on the mean colour instead).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import data
from ..activations import capture
from ..config import INVARIANCE_TRANSFORMS, InspectConfig
from ..errors import UsageError
from . import subject as subj

DEFAULT_MAX_IMAGES = 500


@dataclass
class InvarianceResult:
    threshold: float
    layers: list[str]
    transforms: list[str]
    table: list[dict]  # stage, transform, units, invariant, percent, constant
    correlations: dict[str, dict[str, list[float | None]]]  # layer -> transform -> per unit
    images: int
    scale_mode: str = "resize"  # or "pad" for models that take one input size only
    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable images, with the reason


def transform(x: torch.Tensor, name: str, scale_mode: str = "resize") -> torch.Tensor:
    """One of INVARIANCE_TRANSFORMS applied to normalised inputs (N, C, H, W)."""
    if name == "hflip":
        return torch.flip(x, dims=[3])
    if name == "vflip":
        return torch.flip(x, dims=[2])
    if name == "rot90":
        return torch.rot90(x, 1, dims=(2, 3))
    if name == "scale":
        h, w = x.shape[2:]
        small = F.interpolate(x, size=(max(1, round(h / math.sqrt(2))), max(1, round(w / math.sqrt(2)))),
                              mode="bilinear", antialias=True, align_corners=False)
        if scale_mode == "resize":
            return small
        top, left = (h - small.shape[2]) // 2, (w - small.shape[3]) // 2  # zero: the mean colour
        return F.pad(small, (left, w - small.shape[3] - left, top, h - small.shape[2] - top))
    raise UsageError(f"unknown transform '{name}'; choose from {', '.join(INVARIANCE_TRANSFORMS)}")


def pooled_responses(model, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    """Each layer's units averaged over positions: (N, units) per layer."""
    outputs = capture(model, x, layers)
    return {name: (t.float().flatten(2).mean(2) if t.dim() > 2 else t.float().flatten(1)) for name, t in outputs.items()}


def correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per column, Pearson's r between a and b over the rows; NaN where either does not vary
    (beyond rounding: a spread below a millionth of the values' size)."""
    size = np.sqrt(len(a)) * (np.abs(a).mean(0) + np.abs(b).mean(0)) + 1e-30
    a, b = a - a.mean(0), b - b.mean(0)
    sa, sb = np.sqrt((a * a).sum(0)), np.sqrt((b * b).sum(0))
    varies = (sa > 1e-6 * size) & (sb > 1e-6 * size)
    out = np.full(a.shape[1], np.nan)
    out[varies] = (a * b).sum(0)[varies] / (sa * sb)[varies]
    return out


def measure_invariance(subject: subj.Subject, images: data.ImageList, layers: list[str],
                       transforms: list[str] = INVARIANCE_TRANSFORMS, threshold: float = 0.9,
                       batch_size: int = 64) -> InvarianceResult:
    responses: dict[str, dict[str, list[np.ndarray]]] = {name: {t: [] for t in ("x", *transforms)} for name in layers}
    scale_mode, n = "resize", 0
    for batch in subject.batches(images, batch_size):
        x = subject.normalize(batch.images)
        n += len(x)
        for name in ("x", *transforms):
            with torch.no_grad(), subject.autocast():
                try:
                    pooled = pooled_responses(subject.model, x if name == "x" else transform(x, name, scale_mode), layers)
                except Exception:
                    if name != "scale" or scale_mode == "pad":
                        raise
                    scale_mode = "pad"  # the model takes one input size only
                    pooled = pooled_responses(subject.model, transform(x, name, scale_mode), layers)
            for layer, r in pooled.items():
                responses[layer][name].append(r.cpu().numpy().astype(np.float64))
    if n < 3:
        raise UsageError(f"invariance needs at least 3 readable images (got {n})")
    table, corr = [], {}
    for layer in layers:
        base = np.concatenate(responses[layer]["x"])
        corr[layer] = {}
        for t in transforms:
            r = correlations(base, np.concatenate(responses[layer][t]))
            corr[layer][t] = [None if np.isnan(v) else float(v) for v in r]
            invariant = int((r[~np.isnan(r)] >= threshold).sum())
            table.append({"stage": layer, "transform": t, "units": len(r), "invariant": invariant,
                          "percent": 100.0 * invariant / len(r) if len(r) else 0.0, "constant": int(np.isnan(r).sum())})
    return InvarianceResult(threshold, layers, list(transforms), table, corr, n, scale_mode)


def save_invariance(result: InvarianceResult, out: Path) -> list[Path]:
    from .. import report

    units = [{"stage": layer, "unit": u, **{t: result.correlations[layer][t][u] for t in result.transforms}}
             for layer in result.layers for u in range(len(result.correlations[layer][result.transforms[0]]))]
    result.files = [report.save_invariance_chart(result, out / "invariance.png"),
                    report.save_table(result.table, out / "invariance.csv"),
                    report.save_table(units, out / "invariance_units.csv"),
                    report.save_json({"threshold": result.threshold, "images": result.images, "scale_mode": result.scale_mode,
                                      "definition": __doc__.split("Definition: ", 1)[1].split("\n\n")[0].replace("\n", " "),
                                      "table": result.table}, out / "invariance.json")]
    return result.files


def run_invariance(config: InspectConfig) -> InvarianceResult:
    """`cnnxfer inspect invariance`: load, measure, write."""
    unknown = [t for t in config.transforms if t not in INVARIANCE_TRANSFORMS]
    if unknown or not config.transforms:
        raise UsageError(f"--transforms: choose from {', '.join(INVARIANCE_TRANSFORMS)} (got {', '.join(config.transforms)})")
    if not -1.0 <= config.threshold <= 1.0:
        raise UsageError(f"--threshold is a correlation, between -1 and 1 (got {config.threshold})")
    subject = subj.load_subject(config)
    layers = _layers(subject, config.layers)
    images = subj.read_images(config, limit=DEFAULT_MAX_IMAGES)
    out = subj.output_dir(config, "invariance")
    result = measure_invariance(subject, images, layers, list(config.transforms), config.threshold, config.batch_size)
    result.skipped = subj.write_skipped(subject, out)
    save_invariance(result, out)
    return result


def _layers(subject: subj.Subject, layers: tuple[str, ...]) -> list[str]:
    from .. import models

    if layers:
        return models.resolve_layers(subject.model, list(layers))
    return subj.stages(subject.model)
