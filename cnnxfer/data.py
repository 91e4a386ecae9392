"""Finding images (class folders, flat folders, CSV manifests), the one decode function, splits.

Real folders are dirty. Hidden files, AppleDouble `._*`, Thumbs.db and non-image extensions are
ignored (counted, not reported as corrupt). Files that look like images but cannot be decoded are
skipped at load time with a reason, and listed in a `*.skipped.csv` beside the output.
`decode_image` decodes at the working resolution a reader asks for (preprocess.py says what that
is; loader.py batches the results).
"""
from __future__ import annotations

import csv
import importlib
import logging
import math
import os
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import DEFAULT_MAX_IMAGE_PIXELS  # noqa: F401  (re-exported: data.DEFAULT_MAX_IMAGE_PIXELS)
from .errors import DataError

log = logging.getLogger(__name__)

DECODABLE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
# Photo formats read through a plugin: (Pillow format, what it is, what to install when it is missing).
PLUGIN_EXTENSIONS = {
    ".heic": ("HEIF", "HEIC photo", "pip install pillow-heif"),
    ".heif": ("HEIF", "HEIF photo", "pip install pillow-heif"),
    ".hif": ("HEIF", "HEIF photo", "pip install pillow-heif"),
    ".avif": ("AVIF", "AVIF image", "pip install 'pillow>=11.3'"),
}
# Image formats recognised but not read: listed as skipped with what to do, never dropped silently.
_RAW = "camera RAW file: not decoded here; convert it to JPEG or TIFF first (e.g. rawpy, darktable or the camera's software)"
UNSUPPORTED_EXTENSIONS = {
    **dict.fromkeys((".cr2", ".cr3", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".dng", ".raf", ".orf", ".rw2",
                     ".pef", ".srw", ".x3f", ".raw", ".3fr", ".erf", ".kdc", ".mrw"), _RAW),
    ".jxl": "JPEG XL image: not decoded here; convert it to JPEG or PNG first",
    ".svg": "SVG is a vector drawing: rasterise it to PNG first",
}
IMAGE_EXTENSIONS = DECODABLE_EXTENSIONS | set(PLUGIN_EXTENSIONS) | set(UNSUPPORTED_EXTENSIONS)
# Decoders Pillow may use; EPS/PDF etc. are never opened (EPS runs Ghostscript).
PIL_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "HEIF", "AVIF")
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})
IGNORED_DIRS = frozenset({"__macosx", "@eadir", "$recycle.bin"})
VAL_DIR_NAMES = ("val", "valid", "validation")


@dataclass
class ImageList:
    """The images of a dataset: paths, integer labels (None when unlabelled) and class names."""

    paths: list[Path]
    labels: list[int | None]
    classes: list[str]
    root: Path
    ignored: int = 0
    warnings: list[str] = field(default_factory=list)
    splits: list[str] | None = None  # "train" / "val" per image, for a dataset laid out as train/ and val/

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def subset(self, indices: Sequence[int]) -> "ImageList":
        splits = [self.splits[i] for i in indices] if self.splits is not None else None
        return ImageList(
            [self.paths[i] for i in indices], [self.labels[i] for i in indices], self.classes, self.root, splits=splits
        )

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.labels)
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_NAMES


def _walk_images(top: Path) -> tuple[list[Path], int]:
    """All image files below `top`, sorted; follows symlinked folders but never loops, and never
    into a folder that contains `top` (a link to an ancestor would relabel other classes' images)."""
    found, ignored, seen = [], 0, set()
    top_real = Path(os.path.realpath(top))
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
        except OSError:
            continue  # a dangling symlinked folder holds nothing
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as entries:
            for entry in entries:
                if _is_ignored(entry.name):
                    ignored += 1
                elif entry.is_dir(follow_symlinks=True):
                    if entry.name.lower() in IGNORED_DIRS:
                        continue
                    if entry.is_symlink() and top_real.is_relative_to(os.path.realpath(entry.path)):
                        continue
                    stack.append(Path(entry.path))
                elif Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                    found.append(Path(entry.path))  # dangling symlinks included: reported at decode
                else:
                    ignored += 1
    return sorted(found, key=lambda p: str(p)), ignored


def _class_dirs(root: Path) -> list[Path]:
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and not _is_ignored(p.name) and p.name.lower() not in IGNORED_DIRS),
        key=lambda p: p.name,
    )


def _has_top_level_images(root: Path) -> bool:
    return any(
        p.is_file() and not _is_ignored(p.name) and p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir()
    )


def scan_class_folders(root: Path, classes: Sequence[str] | None = None) -> ImageList:
    """ImageFolder layout: one subfolder per class, images anywhere below it.

    `classes` fixes the class list (e.g. the training classes when reading a validation folder).
    A class folder without images is not a class: it is left out with a warning (a model trained
    with it would learn a class it never saw, offer it in predictions, and count it in averages).
    With a fixed `classes` list an empty folder of a known class only gets the warning.
    """
    root = Path(root)
    found, ignored, notes = {}, 0, []
    for folder in _class_dirs(root):
        files, n_ignored = _walk_images(folder)
        ignored += n_ignored
        if files:
            found[folder.name] = files
        else:
            left_out = " (left out of the classes)" if classes is None else ""
            notes.append(f"class folder '{folder}' holds no images{left_out}")
    if classes is None:
        classes = list(found)
        if not classes and not notes:
            raise DataError(f"{root}: no class folders found (expected one subfolder per class)")
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"{root}: class folder(s) {', '.join(unknown)} are not among the training classes")
    index = {name: i for i, name in enumerate(classes)}
    paths, labels = [], []
    for name, files in found.items():
        paths += files
        labels += [index[name]] * len(files)
    return ImageList(paths, labels, list(classes), root, ignored, notes)


def scan_flat_folder(root: Path) -> ImageList:
    """Every image below `root` (recursive), unlabelled."""
    paths, ignored = _walk_images(Path(root))
    return ImageList(paths, [None] * len(paths), [], Path(root), ignored)


def read_manifest(csv_path: Path, classes: Sequence[str] | None = None) -> ImageList:
    """A CSV with a `path` column and an optional `label` column; relative paths are relative to the CSV."""
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path}: cannot read manifest: {exc}") from exc
    if not rows or "path" not in rows[0]:
        raise DataError(f"{csv_path}: manifest needs a header with a 'path' column (and optionally 'label')")
    has_labels = "label" in rows[0] and all((r.get("label") or "").strip() for r in rows)
    names = list(classes) if classes is not None else (sorted({r["label"].strip() for r in rows}) if has_labels else [])
    index = {name: i for i, name in enumerate(names)}
    paths, labels = [], []
    for line, row in enumerate(rows, start=2):
        path = Path(row["path"].strip())
        paths.append(path if path.is_absolute() else csv_path.parent / path)
        if has_labels:
            label = row["label"].strip()
            if label not in index:
                raise DataError(f"{csv_path}:{line}: label '{label}' is not among the classes {names}")
            labels.append(index[label])
        else:
            labels.append(None)
    return ImageList(paths, labels, names, csv_path.parent)


def discover(path: Path, labelled: bool | None = None, classes: Sequence[str] | None = None) -> ImageList:
    """Read a dataset from a class-folder tree, a flat folder or a CSV manifest.

    Args:
        labelled: True requires class folders, False reads every image unlabelled, None decides:
            class folders unless images sit directly in `path`.
        classes: a fixed class list (for validation/test data of a trained model).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        if labelled:
            raise DataError(f"{path} is one image, without a label: give a folder with one subfolder per class, or a "
                            "CSV manifest with path,label")
        return ImageList([path], [None], [], path.parent)
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"{path}: expected an image, a folder of images or a .csv manifest")
        images = read_manifest(path, classes)
        if labelled and not images.labelled:
            raise DataError(f"{path}: manifest has no 'label' for every row")
    elif labelled is False or (labelled is None and _has_top_level_images(path)):
        images = scan_flat_folder(path)
    elif labelled is None and not _class_dirs(path):
        # extract and predict take a flat folder too: "no class folders" would say only half of it
        raise DataError(f"{path}: no images found (looked for images in it, or in one subfolder per class)")
    else:
        images = scan_class_folders(path, classes)
    if not images.paths:
        raise DataError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return images


def fingerprint(images: ImageList) -> str:
    """A digest of which images `images` holds: paths relative to its root, labels and file sizes
    (not times: a copied folder keeps them). A resumed run checks its data against it."""
    import hashlib

    digest = hashlib.sha256()
    for path, label in zip(images.paths, images.labels):
        path = Path(path)
        name = path.relative_to(images.root) if path.is_relative_to(images.root) else path
        try:
            size = os.stat(path).st_size
        except OSError:  # a dangling link: skipped at decode, still part of the list
            size = -1
        label_name = images.classes[label] if label is not None else ""
        digest.update(f"{name}\t{label_name}\t{size}\n".encode())
    return digest.hexdigest()


def discover_split_dataset(root: Path) -> ImageList | None:
    """A dataset laid out as train/ and val/ (as finetune reads it) as one list: labelled by class,
    train/'s classes, each image's folder in `splits`. None for any other layout."""
    folders = find_split_folders(root)
    if folders is None:
        return None
    train = discover(folders[0], labelled=True)
    val = discover(folders[1], labelled=True, classes=train.classes)
    return ImageList(train.paths + val.paths, train.labels + val.labels, train.classes, Path(root),
                     train.ignored + val.ignored, train.warnings + val.warnings,
                     ["train"] * len(train) + ["val"] * len(val))


def find_split_folders(root: Path) -> tuple[Path, Path] | None:
    """(train, val) folders when `root` holds `train/` and `val/` (or valid/validation), else None."""
    root = Path(root)
    if not root.is_dir() or not (root / "train").is_dir():
        return None
    for name in VAL_DIR_NAMES:
        if (root / name).is_dir():
            return root / "train", root / name
    return None


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices (train, val) with about `val_fraction` of every class in val (at least one when it has 2+)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-split must be at least 0 and below 1 (got {val_fraction})")
    if val_fraction == 0.0:  # a handful of labels: train on all of them, no validation
        return list(range(len(labels))), []
    rng = np.random.default_rng(seed)
    train, val = [], []
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    for label in sorted(by_class):
        idx = np.array(by_class[label])
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        n_val = min(max(n_val, 1 if len(idx) >= 2 else 0), len(idx) - 1)
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return sorted(train), sorted(val)


def stratified_folds(labels: Sequence[int], folds: int, seed: int = 0,
                     groups: Sequence[int] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train, held-out) index pairs: each class's images shuffled with `seed` and dealt to the
    folds in turn (every fold gets a class's share, give or take one), as StratifiedKFold does,
    without importing scikit-learn (2.4 s here) for it. `groups` (one id per image, e.g. copies
    of one photo) moves every member of a group to its first member's fold: a copy never trains
    the model that judges its twin."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=np.int64)
    start = 0
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        fold_of[idx] = (start + np.arange(len(idx))) % folds
        start += len(idx)  # the next class starts where this one stopped: fold sizes stay even
    if groups is not None:
        groups = np.asarray(groups)
        first = {}
        for i in range(len(labels)):
            fold_of[i] = first.setdefault(groups[i], fold_of[i])
    everything = np.arange(len(labels))
    return [(everything[fold_of != k], everything[fold_of == k]) for k in range(folds)]


# ---------------------------------------------------------------- decoding

class MissingDecoderError(Exception):
    """A recognised photo format that no installed Pillow plugin reads: skipped with what to install."""


_plugin_lock = threading.Lock()
_plugins_registered = False
# Optional Pillow plugins: (format they register, module, registration function).
_PLUGINS = (("HEIF", "pillow_heif", "register_heif_opener"),)


def _register_plugins() -> None:
    """Pillow's own plugins, plus HEIC/HEIF through pillow-heif when it is installed (once, thread-safe)."""
    global _plugins_registered
    if _plugins_registered:
        return
    with _plugin_lock:
        if _plugins_registered:
            return
        Image.init()
        for fmt, module, function in _PLUGINS:
            if fmt not in Image.OPEN:
                try:
                    getattr(importlib.import_module(module), function)()
                except Exception as exc:  # absent, or a broken build: its files are skipped with a hint
                    log.debug("optional image plugin %s unavailable: %s", module, exc)
        _plugins_registered = True


def _missing_decoder(path: Path) -> str | None:
    """Why a file of a recognised format cannot be decoded here (the package to install), else None."""
    suffix = Path(path).suffix.lower()
    if suffix in UNSUPPORTED_EXTENSIONS:
        return UNSUPPORTED_EXTENSIONS[suffix]
    needed = PLUGIN_EXTENSIONS.get(suffix)
    if needed and needed[0] not in Image.OPEN:
        return f"{needed[1]} (no decoder for it is installed here: {needed[2]})"
    return None


def _open(path: Path, max_pixels: int | None):
    """Open (header only) with Pillow's decoders for the allowed formats, and refuse more pixels
    than `max_pixels` (None: no limit; header reads for size estimates only).

    `Image.open` takes its pixel limit from a module global; setting it around each image is a
    race once decoding runs in threads, and it only warns between 1x and 2x the limit. This is
    `Image.open`'s own loop over the format registry (restricted to PIL_FORMATS: EPS, which runs
    Ghostscript, and the other exotic decoders are never tried), with the limit checked exactly.
    """
    with open(path, "rb") as fh:  # raises FileNotFoundError / IsADirectoryError as itself
        prefix = fh.read(16)
    for fmt in PIL_FORMATS:
        if fmt not in Image.OPEN:
            continue
        factory, accept = Image.OPEN[fmt]
        accepted = accept(prefix) if accept else True
        if not accepted or isinstance(accepted, str):
            continue
        try:
            im = factory(os.fspath(path), None)
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
        if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
            im.close()
            raise Image.DecompressionBombError(
                f"Image size ({im.size[0] * im.size[1]} pixels) exceeds the limit of {max_pixels} pixels")
        return im
    raise UnidentifiedImageError(f"cannot identify image file {os.fspath(path)!r}")


_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _shown_size(im: Image.Image) -> tuple[int, int]:
    """Width and height as displayed: EXIF orientation 5-8 swaps the stored ones."""
    try:
        orientation = im.getexif().get(0x0112)
    except Exception:  # a damaged EXIF block: exif_transpose will ignore it too
        orientation = None
    return (im.size[1], im.size[0]) if orientation in _TRANSPOSED else im.size


def read_header(path: Path) -> tuple[tuple[int, int], str] | None:
    """((width, height) as displayed, Pillow format) from the file header alone; None when unreadable."""
    _register_plugins()
    try:
        with _open(path, None) as im:
            return _shown_size(im), im.format
    except Exception:
        return None


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as displayed, from the file header alone; None when unreadable."""
    header = read_header(path)
    return header[0] if header else None


# JPEG's DCT scaling averages blocks (a box filter); the resize after it must still do at least
# this much of the reduction or the box aliases. Measured, a photo to a 64 px input with the
# whole reduction at most 2x above the DCT scale: PSNR 32 dB against the full decode; with this
# gap of 2 (the reducing_gap of Pillow's own thumbnail()): 52 dB. At 224 px from 12 MP: 48 -> 54 dB.
DCT_GAP = 2.0


def jpeg_scale(factor: float) -> int:
    """The DCT scaling (1, 2, 4 or 8) to ask libjpeg for when the image may be `factor` times smaller."""
    room = factor / DCT_GAP
    return 8 if room >= 8 else 4 if room >= 4 else 2 if room >= 2 else 1


SHRINK_MIN = 1.25  # below this much extra, resampling once more costs more than it saves


def planned_size(shown: tuple[int, int], fmt: str | None, factor: float) -> tuple[int, int]:
    """The size `decode_image` returns for an image shown at `shown` that may be `factor` times
    smaller: JPEG's DCT scaling first, then a resize to the smallest size allowed."""
    w, h = shown
    s = jpeg_scale(factor) if fmt in ("JPEG", "MPO") else 1
    if s > 1:
        w, h = -(-w // s), -(-h // s)
    short = min(shown) / factor if factor > 1 else min(shown)
    if min(w, h) > SHRINK_MIN * short:
        # the long side as torchvision's Resize(short) computes it from the file's own size, so the
        # eval transform's resize has nothing left to do and its crop sees the same pixel grid
        target, (sw, sh) = math.ceil(short - 1e-6), shown
        return (target, int(target * sh / sw)) if sw <= sh else (int(target * sw / sh), target)
    return w, h


def decode_image(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 reduction: Callable[[int, int], float] | None = None,
                 resample: int = Image.BILINEAR) -> tuple[Image.Image, tuple[int, int]]:
    """The one decode function: `path` fully decoded to 8-bit RGB, EXIF orientation applied (first
    frame), at the working resolution. Raises on any fault.

    Args:
        reduction: for the file's displayed (width, height), how many times smaller the reader can
            take the image (the preprocessing's geometry, see preprocess.Preprocess). JPEGs are then
            decoded with DCT scaling (Pillow's draft: a 12 MP photo in 35 ms instead of 150 ms),
            and any format larger than needed by over SHRINK_MIN is resized down to what was asked.
        resample: the filter of that resize (the model's interpolation: the transform's own resize
            then has nothing left to do).

    Returns:
        (image, the file's displayed size).
    """
    _register_plugins()
    hint = _missing_decoder(path)
    if hint:
        raise MissingDecoderError(hint)
    with _open(path, max_pixels) as im:
        shown = _shown_size(im)
        factor = reduction(*shown) if reduction else 1.0
        s = jpeg_scale(factor) if im.format in ("JPEG", "MPO") else 1
        if s > 1:
            im.draft(None, (im.size[0] // s, im.size[1] // s))  # stored orientation; draft keeps >= the request
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # not a copy (24 ms for 6 MP); leaving `with` only closes the file
        image = _to_rgb(im)
    target = planned_size(shown, im.format, factor)
    if image.size != target:
        # reducing_gap: a fast box reduction first, leaving the filter at least DCT_GAP of the work
        # (a 3000x2000 PNG to 384x256: 37 -> ~8 ms)
        image = image.resize(target, resample, reducing_gap=DCT_GAP)
    return image, shown


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Fully decode `path` to RGB at full resolution (EXIF orientation applied, first frame)."""
    return decode_image(path, max_pixels)[0]


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit rescaled (not clamped), alpha composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        # 16-bit PNGs open as "I" or "I;16"; their range is 0..65535, so scale rather than clip.
        arr = arr / 257.0 if arr.max(initial=0) > 255 or im.mode.startswith("I;16") else arr
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        im = Image.fromarray(np.nan_to_num(arr).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def describe_failure(path: Path, exc: BaseException) -> str:
    """A short reason for the skip list."""
    if os.path.islink(path) and not os.path.exists(path):
        return "dangling symlink"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, MissingDecoderError):
        return str(exc)
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too many pixels (decompression bomb limit; raise --max-image-pixels to read it): {exc}"
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {message}"[:300]


def write_skipped(path: Path, skipped: Sequence[tuple[Path | str, str]]) -> Path | None:
    """Write `path` (a .skipped.csv) listing unreadable files and why; None when nothing was skipped."""
    from .checkpoint import atomic_write_text

    if not skipped:
        return None
    rows = ["path,reason"]
    for file, reason in skipped:
        rows.append(_csv_row([str(file), reason]))
    atomic_write_text(Path(path), "\n".join(rows) + "\n")
    return Path(path)


def _csv_row(values: Sequence[str]) -> str:
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(values)
    return buf.getvalue()
