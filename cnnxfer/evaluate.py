"""Predictions, accuracy, confusion matrix and per-class report; `predict` and `evaluate` commands."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import checkpoint, data, device as dev, loader as loaders, models
from .preprocess import Preprocess
from .errors import StrictModeError, UsageError


@dataclass
class Evaluation:
    accuracy: float
    loss: float | None
    classes: list[str]
    confusion: np.ndarray  # rows: true class, columns: predicted class
    report: pd.DataFrame  # class, precision, recall, f1, support
    images: int = 0
    skipped: int = 0
    skipped_file: Path | None = None
    data: Path | None = None  # the folder evaluated (DATA's val/ when DATA holds train/ and val/)
    warnings: list[str] = field(default_factory=list)  # e.g. empty class folders
    trained_on: int = 0  # images evaluated that the run trained on: the accuracy is optimistic

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy, "loss": self.loss, "images": self.images, "skipped": self.skipped,
            "data": str(self.data) if self.data else None, "trained_on": self.trained_on,
            "classes": self.classes, "confusion_matrix": self.confusion.tolist(),
            "per_class": self.report.to_dict(orient="records"),
        }


def confusion_matrix(preds: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(targets * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_report(cm: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class, plus macro and weighted averages."""
    tp = np.diag(cm).astype(float)
    support = cm.sum(1)
    precision = np.divide(tp, cm.sum(0), out=np.zeros_like(tp), where=cm.sum(0) > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    df = pd.DataFrame({"class": classes, "precision": precision, "recall": recall, "f1": f1, "support": support})
    w = support / max(support.sum(), 1)
    averages = pd.DataFrame({
        "class": ["macro avg", "weighted avg"],
        "precision": [precision.mean(), (precision * w).sum()], "recall": [recall.mean(), (recall * w).sum()],
        "f1": [f1.mean(), (f1 * w).sum()], "support": [support.sum(), support.sum()],
    })
    return pd.concat([df, averages], ignore_index=True)


def summarize(probs: torch.Tensor, targets: torch.Tensor, classes: list[str], loss: float | None = None) -> Evaluation:
    preds, y = probs.argmax(1).numpy(), targets.numpy()
    cm = confusion_matrix(preds, y, len(classes))
    return Evaluation(float((preds == y).mean()), loss, classes, cm, per_class_report(cm, classes), len(y))


def save_reports(folder: Path, result: Evaluation, prefix: str = "") -> None:
    """confusion_matrix.csv (rows true, columns predicted) and report.csv, atomically."""
    cm = pd.DataFrame(result.confusion, index=result.classes, columns=result.classes)
    cm.index.name = "true\\predicted"
    checkpoint.atomic_write_text(Path(folder) / f"{prefix}confusion_matrix.csv", cm.to_csv())
    checkpoint.atomic_write_text(Path(folder) / f"{prefix}report.csv", result.report.to_csv(index=False, float_format="%.4f"))


@dataclass
class Predictions:
    """Class probabilities for the readable images of a folder."""

    images: data.ImageList
    probs: torch.Tensor
    indices: torch.Tensor
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"


def predict(images: data.ImageList, weights: str, *, device: str = "auto", precision: str = "auto",
            batch_size: int = 64, num_workers: int | None = None, tta: str = "none", progress=None,
            max_image_pixels: int = data.DEFAULT_MAX_IMAGE_PIXELS) -> Predictions:
    """Run a trained model (a run directory, or a model file with classes) over `images`."""
    from .engine import evaluate as run_eval

    start = time.perf_counter()
    runtime = dev.resolve_runtime(device, precision, num_workers)
    if not checkpoint.is_run_dir(weights):
        raise UsageError(f"--weights {weights} must be a cnnxfer run directory (from finetune or train)")
    loaded = models.load_model(None, weights)
    model = loaded.model.eval().to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if tta == "flip":
        model = _FlipAverage(model)
    preprocess = Preprocess.from_data_config(loaded.data_config, max_pixels=max_image_pixels)
    loader = loaders.Loader(loaders.ImageDataset(images, preprocess), batch_size, threads=runtime.decode_threads,
                            ahead=runtime.ahead, pin_memory=runtime.pin_memory)
    loss_fn = torch.nn.CrossEntropyLoss()
    stats, probs, _, indices = run_eval(model, _Progress(loader, progress, len(images)), loss_fn, runtime.device,
                                        runtime.dtype, runtime.channels_last, preprocess.normalizer().to(runtime.device))
    skipped = [(str(images.paths[i]), reason) for i, reason in stats.skipped]
    return Predictions(images, probs, indices, loaded.classes, skipped, time.perf_counter() - start, str(runtime.device))


class _FlipAverage(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return 0.5 * (self.model(x) + self.model(torch.flip(x, dims=[3])))


class _Progress:
    """Wrap a loader to report progress."""

    def __init__(self, loader, progress, total):
        self.loader, self.progress, self.total = loader, progress, total

    def __iter__(self):
        done = 0
        for batch in self.loader:
            done += len(batch.indices) + len(batch.skipped)
            if self.progress:
                self.progress(done, self.total)
            yield batch

    def __len__(self):
        return len(self.loader)


def run_classes(weights: str) -> list[str]:
    if not checkpoint.is_run_dir(weights):
        raise UsageError(f"--weights {weights} must be a cnnxfer run directory (from finetune or train)")
    classes = checkpoint.load_run_config(Path(weights)).get("classes") or []
    if not classes:
        raise UsageError(f"{weights}/config.json lists no classes")
    return classes


def write_predictions(pred: Predictions, out: Path, top_k: int = 5) -> Path:
    """One row per readable image: path, predicted class and probability, then the top-k; CSV or
    Parquet by the extension of `out`."""
    suffix = _check_out_suffix(out)
    k = max(1, min(top_k, len(pred.classes)))
    top_p, top_i = pred.probs.topk(k, dim=1)
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
    run_classes(weights)
    images = data.discover(images_path, labelled=None, classes=None)
    pred = predict(images, weights, **kwargs)
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
    classes = run_classes(weights)
    split = data.find_split_folders(Path(data_path))
    if split and "train" not in classes:  # a train/ + val/ dataset, as finetune takes it: score val/
        data_path = split[1]
    images = data.discover(data_path, labelled=True, classes=classes)
    pred = predict(images, weights, **kwargs)
    targets = torch.tensor([images.labels[i] for i in pred.indices.tolist()], dtype=torch.long)
    if len(targets) == 0:
        from .errors import DataError

        raise DataError(f"{data_path}: no image could be read")
    loss = float(torch.nn.functional.nll_loss(pred.probs.clamp_min(1e-12).log(), targets))
    result = summarize(pred.probs, targets, classes, loss)
    result.skipped, result.data, result.warnings = len(pred.skipped), Path(data_path), images.warnings
    result.trained_on = trained_on(images, pred.indices.tolist(), weights)
    if pred.skipped:
        default = skipped_file_for(json_path) if json_path else Path("evaluate.skipped.csv")
        result.skipped_file = data.write_skipped(Path(skipped_path or default), pred.skipped)
    if json_path:
        checkpoint.atomic_write_json(Path(json_path), result.to_dict())
    if strict and pred.skipped:
        raise StrictModeError(f"--strict: {len(pred.skipped)} unreadable image(s) skipped; see {result.skipped_file}")
    return result


def trained_on(images: data.ImageList, indices: list[int], weights: str) -> int:
    """How many of the evaluated images (`indices` into `images`) the run in `weights` trained on.

    The run's training images are its data folder less the validation split, which is seeded and
    so can be drawn again from its config.json. 0 when that folder is gone or moved (a relative
    path recorded from another working directory cannot be found either).
    """
    from .config import TrainConfig
    from .engine import split_data

    saved = checkpoint.load_run_config(Path(weights)).get("train_config") or {}
    if not saved.get("data") or not Path(saved["data"]).exists():
        return 0
    try:
        train, _ = split_data(TrainConfig(data=Path(saved["data"]), out=Path(weights), val_split=saved.get("val_split", 0.2),
                                          seed=saved.get("seed", 0)))
    except Exception:  # the folder changed beyond reading (a class removed...): nothing to compare with
        return 0
    seen = {os.path.realpath(p) for p in train.paths}
    return sum(os.path.realpath(images.paths[i]) in seen for i in indices)
