"""A run's images: which train and which validate, the loaders that read them, and the files
found unreadable on the way.

`read_data` splits the folder and resolves the settings that depend on it (recipe.py chooses
them); `build_loaders` makes the training, validation and un-augmented training loaders through
the Session (from disk, or from images decoded once when --cache-images says so); `Skips` keeps
every process's unreadable files, checks that no class lost all of its images, and counts the
readable images per class for the record.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import data, loader as loaders, recipe
from .config import CacheImages, RunConfig, Strategy, TrainConfig
from .errors import DataError, StrictModeError
from .preprocess import Augment, Preprocess
from .session import Session

Note = Callable[[str], None]


@dataclass
class RunData:
    """The images of a run and the settings resolved from them."""

    config: TrainConfig  # epochs and batch size resolved (recipe.resolve_schedule)
    train: data.ImageList
    val: data.ImageList
    fingerprint: str
    img_size: int | None  # the working size of a model trained from scratch on small images
    hp: dict  # recipe.resolve_hparams, plus the step precision once the model is built

    @property
    def classes(self) -> list[str]:
        return self.train.classes


def read_data(config: TrainConfig, note: Note) -> RunData:
    """Split `config.data` and resolve what depends on its size; what the user should know is noted."""
    train, val = recipe.split_data(config.data, config.val_split, config.seed)
    for warning in train.warnings:
        note(warning)
    resolved, chosen = recipe.resolve_schedule(config, len(train))
    if chosen:
        note(chosen)
    unused = recipe.probe_ignores(config)
    if unused:
        note(f"--strategy linear fits the probe exactly (no training loop): {', '.join(unused)} do not apply "
             f"(--no-cache trains a head with them)")
    img_size = recipe.working_img_size(resolved.img_size, resolved.weights, train)
    if img_size and not resolved.img_size:
        note(f"small images: training at {img_size} px (set --img-size to change)")
    if resolved.patience and not len(val):
        note("--patience is ignored without a validation set (--val-split 0): the last epoch is kept")
    fingerprint = data.fingerprint(train) + data.fingerprint(val)
    return RunData(resolved, train, val, fingerprint, img_size, recipe.resolve_hparams(resolved))


def check_same_data(saved: RunConfig, run: RunData, run_dir: Path) -> None:
    """A resumed run must read the images it was trained on: same classes, same files."""
    where = f"--resume {run_dir}: {run.config.data}"
    if saved.classes and saved.classes != run.classes:
        raise DataError(f"{where} now holds classes {run.classes}, the run was trained on {saved.classes}")
    if saved.data_fingerprint and saved.data_fingerprint != run.fingerprint:
        raise DataError(f"{where} does not hold the images the run was trained on (files were added, removed or "
                        f"changed since it started); a resumed run must read the same images")


# ---------------------------------------------------------------- unreadable files

class Skips:
    """The unreadable files of a run (path -> why), as each process finds them decoding its slice."""

    def __init__(self, session: Session, run: RunData, skipped: dict[str, str] | None = None):
        self.session, self.run = session, run
        self.skipped: dict[str, str] = dict(skipped or {})

    def __len__(self) -> int:
        return len(self.skipped)

    def record(self, loader, skipped: list[tuple[int, str]]) -> None:
        """A loader's (index, reason) pairs, by path (cached features have no paths: nothing to add)."""
        images = getattr(loader.dataset, "images", None)
        for i, reason in skipped:
            if images is not None:
                self.skipped[str(images.paths[i])] = reason

    def merge(self) -> None:
        """Every process's unreadable files, on every process (each read only its slice)."""
        if self.session.distributed:
            for other in self.session.gather_objects(dict(self.skipped)):
                self.skipped.update(other)

    def check(self, write: Callable[[dict], Path | None], strict: bool) -> None:
        """After every image was decoded once: a class with no readable image is bad input, and
        --strict fails on any skipped file now rather than at the end (`write` lists them)."""
        self.merge()
        bad = counts_by_label(self.run.train, self.skipped)
        empty = [self.run.classes[k] for k, (total, skipped) in bad.items() if total and total == skipped]
        if empty or (strict and self.skipped):
            listed = write(self.skipped)
        if empty:
            raise DataError(f"every image of class(es) {', '.join(empty)} is unreadable; see {listed}")
        if strict and self.skipped:
            raise StrictModeError(f"--strict: {len(self.skipped)} unreadable image(s) skipped; see {listed}")

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Readable images per class in the training and validation sets (unreadable files are
        known once decoded: before that, every file counts)."""
        counts = {name: {"train": 0, "val": 0} for name in self.run.classes}
        for split, images in (("train", self.run.train), ("val", self.run.val)):
            for label, (total, skipped) in counts_by_label(images, self.skipped).items():
                counts[self.run.classes[label]][split] = total - skipped
        return counts


def counts_by_label(images: data.ImageList, skipped: dict[str, str]) -> dict[int, tuple[int, int]]:
    """{label: (images, skipped images)} for the classes of `images`."""
    out: dict[int, list[int]] = {}
    for path, label in zip(images.paths, images.labels):
        entry = out.setdefault(label, [0, 0])
        entry[0] += 1
        entry[1] += str(path) in skipped
    return {k: (v[0], v[1]) for k, v in out.items()}


# ---------------------------------------------------------------- loaders

@dataclass
class Loaders:
    train: loaders.Loader  # augmented, shuffled (or drawn by class under --balance sampler)
    val: loaders.Loader
    train_eval: loaders.Loader  # the training images through the evaluation transform (probe, feature cache)
    normalizer: torch.nn.Module  # uint8 batches -> the model's input, on the device


def build_loaders(run: RunData, data_config: dict, session: Session, note: Note) -> Loaders:
    """Train, validation and un-augmented train loaders, from disk or from images decoded once.

    Training images are decoded as the augmentation needs them (random crops keep real pixels)
    by every reader, so the un-augmented pass over them and the image cache see the same
    pixels; validation images as the eval transform needs them. With several processes each
    loader gives this process its slice of every batch.
    """
    c = run.config
    train_pre, val_pre = _preprocessing(c, data_config)
    train_eval_pre, pre = train_pre.evaluation(), val_pre
    decoded = _decode_in_memory(run, train_pre, val_pre, session, note)
    if decoded is None:
        train_set = loaders.ImageDataset(run.train, train_pre)
        val_set = loaders.ImageDataset(run.val, val_pre)
        train_eval_set = loaders.ImageDataset(run.train, train_eval_pre)
    else:
        train_decoded, val_decoded = decoded
        val_set = loaders.MemoryDataset(run.val, val_decoded, val_pre)
        train_eval_set = loaders.MemoryDataset(run.train, train_decoded, train_eval_pre)
        # --no-augment: the training transform is the evaluation one; one copy serves both
        train_set = loaders.MemoryDataset(run.train, train_decoded, train_pre) if c.augment else train_eval_set
    weights = _balanced_weights(run) if c.balance.value == "sampler" else None
    return Loaders(session.loader(train_set, c.batch_size, shuffle=True, weights=weights, seed=c.seed, augment_seed=True),
                   session.loader(val_set, c.batch_size), session.loader(train_eval_set, c.batch_size),
                   pre.normalizer().to(session.device))


def _preprocessing(c: TrainConfig, data_config: dict) -> tuple[Preprocess, Preprocess]:
    """(training, validation) preprocessing of a run on a model with `data_config`."""
    pre = Preprocess.from_data_config(data_config, max_pixels=c.max_image_pixels, reduced_decode=c.reduced_decode)
    augment = Augment(scale=recipe.crop_scale(data_config), hflip=c.hflip) if c.augment else None
    return pre.training(augment), pre


def eval_preprocess(c: TrainConfig, data_config: dict) -> Preprocess:
    """The un-augmented pass over a run's training images (the probe's features, the feature cache
    and the leaderboard's): decoded as training decodes them, transformed as evaluation does."""
    return _preprocessing(c, data_config)[0].evaluation()


def _decode_in_memory(run: RunData, train_pre: Preprocess, val_pre: Preprocess, session: Session, note: Note):
    """(train, val) images decoded once at the working resolution when --cache-images says
    so, else None (read from disk every epoch).

    Decoding dominates a small model's epoch on a CPU (a 64 px PNG: ~115 us to decode, ~40 us
    to crop and flip; a 12 MP JPEG: 35 ms at the working resolution); a dataset decoded once
    then costs only its transform per epoch. `auto` decodes when the images fit
    loader.cache_budget() at the working resolution (a 12 MP photo takes 0.6-2.3 MB there instead
    of 36 MB) and would be decoded more than once: not for --strategy linear with its feature
    cache (one pass), nor for one epoch. Each process holds the images of the whole dataset.
    """
    c = run.config
    mode = CacheImages(c.cache_images)
    if mode == CacheImages.off:
        return None
    if mode == CacheImages.auto:
        one_pass = (Strategy(c.strategy) == Strategy.linear and c.cache_features) or c.epochs <= 1
        if one_pass:
            return None
        size = loaders.decoded_size(run.train, train_pre) + loaders.decoded_size(run.val, val_pre)
        if size > loaders.cache_budget():
            note(f"the decoded images would take about {size / 2**30:.1f} GiB: reading them from disk "
                 f"every epoch (--cache-images on holds them anyway)")
            return None
    threads = session.runtime.decode_threads
    decoded = (loaders.decode_all(run.train, train_pre, threads), loaders.decode_all(run.val, val_pre, threads))
    unreadable = sum(isinstance(item, str) for part in decoded for item in part)  # a reason, not an image
    readable = len(decoded[0]) + len(decoded[1]) - unreadable
    also = f" ({unreadable} unreadable file(s) skipped)" if unreadable else ""
    note(f"{readable} images decoded once into memory{also}; --cache-images off reads them from disk every epoch")
    return decoded


def _balanced_weights(run: RunData) -> list[float]:
    """Sampling weights that draw every class equally often (--balance sampler)."""
    counts = np.bincount(run.train.labels, minlength=len(run.classes)).astype(float)
    return [1.0 / counts[label] for label in run.train.labels]
