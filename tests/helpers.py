"""Test helpers shared by the engine, evaluate and CLI training tests (imported, not fixtures)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

COLOURS = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


def copy_digits(digits_folder: Path, target: Path, classes, images: slice) -> Path:
    """target/<digit>/ for each digit in `classes`, holding the slice `images` of that digit's files
    in conftest's `digits_folder` (sorted by name)."""
    import shutil

    for name in classes:
        (target / name).mkdir(parents=True)
        for f in sorted((digits_folder / name).glob("*.png"))[images]:
            shutil.copy(f, target / name / f.name)
    return target


def write_colour_folder(root: Path, counts: dict[str, int], size: int = 32, seed: int = 0) -> Path:
    """Class folders of noisy solid-colour PNGs: a problem any CNN separates in a few steps."""
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            colour = np.array(COLOURS[name], dtype=float) * rng.uniform(0.7, 1.1)
            pixels = colour[None, None] + rng.normal(0, 25, (size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def single_thread():
    """Generator for a module fixture: one intra-op thread while the module runs. On a shared
    2-core runner two OpenMP threads plus a loader worker stall each other (5-10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A small CNN for digits (32 px): three conv stages, max pooling, a linear head. A custom module
# for `--model FILE:build`, quick to train in a test (~97% validation accuracy in 6 epochs).
DIGITS_NET = '''
from torch import nn


def build(num_classes):
    def stage(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())

    return nn.Sequential(stage(3, 16), nn.MaxPool2d(2), stage(16, 32), nn.MaxPool2d(2), stage(32, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
'''
