"""The one training loop, shared by `finetune`, `train` and the overfit sanity check.

torchvision's `train_one_epoch` / `evaluate` split: a step with AMP (bf16 autocast, fp16 +
GradScaler), channels_last, gradient clipping and a NaN guard; an epoch that leaves a ragged last
batch out; evaluation (through Session.infer, the one inference batch path) that returns
probabilities for the caller to gather and score; an OOM hint with a batch size that fits. What
runs around it - data, strategy, checkpoints, several processes - is training.py's.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import device as dev
from .errors import TrainingError
from .preprocess import Normalize
from .session import Session
from .signals import check_signals

log = logging.getLogger(__name__)


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    samples: int
    skipped: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class StepContext:
    """Everything one optimisation step needs besides the batch."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    loss_fn: nn.Module
    device: torch.device
    dtype: torch.dtype | None
    grad_clip: float | None = None
    channels_last: bool = False
    global_step: int = 0
    max_steps: int | None = None
    normalizer: Normalize | None = None  # for loaders that deliver uint8 images (on the device)
    # Several processes: whether any of them says yes. A decision that skips a step or ends the
    # run must be the same on every rank, or the ranks that go on wait forever for the others.
    agree: Callable[[bool], bool] | None = None
    world: int = 1  # processes sharing each batch
    stop_at: float | None = None  # time.monotonic() past which no step starts (--budget: stopper.Stopper)


BatchHook = Callable[[int, int, float], None]  # (step in epoch, steps in epoch, loss)


# ---------------------------------------------------------------- hyperparameters









def build_optimizer(model: nn.Module, head_names: set[str], hp: dict, momentum: float) -> torch.optim.Optimizer:
    """Two parameter groups (backbone at lr * mult, head at lr); no weight decay on norms and biases."""
    groups = {}
    for name, p in model.named_parameters():
        is_head = name in head_names
        no_decay = p.ndim <= 1
        key = (is_head, no_decay)
        groups.setdefault(key, []).append(p)
    param_groups = [
        {
            "params": params,
            "lr": hp["lr"] * (1.0 if is_head else hp["backbone_lr_mult"]),
            "weight_decay": 0.0 if no_decay else hp["weight_decay"],
            "name": f"{'head' if is_head else 'backbone'}{'_no_decay' if no_decay else ''}",
        }
        for (is_head, no_decay), params in sorted(groups.items())
    ]
    if hp["optimizer"] == "sgd":
        return torch.optim.SGD(param_groups, lr=hp["lr"], momentum=momentum, nesterov=momentum > 0)
    return torch.optim.AdamW(param_groups, lr=hp["lr"])


class Cosine:
    """The learning-rate factor at each step: linear warm-up to each group's lr, then cosine decay to
    zero at `total_steps`. An object rather than a closure, so that a --budget run can re-size its
    schedule as the measured speed changes (budget.TimePlan) and LambdaLR's state_dict keeps the
    sizes for --resume."""

    def __init__(self, total_steps: int, warmup_steps: int):
        self.total_steps, self.warmup_steps = total_steps, warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def cosine_with_warmup(optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to each group's lr, then cosine decay to zero, stepped per batch (Cosine)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Cosine(total_steps, warmup_steps))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- the loop

def to_device(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    return dev.to_input(x, ctx.device, ctx.normalizer, ctx.channels_last)


def train_step(ctx: StepContext, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """One optimisation step; returns (loss, correct). Raises TrainingError on a non-finite loss."""
    x, y = to_device(inputs, ctx), targets.to(ctx.device, non_blocking=True)
    with dev.autocast(ctx.device, ctx.dtype):
        logits = ctx.module(x)
        loss = ctx.loss_fn(logits.float(), y)
    bad = not bool(torch.isfinite(loss))
    if ctx.agree is not None:
        bad = ctx.agree(bad)  # one rank's NaN stops every rank, at the same step
    if bad:
        group = ctx.optimizer.param_groups[-1]  # the head's: lr now, and the peak the schedule started from
        lr, peak = group["lr"], group.get("initial_lr", group["lr"])
        raise TrainingError(
            f"loss became {loss.item() if not torch.isfinite(loss) else 'non-finite on another process'} at step "
            f"{ctx.global_step + 1} (learning rate {lr:.3g}, peak --lr {peak:.3g}): "
            f"the learning rate is likely too high (try --lr {peak / 10:.3g}), or the inputs hold NaN/inf"
        )
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward()
        if ctx.grad_clip:
            ctx.scaler.unscale_(ctx.optimizer)
            nn.utils.clip_grad_norm_(ctx.module.parameters(), ctx.grad_clip)
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        loss.backward()
        if ctx.grad_clip:
            nn.utils.clip_grad_norm_(ctx.module.parameters(), ctx.grad_clip)
        ctx.optimizer.step()
    ctx.scheduler.step()
    ctx.global_step += 1
    return loss.item(), int((logits.argmax(1) == y).sum())


def steps_per_epoch(loader) -> int:
    """Optimisation steps in one pass: the batches, less a ragged last one (see train_one_epoch)."""
    return epoch_steps(loader.num_samples, loader.batch_size)


def epoch_steps(n: int, batch_size: int) -> int:
    """Optimisation steps in one pass over `n` images: a ragged last batch takes none unless it is
    the only one."""
    return min(n, 1) if n <= batch_size else n // batch_size


def train_one_epoch(ctx: StepContext, loader, on_batch: BatchHook | None = None) -> EpochStats:
    """One pass over `loader` (yielding data.Batch) in train mode.

    A ragged last batch is decoded (so unreadable files in it are still found) but takes no step,
    like timm's drop_last: 898 digits at batch 64 left a batch of 2, whose BatchNorm statistics on
    the 1x1 maps of a 32 px resnet10t, and the step taken on them, swung validation accuracy
    between 10% and 70% from epoch to epoch (74.6% after 20 epochs; 99.0% without that step).
    Shuffling leaves out different images each epoch.
    """
    total_loss, correct, seen, skipped = 0.0, 0, 0, []
    steps = steps_per_epoch(loader)
    for i, batch in enumerate(loader):
        check_signals()
        skipped += batch.skipped
        empty = len(batch.labels) == 0
        if ctx.agree is not None and i < steps:
            empty = ctx.agree(empty)  # a slice with no readable image: every rank skips the step
        if empty or i >= steps:
            continue
        if ctx.max_steps is not None and ctx.global_step >= ctx.max_steps:
            break
        if ctx.stop_at is not None:  # --budget: the epoch ends where the time does, even mid-way
            late = time.monotonic() >= ctx.stop_at
            if ctx.agree(late) if ctx.agree is not None else late:
                break
        try:
            loss, right = train_step(ctx, batch.images, batch.labels)
        except torch.OutOfMemoryError as exc:
            raise TrainingError(oom_message(ctx, batch)) from exc
        n = len(batch.labels)
        total_loss, correct, seen = total_loss + loss * n, correct + right, seen + n
        if on_batch:
            on_batch(i + 1, steps, loss)
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), seen, skipped)


def evaluate(module: nn.Module, loader, loss_fn: nn.Module, session: Session, normalizer: Normalize | None = None,
             ) -> tuple[EpochStats, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss/accuracy over `loader` in eval mode through the one inference path (Session.infer, in
    the session's dtype); also (probabilities, targets, dataset indices) of this process's
    batches, for the caller to gather."""
    was_training = module.training
    module.eval()
    probs, targets, indices, skipped = [], [], [], []
    total_loss = 0.0
    for batch, logits in session.infer(loader, module, normalizer):
        skipped += batch.skipped
        if logits is None:
            continue
        logits, y = logits.float(), batch.labels.to(session.device)
        if (y >= 0).all():
            total_loss += loss_fn(logits, y).item() * len(y)
        probs.append(logits.softmax(1).cpu())
        targets.append(batch.labels)
        indices.append(batch.indices)
    module.train(was_training)
    if not probs:
        return EpochStats(float("nan"), float("nan"), 0, skipped), torch.empty(0), torch.empty(0), torch.empty(0)
    probs, targets, indices = torch.cat(probs), torch.cat(targets), torch.cat(indices)
    n = len(targets)
    acc = float((probs.argmax(1) == targets).float().mean())
    return EpochStats(total_loss / n, acc, n, skipped), probs, targets, indices


def step_context(module: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loss_fn: nn.Module,
                 session: Session, precision="auto", normalizer: Normalize | None = None) -> StepContext:
    """A StepContext for `session` as training builds one: the training dtype (device.training_dtype
    for `precision`, the --precision option), a GradScaler for fp16 on CUDA, channels_last as the
    session says. For the checks that train through `train_step` (overfit, the lr range test), so
    that they test the numerics training runs with."""
    dtype = dev.training_dtype(session.runtime, module, precision)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and session.device.type == "cuda" else None
    return StepContext(module, optimizer, scheduler, scaler, loss_fn, session.device, dtype,
                       channels_last=session.channels_last, normalizer=normalizer)


def oom_message(ctx: StepContext, batch) -> str:
    """Out of memory: find by halving the largest batch size that does one step, and say it (as
    the global --batch-size: each of `ctx.world` processes holds its share)."""
    bs = len(batch.labels)
    # the bare model: under DistributedDataParallel a forward+backward here would wait for the others
    probe = dataclasses.replace(ctx, module=getattr(ctx.module, "module", ctx.module))
    fits = find_fitting_batch_size(probe, batch.images[:1], bs)
    hint = f"--batch-size {fits * ctx.world} fits" if fits else "even --batch-size 1 does not fit; try a smaller --img-size or model"
    return f"out of memory on {ctx.device} at batch size {bs * ctx.world}: {hint}"


def find_fitting_batch_size(ctx: StepContext, sample: torch.Tensor, batch_size: int) -> int | None:
    """The largest power-of-two fraction of `batch_size` for which a forward+backward fits."""
    bs = batch_size // 2
    while bs >= 1:
        try:
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            x = to_device(sample.expand(bs, *sample.shape[1:]).clone(), ctx)
            with dev.autocast(ctx.device, ctx.dtype):
                ctx.module(x).float().sum().backward()
            ctx.module.zero_grad(set_to_none=True)
            return bs
        except torch.OutOfMemoryError:
            ctx.module.zero_grad(set_to_none=True)
            bs //= 2
    return None
