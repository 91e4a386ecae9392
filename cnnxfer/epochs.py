"""The epochs of a run: strategy, optimizer and schedule around the one training loop (engine.py),
validation gathered from every process, and checkpoints written at most every --checkpoint-every
seconds.

`Loop` sets up what trains (strategy.Plan: which parameters, in which phase; the frozen backbone's
features cached for the linear strategy's head), the optimizer, the schedule and the step context,
then runs epochs until the Stopper says stop. `Checkpoints` keeps each finished epoch for --resume.
`evaluate` and `features` are the run's two inference passes, through the Session.
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import loader as loaders, models, recipe
from .config import MIN_FINETUNE_STEPS, BnStats, TrainConfig
from .engine import (BatchHook, EpochStats, StepContext, build_optimizer, cosine_with_warmup, evaluate as evaluate_loader,
                     seed_everything, steps_per_epoch, train_one_epoch)
from .budget import TimePlan
from .errors import DataError
from .probe import calibrated_nll
from .rundir import RunDir
from .session import Session
from .signals import check_signals
from .stopper import Stopper
from .strategy import FeatureDataset, Phase, Plan
from .trainset import Loaders, RunData, Skips

VAL_LOSS = nn.CrossEntropyLoss()  # what validation measures: plain cross-entropy (see loss_fn)


def evaluate(module: nn.Module, loader, session: Session, normalizer: nn.Module):
    """engine.evaluate over every process's slice, gathered: every image counted once."""
    stats, probs, targets, indices = evaluate_loader(module, loader, VAL_LOSS, session, normalizer)
    if not session.distributed:
        return stats, probs, targets, indices
    parts = session.gather_objects((stats.loss * stats.samples if stats.samples else 0.0, stats.skipped))
    skipped = [s for p in parts for s in p[1]]
    indices, probs, targets = session.gather(indices, probs, targets)
    if not len(targets):
        return EpochStats(float("nan"), float("nan"), 0, skipped), probs, targets, indices
    accuracy = float((probs.argmax(1) == targets).float().mean())
    return EpochStats(sum(p[0] for p in parts) / len(targets), accuracy, len(targets), skipped), probs, targets, indices


def features(model: nn.Module, loader, session: Session, normalizer: nn.Module, skips: Skips):
    """The pooled features of the classifier's input for every readable image of `loader`, with
    labels and dataset indices: (features, labels, indices), every process's rows in dataset order."""
    model.eval()
    feats, labels, indices = [], [], []
    for batch, out in session.infer(loader, lambda x: models.pre_logits(model, x), normalizer):
        skips.record(loader, batch.skipped)
        if out is None:
            continue
        feats.append(out.float().cpu())
        labels.append(batch.labels)
        indices.append(batch.indices)
    if not feats:  # --val-split 0, or every image of this slice unreadable
        local = torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    else:
        local = torch.cat(feats), torch.cat(labels), torch.cat(indices)
    indices, feats, labels = session.gather(local[2], local[0], local[1])
    return feats, labels, indices


def _reduce_stats(stats: EpochStats, session: Session) -> EpochStats:
    """An epoch's training loss and accuracy over every process's images."""
    if not session.distributed:
        return stats
    parts = session.gather_objects((stats.loss * stats.samples, stats.accuracy * stats.samples, stats.samples,
                                    stats.skipped))
    n = sum(p[2] for p in parts)
    return EpochStats(sum(p[0] for p in parts) / max(n, 1), sum(p[1] for p in parts) / max(n, 1), n,
                      [s for p in parts for s in p[3]])


def _average_norm_statistics(model: nn.Module, session: Session) -> None:
    """BatchNorm running statistics averaged over the processes (each saw its own slice), so that
    evaluation and the saved weights are the same on every rank."""
    if not session.distributed:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            if module.running_mean is not None:
                session.mean_(module.running_mean)
                session.mean_(module.running_var)


class Checkpoints:
    """Each finished epoch, for --resume: to disk when --checkpoint-every seconds have passed since
    the last write (or on the last epoch), else as an in-memory copy that `flush` writes on
    Ctrl-C, SIGTERM, a failure or the end of the run.

    A small dataset's epoch can take less time than the checkpoint: 15 images for 60 epochs spent
    6.3 of 9.9 s writing 60 MB of weights and optimizer state per epoch. A kill (SIGKILL, power)
    loses at most --checkpoint-every seconds of training; the resume from there is as exact.
    Rank 0 keeps the checkpoint; every rank holds the same state.
    """

    def __init__(self, runs: RunDir, arch: str, record: Callable[[dict], object], every: float, epochs: int):
        self.runs, self.arch, self.record, self.every, self.epochs = runs, arch, record, every, epochs
        self.pending_best: tuple[dict, dict] | None = None  # (weights, best row) not yet written
        self.pending_state: dict | None = None
        self.last_save = time.monotonic()

    def save(self, epoch: int, state: dict, improved: bool) -> None:
        """Keep `state` (of the epoch just finished, 0-based `epoch`; -1 for the probe)."""
        if not self.runs.writer:
            return
        due = epoch + 1 >= self.epochs or time.monotonic() - self.last_save >= self.every
        if improved:
            self.pending_best = (state["model"] if due else copy.deepcopy(state["model"]), dict(state["best"]))
        self.pending_state = state if due else copy.deepcopy(state)
        if due:
            self.flush()

    def flush(self) -> None:
        """Write what `save` kept in memory, if anything."""
        if self.pending_best is not None:
            weights, best = self.pending_best
            self.runs.save_best(weights, self.arch, best["epoch"])
            self.runs.write_config(self.record(best))
        if self.pending_state is not None:
            self.runs.save_state(self.pending_state)
        self.pending_best = self.pending_state = None
        self.last_save = time.monotonic()


class Loop:
    """What trains and how: the plan, its loaders (cached features for linear), the optimizer, the
    schedule and the step context; then the epochs."""

    def __init__(self, run: RunData, model: nn.Module, step_dtype: torch.dtype | None, session: Session,
                 data: Loaders, skips: Skips, note: Callable[[str], None]):
        c = self.config = run.config
        self.run, self.model, self.session, self.data, self.skips = run, model, session, data, skips
        self.plan = Plan(c, model)
        cached = self.plan.caches_features and not self.plan.probe_only
        self.loaders = self._cached_loaders() if cached else (data.train, data.val)
        self.optimizer = build_optimizer(self.plan.optimized, self.plan.optimized_head, run.hp, c.momentum)
        steps = steps_per_epoch(self.loaders[0])
        few = recipe.FEW_STEPS if c.weights == models.NONE else recipe.FEW_FINETUNE_STEPS
        if steps * c.epochs < few and not c.max_steps and not self.plan.probe_only:
            usual = "a few hundred" if c.weights == models.NONE else f"{MIN_FINETUNE_STEPS} or more"
            note(f"{len(run.train)} training images at --batch-size {c.batch_size} give {steps} optimizer "
                 f"step(s) per epoch, {steps * c.epochs} in all: with few images, raise --epochs ({usual} "
                 f"steps is usual) or lower --batch-size")
        self.scheduler = cosine_with_warmup(self.optimizer, c.epochs * steps, int(c.warmup_epochs * steps))
        use_scaler = step_dtype == torch.float16 and session.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        agree = session.agree if session.distributed else None
        self.ctx = StepContext(self.plan.module, self.optimizer, self.scheduler, self.scaler, loss_fn(run, session.device),
                               session.device, step_dtype, c.grad_clip, session.channels_last, 0, c.max_steps,
                               data.normalizer, agree, session.world)
        self.phase: Phase | None = None
        self.time_plan: TimePlan | None = None  # --budget (training._train sets it)
        self.last_seconds = (0.0, 0.0)

    def _cached_loaders(self):
        """Run the frozen backbone once over un-augmented train and val images (each process its
        slice, then every process all of them: the head trains the same on every rank)."""
        c = self.config
        out = []
        for loader, shuffle in ((self.data.train_eval, True), (self.data.val, False)):
            feats, labels, indices = features(self.model, loader, self.session, self.data.normalizer, self.skips)
            out.append(loaders.Loader(FeatureDataset(feats, labels, indices), c.batch_size, shuffle=shuffle, seed=c.seed))
        if not len(out[0].dataset):
            raise DataError(f"{c.data}: no image could be read")
        return tuple(out)

    def _enter(self, phase: Phase) -> None:
        """Train `phase`'s parameters. With several processes the module is wrapped in
        DistributedDataParallel again whenever the trainable set changes: DDP reduces only the
        parameters that required grad when it was built."""
        if phase == self.phase:
            return
        self.plan.apply(phase)
        self.phase = phase
        # cached features: every rank trains the same head, unwrapped
        self.ctx.module = self.plan.module if self.plan.caches_features else self.session.wrap(self.plan.module)

    def restore(self, state: dict) -> None:
        """The optimizer, schedule, scaler and step count of an interrupted run."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.ctx.global_step = state["global_step"]

    def state(self, epoch: int, history: list, best: dict, bad_epochs: int) -> dict:
        """What --resume needs after `epoch` (0-based; -1: the probe)."""
        return {"epoch": epoch + 1, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else {},
                "history": history, "best": best, "bad_epochs": bad_epochs, "global_step": self.ctx.global_step,
                "skipped": dict(self.skips.skipped)}

    def run_epochs(self, start_epoch: int, history: list, best: dict, stopper: Stopper, saver: Checkpoints,
                   on_batch: BatchHook | None, on_epoch: Callable[[dict], None] | None,
                   scored: bool = False) -> tuple[list, dict]:
        """Epochs from `start_epoch` until the Stopper says stop; `scored`: each epoch's calibrated
        validation loss too (--strategy auto weighs it against the probe's)."""
        c, session = self.config, self.session
        if self.time_plan is not None:
            self.fit_schedule(stopper)
            on_batch = self._timed(on_batch, stopper)
        epoch = start_epoch
        while epoch < stopper.epochs:
            check_signals()
            seed_everything(c.seed * 1000 + epoch + 7919 * session.rank)  # rank 0: what one process draws
            self.loaders[0].set_epoch(epoch)
            if self.time_plan is not None:
                self.time_plan.epoch_started(self.ctx.global_step)
            row = self._epoch(epoch, self.plan.phase(epoch), scored, on_batch)
            if epoch == start_epoch:
                self.skips.check(saver.runs.write_skipped, c.strict)
            history.append(row)
            if best.get("epoch") == 0:  # auto: the probe meets the best fine-tuned epoch at the end, not each epoch
                best = {}
            improved = stopper.improved(row, best)
            if improved:
                best = best_of(row)
            saver.save(epoch, self.state(epoch, history, best, stopper.bad_epochs), improved)
            if on_epoch:
                on_epoch(row)
            if self.time_plan is not None:
                self.time_plan.epoch_done(self.ctx.global_step, *self.last_seconds)
                self.fit_schedule(stopper)
            if stopper.should_stop(self.ctx.global_step):
                break
            epoch += 1
        return history, best

    # -- --budget: the schedule sized to the time (budget.TimePlan)
    def fit_schedule(self, stopper: Stopper) -> None:
        """Size the cosine, the step limit, the epochs and the stop time to the time left."""
        plan = self.time_plan
        total = plan.size(self.ctx.global_step)
        for cosine in {id(f): f for f in self.scheduler.lr_lambdas}.values():
            cosine.total_steps, cosine.warmup_steps = total, plan.warmup_steps()
        self.ctx.max_steps = stopper.max_steps = total
        stopper.epochs = plan.epochs()
        self.ctx.stop_at = stopper.stop_at = plan.stop_at

    def _timed(self, on_batch: BatchHook | None, stopper: Stopper) -> BatchHook:
        """`on_batch`, and the schedule re-sized once the first steps are timed."""
        def hook(step: int, steps: int, loss: float) -> None:
            if self.time_plan.step_done(self.ctx.global_step):
                self.fit_schedule(stopper)
            if on_batch:
                on_batch(step, steps, loss)
        return hook

    def _epoch(self, epoch: int, phase: Phase, scored: bool, on_batch: BatchHook | None) -> dict:
        """One epoch of `phase` and its validation: the epoch's row of metrics.csv."""
        self._enter(phase)
        self.ctx.module.train()
        for m in models.frozen_norm_modules(self.model, all_of_them=self.run.hp["bn_stats"] == BnStats.frozen.value):
            m.eval()
        start = time.perf_counter()
        stats = _reduce_stats(train_one_epoch(self.ctx, self.loaders[0], on_batch), self.session)
        self.skips.record(self.loaders[0], stats.skipped)
        _average_norm_statistics(self.model, self.session)
        trained = time.perf_counter()
        val, probs, targets, _ = evaluate(self.plan.module, self.loaders[1], self.session, self.data.normalizer)
        self.last_seconds = (trained - start, time.perf_counter() - trained)  # (training, validation)
        self.skips.record(self.loaders[1], val.skipped)
        row = {"epoch": epoch + 1, "phase": phase.name, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
               "val_loss": val.loss, "val_accuracy": val.accuracy, "lr": self.optimizer.param_groups[-1]["lr"],
               "seconds": time.perf_counter() - start}
        if scored:
            row["val_loss_calibrated"] = calibrated_nll(torch.log(probs.double().clamp_min(1e-30)).numpy(),
                                                        targets.numpy())
        return row


def loss_fn(run: RunData, device: torch.device) -> nn.Module:
    """The training objective: cross-entropy with label smoothing, classes weighed under --balance loss.
    Validation measures plain cross-entropy (VAL_LOSS), like timm's validate: the same yardstick for
    every epoch, the probe and any setting of these options."""
    weight = None
    if run.config.balance.value == "loss":
        counts = np.bincount(run.train.labels, minlength=len(run.classes)).astype(float)
        weight = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=run.config.label_smoothing)


def best_of(row: dict) -> dict:
    """What a run records of its kept epoch (config.json's `best`)."""
    return {k: row[k] for k in ("epoch", "val_loss", "val_accuracy", "train_loss", "train_accuracy")}
