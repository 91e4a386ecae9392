"""`cnnxfer inspect errors`: the images the model gets most wrong (highest cross-entropy loss),
with true and predicted class, probability, and a class-activation heat map over each.

The heat map is Grad-CAM (Selvaraju et al. 2017): at a layer's output A (by default the last stage
whose map is at least 4 cells a side: 7x7 for a 224 px ResNet, layer2 for 32 px digits), each channel is weighted by the mean gradient of the predicted class's logit over the
map, cam = ReLU(sum_k alpha_k A_k), upsampled bilinearly to the input and scaled to 0..1: where in
the image the evidence for the wrong answer sits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import data
from ..activations import Activations
from ..config import InspectConfig
from ..errors import DataError, UsageError
from . import subject as subj

DEFAULT_TOP = 8
MIN_CAM_CELLS = 4


@dataclass
class ErrorsResult:
    rows: list[dict]  # path, true, predicted, probability, true_probability, loss, correct; worst first
    pictures: list[np.ndarray]  # (H, W, 3) uint8 model inputs of the rows
    heatmaps: list[np.ndarray]  # (H, W) float in [0, 1]
    layer: str  # where Grad-CAM looked
    images: int
    accuracy: float
    mistakes: int
    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable images, with the reason


def grad_cam(model, x: torch.Tensor, layer: str, classes: list[int]) -> np.ndarray:
    """(N, H, W) Grad-CAM maps in [0, 1] of `classes` (one per image) at `layer`."""
    x = x.detach().requires_grad_(True)  # the graph needs a leaf that wants gradients (parameters are frozen)
    with torch.enable_grad(), Activations(model, [layer]) as acts:
        logits = model(x).float()
        a = acts.outputs[layer]
        score = logits.gather(1, torch.tensor(classes, device=logits.device)[:, None]).sum()
        (grad,) = torch.autograd.grad(score, a)
    if a.dim() != 4:
        raise UsageError(f"Grad-CAM needs a spatial map; {layer} gives {tuple(a.shape)}: choose an earlier --layer")
    weights = grad.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * a.detach().float()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return (cam / peak).cpu().numpy()


def cam_layer(subject: subj.Subject, layer: str | None) -> str:
    """--layer, else the last stage whose map is at least MIN_CAM_CELLS on a side (else the last
    stage with a map larger than 1x1)."""
    if layer is not None:
        return subj.resolve_layer(subject.model, layer)
    from ..activations import capture

    names = subj.stages(subject.model)
    x = torch.zeros((1, subject.in_chans, *subject.input_size), device=subject.device)
    with torch.no_grad():
        outputs = capture(subject.model, x, names)
    spatial = [n for n in names if outputs[n].dim() == 4 and min(outputs[n].shape[2:]) > 1]
    if not spatial:
        raise UsageError("the model has no stage with a spatial map for the heat maps; give --layer")
    # a map of a few cells (the last stage of a small input) paints blocks: prefer one with 4+ cells a side
    fine = [n for n in spatial if min(outputs[n].shape[2:]) >= MIN_CAM_CELLS]
    return (fine or spatial)[-1]


def find_errors(subject: subj.Subject, images: data.ImageList, top: int = DEFAULT_TOP, layer: str | None = None,
                batch_size: int = 64) -> ErrorsResult:
    losses, preds, probs, true_probs, indices = [], [], [], [], []
    for batch in subject.batches(images, batch_size):
        with torch.no_grad(), subject.autocast():
            p = subject.model(subject.normalize(batch.images)).float().softmax(dim=1).cpu()
        y = batch.labels
        losses.append(-p.gather(1, y[:, None])[:, 0].clamp_min(1e-12).log())
        preds.append(p.argmax(1))
        probs.append(p.amax(1))
        true_probs.append(p.gather(1, y[:, None])[:, 0])
        indices.append(batch.indices)
    if not losses:
        raise DataError("no image could be read")
    losses, preds, probs, true_probs, indices = (torch.cat(t) for t in (losses, preds, probs, true_probs, indices))
    labels = torch.tensor([images.labels[i] for i in indices.tolist()])
    worst = losses.argsort(descending=True)[:top].tolist()
    layer = cam_layer(subject, layer)
    chosen = [int(indices[k]) for k in worst]
    pictures, heatmaps = _pictures_and_maps(subject, images, chosen, [int(preds[k]) for k in worst], layer, batch_size)
    classes = subject.classes
    rows = [{"path": str(images.paths[int(indices[k])]), "true": classes[int(labels[k])], "predicted": classes[int(preds[k])],
             "probability": float(probs[k]), "true_probability": float(true_probs[k]), "loss": float(losses[k]),
             "correct": bool(preds[k] == labels[k])} for k in worst]
    correct = (preds == labels)
    return ErrorsResult(rows, pictures, heatmaps, layer, len(losses), float(correct.float().mean()), int((~correct).sum()))


def _pictures_and_maps(subject, images, chosen, predicted, layer, batch_size):
    pictures, heatmaps = [], []
    order = {i: k for k, i in enumerate(chosen)}
    found: dict[int, tuple] = {}
    for batch in subject.batches(images.subset(chosen), batch_size):
        x = subject.normalize(batch.images)
        maps = grad_cam(subject.model, x, layer, [predicted[k] for k in batch.indices.tolist()])
        for k, picture, cam in zip(batch.indices.tolist(), batch.images, maps):
            picture = picture.permute(1, 2, 0).numpy()
            found[chosen[k]] = (np.repeat(picture, 3, axis=2) if picture.shape[2] == 1 else picture, cam)
    for i in sorted(found, key=order.get):
        pictures.append(found[i][0])
        heatmaps.append(found[i][1])
    return pictures, heatmaps


def read_labelled(config: InspectConfig, subject: subj.Subject) -> data.ImageList:
    """DATA's class folders, as the run's classes (a run directory), or in folder order for a
    weights file whose head has one output per folder."""
    if subject.loaded.classes:
        return subj.read_images(config, labelled=True, classes=subject.loaded.classes)
    images = subj.read_images(config, labelled=True)
    outputs = len(subject.classes)
    if len(images.classes) != outputs:
        raise UsageError(f"--weights {subject.loaded.weights}: the model has {outputs} outputs and DATA has "
                         f"{len(images.classes)} classes; give a cnnxfer run directory (it names its classes) or "
                         "weights whose head has one output per class folder (in sorted order)")
    subject.loaded.classes = list(images.classes)
    return images


def save_errors(result: ErrorsResult, out: Path) -> list[Path]:
    from .. import report

    result.files = [report.save_errors_figure(result, out / "errors.png"),
                    report.save_table(result.rows, out / "errors.csv"),
                    report.save_json({"images": result.images, "accuracy": result.accuracy, "mistakes": result.mistakes,
                                      "cam_layer": result.layer, "rows": result.rows}, out / "errors.json")]
    return result.files


def run_errors(config: InspectConfig) -> ErrorsResult:
    """`cnnxfer inspect errors`: load, score every image, heat maps for the worst, write."""
    subject = subj.load_subject(config)
    images = read_labelled(config, subject)
    if config.top < 1:
        raise UsageError(f"--top must be at least 1 (got {config.top})")
    out = subj.output_dir(config, "errors")
    result = find_errors(subject, images, config.top, config.layer, config.batch_size)
    result.skipped = subj.write_skipped(subject, out)
    save_errors(result, out)
    return result
