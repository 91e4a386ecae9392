"""Preprocessing (cnnxfer/preprocess.py) and the reduced decode behind it (data.decode_image).

The reduced decode must give each reader at least the pixels its transform needs, in every
orientation and format, and must not change what the model sees in any way that matters.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cnnxfer import data
from cnnxfer.loader import ImageDataset, Loader
from cnnxfer.preprocess import Augment, Normalize, Preprocess

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "tif": "TIFF", "bmp": "BMP", "heic": "HEIF", "avif": "AVIF"}


def _photo(width: int, height: int) -> np.ndarray:
    """A real photograph (scikit-image's astronaut) resized to width x height, with a little noise."""
    import skimage.data

    rng = np.random.default_rng(0)
    image = Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-4, 5, (height, width, 3), dtype=np.int16)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _save(path, pixels: np.ndarray, orientation: int = 1):
    image = Image.fromarray(pixels)
    kwargs = {"quality": 90} if path.suffix in (".jpg", ".webp", ".heic", ".avif") else {}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    image.save(path, format=FORMATS[path.suffix[1:]], **kwargs)
    return path


@pytest.fixture(scope="module")
def big_photo():
    return _photo(1200, 900)


EVAL = Preprocess((3, 64, 64))  # resizes the shorter side to floor(64 / 0.875) = 73
TRAIN = EVAL.training(Augment())


def _smallest_crop_side(pre: Preprocess, size) -> float:
    """The shorter side of the smallest random crop the training transform can draw from `size`."""
    a = pre.augment
    return math.sqrt(a.scale[0] * size[0] * size[1] * min(a.ratio[0], 1 / a.ratio[1]))


def test_geometry_by_hand():
    pre = Preprocess((3, 224, 224))
    assert pre.scale_size == 256
    assert pre.max_reduction(4000, 3000) == pytest.approx(3000 / 256)
    train = pre.training(Augment(scale=(0.35, 1.0)))
    assert train.max_reduction(4000, 3000) == pytest.approx(math.sqrt(0.35 * 4000 * 3000 * 0.75) / 224)
    assert train.evaluation().max_reduction(4000, 3000) == train.max_reduction(4000, 3000)  # decodes alike
    assert data.planned_size((4000, 3000), "JPEG", 3000 / 256) == (341, 256)  # 1/8 DCT, then to the resize target
    assert data.planned_size((4000, 3000), "PNG", 3000 / 256) == (341, 256)
    assert data.planned_size((4000, 3000), "JPEG", 1.2) == (4000, 3000)
    assert data.planned_size((100, 80), "JPEG", 0.5) == (100, 80)  # smaller than needed: as it is
    left, top, right, bottom = pre.crop_box(400, 300)  # shorter side 300 -> 256, centre 224 crop
    assert (right - left, bottom - top) == pytest.approx((224 * 300 / 256,) * 2)
    assert (left + right) / 2 == pytest.approx(200) and (top + bottom) / 2 == pytest.approx(150)


@pytest.mark.parametrize("ext", sorted(FORMATS))
def test_reduced_decode_gives_each_reader_what_it_needs_in_every_format(tmp_path, big_photo, ext):
    path = _save(tmp_path / f"photo.{ext}", big_photo)
    full, shown = data.decode_image(path)
    assert shown == full.size == (1200, 900)
    for pre in (EVAL, TRAIN):
        image, size = pre.decode(path)
        assert size == (1200, 900) and image.mode == "RGB"
        assert image.size == data.planned_size(size, data.read_header(path)[1], pre.max_reduction(*size))
        assert image.size[0] / image.size[1] == pytest.approx(4 / 3, rel=0.02)
        assert min(image.size) >= pre.scale_size  # the eval resize target stays covered
        if pre.augment:  # the smallest random crop still holds a whole input of real pixels
            assert _smallest_crop_side(pre, image.size) >= max(pre.input_size[1:]) - 1
        assert max(image.size) < 600  # far from the file's 1200 x 900


@pytest.mark.parametrize("orientation", range(1, 9))
def test_reduced_decode_applies_exif_orientation_and_sizes_the_rotated_image(tmp_path, big_photo, orientation):
    path = _save(tmp_path / "photo.jpg", big_photo, orientation)
    full, shown = data.decode_image(path)
    transposed = orientation in (5, 6, 7, 8)
    assert shown == full.size == ((900, 1200) if transposed else (1200, 900))
    for pre in (EVAL, TRAIN):
        image, size = pre.decode(path)
        assert size == shown
        assert (image.size[0] < image.size[1]) == transposed  # the rotated size, not the stored one
        assert min(image.size) >= pre.scale_size
        # the same picture the same way up: the full decode brought to this size differs only by
        # resampling (DCT scaling vs a bilinear filter), far less than a mirrored one does
        pixels = np.asarray(image, dtype=np.float32)
        reference = np.asarray(full.resize(image.size, Image.BILINEAR), dtype=np.float32)
        assert np.abs(pixels - reference).mean() < 6.0
        assert np.abs(pixels - reference[::-1]).mean() > 20 and np.abs(pixels - reference[:, ::-1]).mean() > 20


def test_eval_inputs_from_a_reduced_decode_match_the_full_decode(tmp_path, big_photo):
    """What the model sees: the eval transform's uint8 input, reduced vs full decode (measured
    here: JPEG 52 dB PSNR, PNG and HEIC identical: their reduction is the transform's own resize)."""
    for ext in ("jpg", "png", "heic"):
        path = _save(tmp_path / f"photo.{ext}", big_photo)
        reduced = EVAL(path).float()
        full = Preprocess((3, 64, 64), reduced_decode=False)(path).float()
        assert reduced.shape == full.shape == (3, 64, 64)
        psnr = 10 * math.log10(255**2 / max(1e-9, float(((reduced - full) ** 2).mean())))
        assert psnr > 45, (ext, psnr)


def test_small_images_are_decoded_as_they_are(tmp_path, write_image):
    path = write_image(tmp_path / "small.png", size=(48, 40))
    assert TRAIN.decode(path)[0].size == (48, 40) == EVAL.decode(path)[0].size


def test_training_augmentation_comes_from_the_seed_alone(tmp_path, big_photo):
    path = _save(tmp_path / "photo.jpg", big_photo)
    image = TRAIN.decode(path)[0]
    a, b = TRAIN.transform(image, "0/1/7"), TRAIN.transform(image, "0/1/7")
    assert a.dtype == torch.uint8 and a.shape == (3, 64, 64) and torch.equal(a, b)
    draws = {TRAIN.transform(image, f"0/1/{i}").float().sum().item() for i in range(8)}
    assert len(draws) == 8  # other seeds, other crops
    assert torch.equal(EVAL.transform(image), EVAL.transform(image, "anything"))  # eval ignores seeds


def test_loader_batches_do_not_depend_on_the_number_of_threads(tmp_path, big_photo):
    from cnnxfer.data import discover

    (tmp_path / "x").mkdir()
    for i in range(6):
        _save(tmp_path / "x" / f"{i}.jpg", np.roll(big_photo, 37 * i, axis=1))
    images = discover(tmp_path / "x")
    runs = []
    for threads, ahead in ((0, 0), (1, 0), (3, 2)):
        loader = Loader(ImageDataset(images, TRAIN), 4, shuffle=True, seed=5, threads=threads, ahead=ahead,
                        augment_seed=True)
        loader.set_epoch(2)
        runs.append([(b.indices.tolist(), b.images) for b in loader])
    for other in runs[1:]:
        assert [i for i, _ in other] == [i for i, _ in runs[0]]
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(other, runs[0]))
    loader.set_epoch(3)
    assert [b.indices.tolist() for b in loader] != [i for i, _ in runs[0]]  # another epoch, another order


def test_normalize_module_matches_timm_normalisation():
    from timm.data import create_transform

    pre = Preprocess((3, 32, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop_pct=1.0)
    image = Image.fromarray(_photo(40, 32))
    timm_tf = create_transform(input_size=(3, 32, 32), mean=pre.mean, std=pre.std, crop_pct=1.0)
    want = timm_tf(image)
    got = Normalize(pre.mean, pre.std)(pre.transform(image).unsqueeze(0))[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    x = torch.full((1, 3, 2, 2), 128.0)
    Normalize(pre.mean, pre.std)(x)
    assert (x == 128).all()  # a float input is not changed in place


def test_heic_photos_are_read_and_a_missing_decoder_is_named(tmp_path, big_photo):
    """With pillow-heif, .HEIC decodes like any photo; without it (a subprocess that cannot import
    it), the file is a skip with the package to install, never silently dropped."""
    import subprocess
    import sys

    path = _save(tmp_path / "IMG_0001.heic", big_photo)
    (tmp_path / "IMG_0001.heic").rename(tmp_path / "IMG_0001.HEIC")
    path = tmp_path / "IMG_0001.HEIC"
    image, size = EVAL.decode(path)
    assert size == (1200, 900) and min(image.size) == EVAL.scale_size
    code = ("import sys; sys.modules['pillow_heif'] = None\n"
            "from cnnxfer import data\n"
            f"p = data.Path({str(path)!r})\n"
            "try:\n    data.load_image(p)\nexcept Exception as e:\n    print(data.describe_failure(p, e))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEIC photo" in out.stdout and "pip install pillow-heif" in out.stdout, out.stdout + out.stderr


def test_recognised_formats_without_a_decoder_are_skipped_with_the_reason(tmp_path, write_image):
    write_image(tmp_path / "a" / "ok.jpg")
    (tmp_path / "a" / "DSC_0001.NEF").write_bytes(b"II*\x00 raw sensor data")
    (tmp_path / "a" / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    images = data.discover(tmp_path)
    assert sorted(p.name for p in images.paths) == ["DSC_0001.NEF", "logo.svg", "ok.jpg"]
    reasons = {}
    for p in images.paths:
        try:
            data.load_image(p)
        except Exception as exc:
            reasons[p.name] = data.describe_failure(p, exc)
    assert set(reasons) == {"DSC_0001.NEF", "logo.svg"}
    assert "camera RAW" in reasons["DSC_0001.NEF"] and "rasterise" in reasons["logo.svg"]


def test_threads_decoding_with_different_pixel_limits_do_not_interfere(tmp_path, write_image):
    """The pixel limit is checked per call, never through Pillow's global (a race between threads)."""
    from concurrent.futures import ThreadPoolExecutor

    path = write_image(tmp_path / "big.png", size=(100, 100))
    before = Image.MAX_IMAGE_PIXELS

    def attempt(limit):
        try:
            data.load_image(path, max_pixels=limit)
            return True
        except Image.DecompressionBombError:
            return False

    limits = [9_000, 20_000] * 50
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(attempt, limits))
    assert results == [limit >= 10_000 for limit in limits]
    assert Image.MAX_IMAGE_PIXELS == before
