"""`cnnxfer inspect class-model`: the input that maximises a class score (Simonyan et al. 2014),
argmax_I S_c(I) - lambda ||I||^2, or the mean activation of one unit of a layer, made readable with
the regularisers of feature visualisation (Yosinski et al. 2015, Olah et al. 2017).

The image is optimised in the model's own input normalisation (what its first layer sees), from
the mean image (zero) plus a little noise, with Adam. Each step sees it randomly shifted by up to
`jitter` pixels and scaled by 0.95-1.05 (so the result cannot rely on single-pixel patterns), and
every `blur_every` steps it is blurred slightly (high frequencies decay); after each step it is
kept within the range real pixels can take. Jitter and blur are given for a 224 px input and scaled
to the model's (at 32 px: 1 pixel of jitter, no blur, which would erase a digit's strokes). S_c is the class's logit (not its probability, which can rise by lowering
the other classes), with log p_c added while the image is not yet classified as c (see
`class_objective`); ||I||^2 is the mean square of the normalised image, so that lambda does not
depend on the input size. The score reported is S_c.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..activations import Activations, StopForward
from ..config import InspectConfig
from ..errors import UsageError
from . import subject as subj

MAX_DEFAULT_CLASSES = 10  # without --class, the first this many classes
REFERENCE_SIDE = 224  # --jitter and the blur are given for an input of this size and scaled to the model's
BLUR_SIGMA = 0.5  # pixels at the reference size
MIN_BLUR_SIGMA = 0.25  # below this (inputs under ~112 px) the blur is left out


@dataclass
class ClassModelResult:
    targets: list[str]  # class names, or "<layer> unit <k>"
    images: list[np.ndarray]  # (H, W, 3) uint8, one per target
    scores: list[float]  # the objective's score (logit or mean activation) of each final image
    predicted: list[str]  # the model's class for each image
    probabilities: list[float]  # the model's probability of the target class (classes only)
    layer: str | None
    settings: dict
    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable images, with the reason


def optimise_inputs(subject: subj.Subject, objective, count: int, *, steps: int, lr: float, l2: float, jitter: int,
                    blur_every: int, seed: int = 0) -> torch.Tensor:
    """`count` normalised inputs, each maximising its own column of `objective(x) -> (count,)`."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h, w = subject.input_size
    # jitter and blur are set for a 224 px input; a 32 px digit would lose its strokes to them
    side = min(h, w) / REFERENCE_SIDE
    jitter, sigma = max(1, round(jitter * side)) if jitter else 0, BLUR_SIGMA * side
    blur_every = blur_every if sigma >= MIN_BLUR_SIGMA else 0
    x = (0.01 * torch.randn((count, subject.in_chans, h, w), generator=gen)).to(subject.device).requires_grad_(True)
    low, high = _valid_range(subject)
    optimizer = torch.optim.Adam([x], lr=lr)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        scores = objective(_jitter(x, jitter, gen))
        (-(scores - l2 * x.pow(2).mean(dim=(1, 2, 3)))).sum().backward()
        optimizer.step()
        with torch.no_grad():
            if blur_every and (step + 1) % blur_every == 0:
                x.copy_(_blur(x, sigma))
            x.copy_(torch.maximum(torch.minimum(x, high), low))
    return x.detach()


def _valid_range(subject: subj.Subject) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the normalised values of pixel 0 and pixel 255."""
    mean = torch.tensor(subject.preprocess.mean, device=subject.device).view(1, -1, 1, 1)
    std = torch.tensor(subject.preprocess.std, device=subject.device).view(1, -1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


def _jitter(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """A random shift of up to `pixels` and a random scale of 0.95-1.05, in one resampling."""
    n, _, h, w = x.shape
    scale = 0.95 + 0.1 * torch.rand(n, generator=gen)
    shift = (torch.rand((n, 2), generator=gen) * 2 - 1) * pixels * 2 / torch.tensor([w, h])
    theta = torch.zeros((n, 2, 3))
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = 1 / scale, 1 / scale, shift
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _blur(x: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    taps = torch.exp(-torch.arange(-1, 2, dtype=x.dtype, device=x.device) ** 2 / (2 * sigma**2))
    kernel = (taps[:, None] * taps[None, :]) / taps.sum() ** 2
    c = x.shape[1]
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(c, 1, 3, 3), groups=c)


def class_objective(subject: subj.Subject, classes: list[int]):
    """S_c + log p_c per image: once the image is classified as c (p_c near 1) the log-probability
    is flat and this is Simonyan's S_c; before, it keeps S_c from rising through features c shares
    with a class that rises faster (digits: a "9" that turns into an "8")."""
    index = torch.tensor(classes, device=subject.device)[:, None]

    def objective(x):
        logits = subject.model(x).float()
        return logits.gather(1, index)[:, 0] + logits.log_softmax(dim=1).gather(1, index)[:, 0]
    return objective


def class_scores(subject: subj.Subject, classes: list[int]):
    index = torch.tensor(classes, device=subject.device)[:, None]
    return lambda x: subject.model(x).float().gather(1, index)[:, 0]


def unit_objective(subject: subj.Subject, layer: str, unit: int):
    """The mean activation of channel `unit` of `layer` (the forward stops there)."""
    def objective(x):
        with Activations(subject.model, [layer], stop=True) as acts:
            try:
                subject.model(x)
            except StopForward:
                pass
        act = acts.outputs[layer].float()
        if unit >= act.shape[1]:
            raise UsageError(f"--unit {unit} is out of range: {layer} has {act.shape[1]} units (0-{act.shape[1] - 1})")
        return act[:, unit].reshape(len(x), -1).mean(dim=1)
    return objective


def class_models(subject: subj.Subject, targets: list[int] | None = None, layer: str | None = None,
                 unit: int | None = None, *, steps: int = 200, lr: float = 0.05, l2: float = 1e-3, jitter: int = 4,
                 blur_every: int = 4, seed: int = 0) -> ClassModelResult:
    """Class models for the output indices `targets`, or with `layer` and `unit` that unit's image."""
    if steps < 1:
        raise UsageError(f"--steps must be at least 1 (got {steps})")
    settings = {"steps": steps, "lr": lr, "l2": l2, "jitter": jitter, "blur_every": blur_every, "seed": seed}
    classes = subject.classes
    if layer is not None:
        objective, names, count = unit_objective(subject, layer, unit or 0), [f"{layer} unit {unit or 0}"], 1
    else:
        objective, names, count = class_objective(subject, targets), [classes[t] for t in targets], len(targets)
    x = optimise_inputs(subject, objective, count, steps=steps, lr=lr, l2=l2, jitter=jitter, blur_every=blur_every,
                        seed=seed)
    with torch.no_grad():
        scores = (objective if layer is not None else class_scores(subject, targets))(x).tolist()
        probs = subject.model(x).float().softmax(dim=1)
    predicted = [classes[i] if i < len(classes) else str(i) for i in probs.argmax(dim=1).tolist()]
    target_probs = [float(probs[k, t]) for k, t in enumerate(targets)] if layer is None else []
    return ClassModelResult(names, list(subject.denormalize(x).numpy()), scores, predicted, target_probs, layer, settings)


def save_class_models(result: ClassModelResult, out: Path) -> list[Path]:
    from .. import report

    rows = [{"target": t, "score": s, "predicted": p, "probability": result.probabilities[k] if result.probabilities else None}
            for k, (t, s, p) in enumerate(zip(result.targets, result.scores, result.predicted))]
    result.files = [report.save_image_grid(result.images, [f"{t}\nscore {s:.3g}" for t, s in zip(result.targets, result.scores)],
                                           out / "class_model.png"),
                    report.save_table(rows, out / "class_model.csv"),
                    report.save_json({"layer": result.layer, **result.settings}, out / "class_model.json")]
    return result.files


def run_class_model(config: InspectConfig) -> ClassModelResult:
    """`cnnxfer inspect class-model`: load, optimise, write."""
    subject = subj.load_subject(config)
    layer, targets = None, None
    if config.layer is not None or config.unit is not None:
        layer = subj.resolve_layer(subject.model, config.layer)
    elif config.class_name:
        targets = [subj.class_index(subject, name.strip()) for name in config.class_name.split(",") if name.strip()]
    else:
        targets = list(range(min(len(subject.classes), MAX_DEFAULT_CLASSES)))
    out = subj.output_dir(config, "class_model")
    result = class_models(subject, targets, layer, config.unit, steps=config.steps, lr=config.lr, l2=config.l2,
                          jitter=config.jitter, blur_every=config.blur_every, seed=config.seed)
    save_class_models(result, out)
    return result
