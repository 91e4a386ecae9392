"""`cnnxfer inspect layers`: per stage, the output shape, stride, measured receptive field,
parameters and FLOPs (torch's own FlopCounterMode, one image at the working size; what runs
between stages counts in the next one, what follows the last in an "after the last stage" row (the head), so the rows add up),
and on images the fraction of dead units: units (channels) that are never positive, at any
position of any image (after a ReLU: always zero)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import data
from ..activations import Activations, capture
from ..config import InspectConfig
from . import subject as subj
from .receptive import measure_receptive_fields

AFTER = "after the last stage"  # the row of what runs after the last stage (pooling, the classifier); no module name has spaces


@dataclass
class LayersResult:
    input_size: tuple[int, int, int]
    rows: list[dict]  # stage, output_shape, stride, receptive_field, parameters, flops, dead_fraction
    total_parameters: int
    total_flops: int
    images: int | None  # None: no data given, no dead-unit count
    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable images, with the reason


def stage_costs(model: nn.Module, x: torch.Tensor, names: list[str]) -> tuple[dict[str, int], dict[str, int], int]:
    """Parameters and FLOPs per row (each stage, plus AFTER for what runs after the last one),
    and the FLOPs of the whole forward for the input `x`.

    Every module's own parameters and FLOPs count in the stage it belongs to, or else in the first
    stage to finish after it starts (a ResNet's conv1 and bn1 count in act1, its max pool in
    layer1), so that the rows add up to the model."""
    from torch.utils.flop_counter import FlopCounterMode

    starts: dict[str, int] = {}
    ends: dict[str, int] = {}
    clock = itertools.count()

    def started(name, module, args):
        starts.setdefault(name, next(clock))

    def finished_(name, module, args, output):
        ends.setdefault(name, next(clock))

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, Activations(model, lambda n, m: n != "<root>", keep=None, on_input=started,
                                               on_output=finished_):
        model(x)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    finished = sorted((ends[s], s) for s in names if s in ends)
    params, flops = dict.fromkeys([*names, AFTER], 0), dict.fromkeys([*names, AFTER], 0)
    for name, module in model.named_modules():
        if not name:
            continue
        row = next((s for s in names if name == s or name.startswith(s + ".")), None)
        if row is None:
            row = next((s for end, s in finished if end > starts.get(name, -1)), AFTER) if name in starts else AFTER
        params[row] += sum(p.numel() for p in module.parameters(recurse=False))
        own = _flops(counts, f"{root}.{name}") - sum(_flops(counts, f"{root}.{name}.{c}") for c, _ in module.named_children())
        flops[row] += own
    return params, flops, int(counter.get_total_flops())


def _flops(counts: dict, key: str) -> int:
    return int(sum(counts.get(key, {}).values()))


def dead_fractions(subject: subj.Subject, images: data.ImageList, names: list[str], batch_size: int) -> tuple[dict[str, float], int]:
    """Per layer, the fraction of units never positive over `images`; and how many images were read."""
    alive: dict[str, torch.Tensor] = {}
    n = 0
    for batch in subject.batches(images, batch_size):
        with torch.no_grad(), subject.autocast():
            outputs = capture(subject.model, subject.normalize(batch.images), names)
        n += len(batch.indices)
        for name, t in outputs.items():
            positive = (t.float() > 0).transpose(0, 1).reshape(t.shape[1], -1).any(dim=1)
            alive[name] = positive if name not in alive else alive[name] | positive
    return {name: 1.0 - float(a.float().mean()) for name, a in alive.items()}, n


def describe_layers(subject: subj.Subject, images: data.ImageList | None = None, batch_size: int = 64) -> LayersResult:
    model, names = subject.model, subj.stages(subject.model)
    h, w = subject.input_size
    x = torch.zeros((1, subject.in_chans, h, w), device=subject.device)
    with torch.no_grad():
        shapes = {n: tuple(t.shape[1:]) for n, t in capture(model, x, names).items()}
    fields = measure_receptive_fields(model, names, (h, w), subject.in_chans, device=subject.device)
    params, flops, total_flops = stage_costs(model, x, names)
    dead, n = dead_fractions(subject, images, names, batch_size) if images is not None else ({}, None)
    rows = [{"stage": "input", "output_shape": f"{subject.in_chans}x{h}x{w}", "stride": "1", "receptive_field": "1x1",
             "parameters": 0, "flops": 0, "dead_fraction": None}]
    for name in names:
        f = fields[name]
        rows.append({"stage": name, "output_shape": "x".join(str(v) for v in shapes[name]),
                     "stride": f"{f.stride[0]}" if f.stride[0] == f.stride[1] else f"{f.stride[0]}x{f.stride[1]}",
                     "receptive_field": f.label, "parameters": params[name], "flops": flops[name],
                     "dead_fraction": dead.get(name)})
    if params[AFTER] or flops[AFTER]:
        rows.append({"stage": AFTER, "output_shape": "", "stride": "", "receptive_field": "",
                     "parameters": params[AFTER], "flops": flops[AFTER], "dead_fraction": None})
    total = sum(p.numel() for p in model.parameters())
    rows.append({"stage": "total", "output_shape": "", "stride": "", "receptive_field": "", "parameters": total,
                 "flops": total_flops, "dead_fraction": None})
    return LayersResult((subject.in_chans, h, w), rows, total, total_flops, n)


def save_layers(result: LayersResult, out: Path) -> list[Path]:
    from .. import report

    result.files = [report.save_table(result.rows, out / "layers.csv"),
                    report.save_json({"input_size": list(result.input_size), "images": result.images,
                                      "total_parameters": result.total_parameters, "total_flops": result.total_flops,
                                      "rows": result.rows}, out / "layers.json")]
    return result.files


def run_layers(config: InspectConfig) -> LayersResult:
    """`cnnxfer inspect layers`: load, measure, write (dead units only with DATA)."""
    subject = subj.load_subject(config)
    images = subj.read_images(config) if config.data is not None else None
    out = subj.output_dir(config, "layers")
    result = describe_layers(subject, images, config.batch_size)
    result.skipped = subj.write_skipped(subject, out)
    save_layers(result, out)
    return result
