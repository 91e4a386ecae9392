"""The overfit check: can this setup memorise a handful of images? It must tell "stuck" from "slow".

A bug (labels not aligned with the images, a model that ignores its input, a frozen network)
leaves the loss near the chance loss, ln(C) for C balanced classes: the best a model can do
without looking at its input. A sound but small or slowly learning model has a loss that keeps
falling; 300 steps were not always enough (a correct 1.5k-parameter CNN on 16 digits reaches 93.8%
after 300 AdamW steps and 100% after 842), so the check keeps going while the loss still falls
clearly, within a step and a time budget, and judges:

- PASS: 100% train accuracy and a loss at or below the target;
- FAIL: the loss stays near the chance loss, never falls, rises above where it started, or
  becomes non-finite; or nothing is trainable;
- WARN: learning (the loss well below chance) but not memorised when the budget ran out or the
  loss stopped falling; the summary gives the figures and says what to raise.
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .check_result import FAIL, PASS, WARN, CheckResult
from .session import Session

EXTEND = 10  # while the loss still falls clearly the check may run up to 10x its step budget
FALLING = 0.9  # "still falling clearly": a window's mean loss below 90% of the window before
NEAR_CHANCE = 0.9  # a final loss above 90% of the chance loss is "near ln(C)"
ROSE = 1.1  # a final loss 10% above both its start and the chance loss has diverged
NEVER_FELL = 0.98  # a final loss within 2% of the first steps' has not fallen


@dataclass(frozen=True)
class Budget:
    """How long the overfit run may go. `steps` always run (unless memorised sooner); after them
    the run goes on, window by window, while the loss falls clearly, up to EXTEND * steps steps
    and `seconds` seconds in all."""

    steps: int = 300
    seconds: float = 120.0
    loss_target: float = 0.05

    @property
    def window(self) -> int:
        return max(5, min(100, self.steps // 3))


def chance_loss(labels: torch.Tensor) -> float:
    """The lowest mean cross-entropy a model that ignores its input can reach on `labels`: the
    entropy of their distribution (ln(C) for C balanced classes)."""
    counts = torch.bincount(labels.flatten().cpu()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def check_overfit(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], session: Session, *,
                  precision: str = "auto", lr: float | None = None, budget: Budget = Budget()) -> CheckResult:
    """Train a copy of `model` on `batches` (usually one fixed batch, repeated) with augmentation,
    dropout and weight decay off, through the engine's own training step as training runs it on
    `session` (engine.step_context: the training dtype for `precision`, channels_last), and judge it
    with `check_overfit_result`. A non-finite loss is a finding (FAIL); any other exception
    propagates (run_checks reports it as an ERROR naming the exception).

    Args:
        batches: (images, labels) per step; the chance loss comes from the first batch's labels.
        precision: --precision as given (auto trains some models in fp32 on a CPU: device.training_dtype).
        lr: AdamW's learning rate (default 1e-3).
    """
    from . import engine
    from .errors import TrainingError

    start = time.perf_counter()
    net = _fitting_copy(model, session)
    trainable = [p for p in net.parameters() if p.requires_grad]
    if not trainable:
        return CheckResult("overfit", FAIL, "no trainable parameter: every parameter has requires_grad=False",
                           hint="the network is frozen; unfreeze it (requires_grad_(True)) before training",
                           seconds=time.perf_counter() - start)
    hp = {"optimizer": "adamw", "lr": 1e-3 if lr is None else lr, "weight_decay": 0.0, "backbone_lr_mult": 1.0}
    optimizer = engine.build_optimizer(net, {n for n, _ in net.named_parameters()}, hp, 0.9)
    ctx = engine.step_context(net, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                              nn.CrossEntropyLoss(), session, precision)
    losses, accuracies, chance, stopped, y = [], [], None, "", None
    try:
        for x, y in batches:
            chance = chance_loss(y) if chance is None else chance
            loss, correct = engine.train_step(ctx, x, y)
            losses.append(loss)
            accuracies.append(correct / len(y))
            stopped = _stop_reason(losses, accuracies, budget, time.perf_counter() - start)
            if stopped:
                break
        else:
            stopped = "the end of the batches"
    except TrainingError:  # a non-finite loss is itself the finding
        losses.append(float("nan"))
        accuracies.append(accuracies[-1] if accuracies else 0.0)
        stopped = "a non-finite loss"
    result = check_overfit_result(losses, accuracies, loss_target=budget.loss_target, chance=chance, stopped=stopped,
                                  budget=budget)
    if y is not None:
        result.details.update({"images": len(y), "classes": int(y.unique().numel())})
    result.details["lr"] = hp["lr"]
    result.seconds = time.perf_counter() - start
    return result


def _fitting_copy(model: nn.Module, session: Session) -> nn.Module:
    """A train-mode copy, placed by `session`, with dropout and stochastic depth off: the check is
    about fitting."""
    net = session.place(copy.deepcopy(model)).train()
    for module in net.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("drop_rate", "drop_prob"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    return net


def _stop_reason(losses: list[float], accuracies: list[float], budget: Budget, seconds: float) -> str:
    """Why to stop after this step, or "" to go on."""
    n = len(losses)
    if accuracies[-1] >= 1.0 and losses[-1] <= budget.loss_target:
        return "memorised"
    if n < budget.steps or (n - budget.steps) % budget.window:
        return ""  # within the step budget, or between two looks at the trend
    if n >= EXTEND * budget.steps:
        return f"the step limit ({EXTEND}x --overfit-steps)"
    if seconds >= budget.seconds:
        return "the time limit (--overfit-seconds)"
    return "" if falling(losses, budget.window) else "the loss stopped falling clearly"


def falling(losses: list[float], window: int) -> bool:
    """Whether the loss still falls clearly: the mean of the last `window` steps below FALLING times
    the mean of the `window` before (windows shortened to half the run when it is shorter)."""
    w = min(window, len(losses) // 2)
    return w >= 1 and _mean(losses[-w:]) < FALLING * _mean(losses[-2 * w:-w])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def check_overfit_result(losses: list[float], accuracies: list[float], *, loss_target: float = 0.05,
                         chance: float | None = None, stopped: str = "", budget: Budget | None = None) -> CheckResult:
    """Judge a finished run that tried to overfit a tiny subset (see the module docstring).

    Args:
        losses: train loss per step (or per epoch) of the overfit run.
        accuracies: train accuracy per step, as fractions in [0, 1].
        chance: the chance loss of the labels (`chance_loss`); None skips the "near chance" rule.
        stopped: why the run stopped ("memorised", "the step limit ...", ...), for the summary.
    """
    hint = "check data and preprocessing (labels aligned with images?), model capacity, learning rate"
    if not losses or not accuracies:
        return CheckResult("overfit", FAIL, "the overfit run recorded no steps", hint=hint)
    loss, accuracy = float(losses[-1]), float(accuracies[-1])
    w = max(1, min(20, len(losses) // 5))  # the start and end levels: means over a few steps
    first, last = _mean(losses[:w]), _mean(losses[-w:])
    details = {"steps": len(losses), "final_loss": loss, "final_accuracy": accuracy, "best_loss": min(losses),
               "start_loss": first, "end_loss": last, "chance_loss": chance, "loss_target": loss_target,
               "stopped": stopped, "losses": [float(v) for v in losses], "accuracies": [float(v) for v in accuracies]}
    summary = f"after {len(losses)} steps: train accuracy {accuracy:.1%}, loss {loss:.3g} (target 100% and <= {loss_target:g})"
    if accuracy >= 1.0 and loss <= loss_target:
        return CheckResult("overfit", PASS, summary, details=details)
    still_falling = falling(losses, budget.window if budget else max(1, len(losses) // 3))
    status, hint = _judge_not_memorised(losses, first, last, chance, still_falling, hint)
    trend = f"; loss {first:.3g} -> {last:.3g}" + (f" (chance: {chance:.3g})" if chance is not None else "")
    if status == WARN:
        trend, hint = "; learning:" + trend[1:], _what_to_raise(stopped, budget)
    return CheckResult("overfit", status, summary + trend + (f"; stopped at {stopped}" if stopped else ""), hint=hint,
                       details=details)


def _judge_not_memorised(losses, first, last, chance, still_falling, hint) -> tuple[str, str]:
    """FAIL with what the loss did, or WARN when it is learning: still falling clearly when the
    budget ran out (slow, not stuck, even if still near chance), or well below chance."""
    bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    if bad is not None:
        return FAIL, f"the loss became non-finite at step {bad + 1}: lower the learning rate (--lr); then " + hint
    if last > ROSE * max(first, chance or first):
        return FAIL, f"the loss diverged ({first:.3g} -> {last:.3g}): lower the learning rate (--lr); then " + hint
    if still_falling:
        return WARN, ""
    if chance is not None and last >= NEAR_CHANCE * chance:
        return FAIL, ("the loss stayed near chance, where a model that ignores its input ends: " + hint +
                      "; does the input reach the output (no multiplication by zero, no detach)?")
    if last >= NEVER_FELL * first:
        return FAIL, "the loss never fell: are the parameters trainable and the lr non-zero? Also " + hint
    return WARN, ""


def _what_to_raise(stopped: str, budget: Budget | None) -> str:
    steps = budget.steps if budget else None
    if "time" in stopped:
        return "learning but not memorised when the time ran out: raise --overfit-seconds"
    if "step" in stopped:
        more = f" (now {steps}; the check goes on to {EXTEND}x that while the loss falls)" if steps else ""
        return f"learning but not memorised when the steps ran out: raise --overfit-steps{more}"
    return ("learning but the loss stopped falling before the subset was memorised: try another --lr, or a model "
            "with more capacity")


def repeat(x: torch.Tensor, y: torch.Tensor) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """The usual overfit data: the same batch at every step."""
    return itertools.repeat((x, y))
