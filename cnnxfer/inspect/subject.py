"""What every view starts from: the model (from a run directory, a weights file or the hub), how
it reads images (its own Preprocess), where it runs (one Session, resolved once per command),
which images, and where the files go."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .. import data, loader as loaders, models, rundir
from ..config import InspectConfig
from ..errors import OutputExistsError, UsageError
from ..preprocess import Preprocess
from ..session import Session, resolve_session


@dataclass
class Subject:
    """A model ready to be looked into: eval mode, placed by its Session, with its own preprocessing."""

    loaded: models.LoadedModel
    model: nn.Module
    preprocess: Preprocess
    session: Session
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable image -> reason, over every pass

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.preprocess.input_size[1:])

    @property
    def in_chans(self) -> int:
        return int(self.preprocess.input_size[0])

    @property
    def device(self) -> torch.device:
        return self.session.device

    @property
    def classes(self) -> list[str]:
        """Class names of the model's outputs: the run's, else output numbers."""
        if self.loaded.classes:
            return list(self.loaded.classes)
        n = models.model_num_classes(self.model) or 0
        return [str(i) for i in range(n)]

    @cached_property
    def _normalizer(self) -> nn.Module:
        return self.preprocess.normalizer().to(self.device)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) as the loaders give them -> the model's input (Session.to_input)."""
        return self.session.to_input(images, self._normalizer)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The model's normalised input -> uint8 images (N, H, W, C) on the CPU, clipped to 0..255."""
        mean = torch.tensor(self.preprocess.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.preprocess.std, device=x.device).view(1, -1, 1, 1)
        pixels = ((x.detach().float() * std + mean) * 255).round().clamp(0, 255)
        return pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu()

    def batches(self, images: data.ImageList, batch_size: int) -> Iterator[loaders.Batch]:
        """The images as uint8 batches through the model's eval transform (unreadable ones skipped)."""
        loader = self.session.loader(loaders.ImageDataset(images, self.preprocess), batch_size, shard=False)
        for batch in loader:
            for i, reason in batch.skipped:
                self.skipped[str(images.paths[i])] = reason
            if len(batch.indices):
                yield batch

    def autocast(self):
        return self.session.autocast()


def write_skipped(subject: Subject, out: Path) -> list[tuple[str, str]]:
    """List the images no pass could read in OUT/skipped.csv (removed when there are none)."""
    skipped = sorted(subject.skipped.items())
    path = Path(out) / "skipped.csv"
    if skipped:
        data.write_skipped(path, skipped)
    else:
        path.unlink(missing_ok=True)
    return skipped


def load_subject(config: InspectConfig, num_classes: int | None = None) -> Subject:
    """The model `--model`/`--weights` name, in eval mode on the chosen device."""
    if config.weights is None and config.model is None:
        raise UsageError("give --weights (a run directory or a weights file, with --model for a file) or --model")
    weights = config.weights or models.HUB
    session = resolve_session(config.device, config.precision, config.num_workers)
    if num_classes is None and config.model and weights not in (models.HUB, models.NONE) and Path(weights).is_file():
        # a fine-tuned file's head is part of what is inspected (class models, errors): keep its size
        num_classes = models.weights_head_size(config.model, Path(weights))
    loaded = models.load_model(config.model, weights, num_classes, img_size=config.img_size)
    model = session.place(loaded.model.eval())
    for p in model.parameters():
        p.requires_grad_(False)  # views that need gradients take them with respect to inputs
    preprocess = Preprocess.from_data_config(loaded.data_config, max_pixels=config.max_image_pixels)
    return Subject(loaded, model, preprocess, session)


def read_images(config: InspectConfig, *, limit: int | None = None, labelled: bool | None = None,
                classes: list[str] | None = None) -> data.ImageList:
    """The images of `--data`, at most `--max-images` (else `limit`) of them, drawn evenly across
    classes with `--seed` so that a sample keeps every class."""
    if config.data is None:
        raise UsageError("this view needs images: give DATA (a folder of images or a CSV manifest)")
    images = data.discover(Path(config.data), labelled=labelled, classes=classes)
    cap = config.max_images if config.max_images is not None else limit
    if cap is not None and cap < 1:
        raise UsageError(f"--max-images must be at least 1 (got {cap})")
    if cap is None or len(images) <= cap:
        return images
    return images.subset(sample_evenly(images.labels, cap, config.seed))


def sample_evenly(labels: list[int | None], n: int, seed: int = 0) -> list[int]:
    """`n` indices, round-robin over the classes in a seeded random order, returned sorted."""
    rng = np.random.default_rng(seed)
    by_class: dict = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    queues = [list(rng.permutation(v)) for _, v in sorted(by_class.items(), key=lambda kv: str(kv[0]))]
    chosen: list[int] = []
    while len(chosen) < n:
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(int(queue.pop()))
    return sorted(chosen)


def output_dir(config: InspectConfig, view: str) -> Path:
    """Where a view writes: `--out`, else <run dir>/inspect/<view> for a run directory, else
    inspect/<view>. An existing folder with files in it needs --overwrite."""
    if config.out is not None:
        out = Path(config.out)
    elif config.weights and rundir.is_run_dir(config.weights):
        out = Path(config.weights) / "inspect" / view
    else:
        out = Path("inspect") / view
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise OutputExistsError(f"{out} already holds files; pass --overwrite to replace them or --out for another folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def stages(model: nn.Module) -> list[str]:
    """The model's stages: timm's feature stages, or a custom model's top-level children."""
    return [s for s in models.available_layers(model) if s]


def resolve_layer(model: nn.Module, layer: str | None, option: str = "--layer") -> str:
    """A module name for `--layer`: a name or an index into the stages; default the last stage."""
    names = stages(model)
    if layer is None:
        if not names:
            raise UsageError(f"the model has no stages to choose from; give {option} MODULE")
        return names[-1]
    try:
        return models.resolve_layers(model, [layer])[0]
    except UsageError as exc:
        raise UsageError(str(exc).replace("--layers", option)) from None


def class_index(subject: Subject, name: str) -> int:
    """The output index of class `name` (a class name of the run, or an output number)."""
    classes = subject.classes
    if name in classes:
        return classes.index(name)
    if name.isdigit() and int(name) < max(len(classes), 1):
        return int(name)
    shown = ", ".join(classes[:20]) + (" ..." if len(classes) > 20 else "")
    raise UsageError(f"--class {name} is not one of the model's classes: {shown}")
