"""The numerical gradient check: autograd against central finite differences in float64.

Robust on correct models (ReLU kinks and max-pool ties are recognised from one-sided slopes;
the round-off floor is measured), and on a wrong backward it localises the module whose output
gradient is right but input gradient wrong, so the report names the layer.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


from .activations import Activations
from .check_result import FAIL, PASS, SKIP, CheckResult, _timed

log = logging.getLogger(__name__)

# Gradient check budget: float64 forwards on CPU; two samples keep the loss per-sample and cheap.
_GRAD_SAMPLES = 2
_GRAD_MAX_SIDE = 64
_GRAD_INPUT_ELEMENTS = 8
_GRAD_ACTIVATION_ELEMENTS = 4
_FD_MAX_EVALS = 800  # per phase (parameters, then module localisation on failure)
_FD_TIME_BUDGET_S = 10.0
_FD_MIN_EVALS = 100
_ZERO_JITTER = 0.1

# --------------------------------------------------------------------------- gradient check


@_timed
def check_gradients(model, x, y, *, params_per_layer=4, eps=1e-6, tol=1e-4, seed=0) -> CheckResult:
    """Compare autograd gradients with central finite differences in float64.

    Samples input elements and `params_per_layer` elements of every parameter tensor, on a float64
    CPU copy in eval mode (BatchNorm uses running stats, dropout is off, so the loss is a
    deterministic per-sample function). Elements sitting on a kink (ReLU, max-pool tie) are set
    aside instead of reported. When parameters disagree, module inputs and outputs are probed as
    well, to name the module whose backward is wrong: its output gradient is right and its input
    gradient is not.

    The copy's exactly-zero parameters are moved slightly off zero (see `_float64_setup`), the
    input is cut to 2 samples of at most 64 px, finite differences are capped at ~10 s per
    phase, and torch runs on one thread meanwhile. Returns PASS, FAIL (naming the layers and,
    where found, the faulty module), or SKIP when the model cannot be checked this way.
    """
    try:
        work, xs, ys = _float64_setup(model, x, y, seed)
        loss_fn = functools.partial(_sum_ce, work, xs, ys)
        f0 = loss_fn()
        if loss_fn() != f0 or not math.isfinite(f0):
            return CheckResult("gradcheck", SKIP, "the float64 eval-mode loss is not deterministic and finite",
                               hint="gradient checking needs a deterministic forward; see the modes check")
    except Exception as exc:  # custom ops without float64/CPU kernels cannot be checked this way
        return CheckResult("gradcheck", SKIP, f"model does not run in float64 on CPU: {exc}")
    gen = torch.Generator().manual_seed(seed)
    with _single_thread():
        groups, floor, evals = _check_leaves(work, xs, ys, f0, params_per_layer, eps, tol, gen)
        bad = [g["layer"] for g in groups if g["bad_tensors"]]
        details = {"layers": groups, "input_shape": list(xs.shape), "eps": eps, "tol": tol, "floor": floor}
        if bad:
            culprits, modules, more = _localise(work, xs, ys, bad, eps, tol, floor, gen)
            details.update(bad_layers=bad, culprits=culprits, modules=modules)
            evals += more
    details["fd_evals"] = evals
    checked = [g for g in groups if g["checked"]]
    if bad:
        summary = _gradcheck_failure(details["culprits"], bad, groups)
        return CheckResult("gradcheck", FAIL, summary, details=details,
                           hint="a custom autograd.Function or backward hook computes a wrong gradient; "
                                "compare its backward with the derivative of its forward")
    if not checked:
        return CheckResult("gradcheck", SKIP, "no informative gradient element (all zero or at kinks)",
                           details=details)
    worst = max(checked, key=lambda g: g["worst_rel_error"])
    return CheckResult("gradcheck", PASS, f"worst relative error {worst['worst_rel_error']:.2g} "
                       f"({worst['layer']}) over {len(checked)} layers", details=details)


@contextlib.contextmanager
def _single_thread():
    """Run the finite differences on one thread: batch-2 float64 forwards are all per-op
    overhead, and on a busy 2-core machine OpenMP threads waiting at barriers made
    test_resnet's check 8x slower (40 s against 5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_leaves(work, xs, ys, f0, per_tensor, eps, tol, gen) -> tuple[list[dict], float, int]:
    """Phase one: input and parameter elements. Returns per-layer rows, the floor, forwards used."""
    loss_fn = functools.partial(_sum_ce, work, xs, ys)
    budget = _FdBudget(loss_fn)
    raw = _compare(_leaf_targets(work, xs, ys, per_tensor, gen), loss_fn, budget, eps)
    floor = _noise_floor(raw, f0, eps, tol)
    return _summarise(_judge(raw, f0, eps, tol, floor, loss_fn, budget)), floor, budget.evals


def _float64_setup(model, x, y, seed):
    """A float64 CPU eval-mode copy (no in-place activations) and a small input slice."""
    work = copy.deepcopy(model).cpu().double().eval()
    for module in work.modules():
        # in-place activations would overwrite the tensors the probes and hooks look at
        if getattr(module, "inplace", None) is True:
            module.inplace = False
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in work.parameters():
            param.requires_grad_(True)
            # Exact zeros (timm's zero_init_last BN weights, zero biases) leave residual branches
            # without gradient and put the next ReLU's inputs exactly on its kink, where central
            # differences cannot judge. Any point tests a backward equally, so move the copy off them.
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype) * _ZERO_JITTER
            param.add_(noise * (param == 0))
    xs = x[:_GRAD_SAMPLES].detach().cpu().double()
    ys = y[:_GRAD_SAMPLES].detach().cpu().long()
    height, width = xs.shape[-2:]
    if max(height, width) > _GRAD_MAX_SIDE:
        scale = _GRAD_MAX_SIDE / max(height, width)
        small = F.interpolate(xs, size=(max(1, round(height * scale)), max(1, round(width * scale))),
                              mode="bilinear", align_corners=False)
        try:  # models with a fixed input size (some ViTs) refuse the smaller image; keep the full one
            with torch.no_grad():
                work(small)
            xs = small
        except Exception:
            log.debug("gradcheck: model rejects %s input, keeping %s", tuple(small.shape), tuple(xs.shape))
    return work, xs, ys


def _sum_ce(model, x, y, probes=None) -> float:
    if probes is not None:
        probes.reset()
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y, reduction="sum"))


class _FdBudget:
    """Caps finite-difference forwards by count and by wall time (large models are slow in float64)."""

    def __init__(self, loss_fn):
        timings = []
        for _ in range(3):  # the fastest of three: one forward can stall on a busy machine
            start = time.perf_counter()
            loss_fn()
            timings.append(time.perf_counter() - start)
        per_eval = max(min(timings), 1e-6)
        self.limit = int(min(_FD_MAX_EVALS, max(_FD_MIN_EVALS, _FD_TIME_BUDGET_S / per_eval)))
        self.evals = 0

    def take(self) -> bool:
        if self.evals + 2 > self.limit:
            return False
        self.evals += 2
        return True


def _sample(numel: int, k: int, gen: torch.Generator) -> list[int]:
    if numel <= 100_000:  # without replacement where cheap: tiny bias vectors would repeat indices
        return torch.randperm(numel, generator=gen)[:k].tolist()
    return torch.randint(numel, (k,), generator=gen).tolist()


def _sample_activation(grad: torch.Tensor, k: int, gen: torch.Generator) -> list[tuple]:
    """Mostly elements with a non-zero gradient: after ReLU and max-pool most activations carry
    none and would say nothing; one uniform pick still catches a backward that zeroes too much."""
    nonzero = torch.nonzero(grad.reshape(-1)).reshape(-1)
    flats = nonzero[torch.randperm(len(nonzero), generator=gen)[: k - 1]].tolist()
    flats += _sample(grad.numel(), k - len(flats), gen)
    return [tuple(int(i) for i in torch.unravel_index(torch.tensor(f), grad.shape)) for f in flats]


def _interleave(per_tensor: list[list[tuple]]) -> list[tuple]:
    """Round-robin order, so a truncated budget still covers every tensor once before any twice."""
    longest = max((len(t) for t in per_tensor), default=0)
    return [t[i] for i in range(longest) for t in per_tensor if i < len(t)]


def _leaf_targets(model, x, y, per_tensor, gen):
    """(layer, tensor key, tensor, index, autograd value) for sampled input and parameter elements."""
    x.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    groups = [("<input>", "<input>", x, _GRAD_INPUT_ELEMENTS)]
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            if param.grad is not None:
                groups.append((mod_name or "<root>", f"{mod_name}.{p_name}".lstrip("."), param, per_tensor))
    per_tensor_targets = []
    for layer, key, tensor, k in groups:
        picks = []
        for flat in _sample(tensor.numel(), k, gen):
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tensor.shape))
            picks.append((layer, key, tensor, index, float(tensor.grad[index])))
        per_tensor_targets.append(picks)
    return _interleave(per_tensor_targets)


def _nudge(tensor, index, step, loss_fn) -> tuple[float, float]:
    """The loss with one element moved by +step and by -step (then put back exactly)."""
    with torch.no_grad():
        orig = float(tensor[index])
        tensor[index] = orig + step
        f_plus = loss_fn()
        tensor[index] = orig - step
        f_minus = loss_fn()
        tensor[index] = orig
    return f_plus, f_minus


def _compare(targets, loss_fn, budget, eps) -> list[tuple]:
    """Nudge each target by +-eps; return the targets extended with f(+eps), f(-eps)."""
    rows = []
    for target in targets:
        if not budget.take():
            log.debug("gradcheck: finite-difference budget of %d forwards reached", budget.limit)
            break
        rows.append((*target, *_nudge(target[2], target[3], eps, loss_fn)))
    return rows


def _noise_floor(raw, f0, eps, tol) -> float:
    """The gradient size below which finite differences cannot resolve `tol`, from the round-off
    seen in `raw`; below it gradients are compared in absolute terms. Measured, not assumed:
    attention models carry ~1000x the round-off of a small CNN."""
    asymmetry = [abs(fp - 2 * f0 + fm) / eps for *_, fp, fm in raw if fp != f0 or fm != f0]
    ulp_noise = max(abs(f0), 1.0) * torch.finfo(torch.float64).eps / eps
    # the median asymmetry is ~1.6x the round-off std of one central difference (plus curvature);
    # ten times it is far above noise yet far below the miss of a wrong backward
    return max(10 * statistics.median(asymmetry) if asymmetry else 0.0, 30 * ulp_noise) / tol


def _judge(raw, f0, eps, tol, floor, loss_fn, budget) -> list[tuple]:
    """(layer, key, rel_error, verdict) rows. Round-off varies between tensors (ViT's pos_embed
    carries more than the rest), so an element judged bad is measured again with a 10x step,
    where round-off is ten times smaller and a wrong backward misses just the same."""
    rows = []
    for layer, key, tensor, index, grad, f_plus, f_minus in raw:
        rel, verdict = _verdict(grad, f_plus, f_minus, f0, eps, tol, floor)
        if verdict == "bad":  # a wrong backward misses at every step; round-off shrinks tenfold
            f_plus, f_minus = _nudge(tensor, index, 10 * eps, loss_fn)
            budget.evals += 2
            rel, verdict = _verdict(grad, f_plus, f_minus, f0, 10 * eps, tol, floor)
        rows.append((layer, key, rel, verdict))
    return rows


def _verdict(grad, f_plus, f_minus, f0, eps, tol, floor) -> tuple[float, str]:
    """Classify one element as ok, tiny (both ~0), nonsmooth (a kink within eps) or bad."""
    numeric = (f_plus - f_minus) / (2 * eps)
    # forward minus backward one-sided slope: ~eps*f'' where smooth, the slope jump at a kink
    asymmetry = abs(f_plus - 2 * f0 + f_minus) / eps
    err = abs(grad - numeric)
    scale = max(abs(grad) + abs(numeric), floor)
    rel = err / scale
    # one kink inside [-eps, eps] makes the central difference miss by half the slope jump, so
    # only a miss well beyond the asymmetry indicts autograd rather than the finite difference
    if rel > tol and err > 2 * asymmetry:
        return rel, "bad"
    if asymmetry > tol * scale:  # the finite difference itself is unreliable here: set it aside
        return rel, "nonsmooth"
    return rel, "ok" if abs(grad) + abs(numeric) >= floor else "tiny"


def _summarise(rows) -> list[dict]:
    """Per layer: worst relative error over usable elements and the tensors judged wrong.

    A tensor is wrong when at least half of its informative elements are bad: a wrong backward
    shows in every element, a rare kink pair that escapes the asymmetry test in one.
    """
    layers: dict[str, dict] = {}
    tensors: dict[tuple, list[str]] = {}
    for layer, key, rel, verdict in rows:
        entry = layers.setdefault(layer, {"layer": layer, "worst_rel_error": 0.0, "checked": 0,
                                          "nonsmooth": 0, "bad": 0, "bad_tensors": []})
        entry["nonsmooth"] += verdict == "nonsmooth"
        entry["bad"] += verdict == "bad"
        if verdict != "nonsmooth":
            entry["checked"] += 1
            entry["worst_rel_error"] = max(entry["worst_rel_error"], rel)
        tensors.setdefault((layer, key), []).append(verdict)
    for (layer, key), verdicts in tensors.items():
        bad = verdicts.count("bad")
        if bad and bad * 2 >= bad + verdicts.count("ok"):
            layers[layer]["bad_tensors"].append(key)
    return list(layers.values())


class _ActivationProbes:
    """Zero leaf tensors added to each module's first input and its output (activations.Activations).

    dL/dprobe is the gradient with respect to that activation, and nudging one probe element
    perturbs exactly that activation, so both can be checked with finite differences. A separate
    zero leaf (rather than the activation itself) survives later in-place ops like `x += shortcut`.
    """

    def __init__(self, model: nn.Module):
        self.probes: dict[tuple, torch.Tensor] = {}
        self.hooks = Activations(model, lambda name, module: True, keep=None, on_input=self._pre, on_output=self._post)

    @property
    def order(self) -> list[str]:
        return self.hooks.order

    def reset(self):
        self.hooks.clear()

    def remove(self):
        self.hooks.close()

    def _add(self, key, value):
        if not (torch.is_tensor(value) and value.is_floating_point()):
            return value
        probe = self.probes.get(key)
        if probe is None or probe.shape != value.shape:
            probe = self.probes[key] = torch.zeros_like(value, requires_grad=True)
        return value + probe

    def _pre(self, name, module, args):
        if not args:
            return None
        return (self._add((name, "in", self.hooks.calls.get(name, 0)), args[0]), *args[1:])

    def _post(self, name, module, args, output):
        return self._add((name, "out", self.hooks.calls[name] - 1), output)


def _side_status(verdicts: list[str]) -> str:
    """bad (wrong in at least half the informative elements), ok, tiny (right within round-off,
    all near zero) or unknown (only kinks, or nothing measured)."""
    bad, ok = verdicts.count("bad"), verdicts.count("ok")
    if bad and bad * 2 >= bad + ok:
        return "bad"
    return "ok" if ok else "tiny" if "tiny" in verdicts else "unknown"


def _is_inside(child: str, parent: str) -> bool:
    return child != parent and (parent == "<root>" or child.startswith(parent + "."))


def _localise(model, x, y, suspects, eps, tol, floor, gen) -> tuple[list[str], list[dict], int]:
    """Find modules whose output gradient is right but whose input gradient is wrong.

    `suspects` are the modules whose parameter gradients were wrong; the faulty backward sits
    just downstream of them, so modules are probed nearest-first from the last one executed,
    stopping at the first leaf culprit. Returns (culprits, per-module table, forwards used).
    Only the deepest culprits are named: a block containing the faulty module looks the same.
    """
    probes = _ActivationProbes(model)
    rows = []
    try:
        ranked = _probe_targets(model, x.detach(), y, probes, suspects, gen)
        loss_fn = functools.partial(_sum_ce, model, x.detach(), y, probes)
        budget, f0 = _FdBudget(loss_fn), loss_fn()
        for name, targets in ranked:
            rows += _judge(_compare(targets, loss_fn, budget, eps), f0, eps, tol, floor, loss_fn, budget)
            leaf = not any(_is_inside(other, name) for other, _ in ranked)
            if budget.evals + 2 > budget.limit or (leaf and _is_culprit(_module_table(rows, [name])[0])):
                break
    finally:
        probes.remove()
    table = _module_table(rows, probes.order)
    found = [r["module"] for r in table if _is_culprit(r)]
    deepest = [c for c in found if not any(_is_inside(o, c) for o in found)]
    return [_describe_culprit(c, table) for c in deepest], table, budget.evals


def _is_culprit(row: dict) -> bool:
    # a near-zero output gradient that matches is evidence too: a wrong input gradient well above
    # round-off cannot come out of it through a correct backward
    return row["output"] in ("ok", "tiny") and row["input"] == "bad"


def _probe_targets(model, x, y, probes, suspects, gen) -> list[tuple[str, list[tuple]]]:
    """Per module, nearest-first: sampled input/output elements with their autograd gradients."""
    probes.reset()
    loss = F.cross_entropy(model(x), y, reduction="sum")
    keys = [k for k in probes.probes if k[2] == 0]  # first call of shared modules only
    grads = dict(zip(keys, torch.autograd.grad(loss, [probes.probes[k] for k in keys], allow_unused=True)))
    position = {name: i for i, name in enumerate(probes.order)}  # order in which forwards finish
    last = max((position[s] for s in suspects if s in position), default=-1)
    ranked = []
    for name in sorted(probes.order, key=lambda n: (position[n] <= last, abs(position[n] - last))):
        targets = []
        for side in ("out", "in"):
            grad = grads.get((name, side, 0))
            if grad is not None:
                tensor = probes.probes[(name, side, 0)]
                targets += [(name, side, tensor, idx, float(grad[idx]))
                            for idx in _sample_activation(grad, _GRAD_ACTIVATION_ELEMENTS, gen)]
        ranked.append((name, targets))
    return ranked


def _module_table(rows, order: list[str]) -> list[dict]:
    """Per module, in execution order: status and worst relative error of each side."""
    verdicts: dict[tuple, list[str]] = {}
    worst: dict[tuple, float] = {}
    for name, side, rel, verdict in rows:
        verdicts.setdefault((name, side), []).append(verdict)
        if verdict != "nonsmooth":
            worst[(name, side)] = max(worst.get((name, side), 0.0), rel)
    status = {key: _side_status(v) for key, v in verdicts.items()}
    return [{"module": n, "output": status.get((n, "out"), "unknown"),
             "input": status.get((n, "in"), "unknown"),
             "output_rel_error": worst.get((n, "out")), "input_rel_error": worst.get((n, "in"))}
            for n in order]


def _describe_culprit(name: str, table: list[dict]) -> str:
    """Name a leaf culprit directly; inside a composite one, point past its last wrong child."""
    wrong_inside = [r["module"] for r in table if _is_inside(r["module"], name) and r["output"] == "bad"]
    return f"'{name}' (after '{wrong_inside[-1]}')" if wrong_inside else f"'{name}'"


def _gradcheck_failure(culprits: list[str], bad: list[str], groups: list[dict]) -> str:
    worst = max((g for g in groups if g["bad_tensors"]), key=lambda g: g["worst_rel_error"])
    where = (f"wrong gradients in {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}; "
             f"worst relative error {worst['worst_rel_error']:.2g} ({worst['layer']})")
    if culprits:
        return (f"wrong backward in {', '.join(culprits)}: gradient right at its output, wrong at its "
                f"input; {where}")
    return where


# --------------------------------------------------------------------------- initial loss
