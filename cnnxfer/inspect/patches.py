"""`cnnxfer inspect patches`: for each unit (channel) of a layer, the K image patches that activate
it most (Zeiler & Fergus; R-CNN's "top regions" for pool5 units), each cropped to the unit's
measured receptive field.

A unit's response to an image is its largest activation over the map's positions; the K images
with the largest responses are kept (one patch per image), and the patch is the field of the
position where that maximum sits. Where the field reaches past the image border, the patch is
padded with grey so that it shows the image where the unit sees it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import data
from ..activations import capture
from ..config import InspectConfig
from ..errors import UsageError
from . import subject as subj
from .filters import grid
from .receptive import ReceptiveField, measure_receptive_fields

PATCH_PIXELS = 64  # patches are shown at this height


@dataclass
class PatchesResult:
    layer: str
    field: ReceptiveField
    units: list[int]
    top: int
    rows: list[dict]  # unit, rank, path, label, activation, row, col, top, left, bottom, right
    patches: list[list[np.ndarray]]  # per unit, best first: (h, w, 3) uint8 at the field's size
    images: int
    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable images, with the reason

    def grid(self, height: int = PATCH_PIXELS) -> np.ndarray:
        """Units as rows, their patches best first, each resized to `height` pixels."""
        tiles = []
        for unit_patches in self.patches:
            row = [_resize(p, height) for p in unit_patches]
            blank = np.full_like(row[0], 255) if row else np.full((height, height, 3), 255, np.uint8)
            tiles += row + [blank] * (self.top - len(row))
        return grid(tiles, cols=self.top, gap=2)


def top_activations(subject: subj.Subject, images: data.ImageList, layer: str, units: list[int], top: int,
                    batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, image indices, flat positions), each (units, top), best first."""
    best_v = best_i = best_p = None
    for batch in subject.batches(images, batch_size):
        with torch.no_grad(), subject.autocast():
            act = capture(subject.model, subject.normalize(batch.images), [layer])[layer].float()
        act = act.flatten(2) if act.dim() > 2 else act[:, :, None]  # (N, C, positions)
        if max(units) >= act.shape[1]:
            raise UsageError(f"--units {max(units)} is out of range: {layer} has {act.shape[1]} units (0-{act.shape[1] - 1})")
        values, positions = act[:, units].amax(dim=2), act[:, units].argmax(dim=2)  # (N, U)
        indices = batch.indices[:, None].expand_as(values).to(values.device)
        if best_v is not None:
            values, indices, positions = (torch.cat([a, b]) for a, b in ((best_v, values), (best_i, indices), (best_p, positions)))
        k = min(top, len(values))
        best_v, order = values.topk(k, dim=0)
        best_i, best_p = indices.gather(0, order), positions.gather(0, order)
    if best_v is None:
        raise UsageError("no image could be read")
    return best_v.T.cpu(), best_i.T.cpu(), best_p.T.cpu()


def find_patches(subject: subj.Subject, images: data.ImageList, layer: str, units: list[int], top: int,
                 batch_size: int = 64) -> PatchesResult:
    field_ = measure_receptive_fields(subject.model, [layer], subject.input_size, subject.in_chans,
                                      device=subject.device)[layer]
    values, indices, positions = top_activations(subject, images, layer, units, top, batch_size)
    pictures = _model_inputs(subject, images, sorted(set(indices.flatten().tolist())), batch_size)
    rows, patches = [], []
    width = field_.map_size[1] if field_.map_size else 1
    for u, unit in enumerate(units):
        unit_patches = []
        for rank in range(values.shape[1]):
            i, pos = int(indices[u, rank]), int(positions[u, rank])
            r, c = divmod(pos, width)
            box = field_.box(r, c)
            unit_patches.append(_crop(pictures[i], field_, r, c))
            label = images.labels[i]
            rows.append({"unit": unit, "rank": rank + 1, "path": str(images.paths[i]),
                         "label": images.classes[label] if label is not None else None,
                         "activation": float(values[u, rank]), "row": r, "col": c,
                         "top": box[0], "left": box[1], "bottom": box[2], "right": box[3]})
        patches.append(unit_patches)
    return PatchesResult(layer, field_, list(units), top, rows, patches, len(images))


def _model_inputs(subject: subj.Subject, images: data.ImageList, wanted: list[int], batch_size: int) -> dict[int, np.ndarray]:
    """The chosen images as the model sees them: {index: (H, W, 3) uint8}."""
    out = {}
    for batch in subject.batches(images.subset(wanted), batch_size):
        for k, picture in zip(batch.indices.tolist(), batch.images):
            out[wanted[k]] = _rgb(picture.permute(1, 2, 0).numpy())
    return out


def _rgb(picture: np.ndarray) -> np.ndarray:
    if picture.shape[2] == 3:
        return picture
    return np.repeat(picture[:, :, :1], 3, axis=2)


def _crop(picture: np.ndarray, field_: ReceptiveField, r: int, c: int) -> np.ndarray:
    """Unit (r, c)'s field of `picture`, grey where the field lies outside the image."""
    if field_.is_global or field_.map_size is None:
        return picture
    h, w = field_.size
    out = np.full((h, w, 3), 128, np.uint8)
    top, left = field_.first[0] + field_.stride[0] * r, field_.first[1] + field_.stride[1] * c
    y0, x0, y1, x1 = field_.box(r, c)
    out[y0 - top:y1 - top, x0 - left:x1 - left] = picture[y0:y1, x0:x1]
    return out


def _resize(patch: np.ndarray, height: int) -> np.ndarray:
    h, w = patch.shape[:2]
    width = max(1, round(w * height / h))
    resample = Image.NEAREST if h < height else Image.BILINEAR  # small fields: show their pixels
    return np.asarray(Image.fromarray(patch).resize((width, height), resample))


def save_patches(result: PatchesResult, out: Path) -> list[Path]:
    from .. import report

    result.files = [report.save_patches_figure(result, out / "patches.png"),
                    report.save_table(result.rows, out / "patches.csv"),
                    report.save_json({"layer": result.layer, "receptive_field": result.field.to_dict(),
                                      "units": result.units, "top": result.top, "images": result.images},
                                     out / "patches.json")]
    return result.files


def run_patches(config: InspectConfig) -> PatchesResult:
    """`cnnxfer inspect patches`: load, rank, crop, write."""
    subject = subj.load_subject(config)
    layer = subj.resolve_layer(subject.model, config.layer)
    images = subj.read_images(config)
    units = list(config.units) or list(range(config.max_units))
    if config.top < 1:
        raise UsageError(f"--top must be at least 1 (got {config.top})")
    out = subj.output_dir(config, "patches")
    units = _existing_units(subject, layer, units, explicit=bool(config.units))
    result = find_patches(subject, images, layer, units, config.top, config.batch_size)
    result.skipped = subj.write_skipped(subject, out)
    save_patches(result, out)
    return result


def _existing_units(subject: subj.Subject, layer: str, units: list[int], explicit: bool) -> list[int]:
    """The default first units, cut to the layer's width; explicit ones are checked while ranking."""
    if explicit:
        return units
    x = torch.zeros((1, subject.in_chans, *subject.input_size), device=subject.device)
    with torch.no_grad():
        width = capture(subject.model, x, [layer])[layer].shape[1]
    return [u for u in units if u < width]
