"""`--strategy auto` with no validation images: the probe and probe-then-fine-tune compared by
k-fold cross-validation on the training images.

With a validation set, auto keeps whichever of the probe (epoch 0) and the fine-tuned epochs
validates better. Without one (`--val-split 0`, or classes too small to hold an image out) nothing
held out can say so, and the last epoch would be kept blindly. Each fold here is an ordinary auto
run on the other folds' images, validated on its own: the probe and the fine-tuned model (its last
epoch, what the whole run will keep) are scored on the same held-out images. The folds' images are
symbolic links in a temporary folder; the user's folder is only read.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .config import Strategy, TrainConfig
from .data import ImageList

FOLDS = 3  # each fold is a whole (small) fine-tuning run


@dataclass
class CrossValidation:
    """Held-out figures of the two candidates, pooled over the folds."""

    folds: int
    images: int
    probe_accuracy: float
    probe_loss: float  # the calibrated cross-entropy (probe.calibrated_nll), pooled
    finetuned_accuracy: float
    finetuned_loss: float
    seconds: float

    @property
    def winner(self) -> str:
        """"probe" or "fine-tuned": the rule of validation images (probe.beats_probe), on the pooled
        held-out figures."""
        from .probe import beats_probe

        tuned = {"val_accuracy": self.finetuned_accuracy, "val_loss_calibrated": self.finetuned_loss}
        probe = {"val_accuracy": self.probe_accuracy, "val_loss_calibrated": self.probe_loss}
        return "fine-tuned" if beats_probe(tuned, probe) else "probe"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "winner": self.winner}


def cross_validate(config: TrainConfig, images: ImageList, fit: Callable[[TrainConfig], object]) -> CrossValidation | None:
    """Score the probe and fine-tuning by k-fold cross-validation (k = FOLDS, fewer when the smallest
    class has fewer images; None below 2). `fit` runs one fold into a new folder (training.fit with overwrite)."""
    from .data import stratified_folds

    labels = np.asarray(images.labels)
    counts = np.bincount(labels, minlength=len(images.classes))
    k = min(FOLDS, int(counts[counts > 0].min()))
    if k < 2:
        return None
    start = time.perf_counter()
    pooled = np.zeros(4)  # probe right, probe loss sum, fine-tuned right, fine-tuned loss sum
    with tempfile.TemporaryDirectory(prefix="cnnxfer-cv-") as tmp:
        for fold, (train, held) in enumerate(stratified_folds(labels, k, config.seed)):
            root = Path(tmp) / f"fold{fold}"
            _link(images, train, root / "train")
            _link(images, held, root / "val")
            run = fit(dataclasses.replace(config, data=root, out=Path(tmp) / f"run{fold}", strategy=Strategy.auto,
                                          patience=None))
            probe, last = run.history[0], run.history[-1]
            n = len(held)
            pooled += [probe["val_accuracy"] * n, probe["val_loss_calibrated"] * n, last["val_accuracy"] * n,
                       last.get("val_loss_calibrated", last["val_loss"]) * n]
    n = len(labels)
    return CrossValidation(k, n, pooled[0] / n, pooled[1] / n, pooled[2] / n, pooled[3] / n, time.perf_counter() - start)


def _link(images: ImageList, indices, root: Path) -> None:
    """Class folders of symbolic links to the chosen images (numbered: two classes' files may share a name)."""
    for i in indices:
        path = Path(images.paths[i])
        folder = root / images.classes[images.labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.abspath(path), folder / f"{i:07d}{path.suffix}")
