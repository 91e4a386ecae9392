"""Inference behind one small interface: uint8 image batches in, logits out as numpy.

A `Predictor` knows its classes, the preprocessing its input needs (`data_config`) and the
command's Session; calling it on a uint8 (N, 3, H, W) batch as the loader gives it (on the CPU)
returns (N, C) float32 logits. `TorchPredictor` runs a PyTorch model (a run directory's) on the
Session's device; export.py adds backends that run an exported ONNX or TorchScript file, which
place their input themselves. `predict_images` is the one batch loop every backend goes through
(Session.infer), and flip test-time augmentation is written once here (`flip_average`), for
predictions and for extracted features.

This module imports neither the training engine nor `evaluate`: both import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import data, loader as loaders
from .config import Tta
from .preprocess import Normalize, Preprocess
from .session import Session

Progress = Callable[[int, int], None]  # (images done, total images)


def _mirror(x):
    """Left-right mirror of an image batch (last axis = width), tensor or array."""
    if isinstance(x, torch.Tensor):
        return torch.flip(x, dims=[-1])
    return np.ascontiguousarray(x[..., ::-1])


def flip_average(forward: Callable, x):
    """Flip test-time augmentation: `forward(x)` averaged with `forward` of the mirrored batch.
    `forward` may return a tensor, an array or a dict of them (extract's feature columns)."""
    a, b = forward(x), forward(_mirror(x))
    if isinstance(a, dict):
        return {k: 0.5 * (v + b[k]) for k, v in a.items()}
    return 0.5 * (a + b)


class Predictor:
    """uint8 (N, 3, H, W) batches -> (N, C) float32 logits, with what the input must look like.

    Attributes:
        classes: the class name of each logit.
        data_config: timm's preprocessing keys (input_size, interpolation, mean, std, crop_pct,
            crop_mode): how files become the uint8 batches this predictor takes.
        session: the command's Session: decode threads, this process's share under torchrun and,
            for a PyTorch model, where and how it computes.
        device, precision: where and how it computes, as the summary reports it.
        tta: none or flip.
    """

    backend = ""  # what runs the model, as the summary names it
    pin_memory = False  # page-locked batches: only worth it when a GPU copies them
    calibration: dict | None = None  # the temperature and conformal scores fitted for it (calibration.fit)

    def __init__(self, classes: list[str], data_config: dict, session: Session, device: str, precision: str,
                 tta: Tta | str = Tta.none):
        self.classes, self.data_config, self.session = list(classes), dict(data_config), session
        self.device, self.precision, self.tta = device, precision, Tta(tta)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        if self.tta == Tta.flip:
            return flip_average(self._logits, images)
        return self._logits(images)

    def _logits(self, images: torch.Tensor) -> np.ndarray:
        raise NotImplementedError


class TorchPredictor(Predictor):
    """A PyTorch model, placed, normalised, channels_last and in autocast as the Session says."""

    backend = "pytorch"

    def __init__(self, model: torch.nn.Module, data_config: dict, classes: list[str], session: Session,
                 tta: Tta | str = Tta.none):
        super().__init__(classes, data_config, session, str(session.device), session.precision, tta)
        self.model, self.pin_memory = session.place(model.eval()), session.runtime.pin_memory
        self.normalize = Normalize(data_config["mean"], data_config["std"]).to(session.device)

    @classmethod
    def from_run(cls, run_dir, session: Session, tta: Tta | str = Tta.none) -> "TorchPredictor":
        """The best weights of a cnnxfer run directory, with its classes and preprocessing."""
        from . import models

        from . import rundir

        loaded = models.load_model(None, str(run_dir))
        predictor = cls(loaded.model, loaded.data_config, loaded.classes, session, tta)
        predictor.calibration = rundir.read_config(run_dir).calibration
        return predictor

    @torch.inference_mode()
    def _logits(self, images: torch.Tensor) -> np.ndarray:
        with self.session.autocast():
            logits = self.model(self.session.to_input(images, self.normalize))
        return logits.float().cpu().numpy()


class FeaturePredictor(TorchPredictor):
    """The pooled features a run's classifier takes (models.pre_logits) in place of its logits: the
    same batch loop, for distances in feature space (evaluate --unknown)."""

    backend = "pytorch features"

    @torch.inference_mode()
    def _logits(self, images: torch.Tensor) -> np.ndarray:
        from .models import pre_logits

        with self.session.autocast():
            features = pre_logits(self.model, self.session.to_input(images, self.normalize))
        return features.float().cpu().numpy()


@dataclass
class Outputs:
    """What `predict_images` returns: one row per readable image, in the order read."""

    logits: np.ndarray  # (N, C) float32
    indices: np.ndarray  # (N,) index of each row's image in the ImageList
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (index, reason) of unreadable images


def predict_images(predictor: Predictor, images: data.ImageList, *, batch_size: int = 64,
                   max_pixels: int = data.DEFAULT_MAX_IMAGE_PIXELS, progress: Progress | None = None) -> Outputs:
    """The one inference loop: decode `images` as the predictor's preprocessing says, run every
    batch through it (Session.infer), keep the logits.

    Under torchrun (the predictor's session joined to the job) this process takes its slice of
    every batch only; progress then counts this share for the whole job's."""
    session = predictor.session
    preprocess = Preprocess.from_data_config(predictor.data_config, max_pixels=max_pixels)
    # an exported file's runtime may compute on the CPU beside a GPU session: the decoders then take turns with it
    ahead = 0 if predictor.device == "cpu" else session.runtime.ahead
    loader = session.loader(loaders.ImageDataset(images, preprocess), batch_size, ahead=ahead,
                            pin_memory=predictor.pin_memory)
    logits, indices, skipped, done = [], [], [], 0
    for batch, out in session.infer(loader, predictor, raw=True):  # the predictor places its input itself
        skipped += batch.skipped
        if out is not None:
            logits.append(np.asarray(out, dtype=np.float32))
            indices.append(batch.indices.numpy())
        done += (len(batch.indices) + len(batch.skipped)) * session.world
        if progress:
            progress(min(done, len(images)), len(images))
    if not logits:
        return Outputs(np.empty((0, len(predictor.classes)), np.float32), np.empty(0, np.int64), skipped)
    return Outputs(np.concatenate(logits), np.concatenate(indices), skipped)
