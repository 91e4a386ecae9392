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


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def _idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format: big-endian dims after a magic number), gzipped or not."""
    import gzip

    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist(split: str = "train", root: Path = FASHION_MNIST) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,)) from Debian's `dataset-fashion-mnist` package
    (`apt-get install dataset-fashion-mnist`); split is "train" (60,000) or "t10k" (10,000)."""
    prefix = "train" if split == "train" else "t10k"
    images = next(root.glob(f"{prefix}-images-idx3-ubyte*"), None)
    labels = next(root.glob(f"{prefix}-labels-idx1-ubyte*"), None)
    if images is None or labels is None:
        raise FileNotFoundError(f"Fashion-MNIST is not in {root}: apt-get install dataset-fashion-mnist")
    return _idx(images), _idx(labels)


def write_few_labels(root: Path, images: np.ndarray, labels: np.ndarray, names: tuple[str, ...], per_class: int,
                     seed: int, test_images: np.ndarray | None = None, test_labels: np.ndarray | None = None,
                     test_per_class: int = 100) -> dict[str, Path]:
    """train/: `per_class` images of every class drawn with `seed`; test/: `test_per_class` of every
    class from (test_images, test_labels) when given, else from the images not drawn for any seed
    (the first `test_per_class` of each class are set aside first, the same for every draw)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for k, name in enumerate(names):
        idx = np.flatnonzero(labels == k)
        held = idx[:test_per_class] if test_images is None else np.array([], dtype=int)
        pool = idx[test_per_class:] if test_images is None else idx
        for i in rng.choice(pool, per_class, replace=False):
            _save(images[i], root / "train" / name / f"{i:05d}.png")
        if test_images is not None:
            held = np.flatnonzero(test_labels == k)[:test_per_class]
        for i in held:
            _save((test_images if test_images is not None else images)[i], root / "test" / name / f"{i:05d}.png")
    return {"train": root / "train", "test": root / "test"}


def digits_at(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as size x size 8-bit images, with their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.stack([digit_image(image, size) for image in digits.images]), digits.target
