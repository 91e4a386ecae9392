"""The quick demo end to end (issue: `make demo`): real cnnxfer commands on real digits and
textures, offline. Transfer must beat training from scratch on the few-label target task."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--quick", "--out", str(out), "--json", str(out / "results.json")],
        capture_output=True, text=True, timeout=1200, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "results.json").read_text())


def _row(results, method_prefix, task="digits 5-9"):
    return next(r for r in results if r["task"] == task and r["method"].startswith(method_prefix))


def test_demo_prints_the_table_and_the_commands(demo):
    out, stdout, results = demo
    assert "test accuracy" in stdout and "labelled images" in stdout
    for command in ("$ cnnxfer train", "$ cnnxfer extract", "$ cnnxfer finetune", "$ cnnxfer evaluate", "$ cnnxfer sanity-check",
                    "$ cnnxfer report"):
        assert command in stdout
    page = (out / "runs" / "source" / "report.html").read_text()
    for section in ("Worst errors", "First-layer filters", "Embedding map", "Invariance"):
        assert f"<h2>{section}" in page
    assert {r["task"] for r in results} == {"digits 0-4", "digits 5-9", "textures"}
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["seconds"] > 0 for r in results)


def test_transfer_beats_training_from_scratch_on_few_labels(demo):
    """The demo's claim, on every random draw of the labelled images: fine-tuning the digits 0-4
    network from the probe's head (level 2) beats training from scratch on the same 15 images by 3
    points or more. Measured: 79.3-87.6% against 69.7-70.8% (an Intel Xeon with AMX); the old
    claim that level 1 (a logistic regression on layer3 features) beats scratch by 3 points on the
    mean held on lucky draws only (71.8% against 70.4% here, 71.5 against 70.4 on another CPU), so
    level 1 and the ImageNet probe are held to what they show reliably: far above chance (20%)."""
    _, _, results = demo
    scratch = _row(results, "baseline")
    level2 = _row(results, "level 2")
    assert _row(results, "level 3", task="digits 0-4")["test_accuracy"] > 0.9  # the source network learned
    assert len(scratch["accuracies"]) == len(level2["accuracies"]) >= 3
    margins = [tuned - base for tuned, base in zip(level2["accuracies"], scratch["accuracies"])]
    assert min(margins) > 0.03, results  # every draw, not the mean
    for method in ("level 1: extract final", "level 1: extract --layers", "ImageNet EfficientNet-Lite0"):
        assert _row(results, method)["test_accuracy"] > 0.5, results


def test_demo_sanity_report_passes(demo):
    out, _, _ = demo
    report = json.loads((out / "sanity.json").read_text())
    assert report["passed"], report
    assert {c["name"] for c in report["checks"]} == {"data", "init_loss", "overfit", "gradcheck"}
