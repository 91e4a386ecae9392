"""The probe as a run's first step: epoch 0, --strategy auto's other candidate, and the refit of
a kept probe on every labelled image.

probe.py solves the probe (a convex fit on cached features, its strength by cross-validation);
this module puts it in the model's classifier and validates it as the run's epoch 0, compares it
with the best fine-tuned epoch at the end of an `auto` run (or by cross-validation when there are
no validation images: selection.py), and fits it again on training + validation images when the
run keeps it.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import models
from .data import find_split_folders
from .config import Balance, HeadInit, RunConfig, Strategy
from .epochs import VAL_LOSS, best_of, features
from .errors import DataError
from .probe import ProbeFit, beats_probe, calibrated_nll, fit_probe
from .rundir import RunDir
from .session import Session
from .trainset import Loaders, RunData, Skips

AUTO_RULE = ("the lowest validation loss among the fine-tuned epochs, kept if it beats the probe on validation "
             "accuracy (ties: the calibrated loss)")  # --strategy auto (ProbeStage.keep_better)


class ProbeStage:
    """The probe of one run: fitted on the frozen backbone's features of the un-augmented training images."""

    def __init__(self, run: RunData, model: nn.Module, arch: str, session: Session, skips: Skips, runs: RunDir,
                 note: Callable[[str], None], saved: RunConfig | None = None):
        self.run, self.model, self.arch, self.session = run, model, arch, session
        self.skips, self.runs, self.note = skips, runs, note
        self.saved_summary = saved.probe if saved is not None else None
        self.selection: dict | None = saved.selection if saved is not None else None  # auto without validation
        self.fit: ProbeFit | None = None
        self.row: dict | None = None
        self.features: tuple | None = None  # (train, val) features of a probe that may be kept, for its refit
        self.refit: dict | None = None  # the kept probe fitted again on training + validation images
        self.refit_held_out: tuple | None = None  # its cross-validation's held-out (probabilities, labels)
        self.keeps_probe = False  # auto without validation images: cross-validation chose the probe
        self.handover: dict | None = None  # the leaderboard's features and probe of every training image
        self.val_seconds = 0.0  # the validation pass, timed (budget.TimePlan's first estimate)
        self.images_per_second: float | None = None

    @property
    def auto(self) -> bool:
        return Strategy(self.run.config.strategy) == Strategy.auto

    def comes_first(self, probe_only: bool, new_head: bool) -> bool:
        """Whether the run starts with the probe: it is the whole of --strategy linear (with its feature
        cache), and where a new head goes on a pretrained backbone it is where that head starts
        (--head-init probe): fine-tuning from a random head sends large early gradients into the
        pretrained features (LP-FT, Kumar et al. 2022)."""
        c = self.run.config
        if probe_only or self.auto:  # auto: the probe is the first candidate
            return True
        return new_head and c.weights != models.NONE and HeadInit(c.head_init) == HeadInit.probe

    def fit_epoch_zero(self, data: Loaders, probe_only: bool, save: Callable[[dict, dict, bool], None]) -> tuple[list, dict]:
        """Fit the probe, put it in the classifier and validate it: the run's epoch 0, a candidate for
        the best epoch under --strategy linear and auto (`save(row, best, candidate)` checkpoints
        it); gradual and full start from it."""
        start = time.perf_counter()
        known = self.handover or {}
        if known:  # the leaderboard embedded every training image with this backbone already
            train = known["features"]
            self.skips.skipped.update(known["skipped"])
        else:
            train = features(self.model, data.train_eval, self.session, data.normalizer, self.skips)
        train_seconds = known.get("seconds", time.perf_counter() - start)
        began = time.perf_counter()
        val = features(self.model, data.val, self.session, data.normalizer, self.skips)
        self.val_seconds = time.perf_counter() - began
        self.images_per_second = (len(train[1]) + len(val[1])) / max(train_seconds + self.val_seconds, 1e-6)
        if not len(train[1]):
            raise DataError(f"{self.run.config.data}: no image could be read")
        self.skips.check(self.runs.write_skipped, self.run.config.strict)  # every image decoded once
        solution = self._fit_head(train[0], train[1], known.get("fit"))
        if solution is None:
            self.note("the classifier is not one linear layer on the pooled features: it starts from zeros, not the probe")
            return [], {}
        self.fit = solution
        row = {"epoch": 0, "phase": "probe", **_metrics(solution, train, "train"), **_metrics(solution, val, "val"),
               "lr": 0.0, "seconds": time.perf_counter() - start}
        if self.auto and len(val[1]):  # what a fine-tuned epoch tying on accuracy must beat
            row["val_loss_calibrated"] = calibrated_nll(solution.logits(val[0]).double().numpy(), val[1].numpy())
        self.row = row
        shown = f"; validation accuracy {row['val_accuracy']:.4f}" if len(val[1]) else ""
        self.note(f"probe: {solution.describe()}{shown} ({row['seconds']:.1f} s)")
        candidate = probe_only or self.auto
        self.features = (train, val) if candidate else None
        best = best_of(row) if candidate else {}
        save(row, best, candidate)
        if self.auto and len(val[1]):  # the candidate fine-tuning must beat, at the end
            self.runs.save_probe(self.model.state_dict(), self.arch)
        if HeadInit(self.run.config.head_init) == HeadInit.zero and not probe_only:
            models.zero_head(self.model)  # auto --head-init zero: the probe was a candidate, not the start
        return [row], best

    def _fit_head(self, feats: torch.Tensor, labels: torch.Tensor, solution: ProbeFit | None = None) -> ProbeFit | None:
        """The probe on these features (`solution`: already fitted on them), put in the model's
        classifier (None: it is not one linear layer)."""
        c = self.run.config
        if solution is None:
            solution = fit_probe(feats, labels.numpy(), len(self.run.classes),
                                 balanced=Balance(c.balance) != Balance.none, seed=c.seed)
        weight, bias = solution.head()
        device = self.session.device
        return solution if models.set_linear_head(self.model, weight.to(device), bias.to(device)) else None

    def select_by_cross_validation(self, fit: Callable, fold_budget: float | None = None) -> None:
        """--strategy auto with no validation images: the probe and fine-tuning are compared by k-fold
        cross-validation on the training images (selection.py); when the probe wins, it is the run.
        `fit(config)` runs one fold; under --budget each fold has `fold_budget` seconds."""
        from . import selection
        from .errors import UsageError

        c = self.run.config
        if not self.auto or len(self.run.val) or self.selection is not None:
            return
        if self.session.distributed:
            self.note("no validation images: under torchrun the fine-tuned model is kept without comparing it to the "
                      "probe (one process compares them by cross-validation)")
            return
        self.note(f"no validation images: comparing the probe and fine-tuning by {selection.FOLDS}-fold "
                  f"cross-validation on the training images (a short run per fold)")
        # the run's own resolved settings (batch size, epochs), which a resumed run reads back from config.json:
        # the folds of an interrupted run and of an uninterrupted one are the same runs
        try:
            folds = selection.cross_validate(dataclasses.replace(c, strict=False, budget=fold_budget), self.run.train, fit)
        except UsageError as exc:
            if fold_budget is None:
                raise
            self.note(f"the budget leaves too little time to cross-validate ({exc}): the probe is kept")
            self.keeps_probe = True
            return
        if folds is None:
            self.note("a class has one training image: too few to cross-validate; the fine-tuned model is kept")
            return
        self.selection = folds.to_dict()
        self.keeps_probe = folds.winner == "probe"

    def candidate(self, history: list) -> dict | None:
        """The probe's row when it is a candidate against the fine-tuned epochs (--strategy auto)."""
        if self.auto and history and history[0].get("phase") == "probe":
            return history[0]
        return None

    def keep_better(self, history: list, best: dict, record: Callable[[dict], RunConfig]) -> dict:
        """--strategy auto: the best fine-tuned epoch (by the loss, as `full` keeps it) is kept only if
        it beats the probe on the validation images (probe.beats_probe: accuracy, ties by the calibrated
        loss); otherwise the probe's weights go back into model.safetensors. One comparison of two
        candidates: picking the most accurate of five epochs on 40 validation images against the probe
        kept mid-schedule epochs that tested up to 5 points under it (Fashion-MNIST, 20 per class)."""
        probe = self.candidate(history)
        if probe is None or not best or best.get("epoch") == 0 or not len(self.run.val):
            return best
        tuned = next(row for row in history if row.get("epoch") == best["epoch"] and row.get("phase") != "probe")
        if beats_probe(tuned, probe):
            return best
        if self.runs.writer:
            self.runs.save_best(self.runs.probe_weights(), self.arch, 0)
        best = best_of(probe)
        self.runs.write_config(record(best))
        return best

    def refit_kept(self, best: dict, data: Loaders) -> None:
        """When the run keeps the probe and its validation images were split off the training folder,
        the saved probe is fitted again, the same way (C by cross-validation), on the training and
        validation images together: held out, they only chose between candidates, and a probe on
        a fifth more images is a better probe (scikit-learn's, on every labelled image, led ours by 1
        point at 100 digits per class). The validation figures and reports stay those of the fit on
        the training images alone, measured before; config.json records the refit."""
        if best.get("epoch") != 0 or not len(self.run.val) or find_split_folders(Path(self.run.config.data)):
            return  # a fine-tuned epoch kept, no validation images, or the user's own val/ folder: it stays held out
        extract = lambda loader: features(self.model, loader, self.session, data.normalizer, self.skips)  # noqa: E731
        train, val = self.features or (extract(data.train_eval), extract(data.val))
        labels = torch.cat([train[1], val[1]])
        solution = self._fit_head(torch.cat([train[0], val[0]]), labels)
        if solution is None:
            return
        self.runs.save_best(self.model.state_dict(), self.arch, 0)
        self.refit_held_out = (solution.held_out, labels.numpy()) if solution.held_out is not None else None
        self.refit = {"images": len(labels), "c": solution.c, "temperature": solution.temperature,
                      "cv_accuracy": solution.cv_accuracy, "folds": solution.folds, "how": solution.describe()}

    def summary(self) -> dict | None:
        """What config.json and the summary say of the probe: its strength, how it was chosen, and
        its training and validation figures (None when the run did not fit one)."""
        fit, row = self.fit, self.row
        refit = {"refit": self.refit} if self.refit else {}
        if fit is None:
            return {**self.saved_summary, **refit} if self.saved_summary else None
        return {**refit, "c": fit.c, "temperature": fit.temperature, "cv_accuracy": fit.cv_accuracy, "cv_loss": fit.cv_loss,
                "folds": fit.folds, "how": fit.describe(), "seconds": round(fit.seconds, 3), "searched": fit.searched,
                **{k: row[k] for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy")}}


def _metrics(fit: ProbeFit, feats: tuple, split: str) -> dict:
    """{split_loss, split_accuracy} of the probe on (features, labels, indices): plain cross-entropy."""
    x, labels, _ = feats
    if not len(labels):
        return {f"{split}_loss": float("nan"), f"{split}_accuracy": float("nan")}
    weight, bias = fit.head()
    logits = x.float() @ weight.T + bias  # what the model's classifier computes
    return {f"{split}_loss": float(VAL_LOSS(logits, labels)), f"{split}_accuracy": float((logits.argmax(1) == labels).float().mean())}
