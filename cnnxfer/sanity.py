"""Model-level checks behind `cnnxfer sanity-check`, each returning a CheckResult.

Every check takes a model and tensors and leaves the model's parameters, buffers, `.grad` and
train/eval flags as it found them: checks that must change the model (the float64 gradient check,
the learning-rate range test) work on a deep copy; the others restore the modes and buffers they
touch and take gradients with `torch.autograd.grad`, which never writes `.grad`. Checks also run
under a forked RNG so that calling them does not shift the caller's random stream.

The gradient check lives in gradcheck.py and the overfit check in overfit.py; it and the
learning-rate range test train through the engine's own training step, in the numerics training
runs with (engine.step_context); `run_checks` at the end wires every check to a data folder and a
model, and reports a check that raises as an ERROR naming the exception.
"""
from __future__ import annotations

import copy
import functools
import logging
import math
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .activations import Activations
from .check_result import ERROR, FAIL, PASS, SKIP, WARN, CheckResult, _model_device, _restored, _timed, _to_model
from .device import Runtime, autocast, dtype_name, training_dtype
from .errors import CnnxferError, TrainingError, UsageError
from .gradcheck import check_gradients
from .overfit import Budget, check_overfit, check_overfit_result
from .preprocess import Preprocess
from .session import Session, resolve_session

__all__ = [
    "CheckResult", "SanityReport", "check_cost", "check_data", "check_gradient_flow", "check_gradients", "check_init_loss",
    "check_modes", "check_overfit", "check_overfit_result", "lr_range_test", "run_checks",
]

log = logging.getLogger(__name__)

_VANISHING_RATIO = 1e-7
_EXPLODING_NORM = 1e3
_DEAD_FRACTION = 0.5
_DEAD_MIN_BATCH = 4  # with N samples a healthy ReLU unit is zero for all of them ~2**-N of the time


@_timed
def check_init_loss(model, x, y, num_classes) -> CheckResult:
    """Cross-entropy before training against ln(C), the loss of uniform predictions."""
    x, y = _to_model(model, x, y)
    with _restored(model), torch.no_grad():
        model.eval()  # no batch statistics, no dropout: the loss the model starts from
        logits = model(x).float()
    expected = math.log(num_classes) if num_classes > 1 else 0.0
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        return CheckResult("init_loss", FAIL,
                           f"model outputs shape {tuple(logits.shape)}, expected (N, {num_classes})",
                           hint="the classifier head does not match the number of classes; replace the head")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        return CheckResult("init_loss", FAIL,
                           f"labels span {int(y.min())}..{int(y.max())}, outside 0..{num_classes - 1}",
                           hint="labels and classes are out of step; check the class index mapping")
    loss = float(F.cross_entropy(logits, y))
    details = {"loss": loss, "expected": expected, "num_classes": num_classes,
               "logit_std": float(logits.std()) if logits.numel() > 1 else 0.0}
    summary = f"initial loss {loss:.3g}, ln({num_classes}) = {expected:.3g}"
    if not math.isfinite(loss):
        return CheckResult("init_loss", FAIL, summary, hint="non-finite logits at init: check weights and inputs",
                           details=details)
    if abs(loss - expected) <= 0.5 * max(expected, 0.1):
        return CheckResult("init_loss", PASS, summary, details=details)
    hint = ("logits are too large at init (confidently wrong): check the head's init scale, the input "
            "normalisation, and that labels match the logit order" if loss > expected else
            "loss is well below chance before training: the weights already fit these labels, or the "
            "labels leak into the inputs")
    return CheckResult("init_loss", WARN, summary, hint=hint, details=details)


# --------------------------------------------------------------------------- gradient flow


@_timed
def check_gradient_flow(model, x, y) -> CheckResult:
    """Per-layer gradient norms and dead-ReLU fractions from one train-mode forward/backward.

    Near-zero multiplicative parameters (the zero-initialised last BN of timm and torchvision
    residual blocks, NFNet's SkipInit gains, ConvNeXt's LayerScale) silence their branch at init
    by design. A layer that vanishes, or a ReLU that is dead, only while those gates are closed is
    reported as "gated at init" rather than warned about; that is found by running once more with
    the gates set to 1 (and then restored).
    """
    x, y = _to_model(model, x, y)
    owners = [(name or "<root>", p) for name, m in model.named_modules()
              for p in m.parameters(recurse=False) if p.requires_grad]
    if not owners:
        return CheckResult("gradient_flow", SKIP, "no trainable parameters")
    try:
        loss, layers, dead = _flow_pass(model, x, y, owners)
        gated = _gated_at_init(model, x, y, owners, layers, dead)
    except ValueError as exc:  # train-mode BatchNorm refuses a batch of one
        return CheckResult("gradient_flow", SKIP, f"train-mode forward failed: {exc}",
                           hint="use a batch of at least 2 images")
    return _judge_flow(layers, dead, gated, len(x), loss)


def _flow_pass(model, x, y, owners) -> tuple[float, list[dict], dict[str, float]]:
    """One train-mode forward/backward: loss, per-layer norms, dead fraction per ReLU."""
    counts: dict[str, list[int]] = {}
    relus = Activations(model, lambda name, m: _is_relu_like(m), keep=None,
                        on_output=functools.partial(_count_dead, counts))
    with relus, _restored(model, buffers=True):  # train-mode BatchNorm updates running stats
        model.train()
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, [p for _, p in owners], allow_unused=True)
    dead = {name: d / max(total, 1) for name, (d, total) in counts.items()}
    return loss.item(), _layer_norms(owners, grads), dead


def _gated_at_init(model, x, y, owners, layers, dead) -> set[str]:
    """Vanishing layers and dead ReLUs that recover once near-zero gates are opened."""
    gates = [p for n, p in model.named_parameters()
             if not n.endswith("bias") and p.numel() and float(p.detach().abs().max()) <= 1e-5]
    top = max((l["grad_norm"] for l in layers if l["grad_norm"] is not None and math.isfinite(l["grad_norm"])),
              default=0.0)
    suspects = {l["layer"] for l in layers if l["grad_norm"] is not None and l["grad_norm"] <= _VANISHING_RATIO * top}
    suspects |= {name for name, fraction in dead.items() if fraction > _DEAD_FRACTION}
    if not gates or not suspects:
        return set()
    saved = [p.detach().clone() for p in gates]
    try:
        with torch.no_grad():
            for p in gates:
                p.fill_(1.0)
        _, open_layers, open_dead = _flow_pass(model, x, y, owners)
    finally:
        with torch.no_grad():
            for p, value in zip(gates, saved):
                p.copy_(value)
    open_top = max((l["grad_norm"] for l in open_layers if l["grad_norm"] is not None), default=0.0)
    recovered = {l["layer"] for l in open_layers
                 if l["layer"] in suspects and (l["grad_norm"] or 0.0) > _VANISHING_RATIO * open_top}
    return recovered | {name for name, fraction in open_dead.items() if name in suspects and fraction <= _DEAD_FRACTION}


def _is_relu_like(module: nn.Module) -> bool:
    """Activations that output exact zeros for negative inputs (so units can die)."""
    name = type(module).__name__.lower()
    return name.endswith(("relu", "relu6")) and not name.endswith(("leakyrelu", "prelu", "rrelu"))


def _count_dead(store: dict, name: str, module, args, output):
    if torch.is_tensor(output) and output.ndim >= 2:
        dead = (output.detach() == 0).all(dim=0)  # zero for every sample in the batch
        counts = store.setdefault(name, [0, 0])  # shared modules (torchvision's relu) add up
        counts[0] += int(dead.sum())
        counts[1] += dead.numel()


def _layer_norms(owners, grads) -> list[dict]:
    by_layer: dict[str, dict] = {}
    for (name, param), grad in zip(owners, grads):
        entry = by_layer.setdefault(name, {"layer": name, "grad_sq": 0.0, "param_sq": 0.0, "used": False})
        entry["param_sq"] += float(param.detach().float().pow(2).sum())
        if grad is not None:
            entry["used"] = True
            entry["grad_sq"] += float(grad.float().pow(2).sum())
    return [{"layer": e["layer"], "grad_norm": math.sqrt(e["grad_sq"]) if e["used"] else None,
             "param_norm": math.sqrt(e["param_sq"]),
             "ratio": math.sqrt(e["grad_sq"] / e["param_sq"]) if e["used"] and e["param_sq"] > 0 else None}
            for e in by_layer.values()]


def _flow_status(norm: float | None, top: float, gated: bool) -> str:
    if norm is None:
        return "unused"  # no path from the loss: an auxiliary head, or a parameter never called
    if not math.isfinite(norm) or norm > _EXPLODING_NORM:
        return "exploding"
    if norm > _VANISHING_RATIO * top:
        return "ok"
    return "gated at init" if gated else "vanishing"


def _judge_flow(layers, dead, gated, batch, loss) -> CheckResult:
    top = max((l["grad_norm"] for l in layers if l["grad_norm"] is not None and math.isfinite(l["grad_norm"])),
              default=0.0)
    for layer in layers:
        layer["status"] = _flow_status(layer["grad_norm"], top, layer["layer"] in gated)
    activations = [{"activation": name, "dead_fraction": fraction, "gated_at_init": name in gated}
                   for name, fraction in dead.items()]
    vanishing = [l["layer"] for l in layers if l["status"] == "vanishing"]
    exploding = [l["layer"] for l in layers if l["status"] == "exploding"]
    judged = batch >= _DEAD_MIN_BATCH
    dying = [a for a in activations if judged and a["dead_fraction"] > _DEAD_FRACTION and not a["gated_at_init"]]
    details = {"layers": layers, "activations": activations, "loss": loss, "batch_size": batch,
               "dead_units_judged": judged}
    problems, hints = [], []
    if vanishing:
        problems.append(f"vanishing gradients in {len(vanishing)} layer(s): {', '.join(vanishing[:5])}")
        hints.append("look for an output multiplied by ~0, a detached tensor, or a saturated activation")
    if exploding:
        problems.append(f"exploding gradients in {len(exploding)} layer(s): {', '.join(exploding[:5])}")
        hints.append("check init scale and input normalisation; consider gradient clipping")
    if dying:
        worst = max(dying, key=lambda a: a["dead_fraction"])
        problems.append(f"dead ReLU units in {len(dying)} activation(s), worst {worst['dead_fraction']:.0%} "
                        f"({worst['activation']})")
        hints.append("a large negative bias or input shift before the ReLU; check init and normalisation")
    if problems:
        return CheckResult("gradient_flow", WARN, "; ".join(problems), hint="; ".join(hints), details=details)
    live = [a for a in activations if not a["gated_at_init"]]
    worst = max(live, key=lambda a: a["dead_fraction"], default=None)
    dead_text = f"; most dead ReLU units {worst['dead_fraction']:.0%} ({worst['activation']})" if worst else ""
    low = min((l["grad_norm"] for l in layers if l["status"] == "ok"), default=0.0)
    gated_text = f"; {len(gated)} gated at init" if gated else ""
    return CheckResult("gradient_flow", PASS, f"gradient norms {low:.2g}..{top:.2g} over {len(layers)} layers"
                       f"{gated_text}{dead_text}", details=details)


# --------------------------------------------------------------------------- cost


@_timed
def check_cost(model, x, y, device, dtype=None) -> CheckResult:
    """Parameters, FLOPs and activation memory per image, and measured time per batch.

    Args:
        device: where to time it (the model is copied there if it lives elsewhere).
        dtype: the autocast dtype training will use, or None for fp32.
    """
    try:
        return _measure_cost(model, x, y, torch.device(device), dtype)
    except Exception as exc:  # cost is information; a failure to measure must not stop the run
        log.debug("cost check failed", exc_info=True)
        return CheckResult("cost", WARN, f"could not measure cost: {exc}",
                           hint="the model may not run on this device or with this precision")


def _measure_cost(model, x, y, device, dtype) -> CheckResult:
    from torch.utils.flop_counter import FlopCounterMode

    if not _same_device(_model_device(model), device):
        model = copy.deepcopy(model).to(device)
    x, y = x.to(device), y.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with _restored(model, buffers=True):
        model.eval()
        with torch.no_grad():
            counter = FlopCounterMode(display=False)
            with counter:
                model(x)
            activation_bytes = _activation_bytes(model, x, device, dtype)
            forward_s = _median_time(lambda: model(x), device, dtype=dtype)
        model.train()
        # the loss is a plain mean so heads of any shape (feature maps too) can be timed
        backward_s = _median_time(lambda: torch.autograd.grad(model(x).float().mean(), trainable),
                                  device, dtype=dtype) if trainable else None
    n = len(x)
    details = {
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in trainable),
        "flops_per_image": counter.get_total_flops() / n,
        "activation_bytes_per_image": activation_bytes / n,
        "forward_s": forward_s, "forward_backward_s": backward_s, "batch_size": n,
        "device": str(device), "dtype": dtype_name(dtype),
    }
    summary = (f"{details['params_total'] / 1e6:.3g}M params "
               f"({details['params_trainable'] / 1e6:.3g}M trainable), "
               f"{details['flops_per_image'] / 1e9:.3g} GFLOPs/image, "
               f"{details['activation_bytes_per_image'] / 2**20:.3g} MiB activations/image, "
               f"forward {forward_s * 1e3:.3g} ms"
               + (f", forward+backward {backward_s * 1e3:.3g} ms" if backward_s is not None else "")
               + f" per batch of {n} on {device}")
    return CheckResult("cost", PASS, summary, details=details)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _activation_bytes(model, x, device, dtype) -> int:
    """Bytes of all leaf-module outputs in one forward: what training keeps for the backward."""
    total = [0]

    def add(name, module, args, output):
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if torch.is_tensor(t):
                total[0] += t.numel() * t.element_size()

    leaves = Activations(model, lambda name, m: not list(m.children()), keep=None, on_output=add)
    with leaves, autocast(device, dtype):
        model(x)
    return total[0]


def _median_time(fn, device, dtype=None, repeats=3) -> float:
    """Median seconds of `fn` after one warm-up call (cuDNN autotuning, lazy allocation)."""

    def run():
        with autocast(device, dtype):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------- train/eval modes


@_timed
def check_modes(model, x) -> CheckResult:
    """Eval forwards must be finite and deterministic; BatchNorm running stats must be usable."""
    x = _to_model(model, x)
    with _restored(model, buffers=True), torch.no_grad():
        model.eval()
        first, second = model(x).float(), model(x).float()
        try:  # a batch of one cannot run train-mode BatchNorm; the difference is information only
            model.train()
            train_out = model(x).float()
        except Exception as exc:
            log.debug("train-mode forward failed: %s", exc)
            train_out = None
    scale = float(first.abs().max().clamp_min(1e-12))
    eval_diff = float((first - second).abs().max()) / scale
    train_diff = float((first - train_out).abs().max()) / scale if train_out is not None else None
    bn = _batchnorm_report(model)
    details = {"eval_relative_difference": eval_diff, "train_eval_relative_difference": train_diff, **bn}
    summary = (f"eval outputs differ by {eval_diff:.2g} (relative) between two forwards; "
               f"{bn['batchnorm_layers']} BatchNorm layers, {bn['batchnorm_default_stats']} at default stats")
    problems = [f"{what} in {', '.join(bn[key][:5])}" for key, what in (
        ("batchnorm_nonfinite", "non-finite running stats"), ("batchnorm_negative_var", "negative running_var"))
        if bn[key]]
    if not torch.isfinite(first).all():
        return CheckResult("modes", FAIL, "; ".join(["eval outputs are non-finite", *problems]), details=details,
                           hint="reload the weights; check BatchNorm running stats and the input normalisation")
    if eval_diff > 1e-3:
        return CheckResult("modes", FAIL, summary, details=details,
                           hint="the model is random in eval mode: dropout or noise applied regardless of "
                                "self.training (use nn.Dropout or F.dropout(training=self.training))")
    if eval_diff > 1e-6:
        problems.append(f"eval outputs differ by {eval_diff:.2g} between identical forwards")
    if problems:
        return CheckResult("modes", WARN, "; ".join(problems), details=details,
                           hint="reload the weights; small eval differences can also come from "
                                "non-deterministic GPU kernels")
    return CheckResult("modes", PASS, summary, details=details)


def _batchnorm_report(model: nn.Module) -> dict:
    nonfinite, negative, default, total = [], [], 0, 0
    for name, module in model.named_modules():
        mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
        if not isinstance(module, nn.modules.batchnorm._NormBase) or mean is None or var is None:
            continue  # LayerNorm/GroupNorm, or BatchNorm with track_running_stats=False
        total += 1
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            nonfinite.append(name)
        elif (var < 0).any():
            negative.append(name)
        # never updated: fine from scratch, a sign of unloaded weights in a "pretrained" model
        default += bool((mean == 0).all() and (var == 1).all())
    return {"batchnorm_layers": total, "batchnorm_default_stats": default,
            "batchnorm_nonfinite": nonfinite, "batchnorm_negative_var": negative}


# --------------------------------------------------------------------------- learning rate


@_timed
def lr_range_test(model, x, y, *, lr_min=1e-6, lr_max=10.0, steps=60, configured_lr=None,
                  optimizer="sgd", session: Session | None = None, precision: str = "auto") -> CheckResult:
    """Leslie Smith's range test on a copy: raise the lr exponentially, watch the loss.

    Each step is the engine's training step (engine.train_step) as training runs it on `session`
    (engine.step_context: the training dtype for `precision`, channels_last; without a session,
    fp32 on the model's device). Stops when the smoothed loss exceeds 4x its minimum or turns
    non-finite. The suggestion is the lr of the minimum smoothed loss divided by 10 (fastai's
    rule); `configured_lr` draws a WARN when it is at or past the lr where the loss blew up, or
    past the minimum, where the loss has stopped falling (the upper end of a usable range in
    Smith's paper).

    Args:
        optimizer: "sgd" (momentum 0.9) or "adamw".
        precision: --precision as given (auto trains some models in fp32 on a CPU: device.training_dtype).
    """
    from . import engine

    work = copy.deepcopy(model).train()
    session = session or Session(Runtime(_model_device(work), None, False, 0, 0, False))
    work = session.place(work)
    params = [p for p in work.parameters() if p.requires_grad]
    if not params:
        return CheckResult("lr_find", SKIP, "no trainable parameters")
    if optimizer.lower() == "sgd":
        opt = torch.optim.SGD(params, lr=lr_min, momentum=0.9)
    elif optimizer.lower() == "adamw":
        opt = torch.optim.AdamW(params, lr=lr_min)
    else:
        raise UsageError(f"unknown optimizer '{optimizer}'; use sgd or adamw")
    growth = lr_max / lr_min  # the lr of step k: lr_min * growth ** (k / (steps - 1))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: growth ** (k / max(steps - 1, 1)))
    ctx = engine.step_context(work, opt, schedule, nn.CrossEntropyLoss(), session, precision)
    try:
        lrs, losses, smoothed, diverged_at = _sweep_lr(ctx, x, y, steps)
    except ValueError as exc:  # train-mode BatchNorm refuses a batch of one
        return CheckResult("lr_find", SKIP, f"train-mode forward failed: {exc}",
                           hint="use a batch of at least 2 images")
    return _judge_lr(lrs, losses, smoothed, diverged_at, configured_lr, optimizer.lower())


def _sweep_lr(ctx, x, y, steps):
    """`steps` training steps on (x, y) along ctx's schedule; (lrs, losses, smoothed losses, the lr
    where the loss blew up or None)."""
    from .engine import train_step

    lrs, losses, smoothed, diverged_at = [], [], [], None
    average, best = 0.0, math.inf
    for step in range(steps):
        lr = ctx.optimizer.param_groups[0]["lr"]
        try:
            value, _ = train_step(ctx, x, y)
        except TrainingError:  # a non-finite loss (train_step stops before the update)
            diverged_at = lr
            break
        # light smoothing: the batch is the same each step, so the noise is small but BN-driven
        average = 0.7 * average + 0.3 * value
        smooth = average / (1 - 0.7 ** (step + 1))
        lrs.append(lr)
        losses.append(value)
        smoothed.append(smooth)
        if smooth > 4 * best:
            diverged_at = lr
            break
        best = min(best, smooth)
    return lrs, losses, smoothed, diverged_at


def _judge_lr(lrs, losses, smoothed, diverged_at, configured_lr, optimizer) -> CheckResult:
    if not smoothed:
        return CheckResult("lr_find", FAIL, f"loss is non-finite at the first step (lr {diverged_at:.2g})",
                           hint="the model produces non-finite loss before any update: check inputs and init")
    best = min(range(len(smoothed)), key=smoothed.__getitem__)
    suggested = lrs[best] / 10
    descent = [(smoothed[i + 1] - smoothed[i]) / math.log(lrs[i + 1] / lrs[i]) for i in range(best)]
    steepest = lrs[min(range(len(descent)), key=descent.__getitem__)] if descent else None
    details = {"lrs": lrs, "losses": losses, "smoothed_losses": smoothed, "suggested_lr": suggested,
               "min_loss_lr": lrs[best], "steepest_lr": steepest, "diverged_at": diverged_at,
               "configured_lr": configured_lr, "optimizer": optimizer}
    blew = f"loss blew up at {diverged_at:.2g}" if diverged_at else f"no blow-up up to {lrs[-1]:.2g}"
    summary = f"suggested lr ~{suggested:.2g} (min loss at {lrs[best]:.2g}, {blew})"
    if smoothed[best] > 0.98 * smoothed[0]:
        return CheckResult("lr_find", WARN, f"loss never fell over lr {lrs[0]:.2g}..{lrs[-1]:.2g}",
                           hint="check that parameters are trainable and labels match inputs, or widen the range",
                           details=details)
    if configured_lr is not None and diverged_at is not None and configured_lr >= diverged_at:
        return CheckResult("lr_find", WARN, f"configured lr {configured_lr:.2g} diverges ({blew}); "
                           f"try ~{suggested:.2g}", hint="lower the learning rate", details=details)
    if configured_lr is not None and configured_lr > lrs[best]:
        return CheckResult("lr_find", WARN, f"configured lr {configured_lr:.2g} is past the point where the "
                           f"loss stops falling ({lrs[best]:.2g}); try ~{suggested:.2g}",
                           hint="lower the learning rate", details=details)
    return CheckResult("lr_find", PASS, summary, details=details)


# ---------------------------------------------------------------- running the checks on a setup

@dataclass
class SanityReport:
    """Every check's result plus what was checked; `failed` drives the exit code."""

    checks: list[CheckResult]
    model: str
    weights: str
    device: str
    precision: str
    data: str
    classes: list[str]
    skipped_file: str | None = None
    lr_plot: str | None = None
    warnings: list[str] = field(default_factory=list)  # about the data as scanned (empty class folders...)

    @property
    def failed(self) -> bool:
        return any(c.status in (FAIL, ERROR) for c in self.checks)

    def to_dict(self) -> dict:
        counts = {s: sum(c.status == s for c in self.checks) for s in (PASS, WARN, FAIL, SKIP, ERROR)}
        return {"passed": not self.failed, "counts": counts, "model": self.model, "weights": self.weights,
                "device": self.device, "precision": self.precision, "data": self.data, "classes": self.classes,
                "skipped_file": self.skipped_file, "lr_plot": self.lr_plot, "warnings": self.warnings,
                "checks": [c.to_dict() for c in self.checks]}


def run_checks(config, progress=None) -> SanityReport:
    """Run the selected checks on `config.data` with `config.model`; never raises for a failed
    check (it is a FAIL result), only for unusable input (bad folder, unknown model...)."""
    from . import data as data_mod, models, recipe
    from .config import SANITY_CHECKS
    from .errors import UsageError

    selected = list(config.only) if config.only else [c for c in SANITY_CHECKS if c != "lr_find" or config.lr_find]
    if config.lr_find and "lr_find" not in selected:
        selected.append("lr_find")
    unknown = [c for c in selected if c not in SANITY_CHECKS]
    if unknown:
        raise UsageError(f"unknown check(s) {', '.join(unknown)} for --only; choose from {', '.join(SANITY_CHECKS)}")
    session = resolve_session(config.device, config.precision, config.num_workers)
    train_cfg = _as_train_config(config)
    models.check_model_options(config.model, config.weights)  # before the data scan: a bad option is named first
    train_images, val_images = recipe.split_data(train_cfg.data, train_cfg.val_split, train_cfg.seed)
    classes = train_images.classes
    img_size = recipe.working_img_size(config.img_size, config.weights, train_images)
    torch.manual_seed(config.seed)
    loaded = models.load_model(config.model, config.weights, len(classes), img_size=img_size, classes=classes)
    model = session.place(loaded.model)
    out_dir = Path(config.out_dir or (Path(config.json_path).parent if config.json_path else Path(".")))
    report = SanityReport([], loaded.arch, loaded.weights, str(session.device), session.precision,
                          str(config.data), classes, warnings=list(train_images.warnings))
    preprocess = Preprocess.from_data_config(loaded.data_config, max_pixels=config.max_image_pixels)
    results, batch = {}, None
    if "data" in selected:
        results["data"], skipped = check_data(train_images, val_images, preprocess, session.runtime.decode_threads)
        report.skipped_file = str(data_mod.write_skipped(out_dir / "sanity.skipped.csv", skipped)) if skipped else None
    needs_batch = [c for c in selected if c != "data"]
    if needs_batch:
        batch = _overfit_batch(train_images, preprocess, config)
    x, y = (batch if batch else (None, None))
    for name in needs_batch:
        if progress:
            progress(name)
        results[name] = _run_guarded(name, model, x, y, classes, config, session, train_cfg, out_dir, report)
    report.checks = [results[c] for c in selected if c in results]
    if config.json_path:
        from .checkpoint import atomic_write_json

        atomic_write_json(Path(config.json_path), report.to_dict())
    return report


def _as_train_config(config):
    from .config import TrainConfig

    return TrainConfig(data=Path(config.data), out=Path("."), model=config.model, weights=config.weights,
                       val_split=config.val_split, seed=config.seed, lr=config.lr, optimizer=config.optimizer,
                       batch_size=config.batch_size, device=config.device, precision=config.precision)


def _run_guarded(name, *args) -> CheckResult:
    """Run one check; one that raises is reported as an ERROR naming the exception and where it
    was raised (a crash is not a finding about the setup: it is not a FAIL). Errors in the user's
    input or options (CnnxferError) still end the command with their own message and exit code."""
    start = time.perf_counter()
    try:
        return _run_one(name, *args)
    except CnnxferError:
        raise
    except Exception as exc:
        log.debug("check %s raised", name, exc_info=True)
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
        message = (str(exc).splitlines() or [""])[0][:300]
        return CheckResult(name, ERROR, f"the check raised {type(exc).__name__}: {message} ({where})",
                           hint="the check could not run: fix the error (a bug in the model, or a setup it cannot "
                                "run) and re-run", details={"exception": type(exc).__name__, "message": str(exc),
                                                           "where": where},
                           seconds=time.perf_counter() - start)


def _run_one(name, model, x, y, classes, config, session: Session, train_cfg, out_dir, report) -> CheckResult:
    from . import overfit, recipe

    device = session.device
    if name == "overfit":
        budget = Budget(config.overfit_steps, config.overfit_seconds, config.overfit_loss)
        return check_overfit(model, overfit.repeat(x, y), session, precision=config.precision, lr=config.lr,
                             budget=budget)
    if name == "gradcheck":
        small = torch.nn.functional.interpolate(x[:2], size=(config.gradcheck_size,) * 2, mode="bilinear", align_corners=False)
        return check_gradients(model, small, y[:2])
    if name == "init_loss":
        return check_init_loss(model, x.to(device), y.to(device), len(classes))
    if name == "gradient_flow":
        return check_gradient_flow(model, x.to(device), y.to(device))
    if name == "modes":
        return check_modes(model, x.to(device))
    if name == "cost":
        # timed in the dtype training steps take (device.training_dtype), as its docstring promises
        dtype = training_dtype(session.runtime, model, config.precision)
        return check_cost(model, x.to(device), y.to(device), device, dtype)
    hp = recipe.resolve_hparams(train_cfg)
    # sweep past the configured rate, so that a rate that diverges can be seen diverging
    result = lr_range_test(model, x.to(device), y.to(device), lr_max=max(10.0, 10 * hp["lr"]), configured_lr=hp["lr"],
                           optimizer=hp["optimizer"], session=session, precision=config.precision)
    report.lr_plot = str(out_dir / "lr_find.png")
    result.details["plot"] = report.lr_plot
    return result


def _overfit_batch(images, preprocess: Preprocess, config) -> tuple[torch.Tensor, torch.Tensor]:
    """`config.batch_size` readable images drawn round-robin across classes, un-augmented."""
    rng = np.random.default_rng(config.seed)
    by_class = [rng.permutation([i for i, l in enumerate(images.labels) if l == c]).tolist() for c in range(len(images.classes))]
    xs, ys = [], []
    while len(xs) < config.batch_size and any(by_class):
        for queue in by_class:
            if queue and len(xs) < config.batch_size:
                i = queue.pop(0)
                try:
                    xs.append(preprocess(images.paths[i]))
                    ys.append(images.labels[i])
                except Exception:
                    continue  # unreadable files are the data check's business
    if not xs:
        from .errors import DataError

        raise DataError(f"{config.data}: no readable image for the checks")
    return preprocess.normalizer()(torch.stack(xs)), torch.tensor(ys, dtype=torch.long)


def check_data(train, val, preprocess: Preprocess, threads: int = 0) -> tuple[CheckResult, list[tuple[str, str]]]:
    """Class counts and imbalance, unreadable files, exact duplicates across train and val
    (content hash), and the spread of image sizes against the model's input size (images read as
    `preprocess` reads them)."""
    start = time.perf_counter()
    probes = _probe_images(train, preprocess, threads) + _probe_images(val, preprocess, threads)
    n_train = len(train)
    skipped = [(str(p), r) for p, r, *_ in probes if r]
    counts = train.class_counts()
    readable = {c: 0 for c in train.classes}
    for (path, reason, *_), label in zip(probes[:n_train], train.labels):
        readable[train.classes[label]] += reason is None
    # the scan's warnings: empty class folders (left out of the classes), classes too small to validate
    problems, fails = list(train.warnings), [c for c, n in readable.items() if counts[c] and n == 0]
    nonzero = [n for n in counts.values() if n]
    ratio = max(nonzero) / max(1, min(nonzero)) if nonzero else 0.0
    if ratio >= 10:
        problems.append(f"class imbalance {ratio:.0f}:1 (train with --balance loss or --balance sampler)")
    if skipped:
        problems.append(f"{len(skipped)} unreadable file(s)")
    dupes = _cross_duplicates(probes[:n_train], probes[n_train:])
    if dupes:
        problems.append(f"{len(dupes)} validation image(s) are exact copies of training images (leakage)")
    sizes = np.array([s for *_, s, _ in probes if s is not None]) if any(p[2] for p in probes) else np.zeros((0, 2))
    side = int(preprocess.input_size[-1])
    details = {"classes": counts, "train_images": n_train, "val_images": len(val), "imbalance_ratio": round(ratio, 2),
               "unreadable": len(skipped), "duplicates_train_val": [[a, b] for a, b in dupes[:20]],
               "model_input": side}
    if len(sizes):
        details["width"] = _spread(sizes[:, 0])
        details["height"] = _spread(sizes[:, 1])
        if np.median(sizes.max(1)) * 4 < side:
            problems.append(f"images (median {int(np.median(sizes.max(1)))} px) are upscaled more than 4x to {side} px; try --img-size")
    status = "FAIL" if fails else ("WARN" if problems else "PASS")
    summary = (f"every image of {', '.join(fails)} is unreadable" if fails else
               f"{n_train} train / {len(val)} val images in {len(counts)} classes" + (f"; {'; '.join(problems)}" if problems else ""))
    hint = "see the skipped list; fix or remove the files, then re-run" if (fails or skipped) else (
        "check the folders behind the warnings" if problems else "")
    return CheckResult("data", status, summary, hint, details, time.perf_counter() - start), skipped


def _spread(values: np.ndarray) -> dict:
    return {"min": int(values.min()), "median": int(np.median(values)), "max": int(values.max())}


class _ProbeDataset:
    """(path, reason or None, displayed (width, height) or None, sha1 of the bytes) per image."""

    def __init__(self, images, preprocess):
        self.images, self.preprocess = images, preprocess

    def __len__(self):
        return len(self.images)

    def item(self, i, seed=None):
        import hashlib

        from . import data as data_mod

        path = self.images.paths[i]
        try:
            digest = hashlib.sha1(Path(path).read_bytes()).hexdigest()
            _, size = self.preprocess.decode(path)  # a full decode at the working resolution: truncation shows
            return str(path), None, size, digest
        except Exception as exc:
            return str(path), data_mod.describe_failure(path, exc), None, None


def _probe_images(images, preprocess: Preprocess, threads: int) -> list[tuple]:
    from . import loader as loaders

    if not len(images):
        return []
    loader = loaders.Loader(_ProbeDataset(images, preprocess), 32, threads=threads, collate_fn=list)
    return [item for batch in loader for item in batch]


def _cross_duplicates(train_probes, val_probes) -> list[tuple[str, str]]:
    seen = {digest: path for path, _, _, digest in train_probes if digest}
    return [(seen[d], path) for path, _, _, d in val_probes if d and d in seen]
