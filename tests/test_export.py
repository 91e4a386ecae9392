"""`cnnxfer export` (cnnxfer/export.py): ONNX and TorchScript files of a trained digits run and a
custom-model run, checked against the PyTorch model through readers that are not cnnxfer's own
(onnxruntime, onnx, torch.jit, timm), their metadata, `predict` from the files, and what cannot
be exported.
"""
from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import COLOURS, copy_digits, write_colour_folder

from cnnxfer import checkpoint, data, evaluate, export, rundir, training
from cnnxfer.cli import app
from cnnxfer.config import ExportConfig, TrainConfig
from cnnxfer.session import resolve_session

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}

TINY_NET = '''
import torch.nn as nn


def build(num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(16, num_classes),
    )
'''

# A custom op (torch.library) that neither ONNX nor a TorchScript file without this code can run.
WOBBLE_NET = '''
import torch
import torch.nn as nn


@torch.library.custom_op("cnnxfer_test::wobble", mutates_args=())
def wobble(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sin(x)


@wobble.register_fake
def _(x):
    return torch.empty_like(x)


class Wobbly(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(wobble(self.conv(x)).mean(dim=(2, 3)))


def build(num_classes: int) -> nn.Module:
    return Wobbly(num_classes)
'''

# A Python `if` on the pixel values: a trace bakes in the branch its example input took (random
# noise: busy images), and the smooth colour images take the other one.
BRANCHY_NET = '''
import torch.nn as nn


class Branchy(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        logits = self.fc(self.features(x))
        return logits if float(x.std(dim=(2, 3)).mean()) > 1.0 else -logits


def build(num_classes: int) -> nn.Module:
    return Branchy(num_classes)
'''


def invoke(cli_runner, *args, code: int = 0):
    result = cli_runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.stderr or result.output
    return result


@pytest.fixture(scope="module")
def digits(tmp_path_factory, digits_folder):
    """A resnet10t trained on digits 0-4 (40 each, 32 px) for 3 epochs, its held-out test images
    (10 per digit) and both exports of it, made through the CLI with their defaults (verified on
    the run's own data folder)."""
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("export-digits")
    train = copy_digits(digits_folder, root / "train", "01234", slice(0, 40))
    test = copy_digits(digits_folder, root / "test", "01234", slice(40, 50))
    training.fit(TrainConfig(data=train, out=root / "run", model="resnet10t", weights="none", epochs=3, batch_size=32,
                           hflip=0.0, num_workers=0, precision="fp32", img_size=32))
    files, outputs = {}, {}
    for fmt, suffix in SUFFIX.items():
        files[fmt] = root / f"digits{suffix}"
        result = CliRunner().invoke(app, ["export", str(root / "run"), "--format", fmt, "--out", str(files[fmt])])
        assert result.exit_code == 0, result.stderr or result.output
        outputs[fmt] = " ".join(result.stdout.split())
    return {"run": root / "run", "train": train, "test": test, "files": files, "stdout": outputs}


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    """A run of a custom model file (tiny_net.py:build) on the colours, one epoch at 32 px."""
    root = tmp_path_factory.mktemp("export-custom")
    (root / "tiny_net.py").write_text(TINY_NET)
    folder = write_colour_folder(root / "data", dict.fromkeys(COLOURS, 8))
    training.fit(TrainConfig(data=folder, out=root / "run", model=f"{root / 'tiny_net.py'}:build", weights="none", epochs=1,
                           batch_size=8, num_workers=0, precision="fp32", img_size=32))
    return {"root": root, "run": root / "run", "data": folder}


def _uint8_batch(paths) -> np.ndarray:
    """32 px images as the exported graph takes them: RGB uint8 (N, 3, H, W); at 32 px with
    crop_pct 1 the eval transform leaves the pixels as they are."""
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]).transpose(0, 3, 1, 2).copy()


def _timm_logits(run: Path, x: np.ndarray) -> np.ndarray:
    """The reference: the run's weights in plain timm, normalised by hand from config.json."""
    config = checkpoint.read_json(Path(run) / rundir.CONFIG_FILE)
    model = timm.create_model(config["model"], num_classes=config["num_classes"]).eval()
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    dc = config["data_config"]
    mean, std = torch.tensor(dc["mean"]).view(1, 3, 1, 1), torch.tensor(dc["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((torch.from_numpy(x).float() / 255 - mean) / std).numpy()


def _run_file(path: Path, x: np.ndarray) -> np.ndarray:
    """An exported file run by its own runtime, without cnnxfer."""
    if path.suffix == ".onnx":
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"images": x})[0]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
        return torch.jit.load(str(path))(torch.from_numpy(x)).numpy()


# ---------------------------------------------------------------- a trained digits run

@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_digits_export_agrees_with_pytorch_on_every_test_image(digits, fmt):
    paths = sorted(digits["test"].rglob("*.png"))
    x = _uint8_batch(paths)
    expected, got = _timm_logits(digits["run"], x), _run_file(digits["files"][fmt], x)
    assert got.shape == (50, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert (got.argmax(1) == expected.argmax(1)).all()
    single = _run_file(digits["files"][fmt], x[7:8])  # the batch axis is dynamic
    np.testing.assert_allclose(single[0], expected[7], rtol=0, atol=1e-4)
    assert np.abs(expected).max() > 1  # a trained model's logits, not a random head's near-zero ones
    # the summary reports the verification on the run's own data folder
    stdout = digits["stdout"][fmt]
    assert "verified │ 64 images from" in stdout and "top-1 agreement │ 100.0%" in stdout  # 64 of its 200
    diff = float(re.search(r"max \|logit diff\| │ (\S+)", stdout).group(1))
    assert 0 <= diff <= 1e-3


def test_onnx_metadata_and_graph_round_trip(digits):
    config = checkpoint.read_json(Path(digits["run"]) / rundir.CONFIG_FILE)
    dc = config["data_config"]
    session = ort.InferenceSession(str(digits["files"]["onnx"]), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == config["classes"] == list("01234")
    assert json.loads(meta["input_size"]) == dc["input_size"] == [3, 32, 32]
    assert json.loads(meta["mean"]) == dc["mean"] and json.loads(meta["std"]) == dc["std"]
    assert meta["interpolation"] == dc["interpolation"] and json.loads(meta["crop_pct"]) == dc["crop_pct"]
    assert meta["crop_mode"] == dc["crop_mode"] and meta["input_dtype"] == "uint8" and meta["precision"] == "float32"
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:], out.name, out.shape[1:]) == ("images", "tensor(uint8)", [3, 32, 32], "logits", [5])
    assert isinstance(inp.shape[0], str) and isinstance(out.shape[0], str)  # dynamic batch
    model = onnx.load(str(digits["files"]["onnx"]))
    onnx.checker.check_model(model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 17 and json.loads(meta["opset"]) == opset
    info = export.read_info(digits["files"]["onnx"])
    assert info.data_config == {k: tuple(v) if isinstance(v, list) else v for k, v in dc.items()}


def test_torchscript_metadata_is_inside_the_file_and_beside_it(digits):
    path = digits["files"]["torchscript"]
    extra = {"cnnxfer.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), _extra_files=extra)
    inside = json.loads(extra["cnnxfer.json"])
    beside = json.loads(path.with_name(path.name + ".json").read_text())
    assert inside == beside
    config = checkpoint.read_json(Path(digits["run"]) / rundir.CONFIG_FILE)
    assert inside["classes"] == config["classes"] and inside["input_size"] == config["data_config"]["input_size"]
    assert inside["mean"] == config["data_config"]["mean"] and inside["opset"] is None
    path.with_name(path.name + ".json").unlink()  # predict reads the file's own copy: the sidecar is for people
    assert export.read_info(path).classes == config["classes"]


@pytest.mark.parametrize("fmt, tta", [("onnx", "none"), ("onnx", "flip"), ("torchscript", "none")])
def test_predict_from_the_exported_file_equals_predict_from_the_run(digits, cli_runner, tmp_path, fmt, tta):
    common = ["--top-k", "3", "--tta", tta, "--workers", "0"]
    invoke(cli_runner, "predict", digits["test"], "--weights", digits["run"], "--out", tmp_path / "run.csv",
           "--precision", "fp32", *common)  # the exported file computes in fp32
    result = invoke(cli_runner, "predict", digits["test"], "--weights", digits["files"][fmt], "--out",
                    tmp_path / "file.csv", *common)
    assert ("onnxruntime" if fmt == "onnx" else "torchscript") in result.stdout
    ours, theirs = pd.read_csv(tmp_path / "file.csv"), pd.read_csv(tmp_path / "run.csv")
    assert list(ours.columns) == list(theirs.columns) and len(ours) == 50
    text = [c for c in ours.columns if not c.endswith("prob") and c != "probability"]
    pd.testing.assert_frame_equal(ours[text], theirs[text])
    probs = [c for c in ours.columns if c not in text]
    np.testing.assert_allclose(ours[probs].to_numpy(), theirs[probs].to_numpy(), rtol=0, atol=1e-5)


def test_evaluate_takes_an_exported_file(digits, cli_runner, tmp_path):
    for name, weights in (("run", digits["run"]), ("file", digits["files"]["onnx"])):
        invoke(cli_runner, "evaluate", digits["test"], "--weights", weights, "--json", tmp_path / f"{name}.json",
               "--precision", "auto" if name == "file" else "fp32", "--workers", "0")
    run, file = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("run", "file"))
    assert file["accuracy"] == run["accuracy"] and file["confusion_matrix"] == run["confusion_matrix"]
    assert file["loss"] == pytest.approx(run["loss"], abs=1e-5)


def test_the_readme_onnxruntime_snippet_predicts_as_cnnxfer_does(digits, cli_runner, tmp_path, capsys):
    """The README's plain-onnxruntime example, run as written on an odd-sized photo-like image
    (resize and centre crop exercised), against `cnnxfer predict` from the same file."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "onnxruntime as ort" in b)
    image = tmp_path / "photo.jpg"
    Image.open(sorted((digits["test"] / "3").glob("*.png"))[0]).convert("RGB").resize((45, 37)).save(image)
    model = digits["files"]["onnx"]
    exec(snippet.replace('"model.onnx"', repr(str(model))).replace('"photo.jpg"', repr(str(image))), {})
    label, probability = capsys.readouterr().out.split()
    invoke(cli_runner, "predict", image, "--weights", model, "--out", tmp_path / "p.csv", "--workers", "0")
    row = pd.read_csv(tmp_path / "p.csv").iloc[0]
    assert label == str(row["prediction"]) and float(probability) == pytest.approx(row["probability"], abs=1e-5)


# ---------------------------------------------------------------- a custom model

@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_custom_model_run_exports_to_both_formats(custom, tmp_path, fmt):
    out = tmp_path / f"tiny{SUFFIX[fmt]}"
    result = export.export_model(ExportConfig(run_dir=custom["run"], format=fmt, out=out))
    v = result.verification
    assert v.images == 24 and v.source == str(custom["data"]) and v.top1_agreement == 1.0 and v.max_abs_diff < 1e-4
    assert v.batch_sizes == [1, 16] and result.info.classes == sorted(COLOURS) and result.info.model.endswith(":build")
    images = data.discover(custom["data"])
    session = resolve_session("auto", "fp32", 0)
    from_run = evaluate.predict(images, str(custom["run"]), session)
    from_file = evaluate.predict(images, str(out), session)
    np.testing.assert_array_equal(from_file.indices, from_run.indices)
    np.testing.assert_allclose(from_file.probs, from_run.probs, rtol=0, atol=1e-6)


def test_a_model_file_and_weights_export_like_their_run(custom, cli_runner, tmp_path):
    """--model + --weights: the classes from a text file, the same logits as the run's own export."""
    (tmp_path / "classes.txt").write_text("\n".join(sorted(COLOURS)) + "\n")
    model = f"{custom['root'] / 'tiny_net.py'}:build"
    weights = custom["run"] / "model.safetensors"
    args = ["export", "--model", model, "--weights", weights, "--img-size", 32, "--data", custom["data"]]
    invoke(cli_runner, *args, "--classes", tmp_path / "classes.txt", "--out", tmp_path / "m.onnx")
    export.export_model(ExportConfig(run_dir=custom["run"], out=tmp_path / "run.onnx"))
    x = _uint8_batch(sorted(custom["data"].rglob("*.png")))
    np.testing.assert_array_equal(_run_file(tmp_path / "m.onnx", x), _run_file(tmp_path / "run.onnx", x))
    assert export.read_info(tmp_path / "m.onnx").classes == sorted(COLOURS)
    result = invoke(cli_runner, *args, "--out", tmp_path / "n.onnx", code=2)  # the factory builds 1000 outputs
    assert "another number of outputs than the model builds: give --classes" in " ".join(result.stderr.split())
    (tmp_path / "two.txt").write_text("blue\ngreen\n")
    result = invoke(cli_runner, *args, "--classes", tmp_path / "two.txt", "--out", tmp_path / "t.onnx", code=2)
    assert "another number of outputs than --classes lists (2)" in " ".join(result.stderr.split())


# ---------------------------------------------------------------- what cannot be exported

@pytest.fixture
def model_file(tmp_path):
    """(model spec, weights file, classes file) for a custom model file's source and 3 classes."""

    def make(source: str) -> tuple[str, Path, Path]:
        name = f"net_{abs(hash(source))}"
        (tmp_path / f"{name}.py").write_text(source)
        sys.path.insert(0, str(tmp_path))
        try:
            model = __import__(name).build(3)
        finally:
            sys.path.remove(str(tmp_path))
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / f"{name}.safetensors"))
        (tmp_path / "classes.txt").write_text("\n".join(sorted(COLOURS)))
        return f"{tmp_path / name}.py:build", tmp_path / f"{name}.safetensors", tmp_path / "classes.txt"

    return make


def _export_model_file(cli_runner, spec, *args):
    model, weights, classes = spec
    return cli_runner.invoke(app, ["export", "--model", model, "--weights", str(weights), "--classes", str(classes),
                                   "--img-size", "32", *map(str, args)])


@pytest.mark.parametrize("fmt, message", [
    ("onnx", "operator cnnxfer_test::wobble has no ONNX translation"),
    ("torchscript", "operator cnnxfer_test::wobble is not built into PyTorch"),
])
def test_a_custom_op_is_refused_with_its_name(model_file, cli_runner, custom, tmp_path, fmt, message):
    out = tmp_path / "out" / f"wobbly{SUFFIX[fmt]}"
    result = _export_model_file(cli_runner, model_file(WOBBLE_NET), "--format", fmt, "--out", out,
                                "--data", custom["data"])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.output
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # nothing written, no temp file left


def test_a_traced_branch_that_real_images_do_not_take_fails_verification(model_file, cli_runner, custom, tmp_path):
    """A Python `if` on pixel values: torch.export refuses it for ONNX; the TorchScript trace keeps
    one branch and verification on the real images catches it. Nothing is written either way."""
    spec = model_file(BRANCHY_NET)
    out = tmp_path / "out"
    result = _export_model_file(cli_runner, spec, "--out", out / "b.onnx", "--data", custom["data"])
    assert result.exit_code == 2 and "torch.export could not capture the model" in result.stderr
    result = _export_model_file(cli_runner, spec, "--format", "torchscript", "--out", out / "b.pt",
                                "--data", custom["data"])
    stderr = " ".join(result.stderr.split())
    assert result.exit_code == 1, result.output
    assert "verification failed" in stderr and "top-1 agrees on" in stderr and "Nothing was written" in stderr
    assert not out.exists() or list(out.iterdir()) == []


# ---------------------------------------------------------------- options and the optional extra

def test_missing_onnx_extra_is_named(digits, cli_runner, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets where it is not installed
    for args in (["export", digits["run"], "--out", tmp_path / "m.onnx"],
                 ["predict", digits["test"], "--weights", digits["files"]["onnx"], "--out", tmp_path / "p.csv"]):
        result = invoke(cli_runner, *args, code=2)
        assert "onnxruntime" in result.stderr and "pip install 'cnnxfer[export]'" in result.stderr
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "p.csv").exists()


def test_export_refuses_bad_options_before_writing(digits, custom, cli_runner, tmp_path):
    run = digits["run"]
    taken = tmp_path / "taken.onnx"
    taken.write_text("keep")
    cases = [
        (["export", run, "--out", taken], "already exists; pass --overwrite"),
        (["export", run, "--format", "torchscript", "--out", tmp_path / "m.onnx"], "a TorchScript file's does not"),
        (["export", run, "--out", tmp_path / "model.pt"], "an ONNX file's name ends in .onnx"),
        (["export", run, "--model", "resnet10t", "--out", tmp_path / "m.onnx"], "leave --model out"),
        (["export", "--out", tmp_path / "m.onnx"], "give a run directory (RUN_DIR), or --model with --weights"),
        (["export", "--model", "resnet10t", "--out", tmp_path / "m.onnx"], "--model needs --weights"),
        (["export", run, "--tolerance", "0", "--out", tmp_path / "m.onnx"], "--tolerance must be above 0"),
        (["predict", digits["test"], "--weights", digits["files"]["onnx"], "--precision", "bf16", "--out",
          tmp_path / "p.csv"], "computes in float32, as it was exported"),
        (["predict", digits["test"], "--weights", custom["data"], "--out", tmp_path / "p.csv"], "a file from `cnnxfer export`"),
    ]
    if not torch.cuda.is_available():
        cases.append((["export", run, "--half", "--out", tmp_path / "m.onnx"], "--half exports fp16 for GPUs and needs CUDA"))
    for args, message in cases:
        result = invoke(cli_runner, *args, code=2)
        assert message in " ".join(result.stderr.split()), (args, result.stderr)
    assert taken.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["taken.onnx"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="--half needs CUDA")
def test_half_torchscript_export_on_gpu(digits, tmp_path):
    result = export.export_model(ExportConfig(run_dir=digits["run"], format="torchscript", out=tmp_path / "h.pt",
                                              half=True))
    assert result.info.precision == "float16" and result.verification.max_abs_diff <= export.TOLERANCE["float16"]
