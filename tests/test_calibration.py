"""cnnxfer/calibration.py on synthetic predictions whose truth is known: labels drawn from the
predicted probabilities (perfectly calibrated), hand-computed examples, and scikit-learn's
log_loss and brier_score_loss as independent references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import sklearn
from sklearn.metrics import brier_score_loss, log_loss

from cnnxfer.calibration import (at_confidence, auroc, brier, classwise_ece, conformal_quantile, conformal_scores,
                                 expected_calibration_error, false_accept_at, fit_temperature, nll,
                                 prediction_sets, reliability_table, risk_coverage)
from cnnxfer.errors import UsageError


def _softmax(z: np.ndarray) -> np.ndarray:
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def _draw(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One label per row, drawn from that row's probabilities."""
    return np.minimum((probs.cumsum(1) < rng.uniform(size=(len(probs), 1))).sum(1), probs.shape[1] - 1)


def _calibrated(rng: np.random.Generator, n: int, classes: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, probs, labels): images of mixed difficulty, labels drawn from the probabilities."""
    logits = rng.normal(size=(n, classes)) * rng.uniform(0.5, 4.0, size=(n, 1))
    probs = _softmax(logits)
    return logits, probs, _draw(probs, rng)


def _coverage(sets: list[np.ndarray], labels: np.ndarray) -> float:
    return float(np.mean([y in s for y, s in zip(labels, sets)]))


def _size(sets: list[np.ndarray]) -> float:
    return float(np.mean([len(s) for s in sets]))


# calibration


def test_ece_is_near_zero_when_calibrated_and_large_when_overconfident():
    logits, probs, labels = _calibrated(np.random.default_rng(0), 20000)
    assert expected_calibration_error(probs, labels) < 0.02
    assert classwise_ece(probs, labels) < 0.01
    sharpened = _softmax(3.0 * logits)  # same ranking, far more confident than the labels allow
    assert expected_calibration_error(sharpened, labels) > 0.15
    assert classwise_ece(sharpened, labels) > 3 * classwise_ece(probs, labels)


def test_ece_by_hand():
    # 5 bins (lower, upper]: 0.9 right -> (0.8, 1]; 0.8 wrong and 0.7 right -> (0.6, 0.8]; 0.6 right -> (0.4, 0.6]
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    expected = (abs(1 - 0.9) * 1 + abs(0.5 - 0.75) * 2 + abs(1 - 0.6) * 1) / 4
    assert expected_calibration_error(probs, labels, bins=5) == pytest.approx(expected)  # 0.25
    # classwise: class 0 is certain on both images, right once; class 1 never predicted, true once
    assert classwise_ece(np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([0, 1])) == pytest.approx(0.5)
    assert classwise_ece(np.eye(3), np.arange(3)) == 0.0


def test_brier_and_nll_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]])
    labels = np.array([0, 2])
    assert brier(probs, labels) == pytest.approx(((0.09 + 0.04 + 0.01) + (0.01 + 0.25 + 0.36)) / 2)
    assert nll(probs, labels) == pytest.approx(-(math.log(0.7) + math.log(0.4)) / 2)
    assert nll(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(-math.log(1e-12))  # clipped, finite


def test_brier_and_nll_match_scikit_learn():
    _, probs, labels = _calibrated(np.random.default_rng(1), 500, classes=4)
    assert nll(probs, labels) == pytest.approx(log_loss(labels, probs, labels=range(4)))
    binary = _softmax(np.random.default_rng(2).normal(size=(300, 2)))
    y = _draw(binary, np.random.default_rng(3))
    # scikit-learn's binary Brier is over the positive column only: half the multi-class sum
    assert brier(binary, y) == pytest.approx(2 * brier_score_loss(y, binary[:, 1]))
    if tuple(int(v) for v in sklearn.__version__.split(".")[:2]) >= (1, 7):  # multi-class Brier from 1.7
        assert brier(probs, labels) == pytest.approx(brier_score_loss(labels, probs, labels=range(4)))


def test_reliability_table():
    _, probs, labels = _calibrated(np.random.default_rng(4), 3000)
    table = reliability_table(probs, labels)
    assert len(table) == 15 and sum(row["count"] for row in table) == 3000
    assert table[0]["lower"] == 0.0 and table[-1]["upper"] == 1.0
    conf, correct = probs.max(1), probs.argmax(1) == labels
    for row in table:
        inside = (conf > row["lower"]) & (conf <= row["upper"])
        assert row["count"] == inside.sum()
        if row["count"]:
            assert row["confidence"] == pytest.approx(conf[inside].mean())
            assert row["accuracy"] == pytest.approx(correct[inside].mean())
        else:
            assert math.isnan(row["confidence"]) and math.isnan(row["accuracy"])
    # 10 classes: the top probability is never below 0.1, so the lowest bin is empty
    assert table[0]["count"] == 0


# selective prediction


def test_risk_coverage():
    _, probs, labels = _calibrated(np.random.default_rng(5), 2000)
    curve = risk_coverage(probs, labels)
    assert len(curve["coverage"]) <= 200 and curve["coverage"][-1] == 1.0
    assert curve["accuracy"][-1] == pytest.approx((probs.argmax(1) == labels).mean())
    assert np.all(np.diff(curve["threshold"]) < 0) and np.all(np.diff(curve["coverage"]) > 0)
    assert 0.0 < curve["aurc"] < 1.0 - curve["accuracy"][-1]  # abstaining on the unsure helps

    # sorted case: the 6 most confident are right, the 4 least wrong
    conf = np.linspace(0.95, 0.5, 10)
    sorted_probs = np.stack([conf, 1 - conf], 1)
    truth = np.array([0] * 6 + [1] * 4)
    curve = risk_coverage(sorted_probs, truth)
    assert np.all(np.diff(curve["accuracy"]) <= 0)
    assert curve["accuracy"].tolist() == pytest.approx([1.0] * 6 + [6 / 7, 6 / 8, 6 / 9, 6 / 10])
    assert curve["aurc"] == pytest.approx(sum(1 - a for a in [1.0] * 6 + [6 / 7, 6 / 8, 6 / 9, 6 / 10]) / 10)

    # ties enter together: two points, not four
    tied = risk_coverage(np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]]), np.array([0, 1, 0, 0]))
    assert tied["coverage"].tolist() == [0.5, 1.0] and tied["accuracy"].tolist() == [0.5, 0.75]


def test_at_confidence():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.45, 0.55], [0.5, 0.5]])
    labels = np.array([0, 1, 0, 1, 0])
    kept = at_confidence(probs, labels, 0.7)
    assert kept == {"coverage": 0.4, "accuracy": 0.5, "abstained": 3, "n": 5}
    assert at_confidence(probs, labels, 0.5)["abstained"] == 0
    none = at_confidence(probs, labels, 0.95)
    assert none["coverage"] == 0.0 and none["abstained"] == 5 and math.isnan(none["accuracy"])


# conformal prediction sets


@pytest.mark.parametrize("method", ["aps", "raps"])
@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_conformal_sets_cover_as_asked(method, coverage):
    """10 splits, each calibrated on 1000 images and tested on 5000 new ones: randomised sets cover
    `coverage` on average. One split's coverage varies by about 0.013 at 0.8 with 1000 calibration
    images, the mean of 10 by about 0.0045 (seeds 0-11: within 0.0125 of 0.8, 0.005 of 0.9)."""
    rng = np.random.default_rng(6)
    randomised, deterministic = [], []
    for _ in range(10):
        _, probs, labels = _calibrated(rng, 6000)
        for u, out in ((rng, randomised), (None, deterministic)):
            qhat = conformal_quantile(conformal_scores(probs[:1000], labels[:1000], method, rng=u), coverage)
            out.append(_coverage(prediction_sets(probs[1000:], qhat, method, rng=u), labels[1000:]))
    assert abs(np.mean(randomised) - coverage) <= 0.02
    assert min(randomised) >= coverage - 0.05
    # deterministic: at least `coverage` in expectation too, conservative (seeds 0-11: -0.015 to +0.012)
    assert abs(np.mean(deterministic) - coverage) <= 0.02


def test_raps_sets_are_smaller_on_a_long_tail():
    """RAPS's case (Angelopoulos et al. 2021): the truth is among the top few classes but a flat
    tail of 97 classes holds much of the mass, so APS fills its sets with the tail. Same coverage,
    smaller sets."""
    rng = np.random.default_rng(7)
    n, classes = 6000, 100
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)) * 0.3
    logits[np.arange(n), labels] += rng.uniform(2.0, 6.0, n)
    for lookalike in (1, 2):
        logits[np.arange(n), (labels + lookalike) % classes] += rng.uniform(0.0, 5.0, n)
    probs = _softmax(logits)
    for coverage in (0.8, 0.9, 0.95):
        result = {}
        for method in ("aps", "raps"):
            u = np.random.default_rng(8)
            qhat = conformal_quantile(conformal_scores(probs[:1000], labels[:1000], method, rng=u), coverage)
            sets = prediction_sets(probs[1000:], qhat, method, rng=u)
            result[method] = _coverage(sets, labels[1000:]), _size(sets)
        assert result["raps"][1] < 0.8 * result["aps"][1]
        assert min(result["raps"][0], result["aps"][0]) >= coverage - 0.03  # one split: +-0.013


def test_scores_and_sets_agree():
    """The true class is in its image's set exactly when its score is <= qhat, randomised or not."""
    _, probs, labels = _calibrated(np.random.default_rng(9), 500)
    for seed in (None, 10):
        scores = conformal_scores(probs, labels, "raps", lam=0.05, k_reg=2,
                                  rng=None if seed is None else np.random.default_rng(seed))
        qhat = float(np.median(scores))
        sets = prediction_sets(probs, qhat, "raps", lam=0.05, k_reg=2,
                               rng=None if seed is None else np.random.default_rng(seed))
        assert [y in s for y, s in zip(labels, sets)] == (scores <= qhat).tolist()
        for p, s in zip(probs, sets):
            assert len(s) >= 1 and s[0] == p.argmax() and np.all(np.diff(p[s]) <= 0)


def test_conformal_scores_by_hand():
    probs = np.array([[0.5, 0.3, 0.2]] * 3)
    labels = np.array([0, 1, 2])
    assert conformal_scores(probs, labels, "aps").tolist() == pytest.approx([0.0, 0.8, 1.0])
    # RAPS: lam per rank beyond k_reg, here 0.1 on rank 2 and 0.2 on rank 3
    assert conformal_scores(probs, labels, "raps", lam=0.1, k_reg=1).tolist() == pytest.approx([0.0, 0.9, 1.2])
    u = np.random.default_rng(0).uniform(size=3)
    randomised = conformal_scores(probs, labels, "aps", rng=np.random.default_rng(0))
    assert randomised.tolist() == pytest.approx([0.0, 0.5 + u[1] * 0.3, 0.8 + u[2] * 0.2])
    # the sets: top class only at qhat 0, every class by decreasing probability at +inf
    assert [s.tolist() for s in prediction_sets(probs[:1], 0.0, "aps")] == [[0]]
    assert [s.tolist() for s in prediction_sets(np.array([[0.2, 0.5, 0.3]]), math.inf)] == [[1, 2, 0]]
    assert [s.tolist() for s in prediction_sets(probs[:1], 0.8, "aps")] == [[0, 1]]
    with pytest.raises(UsageError, match="aps, raps"):
        conformal_scores(probs, labels, "lac")


def test_conformal_quantile():
    scores = np.random.default_rng(0).permutation(np.arange(1.0, 10.0))  # 1 ... 9
    assert conformal_quantile(scores, 0.7) == 7.0  # ceil(10 * 0.7) = 7, not 8 by float error
    assert conformal_quantile(scores, 0.75) == 8.0  # ceil(7.5)
    assert conformal_quantile(scores, 0.9) == 9.0  # 9 images are just enough for 0.9
    assert conformal_quantile(scores[:8], 0.9) == math.inf  # too few
    assert conformal_quantile(np.empty(0), 0.5) == math.inf
    with pytest.raises(UsageError, match="between 0 and 1"):
        conformal_quantile(scores, 1.0)


# unknown-class detection


def test_auroc():
    assert auroc([0.9, 0.8, 0.7], [0.1, 0.2]) == 1.0
    assert auroc([0.1, 0.2], [0.9, 0.8, 0.7]) == 0.0
    # pairs (known, unknown): 0.8 beats all 3; 0.5 beats 0.2, ties 0.5 twice (2 halves); 0.2 ties 0.2
    assert auroc([0.8, 0.5, 0.2], [0.5, 0.5, 0.2]) == pytest.approx((3 + 1 + 2 * 0.5 + 0.5) / 9)
    rng = np.random.default_rng(0)
    assert abs(auroc(rng.normal(size=4000), rng.normal(size=4000)) - 0.5) < 0.02
    assert auroc(rng.normal(1.0, 1.0, 4000), rng.normal(size=4000)) == pytest.approx(0.760, abs=0.015)  # Phi(1/sqrt2)
    assert math.isnan(auroc([], [0.5]))


def test_false_accept_at():
    known = np.arange(1.0, 21.0)  # 20 known images: accepting 95% (19) puts the threshold at 2
    unknown = np.array([0.5, 1.5, 2.0, 2.5, 12.0])
    assert false_accept_at(known, unknown) == pytest.approx(3 / 5)  # 2.0, 2.5 and 12 pass
    assert false_accept_at(known, unknown, true_accept=0.5) == pytest.approx(1 / 5)  # threshold 11
    assert false_accept_at(known, unknown, true_accept=1.0) == pytest.approx(4 / 5)  # threshold 1


# temperature


def test_fit_temperature_recovers_the_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20000, 10)) * 5.0
    labels = _draw(_softmax(logits / 2.5), rng)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)
    # probabilities from the fitted temperature are calibrated; from the raw logits they are not
    t = fit_temperature(logits, labels)
    assert expected_calibration_error(_softmax(logits / t), labels) < 0.02
    assert expected_calibration_error(_softmax(logits), labels) > 0.1
