"""Datasets and the one batch loader that every reader uses.

Batches are decoded by a pool of threads in this process. Pillow releases the GIL while it
decodes and resizes, so threads use the cores as worker processes would, without starting
processes (a fixed cost on every command) or copying images between them. On a CPU the decoders
and the model take turns, each on every core (`ahead=0`); measured on 48 12 MP JPEGs with
resnet18 in bf16 on 2 cores: a DataLoader with 1 worker process 25.4 img/s, 2 workers 32.2,
threads running ahead of the model 31.8, threads taking turns with it 36.5 (the pipeline limit
there is 41). On a GPU the next batches decode while the GPU computes (`ahead` > 0).

Augmentation draws from a seed made of (seed, epoch, image index) alone, so what an image
becomes does not depend on the thread that decodes it, the number of threads or what was read
before it: a resumed run repeats the interrupted one exactly, and so does any --workers.
"""
from __future__ import annotations

import collections
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from . import data
from .data import ImageList
from .preprocess import Preprocess


class Batch(NamedTuple):
    """A collated batch: the images that decoded, their labels (-1 when unlabelled) and dataset
    indices, plus (index, reason) for those that did not."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[tuple[int, str]]


Item = tuple  # (tensor or None, label or skip reason, index)


class ImageDataset:
    """Images read from disk through a Preprocess; a failure gives its reason instead of raising."""

    def __init__(self, images: ImageList, preprocess: Preprocess):
        self.images, self.preprocess = images, preprocess

    def __len__(self) -> int:
        return len(self.images)

    def item(self, i: int, seed: str | None = None) -> Item:
        path = self.images.paths[i]
        try:
            tensor = self.preprocess(path, seed)
        except Exception as exc:  # Pillow raises OSError, ValueError, struct.error, bomb errors...
            return None, data.describe_failure(path, exc), i
        label = self.images.labels[i]
        return tensor, -1 if label is None else label, i


class MemoryDataset:
    """ImageDataset's items from images decoded once at the working resolution (`decode_all`),
    so an epoch costs only the transform.

    With a deterministic (eval) preprocess each output is computed on first use and kept in place
    of the decoded image. Give every dataset over the same images the same decoded list (it is
    copied, never changed): a training set and its un-augmented twin then share the pixels.
    """

    def __init__(self, images: ImageList, decoded: Sequence[Image.Image | str], preprocess: Preprocess):
        if len(decoded) != len(images):
            raise ValueError(f"{len(decoded)} decoded images for {len(images)} paths")
        self.images, self.preprocess = images, preprocess
        self.items = list(decoded)
        self.keep_output = preprocess.augment is None

    def __len__(self) -> int:
        return len(self.items)

    def item(self, i: int, seed: str | None = None) -> Item:
        value = self.items[i]
        if isinstance(value, Image.Image):
            try:
                value = self.preprocess.transform(value, seed)
            except Exception as exc:
                value = data.describe_failure(self.images.paths[i], exc)
            if self.keep_output:
                self.items[i] = value
        if isinstance(value, str):
            return None, value, i
        label = self.images.labels[i]
        return value, -1 if label is None else label, i


def collate(items: Sequence[Item]) -> Batch:
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


def sample_seed(seed: int, epoch: int, index: int) -> str:
    """The augmentation seed of one image in one epoch (random.Random hashes the string)."""
    return f"{seed}/{epoch}/{index}"


class Loader:
    """Batches of a dataset (anything with `__len__` and `item(i, seed)`), decoded by `threads`
    threads (0: in the calling thread) with `ahead` batches decoded in advance.

    The order: `batches` as given (e.g. extraction parts), else every index once per epoch,
    shuffled from (seed, epoch), or drawn with replacement in proportion to `weights` (balanced
    sampling). `set_epoch` reseeds all of it.
    """

    def __init__(self, dataset, batch_size: int, *, shuffle: bool = False, weights: Sequence[float] | None = None,
                 batches: Iterable[list[int]] | None = None, seed: int = 0, threads: int = 0, ahead: int = 0,
                 pin_memory: bool = False, augment_seed: bool = False, collate_fn: Callable = collate,
                 shard: tuple[int, int] | None = None):
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.fixed_batches = None if batches is None else [list(b) for b in batches]
        self.threads, self.ahead, self.pin_memory, self.collate_fn = threads, ahead, pin_memory, collate_fn
        self.augment_seed = augment_seed  # pass per-sample seeds (training); eval items need none
        self.shard = shard  # (rank, world): this process's slice of every batch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        return len(self.dataset) if self.fixed_batches is None else sum(map(len, self.fixed_batches))

    def batches(self) -> list[list[int]]:
        """This epoch's batches of dataset indices (this process's slice of each, under `shard`)."""
        batches = self._global_batches()
        if self.shard is None:
            return batches
        rank, world = self.shard
        out = []
        for batch in batches:
            share = -(-len(batch) // world)  # equal slices of a full batch; a ragged last one may leave a rank none
            out.append(batch[rank * share:(rank + 1) * share])
        return out

    def _global_batches(self) -> list[list[int]]:
        if self.fixed_batches is not None:
            return self.fixed_batches
        n = len(self.dataset)
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, n, replacement=True, generator=generator).tolist()
        elif self.shuffle:
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        return [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]

    def __len__(self) -> int:
        if self.fixed_batches is not None:
            return len(self.fixed_batches)
        return -(-len(self.dataset) // self.batch_size)

    def _item(self, i: int) -> Item:
        return self.dataset.item(i, sample_seed(self.seed, self.epoch, i) if self.augment_seed else None)

    def _collate(self, items) -> Batch:
        batch = self.collate_fn(items)
        if self.pin_memory and isinstance(batch, Batch) and batch.images.numel():
            batch = batch._replace(images=batch.images.pin_memory())
        return batch

    def __iter__(self):
        batches = self.batches()
        if self.threads <= 0:
            for indices in batches:
                yield self._collate([self._item(i) for i in indices])
            return
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cnnxfer-decode")

        def submit_next(todo) -> bool:
            for indices in itertools.islice(todo, 1):
                queue.append([pool.submit(self._item, i) for i in indices])
                return True
            return False

        queue: collections.deque = collections.deque()
        todo = iter(batches)
        try:
            for _ in range(self.ahead + 1):  # the first batch, and `ahead` more
                submit_next(todo)
            while queue:
                items = [f.result() for f in queue.popleft()]
                while len(queue) < self.ahead and submit_next(todo):  # running ahead: they decode while this one is used
                    pass
                yield self._collate(items)
                if not self.ahead:  # taking turns: the next batch decodes once the consumer is back
                    submit_next(todo)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def decode_all(images: ImageList, preprocess: Preprocess, threads: int = 0) -> list[Image.Image | str]:
    """Decode every image once at `preprocess`'s working resolution: an RGB image, or the reason it failed."""

    def one(i: int):
        try:
            return preprocess.decode(images.paths[i])[0]
        except Exception as exc:
            return data.describe_failure(images.paths[i], exc)

    if threads <= 0:
        return [one(i) for i in range(len(images))]
    with ThreadPoolExecutor(threads, thread_name_prefix="cnnxfer-decode") as pool:
        return list(pool.map(one, range(len(images))))


# ---------------------------------------------------------------- the in-memory budget

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


def decoded_size(images: ImageList, preprocess: Preprocess, sample: int = 256) -> int:
    """About the bytes `decode_all` would hold: width x height x 3 at the working resolution, from
    the file headers (no decoding) of up to `sample` images chosen with a fixed seed, scaled to all
    of them. An unreadable header counts 0: that file is skipped later anyway."""
    n = len(images)
    chosen = range(n) if n <= sample else np.random.default_rng(0).choice(n, sample, replace=False)
    total = 0
    for i in chosen:
        header = data.read_header(images.paths[i])
        if header is not None:
            shown, fmt = header
            factor = preprocess.max_reduction(*shown) if preprocess.reduced_decode else 1.0
            w, h = data.planned_size(shown, fmt, factor)
            total += w * h * 3
    return total * n // max(1, len(chosen))
