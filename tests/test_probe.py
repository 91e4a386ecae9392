"""The probe (cnnxfer/probe.py) against scikit-learn's LogisticRegression, on real features: ImageNet
EfficientNet-Lite0 embeddings of scikit-learn's digits, extracted by `cnnxfer extract`."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from conftest import LITE0
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cnnxfer import ExtractConfig, extract_features, read_features
from cnnxfer.data import stratified_folds
from cnnxfer.probe import COARSE, SCALE_FLOOR, fit_probe, solve, standard_scale

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def features(tmp_path_factory, digits_folder, lite0_weights):
    """(train X, y, held-out X, y): 12 digits per class to fit on, 8 per class held out."""
    root = tmp_path_factory.mktemp("probe")
    for digit in range(10):
        files = sorted((digits_folder / str(digit)).glob("*.png"))[:20]
        for split, chosen in (("train", files[:12]), ("test", files[12:])):
            (root / split / str(digit)).mkdir(parents=True)
            for f in chosen:
                shutil.copy(f, root / split / str(digit) / f.name)
    out = {}
    for split in ("train", "test"):
        path = root / f"{split}.parquet"
        extract_features(ExtractConfig(data=root / split, out=path, model=LITE0, weights=str(lite0_weights),
                                       img_size=64, precision="fp32", num_workers=0))
        _, labels, x = read_features(path)
        out[split] = (x.astype(np.float64), np.array([int(v) for v in labels]))
    return out["train"] + out["test"]


class _FlooredScaler(StandardScaler):
    """StandardScaler with the probe's floored divisor (probe.standard_scale)."""

    def fit(self, x, y=None):
        super().fit(x, y)
        self.scale_ = standard_scale(x.std(0))
        return self


def _sklearn(c: float, **kwargs):
    """scikit-learn's LogisticRegression on the probe's standardised features, solved to convergence."""
    return make_pipeline(_FlooredScaler(), LogisticRegression(C=c, tol=1e-10, max_iter=20000, **kwargs))


@pytest.mark.parametrize("c", [1e-3, 0.1, 10.0])
def test_probe_equals_scikit_learn_at_the_same_strength(features, c):
    x, y, xt, yt = features
    fit = fit_probe(x, y, 10, c=c)
    ours = fit.logits(torch.from_numpy(xt)).double().softmax(1).numpy()
    theirs = _sklearn(c).fit(x, y).predict_proba(xt)
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    np.testing.assert_allclose(ours, theirs, atol=5e-3)  # both solvers stop at a tolerance: 3e-3 apart at C=10


def test_cross_validation_picks_the_best_strength_and_scores_it_as_scikit_learn_does(features):
    x, y, _, _ = features
    fit = fit_probe(x, y, 10, seed=3)
    tried = {round(math.log10(s["c"]), 2) for s in fit.searched}
    assert {round(math.log10(c), 2) for c in COARSE} <= tried and len(tried) >= len(COARSE) + 2  # swept, then refined
    best = max(fit.searched, key=lambda s: (s["accuracy"], -s["loss"]))
    assert fit.c == best["c"] and fit.cv_accuracy == best["accuracy"] and fit.folds == 5
    folds = stratified_folds(y, 5, 3)  # the probe's own folds
    assert cross_val_score(_sklearn(fit.c), x, y, cv=folds).mean() == pytest.approx(fit.cv_accuracy, abs=1e-9)
    assert "5-fold cross-validation" in fit.describe()


def test_balanced_probe_equals_scikit_learn_balanced_class_weights(features):
    x, y, xt, _ = features
    keep = np.concatenate([np.flatnonzero(y == k)[: 12 if k < 5 else 3] for k in range(10)])  # 12 vs 3 per class
    fit = fit_probe(x[keep], y[keep], 10, c=0.1, balanced=True)
    theirs = _sklearn(0.1, class_weight="balanced").fit(x[keep], y[keep]).predict_proba(xt)
    np.testing.assert_allclose(fit.logits(torch.from_numpy(xt)).double().softmax(1).numpy(), theirs, atol=2e-3)
    unweighted = fit_probe(x[keep], y[keep], 10, c=0.1)
    assert not torch.allclose(unweighted.bias, fit.bias, atol=1e-3)  # the weights changed the solution


def test_standardisation_is_folded_into_the_head(features):
    """The head applies to raw features: W x + b equals the solution on standardised features."""
    x, y, xt, _ = features
    fit = fit_probe(x, y, 10, c=1.0)
    mean, std = x.mean(0), standard_scale(x.std(0))
    wb = solve((x - mean) / std, y, 10, 1.0)
    expected = ((xt - mean) / std) @ wb[:, :-1].T + wb[:, -1]
    np.testing.assert_allclose(fit.logits(torch.from_numpy(xt)).double().numpy(), expected, atol=1e-3)


def test_near_constant_features_are_not_blown_up(features):
    """A unit that barely fires on the training images would be multiplied a hundredfold by its own
    standard deviation: the divisor is floored at SCALE_FLOOR of the typical one."""
    x, _, _, _ = features
    std = x.std(0)
    scale = standard_scale(std)
    rms = np.sqrt((std ** 2).mean())
    assert (std < 0.05 * rms).sum() > 10  # Lite0 on digits has many such units
    assert scale.min() >= SCALE_FLOOR * rms * 0.999 and (x.std(0) / scale).max() <= 1.0
    big = std > 3 * rms
    np.testing.assert_allclose(scale[big], std[big], rtol=0.01)  # the informative ones keep their own std


def test_a_class_of_one_image_takes_the_default_strength(features):
    x, y, _, _ = features
    keep = np.concatenate([np.flatnonzero(y == 0)[:1], np.flatnonzero(y == 1)[:5], np.flatnonzero(y == 2)[:5]])
    fit = fit_probe(x[keep], y[keep], 3)
    assert fit.cv_accuracy is None and fit.c == 1.0 and "too few to cross-validate" in fit.describe()
    assert (fit.logits(torch.from_numpy(x[keep])).argmax(1).numpy() == y[keep]).all()


def test_small_classes_use_fewer_folds(features):
    x, y, _, _ = features
    keep = np.concatenate([np.flatnonzero(y == k)[:3] for k in range(4)])
    fit = fit_probe(x[keep], y[keep], 4)
    assert fit.folds == 3 and fit.cv_accuracy is not None


def test_stratified_folds_split_every_class_evenly():
    labels = np.repeat(np.arange(4), [10, 7, 5, 3])
    folds = stratified_folds(labels, 3, seed=1)
    held = np.concatenate([h for _, h in folds])
    assert sorted(held.tolist()) == list(range(len(labels)))  # every image held out exactly once
    for train, h in folds:
        assert set(train).isdisjoint(h) and len(train) + len(h) == len(labels)
        counts = np.bincount(labels[h], minlength=4)
        assert (np.abs(counts - np.bincount(labels) / 3) <= 1).all()  # each class's share, give or take one
    assert max(len(h) for _, h in folds) - min(len(h) for _, h in folds) <= 1
    assert [h.tolist() for _, h in stratified_folds(labels, 3, seed=1)] == [h.tolist() for _, h in folds]


def test_temperature_is_recovered_from_logits_made_with_a_known_temperature():
    from cnnxfer.probe import fit_temperature

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 5))
    for true_t in (0.5, 2.0, 5.0):
        p = np.exp(logits / true_t)
        p /= p.sum(1, keepdims=True)
        labels = np.array([rng.choice(5, p=row) for row in p])
        assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.1)
    perfect = logits.argmax(1)
    assert fit_temperature(logits, perfect) == 1.0  # every held-out image right: nothing to calibrate against
