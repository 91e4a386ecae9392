"""The loader (cnnxfer/loader.py): datasets from disk and from memory, the threaded batch loader,
the in-memory image cache at the working resolution and its budget."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cnnxfer import data, loader
from cnnxfer.preprocess import Augment, Preprocess

SMALL = Preprocess((3, 24, 24), mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.mark.parametrize("threads", [0, 2])
def test_images_decoded_in_memory_give_the_same_items_and_skip_reasons_as_disk(dirty_folder, threads):
    """decode_all + MemoryDataset (--cache-images) against ImageDataset reading every file."""
    images = data.discover(dirty_folder.root)
    pre = Preprocess((3, 24, 24), max_pixels=dirty_folder.max_image_pixels)
    train, evaluation = pre.training(Augment()), pre.training(Augment()).evaluation()
    decoded = loader.decode_all(images, train, threads)
    for p in (evaluation, train):
        disk, memory = loader.ImageDataset(images, p), loader.MemoryDataset(images, decoded, p)
        assert len(memory) == len(disk) == len(images)
        for repeat in range(2):  # the second pass of an eval set serves kept outputs
            for i in range(len(images)):
                want, got = disk.item(i, f"0/{repeat}/{i}"), memory.item(i, f"0/{repeat}/{i}")
                assert got[1:] == want[1:], images.paths[i]  # label and index, or the skip reason and index
                if want[0] is not None:
                    assert torch.equal(got[0], want[0]), images.paths[i]
                else:
                    assert got[0] is None
    assert sum(isinstance(x, str) for x in decoded) == len(dirty_folder.skipped)


def test_the_image_cache_holds_working_resolution_images_and_its_estimate_is_exact(tmp_path):
    """A folder of phone-size photos: the cache keeps each at the size the transform needs, not
    the file's, and decoded_size predicts those bytes from the headers alone."""
    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    sizes = [(1600, 1200), (1200, 1600), (2000, 1000), (900, 900)]
    for k, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((w, h), Image.BILINEAR)
        image.save(tmp_path / "a" / f"{k}.jpg", quality=90)
        image.save(tmp_path / "a" / f"{k}.png")
    images = data.discover(tmp_path)
    pre = Preprocess((3, 64, 64)).training(Augment())
    decoded = loader.decode_all(images, pre, threads=2)
    for path, image in zip(images.paths, decoded):
        assert isinstance(image, Image.Image), image
        file_size = Image.open(path).size
        assert image.width * image.height * 25 < file_size[0] * file_size[1]  # far below the file's
        assert image.size == data.planned_size(file_size, data.read_header(path)[1], pre.max_reduction(*file_size))
    exact = sum(im.width * im.height * 3 for im in decoded)
    assert loader.decoded_size(images, pre) == exact
    full = Preprocess((3, 64, 64), reduced_decode=False).training(Augment())
    assert loader.decoded_size(images, full) == 2 * 3 * sum(w * h for w, h in sizes)


def test_decoded_size_reads_a_sample_of_headers_for_large_folders(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(300):  # 150 images of 10x8 and 150 of 20x8: smaller than needed, kept as they are
        w = 10 if i % 2 else 20
        Image.fromarray(rng.integers(0, 255, (8, w, 3), dtype=np.uint8)).save(tmp_path / f"{i:03d}.png")
    images = data.discover(tmp_path)
    exact = 150 * (10 * 8 * 3) + 150 * (20 * 8 * 3)
    assert loader.decoded_size(images, SMALL, sample=1000) == exact
    estimate = loader.decoded_size(images, SMALL, sample=256)
    assert abs(estimate - exact) / exact < 0.05 and estimate == loader.decoded_size(images, SMALL, sample=256)


def test_cache_budget_is_a_fixed_share_of_the_machine():
    budget = loader.cache_budget()
    assert 0 < budget <= loader.CACHE_MAX_BYTES
    assert budget == loader.cache_budget()  # not what happens to be free: a resumed run decides the same


def test_collate_keeps_good_items_and_skip_reasons():
    items = [(torch.zeros(3, 2, 2), 1, 0), (None, "broken", 1), (torch.ones(3, 2, 2), -1, 2)]
    batch = loader.collate(items)
    assert batch.images.shape == (2, 3, 2, 2) and batch.labels.tolist() == [1, -1]
    assert batch.indices.tolist() == [0, 2] and batch.skipped == [(1, "broken")]
    empty = loader.collate([(None, "bad", 5)])
    assert empty.images.numel() == 0 and empty.skipped == [(5, "bad")]


class _Recorder:
    """A dataset that records which indices were read, in which thread."""

    def __init__(self, n: int):
        import threading

        self.n, self.read, self.lock, self.threading = n, [], threading.Lock(), threading

    def __len__(self):
        return self.n

    def item(self, i, seed=None):
        with self.lock:
            self.read.append((i, self.threading.current_thread().name))
        return torch.full((1,), float(i)), i % 3, i


@pytest.mark.parametrize("threads, ahead", [(0, 0), (2, 0), (2, 2)])
def test_loader_order_shuffle_and_epochs(threads, ahead):
    ds = _Recorder(10)
    plain = loader.Loader(ds, 4, threads=threads, ahead=ahead)
    assert len(plain) == 3 and plain.num_samples == 10
    assert [b.indices.tolist() for b in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    shuffled = loader.Loader(ds, 4, shuffle=True, seed=1, threads=threads, ahead=ahead)
    first = [i for b in shuffled for i in b.indices.tolist()]
    assert sorted(first) == list(range(10)) and first != list(range(10))
    assert [i for b in shuffled for i in b.indices.tolist()] == first  # same epoch, same order
    shuffled.set_epoch(1)
    assert [i for b in shuffled for i in b.indices.tolist()] != first
    if threads:
        assert all(name.startswith("cnnxfer-decode") for _, name in ds.read)


def test_taking_turns_decodes_nothing_while_the_consumer_works():
    """ahead=0 (a CPU): the next batch is only decoded once the model is done with this one."""
    ds = _Recorder(12)
    seen_during_use = []
    for batch in loader.Loader(ds, 4, threads=2, ahead=0):
        before = len(ds.read)
        torch.randn(200, 200) @ torch.randn(200, 200)  # the "model"
        seen_during_use.append(len(ds.read) - before)
    assert seen_during_use == [0, 0, 0]
    import time

    ds = _Recorder(12)
    it = iter(loader.Loader(ds, 4, threads=2, ahead=1))
    next(it)

    deadline = time.monotonic() + 5
    while len(ds.read) < 8 and time.monotonic() < deadline:  # the next batch decodes meanwhile
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(ds.read) == 8  # one batch ahead, not more
    it.close()


def test_abandoning_the_loader_stops_its_threads():
    import threading

    before = set(threading.enumerate())
    ds = _Recorder(400)
    it = iter(loader.Loader(ds, 2, threads=3, ahead=4))
    next(it)
    it.close()  # e.g. Ctrl-C between batches: the pool is shut down, pending work cancelled
    assert set(threading.enumerate()) <= before
    assert len(ds.read) < 40
