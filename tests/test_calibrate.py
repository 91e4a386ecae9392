"""Calibrated predictions: the temperature and conformal scores a run fits on its validation images,
applied by `predict`/`evaluate`, refitted by `calibrate`, carried by `export`; abstention, prediction
sets and unknown-class detection through the CLI (the math itself: test_calibration.py).

One resnet10t is trained from scratch on the digits 0-4 (32 px, 10 epochs): imperfect, so its
confidence has something to be calibrated about; the digits 5-9 are the classes it never saw.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import copy_digits

from cnnxfer import calibration, export, rundir, training
from cnnxfer.cli import app
from cnnxfer.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_folder) -> dict:
    root = tmp_path_factory.mktemp("calibrate")
    data = copy_digits(digits_folder, root / "data", "01234", slice(0, 60))
    held = copy_digits(digits_folder, root / "held", "01234", slice(60, 100))
    test = copy_digits(digits_folder, root / "test", "01234", slice(100, 140))
    unknown = copy_digits(digits_folder, root / "unknown", "56789", slice(0, 20))
    training.fit(TrainConfig(data=data, out=root / "run", model="resnet10t", weights="none", epochs=10, batch_size=32,
                             hflip=0.0, num_workers=0, precision="fp32", img_size=32, val_split=0.3))
    return {"root": root, "run": root / "run", "data": data, "held": held, "test": test, "unknown": unknown}


def invoke(cli_runner, *args, code: int = 0):
    result = cli_runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.stderr or result.output
    return result


def test_the_run_fits_its_calibration_on_the_validation_images(run):
    config = rundir.read_config(run["run"])
    fitted = config.calibration
    assert fitted["images"] == config.val_images == 90 and len(fitted["conformal"]["scores"]) == 90
    assert fitted["temperature"] > 0 and fitted["temperature"] != 1.0
    # T minimises the NLL on these very images: it can only fall, and accuracy cannot change
    assert fitted["after"]["nll"] <= fitted["before"]["nll"] + 1e-9
    assert fitted["after"]["accuracy"] == fitted["before"]["accuracy"] == pytest.approx(config.final["final_val_accuracy"])
    assert sum(b["count"] for b in fitted["after"]["reliability"]) == 90
    assert (run["run"] / rundir.RELIABILITY_PLOT).stat().st_size > 10_000


def test_abstention_and_prediction_sets(run, cli_runner, tmp_path):
    out = tmp_path / "p.csv"
    result = invoke(cli_runner, "predict", run["test"], "--weights", run["run"], "--out", out, "--workers", 0,
                    "--precision", "fp32", "--min-confidence", 0.7, "--coverage", 0.97)
    assert "calibrated" in result.stdout
    df = pd.read_csv(out, dtype={"label": str, "prediction": str, "top1_class": str})
    low = df["probability"] < 0.7
    assert 0 < low.sum() < len(df)  # an imperfect model: some of each
    assert (df.loc[low, "prediction"] == "abstained").all() and (df.loc[~low, "prediction"] == df.loc[~low, "top1_class"]).all()
    sets = df["set"].astype(str).str.split("|")
    assert (sets.str[0] == df["top1_class"]).all() and (sets.str.len() == df["set_size"]).all()
    assert (df["set_size"] >= 1).all() and df["set_size"].max() > 1
    # evaluate on the same images counts the same abstentions and measures the sets' coverage
    invoke(cli_runner, "evaluate", run["test"], "--weights", run["run"], "--json", tmp_path / "e.json", "--workers", 0,
           "--precision", "fp32", "--min-confidence", 0.7, "--coverage", 0.97, "--unknown", run["unknown"])
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["selective"]["abstained"] == int(low.sum()) and e["selective"]["coverage"] == pytest.approx(1 - low.mean())
    hits = [str(label) in s for label, s in zip(df["label"], sets)]
    assert e["conformal"]["coverage"] == pytest.approx(np.mean(hits)) and e["conformal"]["mean_size"] == pytest.approx(df["set_size"].mean())
    assert 0 <= e["calibration"]["ece"] <= 1 and e["calibration"]["nll"] == pytest.approx(e["loss"], rel=1e-6)
    # the unknown digits 5-9 score by the same top probability as predict writes for them
    invoke(cli_runner, "predict", run["unknown"], "--weights", run["run"], "--out", tmp_path / "u.csv", "--workers", 0,
           "--precision", "fp32")
    strange = pd.read_csv(tmp_path / "u.csv")["probability"]
    assert e["unknown"]["images"] == 100
    assert e["unknown"]["auroc"] == pytest.approx(calibration.auroc(df["probability"], strange), abs=1e-6)
    # the second score, in feature space: how like the training classes' mean features
    # (measured: 0.90 and 0.93; digits it never saw are less like its classes than its own test digits)
    assert e["unknown"]["feature"]["auroc"] > 0.75 and e["unknown"]["auroc"] > 0.75


def test_calibrate_refits_on_held_out_images_and_refuses_training_images(run, cli_runner, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run["run"], copy)
    before = rundir.read_config(copy).calibration
    held = tmp_path / "held"
    shutil.copytree(run["held"], held)
    (held / "0" / "broken.png").write_bytes(b"not an image")  # skipped, counted and listed
    result = invoke(cli_runner, "calibrate", copy, "--data", held, "--workers", 0, "--precision", "fp32")
    assert "temperature" in result.stdout
    after = rundir.read_config(copy).calibration
    assert after["images"] == 200 and after["skipped"] == 1 and str(held.resolve()) in after["fitted_on"]
    assert pd.read_csv(copy / rundir.CALIBRATE_SKIPPED)["path"].str.endswith("broken.png").all()
    assert after["temperature"] != before["temperature"] and len(after["conformal"]["scores"]) == 200
    result = invoke(cli_runner, "calibrate", copy, "--data", run["data"], "--workers", 0, code=2)
    assert "trained" in result.output and len(result.output.strip().splitlines()) == 1
    assert rundir.read_config(copy).calibration == after  # nothing written
    # 200 scores allow coverage up to 200/201: 0.999 is refused before any image is read
    result = invoke(cli_runner, "predict", run["test"], "--weights", copy, "--out", tmp_path / "p.csv", "--coverage", 0.999, code=2)
    assert "needs at least" in result.output and not (tmp_path / "p.csv").exists()
    result = invoke(cli_runner, "predict", run["test"], "--weights", copy, "--out", tmp_path / "p.csv", "--coverage", 1.5, code=2)
    assert "--coverage must be between 0 and 1" in result.output


def test_the_exported_file_carries_the_calibration(run, cli_runner, tmp_path):
    pytest.importorskip("onnxruntime")
    model = tmp_path / "model.onnx"
    invoke(cli_runner, "export", run["run"], "--out", model)
    assert export.read_info(model).calibration == rundir.read_config(run["run"]).calibration
    common = ["--workers", 0, "--coverage", 0.8, "--top-k", 2]
    invoke(cli_runner, "predict", run["test"], "--weights", model, "--out", tmp_path / "file.csv", *common)
    invoke(cli_runner, "predict", run["test"], "--weights", run["run"], "--out", tmp_path / "run.csv", "--precision", "fp32", *common)
    ours, theirs = pd.read_csv(tmp_path / "file.csv"), pd.read_csv(tmp_path / "run.csv")
    np.testing.assert_allclose(ours["probability"], theirs["probability"], atol=1e-5)
    assert (ours["set"] == theirs["set"]).all()


def test_conformal_sets_cover_held_out_digits():
    """Held-out probabilities of the cross-validated probe on 8 of the 64 pixels of the digits (real
    data; about 60% accurate, so that every asked coverage needs sets of more than one class: a set
    is never empty, and top-1 sets alone cover as often as the model is right): the sets fitted on
    half, over 10 seeded splits, cover the other half at the asked rate."""
    from sklearn.datasets import load_digits

    from cnnxfer.probe import out_of_sample_probabilities

    d = load_digits()
    probs, _ = out_of_sample_probabilities(d.data[:, 4::8].astype(np.float32), d.target, 10, folds=5, seed=0)
    assert (probs.argmax(1) == d.target).mean() < 0.75
    for asked in (0.8, 0.9, 0.95):
        covered, sizes = [], []
        for seed in range(10):
            order = np.random.default_rng(seed).permutation(len(d.target))
            cal, test = order[:900], order[900:]
            fitted = calibration.fit(probs[cal], d.target[cal], "half the digits")
            sets = calibration.sets_for(probs[test], fitted, asked)
            got = calibration.set_coverage(sets, d.target[test], asked)
            covered.append(got["coverage"])
            sizes.append(got["mean_size"])
        assert abs(np.mean(covered) - asked) < 0.02, (asked, covered)
        assert 1 < np.mean(sizes) < 5  # sets, not every class


def test_the_report_page_shows_the_calibration(run, cli_runner, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run["run"], copy)
    (copy / rundir.RELIABILITY_PLOT).unlink()  # a page of a run whose diagram is missing draws it again
    invoke(cli_runner, "report", copy, "--data", run["test"], "--max-images", 20, "--device", "cpu", "--workers", 0)
    page = (copy / "report.html").read_text()
    section = page[page.index('<section id="calibration">'):]
    section = section[:section.index("</section>")]
    fitted = rundir.read_config(copy).calibration
    assert f"{fitted['temperature']:.3g}" in section and f"{fitted['after']['ece']:.4f} calibrated" in section
    assert 'src="reliability.png"' in section and (copy / rundir.RELIABILITY_PLOT).exists()


def test_nearest_class_mean_tells_unseen_digits():
    """On raw 8x8 digits: the similarity to the nearest class mean of the digits 0-6 is exactly the
    brute-force cosine, and separates held-out 0-6 from the unseen 7-9 better than chance."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data, d.target
    seen, unseen = np.flatnonzero(y < 7), np.flatnonzero(y >= 7)
    train, known = seen[::2], seen[1::2]
    means = calibration.class_means(x[train], y[train], 7)
    brute = [max(float(v @ m) / np.linalg.norm(v) / np.linalg.norm(m) for m in
                 [x[train][y[train] == k].__truediv__(np.linalg.norm(x[train][y[train] == k], axis=1, keepdims=True)).mean(0)
                  for k in range(7)]) for v in x[known[:20]]]
    np.testing.assert_allclose(calibration.nearest_class_similarity(x[known[:20]], means), brute, rtol=1e-9)
    got = calibration.auroc(calibration.nearest_class_similarity(x[known], means), calibration.nearest_class_similarity(x[unseen], means))
    assert 0.6 < got < 1.0
