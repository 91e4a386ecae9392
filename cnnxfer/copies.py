"""Is a pair of look-alike images one image twice? Pixel verification of embedding neighbours.

An embedding cannot tell a copy from a twin on small images: a 28 px Fashion-MNIST image re-encoded
as JPEG q64 or cropped 3 % sits at cosine 0.66-0.93 from its source, below natural look-alikes
(0.96-0.98). Pixels can: compared at the smaller image's own size (and at the larger's, for an
upscaled copy), with the crop of a few percent searched for, a copy correlates at 0.987-1.0 with
its source where different garments stay below 0.988; a second rule (`RATIO`) takes a copy that is
much more like its source than like any other candidate.

`pixel_similarity(a, b)`: the highest normalised cross-correlation of the two grayscale images over
crops of 0..CROP of either side (in whole pixels, at least one) and the two comparison sizes.
Images are read once each, reduced to at most SIDE pixels on the short side.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIDE = 32      # compared at most this many pixels on the short side
CROP = 0.06    # the largest crop searched for, per side, as a share of the side (at least one pixel)
SAME = 0.99    # pixel similarity from which a pair is one image twice
NEAR, RATIO = 0.97, 3.0  # or from NEAR, when every other candidate of both is RATIO times as far (1 - similarity)
CANDIDATES = 5  # pairs verified: each image with its 5 nearest by embedding (from cosine FLOOR) and by pixels
FLOOR = 0.5     # the benchmark's planted copies reach down to cosine 0.66
TINY = 16       # the pixel neighbours are searched among the images reduced to TINY x TINY
CROPS_KEPT = 1024  # images whose crops stay in memory (about 340 MB at 32 px)


def thumbnail(path: str | Path) -> np.ndarray | None:
    """The image as uint8 grayscale, its short side reduced to SIDE (never enlarged); None if unreadable."""
    try:
        with Image.open(path) as image:
            image.draft("L", (SIDE, SIDE))  # JPEG: decode at a fraction of the size
            image = image.convert("L")
            scale = SIDE / min(image.size)
            if scale < 1:
                image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
            return np.asarray(image, dtype=np.uint8)
    except Exception:  # noqa: BLE001  (any unreadable file: the audit reports it as unreadable elsewhere)
        return None


def _resized(array: np.ndarray, n: int) -> np.ndarray:
    if array.shape == (n, n):
        return array
    return np.asarray(Image.fromarray(array, mode="F").resize((n, n), Image.BICUBIC), dtype=np.float32)


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = rows - rows.mean(axis=1, keepdims=True)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-6)


class Pixels:
    """Thumbnails read on first use (uint8, at most SIDE x 1.5 SIDE: about 1.5 KB an image), and the
    crops of the CROPS_KEPT images used last at each comparison size (81 x 32 x 32 floats, 330 KB
    each): memory stays flat however large the folder, and `copies` verifies the pairs in image
    order, so an image's crops are made about once."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self._thumbs: dict[int, np.ndarray | None] = {}
        self._crops: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def thumb(self, i: int) -> np.ndarray | None:
        if i not in self._thumbs:
            self._thumbs[i] = thumbnail(self.paths[i])
        return self._thumbs[i]

    def crops(self, i: int, n: int) -> np.ndarray:
        """(crops, n*n) unit rows: image i cropped 0..CROP per side, each resized to n x n; row 0 uncropped."""
        key = (i, n)
        if key in self._crops:
            self._crops.move_to_end(key)
        else:
            if len(self._crops) >= CROPS_KEPT:
                self._crops.popitem(last=False)
            a = self.thumb(i).astype(np.float32)
            h, w = a.shape
            mh, mw = max(1, round(CROP * h)), max(1, round(CROP * w))
            cuts = [(t, b, l, r) for t, b in itertools.product(range(mh + 1), repeat=2)
                    for l, r in itertools.product(range(mw + 1), repeat=2) if h - t - b >= 2 and w - l - r >= 2]
            self._crops[key] = _unit(np.stack([_resized(a[t:h - b, l:w - r], n).ravel() for t, b, l, r in cuts]))
        return self._crops[key]

    def similarity(self, i: int, j: int) -> float:
        """pixel_similarity of images i and j; nan when either is unreadable."""
        a, b = self.thumb(i), self.thumb(j)
        if a is None or b is None:
            return float("nan")
        best = -1.0
        for n in {min(min(a.shape), min(b.shape)), max(min(a.shape), min(b.shape))}:
            ca, cb = self.crops(i, n), self.crops(j, n)
            best = max(best, float((ca @ cb[0]).max()), float((cb @ ca[0]).max()))
        return best


def pixel_candidates(pixels: Pixels, queries, keys=None) -> list[tuple[int, int]]:
    """(query, key) pairs: each query image with its CANDIDATES most correlated keys (all images when
    keys is None, the query itself excepted), the images reduced to TINY x TINY: finds copies the
    embedding puts far apart (an 8 px digit reduced to 6 px: cosine 0.75, not among its 10 nearest)."""
    from .neighbours import nearest

    queries, keys = list(queries), None if keys is None else list(keys)
    rows = queries if keys is None else queries + keys
    tiny = {i: _resized(pixels.thumb(i).astype(np.float32), TINY).ravel() for i in rows if pixels.thumb(i) is not None}
    q = [i for i in queries if i in tiny]
    k = q if keys is None else [i for i in keys if i in tiny]
    if not q or not k:
        return []
    unit = lambda ids: torch.from_numpy(_unit(np.stack([tiny[i] for i in ids])))  # noqa: E731
    _, idx = nearest(unit(q), unit(k) if keys is not None else unit(q), CANDIDATES, same=keys is None)
    return [(q[a], k[int(b)]) for a in range(len(q)) for b in idx[a]]


def describe(similarity: float) -> str:
    rule = f">= {SAME}" if similarity >= SAME else f">= {NEAR}, every other candidate of both at least {RATIO:g}x as far"
    return f"pixels: correlation {similarity:.4f} {rule} (grayscale, crops of up to {CROP:.0%} a side searched)"


def copies(pixels: Pixels, candidates: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """{(a, b): pixel similarity} of the candidate pairs that are one image twice: at SAME or above, or
    at NEAR or above with every other candidate pair of a and of b at least RATIO times as far."""
    scores = dict.fromkeys(sorted({(min(a, b), max(a, b)) for a, b in candidates if a != b}), 0.0)
    for pair in scores:  # in image order: the crops of `a` are reused by all its pairs
        scores[pair] = pixels.similarity(*pair)
    runner_up: dict[int, list[float]] = {}
    for (a, b), s in scores.items():
        if s == s:
            runner_up.setdefault(a, []).append(s)
            runner_up.setdefault(b, []).append(s)
    second = {i: sorted(v)[-2] if len(v) > 1 else -1.0 for i, v in runner_up.items()}
    found = {}
    for (a, b), s in scores.items():
        if s >= SAME:
            found[(a, b)] = s
        elif s >= NEAR and min(1 - second[a], 1 - second[b]) >= RATIO * (1 - s):
            found[(a, b)] = s
    return found
