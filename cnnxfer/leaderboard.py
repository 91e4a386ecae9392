"""The leaderboard of `finetune --model A,B,C --weights WA,WB,WC`: which backbone to fine-tune on
the user's own images, chosen in seconds per candidate.

Every candidate embeds the same stratified sample of the training images once (its frozen
features, through its own preprocessing), and the exact probe (probe.py: logistic regression,
its strength by 5-fold cross-validation) scores them: the candidate with the highest held-out
accuracy leads (within one standard error: pretrained before random, then the lower held-out
loss; `Leaderboard.order`). Frozen features rank backbones for transfer well
(LogME, You et al. ICML 2021; the fine-tuned ranking follows the probe's closely, Kornblith et al.
CVPR 2019). The validation images are not looked at: they stay held out for the run.

Under --budget the ranking takes at most budget.LEADERBOARD_SHARE of the time: each candidate
is timed on a small batch first, the sample is as large as fits (every training image when it
can), and the slowest candidates are skipped, with a note, when even RANK_MIN_PER_CLASS images
per class do not fit. When the sample holds every training image, the leader's features and probe
are the run's probe (no second pass).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import data, models, recipe
from .budget import END_SECONDS, LEADERBOARD_SHARE, Clock, refuse_if_short
from .config import Balance, TrainConfig
from .errors import UsageError

RANK_MIN_PER_CLASS = 10  # the fewest training images per class a ranking is worth (fewer when a class has fewer)
TIMING_IMAGES, TIMING_BATCH = 16, 8  # the inference speed is timed on 16 images in batches of 8
# the cross-validated probe's seconds per (image x feature x class), measured on EfficientNet-Lite
# features of Fashion-MNIST and digits (2-core Xeon): an estimate for sizing the sample, not a limit
PROBE_SECONDS_PER_UNIT = 2.0e-6


@dataclass(frozen=True)
class Candidate:
    model: str
    weights: str

    @property
    def label(self) -> str:
        weights = self.weights if self.weights in (models.HUB, models.NONE) else Path(self.weights).name
        return f"{self.model} ({weights})"


def parse_candidates(model: str | None, weights: str | None) -> list[Candidate]:
    """--model A,B,C and --weights WA,WB,WC (one for all, or one per model; one model with several
    weights ranks those weights)."""
    names = [m.strip() for m in (model or "").split(",") if m.strip()] or [model]
    sources = [w.strip() for w in (weights or models.HUB).split(",") if w.strip()] or [models.HUB]
    if len(sources) == 1:
        sources = sources * len(names)
    elif len(names) == 1:
        names = names * len(sources)
    if len(names) != len(sources):
        raise UsageError(f"--model names {len(names)} candidates and --weights {len(sources)}: give one --weights "
                         f"for all of them or one per --model, in the same order")
    return [Candidate(n, s) for n, s in zip(names, sources)]


@dataclass
class Entry:
    """One candidate's line of the leaderboard."""

    candidate: Candidate
    status: str = "ranked"  # or skipped: too slow for the budget
    reason: str = ""
    cv_accuracy: float | None = None
    cv_loss: float | None = None
    images: int = 0
    feature_seconds: float = 0.0
    images_per_second: float | None = None
    parameters: int = 0
    probe_seconds: float = 0.0
    features: tuple | None = field(default=None, repr=False)  # (features, labels, indices) of the sample
    fit: object = field(default=None, repr=False)  # probe.ProbeFit
    loaded: object = field(default=None, repr=False)  # models.LoadedModel while ranking
    dim: int = 0
    data_config: dict = field(default_factory=dict, repr=False)  # its preprocessing (a run reads them so)

    def row(self, rank: int | None) -> dict:
        return {"rank": rank, "model": self.candidate.model, "weights": self.candidate.weights,
                "probe_cv_accuracy": self.cv_accuracy, "probe_cv_loss": self.cv_loss, "images": self.images,
                "feature_seconds": round(self.feature_seconds, 2),
                "images_per_second": round(self.images_per_second, 1) if self.images_per_second else None,
                "parameters": self.parameters, "probe_seconds": round(self.probe_seconds, 2), "status": self.status,
                "note": self.reason}


class Leaderboard:
    """Rank `candidates` on the training images of a run (see the module's docstring).

    Args:
        val_images: how many validation images the run will have (for the budget's minimum).
        clock: the --budget (None: no limit, every training image is used).
        note: shows what the user should know (skipped candidates, the sample, the leader).
    """

    def __init__(self, config: TrainConfig, candidates: list[Candidate], train: data.ImageList, val_images: int,
                 session, note: Callable[[str], None], clock: Clock | None = None):
        self.config, self.train, self.val_images, self.session, self.note = config, train, val_images, session, note
        self.entries = [Entry(c) for c in candidates]
        self.clock = clock
        self.sample: data.ImageList | None = None
        self.whole = False  # the sample is every training image, in the run's order
        self.skipped: dict[str, str] = {}

    # -- the ranking
    def rank(self) -> Entry:
        """Time, sample, embed and probe every candidate; the leader. A budget too small for even
        the fastest candidate's probe is refused (UsageError) before anything is embedded."""
        for entry in self.entries:
            self._load_and_time(entry)
        live = list(self.entries)
        seconds = None
        if self.clock is not None:
            fastest = min(live, key=lambda e: self._estimate(e, len(self.train)))
            needed = self._estimate(fastest, len(self.train)) + self.val_images / fastest.images_per_second + END_SECONDS
            refuse_if_short(self.clock, needed, f"the probe on {len(self.train)} training images with the fastest "
                                                f"candidate, {fastest.candidate.label} "
                                                f"({fastest.images_per_second:.0f} images/s),")
            seconds = self.clock.start + LEADERBOARD_SHARE * self.clock.seconds - time.monotonic()
        per_class = self._sample_size(live, seconds)
        self.sample, self.whole = self._draw(per_class)
        shown = "every training image" if self.whole else f"{len(self.sample)} training images ({per_class} per class)"
        self.note(f"leaderboard: ranking {len(live)} backbone(s) by the cross-validated probe on {shown}")
        for entry in live:
            self._score(entry)
            entry.loaded = None  # the model is rebuilt for the run: one in memory at a time
        leader = self.leader()
        self.note(f"leaderboard: {leader.candidate.label} leads (probe held-out accuracy {leader.cv_accuracy:.4f})")
        return leader

    def leader(self) -> Entry:
        return self.order()[0]

    def order(self) -> list[Entry]:
        """The ranked candidates, best first: by held-out accuracy, where the candidates within one
        standard error of the best (sqrt(p(1 - p) / n) on the n images ranked) count as tied; among
        the tied, pretrained weights come before a random initialisation, then the lower held-out
        loss. A random backbone's frozen features can probe as well as ImageNet's on a domain a
        linear model nearly solves on raw pixels (digits, 20 per class: a randomly initialised
        EfficientNet-Lite0 at 0.85-0.90 against the pretrained one's 0.88, depending on the draw),
        yet validate and fine-tune worse; a difference within the noise does not displace a prior."""
        ranked = [e for e in self.entries if e.status == "ranked" and e.cv_accuracy is not None]
        best = max(e.cv_accuracy for e in ranked)
        n = max(max(e.images for e in ranked), 1)
        tied = best - math.sqrt(max(best * (1 - best), 0.0) / n)
        return sorted(ranked, key=lambda e: (e.cv_accuracy < tied, -e.cv_accuracy if e.cv_accuracy < tied else 0.0,
                                             e.candidate.weights == models.NONE, e.cv_loss or 0.0))

    def _load_and_time(self, entry: Entry) -> None:
        """Build the candidate and time its inference (`images_per_second`)."""
        from .engine import seed_everything

        c = entry.candidate
        seed_everything(self.config.seed)  # a random initialisation is the same draw on every run
        size = recipe.working_img_size(self.config.img_size, c.weights, self.train)  # the size its run would use
        loaded = models.load_model(c.model, c.weights, len(self.train.classes), classes=self.train.classes,
                                   img_size=size)
        loaded.model = self.session.place(loaded.model).eval()
        entry.loaded, entry.parameters = loaded, sum(p.numel() for p in loaded.model.parameters())
        entry.data_config = loaded.data_config
        entry.images_per_second, entry.dim = inference_speed(loaded, self.train, self.config, self.session)

    def _estimate(self, entry: Entry, images: int) -> float:
        """Seconds to embed `images` and cross-validate the probe on them."""
        return images / entry.images_per_second + probe_seconds(images, entry.dim, len(self.train.classes))

    def _sample_size(self, live: list[Entry], seconds: float | None) -> int:
        """Training images per class to rank on: all of them without a time limit, else as many as
        fit in `seconds`; candidates are skipped (a random initialisation first, then the slowest)
        while even the fewest do not fit."""
        counts = np.bincount(np.asarray(self.train.labels), minlength=len(self.train.classes))
        most = int(counts.max())
        if seconds is None:
            return most
        fewest = min(RANK_MIN_PER_CLASS, most)

        def images(per_class: int) -> int:
            return int(np.minimum(counts, per_class).sum())

        while len(live) > 1 and sum(self._estimate(e, images(fewest)) for e in live) > seconds:
            # a random initialisation first (the weakest prior), then the slowest
            slow = max(live, key=lambda e: (e.candidate.weights == models.NONE, self._estimate(e, images(fewest))))
            why = "a random initialisation goes first" if slow.candidate.weights == models.NONE else "the slowest"
            slow.status, slow.loaded = "skipped", None
            slow.reason = (f"the budget does not fit every candidate and {why}: {slow.images_per_second:.0f} "
                           f"images/s, about {self._estimate(slow, images(fewest)):.0f} s to rank on "
                           f"{images(fewest)} images")
            self.note(f"leaderboard: {slow.candidate.label} skipped: {slow.reason}")
            live.remove(slow)
        if len(live) == 1:  # the leader already: its features of every image are the run's probe
            return most
        per_class = most
        while per_class > fewest and sum(self._estimate(e, images(per_class)) for e in live) > seconds:
            per_class = max(fewest, int(per_class * 0.85))
        return per_class

    def _draw(self, per_class: int) -> tuple[data.ImageList, bool]:
        """A seeded stratified sample of `per_class` training images per class (all of them when
        they are that few), and whether it is every training image in the run's order."""
        labels = np.asarray(self.train.labels)
        if np.bincount(labels).max() <= per_class:
            return self.train, True
        rng = np.random.default_rng(self.config.seed)
        keep = []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            keep.extend(rng.permutation(members)[:per_class].tolist())
        return self.train.subset(sorted(keep)), False

    def _features(self, entry: Entry, images: data.ImageList) -> tuple:
        feats, skipped = embed(entry.loaded, images, self.config, self.session)
        self.skipped.update(skipped)
        return feats

    def _score(self, entry: Entry) -> None:
        from .probe import fit_probe

        began = time.perf_counter()
        entry.features = self._features(entry, self.sample)
        entry.feature_seconds = time.perf_counter() - began
        entry.images = len(entry.features[1])
        if entry.images:
            entry.images_per_second = entry.images / max(entry.feature_seconds, 1e-6)
        began = time.perf_counter()
        entry.fit = fit_probe(entry.features[0], entry.features[1].numpy(), len(self.train.classes),
                              balanced=Balance(self.config.balance) != Balance.none, seed=self.config.seed)
        entry.probe_seconds = time.perf_counter() - began
        entry.cv_accuracy, entry.cv_loss = entry.fit.cv_accuracy, entry.fit.cv_loss
        if entry.cv_accuracy is None:  # a class of one image: no cross-validation, scored on itself
            logits = entry.fit.logits(entry.features[0].double())
            entry.cv_accuracy = float((logits.argmax(1) == entry.features[1]).double().mean())

    # -- the record
    def rows(self) -> list[dict]:
        ranks = {id(e): k + 1 for k, e in enumerate(self.order())}
        rest = [e for e in self.entries if id(e) not in ranks]
        return [e.row(ranks[id(e)]) for e in self.order()] + [e.row(None) for e in rest]

    def handover(self, leader: Entry) -> dict | None:
        """What the leader's run may take from the ranking: its training features and probe when
        the sample was every training image (else None: the run embeds them itself)."""
        if not self.whole or leader.features is None:
            return None
        return {"features": leader.features, "fit": leader.fit, "skipped": dict(self.skipped),
                "seconds": leader.feature_seconds, "data_config": models.data_config_json(leader.data_config)}



def embed(loaded, images: data.ImageList, config: TrainConfig, session) -> tuple[tuple, dict[str, str]]:
    """((features, labels, indices), unreadable files) of `images` through `loaded`'s frozen
    backbone, preprocessed as a run's un-augmented training pass."""
    from . import loader as loaders, trainset
    from .epochs import features

    pre = trainset.eval_preprocess(config, loaded.data_config)
    loader = session.loader(loaders.ImageDataset(images, pre), config.batch_size or 32)
    skips = trainset.Skips(session, None)
    out = features(loaded.model, loader, session, pre.normalizer().to(session.device), skips)
    return out, skips.skipped


def inference_speed(loaded, images: data.ImageList, config: TrainConfig, session) -> tuple[float, int]:
    """(images per second, feature width) of `loaded`'s frozen backbone on TIMING_IMAGES of
    `images` in batches of TIMING_BATCH, timed after a warm-up batch of that size (the first call
    of a batch shape pays for kernel choices: a third of the time of 16 images, measured)."""
    batch = dataclasses.replace(config, batch_size=TIMING_BATCH)
    picks = np.linspace(0, len(images) - 1, min(TIMING_IMAGES + TIMING_BATCH, len(images))).astype(int)
    warm, timed = (picks[:TIMING_BATCH], picks[TIMING_BATCH:]) if len(picks) > TIMING_BATCH else (picks, picks)
    embed(loaded, images.subset(warm), batch, session)
    began = time.perf_counter()
    (feats, _, _), _ = embed(loaded, images.subset(timed), batch, session)
    seconds = time.perf_counter() - began
    return len(timed) / max(seconds, 1e-6), int(feats.shape[1]) if len(feats) else 0


def probe_seconds(images: int, dim: int, classes: int) -> float:
    """The cross-validated probe's expected seconds (PROBE_SECONDS_PER_UNIT)."""
    return PROBE_SECONDS_PER_UNIT * images * max(dim, 1) * classes
