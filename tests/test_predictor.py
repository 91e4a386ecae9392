"""The Predictor interface and the one inference loop (cnnxfer/predictor.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cnnxfer import data, predictor
from cnnxfer.device import Runtime
from cnnxfer.preprocess import Preprocess
from cnnxfer.session import Session

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.4, 0.5, 0.6), "std": (0.2, 0.25, 0.3),
          "crop_pct": 1.0, "crop_mode": "center"}
CPU_FP32 = Session(Runtime(torch.device("cpu"), None, False, 0, 0, False))
TWO_THREADS = Session(Runtime(torch.device("cpu"), None, False, 2, 0, False))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.Flatten(),
                         nn.LazyLinear(3)).eval()


def _reference(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(CONFIG["mean"]).view(1, 3, 1, 1), torch.tensor(CONFIG["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((images.float() / 255 - mean) / std).numpy()


def test_torch_predictor_normalises_and_flip_tta_averages_both_views():
    model = _model()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    model(torch.zeros(1, 3, 32, 32))  # materialise the lazy layer
    plain = predictor.TorchPredictor(model, CONFIG, ["a", "b", "c"], CPU_FP32)
    flip = predictor.TorchPredictor(model, CONFIG, ["a", "b", "c"], CPU_FP32, tta="flip")
    expected = _reference(model, images)
    np.testing.assert_allclose(plain(images), expected, rtol=1e-5, atol=1e-6)
    # the layer is not mirror-symmetric, so the flipped view differs and the mean is a real average
    mirrored = _reference(model, torch.flip(images, dims=[3]))
    assert np.abs(mirrored - expected).max() > 1e-3
    np.testing.assert_allclose(flip(images), 0.5 * (expected + mirrored), rtol=1e-5, atol=1e-6)


def test_flip_average_takes_arrays_tensors_and_dicts():
    x = np.arange(12, dtype=np.float32).reshape(1, 1, 3, 4)  # rows [0 1 2 3], [4 5 6 7], [8 9 10 11]
    first_column = predictor.flip_average(lambda a: a[..., 0], x)  # its own first column, then the last
    np.testing.assert_array_equal(first_column, [[[1.5, 5.5, 9.5]]])
    out = predictor.flip_average(lambda a: {"first": a[..., 0], "last": a[..., -1]}, torch.from_numpy(x))
    torch.testing.assert_close(out["first"], torch.tensor([[[1.5, 5.5, 9.5]]]))
    torch.testing.assert_close(out["last"], out["first"])


def test_predict_images_keeps_order_and_lists_unreadable_files(tmp_path, make_images):
    make_images(tmp_path / "imgs", {"": 5}, size=(32, 32))
    (tmp_path / "imgs" / "img2.jpg").write_text("not an image")
    images = data.discover(tmp_path / "imgs")
    model = _model()
    model(torch.zeros(1, 3, 32, 32))
    p = predictor.TorchPredictor(model, CONFIG, ["a", "b", "c"], TWO_THREADS)
    out = predictor.predict_images(p, images, batch_size=2)
    broken = images.paths.index(tmp_path / "imgs" / "img2.jpg")
    assert out.indices.tolist() == [i for i in range(5) if i != broken]
    assert [i for i, _ in out.skipped] == [broken] and "cannot identify" in out.skipped[0][1]
    pre = Preprocess.from_data_config(CONFIG)
    expected = _reference(model, torch.stack([pre(images.paths[i]) for i in out.indices]))
    np.testing.assert_allclose(out.logits, expected, rtol=1e-5, atol=1e-6)
    nothing = predictor.predict_images(p, images.subset([broken]))
    assert nothing.logits.shape == (0, 3) and nothing.indices.shape == (0,) and len(nothing.skipped) == 1
