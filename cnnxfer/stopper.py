"""When a run stops, and which epoch is its best: one owner of the stop rules.

A run trains for its --epochs unless --max-steps optimizer steps come first, or --patience epochs
pass with no new best (validation gathered from every process, so the decision is the same on
every rank), or under --budget the time is up (`stop_at`: budget.TimePlan sizes the epochs and
steps to the time and sets it; the training loop also stops mid-epoch there).
"""
from __future__ import annotations

import math
import time

BEST_RULE = "the lowest validation loss"  # how the best epoch is chosen (is_new_best), as the summary says it


def is_new_best(row: dict, best: dict, validated: bool = True) -> bool:
    """The one rule for the best epoch and for --patience: an epoch is the new best when its
    validation loss is lower than every earlier epoch's; --patience N stops after N epochs with no
    new best. Loss rather than accuracy: it moves with every image, where accuracy on a small
    validation set ties or jumps by whole images. Without a validation set (--val-split 0) every
    epoch is the new best: the last one is kept and the run never stops early.

    Under --strategy auto the fine-tuned epochs follow this rule among themselves; the probe is not
    one of them, and the best fine-tuned epoch meets it at the end (probing.ProbeStage.keep_better)."""
    if not best or not validated:
        return True
    return _finite(row["val_loss"]) < _finite(best["val_loss"])


def _finite(x: float) -> float:
    return x if x == x and math.isfinite(x) else float("inf")


class Stopper:
    """The epochs a run may take, --max-steps and --patience; `bad_epochs` is part of the resume state."""

    def __init__(self, epochs: int, patience: int | None = None, max_steps: int | None = None, validated: bool = True,
                 bad_epochs: int = 0):
        self.epochs, self.patience, self.max_steps, self.validated = epochs, patience, max_steps, validated
        self.bad_epochs, self.stopped_early = bad_epochs, False
        self.stop_at: float | None = None  # --budget: a time.monotonic() after which no epoch starts
        self.out_of_time = False  # stopped by the budget

    def improved(self, row: dict, best: dict) -> bool:
        """Whether `row` is the new best epoch (is_new_best); counts the epochs without one."""
        new = is_new_best(row, best, self.validated)
        self.bad_epochs = 0 if new else self.bad_epochs + 1
        return new

    def should_stop(self, global_step: int) -> bool:
        """After an epoch: stop now? (--max-steps or the budget's steps reached, the budget's time
        up, or --patience epochs without a new best: the latter is an early stop)."""
        if self.max_steps is not None and global_step >= self.max_steps:
            return True
        if self.stop_at is not None and time.monotonic() >= self.stop_at:
            self.out_of_time = True
            return True
        if self.patience and self.bad_epochs >= self.patience:
            self.stopped_early = True
            return True
        return False
