"""Accuracy, loss, confusion matrix and per-class report, in numpy.

Computed from class probabilities whatever produced them (the training loop's evaluation, a
PyTorch model, an exported ONNX or TorchScript file), so every backend is scored by the same code.
Imported by the engine (the run's final validation report) and by `evaluate`; it imports neither.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd


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
    calibration: dict | None = None  # ECE, classwise ECE, NLL, Brier, reliability bins (calibration.measure)
    selective: dict | None = None  # at --min-confidence: coverage and accuracy of the images kept
    conformal: dict | None = None  # at --coverage: the prediction sets' empirical coverage and mean size
    unknown: dict | None = None  # with --unknown: AUROC and false accepts of the confidence

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy, "loss": self.loss, "images": self.images, "skipped": self.skipped,
            "data": str(self.data) if self.data else None, "trained_on": self.trained_on,
            "classes": self.classes, "confusion_matrix": self.confusion.tolist(),
            "per_class": self.report.to_dict(orient="records"),
            **{k: v for k, v in (("calibration", self.calibration), ("selective", self.selective),
                                 ("conformal", self.conformal), ("unknown", self.unknown)) if v is not None},
        }


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (the largest logit subtracted first, so nothing overflows)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def log_loss(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-probability of the true class (probabilities clipped at 1e-12)."""
    picked = np.asarray(probs)[np.arange(len(targets)), np.asarray(targets)]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


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


def summarize(probs, targets, classes: list[str], loss: float | None = None) -> Evaluation:
    """Accuracy, confusion matrix and per-class report from (N, C) probabilities (or logits: only
    the arg-max is used) and N integer targets; arrays or CPU tensors."""
    preds, y = np.asarray(probs).argmax(1), np.asarray(targets).astype(np.int64)
    cm = confusion_matrix(preds, y, len(classes))
    return Evaluation(float((preds == y).mean()), loss, classes, cm, per_class_report(cm, classes), len(y))


def save_reports(folder: Path, result: Evaluation, prefix: str = "") -> None:
    """confusion_matrix.csv (rows true, columns predicted) and report.csv, atomically."""
    from . import checkpoint

    cm = pd.DataFrame(result.confusion, index=result.classes, columns=result.classes)
    cm.index.name = "true\\predicted"
    checkpoint.atomic_write_text(Path(folder) / f"{prefix}confusion_matrix.csv", cm.to_csv())
    checkpoint.atomic_write_text(Path(folder) / f"{prefix}report.csv", result.report.to_csv(index=False, float_format="%.4f"))
