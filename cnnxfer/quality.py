"""Image quality for the audit, measured on the decode the features need anyway.

`measure` turns one decoded image (at the working resolution the model reads it, see
preprocess.Preprocess.decode) into a few numbers; `flag` turns a folder's numbers into issues.
Brightness is judged on absolute levels (a dark image is dark in any folder), while sharpness,
information and size are judged against the folder itself: 28-pixel Fashion-MNIST scans are all
blurry and small by a photo's standard, and only the ones far below their own folder are news.

Every measure is on the luminance L = 0.299 R + 0.587 G + 0.114 B, scaled to 0..1:
- brightness: L's 99th percentile (`dark` when even the brightest 1% is dim) and 1st percentile
  (`overexposed` when even the darkest 1% is bright);
- sharpness: the variance of L's 4-neighbour Laplacian divided by the variance of L, so dimming
  or a flat background does not read as blur; `blurry` when its log is more than `blur_z` robust
  standard deviations (1.4826 MAD) below the folder's median;
- information: the entropy of L's 256-bin histogram in bits; `low_information` under `min_entropy`
  bits (a blank or nearly uniform image);
- colour: the mean over pixels of max(R, G, B) - min(R, G, B); `grayscale` under 0.01, reported
  only when most of the folder is in colour;
- size: the file's displayed size; `odd_aspect` past `max_aspect`, `small` when its area is under
  a quarter of the folder's median (half its side) or a side is under MIN_SIDE pixels.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

MIN_SIDE = 8  # pixels: below this an image holds next to nothing whatever the folder
GRAYSCALE = 0.01  # mean channel spread (0..1) under which an image counts as grayscale
MAD_TO_SD = 1.4826  # a normal distribution's standard deviation in units of its median absolute deviation
HOW = {
    "dark": "99th percentile of luminance (0..1) under --dark: even the brightest 1% is dim; score = that percentile",
    "overexposed": "1st percentile of luminance over --overexposed: even the darkest 1% is bright; score = that percentile",
    "blurry": "log of (variance of the 4-neighbour Laplacian / variance) of luminance, more than --blur-z robust SDs "
              "(1.4826 MAD) below the folder's median; score = that z",
    "low_information": "entropy of the 256-bin luminance histogram under --min-entropy bits; score = entropy",
    "grayscale": "mean over pixels of max(R,G,B) - min(R,G,B) under 0.01, in a folder mostly in colour; score = that mean",
    "odd_aspect": "long side / short side of the file over --max-aspect; score = that ratio",
    "small": "area under a quarter of the folder's median, or a side under 8 px; score = sqrt(area)",
}
COLUMNS = ("width", "height", "bright_p99", "bright_p01", "sharpness", "entropy", "colour", "sha256")


@dataclass(frozen=True)
class Thresholds:
    """The defaults were set on Fashion-MNIST, the digits and scikit-image's photos with planted
    damage (benchmarks/audit.py): x0.2 dimmed copies, Gaussian blur of 2+ px."""

    dark: float = 0.25  # 99th percentile of luminance below this: dark
    overexposed: float = 0.9  # 1st percentile above this: overexposed
    blur_z: float = 4.0  # robust SDs of log-sharpness below the folder's median (a 1 px blur of a 28 px scan: -3 to -7)
    min_entropy: float = 1.0  # bits
    max_aspect: float = 3.0  # long side / short side


def measure(path: Path, image: Image.Image, shown: tuple[int, int]) -> dict:
    """The quality numbers of one decoded RGB image, and the SHA-256 of its file's bytes."""
    rgb = np.asarray(image, dtype=np.float32) / 255.0
    lum = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    p01, p99 = np.percentile(lum, [1, 99])
    hist = np.bincount(np.clip(lum * 255.0 + 0.5, 0, 255).astype(np.int64).ravel(), minlength=256)
    prob = hist[hist > 0] / hist.sum()
    return {"width": shown[0], "height": shown[1], "bright_p99": float(p99), "bright_p01": float(p01),
            "sharpness": _sharpness(lum), "entropy": float(-(prob * np.log2(prob)).sum()),
            "colour": float((rgb.max(2) - rgb.min(2)).mean()), "sha256": file_hash(path)}


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sharpness(lum: np.ndarray) -> float:
    if min(lum.shape) < 3:
        return 0.0
    lap = lum[1:-1, :-2] + lum[1:-1, 2:] + lum[:-2, 1:-1] + lum[2:, 1:-1] - 4.0 * lum[1:-1, 1:-1]
    spread = float(lum.var())
    return float(lap.var() / spread) if spread > 1e-8 else 0.0


def flag(table, thresholds: Thresholds = Thresholds()) -> list[dict]:
    """Issues {"row", "issue", "score", "detail"} for a table (pandas) with COLUMNS, one row per image."""
    issues = []

    def add(mask, issue: str, score, detail) -> None:
        for row in np.flatnonzero(np.asarray(mask)):
            issues.append({"row": int(row), "issue": issue, "score": float(score[row]), "detail": detail(row)})

    t = thresholds
    p99, p01 = table["bright_p99"].to_numpy(), table["bright_p01"].to_numpy()
    add(p99 < t.dark, "dark", p99, lambda r: f"99th percentile of luminance {p99[r]:.2f} < {t.dark}")
    add(p01 > t.overexposed, "overexposed", p01, lambda r: f"1st percentile of luminance {p01[r]:.2f} > {t.overexposed}")
    log_sharp = np.log(np.maximum(table["sharpness"].to_numpy(), 1e-6))
    z = robust_z(log_sharp)
    flat = table["entropy"].to_numpy() < t.min_entropy  # a blank image has no edges either: it is reported as blank
    add((z < -t.blur_z) & ~flat, "blurry", z,
        lambda r: f"log sharpness (Laplacian variance / variance) {z[r]:.1f} robust SDs below the folder's median")
    entropy = table["entropy"].to_numpy()
    add(flat, "low_information", entropy, lambda r: f"luminance entropy {entropy[r]:.2f} bits < {t.min_entropy}")
    colour = table["colour"].to_numpy()
    if (colour >= GRAYSCALE).mean() > 0.5:
        add(colour < GRAYSCALE, "grayscale", colour,
            lambda r: f"mean channel spread {colour[r]:.3f} < {GRAYSCALE} in a folder mostly in colour")
    w, h = table["width"].to_numpy(float), table["height"].to_numpy(float)
    aspect = np.maximum(w, h) / np.maximum(np.minimum(w, h), 1.0)
    add(aspect > t.max_aspect, "odd_aspect", aspect, lambda r: f"aspect ratio {aspect[r]:.1f} > {t.max_aspect}")
    area, typical = w * h, float(np.nanmedian(w * h)) if np.isfinite(w * h).any() else 0.0
    small = (area < typical / 4) | (np.minimum(w, h) < MIN_SIDE)
    add(small, "small", np.sqrt(area), lambda r: f"{int(w[r])}x{int(h[r])} px; the folder's median is "
                                                 f"{math.sqrt(typical):.0f} px square")
    return issues


def robust_z(values: np.ndarray) -> np.ndarray:
    """(values - median) in robust standard deviations (1.4826 MAD, floored at 1% of the median's
    size); NaN (an image not measured) stays NaN and leaves the others' median alone."""
    if not np.isfinite(values).any():
        return np.full(len(values), np.nan)
    median = float(np.nanmedian(values))
    mad = MAD_TO_SD * float(np.nanmedian(np.abs(values - median)))
    return (values - median) / max(mad, 0.01 * abs(median), 1e-6)
