"""Metrics in numpy (cnnxfer/metrics.py) against scikit-learn and torch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import precision_recall_fscore_support

from cnnxfer import metrics


# ---------------------------------------------------------------- metrics against scikit-learn

def test_confusion_matrix_and_per_class_report_match_sklearn():
    rng = np.random.default_rng(0)
    targets, preds = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    preds[:5] = 3  # a class nobody predicts keeps a defined (zero) precision below
    targets[targets == 2] = 1  # class 2 has no support
    cm = metrics.confusion_matrix(preds, targets, 4)
    np.testing.assert_array_equal(cm, sk_confusion_matrix(targets, preds, labels=range(4)))
    report = metrics.per_class_report(cm, ["a", "b", "c", "d"])
    p, r, f, s = precision_recall_fscore_support(targets, preds, labels=range(4), zero_division=0)
    np.testing.assert_allclose(report["precision"][:4], p)
    np.testing.assert_allclose(report["recall"][:4], r)
    np.testing.assert_allclose(report["f1"][:4], f)
    np.testing.assert_array_equal(report["support"][:4], s)
    pm, rm, fm, _ = precision_recall_fscore_support(targets, preds, labels=range(4), average="macro", zero_division=0)
    assert report.iloc[4][["precision", "recall", "f1"]].tolist() == pytest.approx([pm, rm, fm])
    pw, rw, fw, _ = precision_recall_fscore_support(targets, preds, labels=range(4), average="weighted", zero_division=0)
    assert report.iloc[5][["precision", "recall", "f1"]].tolist() == pytest.approx([pw, rw, fw])


def test_summarize_accuracy():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    result = metrics.summarize(probs, torch.tensor([0, 1, 1, 1]), ["x", "y"], loss=0.5)
    assert result.accuracy == 0.75 and result.images == 4
    assert result.confusion.tolist() == [[1, 0], [1, 2]]
    assert json.loads(json.dumps(result.to_dict()))["accuracy"] == 0.75


def test_softmax_and_log_loss_match_torch():
    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(1))
    big = logits * 1000  # a naive exp overflows
    np.testing.assert_allclose(metrics.softmax(big.numpy()), big.double().softmax(1).numpy(), rtol=1e-12, atol=1e-300)
    probs = metrics.softmax(logits.numpy())
    expected = torch.nn.functional.cross_entropy(logits.double(), targets).item()
    assert metrics.log_loss(probs, targets.numpy()) == pytest.approx(expected, rel=1e-6)
