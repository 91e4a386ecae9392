"""`predict` and `evaluate` (cnnxfer/evaluate.py; the metrics themselves in test_metrics.py), and a
run directory's round trip through `predict`, `evaluate`, `extract` and plain timm.

One small run is trained per module; everything a user can do with it is checked against an
independent reference: scikit-learn's metrics, the model's own forward, timm's loader.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform
from safetensors.torch import load_file

from helpers import COLOURS, write_colour_folder

from cnnxfer import training, checkpoint, engine, evaluate, models, rundir
from cnnxfer.cli import app
from cnnxfer.config import TrainConfig
from cnnxfer.features import read_features

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, labelled test folder): test_resnet trained from scratch on colours, 32 px.
    Two epochs leave it imperfect, so predictions are not all one class or all right."""
    root = tmp_path_factory.mktemp("evaluate")
    data = write_colour_folder(root / "data", dict.fromkeys(COLOURS, 10))
    test = write_colour_folder(root / "test", dict.fromkeys(COLOURS, 5), seed=9)
    config = TrainConfig(data=data, out=root / "run", model="test_resnet", weights="none", epochs=2, batch_size=8,
                         num_workers=0, precision="fp32", img_size=32)
    training.fit(config)
    return root / "run", test


def invoke(cli_runner, *args: str):
    result = cli_runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr or result.output
    return result


# ---------------------------------------------------------------- predict

@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_predict_writes_top_k_classes_and_probabilities(trained, cli_runner, tmp_path, suffix):
    run, test = trained
    out = tmp_path / f"preds{suffix}"
    invoke(cli_runner, "predict", test, "--weights", run, "--out", out, "--top-k", 2, "--workers", 0)
    df = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert list(df.columns) == ["path", "label", "prediction", "probability", "top1_class", "top1_prob", "top2_class", "top2_prob"]
    assert len(df) == 15 and set(df["label"]) == set(COLOURS)
    assert (df["prediction"] == df["top1_class"]).all() and (df["probability"] == df["top1_prob"]).all()
    assert (df["top1_prob"] >= df["top2_prob"]).all() and (df["top1_class"] != df["top2_class"]).all()
    assert ((df["top1_prob"] + df["top2_prob"]) <= 1 + 1e-6).all() and (df["top2_prob"] > 0).all()
    assert not evaluate.skipped_file_for(out).exists()


def test_predict_matches_the_model_and_reports_unreadable_files(trained, cli_runner, tmp_path):
    run, test = trained
    flat = tmp_path / "flat"
    flat.mkdir()
    files = sorted((test / "red").glob("*.png"))[:3]
    for f in files:
        (flat / f.name).write_bytes(f.read_bytes())
    (flat / "broken.png").write_text("not a png")
    out = tmp_path / "preds.csv"
    invoke(cli_runner, "predict", flat, "--weights", run, "--out", out, "--top-k", 9, "--precision", "fp32", "--workers", 0)
    df = pd.read_csv(out)
    assert "label" not in df.columns and [c for c in df.columns if c.endswith("_prob")] == ["top1_prob", "top2_prob", "top3_prob"]
    assert df[["top1_prob", "top2_prob", "top3_prob"]].sum(axis=1).to_numpy() == pytest.approx(np.ones(3), abs=1e-5)
    skipped = pd.read_csv(evaluate.skipped_file_for(out))
    assert [Path(p).name for p in skipped["path"]] == ["broken.png"]
    # the reference: the run's weights in timm's model, timm's eval transform from config.json
    loaded = models.load_model(None, str(run))
    c = loaded.data_config
    transform = create_transform(input_size=c["input_size"], interpolation=c["interpolation"], mean=c["mean"],
                                 std=c["std"], crop_pct=c["crop_pct"], crop_mode=c["crop_mode"])
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in df["path"]])
    with torch.no_grad():
        logits = loaded.model.eval()(x)
    # by default the logits are divided by the temperature the run fitted on its validation images
    temperature = rundir.read_config(run).calibration["temperature"]
    assert temperature != 1.0
    top = (logits / temperature).softmax(1).max(1)
    assert df["prediction"].tolist() == [loaded.classes[i] for i in top.indices]
    np.testing.assert_allclose(df["top1_prob"], top.values.numpy(), atol=1e-5)
    raw = tmp_path / "raw.csv"
    invoke(cli_runner, "predict", flat, "--weights", run, "--out", raw, "--precision", "fp32", "--workers", 0, "--no-calibration")
    np.testing.assert_allclose(pd.read_csv(raw)["top1_prob"], logits.softmax(1).max(1).values.numpy(), atol=1e-5)


def test_predict_refuses_an_existing_output_and_a_non_run_weights(trained, cli_runner, tmp_path):
    run, test = trained
    out = tmp_path / "preds.csv"
    out.write_text("keep")
    result = cli_runner.invoke(app, ["predict", str(test), "--weights", str(run), "--out", str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.stderr and out.read_text() == "keep"
    result = cli_runner.invoke(app, ["predict", str(test), "--weights", str(tmp_path), "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 2 and "run directory" in result.stderr


# ---------------------------------------------------------------- evaluate

def test_evaluate_json_accuracy_matches_the_predictions(trained, cli_runner, tmp_path):
    run, test = trained
    invoke(cli_runner, "predict", test, "--weights", run, "--out", tmp_path / "preds.csv", "--workers", 0)
    invoke(cli_runner, "evaluate", test, "--weights", run, "--json", tmp_path / "metrics.json", "--workers", 0)
    df = pd.read_csv(tmp_path / "preds.csv")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    manual = float((df["label"] == df["prediction"]).mean())
    assert metrics["accuracy"] == pytest.approx(manual, abs=1e-12)
    assert metrics["images"] == 15 and metrics["classes"] == sorted(COLOURS)
    expected_cm = pd.crosstab(df["label"], df["prediction"]).reindex(index=sorted(COLOURS), columns=sorted(COLOURS), fill_value=0)
    assert metrics["confusion_matrix"] == expected_cm.to_numpy().tolist()
    per_class = {r["class"]: r for r in metrics["per_class"]}
    assert per_class["red"]["support"] == 5 and "macro avg" in per_class



def test_evaluate_on_a_train_val_dataset_scores_its_val_folder(trained, cli_runner, tmp_path):
    """DATA with train/ and val/ (the layout finetune takes as given) is scored on val/, not on two
    classes called train and val."""
    run, test = trained
    write_colour_folder(tmp_path / "data" / "train", dict.fromkeys(COLOURS, 2), seed=3)
    val = write_colour_folder(tmp_path / "data" / "val", dict.fromkeys(COLOURS, 4), seed=4)
    invoke(cli_runner, "evaluate", tmp_path / "data", "--weights", run, "--json", tmp_path / "split.json", "--workers", 0)
    invoke(cli_runner, "evaluate", val, "--weights", run, "--json", tmp_path / "val.json", "--workers", 0)
    split, direct = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("split", "val"))
    assert split["images"] == 12 and split["data"] == str(val)
    assert split == direct


def test_predict_and_evaluate_take_max_image_pixels(trained, cli_runner, tmp_path):
    run, _ = trained
    folder = write_colour_folder(tmp_path / "imgs", dict.fromkeys(COLOURS, 2))  # 32 x 32 = 1024 pixels
    write_colour_folder(tmp_path / "imgs", {"red": 1}, size=64, seed=5)  # red/000.png: 4096 pixels
    invoke(cli_runner, "predict", folder, "--weights", run, "--out", tmp_path / "p.csv", "--workers", 0,
           "--max-image-pixels", 2000)
    assert len(pd.read_csv(tmp_path / "p.csv")) == 5
    skipped = pd.read_csv(tmp_path / "p.skipped.csv")
    assert [Path(p).name for p in skipped["path"]] == ["000.png"] and "--max-image-pixels" in skipped["reason"][0]
    invoke(cli_runner, "evaluate", folder, "--weights", run, "--json", tmp_path / "e.json", "--workers", 0,
           "--max-image-pixels", 2000)
    assert json.loads((tmp_path / "e.json").read_text())["images"] == 5

def test_evaluate_refuses_classes_the_run_does_not_know(trained, cli_runner, tmp_path):
    run, _ = trained
    write_colour_folder(tmp_path / "other", {"red": 2})
    (tmp_path / "other" / "purple").mkdir()
    (tmp_path / "other" / "red" / "000.png").rename(tmp_path / "other" / "purple" / "000.png")
    result = cli_runner.invoke(app, ["evaluate", str(tmp_path / "other"), "--weights", str(run)])
    assert result.exit_code == 2 and "purple" in result.stderr


# ---------------------------------------------------------------- extract and timm

def test_extract_with_a_run_directory_gives_the_models_pre_logits(trained, cli_runner, tmp_path):
    run, test = trained
    out = tmp_path / "feats.parquet"
    invoke(cli_runner, "extract", test, "--weights", run, "--out", out, "--precision", "fp32", "--workers", 0)
    paths, labels, matrix = read_features(out)
    config = checkpoint.read_json(Path(run) / rundir.CONFIG_FILE)
    model = timm.create_model(config["model"], num_classes=config["num_classes"])
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    model.eval()
    dc = config["data_config"]
    transform = timm.data.create_transform(input_size=tuple(dc["input_size"]), interpolation=dc["interpolation"],
                                           mean=tuple(dc["mean"]), std=tuple(dc["std"]), crop_pct=dc["crop_pct"])
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
    assert matrix.shape == (15, model.num_features)
    np.testing.assert_allclose(matrix, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert sorted(set(labels)) == sorted(COLOURS)


def test_run_directory_loads_in_plain_timm_with_identical_logits(trained):
    run, _ = trained
    config = checkpoint.read_json(Path(run) / rundir.CONFIG_FILE)
    k, weights = len(config["classes"]), str(run / "model.safetensors")
    ours = models.load_model(None, str(run)).model.eval()
    # num_classes must be in the overlay too: timm drops a checkpoint's classifier whenever the
    # model's num_classes differs from pretrained_cfg["num_classes"] (1000 by default).
    theirs = timm.create_model(config["model"], num_classes=k, pretrained=True,
                               pretrained_cfg_overlay=dict(file=weights, num_classes=k)).eval()
    headless = timm.create_model(config["model"], num_classes=k, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=weights)).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        assert not torch.equal(ours(x), headless(x))  # the backbone alone: a new random head
        torch.testing.assert_close(ours.forward_features(x), headless.forward_features(x), rtol=0, atol=0)


# ---------------------------------------------------------------- what a new user tripped on

def test_predict_takes_a_single_image(trained, cli_runner, tmp_path):
    run, test = trained
    image = sorted((test / "red").glob("*.png"))[0]
    invoke(cli_runner, "predict", image, "--weights", run, "--out", tmp_path / "one.csv", "--workers", 0)
    df = pd.read_csv(tmp_path / "one.csv")
    assert df["path"].tolist() == [str(image)] and df["prediction"].iloc[0] in COLOURS
    result = cli_runner.invoke(app, ["evaluate", str(image), "--weights", str(run)])  # no label to score against
    assert result.exit_code == 2 and "one image, without a label" in result.stderr


def test_evaluate_lists_skipped_images_without_json(trained, cli_runner, tmp_path, monkeypatch):
    run, test = trained
    data = tmp_path / "test"
    write_colour_folder(data, dict.fromkeys(COLOURS, 2), seed=9)
    (data / "red" / "broken.png").write_text("not a png")
    monkeypatch.chdir(tmp_path)
    result = invoke(cli_runner, "evaluate", data, "--weights", run, "--workers", 0)
    listed = pd.read_csv(tmp_path / "evaluate.skipped.csv")
    assert [Path(p).name for p in listed["path"]] == ["broken.png"]
    assert "evaluate.skipped.csv" in " ".join(result.stdout.split())


def test_evaluate_on_the_runs_own_training_images_says_the_score_is_optimistic(trained, cli_runner, tmp_path):
    run, test = trained
    data = Path(json.loads((run / "config.json").read_text())["train_config"]["data"])
    result = invoke(cli_runner, "evaluate", data, "--weights", run, "--json", tmp_path / "train.json", "--workers", 0)
    assert json.loads((tmp_path / "train.json").read_text())["trained_on"] == 24  # 30 images less a 20% val split
    assert "24 of the 30 images evaluated trained this run" in " ".join(result.stderr.split())
    assert "optimistic" in result.stderr
    result = invoke(cli_runner, "evaluate", test, "--weights", run, "--json", tmp_path / "test.json", "--workers", 0)
    assert json.loads((tmp_path / "test.json").read_text())["trained_on"] == 0 and "optimistic" not in result.stderr
