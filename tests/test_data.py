"""Finding and decoding images (cnnxfer/data.py): dirty folders, odd formats, manifests, splits."""
from __future__ import annotations

import os
import random
import re
import signal
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnxfer import data
from cnnxfer.errors import DataError


def _decode_all(images: data.ImageList, max_pixels: int, threads: int = 0):
    """Run the real dataset + collate through the loader; (decoded index -> tensor, skipped index -> reason)."""
    from cnnxfer.loader import ImageDataset, Loader
    from cnnxfer.preprocess import Preprocess

    dataset = ImageDataset(images, Preprocess((3, 24, 24), max_pixels=max_pixels))
    decoded, skipped = {}, {}
    for batch in Loader(dataset, batch_size=3, threads=threads):
        for i, image in zip(batch.indices.tolist(), batch.images):
            decoded[i] = image
        skipped.update(dict(batch.skipped))
    return decoded, skipped


def test_dirty_folder_scan_finds_classes_and_candidates(dirty_folder):
    images = data.discover(dirty_folder.root)
    assert images.classes == ["cats", "dogs"]  # no .ipynb_checkpoints / __MACOSX class, no empty one
    found = set(images.paths)
    assert found == set(dirty_folder.valid) | set(dirty_folder.skipped)  # broken ones are found, judged at decode
    assert not found & set(dirty_folder.ignored)
    assert not any("loop" in p.parts for p in images.paths)  # the symlinked loop adds nothing
    order = [(label, str(path)) for label, path in zip(images.labels, images.paths)]
    assert order == sorted(order)  # by class, then path: the same rows in the same order every run
    for path, label in zip(images.paths, images.labels):
        assert images.classes[label] == path.relative_to(dirty_folder.root).parts[0]
    assert images.ignored == len(dirty_folder.ignored)
    assert images.warnings == [f"class folder '{dirty_folder.root / 'empty'}' holds no images (left out of the classes)"]


@pytest.mark.parametrize("threads", [0, 2])
def test_dirty_folder_decodes_exactly_the_valid_images(dirty_folder, threads):
    images = data.discover(dirty_folder.root)
    decoded, skipped = _decode_all(images, dirty_folder.max_image_pixels, threads)
    assert {images.paths[i] for i in decoded} == set(dirty_folder.valid)
    reasons = {images.paths[i]: reason for i, reason in skipped.items()}
    assert set(reasons) == set(dirty_folder.skipped)
    for path, pattern in dirty_folder.skipped.items():
        assert re.search(pattern, reasons[path]), (path.name, reasons[path])
    for image in decoded.values():
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 24, 24)


def test_symlink_loop_to_an_ancestor_does_not_hang(tmp_path, make_images):
    make_images(tmp_path / "ds", {"a": 2, "b": 1})
    os.symlink(tmp_path / "ds", tmp_path / "ds" / "a" / "up")
    os.symlink(tmp_path / "ds" / "a", tmp_path / "ds" / "b" / "again")
    result = []
    worker = threading.Thread(target=lambda: result.append(data.discover(tmp_path / "ds")), daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "discover() hangs on a symlinked folder loop"
    assert result[0].classes == ["a", "b"]


def test_empty_and_missing_inputs_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.discover(tmp_path / "missing")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        data.discover(tmp_path / "nothing", labelled=True)
    with pytest.raises(DataError, match=r"no images found \(looked for images in it, or in one subfolder per class\)"):
        data.discover(tmp_path / "nothing")  # extract and predict take flat folders too
    (tmp_path / "only_empty" / "a").mkdir(parents=True)
    (tmp_path / "only_empty" / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images found"):
        data.discover(tmp_path / "only_empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="expected an image, a folder of images or a .csv"):
        data.discover(tmp_path / "notes.txt")


def test_flat_folder_is_unlabelled_and_recursive(tmp_path, make_images):
    written = make_images(tmp_path / "flat", {"": ["a.jpg", "b.png"], "more": ["c.jpg"]})
    images = data.discover(tmp_path / "flat")
    assert not images.labelled and images.labels == [None] * 3
    assert set(images.paths) == {*written[""], *written["more"]}
    assert data.discover(tmp_path / "flat", labelled=False).labels == [None] * 3


def test_fixed_class_list_for_validation_folders(tmp_path, make_images):
    make_images(tmp_path / "val", {"b": 1, "a": 1})
    images = data.scan_class_folders(tmp_path / "val", classes=["a", "b", "c"])
    assert images.classes == ["a", "b", "c"] and images.labels == [0, 1]
    (tmp_path / "val" / "c").mkdir()  # a known class without images: still a class of the model
    (tmp_path / "val" / "unknown_but_empty").mkdir()  # holds nothing to label: no error
    images = data.scan_class_folders(tmp_path / "val", classes=["a", "b", "c"])
    assert images.classes == ["a", "b", "c"] and images.labels == [0, 1]
    assert [w.split("'")[1] for w in images.warnings] == [str(tmp_path / "val" / n) for n in ("c", "unknown_but_empty")]
    make_images(tmp_path / "val", {"zebra": 1})
    with pytest.raises(DataError, match="zebra"):
        data.scan_class_folders(tmp_path / "val", classes=["a", "b", "c"])


# ---------------------------------------------------------------- decoding odd images

def _png_rgb(path: Path) -> np.ndarray:
    return np.asarray(data.load_image(path))


def test_exif_orientation_is_applied(dirty_folder):
    path = next(p for p in dirty_folder.valid if p.name == "exif_rot.jpg")
    with Image.open(path) as raw:
        assert raw.size == (48, 32)
        expected = np.asarray(raw.convert("RGB").transpose(Image.Transpose.ROTATE_270), dtype=np.int16)
    image = data.load_image(path)
    assert image.mode == "RGB" and image.size == (32, 48)
    assert np.abs(np.asarray(image, dtype=np.int16) - expected).max() <= 2


def test_cmyk_jpeg_becomes_rgb(dirty_folder):
    path = next(p for p in dirty_folder.valid if p.name == "cmyk.jpg")
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    image = data.load_image(path)
    assert image.mode == "RGB" and image.size == (48, 40)


def test_palette_with_transparency_composites_on_white(tmp_path):
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    im.paste(1, (4, 0, 8, 8))  # right half: palette entry 1, red
    im.save(tmp_path / "p.png", transparency=0)  # entry 0 (black) is transparent
    rgb = _png_rgb(tmp_path / "p.png")
    assert rgb.shape == (8, 8, 3)
    assert (rgb[:, :4] == 255).all()  # transparent -> white, not black
    assert (rgb[:, 4:] == [255, 0, 0]).all()


def test_rgba_and_la_composite_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 2] = 255  # blue
    rgba[:, 2:, 3] = 255  # right half opaque, left half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rgb = _png_rgb(tmp_path / "a.png")
    assert (rgb[:, :2] == 255).all() and (rgb[:, 2:] == [0, 0, 255]).all()
    Image.fromarray(rgba[..., [0, 3]], "LA").save(tmp_path / "la.png")
    rgb = _png_rgb(tmp_path / "la.png")
    assert (rgb[:, :2] == 255).all() and (rgb[:, 2:] == 0).all()


def test_grayscale_and_bilevel_become_rgb(tmp_path):
    Image.fromarray(np.full((4, 6), 77, np.uint8), "L").save(tmp_path / "l.png")
    assert (_png_rgb(tmp_path / "l.png") == 77).all()
    Image.new("1", (6, 4), 1).save(tmp_path / "one.png")
    rgb = _png_rgb(tmp_path / "one.png")
    assert rgb.shape == (4, 6, 3) and (rgb == 255).all()


@pytest.mark.parametrize("value, expected", [(32768, 127.5), (65535, 255), (1000, 1000 / 257)])
def test_16bit_png_is_rescaled_not_clamped(tmp_path, value, expected):
    Image.fromarray(np.full((5, 7), value, dtype=np.uint16)).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode.startswith("I")  # really a 16-bit file
    rgb = _png_rgb(tmp_path / "g16.png")
    assert rgb.shape == (5, 7, 3)
    assert np.abs(rgb.astype(float) - expected).max() <= 1.0


def test_multiframe_gif_uses_the_first_frame(dirty_folder):
    path = next(p for p in dirty_folder.valid if p.name == "anim.gif")
    with Image.open(path) as raw:
        assert raw.n_frames == 2
    rgb = _png_rgb(path)
    assert (rgb == [255, 0, 0]).all()


def test_webp_upper_case_and_non_ascii_names_decode(dirty_folder):
    names = {p.name: p for p in dirty_folder.valid}
    for name in ("photo.webp", "UPPER.PNG", "good2.JPG", "ñandú.png", "猫.jpg"):
        assert data.load_image(names[name]).size == (48, 40), name


def test_decompression_bomb_limit_is_configurable_and_pillow_is_left_alone(tmp_path, write_image):
    path = write_image(tmp_path / "big.png", size=(100, 100))
    before = Image.MAX_IMAGE_PIXELS
    assert data.load_image(path).size == (100, 100)  # the default limit lets it through
    for limit in (4000, 9000):  # > 2x the limit raises; 1x-2x only warns in Pillow: both refused, no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # Pillow's raw DecompressionBombWarning never leaks
            with pytest.raises(Image.DecompressionBombError) as info:
                data.load_image(path, max_pixels=limit)
        assert "too many pixels" in data.describe_failure(path, info.value)
    assert data.load_image(path, max_pixels=10_000).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == before  # never set: a race once decoding runs in threads


def test_failure_reasons(tmp_path, write_image):
    (tmp_path / "zero.png").write_bytes(b"")
    os.symlink(tmp_path / "missing.png", tmp_path / "dangling.png")
    path = write_image(tmp_path / "ok.jpg")
    data_bytes = path.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data_bytes[: len(data_bytes) // 2])
    for name, pattern in [("zero.png", "empty file"), ("dangling.png", "dangling symlink"),
                          ("cut.jpg", "truncated"), ("absent.png", "file not found")]:
        with pytest.raises(Exception) as info:
            data.load_image(tmp_path / name)
        assert pattern in data.describe_failure(tmp_path / name, info.value)


# ---------------------------------------------------------------- manifests

def test_csv_manifest_resolves_relative_paths(tmp_path, make_images):
    written = make_images(tmp_path / "imgs", {"x": 2, "y": 1})
    absolute = written["y"][0]
    manifest = tmp_path / "lists" / "m.csv"
    manifest.parent.mkdir()
    manifest.write_text(f"path,label\n../imgs/x/img0.jpg,cat\n../imgs/x/img1.jpg,dog\n{absolute},cat\n", encoding="utf-8")
    images = data.discover(manifest)
    assert images.classes == ["cat", "dog"] and images.labels == [0, 1, 0]
    assert [p.resolve() for p in images.paths] == [*(p.resolve() for p in written["x"]), absolute]
    assert all(p.is_file() for p in images.paths)


def test_csv_manifest_without_labels(tmp_path, make_images):
    make_images(tmp_path, {"": ["a.jpg"]})
    (tmp_path / "m.csv").write_text("path\na.jpg\n")
    images = data.discover(tmp_path / "m.csv")
    assert images.labels == [None] and not images.labelled
    with pytest.raises(DataError, match="no 'label'"):
        data.discover(tmp_path / "m.csv", labelled=True)


@pytest.mark.parametrize("text, pattern", [("file,label\na.jpg,x\n", "'path' column"), ("", "'path' column")])
def test_bad_manifest(tmp_path, text, pattern):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(DataError, match=pattern):
        data.discover(tmp_path / "m.csv")


def test_manifest_label_outside_fixed_classes(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\na.jpg,cat\nb.jpg,emu\n")
    with pytest.raises(DataError, match=r"m.csv:3: label 'emu'"):
        data.read_manifest(tmp_path / "m.csv", classes=["cat", "dog"])


# ---------------------------------------------------------------- splits, batches, skip list

def test_stratified_split_is_disjoint_complete_and_repeatable():
    labels = [0] * 10 + [1] * 5 + [2] * 2 + [3]
    train, val = data.stratified_split(labels, 0.2, seed=3)
    assert sorted(train + val) == list(range(len(labels))) and not set(train) & set(val)
    val_labels = [labels[i] for i in val]
    assert val_labels.count(0) == 2 and val_labels.count(1) == 1 and val_labels.count(2) == 1
    assert 3 not in val_labels  # a single-image class stays in train
    assert data.stratified_split(labels, 0.2, seed=3) == (train, val)
    assert data.stratified_split(labels, 0.2, seed=4) != (train, val)
    with pytest.raises(DataError):
        data.stratified_split(labels, 1.0)


def test_find_split_folders(tmp_path):
    assert data.find_split_folders(tmp_path) is None
    (tmp_path / "train").mkdir()
    assert data.find_split_folders(tmp_path) is None
    (tmp_path / "validation").mkdir()
    assert data.find_split_folders(tmp_path) == (tmp_path / "train", tmp_path / "validation")


def test_write_skipped_quotes_commas(tmp_path):
    import csv

    assert data.write_skipped(tmp_path / "none.skipped.csv", []) is None
    assert not (tmp_path / "none.skipped.csv").exists()
    out = data.write_skipped(tmp_path / "x.skipped.csv", [(tmp_path / "a,b.jpg", "OSError: bad, very bad")])
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [{"path": str(tmp_path / "a,b.jpg"), "reason": "OSError: bad, very bad"}]


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_deferred_signals_act_at_the_next_check_through_the_previous_handler():
    import signal as sig

    from cnnxfer.signals import check_signals, deferred_signals

    with deferred_signals():
        sig.raise_signal(sig.SIGINT)  # remembered, not raised inside whatever code was running
        with pytest.raises(KeyboardInterrupt):
            check_signals()  # the previous (default) handler acts here
    check_signals()  # nothing pending afterwards



def test_symlink_to_an_ancestor_does_not_relabel_other_classes(tmp_path, make_images):
    from cnnxfer.data import scan_class_folders

    root = tmp_path / "data"
    make_images(root, {"cats": 2, "dogs": 3})
    (root / "cats" / "up").symlink_to("..", target_is_directory=True)
    images = scan_class_folders(root)
    assert len(images) == 5
    assert all(images.classes[l] == p.parent.name for p, l in zip(images.paths, images.labels))


def test_skipped_list_name_keeps_dotted_stems(tmp_path):
    from cnnxfer.features import skipped_path

    assert skipped_path(tmp_path / "features.v2.parquet").name == "features.v2.skipped.csv"
    assert skipped_path(tmp_path / "features.parquet").name == "features.skipped.csv"
