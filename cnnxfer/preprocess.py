"""Preprocessing as one object: from an image file to the tensor the model sees.

A `Preprocess` holds the model's data config (input size, interpolation, mean/std, crop) and
the reader's options (pixel limit, augmentation). Every reader - extract, finetune/train,
predict, evaluate, sanity-check, the in-memory image cache, and later export and inspect -
takes the same four things from it:

- `decode(path)`: the file decoded at the working resolution (`data.decode_image` given this
  object's geometry), never at more pixels than the transform uses;
- `transform(image, seed)`: PIL image -> uint8 CHW tensor: timm's eval transform, or for training
  a random resized crop + flip drawn from a per-sample seed;
- `normalizer()`: a module that turns uint8 batches into normalised floats on the device;
- the geometry: `max_reduction` (how much smaller than the file an image may be decoded) and
  `crop_box` (which pixels of the original image the model sees).
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import data

_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
             "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


@dataclass(frozen=True)
class Augment:
    """Training augmentation: timm's random resized crop (area `scale`, aspect `ratio`) and a
    horizontal flip with probability `hflip`."""

    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5


@dataclass(frozen=True)
class Preprocess:
    """File -> model input for one model and one reader. Frozen: share it between threads freely."""

    input_size: tuple[int, int, int]
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    crop_mode: str = "center"
    max_pixels: int = data.DEFAULT_MAX_IMAGE_PIXELS
    augment: Augment | None = None  # None: the deterministic eval transform
    # Decode as the training transform needs even when this reader does not augment: training
    # images read by both transforms (the linear strategy's feature pass, the image cache) then
    # decode alike, so cached and streamed items are the same pixels.
    decode_for: Augment | None = None
    reduced_decode: bool = True
    # called with (path, decoded image, displayed size) from the decoding thread: the audit's image
    # quality and content hash, computed on the decode the features need anyway
    observe: Callable[[Path, Image.Image, tuple[int, int]], None] | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def from_data_config(cls, data_config: dict, *, max_pixels: int = data.DEFAULT_MAX_IMAGE_PIXELS,
                         reduced_decode: bool = True, observe=None) -> "Preprocess":
        c = data_config
        return cls(tuple(int(v) for v in c["input_size"]), c.get("interpolation", "bilinear"),
                   tuple(float(v) for v in c["mean"]), tuple(float(v) for v in c["std"]),
                   float(c.get("crop_pct") or 0.875), c.get("crop_mode") or "center", max_pixels,
                   reduced_decode=reduced_decode, observe=observe)

    @property
    def data_config(self) -> dict:
        """timm's data-config keys (what run directories and Parquet metadata record)."""
        return {"input_size": self.input_size, "interpolation": self.interpolation, "mean": self.mean,
                "std": self.std, "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}

    def training(self, augment: Augment | None) -> "Preprocess":
        """The training reader: augmenting with `augment` (None: --no-augment, the eval transform)."""
        return dataclasses.replace(self, augment=augment, decode_for=augment)

    def evaluation(self) -> "Preprocess":
        """The same images through the eval transform, decoded as this reader decodes them."""
        return dataclasses.replace(self, augment=None)

    # -- geometry
    @property
    def scale_size(self) -> int:
        """The eval transform resizes the shorter side to this, then centre-crops the input size."""
        return max(math.floor(side / self.crop_pct) for side in self.input_size[1:])

    def max_reduction(self, width: int, height: int) -> float:
        """How many times smaller than (width, height) this reader can take the image: the eval
        resize target must stay covered, and for training the smallest random crop (at the least
        area and the most extreme aspect ratio) must still hold an input's worth of real pixels."""
        factor = min(width, height) / self.scale_size
        augment = self.augment or self.decode_for
        if augment is not None:
            least_area = augment.scale[0] * width * height
            narrowest = min(augment.ratio[0], 1 / augment.ratio[1])
            factor = min(factor, math.sqrt(least_area * narrowest) / max(self.input_size[1:]))
        return factor

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the original (width x height) image that the eval
        transform shows the model."""
        out_h, out_w = self.input_size[1:]
        if self.crop_mode == "squash":
            sx, sy = self.scale_size / width, self.scale_size / height
        else:
            sx = sy = self.scale_size / min(width, height)
        crop_w, crop_h = min(out_w / sx, width), min(out_h / sy, height)
        left, top = (width - crop_w) / 2, (height - crop_h) / 2
        return left, top, left + crop_w, top + crop_h

    # -- reading
    @property
    def resample(self) -> int:
        """The Pillow filter of the model's interpolation."""
        return _RESAMPLE.get(self.interpolation, Image.BILINEAR)

    def decode(self, path: Path) -> tuple[Image.Image, tuple[int, int]]:
        """(RGB image at the working resolution, the file's displayed size); raises on any fault."""
        reduction = self.max_reduction if self.reduced_decode else None
        return data.decode_image(path, self.max_pixels, reduction, self.resample)

    def transform(self, image: Image.Image, seed: str | None = None) -> torch.Tensor:
        """A decoded image -> uint8 CHW tensor. Training draws its crop and flip from `seed` alone,
        so the result does not depend on the thread, the order or what was read before."""
        if self.augment is None:
            return self._eval_transform(image)
        rng = random.Random(seed)
        top, left, h, w = _crop_params(image.size, self.augment, rng)
        # crop and resize in one resampling pass (Pillow's `box`), with the model's interpolation
        image = image.resize((self.input_size[2], self.input_size[1]), self.resample, box=(left, top, left + w, top + h))
        if rng.random() < self.augment.hflip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)

    def __call__(self, path: Path, seed: str | None = None) -> torch.Tensor:
        image, shown = self.decode(path)
        if self.observe is not None:
            self.observe(path, image, shown)
        return self.transform(image, seed)

    @cached_property
    def _eval_transform(self):
        from .timm_import import import_timm

        import_timm()  # torch._dynamo stays unloaded
        from timm.data import create_transform

        return create_transform(
            input_size=self.input_size, is_training=False, interpolation=self.interpolation, mean=self.mean,
            std=self.std, crop_pct=self.crop_pct, crop_mode=self.crop_mode, use_prefetcher=True,  # uint8 out
        )

    def normalizer(self) -> "Normalize":
        return Normalize(self.mean, self.std)


def _crop_params(size: tuple[int, int], augment: Augment, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random resized crop: timm's RandomResizedCropAndInterpolation
    .get_params, drawing from `rng` instead of the module-level `random` that threads share."""
    img_w, img_h = size
    area = img_w * img_h
    log_ratio = (math.log(augment.ratio[0]), math.log(augment.ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*augment.scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= img_w and h <= img_h:
            return rng.randint(0, img_h - h), rng.randint(0, img_w - w), h, w
    in_ratio = img_w / img_h  # fallback: a central crop of the allowed aspect ratio
    if in_ratio < min(augment.ratio):
        w, h = img_w, int(round(img_w / min(augment.ratio)))
    elif in_ratio > max(augment.ratio):
        w, h = int(round(img_h * max(augment.ratio))), img_h
    else:
        w, h = img_w, img_h
    return (img_h - h) // 2, (img_w - w) // 2, h, w


class Normalize(nn.Module):
    """uint8 image batches -> (x / 255 - mean) / std in float32, on the module's device.

    Loaders stop at uint8 tensors: per image, timm's ToTensor + Normalize cost 150 of 440 us on a
    64 px digit (2-core CPU), per batch on the device under 10 us an image (`train` on resnet10t
    at 64 px went from 341 to 387 img/s), and a uint8 batch is a quarter of the bytes to move to a
    GPU. A module, so that an exported model can carry its own normalisation.
    """

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", mean / std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32, copy=True).mul_(self.scale).sub_(self.shift)
