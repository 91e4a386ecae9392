"""Which parameters train, and on what: the finetune strategies (train is `full` from scratch).

- linear: the backbone frozen in eval mode (BatchNorm statistics fixed) under a new head; the
  head trains on features computed once (`cache_features`: FeatureDataset) or, with --no-cache,
  on the backbone's output of freshly augmented images every step (LinearProbe).
- gradual: the head alone for `head_epochs`, then one more stage group of the backbone each
  epoch, from the top (models.stage_groups).
- full: every parameter.

A Plan says, per epoch, which phase the run is in; the trainer applies a phase only when it
changes (and, with several processes, wraps the module again so that newly unfrozen parameters
are synchronised from their first step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import models
from .config import Strategy, TrainConfig

# What --strategy auto fine-tunes after the probe (measured: see recipe.py).
AUTO_FINETUNE = Strategy.full


class LinearProbe(nn.Module):
    """A frozen backbone in eval mode (BatchNorm statistics fixed) under a trainable head."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = models.pre_logits(self.backbone, x)
        return self.head(features)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        self.head.train(mode)
        return self


class FeatureDataset:
    """Cached backbone features, served like images (loader items: feature, label, image index)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor):
        self.features, self.labels, self.indices = features, labels, indices

    def __len__(self) -> int:
        return len(self.labels)

    def item(self, i: int, seed: str | None = None):
        return self.features[i], int(self.labels[i]), int(self.indices[i])


@dataclass(frozen=True)
class Phase:
    name: str  # as metrics.csv records it: head, head+N group(s), all
    trainable: frozenset[str] | None  # parameter names; None: every parameter


class Plan:
    """The module to optimise, its head's parameter names, and the phase of each epoch."""

    def __init__(self, config: TrainConfig, model: nn.Module):
        self.config, self.model = config, model
        self.kind = AUTO_FINETUNE if Strategy(config.strategy) == Strategy.auto else Strategy(config.strategy)
        self.head_names = models.head_parameter_names(model)
        self.groups = models.stage_groups(model)
        self.module, self.optimized, self.optimized_head = model, model, set(self.head_names)
        if self.kind == Strategy.linear:
            classifier = model.get_submodule(models.classifier_names(model)[0])
            head = nn.Sequential(nn.Dropout(config.dropout), classifier)
            self.module = head if config.cache_features else LinearProbe(model, head)
            self.optimized, self.optimized_head = head, {n for n, _ in head.named_parameters()}

    @property
    def caches_features(self) -> bool:
        return self.kind == Strategy.linear and self.config.cache_features

    @property
    def probe_only(self) -> bool:
        """linear with cached features: the probe is the whole run (no epochs)."""
        return self.caches_features

    def phase(self, epoch: int) -> Phase:
        if self.kind == Strategy.linear:
            return Phase("head", frozenset(self.head_names))
        if self.kind == Strategy.full:
            return Phase("all", None)
        unfrozen = epoch - self.config.head_epochs + 1  # gradual: top stage groups, one more each epoch
        if unfrozen <= 0:
            return Phase("head", frozenset(self.head_names))
        if unfrozen >= len(self.groups):
            return Phase("all", None)
        trainable = set(self.head_names).union(*self.groups[len(self.groups) - unfrozen:])
        return Phase(f"head+{unfrozen} group(s)", frozenset(trainable))

    def apply(self, phase: Phase) -> None:
        """Set requires_grad for `phase`; frozen BatchNorms are kept in eval mode by the trainer."""
        models.set_trainable(self.model, None if phase.trainable is None else set(phase.trainable))
