"""`predict` and `evaluate`: any model behind the Predictor interface over a folder of images.

A run directory runs in PyTorch (predictor.TorchPredictor); a file written by `cnnxfer export`
runs in onnxruntime or TorchScript (export.py) with the preprocessing it carries. Both go through
the same batch loop (predictor.predict_images) and the same numpy metrics (metrics.py). Each
command opens one Session (session.py): the device, the precision, and under torchrun each
process's share of the images, gathered in image order at the end.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import checkpoint, data, rundir
from .config import EvaluateConfig, Precision, PredictConfig, Tta
from .errors import DataError, StrictModeError, UsageError
from .metrics import Evaluation, log_loss, softmax, summarize
from .predictor import Predictor, TorchPredictor, predict_images
from .session import Session, open_session

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


def load_predictor(weights: str, session: Session, *, precision: Precision | str = Precision.auto,
                   tta: Tta | str = Tta.none) -> Predictor:
    """The Predictor for `--weights` on `session`: a run directory in PyTorch (in the session's
    precision), an exported file in its runtime (in its own: `precision` other than auto must name it)."""
    if rundir.is_run_dir(weights):
        return TorchPredictor.from_run(weights, session, tta)
    from . import export

    if export.is_exported(weights):
        return export.load_predictor(Path(weights), session, precision=precision, tta=tta)
    raise UsageError(f"--weights {weights} must be {WEIGHTS_HELP}")


def predict(images: data.ImageList, weights: str, session: Session, *, precision: Precision | str = Precision.auto,
            tta: Tta | str = Tta.none, batch_size: int = 64, progress=None,
            max_image_pixels: int = data.DEFAULT_MAX_IMAGE_PIXELS) -> Predictions:
    """Run a trained model (a run directory, or a file from `cnnxfer export`) over `images` on
    `session`; under torchrun each process predicts its share and every process gets them all."""
    start = time.perf_counter()
    predictor = load_predictor(weights, session, precision=precision, tta=tta)
    out = predict_images(predictor, images, batch_size=batch_size, max_pixels=max_image_pixels, progress=progress)
    indices, logits = session.gather(out.indices, out.logits)
    skipped = sorted(s for part in session.gather_objects(out.skipped) for s in part)
    skipped = [(str(images.paths[i]), reason) for i, reason in skipped]
    return Predictions(images, softmax(logits), indices, predictor.classes, skipped, time.perf_counter() - start,
                       predictor.device, predictor.backend)


def session_precision(weights: str, precision: Precision | str) -> Precision | str:
    """The precision to open a command's Session with: --precision for a run directory; fp32 for an
    exported file, which computes in its own (load_predictor checks --precision against it)."""
    return precision if rundir.is_run_dir(weights) else Precision.fp32


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


def predict_folder(config: PredictConfig, progress=None) -> Predictions:
    """`cnnxfer predict`: top-k classes per image to CSV/Parquet, unreadable files listed beside it."""
    out = Path(config.out)
    checkpoint.prepare_output(out, config.overwrite)
    _check_out_suffix(out)  # options first: a bad one is named before any image is read
    model_classes(config.weights)
    images = data.discover(config.images, labelled=None, classes=None)
    with open_session(config.device, session_precision(config.weights, config.precision), config.num_workers) as session:
        pred = predict(images, config.weights, session, precision=config.precision, tta=config.tta,
                       batch_size=config.batch_size, progress=progress, max_image_pixels=config.max_image_pixels)
    if session.is_main:  # under torchrun every process predicted its share; rank 0 writes them all
        write_predictions(pred, out, config.top_k)
        data.write_skipped(skipped_file_for(out), pred.skipped)
    if config.strict and pred.skipped:
        raise StrictModeError(f"--strict: {len(pred.skipped)} unreadable image(s) skipped; see {skipped_file_for(out)}")
    return pred


def evaluate_folder(config: EvaluateConfig, progress=None) -> Evaluation:
    """`cnnxfer evaluate`: accuracy, per-class report and confusion matrix on a labelled folder.

    Unreadable images are listed in `config.skipped_path` (default: beside `config.json_path`, else
    evaluate.skipped.csv in the current folder, like sanity-check's list).
    """
    weights, json_path = config.weights, config.json_path
    classes = model_classes(weights)
    data_path = Path(config.data)
    split = data.find_split_folders(data_path)
    if split and "train" not in classes:  # a train/ + val/ dataset, as finetune takes it: score val/
        data_path = split[1]
    images = data.discover(data_path, labelled=True, classes=classes)
    with open_session(config.device, session_precision(weights, config.precision), config.num_workers) as session:
        pred = predict(images, weights, session, precision=config.precision, tta=config.tta,
                       batch_size=config.batch_size, progress=progress, max_image_pixels=config.max_image_pixels)
    targets = np.array([images.labels[i] for i in pred.indices.tolist()], dtype=np.int64)
    if len(targets) == 0:
        raise DataError(f"{data_path}: no image could be read")
    result = summarize(pred.probs, targets, classes, log_loss(pred.probs, targets))
    result.skipped, result.data, result.warnings = len(pred.skipped), Path(data_path), images.warnings
    result.trained_on = trained_on(images, pred.indices.tolist(), weights)
    if pred.skipped:
        default = skipped_file_for(json_path) if json_path else Path("evaluate.skipped.csv")
        result.skipped_file = Path(config.skipped_path or default)
        if session.is_main:
            data.write_skipped(result.skipped_file, pred.skipped)
    if json_path and session.is_main:
        checkpoint.atomic_write_json(Path(json_path), result.to_dict())
    if config.strict and pred.skipped:
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
