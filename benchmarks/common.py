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


def write_photo_folder(root: Path, n: int, size: tuple[int, int], fmt: str = "jpg", quality: int = 90,
                       seed: int = 0, portrait_every: int = 4, noise: int = 6) -> Path:
    """`n` camera-size photos (random 4:3 crops of the bundled photos, upscaled to `size`, with
    +-`noise` grey levels of sensor-like noise) in one class folder per photo. Every
    `portrait_every`-th JPEG is stored landscape with EXIF orientation 6, as phones store portraits."""
    rng = np.random.default_rng(seed)
    photos = {name: _photo(name) for name in PHOTOS}
    names = list(photos)
    w, h = size
    for i in range(n):
        name = names[i % len(names)]
        image = photos[name]
        ih, iw = image.shape[:2]
        ch = int(min(ih, iw * 3 / 4) * rng.uniform(0.6, 1.0))
        cw = min(iw, int(ch * 4 / 3))
        top, left = rng.integers(0, ih - ch + 1), rng.integers(0, iw - cw + 1)
        crop = Image.fromarray(image[top:top + ch, left:left + cw]).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(crop).astype(np.int16) + rng.integers(-noise, noise + 1, (h, w, 3), dtype=np.int16)
        out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        if fmt == "png":
            out.save(folder / f"{i:05d}.png", compress_level=1)
        else:
            kwargs = {"quality": quality}
            if portrait_every and i % portrait_every == portrait_every - 1:
                exif = Image.Exif()
                exif[0x0112] = 6
                kwargs["exif"] = exif.tobytes()
            out.save(folder / f"{i:05d}.jpg", **kwargs)
    return Path(root)


TEXTURES = ("brick", "grass", "gravel", "moon")


def write_texture_photos(root: Path, per_class: int, size: tuple[int, int] = (4032, 3024), seed: int = 0) -> Path:
    """A 4-class problem at phone resolution: random crops (a quarter to three quarters of the side)
    of scikit-image's brick, grass, gravel and moon-surface textures, tinted with a random colour
    cast (the same for every class, so colour is no cue), upscaled to `size`, noise added, JPEG q90."""
    import skimage.data

    rng = np.random.default_rng(seed)
    w, h = size
    for name in TEXTURES:
        texture = getattr(skimage.data, name)().astype(np.float32)
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = int(texture.shape[0] * rng.uniform(0.25, 0.75))
            ch, cw = int(side * 3 / 4), side
            top, left = rng.integers(0, texture.shape[0] - ch + 1), rng.integers(0, texture.shape[1] - cw + 1)
            gray = texture[top:top + ch, left:left + cw]
            rgb = np.clip(gray[..., None] * rng.uniform(0.6, 1.2, 3)[None, None], 0, 255).astype(np.uint8)
            big = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BICUBIC)).astype(np.int16)
            big = big + rng.integers(-6, 7, big.shape, dtype=np.int16)
            Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
    return Path(root)
