"""Labelled image folders built from real data shipped inside scikit-learn and scikit-image.

No download: `load_digits` (1,797 handwritten 8x8 digits) and scikit-image's texture photographs
(grass, gravel, brick). Used by the demo and by the tests.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def digit_image(pixels: np.ndarray, size: int = 32) -> np.ndarray:
    """An 8x8 digit (0..16) as a size x size 8-bit grayscale image."""
    img = Image.fromarray((pixels * (255.0 / 16.0)).astype(np.uint8))
    return np.asarray(img.resize((size, size), Image.BILINEAR))


def write_digits_split(root: Path, size: int = 32) -> tuple[Path, Path]:
    """scikit-learn's own digits example split: first half train/, second half val/."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    half = len(digits.images) // 2
    for split, idx in (("train", range(half)), ("val", range(half, len(digits.images)))):
        for i in idx:
            _save(digit_image(digits.images[i], size), Path(root) / split / str(digits.target[i]) / f"{i:04d}.png")
    return Path(root) / "train", Path(root) / "val"


def write_digits_transfer(root: Path, labels_per_class: int, seed: int = 0, size: int = 32,
                          source: bool = True) -> dict[str, Path]:
    """A transfer-learning task from digits.

    source/: every image of digits 0-4 (the large task a network is pretrained on; not written
    with source=False, e.g. for a second draw of the target images);
    target_train/: `labels_per_class` images of each digit 5-9, drawn with `seed` (the few labelled images);
    target_test/: every other image of digits 5-9 (held out).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    root = Path(root)
    for digit in range(10):
        idx = np.flatnonzero(digits.target == digit)
        if digit < 5:
            splits = {"source": idx} if source else {}
        else:
            idx = rng.permutation(idx)
            splits = {"target_train": idx[:labels_per_class], "target_test": idx[labels_per_class:]}
        for split, chosen in splits.items():
            for i in chosen:
                _save(digit_image(digits.images[i], size), root / split / str(digit) / f"{i:04d}.png")
    return {name: root / name for name in ("source", "target_train", "target_test")}


def write_textures(root: Path, patch: int = 64, per_class: int = 40, seed: int = 0) -> dict[str, Path]:
    """grass / gravel / brick photographs cut into patches; train patches come from the top half of
    each photograph and test patches from the bottom half, so no pixel is shared."""
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    root = Path(root)
    for name in ("grass", "gravel", "brick"):
        image = getattr(skdata, name)()
        if image.dtype != np.uint8:
            image = (255 * (image - image.min()) / max(1e-9, float(np.ptp(image)))).astype(np.uint8)
        h, w = image.shape[:2]
        for split, (top, bottom) in (("train", (0, h // 2)), ("test", (h // 2, h))):
            for k in range(per_class):
                y = int(rng.integers(top, bottom - patch))
                x = int(rng.integers(0, w - patch))
                _save(image[y:y + patch, x:x + patch], root / f"textures_{split}" / name / f"{k:03d}.png")
    return {"train": root / "textures_train", "test": root / "textures_test"}
