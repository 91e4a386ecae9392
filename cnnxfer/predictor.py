"""Inference behind one small interface: uint8 image batches in, logits out as numpy.

A `Predictor` knows its classes and the preprocessing its input needs (`data_config`); calling
it on a uint8 (N, 3, H, W) batch returns (N, C) float32 logits. `TorchPredictor` runs a PyTorch
model (a run directory's); export.py adds backends that run an exported ONNX or TorchScript file.
`predict_images` is the one batch loop every backend goes through, and flip test-time
augmentation is written once here (`flip_average`), for predictions and for extracted features.

This module imports neither the training engine nor `evaluate`: both import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import data, device as dev, loader as loaders
from .preprocess import Preprocess
from .signals import check_signals

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
        device, precision: where and how it computes, as the summary reports it.
        tta: "none" or "flip".
    """

    backend = ""  # what runs the model, as the summary names it
    pin_memory = False  # page-locked batches: only worth it when a GPU copies them

    def __init__(self, classes: list[str], data_config: dict, device: str, precision: str, tta: str = "none"):
        self.classes, self.data_config = list(classes), dict(data_config)
        self.device, self.precision, self.tta = device, precision, getattr(tta, "value", tta)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        if self.tta == "flip":
            return flip_average(self._logits, images)
        return self._logits(images)

    def _logits(self, images: torch.Tensor) -> np.ndarray:
        raise NotImplementedError


class TorchPredictor(Predictor):
    """A PyTorch model: normalised on the device, channels_last and autocast as the Runtime says."""

    backend = "pytorch"

    def __init__(self, model: torch.nn.Module, data_config: dict, classes: list[str], runtime: dev.Runtime,
                 tta: str = "none"):
        super().__init__(classes, data_config, str(runtime.device), runtime.precision, tta)
        model = model.eval().to(runtime.device)
        if runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.runtime, self.pin_memory = model, runtime, runtime.pin_memory
        self.normalize = Preprocess.from_data_config(data_config).normalizer().to(runtime.device)

    @classmethod
    def from_run(cls, run_dir, runtime: dev.Runtime, tta: str = "none") -> "TorchPredictor":
        """The best weights of a cnnxfer run directory, with its classes and preprocessing."""
        from . import models

        loaded = models.load_model(None, str(run_dir))
        return cls(loaded.model, loaded.data_config, loaded.classes, runtime, tta)

    @torch.inference_mode()
    def _logits(self, images: torch.Tensor) -> np.ndarray:
        x = self.normalize(images.to(self.runtime.device, non_blocking=True))
        if self.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.runtime.autocast():
            logits = self.model(x)
        return logits.float().cpu().numpy()


@dataclass
class Outputs:
    """What `predict_images` returns: one row per readable image, in the order read."""

    logits: np.ndarray  # (N, C) float32
    indices: np.ndarray  # (N,) index of each row's image in the ImageList
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (index, reason) of unreadable images


def predict_images(predictor: Predictor, images: data.ImageList, *, batch_size: int = 64, threads: int = 0,
                   max_pixels: int = data.DEFAULT_MAX_IMAGE_PIXELS, progress: Progress | None = None,
                   shard: tuple[int, int] | None = None) -> Outputs:
    """The one inference loop: decode `images` as the predictor's preprocessing says (`threads`
    decoding threads; 0 decodes in this thread), run every batch through it, keep the logits.

    `shard` (rank, world): this process's slice of every batch only (under torchrun); progress
    then counts this share for the whole job's."""
    preprocess = Preprocess.from_data_config(predictor.data_config, max_pixels=max_pixels)
    ahead = 0 if predictor.device == "cpu" else 3  # on a CPU the decoders and the model take turns (loader.py)
    loader = loaders.Loader(loaders.ImageDataset(images, preprocess), batch_size, threads=threads, ahead=ahead,
                            pin_memory=predictor.pin_memory, shard=shard)
    scale = shard[1] if shard else 1
    logits, indices, skipped, done = [], [], [], 0
    for batch in loader:
        check_signals()
        skipped += batch.skipped
        if len(batch.indices):
            logits.append(np.asarray(predictor(batch.images), dtype=np.float32))
            indices.append(batch.indices.numpy())
        done += (len(batch.indices) + len(batch.skipped)) * scale
        if progress:
            progress(min(done, len(images)), len(images))
    if not logits:
        return Outputs(np.empty((0, len(predictor.classes)), np.float32), np.empty(0, np.int64), skipped)
    return Outputs(np.concatenate(logits), np.concatenate(indices), skipped)
