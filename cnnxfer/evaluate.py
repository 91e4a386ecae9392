"""`predict` and `evaluate`: any model behind the Predictor interface over a folder of images.

A run directory runs in PyTorch (predictor.TorchPredictor); a file written by `cnnxfer export`
runs in onnxruntime or TorchScript (export.py) with the preprocessing it carries. Both go through
the same batch loop (predictor.predict_images) and the same numpy metrics (metrics.py).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import checkpoint, data, device as dev, distributed, rundir
from .errors import DataError, StrictModeError, UsageError
from .metrics import Evaluation, log_loss, softmax, summarize
from .predictor import Predictor, TorchPredictor, predict_images

WEIGHTS_HELP = "a cnnxfer run directory (from finetune or train) or a file from `cnnxfer export` (.onnx, TorchScript)"


@dataclass
class Predictions:
    """Class probabilities for the readable images of a folder."""

    images: data.ImageList
    probs: np.ndarray  # (N, C), rows in the order of `indices`
    indices: np.ndarray  # index of each row's image in `images`
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    backend: str = "pytorch"


def load_predictor(weights: str, *, device: str = "auto", precision: str = "auto", tta: str = "none") -> Predictor:
    """The Predictor for `--weights`: a run directory in PyTorch, an exported file in its runtime."""
    if rundir.is_run_dir(weights):
        return TorchPredictor.from_run(weights, dev.resolve_runtime(device, precision, 0), tta)
    from . import export

    if export.is_exported(weights):
        return export.load_predictor(Path(weights), device=device, precision=precision, tta=tta)
    raise UsageError(f"--weights {weights} must be {WEIGHTS_HELP}")


def predict(images: data.ImageList, weights: str, *, device: str = "auto", precision: str = "auto",
            batch_size: int = 64, num_workers: int | None = None, tta: str = "none", progress=None,
            max_image_pixels: int = data.DEFAULT_MAX_IMAGE_PIXELS) -> Predictions:
    """Run a trained model (a run directory, or a file from `cnnxfer export`) over `images`."""
    start = time.perf_counter()
    if num_workers is not None and num_workers < 0:
        raise UsageError(f"--workers must be 0 or more (got {num_workers})")
    predictor = load_predictor(weights, device=device, precision=precision, tta=getattr(tta, "value", tta))
    rank = distributed.current()  # under torchrun: this process's slice of every batch, then all gathered
    threads = dev.usable_cores() if num_workers is None else num_workers
    out = predict_images(predictor, images, batch_size=batch_size, threads=threads, max_pixels=max_image_pixels,
                         progress=progress, shard=(rank.rank, rank.world) if rank.enabled else None)
    logits, indices, skipped_at = _gathered(out.logits, out.indices, out.skipped)
    skipped = [(str(images.paths[i]), reason) for i, reason in skipped_at]
    return Predictions(images, softmax(logits), indices, predictor.classes, skipped, time.perf_counter() - start,
                       predictor.device, predictor.backend)


def model_classes(weights: str) -> list[str]:
    """The class names of `--weights` (a run directory or an exported file), read without loading it."""
    if rundir.is_run_dir(weights):
        classes = rundir.read_config(Path(weights)).classes
        if not classes:
            raise UsageError(f"{weights}/config.json lists no classes")
        return classes
    from . import export

    if export.is_exported(weights):
        return export.read_info(Path(weights)).classes
    raise UsageError(f"--weights {weights} must be {WEIGHTS_HELP}")


def _gathered(logits: np.ndarray, indices: np.ndarray, skipped: list):
    """Every process's logits in image order, and every skipped image (one process: as they are)."""
    if not distributed.current().enabled:
        return logits, indices, skipped
    parts = distributed.all_gather((logits, indices, skipped))
    rows = [p for p in parts if len(p[1])]
    skipped = sorted(s for p in parts for s in p[2])
    if not rows:
        return logits, indices, skipped
    logits, indices = np.concatenate([p[0] for p in rows]), np.concatenate([p[1] for p in rows])
    order = np.argsort(indices, kind="stable")
    return logits[order], indices[order], skipped


def write_predictions(pred: Predictions, out: Path, top_k: int = 5) -> Path:
    """One row per readable image: path, predicted class and probability, then the top-k; CSV or
    Parquet by the extension of `out`."""
    suffix = _check_out_suffix(out)
    k = max(1, min(top_k, len(pred.classes)))
    top_i = np.argsort(-pred.probs, axis=1, kind="stable")[:, :k]
    top_p = np.take_along_axis(pred.probs, top_i, axis=1)
    rows = {"path": [str(pred.images.paths[i]) for i in pred.indices.tolist()]}
    if pred.images.labelled:
        rows["label"] = [pred.images.classes[pred.images.labels[i]] for i in pred.indices.tolist()]
    rows["prediction"] = [pred.classes[i] for i in top_i[:, 0].tolist()]
    rows["probability"] = top_p[:, 0].tolist()
    for j in range(k):
        rows[f"top{j + 1}_class"] = [pred.classes[i] for i in top_i[:, j].tolist()]
        rows[f"top{j + 1}_prob"] = top_p[:, j].tolist()
    df = pd.DataFrame(rows)
    with checkpoint.atomic_path(Path(out)) as tmp:
        df.to_csv(tmp, index=False) if suffix == ".csv" else df.to_parquet(tmp, index=False)
    return Path(out)


def _check_out_suffix(out: Path) -> str:
    suffix = Path(out).suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise UsageError(f"--out {out}: use a .csv or .parquet file name")
    return suffix


def skipped_file_for(out: Path) -> Path:
    from .features import skipped_path

    return skipped_path(Path(out))


def predict_folder(images_path: Path, weights: str, out: Path, *, top_k: int = 5, overwrite: bool = False,
                   strict: bool = False, **kwargs) -> Predictions:
    """`cnnxfer predict`: top-k classes per image to CSV/Parquet, unreadable files listed beside it."""
    checkpoint.prepare_output(out, overwrite)
    _check_out_suffix(out)  # options first: a bad one is named before any image is read
    model_classes(weights)
    images = data.discover(images_path, labelled=None, classes=None)
    with distributed.session(dev.resolve_runtime(kwargs.get("device", "auto")).device.type) as rank:
        pred = predict(images, weights, **kwargs)
    if rank.is_main:  # under torchrun every process predicted its share; rank 0 writes them all
        write_predictions(pred, out, top_k)
        data.write_skipped(skipped_file_for(out), pred.skipped)
    if strict and pred.skipped:
        raise StrictModeError(f"--strict: {len(pred.skipped)} unreadable image(s) skipped; see {skipped_file_for(out)}")
    return pred


def evaluate_folder(data_path: Path, weights: str, *, json_path: Path | None = None, strict: bool = False,
                    skipped_path: Path | None = None, **kwargs) -> Evaluation:
    """`cnnxfer evaluate`: accuracy, per-class report and confusion matrix on a labelled folder.

    Args:
        skipped_path: where unreadable images are listed (default: beside `json_path`, else
            evaluate.skipped.csv in the current folder, like sanity-check's list).
    """
    classes = model_classes(weights)
    split = data.find_split_folders(Path(data_path))
    if split and "train" not in classes:  # a train/ + val/ dataset, as finetune takes it: score val/
        data_path = split[1]
    images = data.discover(data_path, labelled=True, classes=classes)
    with distributed.session(dev.resolve_runtime(kwargs.get("device", "auto")).device.type) as rank:
        pred = predict(images, weights, **kwargs)
    targets = np.array([images.labels[i] for i in pred.indices.tolist()], dtype=np.int64)
    if len(targets) == 0:
        raise DataError(f"{data_path}: no image could be read")
    result = summarize(pred.probs, targets, classes, log_loss(pred.probs, targets))
    result.skipped, result.data, result.warnings = len(pred.skipped), Path(data_path), images.warnings
    result.trained_on = trained_on(images, pred.indices.tolist(), weights)
    if pred.skipped:
        default = skipped_file_for(json_path) if json_path else Path("evaluate.skipped.csv")
        result.skipped_file = Path(skipped_path or default)
        if rank.is_main:
            data.write_skipped(result.skipped_file, pred.skipped)
    if json_path and rank.is_main:
        checkpoint.atomic_write_json(Path(json_path), result.to_dict())
    if strict and pred.skipped:
        raise StrictModeError(f"--strict: {len(pred.skipped)} unreadable image(s) skipped; see {result.skipped_file}")
    return result


def trained_on(images: data.ImageList, indices: list[int], weights: str) -> int:
    """How many of the evaluated images (`indices` into `images`) the run in `weights` trained on.

    The run's training images are those its splits.csv lists (recipe.run_split); its validation images
    too when the kept probe was fitted again on both (probing.ProbeStage.refit_kept). 0 for an exported file, and
    for an older run without splits.csv whose data folder is gone or moved.
    """
    from .recipe import run_split

    if not rundir.is_run_dir(weights):
        return 0
    run, split = rundir.read_config(weights), run_split(weights)
    if split is None:
        return 0
    train, val = split
    refit = (run.probe or {}).get("refit") and (run.best or {}).get("epoch") == 0
    seen = {os.path.realpath(p) for p in [*train.paths, *(val.paths if refit else [])]}
    return sum(os.path.realpath(images.paths[i]) in seen for i in indices)
