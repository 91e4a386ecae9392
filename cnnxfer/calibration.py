"""How far a classifier's confidence can be trusted, in numpy: calibration, selective prediction,
conformal prediction sets and unknown-class detection.

Every function takes class probabilities, whatever produced them ((N, C) rows summing to 1), and
(N,) integer labels, like metrics.py. `evaluate` measures calibration with them, `predict
--coverage` builds split-conformal sets, and the unknown-class measure scores known against
unknown images. The temperature fit is the probe's (`fit_temperature`, re-exported here): one fit
in the package.

Conformal sets (Romano, Sesia and Candes 2020, APS; Angelopoulos, Bates, Malik and Jordan, ICLR
2021, RAPS): an image's classes by decreasing probability p_(1) >= p_(2) >= ...; the score of the
class at rank j >= 2 is
    s(j) = p_(1) + ... + p_(j-1) + u * p_(j) + lam * max(0, j - k_reg),
with u ~ U(0, 1) per image (randomised: exact coverage) or u = 1 (deterministic, conservative: the
class's own probability counted in full). The calibration score of an image is the score of its
true class; a set holds the classes whose score is <= qhat, the corrected quantile of the
calibration scores. Both go through `_rank_scores`, so they cannot disagree; s(j) never decreases
with j, so a set is always the top classes.
The top class scores 0 (the papers: u * p_(1)), so every set holds it and the calibration knows
it. The authors' code instead forces the top class into the sets after calibrating
(allow_zero_sets=False), which over-covers: APS asked for 0.8 on 10 calibrated synthetic classes
covered 0.819 randomised and 0.877 deterministic (sets of 2.90 and 3.73 classes) that way, and
0.797 and 0.804 (2.70 and 2.90 classes) with the top class scoring 0; 10 splits of 1000
calibration and 5000 test images. The guarantee is the same: any score gives P(y in set) >=
coverage on exchangeable images.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import UsageError
from .metrics import log_loss, softmax
from .probe import fit_temperature  # re-exported: the package's one temperature fit (Guo et al. 2017)

__all__ = [
    "expected_calibration_error", "classwise_ece", "nll", "brier", "reliability_table", "risk_coverage",
    "at_confidence", "conformal_scores", "conformal_quantile", "prediction_sets", "auroc", "false_accept_at",
    "fit_temperature",
]

BINS = 15  # equal-width confidence bins (Guo et al. 2017)
PROB_FLOOR = 1e-12  # probabilities are clipped here before the log (nll)
CURVE_POINTS = 200  # at most this many points of a risk-coverage curve are returned
METHODS = ("aps", "raps")
# RAPS (Angelopoulos et al. 2021): the penalty lam per rank beyond k_reg. The authors' README
# conformalises with k_reg=5, lamda=0.01 ("it suffices for many models to pick kreg=5"; a small
# lam makes the choice of k_reg matter little). A fixed k_reg (not tuned on the calibration
# images) keeps the calibration scores exchangeable with the test scores, and the same k_reg is
# then known to `prediction_sets`. With <= K_REG classes the penalty never applies: RAPS is APS.
# Measured (tests): on 10 classes its sets are within 1% of APS's; on 100 classes where the truth
# is among the top 3 and a flat tail holds the rest, 90% sets of 5.6-6.3 classes instead of
# 8.6-10.1 at the same coverage (8 draws).
LAMBDA = 0.01
K_REG = 5
_EPS = 1e-9  # (n + 1) * coverage that is an integer on paper is not rounded up by float error


def _top(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct): each image's largest probability and whether its argmax is the label."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    return probs.max(1), probs.argmax(1) == labels


def _bins(conf: np.ndarray, outcome: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(edges, count, sum of conf, sum of outcome) per equal-width bin (lower, upper] of [0, 1]
    (0 joins the first bin). Edges k / bins are exact, so 0.6 lands in (0.4, 0.6] at 5 bins."""
    edges = np.arange(bins + 1) / bins
    index = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    return edges, count, np.bincount(index, conf, bins), np.bincount(index, outcome.astype(np.float64), bins)


def _ece(conf: np.ndarray, outcome: np.ndarray, bins: int) -> float:
    """sum over bins of |mean outcome - mean conf| * n_bin / N."""
    if not len(conf):
        return float("nan")
    _, _, conf_sum, outcome_sum = _bins(conf, outcome, bins)
    return float(np.abs(outcome_sum - conf_sum).sum() / len(conf))


def expected_calibration_error(probs, labels, bins: int = BINS) -> float:
    """Top-label ECE (Guo et al. 2017): the gap between accuracy and mean confidence in equal-width
    bins of the largest probability, weighted by the share of images in each bin."""
    return _ece(*_top(probs, labels), bins)


def classwise_ece(probs, labels, bins: int = BINS) -> float:
    """Classwise ECE (Kull et al. 2019): the mean over classes k of the ECE of p(k) against
    1[label == k], each over all images."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    return float(np.mean([_ece(probs[:, k], labels == k, bins) for k in range(probs.shape[1])]))


def nll(probs, labels) -> float:
    """Mean negative log probability of the true class, probabilities clipped at PROB_FLOOR
    (metrics.log_loss, the one in the package)."""
    return log_loss(np.asarray(probs, dtype=np.float64), np.asarray(labels))


def brier(probs, labels) -> float:
    """Multi-class Brier score (Brier 1950): the mean over images of the sum over classes of the
    squared difference from the one-hot label (0 to 2)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(((probs - onehot) ** 2).sum(1).mean())


def reliability_table(probs, labels, bins: int = BINS) -> list[dict]:
    """The reliability diagram (Guo et al. 2017): per top-confidence bin its lower and upper edge,
    image count, mean confidence and accuracy. Empty bins are kept, with count 0 and NaN confidence
    and accuracy, so a plot can skip them."""
    conf, correct = _top(probs, labels)
    edges, count, conf_sum, correct_sum = _bins(conf, correct, bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf, accuracy = conf_sum / count, correct_sum / count
    return [{"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(count[b]),
             "confidence": float(mean_conf[b]), "accuracy": float(accuracy[b])} for b in range(bins)]


def risk_coverage(probs, labels) -> dict:
    """The risk-coverage curve of abstaining below a confidence threshold (Geifman and El-Yaniv 2017).

    Returns:
        threshold, coverage, accuracy: arrays, one point per distinct top confidence in decreasing
            order (at most CURVE_POINTS, evenly subsampled, the full-coverage point kept): the share
            of images whose top probability is >= threshold and the accuracy among them.
        aurc: the area under the risk (1 - accuracy) against coverage curve, the step function
            over every point (Geifman et al. 2019); ties enter together, so it does not depend
            on the order of equally confident images. NaN without images.
    """
    conf, correct = _top(probs, labels)
    if not len(conf):
        return {"threshold": np.empty(0), "coverage": np.empty(0), "accuracy": np.empty(0), "aurc": float("nan")}
    order = np.argsort(-conf, kind="stable")
    conf, hits = conf[order], np.cumsum(correct[order])
    last = np.flatnonzero(np.r_[conf[1:] != conf[:-1], True])  # the last image of each confidence
    kept = last + 1
    coverage, accuracy = kept / len(conf), hits[last] / kept
    aurc = float((np.diff(coverage, prepend=0.0) * (1.0 - accuracy)).sum())
    points = np.unique(np.linspace(0, len(last) - 1, min(len(last), CURVE_POINTS)).round().astype(int))
    return {"threshold": conf[last][points], "coverage": coverage[points], "accuracy": accuracy[points], "aurc": aurc}


def at_confidence(probs, labels, min_confidence: float) -> dict:
    """Abstaining below `min_confidence`: the share of images kept (top probability >=
    min_confidence), the accuracy among them (NaN when none is kept), how many abstained, of n."""
    conf, correct = _top(probs, labels)
    keep = conf >= min_confidence
    n, kept = len(conf), int(keep.sum())
    return {"coverage": kept / n if n else float("nan"),
            "accuracy": float(correct[keep].mean()) if kept else float("nan"), "abstained": n - kept, "n": n}


def _penalty(method: str, lam: float, k_reg: int | None) -> tuple[float, int]:
    if method not in METHODS:
        raise UsageError(f"unknown conformal method {method!r}; choose one of {', '.join(METHODS)}")
    if lam < 0:
        raise UsageError(f"the RAPS penalty must be >= 0, got {lam}")
    return (0.0 if method == "aps" else float(lam)), (K_REG if k_reg is None else int(k_reg))


def _rank_scores(probs, lam: float, k_reg: int, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """(order, scores): each image's classes by decreasing probability (ties by class index) and
    the APS/RAPS score s(j) of the class at each rank (module docstring)."""
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")
    p = np.take_along_axis(probs, order, 1)
    before = np.concatenate([np.zeros((len(p), 1)), np.cumsum(p, 1)[:, :-1]], 1)  # the mass ranked above
    u = np.ones(len(p)) if rng is None else rng.uniform(size=len(p))
    penalty = lam * np.maximum(np.arange(1, p.shape[1] + 1) - k_reg, 0)
    scores = before + u[:, None] * p + penalty
    scores[:, 0] = 0.0  # the top class is in every set, and the calibration counts it so
    return order, scores


def conformal_scores(probs, labels, method: str = "raps", lam: float = LAMBDA, k_reg: int | None = None,
                     rng: np.random.Generator | None = None) -> np.ndarray:
    """The APS (Romano et al. 2020) or RAPS (Angelopoulos et al. 2021) nonconformity score of each
    calibration image's true class: the mass of the classes ranked above it, plus u times its own
    probability (u ~ U(0, 1) from `rng`; u = 1 when rng is None: deterministic, conservative),
    plus lam per rank beyond k_reg (RAPS only; k_reg None: K_REG); 0 when it is the top class. Pass
    the same method, lam and k_reg to `prediction_sets`."""
    lam, k_reg = _penalty(method, lam, k_reg)
    order, scores = _rank_scores(probs, lam, k_reg, rng)
    rank = np.argmax(order == np.asarray(labels)[:, None], axis=1)
    return scores[np.arange(len(rank)), rank]


def conformal_quantile(scores, coverage: float) -> float:
    """Split-conformal threshold (Vovk et al. 2005; Angelopoulos et al. 2021): the
    ceil((n + 1) * coverage)-th smallest of the n calibration scores, which the score of a new
    exchangeable image exceeds with probability <= 1 - coverage. (np.quantile at that rank / n with
    "higher" interpolation returns the next one up for a rank below n: one order statistic too
    conservative.) +inf when ceil((n + 1) * coverage) > n: too few calibration images for this
    coverage (n >= coverage / (1 - coverage) are needed, 9 for 0.9); callers report it as an error."""
    if not 0.0 < coverage < 1.0:
        raise UsageError(f"coverage must be between 0 and 1 (exclusive), got {coverage}")
    scores = np.asarray(scores, dtype=np.float64).ravel()
    k = math.ceil((len(scores) + 1) * coverage - _EPS)
    if k > len(scores):
        return math.inf
    return float(np.partition(scores, k - 1)[k - 1])


def prediction_sets(probs, qhat: float, method: str = "raps", lam: float = LAMBDA, k_reg: int | None = None,
                    rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Each image's conformal set: the classes whose APS/RAPS score (as `conformal_scores`, with a
    fresh u per image when `rng` is given) is <= qhat, as class indices by decreasing probability.
    Never empty: the top class scores 0 (module docstring). qhat = +inf gives every class."""
    lam, k_reg = _penalty(method, lam, k_reg)
    order, scores = _rank_scores(probs, lam, k_reg, rng)
    keep = scores <= qhat
    return [row[mask] for row, mask in zip(order, keep)]


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]


def auroc(known_scores, unknown_scores) -> float:
    """Area under the ROC curve of telling known from unknown images by a score that is higher for
    known ones (e.g. the top probability; Hendrycks and Gimpel 2017): the Mann-Whitney U statistic
    over n_known * n_unknown, ties counting half. 1: separated, 0.5: no better than chance."""
    known = np.asarray(known_scores, dtype=np.float64).ravel()
    unknown = np.asarray(unknown_scores, dtype=np.float64).ravel()
    n1, n2 = len(known), len(unknown)
    if not n1 or not n2:
        return float("nan")
    ranks = _average_ranks(np.concatenate([known, unknown]))
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n2))


def false_accept_at(known_scores, unknown_scores, true_accept: float = 0.95) -> float:
    """The share of unknown images accepted (score >= t) at the highest threshold t that accepts at
    least `true_accept` of the known images (FPR at 95% TPR, Liang et al. 2018)."""
    if not 0.0 < true_accept <= 1.0:
        raise UsageError(f"true_accept must be in (0, 1], got {true_accept}")
    known = np.sort(np.asarray(known_scores, dtype=np.float64).ravel())[::-1]
    unknown = np.asarray(unknown_scores, dtype=np.float64).ravel()
    if not len(known) or not len(unknown):
        return float("nan")
    threshold = known[max(math.ceil(true_accept * len(known) - _EPS), 1) - 1]
    return float((unknown >= threshold).mean())


# ---------------------------------------------------------------- what a run keeps, and its uses

SEED = 0  # the u of the randomised scores: the same sets for the same images, run after run
SCORE_DIGITS = 6  # conformal scores as config.json keeps them


def fit(probs, labels, fitted_on: str) -> dict | None:
    """The calibration a run keeps (config.json's "calibration"), fitted on held-out images:
    - the temperature T by NLL (Guo et al. 2017), on the log-probabilities: softmax(log p / T) is
      softmax(logits / T), as a constant per row changes no softmax;
    - the calibration before and after (`measure`), with reliability bins for the diagram;
    - the randomised RAPS scores of the calibrated probabilities (Angelopoulos et al. 2021), from
      which `sets_for` makes the prediction sets of any coverage.
    None without images."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if not len(labels):
        return None
    log_p = np.log(np.clip(probs, PROB_FLOOR, None))
    temperature = fit_temperature(log_p, labels)
    calibrated = softmax(log_p / temperature)
    scores = conformal_scores(calibrated, labels, "raps", rng=np.random.default_rng(SEED))
    return {"temperature": temperature, "images": int(len(labels)), "fitted_on": fitted_on,
            "how": "temperature scaling (Guo et al. 2017): one T minimising the cross-entropy of logits / T on these "
                   "images; conformal: randomised RAPS scores (Angelopoulos et al. 2021, lam 0.01, k_reg 5) of the "
                   "calibrated probabilities, the top class always in the set",
            "before": measure(probs, labels), "after": measure(calibrated, labels),
            "risk_coverage": {k: np.round(v, 4).tolist() if isinstance(v, np.ndarray) else v
                              for k, v in risk_coverage(calibrated, labels).items()},
            "conformal": {"method": "raps", "lam": LAMBDA, "k_reg": K_REG, "seed": SEED,
                          "scores": np.round(scores, SCORE_DIGITS).tolist()}}


def measure(probs, labels, applied: dict | None = None) -> dict:
    """ECE (15 bins), classwise ECE, NLL, Brier and accuracy of these probabilities, with their
    reliability bins; `applied`: the calibration they were made with (None: raw softmax)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    out = {"ece": expected_calibration_error(probs, labels), "classwise_ece": classwise_ece(probs, labels),
           "nll": nll(probs, labels), "brier": brier(probs, labels),
           "accuracy": float((probs.argmax(1) == labels).mean()) if len(labels) else float("nan"),
           "reliability": reliability_table(probs, labels)}
    if applied is not None:
        out["applied"] = f"temperature {applied['temperature']:.3g} applied ({applied['fitted_on']})"
    else:
        out["applied"] = "raw softmax"
    return out


def check_coverage(fitted: dict, coverage: float) -> float:
    """The conformal threshold for `coverage` from a kept calibration; a UsageError when it has too
    few images for it (n + 1 images give coverage n / (n + 1) at most)."""
    scores = fitted["conformal"]["scores"]
    qhat = conformal_quantile(scores, coverage)
    if math.isinf(qhat):
        most = len(scores) / (len(scores) + 1)
        raise UsageError(f"--coverage {coverage:g} needs at least {math.ceil(coverage / (1 - coverage) - _EPS)} calibration "
                         f"images; this model's {len(scores)} allow up to {most:.3f}: use `cnnxfer calibrate` with more")
    return qhat


def sets_for(probs, fitted: dict | None, coverage: float) -> list[np.ndarray]:
    """Each image's prediction set at `coverage`, from the conformal scores kept in `fitted`."""
    if not fitted or not fitted.get("conformal"):
        raise UsageError("--coverage: the model has no conformal scores: fit them with `cnnxfer calibrate`")
    c = fitted["conformal"]
    qhat = check_coverage(fitted, coverage)
    return prediction_sets(probs, qhat, c["method"], c["lam"], c["k_reg"], rng=np.random.default_rng(c.get("seed", SEED)))


def set_coverage(sets: list[np.ndarray], labels, asked: float) -> dict:
    """How often the sets hold the true class, and how large they are."""
    labels = np.asarray(labels)
    sizes = np.array([len(s) for s in sets])
    hit = np.array([label in s for s, label in zip(sets, labels)])
    return {"asked": asked, "coverage": float(hit.mean()), "mean_size": float(sizes.mean()),
            "single": float((sizes == 1).mean()), "images": int(len(labels))}


def at_threshold(probs, labels, min_confidence: float) -> dict:
    """at_confidence with the threshold recorded (evaluate --min-confidence)."""
    return {"min_confidence": min_confidence, **at_confidence(probs, labels, min_confidence)}


def unknown_separation(known_probs, unknown_probs, unknown: str, features: tuple | None = None) -> dict:
    """How well the top probability tells the images of known classes from `unknown` ones: AUROC
    (1 perfect, 0.5 chance) and the share of unknown images accepted where 95% of known are.
    `features`: (known, unknown, class means) in the model's feature space, for the second score,
    the cosine similarity to the nearest training class's mean feature."""
    known, strange = np.asarray(known_probs).max(1), np.asarray(unknown_probs).max(1)
    out = {"score": "max probability", "auroc": auroc(known, strange), "false_accept": false_accept_at(known, strange, 0.95),
           "images": int(len(strange)), "folder": unknown}
    if features is not None:
        known_f, strange_f, means = features
        known, strange = nearest_class_similarity(known_f, means), nearest_class_similarity(strange_f, means)
        out["feature"] = {"score": "cosine similarity to the nearest training class's mean feature",
                          "auroc": auroc(known, strange), "false_accept": false_accept_at(known, strange, 0.95)}
    return out


def class_means(features, labels, classes: int) -> np.ndarray:
    """(classes, D): each class's mean of unit-length features, itself scaled to unit length."""
    x = _unit_rows(np.asarray(features, dtype=np.float64))
    labels = np.asarray(labels)
    return _unit_rows(np.stack([x[labels == k].mean(0) if (labels == k).any() else np.zeros(x.shape[1])
                                for k in range(classes)]))


def nearest_class_similarity(features, means) -> np.ndarray:
    """Each image's largest cosine similarity to a class mean (higher: more like a known class)."""
    return (_unit_rows(np.asarray(features, dtype=np.float64)) @ means.T).max(1)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
