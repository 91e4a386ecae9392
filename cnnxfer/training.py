"""finetune and train: one run, from labelled images and a model to a run directory (`fit`).

Each concern has its place: recipe.py chooses the settings the user left out; strategy.py says
which parameters train; the step / epoch / evaluate loop is engine.py's; rundir.py owns the files;
distributed.py is the only module that talks to other processes.

With several processes (torchrun) the run is data-parallel and gives what one process gives:
each process takes its slice of every global batch (`--batch-size` stays the global batch, so the
learning rate and schedule do not change with the number of processes), DistributedDataParallel
averages the gradients, BatchNorm statistics are averaged before each evaluation, validation is
gathered so that every image counts once, every decision that ends a loop is taken together,
and only rank 0 writes. The linear strategy computes its cached features in shards and trains
the head on all of them on every rank.

Determinism: every epoch reseeds torch/numpy/random from (seed, epoch) and the training loader's
order and augmentation likewise (`Loader.set_epoch`), so a run resumed from its last epoch
checkpoint repeats exactly what the uninterrupted run would have done (same machine and
versions), with any number of processes that divides the batch.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import data, device as dev, distributed, loader as loaders, models, recipe, rundir
from .config import (MIN_FINETUNE_STEPS, Balance, BnStats, CacheImages, HeadInit, RunConfig, Strategy, TrainConfig,
                     resumed_config)
from .engine import (BatchHook, EpochStats, StepContext, build_optimizer, cosine_with_warmup, evaluate, seed_everything,
                     steps_per_epoch, to_device, train_one_epoch)
from .errors import TrainingError, UsageError
from .preprocess import Augment, Preprocess
from .probe import ProbeFit, beats_probe, calibrated_nll, fit_probe
from .rundir import RunDir
from .signals import check_signals, deferred_signals
from .strategy import FeatureDataset, Phase, Plan

BEST_RULE = "the lowest validation loss"  # how the best epoch is chosen (is_new_best), as the summary says it
AUTO_RULE = ("the lowest validation loss among the fine-tuned epochs, kept if it beats the probe on validation "
             "accuracy (ties: the calibrated loss)")  # --strategy auto (_Trainer._keep_better)
VAL_LOSS = nn.CrossEntropyLoss()  # what validation measures: plain cross-entropy (see _Trainer._loss_fn)


@dataclass
class FitHooks:
    """Optional callbacks the CLI's progress display plugs into (rank 0's alone under torchrun)."""

    on_batch: BatchHook | None = None
    on_epoch: Callable[[dict], None] | None = None
    on_message: Callable[[str], None] | None = None
    on_start: Callable[[TrainConfig], None] | None = None  # the run's config, epochs and batch size resolved


@dataclass
class FitResult:
    run_dir: Path
    classes: list[str]
    history: list[dict]
    best: dict
    stopped_early: bool
    seconds: float
    device: str
    precision: str
    train_images: int
    val_images: int
    skipped: int
    skipped_file: Path | None
    hparams: dict
    notes: list[str] = field(default_factory=list)
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> readable {"train": n, "val": n}
    best_rule: str = BEST_RULE
    world_size: int = 1
    probe: dict | None = None  # the probe's strength, cross-validated and validation figures (probe.describe_fit)
    strategy: str = ""  # as run: auto, linear, gradual or full
    selection: dict | None = None  # auto without validation images: the cross-validation (selection.CrossValidation)


# ---------------------------------------------------------------- fit

def fit(config: TrainConfig, hooks: FitHooks | None = None) -> FitResult:
    """Train a classifier on `config.data` into the run directory `config.out` (finetune and train).

    With `config.resume` (a config from `resume_config`), `config.out` is an interrupted run: it
    continues after its last saved epoch, or starts again when no epoch had finished.
    """
    start = time.perf_counter()
    runtime = dev.resolve_runtime(config.device, config.precision, config.num_workers)
    with distributed.session(runtime.device.type) as rank:
        config, saved, restart = _resume_or_start(config)
        trainer = _Trainer(config, (hooks or FitHooks()) if rank.is_main else FitHooks(), runtime, rank, saved)
        if restart:
            trainer.note("no epoch of the interrupted run had finished: it starts again from the beginning")
        with deferred_signals():
            history, best, stopped = trainer.train()
            final = trainer.finish(best)
        return trainer.result(history, dict(best, **final), stopped, time.perf_counter() - start)


def _resume_or_start(config: TrainConfig) -> tuple[TrainConfig, RunConfig | None, bool]:
    """(the config to run, the interrupted run's RunConfig when resuming, whether it restarts)."""
    if not config.resume:
        return config, None, False
    saved = _resumable_run(Path(config.out))
    config = resume_config(config.out, **_differences(config, resumed_config(saved, config.out)))
    if rundir.resume_point(config.out) == "start":  # nothing to continue from: the same run from its beginning
        return dataclasses.replace(config, resume=False, overwrite=True), None, True
    return config, saved, False


def resume_config(run_dir: Path | str, **given) -> TrainConfig:
    """The TrainConfig to pass to `fit` to continue the interrupted run in `run_dir`.

    Args:
        given: options given beside --resume, as TrainConfig fields (device="cpu", num_workers=2):
            those that say where and how to run apply (config.RUN_FIELDS; `data` where the same
            images are now; `precision` when it trains in the run's own dtype); any other that
            differs from the run's own setting raises UsageError naming it.
    """
    saved = _resumable_run(Path(run_dir))
    config = resumed_config(saved, Path(run_dir), given)
    now = dev.resolve_runtime(config.device, config.precision, config.num_workers).precision
    if saved.precision and now != saved.precision:
        raise UsageError(f"--precision {config.precision.value} trains in {now} on this device; the run trained in "
                         f"{saved.precision}: leave --precision out to resume in {saved.precision}")
    return config


def _differences(config: TrainConfig, ours: TrainConfig) -> dict:
    """The fields of `config` that differ from the run's own settings `ours`: what was given. None
    is never given: it means "choose for me" (--batch-size, --epochs), and the run has chosen."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if getattr(config, f.name) is not None and getattr(config, f.name) != getattr(ours, f.name)}


def _resumable_run(run_dir: Path) -> RunConfig:
    """The RunConfig of an unfinished run (see rundir.resume_point), else UsageError."""
    if not (run_dir / rundir.CONFIG_FILE).is_file():
        raise UsageError(f"--resume {run_dir}: not a cnnxfer run directory (no config.json)")
    if rundir.resume_point(run_dir) is None:
        raise UsageError(f"--resume {run_dir}: nothing to resume: the run finished (--overwrite starts it again)")
    return RunDir(run_dir).read_config()


def is_new_best(row: dict, best: dict, validated: bool = True) -> bool:
    """The one rule for the best epoch and for --patience: an epoch is the new best when its
    validation loss is lower than every earlier epoch's; --patience N stops after N epochs with no
    new best. Loss rather than accuracy: it moves with every image, where accuracy on a small
    validation set ties or jumps by whole images. Without a validation set (--val-split 0) every
    epoch is the new best: the last one is kept and the run never stops early.

    Under --strategy auto the fine-tuned epochs follow this rule among themselves; the probe is not
    one of them, and the best fine-tuned epoch meets it at the end (_Trainer._keep_better)."""
    if not best or not validated:
        return True
    return _finite(row["val_loss"]) < _finite(best["val_loss"])


def _best_of(row: dict) -> dict:
    """What a run records of its kept epoch (config.json's `best`)."""
    return {k: row[k] for k in ("epoch", "val_loss", "val_accuracy", "train_loss", "train_accuracy")}


def _finite(x: float) -> float:
    return x if x == x and np.isfinite(x) else float("inf")


# ---------------------------------------------------------------- the trainer

class _Trainer:
    """One fit: its data, model, plan, loaders and run directory, set up in that order."""

    def __init__(self, config: TrainConfig, hooks: FitHooks, runtime: dev.Runtime, rank: distributed.Dist,
                 saved: RunConfig | None):
        self.hooks, self.runtime, self.rank, self.saved = hooks, runtime, rank, saved
        self.device, self.dtype = runtime.device, runtime.dtype
        self.rundir = RunDir(config.out, writer=rank.is_main)
        self.notes: list[str] = []
        self.skipped: dict[str, str] = {}  # path -> why it could not be read
        self.probe_fit: ProbeFit | None = None
        self.probe_row: dict | None = None
        self.probe_features: tuple | None = None  # (train, val) features of a probe that may be kept, for its refit
        self.probe_refit: dict | None = None  # the kept probe fitted again on training + validation images
        self.selection: dict | None = (saved.selection if saved is not None else None)  # auto without validation
        self.keeps_probe = False
        if rank.enabled and (config.batch_size or 0) % rank.world:
            raise UsageError(f"--batch-size {config.batch_size} is the global batch: it must divide by the "
                             f"{rank.world} processes (each takes an equal share of every batch)")
        distributed.main_first(lambda: _prepare_output(config))
        # a resumed run takes its weights from state.pt: the original --weights need not exist any more
        models.check_model_options(config.model, models.NONE if config.resume else config.weights)
        self._read_data(config)
        if hooks.on_start:
            hooks.on_start(self.config)
        if saved is not None:
            self._check_same_data(saved)
        seed_everything(self.config.seed)  # the random initialisation of the model and head
        self._build_model(models.NONE if self.config.resume else self.config.weights)
        if self.config.resume:
            self.loaded.data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.data_config.items()}
        else:
            self.rundir.start(self.config.overwrite, self.run_config({}))
            self.rundir.save_splits(self.train_images, self.val_images)
        self.pending_best: tuple[dict, dict] | None = None  # (weights, best row) not yet written
        self.pending_state: dict | None = None
        self.last_save = time.monotonic()

    def note(self, text: str) -> None:
        """Something the user should know about this run: kept for FitResult.notes and shown now."""
        self.notes.append(text)
        if self.hooks.on_message:
            self.hooks.on_message(text)

    @property
    def run_dir(self) -> Path:
        return self.rundir.path

    # -- data and model
    def _read_data(self, config: TrainConfig) -> None:
        self.train_images, self.val_images = recipe.split_data(config.data, config.val_split, config.seed)
        self.data_fingerprint = data.fingerprint(self.train_images) + data.fingerprint(self.val_images)
        self.classes = self.train_images.classes
        for warning in self.train_images.warnings:
            self.note(warning)
        self.config, chosen = recipe.resolve_schedule(config, len(self.train_images))
        if chosen:
            self.note(chosen)
        unused = recipe.probe_ignores(config)
        if unused:
            self.note(f"--strategy linear fits the probe exactly (no training loop): {', '.join(unused)} do not apply "
                      f"(--no-cache trains a head with them)")
        c = self.config
        self.img_size = recipe.working_img_size(c.img_size, c.weights, self.train_images)
        if self.img_size and not c.img_size:
            self.note(f"small images: training at {self.img_size} px (set --img-size to change)")
        if c.patience and not len(self.val_images):
            self.note("--patience is ignored without a validation set (--val-split 0): the last epoch is kept")
        self.hp = recipe.resolve_hparams(c)

    def _check_same_data(self, saved: RunConfig) -> None:
        """A resumed run must read the images it was trained on: same classes, same files."""
        from .errors import DataError

        where = f"--resume {self.run_dir}: {self.config.data}"
        if saved.classes and saved.classes != self.classes:
            raise DataError(f"{where} now holds classes {self.classes}, the run was trained on {saved.classes}")
        if saved.data_fingerprint and saved.data_fingerprint != self.data_fingerprint:
            raise DataError(f"{where} does not hold the images the run was trained on (files were added, removed or "
                            f"changed since it started); a resumed run must read the same images")

    def _build_model(self, weights: str | None) -> None:
        c = self.config
        loaded = models.load_model(c.model, weights, len(self.classes), drop_rate=c.dropout, img_size=self.img_size,
                                   classes=self.classes)
        self.loaded, self.arch = loaded, loaded.arch
        for note in loaded.notes:
            self.note(note)
        if c.sync_bn:
            if self.device.type != "cuda":
                raise UsageError("--sync-bn synchronises BatchNorm across GPUs (it needs CUDA); on a CPU the "
                                 "processes' BatchNorm statistics are averaged before each evaluation instead")
            loaded.model = nn.SyncBatchNorm.convert_sync_batchnorm(loaded.model)
        if loaded.new_head and c.weights != models.NONE:
            models.zero_head(loaded.model)  # every class equally likely: the loss starts at ln(classes), not above
        self.model = loaded.model.to(self.device)
        self._choose_step_dtype()
        if self.runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def _choose_step_dtype(self) -> None:
        """The dtype of the training steps (device.training_dtype), recorded in the run's hparams
        so that a resumed run steps in the same one."""
        saved = (self.saved.hparams or {}).get("step_precision") if self.saved is not None else None
        if saved is not None:
            self.step_dtype = None if saved == "float32" else getattr(torch, saved)
        else:
            self.step_dtype = dev.training_dtype(self.runtime, self.model, self.config.precision)
            if self.step_dtype != self.dtype:
                self.note(f"precision auto: training steps in float32, evaluation in {self.runtime.precision} (bf16 "
                          f"trains models with depthwise convolutions slower than fp32 on a CPU)")
        self.hp["step_precision"] = str(self.step_dtype).replace("torch.", "") if self.step_dtype else "float32"

    # -- loaders
    def _build_loaders(self) -> None:
        """Train, validation and un-augmented train loaders, from disk or from images decoded once.

        Training images are decoded as the augmentation needs them (random crops keep real pixels)
        by every reader, so the un-augmented pass over them and the image cache see the same
        pixels; validation images as the eval transform needs them. With several processes each
        loader gives this process its slice of every batch.
        """
        c, rt = self.config, self.runtime
        pre = Preprocess.from_data_config(self.loaded.data_config, max_pixels=c.max_image_pixels,
                                          reduced_decode=c.reduced_decode)
        self.normalizer = pre.normalizer().to(self.device)
        augment = Augment(scale=recipe.crop_scale(self.loaded.data_config), hflip=c.hflip) if c.augment else None
        train_pre = pre.training(augment)
        train_eval_pre, val_pre = train_pre.evaluation(), pre
        decoded = self._decode_in_memory(train_pre, val_pre)
        if decoded is None:
            train_set = loaders.ImageDataset(self.train_images, train_pre)
            val_set = loaders.ImageDataset(self.val_images, val_pre)
            train_eval_set = loaders.ImageDataset(self.train_images, train_eval_pre)
        else:
            train_decoded, val_decoded = decoded
            val_set = loaders.MemoryDataset(self.val_images, val_decoded, val_pre)
            train_eval_set = loaders.MemoryDataset(self.train_images, train_decoded, train_eval_pre)
            # --no-augment: the training transform is the evaluation one; one copy serves both
            train_set = loaders.MemoryDataset(self.train_images, train_decoded, train_pre) if c.augment else train_eval_set
        weights = self._balanced_weights() if c.balance.value == "sampler" else None
        common = dict(threads=rt.decode_threads, ahead=rt.ahead, pin_memory=rt.pin_memory,
                      shard=(self.rank.rank, self.rank.world) if self.rank.enabled else None)
        self.train_loader = loaders.Loader(train_set, c.batch_size, shuffle=True, weights=weights, seed=c.seed,
                                           augment_seed=True, **common)
        self.val_loader = loaders.Loader(val_set, c.batch_size, **common)
        self.train_eval_loader = loaders.Loader(train_eval_set, c.batch_size, **common)

    def _decode_in_memory(self, train_pre: Preprocess, val_pre: Preprocess):
        """(train, val) images decoded once at the working resolution when --cache-images says
        so, else None (read from disk every epoch).

        Decoding dominates a small model's epoch on a CPU (a 64 px PNG: ~115 us to decode, ~40 us
        to crop and flip; a 12 MP JPEG: 35 ms at the working resolution); a dataset decoded once
        then costs only its transform per epoch. `auto` decodes when the images fit
        loader.cache_budget() at the working resolution (a 12 MP photo takes 0.6-2.3 MB there instead
        of 36 MB) and would be decoded more than once: not for --strategy linear with its feature
        cache (one pass), nor for one epoch. Each process holds the images of the whole dataset.
        """
        c = self.config
        mode = CacheImages(c.cache_images)
        if mode == CacheImages.off:
            return None
        if mode == CacheImages.auto:
            one_pass = (Strategy(c.strategy) == Strategy.linear and c.cache_features) or c.epochs <= 1
            if one_pass:
                return None
            size = loaders.decoded_size(self.train_images, train_pre) + loaders.decoded_size(self.val_images, val_pre)
            if size > loaders.cache_budget():
                self.note(f"the decoded images would take about {size / 2**30:.1f} GiB: reading them from disk "
                          f"every epoch (--cache-images on holds them anyway)")
                return None
        threads = self.runtime.decode_threads
        decoded = (loaders.decode_all(self.train_images, train_pre, threads),
                   loaders.decode_all(self.val_images, val_pre, threads))
        unreadable = sum(isinstance(item, str) for part in decoded for item in part)  # a reason, not an image
        readable = len(decoded[0]) + len(decoded[1]) - unreadable
        also = f" ({unreadable} unreadable file(s) skipped)" if unreadable else ""
        self.note(f"{readable} images decoded once into memory{also}; --cache-images off reads them from disk every epoch")
        return decoded

    def _balanced_weights(self) -> list[float]:
        """Sampling weights that draw every class equally often (--balance sampler)."""
        counts = np.bincount(self.train_images.labels, minlength=len(self.classes)).astype(float)
        return [1.0 / counts[label] for label in self.train_images.labels]

    def _loss_fn(self) -> nn.Module:
        """The training objective: cross-entropy with label smoothing, classes weighed under --balance loss.
        Validation measures plain cross-entropy (VAL_LOSS), like timm's validate: the same yardstick for
        every epoch, the probe and any setting of these options."""
        weight = None
        if self.config.balance.value == "loss":
            counts = np.bincount(self.train_images.labels, minlength=len(self.classes)).astype(float)
            weight = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=self.device)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=self.config.label_smoothing)

    # -- strategy, optimizer, schedule
    def _setup(self) -> None:
        """The plan, its loaders (cached features for linear), the optimizer and the schedule."""
        c = self.config
        self.plan = Plan(c, self.model)
        cached = self.plan.caches_features and not self.plan.probe_only
        self.loaders = self._cached_loaders() if cached else (self.train_loader, self.val_loader)
        self.optimizer = build_optimizer(self.plan.optimized, self.plan.optimized_head, self.hp, c.momentum)
        steps = steps_per_epoch(self.loaders[0])
        few = recipe.FEW_STEPS if c.weights == models.NONE else recipe.FEW_FINETUNE_STEPS
        if steps * c.epochs < few and not c.max_steps and not self.plan.probe_only:
            usual = "a few hundred" if c.weights == models.NONE else f"{MIN_FINETUNE_STEPS} or more"
            self.note(f"{len(self.train_images)} training images at --batch-size {c.batch_size} give {steps} optimizer "
                      f"step(s) per epoch, {steps * c.epochs} in all: with few images, raise --epochs ({usual} "
                      f"steps is usual) or lower --batch-size")
        self.scheduler = cosine_with_warmup(self.optimizer, c.epochs * steps, int(c.warmup_epochs * steps))
        use_scaler = self.step_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        agree = (lambda flag: distributed.any_rank(flag, self.device)) if self.rank.enabled else None
        self.ctx = StepContext(self.plan.module, self.optimizer, self.scheduler, self.scaler, self._loss_fn(),
                               self.device, self.step_dtype, c.grad_clip, self.runtime.channels_last, 0, c.max_steps,
                               self.normalizer, agree, self.rank.world)
        self.phase: Phase | None = None

    def _enter(self, phase: Phase) -> None:
        """Train `phase`'s parameters. With several processes the module is wrapped in
        DistributedDataParallel again whenever the trainable set changes: DDP reduces only the
        parameters that required grad when it was built."""
        if phase == self.phase:
            return
        self.plan.apply(phase)
        self.phase = phase
        module = self.plan.module
        if self.rank.enabled and not self.plan.caches_features:  # cached features: every rank trains the same head
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            module = DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
        self.ctx.module = module

    def _cached_loaders(self):
        """Run the frozen backbone once over un-augmented train and val images (each process its
        slice, then every process all of them: the head trains the same on every rank)."""
        c = self.config
        out = []
        for loader, shuffle in ((self.train_eval_loader, True), (self.val_loader, False)):
            feats, labels, indices = _gather_sorted(*self._features(loader))
            out.append(loaders.Loader(FeatureDataset(feats, labels, indices), c.batch_size, shuffle=shuffle, seed=c.seed))
        if not len(out[0].dataset):
            from .errors import DataError

            raise DataError(f"{c.data}: no image could be read")
        return tuple(out)

    @torch.inference_mode()
    def _features(self, loader):
        self.model.eval()
        feats, labels, indices = [], [], []
        probe = StepContext(None, None, None, None, None, self.device, None, channels_last=self.runtime.channels_last,
                            normalizer=self.normalizer)
        for batch in loader:
            check_signals()
            self._record_skipped(loader, batch.skipped)
            if len(batch.labels) == 0:
                continue
            with dev.autocast(self.device, self.dtype):
                feats.append(models.pre_logits(self.model, to_device(batch.images, probe)).float().cpu())
            labels.append(batch.labels)
            indices.append(batch.indices)
        if not feats:  # --val-split 0, or every image of this slice unreadable
            return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
        return torch.cat(feats), torch.cat(labels), torch.cat(indices)

    def _record_skipped(self, loader, skipped) -> None:
        images = getattr(loader.dataset, "images", None)
        for i, reason in skipped:
            if images is not None:
                self.skipped[str(images.paths[i])] = reason

    # -- epochs
    def train(self) -> tuple[list, dict, bool]:
        """Loaders, plan, then the epochs; failures name the last good checkpoint."""
        history: list = []
        try:
            self._build_loaders()
            state = self._restore_model() if self.config.resume else None
            self._setup()
            if state:
                start_epoch, history, best, bad = self._restore(state)
                if start_epoch == 0 and history and history[0].get("phase") == "probe":
                    self._select_by_cross_validation()  # interrupted after the probe, before the folds decided
            else:
                start_epoch, history, best, bad = 0, [], {}, 0
                if self._probes_first():
                    history, best = self._probe()
                    if self.probe_row is not None:
                        self._select_by_cross_validation()
            if self.plan.probe_only or self.keeps_probe:
                return history, best, False
            try:
                history, best, stopped = self._run_epochs(start_epoch, history, best, bad)
            finally:  # also on Ctrl-C, SIGTERM and a non-finite loss: the last finished epoch on disk
                self._flush()
            return history, self._keep_better(history, best), stopped
        except TrainingError as exc:
            raise TrainingError(f"{exc}; {self._last_good(history)}") from exc
        except torch.OutOfMemoryError as exc:  # the training step has its own hint; this is evaluation or the feature cache
            bs = self.config.batch_size
            raise TrainingError(f"out of memory on {self.device} outside the training step (evaluation or feature cache) "
                                f"at batch size {bs}: try --batch-size {max(1, bs // 2)}; {self._last_good(history)}") from exc

    def _probes_first(self) -> bool:
        """Whether the run starts with the probe: it is the whole of --strategy linear (with its feature
        cache), and where a new head goes on a pretrained backbone it is where that head starts
        (--head-init probe): fine-tuning from a random head sends large early gradients into the
        pretrained features (LP-FT, Kumar et al. 2022)."""
        c = self.config
        if self.plan.probe_only or Strategy(c.strategy) == Strategy.auto:  # auto: the probe is the first candidate
            return True
        return self.loaded.new_head and c.weights != models.NONE and HeadInit(c.head_init) == HeadInit.probe

    def _select_by_cross_validation(self) -> None:
        """--strategy auto with no validation images: the probe and fine-tuning are compared by k-fold
        cross-validation on the training images (selection.py); when the probe wins, it is the run."""
        from . import selection

        c = self.config
        if Strategy(c.strategy) != Strategy.auto or len(self.val_images) or self.selection is not None:
            return
        if self.rank.enabled:
            self.note("no validation images: under torchrun the fine-tuned model is kept without comparing it to the "
                      "probe (one process compares them by cross-validation)")
            return
        self.note(f"no validation images: comparing the probe and fine-tuning by {selection.FOLDS}-fold "
                  f"cross-validation on the training images (a short run per fold)")
        # the run's own resolved settings (batch size, epochs), which a resumed run reads back from config.json:
        # the folds of an interrupted run and of an uninterrupted one are the same runs
        folds = selection.cross_validate(dataclasses.replace(self.config, strict=False), self.train_images, fit)
        if folds is None:
            self.note("a class has one training image: too few to cross-validate; the fine-tuned model is kept")
            return
        self.selection = folds.to_dict()
        self.keeps_probe = folds.winner == "probe"

    def _probe(self) -> tuple[list, dict]:
        """Fit the probe on the frozen backbone's features of the un-augmented training images, put it
        in the classifier and validate it: the run's epoch 0. It is a candidate for the best epoch
        under --strategy linear and auto; gradual and full start from it."""
        from .errors import DataError

        start = time.perf_counter()
        train = _gather_sorted(*self._features(self.train_eval_loader))
        val = _gather_sorted(*self._features(self.val_loader))
        if not len(train[1]):
            raise DataError(f"{self.config.data}: no image could be read")
        self._check_skipped()  # every image decoded once: a class with no readable image, --strict
        c = self.config
        solution = self._fit_head(train[0], train[1])
        if solution is None:
            self.note("the classifier is not one linear layer on the pooled features: it starts from zeros, not the probe")
            return [], {}
        self.probe_fit = solution
        row = {"epoch": 0, "phase": "probe", **_probe_metrics(solution, train, "train"),
               **_probe_metrics(solution, val, "val"), "lr": 0.0, "seconds": time.perf_counter() - start}
        if Strategy(c.strategy) == Strategy.auto and len(val[1]):  # what a fine-tuned epoch tying on accuracy must beat
            row["val_loss_calibrated"] = calibrated_nll(solution.logits(val[0]).double().numpy(), val[1].numpy())
        self.probe_row = row
        shown = f"; validation accuracy {row['val_accuracy']:.4f}" if len(val[1]) else ""
        self.note(f"probe: {solution.describe()}{shown} ({row['seconds']:.1f} s)")
        candidate = self.plan.probe_only or Strategy(c.strategy) == Strategy.auto
        self.probe_features = (train, val) if candidate else None
        best = _best_of(row) if candidate else {}
        self._save_epoch(-1, [row], best, 0, improved=candidate)
        self._flush()
        if Strategy(c.strategy) == Strategy.auto and len(val[1]):  # the candidate fine-tuning must beat, at the end
            self.rundir.save_probe(self.model.state_dict(), self.arch)
        if HeadInit(c.head_init) == HeadInit.zero and not self.plan.probe_only:
            models.zero_head(self.model)  # auto --head-init zero: the probe was a candidate, not the start
        return [row], best

    def _fit_head(self, features: torch.Tensor, labels: torch.Tensor) -> ProbeFit | None:
        """The probe on these features, put in the model's classifier (None: it is not one linear layer)."""
        c = self.config
        solution = fit_probe(features, labels.numpy(), len(self.classes), balanced=Balance(c.balance) != Balance.none,
                             seed=c.seed)
        weight, bias = solution.head()
        return solution if models.set_linear_head(self.model, weight.to(self.device), bias.to(self.device)) else None

    def _run_epochs(self, start_epoch: int, history: list, best: dict, bad_epochs: int) -> tuple[list, dict, bool]:
        c = self.config
        stopped_early = False
        for epoch in range(start_epoch, c.epochs):
            check_signals()
            seed_everything(c.seed * 1000 + epoch + 7919 * self.rank.rank)  # rank 0: what one process draws
            self.loaders[0].set_epoch(epoch)
            phase = self.plan.phase(epoch)
            self._enter(phase)
            self.ctx.module.train()
            for m in models.frozen_norm_modules(self.model, all_of_them=self.hp["bn_stats"] == BnStats.frozen.value):
                m.eval()
            start = time.perf_counter()
            stats = _reduce_stats(train_one_epoch(self.ctx, self.loaders[0], self.hooks.on_batch))
            self._record_skipped(self.loaders[0], stats.skipped)
            _average_norm_statistics(self.model)
            val, probs, targets, _ = self._evaluate(self.plan.module, self.loaders[1])
            self._record_skipped(self.loaders[1], val.skipped)
            if epoch == start_epoch:
                self._check_skipped()
            row = {"epoch": epoch + 1, "phase": phase.name, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                   "val_loss": val.loss, "val_accuracy": val.accuracy, "lr": self.optimizer.param_groups[-1]["lr"],
                   "seconds": time.perf_counter() - start}
            if self._probe_candidate(history) is not None:
                row["val_loss_calibrated"] = calibrated_nll(torch.log(probs.double().clamp_min(1e-30)).numpy(),
                                                            targets.numpy())
            history.append(row)
            if best.get("epoch") == 0:  # auto: the probe meets the best fine-tuned epoch at the end, not each epoch
                best = {}
            improved = is_new_best(row, best, validated=len(self.val_images) > 0)
            if improved:
                best = _best_of(row)
            bad_epochs = 0 if improved else bad_epochs + 1
            self._save_epoch(epoch, history, best, bad_epochs, improved)
            if self.hooks.on_epoch:
                self.hooks.on_epoch(row)
            if c.max_steps is not None and self.ctx.global_step >= c.max_steps:
                break
            if c.patience and bad_epochs >= c.patience:  # the same on every rank: validation is gathered
                stopped_early = True
                break
        return history, best, stopped_early

    def _keep_better(self, history: list, best: dict) -> dict:
        """--strategy auto: the best fine-tuned epoch (by the loss, as `full` keeps it) is kept only if
        it beats the probe on the validation images (probe.beats_probe: accuracy, ties by the calibrated
        loss); otherwise the probe's weights go back into model.safetensors. One comparison of two
        candidates: picking the most accurate of five epochs on 40 validation images against the probe
        kept mid-schedule epochs that tested up to 5 points under it (Fashion-MNIST, 20 per class)."""
        probe = self._probe_candidate(history)
        if probe is None or not best or best.get("epoch") == 0 or not len(self.val_images):
            return best
        tuned = next(row for row in history if row.get("epoch") == best["epoch"] and row.get("phase") != "probe")
        if beats_probe(tuned, probe):
            return best
        if self.rundir.writer:
            self.rundir.save_best(self.rundir.probe_weights(), self.arch, 0)
        best = _best_of(probe)
        self.rundir.write_config(self.run_config(best))
        return best

    def _probe_candidate(self, history: list) -> dict | None:
        """The probe's row when it is a candidate against the fine-tuned epochs (--strategy auto)."""
        if Strategy(self.config.strategy) == Strategy.auto and history and history[0].get("phase") == "probe":
            return history[0]
        return None

    def _evaluate(self, module: nn.Module, loader):
        """engine.evaluate over every process's slice, gathered: every image counted once."""
        stats, probs, targets, indices = evaluate(module, loader, VAL_LOSS, self.device, self.dtype,
                                                  self.runtime.channels_last, self.normalizer)
        if not self.rank.enabled:
            return stats, probs, targets, indices
        parts = distributed.all_gather((stats.loss * stats.samples if stats.samples else 0.0, probs, targets, indices,
                                        stats.skipped))
        skipped = [s for p in parts for s in p[4]]
        rows = [p for p in parts if len(p[3])]
        if not rows:
            return EpochStats(float("nan"), float("nan"), 0, skipped), probs, targets, indices
        probs, targets, indices = _gather_sorted(*(torch.cat([p[k] for p in rows]) for k in (1, 2, 3)), gathered=True)
        accuracy = float((probs.argmax(1) == targets).float().mean())
        return EpochStats(sum(p[0] for p in parts) / len(targets), accuracy, len(targets), skipped), probs, targets, indices

    def _check_skipped(self) -> None:
        """After the first epoch every image has been decoded once: a class with no readable
        image is bad input, and --strict fails on any skipped file now rather than at the end."""
        from .errors import DataError, StrictModeError

        self._merge_skipped()
        bad = _counts_by_label(self.train_images, self.skipped)
        empty = [self.classes[k] for k, (total, skipped) in bad.items() if total and total == skipped]
        if empty or (self.config.strict and self.skipped):
            listed = self.rundir.write_skipped(self.skipped)
        if empty:
            raise DataError(f"every image of class(es) {', '.join(empty)} is unreadable; see {listed}")
        if self.config.strict and self.skipped:
            raise StrictModeError(f"--strict: {len(self.skipped)} unreadable image(s) skipped; see {listed}")

    def _merge_skipped(self) -> None:
        """Every process's unreadable files, on every process (each read only its slice)."""
        for other in distributed.all_gather(dict(self.skipped)) if self.rank.enabled else ():
            self.skipped.update(other)

    # -- checkpoints
    def _save_epoch(self, epoch: int, history: list, best: dict, bad_epochs: int, improved: bool) -> None:
        """Checkpoint a finished epoch: to disk when --checkpoint-every seconds have passed since
        the last write (or on the last epoch), else as an in-memory copy that `_flush` writes on
        Ctrl-C, SIGTERM, a failure or the end of the run.

        A small dataset's epoch can take less time than the checkpoint: 15 images for 60 epochs spent
        6.3 of 9.9 s writing 60 MB of weights and optimizer state per epoch. A kill (SIGKILL, power)
        loses at most --checkpoint-every seconds of training; the resume from there is as exact.
        """
        if not self.rundir.writer:
            return  # rank 0 keeps the checkpoint; every rank holds the same state
        state = {
            "epoch": epoch + 1, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else {},
            "history": history, "best": best, "bad_epochs": bad_epochs, "global_step": self.ctx.global_step,
            "skipped": dict(self.skipped),
        }
        due = epoch + 1 >= self.config.epochs or time.monotonic() - self.last_save >= self.config.checkpoint_every
        if improved:
            self.pending_best = (state["model"] if due else copy.deepcopy(state["model"]), dict(best))
        self.pending_state = state if due else copy.deepcopy(state)
        if due:
            self._flush()

    def _flush(self) -> None:
        """Write the checkpoint `_save_epoch` kept in memory, if any."""
        if self.pending_best is not None:
            weights, best = self.pending_best
            self.rundir.save_best(weights, self.arch, best["epoch"])
            self.rundir.write_config(self.run_config(best))
        if self.pending_state is not None:
            self.rundir.save_state(self.pending_state)
        self.pending_best = self.pending_state = None
        self.last_save = time.monotonic()

    def _restore_model(self) -> dict:
        """The interrupted run's state; its weights go into the model now, before the plan caches
        features from the backbone (a fresh initialisation would otherwise be cached)."""
        state = self.rundir.load_state()
        self.model.load_state_dict(state["model"])
        return state

    def _restore(self, state: dict) -> tuple[int, list, dict, int]:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.ctx.global_step = state["global_step"]
        self.skipped.update(state.get("skipped", {}))
        return state["epoch"], list(state["history"]), dict(state["best"]), state["bad_epochs"]

    def _last_good(self, history: list) -> str:
        if history:
            return f"the last good checkpoint (epoch {history[-1]['epoch']}) is in {self.run_dir}"
        return "no epoch finished, so there is no checkpoint"

    # -- the end
    def finish(self, best: dict) -> dict:
        """Reload the best weights, evaluate them on the validation set and write the reports."""
        from . import metrics

        distributed.barrier()  # rank 0 wrote model.safetensors
        self.model.load_state_dict(self.rundir.best_weights())
        stats, probs, targets, _ = self._evaluate(self.model, self.val_loader)
        final = {}
        if len(targets):  # --val-split 0: nothing to report on
            result = metrics.summarize(probs.numpy(), targets.numpy(), self.classes, stats.loss)
            self.rundir.save_reports(result)
            final = {"final_val_accuracy": result.accuracy, "final_val_loss": result.loss}
            self._refit_probe(best)
        self.rundir.write_config(self.run_config(best, final or None, status="finished"))
        self.rundir.finish()
        self.rundir.save_plots()
        return final

    def _refit_probe(self, best: dict) -> None:
        """When the run keeps the probe and its validation images were split off the training folder,
        the saved probe is fitted again, the same way (C by cross-validation), on the training and
        validation images together: held out, they only chose between candidates, and a probe on
        a fifth more images is a better probe (scikit-learn's, on every labelled image, led ours by 1
        point at 100 digits per class). The validation figures and reports stay those of the fit on
        the training images alone, measured before; config.json records the refit."""
        if best.get("epoch") != 0 or not len(self.val_images) or data.find_split_folders(Path(self.config.data)):
            return  # a fine-tuned epoch kept, no validation images, or the user's own val/ folder: it stays held out
        train, val = self.probe_features or (_gather_sorted(*self._features(self.train_eval_loader)),
                                             _gather_sorted(*self._features(self.val_loader)))
        labels = torch.cat([train[1], val[1]])
        solution = self._fit_head(torch.cat([train[0], val[0]]), labels)
        if solution is None:
            return
        self.rundir.save_best(self.model.state_dict(), self.arch, 0)
        self.probe_refit = {"images": len(labels), "c": solution.c, "temperature": solution.temperature,
                            "cv_accuracy": solution.cv_accuracy, "folds": solution.folds, "how": solution.describe()}

    def run_config(self, best: dict, final: dict | None = None, status: str = "running") -> RunConfig:
        import timm

        counts = self.class_counts()
        weights = self.loaded.weights if not self.config.resume else self.saved.weights_source
        return RunConfig(
            model=self.arch, classes=self.classes, train_config=self.recorded_config(), weights_source=weights,
            data_config={k: list(v) if isinstance(v, tuple) else v for k, v in self.loaded.data_config.items()},
            hparams=self.hp, best=best, best_rule=self.best_rule, final=final, status=status,
            train_images=sum(c["train"] for c in counts.values()), val_images=sum(c["val"] for c in counts.values()),
            class_counts=counts, data_fingerprint=self.data_fingerprint, precision=self.runtime.precision,
            probe=self.probe_summary(), selection=self.selection,
            device=str(self.device), world_size=self.rank.world,
            versions={"torch": torch.__version__, "timm": timm.__version__})

    def recorded_config(self) -> dict:
        """The TrainConfig as config.json keeps it, to rebuild this run on --resume from any folder:
        the architecture actually built (also when --weights named a run directory, which leaves
        --model out) and absolute paths for the data, the weights and a model file."""
        from .config import to_dict

        values = to_dict(self.config)
        values.update(model=models.absolute_spec(self.arch), data=str(Path(self.config.data).resolve()))
        if self.config.weights not in (models.HUB, models.NONE):
            values["weights"] = str(Path(self.config.weights).resolve())
        for name in ("resume", "overwrite"):  # how this command was called, not a setting of the run
            values.pop(name)
        return values

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Readable images per class in the training and validation sets (unreadable files are
        known once decoded: before that, every file counts)."""
        counts = {name: {"train": 0, "val": 0} for name in self.classes}
        for split, images in (("train", self.train_images), ("val", self.val_images)):
            for label, (total, skipped) in _counts_by_label(images, self.skipped).items():
                counts[self.classes[label]][split] = total - skipped
        return counts

    def result(self, history: list, best: dict, stopped: bool, seconds: float) -> FitResult:
        self._merge_skipped()
        skipped_file = self.rundir.write_skipped(self.skipped)
        counts = self.class_counts()
        return FitResult(self.run_dir, self.classes, history, best, stopped, seconds, str(self.device),
                         self.runtime.precision, sum(c["train"] for c in counts.values()),
                         sum(c["val"] for c in counts.values()), len(self.skipped), skipped_file, self.hp, self.notes,
                         counts, world_size=self.rank.world, probe=self.probe_summary(),
                         strategy=Strategy(self.config.strategy).value, selection=self.selection,
                         best_rule=self.best_rule)

    @property
    def best_rule(self) -> str:
        """How the kept epoch was chosen, as the summary and config.json say it (is_new_best)."""
        return AUTO_RULE if Strategy(self.config.strategy) == Strategy.auto else BEST_RULE

    def probe_summary(self) -> dict | None:
        """What config.json and the summary say of the probe: its strength, how it was chosen, and
        its training and validation figures (None when the run did not fit one)."""
        fit, row = self.probe_fit, self.probe_row
        refit = {"refit": self.probe_refit} if self.probe_refit else {}
        if fit is None:
            saved = self.saved.probe if self.saved is not None else None
            return {**saved, **refit} if saved else None
        return {**refit, "c": fit.c, "temperature": fit.temperature, "cv_accuracy": fit.cv_accuracy, "cv_loss": fit.cv_loss,
                "folds": fit.folds,
                "how": fit.describe(), "seconds": round(fit.seconds, 3), "searched": fit.searched,
                **{k: row[k] for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy")}}


def _prepare_output(config: TrainConfig) -> None:
    rundir.prepare(config.out, config.overwrite, config.resume)


def _probe_metrics(fit: ProbeFit, features: tuple, split: str) -> dict:
    """{split_loss, split_accuracy} of the probe on (features, labels, indices): plain cross-entropy."""
    feats, labels, _ = features
    if not len(labels):
        return {f"{split}_loss": float("nan"), f"{split}_accuracy": float("nan")}
    weight, bias = fit.head()
    logits = feats.float() @ weight.T + bias  # what the model's classifier computes
    return {f"{split}_loss": float(VAL_LOSS(logits, labels)), f"{split}_accuracy": float((logits.argmax(1) == labels).float().mean())}


def _counts_by_label(images: data.ImageList, skipped: dict[str, str]) -> dict[int, tuple[int, int]]:
    """{label: (images, skipped images)} for the classes of `images`."""
    out: dict[int, list[int]] = {}
    for path, label in zip(images.paths, images.labels):
        entry = out.setdefault(label, [0, 0])
        entry[0] += 1
        entry[1] += str(path) in skipped
    return {k: (v[0], v[1]) for k, v in out.items()}


def _gather_sorted(feats: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, gathered: bool = False):
    """Every process's rows, in dataset order (one process, or `gathered` already: sorted)."""
    if distributed.current().enabled and not gathered:
        parts = [p for p in distributed.all_gather((feats, labels, indices)) if len(p[2])]
        if not parts:
            return feats, labels, indices
        feats, labels, indices = (torch.cat([p[k] for p in parts]) for k in range(3))
    if not len(indices):
        return feats, labels, indices
    order = torch.argsort(indices)
    return feats[order], labels[order], indices[order]


def _reduce_stats(stats: EpochStats) -> EpochStats:
    """An epoch's training loss and accuracy over every process's images."""
    if not distributed.current().enabled:
        return stats
    parts = distributed.all_gather((stats.loss * stats.samples, stats.accuracy * stats.samples, stats.samples, stats.skipped))
    n = sum(p[2] for p in parts)
    return EpochStats(sum(p[0] for p in parts) / max(n, 1), sum(p[1] for p in parts) / max(n, 1), n,
                      [s for p in parts for s in p[3]])


def _average_norm_statistics(model: nn.Module) -> None:
    """BatchNorm running statistics averaged over the processes (each saw its own slice), so that
    evaluation and the saved weights are the same on every rank."""
    if not distributed.current().enabled:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            if module.running_mean is not None:
                distributed.all_reduce_(module.running_mean, op="mean")
                distributed.all_reduce_(module.running_var, op="mean")
