"""The Session (cnnxfer/session.py): placement, model input, the one inference path and gathering, on
real models and tensors; the torchrun device mapping; and the predict/evaluate configs."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch

from cnnxfer import data, device as dev, export, loader as loaders
from cnnxfer.config import EvaluateConfig, Precision, PredictConfig, Tta
from cnnxfer.distributed import Dist
from cnnxfer.errors import DeviceError, UsageError
from cnnxfer.preprocess import Preprocess
from cnnxfer.session import Session, resolve_session

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _session(channels_last: bool, threads: int = 0) -> Session:
    return Session(dev.Runtime(torch.device("cpu"), None, channels_last, threads, 0, False))


# ---------------------------------------------------------------- gather


@pytest.mark.parametrize("kind", ["tensor", "numpy"])
def test_gather_returns_rows_sorted_by_index(kind):
    rng = np.random.default_rng(0)
    indices = rng.permutation(12)
    values = rng.normal(size=(12, 3)).astype(np.float32)
    labels = rng.integers(0, 5, size=12)
    as_kind = torch.from_numpy if kind == "tensor" else np.asarray
    got_i, got_v, got_l = _session(False).gather(as_kind(indices), as_kind(values), as_kind(labels))
    expected = sorted(zip(indices.tolist(), values.tolist(), labels.tolist()))
    assert type(got_i) is type(as_kind(indices))
    assert np.asarray(got_i).tolist() == [e[0] for e in expected]
    np.testing.assert_array_equal(np.asarray(got_v), np.array([e[1] for e in expected], dtype=np.float32))
    assert np.asarray(got_l).tolist() == [e[2] for e in expected]


def test_gather_of_nothing_is_nothing():
    indices, logits = _session(False).gather(np.empty(0, np.int64), np.empty((0, 4), np.float32))
    assert indices.shape == (0,) and logits.shape == (0, 4)
    assert _session(False).gather_objects([(3, "broken")]) == [[(3, "broken")]]


# ---------------------------------------------------------------- to_input


@pytest.mark.parametrize("channels_last", [False, True])
def test_to_input_normalises_uint8_like_the_preprocess_normaliser(channels_last):
    images = torch.randint(0, 256, (4, 3, 9, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    normalizer = Preprocess((3, 9, 7), mean=MEAN, std=STD).normalizer()
    x = _session(channels_last).to_input(images, normalizer)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (images.float() / 255 - mean) / std)
    assert x.dtype == torch.float32 and x.device == torch.device("cpu")
    assert x.is_contiguous(memory_format=torch.channels_last) is channels_last
    if channels_last:
        assert not x.is_contiguous()  # a real channels_last layout, not a shape where both coincide


def test_to_input_leaves_feature_batches_as_they_are():
    feats = torch.randn(5, 16)
    x = _session(True).to_input(feats)
    assert torch.equal(x, feats) and x.is_contiguous()
    with pytest.raises(AssertionError, match="Normalize"):
        _session(True).to_input(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


# ---------------------------------------------------------------- place


@pytest.mark.parametrize("resolved", [True, False])
def test_place_puts_a_timm_model_on_the_device(resolved):
    session = resolve_session("cpu", "fp32", 0) if resolved else _session(channels_last=False)
    assert session.channels_last is (resolved and dev.use_channels_last(session.device))
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    placed = session.place(model)
    assert all(p.device == session.device for p in placed.parameters())
    assert all(b.device == session.device for b in placed.buffers())
    conv = next(m for m in placed.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) is session.channels_last
    assert conv.weight.is_contiguous() is not session.channels_last


# ---------------------------------------------------------------- infer


@pytest.fixture
def images_with_a_broken_batch(tmp_path, make_images) -> data.ImageList:
    make_images(tmp_path / "imgs", {"": 4}, size=(20, 20))
    for name in ("x0.jpg", "x1.jpg"):  # sorted after img*.jpg: the last batch of two holds only these
        (tmp_path / "imgs" / name).write_text("not an image")
    images = data.discover(tmp_path / "imgs")
    assert [p.name for p in images.paths][-2:] == ["x0.jpg", "x1.jpg"]
    return images


def test_infer_yields_none_for_a_batch_without_a_readable_image_and_the_model_outputs(images_with_a_broken_batch):
    images = images_with_a_broken_batch
    preprocess = Preprocess((3, 16, 16), mean=MEAN, std=STD, crop_pct=1.0)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    session = _session(True, threads=2)
    placed = session.place(model)
    loader = session.loader(loaders.ImageDataset(images, preprocess), 2)
    got = list(session.infer(loader, placed, preprocess.normalizer()))
    assert [b.indices.tolist() for b, _ in got] == [[0, 1], [2, 3], []]
    assert got[-1][1] is None and [i for i, _ in got[-1][0].skipped] == [4, 5]
    # the reference: the same files decoded one by one, normalised by hand, a plain NCHW forward
    reference = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    reference.load_state_dict(model.state_dict())
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    x = (torch.stack([preprocess(images.paths[i]) for i in range(4)]).float() / 255 - mean) / std
    with torch.no_grad():
        expected = reference(x)
    out = torch.cat([o for _, o in got[:2]])
    assert out.shape == (4, 3)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_infer_raw_hands_the_batch_over_as_the_loader_gives_it(images_with_a_broken_batch):
    preprocess = Preprocess((3, 16, 16), mean=MEAN, std=STD, crop_pct=1.0)
    session = _session(True)
    loader = session.loader(loaders.ImageDataset(images_with_a_broken_batch, preprocess), 4)
    seen = [(batch, out) for batch, out in session.infer(loader, lambda images: images.clone(), raw=True)]
    assert seen[0][1].dtype == torch.uint8 and torch.equal(seen[0][1], seen[0][0].images)
    assert seen[1][1] is None


# ---------------------------------------------------------------- one GPU per process under torchrun


@pytest.mark.parametrize("spec, cuda, expected", [
    ("auto", True, "cuda:1"), ("cuda", True, "cuda:1"), (" CUDA ", True, "cuda:1"), (None, True, "cuda:1"),
    ("cuda:0", True, "cuda:0"),  # an explicit GPU is the user's choice
    ("cpu", True, "cpu"), ("auto", False, "auto"),  # without CUDA, auto is left to resolve_device
])
def test_rank_device_spec_gives_each_local_process_its_own_gpu(spec, cuda, expected):
    assert dev.rank_device_spec(spec, Dist(rank=3, world=4, local_rank=1), cuda) == expected


def test_rank_device_spec_with_one_process_keeps_the_option():
    assert dev.rank_device_spec("auto", Dist(), True) == "auto"
    assert dev.rank_device_spec("Cuda", Dist(), True) == "cuda"


def _runtime(device: torch.device, auto: bool) -> dev.Runtime:
    return dev.Runtime(device, None, False, 0, 0, False, auto)


def test_an_exported_onnx_file_runs_on_the_sessions_gpu():
    """The bug this fixes: onnxruntime read --device itself and put every rank on cuda:0."""
    gpu = SimpleNamespace(get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    cpu_only = SimpleNamespace(get_available_providers=lambda: ["CPUExecutionProvider"])
    where, providers = export._ort_providers(gpu, _runtime(torch.device("cuda", 1), auto=True))
    assert where == "cuda:1" and providers[0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert export._ort_providers(cpu_only, _runtime(torch.device("cuda", 1), auto=True)) == ("cpu", ["CPUExecutionProvider"])
    assert export._ort_providers(gpu, _runtime(torch.device("cpu"), auto=False))[0] == "cpu"
    with pytest.raises(DeviceError, match="no CUDA provider"):
        export._ort_providers(cpu_only, _runtime(torch.device("cuda", 1), auto=False))


# ---------------------------------------------------------------- PredictConfig / EvaluateConfig


def test_predict_and_evaluate_configs_coerce_options_once():
    predict = PredictConfig(images="photos", weights=Path("run"), tta="flip", precision="fp32")
    assert predict.tta is Tta.flip and predict.precision is Precision.fp32
    assert predict.images == Path("photos") and predict.weights == "run" and predict.out == Path("predictions.csv")
    evaluate = EvaluateConfig(data="test", weights="model.onnx", json_path="m.json")
    assert evaluate.data == Path("test") and evaluate.json_path == Path("m.json") and evaluate.tta is Tta.none


@pytest.mark.parametrize("cls, first", [(PredictConfig, "images"), (EvaluateConfig, "data")])
@pytest.mark.parametrize("field, value, message", [
    ("tta", "mirror", "tta 'mirror' is not one of none, flip"),
    ("precision", "fp8", "precision 'fp8' is not one of auto, fp32, bf16, fp16"),
    ("batch_size", 0, "--batch-size must be at least 1 (got 0)"),
    ("num_workers", -2, "--workers must be 0 or more (got -2)"),
    ("max_image_pixels", 0, "--max-image-pixels must be at least 1 (got 0)"),
])
def test_bad_config_values_are_one_line_usage_errors(cls, first, field, value, message):
    with pytest.raises(UsageError) as info:
        cls(**{first: "x", "weights": "run", field: value})
    assert str(info.value) == message and info.value.exit_code == 2


def test_predict_top_k_must_be_positive():
    with pytest.raises(UsageError, match=r"^--top-k must be at least 1 \(got 0\)$"):
        PredictConfig(images="x", weights="run", top_k=0)


def test_a_bad_weights_option_is_refused_before_any_work(cli_runner, tmp_path, make_images):
    """A library error through the CLI: a red message, exit 2, nothing written."""
    from cnnxfer.cli import app

    make_images(tmp_path / "imgs", {"": 1})
    result = cli_runner.invoke(app, ["predict", str(tmp_path / "imgs"), "--weights", str(tmp_path / "imgs"),
                                     "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 2, result.output
    assert "must be a cnnxfer run directory" in " ".join(result.stderr.split())
    assert not (tmp_path / "p.csv").exists()
