"""Helpers shared by the benchmarks: realistic JPEG folders, random weights, timing, tables."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# scikit-image's bundled photographs (no download): real textures, so JPEG decode costs what it
# costs on photos, not on flat synthetic images.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "stereo_motorcycle", "camera")


def _photo(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    image = image[0] if isinstance(image, tuple) else image  # stereo pairs
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def write_jpeg_folder(root: Path, n: int, size: int = 256, quality: int = 90, seed: int = 0) -> Path:
    """`n` JPEGs (random crops of the photos, resized to size x size) in one class folder per photo."""
    rng = np.random.default_rng(seed)
    photos = {name: _photo(name) for name in PHOTOS}
    names = list(photos)
    for i in range(n):
        name = names[i % len(names)]
        image = photos[name]
        h, w = image.shape[:2]
        side = int(min(h, w) * rng.uniform(0.4, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(image[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{i:05d}.jpg", quality=quality)
    return Path(root)


def save_random_weights(model_name: str, path: Path, seed: int = 0) -> Path:
    """A seeded random-init timm state dict as .safetensors (nothing downloads)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return Path(path)


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers): the work done,
    which a busy machine inflates much less than the wall time."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{name}, {cores} cores, {gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, row in enumerate(cells):
        print("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def verdict(value: float, target: float) -> str:
    return "PASS" if value >= target else "MISS"
