"""The probe: a linear classifier on a frozen backbone's features, solved exactly.

Multinomial logistic regression with an L2 penalty, the convex problem scikit-learn's
`LogisticRegression` solves (`C * sum_i w_i * CE_i + ||W||^2 / 2`, intercept not penalised), on
standardised features: centred, each divided by its standard deviation floored at a fraction of
the typical one (`standard_scale`: near-constant features are not blown up). It is solved to convergence by full-batch
L-BFGS in float64 (seconds on thousands of images), so no learning rate, epoch count or
initialisation can leave it short of its optimum, as 38 epochs of AdamW did.

The strength C is chosen by stratified k-fold cross-validation on the training images over a log
grid, CLIP's recipe (Radford et al. 2021): a coarse sweep by decades, then refined around the best
by half and quarter decades. The criterion is the mean held-out accuracy, ties broken by the lower
held-out log loss. The standardisation is folded into the returned weights, so the head applies to
the raw features: a plain `nn.Linear` that reproduces the probe.

One module for every user of a probe: `finetune --strategy linear`, the head that probe-then-
fine-tune starts from, and `--strategy auto`'s first candidate.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

log = logging.getLogger(__name__)

COARSE = tuple(10.0 ** k for k in range(-4, 3))  # C from 1e-4 to 1e2 on standardised features
FOLDS = 5
DEFAULT_C = 1.0  # scikit-learn's default, for when the classes are too small to cross-validate
MAX_ITER = 1000
TOL = 1e-6  # on the largest gradient component of the mean loss (scikit-learn stops at 1e-4)
CV_TOL = 1e-5  # the fits that only score a strength
SCALE_FLOOR = 0.3  # of the features' RMS standard deviation (standard_scale)


@dataclass
class ProbeFit:
    """A fitted probe and how it was chosen."""

    weight: torch.Tensor  # (classes, features), applies to the raw (unstandardised) features
    bias: torch.Tensor  # (classes,)
    c: float  # scikit-learn's C: the inverse of the L2 strength (larger: weaker penalty)
    cv_accuracy: float | None  # mean held-out accuracy at `c` (None: not cross-validated)
    cv_loss: float | None
    folds: int
    searched: list[dict] = field(default_factory=list)  # {"c", "accuracy", "loss"} per strength tried
    seconds: float = 0.0
    note: str | None = None  # why it was not cross-validated, when it was not
    temperature: float = 1.0  # fitted on the held-out logits of the cross-validation (1: none)
    held_out: np.ndarray | None = None  # (N, classes): each image's probabilities from the fold that held it out, / T

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The solution's own logits (scikit-learn's at the same C)."""
        return features.to(self.weight.dtype) @ self.weight.T + self.bias

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the classifier a model gets: the solution divided by the temperature.
        The same predictions; probabilities as confident as the held-out images say. On few,
        separable images a weak penalty leaves logits in the hundreds: fine-tuning from such a head
        on augmented images started at a loss of 83 on digits, from the calibrated one below ln(10)."""
        return self.weight / self.temperature, self.bias / self.temperature

    def describe(self) -> str:
        """One line for the summary: the strength and how it was chosen."""
        if self.cv_accuracy is None:
            return f"C {self.c:.3g} ({self.note})"
        return (f"C {self.c:.3g} by {self.folds}-fold cross-validation over {len(self.searched)} strengths "
                f"(held-out accuracy {self.cv_accuracy:.4f}), temperature {self.temperature:.3g}")


@dataclass
class _Standardised:
    x: np.ndarray
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> "_Standardised":
        mean, std = features.mean(0), features.std(0)
        return cls((features - mean) / (scale := standard_scale(std)), mean, scale)

    def apply(self, features: np.ndarray) -> np.ndarray:
        return (features - self.mean) / self.scale


def standard_scale(std: np.ndarray) -> np.ndarray:
    """Each feature's divisor: its standard deviation, floored at SCALE_FLOOR times the features'
    root-mean-square one, sqrt(std^2 + floor^2). Pooled ReLU features are often near-constant on
    a few images (a unit that barely fires: std 0.0016 against a median 0.026 on 50 digits);
    dividing by such a std (scikit-learn's StandardScaler) multiplies it a hundredfold, and when
    the unit fires on a new image (or an augmented one) its weight swings the logits by hundreds.
    Floored, the probe on Lite0 features of 5 labels per class scored 73.0% instead of 65.9%
    (Fashion-MNIST) and 66.0% instead of 54.9% (digits), mean of 3 draws; at 100 per class the same."""
    floor = SCALE_FLOOR * float(np.sqrt((std ** 2).mean())) if std.size else 0.0
    scale = np.sqrt(std ** 2 + floor ** 2)
    return np.where(scale > 1e-12, scale, 1.0)  # all-constant features stay as they are


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """scikit-learn's "balanced": n / (classes * n_c), so every class weighs the same in the loss."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return counts.sum() / (num_classes * np.maximum(counts, 1))


def solve(x: np.ndarray, y: np.ndarray, num_classes: int, c: float, sample_weight: np.ndarray | None = None,
          init: np.ndarray | None = None, tol: float = TOL) -> np.ndarray:
    """argmin over (W, b) of  sum_i w_i CE(W x_i + b, y_i) + ||W||^2 / (2 C),  on float64 `x`.

    Returns the (classes, features + 1) matrix [W | b]. L-BFGS (scipy's, as scikit-learn's lbfgs
    solver) on the objective divided by n with its exact gradient, warm-started from `init` (the
    solution at a nearby C: along a regularisation path it converges in a fraction of the steps).
    """
    from scipy.optimize import minimize

    n, d = x.shape
    onehot = np.zeros((n, num_classes))
    onehot[np.arange(n), y] = 1.0
    sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    penalty = 1.0 / (c * n)  # of ||W||^2 / 2, the objective divided by n: a mean loss

    def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
        wb = flat.reshape(num_classes, d + 1)
        w, b = wb[:, :d], wb[:, d]
        z = x @ w.T + b
        z -= z.max(1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
        loss = -(sw * (onehot * log_p).sum(1)).sum() / n + 0.5 * penalty * (w * w).sum()
        g = (np.exp(log_p) - onehot) * (sw[:, None] / n)
        grad = np.concatenate([g.T @ x + penalty * w, g.sum(0)[:, None]], axis=1)
        return loss, grad.ravel()

    start = np.zeros((num_classes, d + 1)) if init is None else init
    result = minimize(objective, start.ravel(), jac=True, method="L-BFGS-B",
                      options={"maxiter": MAX_ITER, "gtol": tol, "ftol": 64 * np.finfo(float).eps, "maxls": 50})
    return result.x.reshape(num_classes, d + 1)


class _CrossValidation:
    """Held-out accuracy and log loss of the probe at any C, each fold warm-started from the
    solution at the nearest C already tried."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, num_classes: int, weights: np.ndarray | None,
                 folds: int, seed: int, groups=None):
        from .data import stratified_folds

        self.num_classes = num_classes
        self.parts = []
        splits = [(t, h) for t, h in stratified_folds(labels, folds, seed, groups) if len(h)]
        self.order = np.concatenate([held for _, held in splits])  # row of the held-out logits -> image
        for train, held in splits:
            scaled = _Standardised.of(features[train])
            sw = weights[labels[train]] if weights is not None else None
            self.parts.append((scaled.x, labels[train], sw, scaled.apply(features[held]), labels[held]))
        self.solutions: dict[float, list[np.ndarray]] = {}
        self.held_out: dict[float, tuple[np.ndarray, np.ndarray]] = {}  # C -> (held-out logits, labels)
        self.scores: dict[float, dict] = {}

    def score(self, c: float) -> dict:
        if c in self.scores:
            return self.scores[c]
        near = min(self.solutions, key=lambda k: abs(math.log(k / c)), default=None)
        solutions, held = [], []
        for k, (x, y, sw, xh, yh) in enumerate(self.parts):
            wb = solve(x, y, self.num_classes, c, sw, self.solutions[near][k] if near else None, CV_TOL)
            solutions.append(wb)
            held.append(xh @ wb[:, :-1].T + wb[:, -1])
        z, y = np.concatenate(held), np.concatenate([part[4] for part in self.parts])
        self.solutions[c], self.held_out[c] = solutions, (z, y)
        self.scores[c] = {"c": c, "accuracy": float((z.argmax(1) == y).mean()), "loss": _nll(z, y)}
        return self.scores[c]

    def best(self) -> dict:
        return max(self.scores.values(), key=lambda s: (s["accuracy"], -s["loss"]))


def _nll(z: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    z = z / temperature
    z = z - z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [1/4, 64] that minimises the cross-entropy of logits / T (Guo et al. 2017), on
    held-out logits; 1 when every held-out image is right: the loss then falls as T goes to 0
    (sharper and sharper), so they say nothing about how confident to be."""
    if (logits.argmax(1) == labels).all():
        return 1.0
    return float(math.exp(_best_temperature(logits, labels).x))


def _best_temperature(logits: np.ndarray, labels: np.ndarray):
    """scipy's result for the log-temperature in [log 1/4, log 64] minimising the cross-entropy."""
    from scipy.optimize import minimize_scalar

    return minimize_scalar(lambda log_t: _nll(logits, labels, math.exp(log_t)), bounds=(math.log(0.25), math.log(64.0)),
                           method="bounded", options={"xatol": 1e-4})


def calibrated_nll(logits: np.ndarray, labels: np.ndarray) -> float:
    """The cross-entropy of logits / T at the T in [1/4, 64] that minimises it: a loss that compares
    models whose confidence differs by construction (a probe with a fitted temperature, a network
    trained on smoothed labels) on equal terms. When every image is right it is the loss at T = 1/4:
    the candidate with the wider margins has the lower."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if not len(labels):
        return float("nan")
    return float(min(_best_temperature(logits, labels).fun, _nll(logits, labels, 0.25)))


def beats_probe(row: dict, probe: dict) -> bool:
    """Whether a fine-tuned model beats the probe on the same held-out images (rows with
    `val_accuracy` and `val_loss_calibrated`): more accurate, or as accurate with a lower calibrated
    loss. The rule of --strategy auto (probing.ProbeStage.keep_better, selection, the summary)."""
    mine, theirs = _accuracy(row["val_accuracy"]), _accuracy(probe["val_accuracy"])
    if mine != theirs:
        return mine > theirs
    return _loss(row.get("val_loss_calibrated")) < _loss(probe.get("val_loss_calibrated"))


def _accuracy(x) -> float:
    return x if x is not None and x == x else -1.0


def _loss(x) -> float:
    return x if x is not None and x == x and math.isfinite(x) else math.inf


def _choose(features, labels, num_classes, weights, folds, seed, groups=None):
    """(the best {"c", "accuracy", "loss"}, every strength tried, the folds used, the temperature of
    the best's held-out logits, the cross-validation): a coarse sweep over COARSE, then the best
    refined by half a decade and a quarter of a decade either side."""
    folds = min(folds, int(np.bincount(labels, minlength=num_classes)[np.unique(labels)].min()))
    cv = _CrossValidation(features, labels, num_classes, weights, folds, seed, groups)
    for c in COARSE:
        cv.score(c)
    for step in (0.5, 0.25):
        best = cv.best()["c"]
        for c in (best * 10 ** -step, best * 10 ** step):
            cv.score(c)
    best = cv.best()
    return best, sorted(cv.scores.values(), key=lambda s: s["c"]), folds, fit_temperature(*cv.held_out[best["c"]]), cv


def out_of_sample_probabilities(features, labels, num_classes: int, folds: int = FOLDS, seed: int = 0,
                                balanced: bool = False, groups=None) -> tuple[np.ndarray, dict]:
    """Every image's class probabilities from a probe that never saw it (the audit's input): the
    held-out softmax of stratified k-fold cross-validation at the strength C it chooses (_choose),
    divided by the temperature fitted on those same held-out logits. `groups`: images that must be
    held out together (copies of one image), see data.stratified_folds.

    Returns:
        (probabilities (N, classes) in the images' order, {"c", "accuracy", "loss", "folds", "temperature"}).
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    if (counts > 0).sum() < 2 or counts[counts > 0].min() < 2:
        raise ValueError("out-of-sample probabilities need 2+ classes with 2+ images each")
    weights = class_weights(labels, num_classes) if balanced else None
    with _blas_limits(features, num_classes):
        best, _, used, temperature, cv = _choose(features, labels, num_classes, weights, folds, seed, groups)
    return _held_out_probabilities(cv, best["c"], temperature), {**best, "folds": used, "temperature": temperature}


def _held_out_probabilities(cv: "_CrossValidation", c: float, temperature: float) -> np.ndarray:
    """The softmax of the held-out logits at strength c divided by the temperature, in image order."""
    logits = cv.held_out[c][0]
    z = np.empty_like(logits)
    z[cv.order] = logits / temperature
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def fit_probe(features, labels, num_classes: int, *, balanced: bool = False, c: float | None = None,
              folds: int = FOLDS, seed: int = 0) -> ProbeFit:
    """The probe on `features` (N, D) with integer `labels` (N,): C by cross-validation unless given.

    Args:
        features: a tensor or array; solved in float64 on the CPU.
        balanced: weigh every class the same in the loss (`--balance loss`), scikit-learn's
            class_weight="balanced".
        folds: k of the stratified k-fold cross-validation (fewer when the smallest class has fewer
            images; with a class of one image there is no cross-validation and C is DEFAULT_C).
    """
    with _blas_limits(features, num_classes):
        return _fit(features, labels, num_classes, balanced, c, folds, seed)


def _blas_limits(features, num_classes: int):
    """One BLAS thread unless the problem is large: on probe-sized products (160 x 1280 features, 10
    classes) two OpenBLAS threads took 2x one thread's time alone and 25-65x on a machine whose
    cores were busy (90 s against 3.8 s, and 131 s against 2.0 s for 240 images, measured): their
    threads wait for each other by spinning. threadpoolctl limits only the libraries loaded when
    it is called, and scipy brings its own OpenBLAS: scipy.optimize is imported first, or its
    solver would run unlimited (it did, until the 131 s were traced to it)."""
    import scipy.optimize  # noqa: F401  (loads scipy's OpenBLAS, so that the limit reaches it)
    import threadpoolctl

    return threadpoolctl.threadpool_limits(1 if len(features) * features.shape[1] * num_classes < 2e8 else None)


def _fit(features, labels, num_classes: int, balanced: bool, c: float | None, folds: int, seed: int) -> ProbeFit:
    import scipy.optimize  # noqa: F401  (imported before the clock starts: `seconds` is the fit's own time)

    start = time.perf_counter()
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    weights = class_weights(labels, num_classes) if balanced else None
    best, searched, used, note, temperature, held_out = None, [], 0, None, 1.0, None
    if c is None and (counts > 0).sum() >= 2 and counts[counts > 0].min() >= 2:
        best, searched, used, temperature, cv = _choose(features, labels, num_classes, weights, folds, seed)
        c, held_out = best["c"], _held_out_probabilities(cv, best["c"], temperature)
    elif c is None:
        c, note = DEFAULT_C, "scikit-learn's default: a class has one image, too few to cross-validate"
    else:
        note = "given"
    scaled = _Standardised.of(features)
    # weak penalties leave directions of little curvature: a tighter tolerance there (10x at C > 1)
    tol = TOL if c <= 1 else TOL / 10
    wb = solve(scaled.x, labels, num_classes, c, weights[labels] if weights is not None else None, tol=tol)
    weight = wb[:, :-1] / scaled.scale  # folded: W (x - m) / s + b = (W / s) x + (b - (W / s) m)
    bias = wb[:, -1] - weight @ scaled.mean
    return ProbeFit(torch.from_numpy(weight).float(), torch.from_numpy(bias).float(), c,
                    best["accuracy"] if best else None, best["loss"] if best else None, used, searched,
                    time.perf_counter() - start, note, temperature, held_out)
