"""Finding images (class folders, flat folders, CSV manifests), robust decoding, splits, loaders.

Real folders are dirty. Hidden files, AppleDouble `._*`, Thumbs.db and non-image extensions are
ignored (counted, not reported as corrupt). Files that look like images but cannot be decoded are
skipped at load time with a reason, and listed in a `*.skipped.csv` beside the output.
"""
from __future__ import annotations

import csv
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
# Decoders Pillow may use; EPS/PDF etc. are never opened (EPS runs Ghostscript).
PIL_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})
IGNORED_DIRS = frozenset({"__macosx", "@eadir", "$recycle.bin"})
VAL_DIR_NAMES = ("val", "valid", "validation")
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default: ~ a 9459 x 9459 image


@dataclass
class ImageList:
    """The images of a dataset: paths, integer labels (None when unlabelled) and class names."""

    paths: list[Path]
    labels: list[int | None]
    classes: list[str]
    root: Path
    ignored: int = 0
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def subset(self, indices: Sequence[int]) -> "ImageList":
        return ImageList(
            [self.paths[i] for i in indices], [self.labels[i] for i in indices], self.classes, self.root
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
    """
    root = Path(root)
    names = [d.name for d in _class_dirs(root)]
    if classes is None:
        classes = names
    else:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise DataError(f"{root}: class folder(s) {', '.join(unknown)} are not among the training classes")
    index = {name: i for i, name in enumerate(classes)}
    paths, labels, ignored, notes = [], [], 0, []
    for name in names:
        files, n_ignored = _walk_images(root / name)
        ignored += n_ignored
        if not files:
            notes.append(f"class folder '{root / name}' holds no images")
        paths += files
        labels += [index[name]] * len(files)
    if not classes:
        raise DataError(f"{root}: no class folders found (expected one subfolder per class)")
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
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"{path}: expected a folder of images or a .csv manifest")
        images = read_manifest(path, classes)
        if labelled and not images.labelled:
            raise DataError(f"{path}: manifest has no 'label' for every row")
    elif labelled is False or (labelled is None and _has_top_level_images(path)):
        images = scan_flat_folder(path)
    else:
        images = scan_class_folders(path, classes)
    if not images.paths:
        raise DataError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return images


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


# ---------------------------------------------------------------- decoding

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


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Fully decode `path` to RGB (EXIF orientation applied, first frame). Raises on any fault."""
    # A module global, never None; restored so a library call does not change the caller's Pillow.
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    Image.init()  # registers every plugin, so `formats` can name MPO/WEBP/TIFF
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x the limit; treat it as the error it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=[f for f in PIL_FORMATS if f in Image.OPEN]) as im:
                im.load()
                im = ImageOps.exif_transpose(im) or im
                return _to_rgb(im)
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def describe_failure(path: Path, exc: BaseException) -> str:
    """A short reason for the skip list."""
    if os.path.islink(path) and not os.path.exists(path):
        return "dangling symlink"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too many pixels (decompression bomb limit; raise --max-image-pixels to read it): {exc}"
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {message}"[:300]


class Batch(NamedTuple):
    """A collated batch: the images that decoded, their labels (-1 when unlabelled) and dataset
    indices, plus (index, reason) for those that did not."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[tuple[int, str]]


class ImageDataset(torch.utils.data.Dataset):
    """Decodes images on access; a failure returns a reason instead of raising."""

    def __init__(self, images: ImageList, transform: Callable | None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.images, self.transform, self.max_pixels = images, transform, max_pixels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        path = self.images.paths[i]
        try:
            image = load_image(path, self.max_pixels)
            tensor = self.transform(image) if self.transform else image
        except Exception as exc:  # Pillow raises OSError, ValueError, struct.error, bomb errors...
            return None, describe_failure(path, exc), i
        label = self.images.labels[i]
        return tensor, -1 if label is None else label, i


def collate(items) -> Batch:
    good = [it for it in items if it[0] is not None]
    skipped = [(it[2], it[1]) for it in items if it[0] is None]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped)
    return Batch(
        torch.stack([it[0] for it in good]),
        torch.tensor([it[1] for it in good], dtype=torch.long),
        torch.tensor([it[2] for it in good], dtype=torch.long),
        skipped,
    )


# ---------------------------------------------------------------- decoded images in memory

CACHE_MAX_BYTES = 4 << 30  # auto mode never holds more than this ...
CACHE_RAM_FRACTION = 8  # ... nor more than 1/8 of the machine's RAM


def cache_budget() -> int:
    """Bytes `--cache-images auto` may hold. From the machine's total RAM, not what is free right
    now, so the decision (and with it the random stream of the run) is the same when resumed."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # Windows
        total = 8 << 30
    return min(CACHE_MAX_BYTES, total // CACHE_RAM_FRACTION)


def decoded_size(images: ImageList, sample: int = 256) -> int:
    """About the bytes the decoded RGB images would take: width x height x 3 from the file headers
    (no decoding) of up to `sample` of them, chosen with a fixed seed, scaled to all of them. An
    unreadable header counts 0: that file is skipped later anyway."""
    n = len(images)
    chosen = range(n) if n <= sample else np.random.default_rng(0).choice(n, sample, replace=False)
    total = 0
    for i in chosen:
        try:
            with Image.open(images.paths[i]) as im:
                total += im.size[0] * im.size[1] * 3
        except Exception:
            pass
    return total * n // max(1, len(chosen))


def _as_array(image: Image.Image) -> np.ndarray:  # module level: picklable for loader workers
    return np.asarray(image)


def decode_all(images: ImageList, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, num_workers: int = 0,
               ) -> list[np.ndarray | str]:
    """Decode every image once (in `num_workers` processes): an HxWx3 uint8 array, or the reason it failed."""
    loader = torch.utils.data.DataLoader(ImageDataset(images, _as_array, max_pixels), batch_size=32,
                                         num_workers=num_workers, collate_fn=list)
    out: list[np.ndarray | str] = [""] * len(images)
    for items in loader:
        for value, reason_or_label, i in items:
            out[i] = value if value is not None else reason_or_label
    return out


class MemoryDataset(torch.utils.data.Dataset):
    """ImageDataset's items from images decoded once (`decode_all`), so an epoch costs only the transform.

    With `keep_output` the transform must be deterministic (evaluation, --no-augment): its outputs
    are computed here, once, and the decoded arrays are not kept. The items equal ImageDataset's:
    Image.fromarray(np.asarray(im)) gives back the same RGB pixels.
    """

    def __init__(self, images: ImageList, decoded: Sequence[np.ndarray | str], transform: Callable | None,
                 keep_output: bool = False):
        self.images, self.transform, self.keep_output = images, transform, keep_output
        if keep_output:
            self.items = [self._safe_apply(i, x) for i, x in enumerate(decoded)]
        else:
            self.items = list(decoded)

    def _safe_apply(self, i: int, value):
        """The transform's output for a decoded array; a skip reason (str) stays as it is or is made."""
        if isinstance(value, str):
            return value
        try:
            image = Image.fromarray(value, "RGB")
            return self.transform(image) if self.transform else image
        except Exception as exc:
            return describe_failure(self.images.paths[i], exc)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        value = self.items[i] if self.keep_output else self._safe_apply(i, self.items[i])
        if isinstance(value, str):
            return None, value, i
        label = self.images.labels[i]
        return value, -1 if label is None else label, i


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    sampler: torch.utils.data.Sampler | None = None,
    seed: int = 0,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader yielding `Batch`; seeded so shuffles repeat across runs and resumes."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )


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
