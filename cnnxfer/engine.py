"""The one training loop, shared by `finetune`, `train` and the overfit sanity check.

`fit` differs between the commands only through TrainConfig fields: where the weights come
from (`weights`) and which parameters train (`strategy`). The loop itself is torchvision's
`train_one_epoch` / `evaluate` split: AMP (bf16 autocast, fp16 + GradScaler), channels_last,
cosine schedule with warmup, gradient clipping, early stopping, a NaN guard, an OOM hint, and a
frozen-backbone feature cache for the linear strategy.

Determinism: every epoch reseeds torch/numpy/random from (seed, epoch) and the training
loader's order (shuffle, or the balanced sampler's draw) and augmentation likewise through
`Loader.set_epoch`, so a run resumed from its last epoch checkpoint repeats exactly what the
uninterrupted run would have done (same machine and versions). `resume_config` gives a resumed
run its own settings back; a run with no finished epoch starts again from the beginning.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import data, device as dev, loader as loaders, models
from .config import CacheImages, Optimizer, Strategy, TrainConfig, resumed_config
from .preprocess import Augment, Normalize, Preprocess
from .errors import TrainingError
from .signals import check_signals, deferred_signals

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


BatchHook = Callable[[int, int, float], None]  # (step in epoch, steps in epoch, loss)
FEW_STEPS = 100  # fewer optimizer steps in a whole run than this gets a note
BEST_RULE = "the lowest validation loss"  # how the best epoch is chosen (is_new_best), as the summary says it


# ---------------------------------------------------------------- hyperparameters

def auto_batch_size(n_train: int) -> int:
    """BATCH_SIZE when the training images fill 8 such batches; else about an eighth of them (at
    least 4), in equal batches that leave fewer images out of an epoch than there are batches.

    64 on 15 images made one optimizer step per epoch (a ragged last batch takes none); 15 images
    now give 3 batches of 5.
    """
    from .config import BATCH_SIZE

    if n_train >= 8 * BATCH_SIZE:
        return BATCH_SIZE
    batches = max(1, n_train // max(4, n_train // 8))
    return max(1, n_train // batches)


def auto_epochs(n_train: int, batch_size: int, from_scratch: bool) -> int:
    """FINETUNE_EPOCHS (TRAIN_EPOCHS from scratch), or more when that is under MIN_STEPS optimizer
    steps: a small dataset needs more passes for the same number of updates."""
    from .config import FINETUNE_EPOCHS, MIN_STEPS, TRAIN_EPOCHS

    return max(TRAIN_EPOCHS if from_scratch else FINETUNE_EPOCHS, math.ceil(MIN_STEPS / epoch_steps(n_train, batch_size)))


def resolve_schedule(config: TrainConfig, n_train: int) -> tuple[TrainConfig, str | None]:
    """The config with --batch-size and --epochs chosen from the number of training images where
    the user left them out, and a note saying so when the choice is not the large-dataset default.
    The run saves this config, so --resume continues with exactly these values."""
    import dataclasses

    from .config import BATCH_SIZE, FINETUNE_EPOCHS, TRAIN_EPOCHS

    from_scratch = config.weights == models.NONE
    batch_size = config.batch_size or auto_batch_size(n_train)
    epochs = config.epochs or auto_epochs(n_train, batch_size, from_scratch)
    chosen = {"--batch-size": batch_size} if config.batch_size is None and batch_size != BATCH_SIZE else {}
    if config.epochs is None and epochs != (TRAIN_EPOCHS if from_scratch else FINETUNE_EPOCHS):
        chosen["--epochs"] = epochs
    note = None
    if chosen:
        steps = epochs * epoch_steps(n_train, batch_size)
        note = (f"{n_train} training images: {' and '.join(f'{k} {v}' for k, v in chosen.items())} chosen "
                f"({steps} optimizer steps in all); set {' and '.join(chosen)} to choose otherwise")
    return dataclasses.replace(config, batch_size=batch_size, epochs=epochs), note


def resolve_hparams(config: TrainConfig) -> dict:
    """Defaults that depend on the run: SGD for training from scratch, AdamW for fine-tuning."""
    from_scratch = config.weights == models.NONE
    optimizer = config.optimizer or (Optimizer.sgd if from_scratch else Optimizer.adamw)
    optimizer = Optimizer(optimizer)
    if config.lr is not None:
        lr = config.lr
    elif optimizer == Optimizer.sgd:
        lr = 0.1 * config.batch_size / 256 * (4 if from_scratch else 1)
    else:
        lr = 1e-3 if config.strategy != Strategy.linear else 3e-3
    weight_decay = config.weight_decay if config.weight_decay is not None else (5e-4 if optimizer == Optimizer.sgd else 0.05)
    mult = 1.0 if from_scratch else config.backbone_lr_mult
    return {"optimizer": optimizer.value, "lr": lr, "weight_decay": weight_decay, "backbone_lr_mult": mult}


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


def cosine_with_warmup(optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to each group's lr, then cosine decay to zero, stepped per batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- the loop

def _to_device(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    x = x.to(ctx.device, non_blocking=True)
    if x.dtype == torch.uint8:
        assert ctx.normalizer is not None, "uint8 images need a Normalize module"
        x = ctx.normalizer(x)
    if ctx.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def train_step(ctx: StepContext, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """One optimisation step; returns (loss, correct). Raises TrainingError on a non-finite loss."""
    x, y = _to_device(inputs, ctx), targets.to(ctx.device, non_blocking=True)
    with dev.autocast(ctx.device, ctx.dtype):
        logits = ctx.module(x)
        loss = ctx.loss_fn(logits.float(), y)
    if not torch.isfinite(loss):
        group = ctx.optimizer.param_groups[-1]  # the head's: lr now, and the peak the schedule started from
        lr, peak = group["lr"], group.get("initial_lr", group["lr"])
        raise TrainingError(
            f"loss became {loss.item()} at step {ctx.global_step + 1} (learning rate {lr:.3g}, peak --lr {peak:.3g}): "
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
        if len(batch.labels) == 0 or i >= steps:
            continue
        if ctx.max_steps is not None and ctx.global_step >= ctx.max_steps:
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


@torch.inference_mode()
def evaluate(module: nn.Module, loader, loss_fn: nn.Module, device: torch.device, dtype: torch.dtype | None,
             channels_last: bool = False, normalizer: Normalize | None = None,
             ) -> tuple[EpochStats, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss/accuracy over `loader` in eval mode; also (probabilities, targets, dataset indices)."""
    was_training = module.training
    module.eval()
    probs, targets, indices, skipped = [], [], [], []
    total_loss = 0.0
    ctx = StepContext(module, None, None, None, loss_fn, device, dtype, channels_last=channels_last, normalizer=normalizer)
    for batch in loader:
        check_signals()
        skipped += batch.skipped
        if len(batch.labels) == 0:
            continue
        x, y = _to_device(batch.images, ctx), batch.labels.to(device)
        with dev.autocast(device, dtype):
            logits = module(x).float()
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


def oom_message(ctx: StepContext, batch) -> str:
    """Out of memory: find by halving the largest batch size that does one step, and say it."""
    bs = len(batch.labels)
    fits = find_fitting_batch_size(ctx, batch.images[:1], bs)
    hint = f"--batch-size {fits} fits" if fits else "even --batch-size 1 does not fit; try a smaller --img-size or model"
    return f"out of memory on {ctx.device} at batch size {bs}: {hint}"


def find_fitting_batch_size(ctx: StepContext, sample: torch.Tensor, batch_size: int) -> int | None:
    """The largest power-of-two fraction of `batch_size` for which a forward+backward fits."""
    bs = batch_size // 2
    while bs >= 1:
        try:
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            x = _to_device(sample.expand(bs, *sample.shape[1:]).clone(), ctx)
            with dev.autocast(ctx.device, ctx.dtype):
                ctx.module(x).float().sum().backward()
            ctx.module.zero_grad(set_to_none=True)
            return bs
        except torch.OutOfMemoryError:
            ctx.module.zero_grad(set_to_none=True)
            bs //= 2
    return None


# ---------------------------------------------------------------- fit: finetune and train

@dataclass
class FitHooks:
    """Optional callbacks the CLI's progress display plugs into."""

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


def split_data(config: TrainConfig) -> tuple[data.ImageList, data.ImageList]:
    """train/ and val/ folders when DATA has them, else a stratified, seeded --val-split.

    The train list's warnings (shown as notes) name the empty class folders left out and the
    classes too small to validate or to split in proportion.
    """
    folders = data.find_split_folders(config.data)
    if folders:
        train = data.discover(folders[0], labelled=True)
        val = data.discover(folders[1], labelled=True, classes=train.classes)
        train.warnings += val.warnings
        unseen = [c for c, n in val.class_counts().items() if not n]
        if unseen:
            train.warnings.append(f"{folders[1]} holds no image of class(es) {', '.join(unseen)}: validation never sees them")
        return train, val
    images = data.discover(config.data, labelled=True)
    if len(images.classes) < 2:
        from .errors import DataError

        found = f"{len(images.classes)} class with images ({', '.join(images.classes)})" if images.classes else "no class"
        raise DataError(f"{config.data}: found {found}; classification needs at least 2")
    train_idx, val_idx = data.stratified_split(images.labels, config.val_split, config.seed)
    train, val = images.subset(train_idx), images.subset(val_idx)
    train.warnings, train.ignored = images.warnings + _small_classes(images, val, config.val_split), images.ignored
    return train, val


def _small_classes(images: data.ImageList, val: data.ImageList, val_split: float) -> list[str]:
    """A note naming the classes with too few images to hold out `val_split` of them: one image
    trains and validation never sees the class; a few have one held out, more than their share."""
    if not val_split:
        return []  # no validation asked for
    totals, held = images.class_counts(), val.class_counts()
    small = []
    for name, n in totals.items():
        if held[name] == 0:
            small.append(f"{name} ({n} image{'s' if n > 1 else ''}: none held out, so validation never sees it)")
        elif round(n * val_split) == 0:  # rounded down to none, yet one is held out: not `val_split` of it
            small.append(f"{name} ({n} images: {held[name]} held out)")
    if not small:
        return []
    split = f"{(1 - val_split) * 100:.0f}/{val_split * 100:.0f}"
    return [f"class(es) too small to split {split} for validation: {', '.join(small)}; add images or give train/ and "
            f"val/ folders"]


def auto_img_size(images: data.ImageList, sample: int = 64) -> int | None:
    """For small images (median side <= 64 px, e.g. digits), train at about their own size
    instead of upscaling to the model's 224: same information, a fraction of the compute."""
    sizes = [data.image_size(path) for path in images.paths[:: max(1, len(images) // sample)][:sample]]
    sides = [max(size) for size in sizes if size]
    if not sides:
        return None
    median = float(np.median(sides))
    return int(max(32, math.ceil(median / 8) * 8)) if median <= 64 else None


def crop_scale(data_config: dict) -> tuple[float, float]:
    """The area range of the random resized crop. The photo default keeps as little as 35% of
    the image; at 64 px or less (digits, icons, CIFAR-like data) the object fills the frame and such
    crops cut it apart. sklearn digits at 32 px, resnet10t, 10 epochs, last-epoch accuracy over
    seeds 0/1/2: (0.35, 1) 97.8/97.7/98.3%, (0.6, 1) 98.3/98.6/98.3%, (0.8, 1) 98.6/98.3/98.0%."""
    return (0.6, 1.0) if max(data_config["input_size"][1:]) <= 64 else (0.35, 1.0)


class _Run:
    """The state of one fit: data, model, the module being optimised, and the run directory."""

    def __init__(self, config: TrainConfig, hooks: FitHooks):
        from . import checkpoint

        self.hooks = hooks
        self.run_dir = Path(config.out)
        checkpoint.prepare_output(self.run_dir, config.overwrite, config.resume)
        self.runtime = dev.resolve_runtime(config.device, config.precision, config.num_workers)
        self.device, self.dtype, self.channels_last = self.runtime.device, self.runtime.dtype, self.runtime.channels_last
        # a resumed run takes its weights from state.pt: the original --weights need not exist any more
        models.check_model_options(config.model, models.NONE if config.resume else config.weights)
        self.train_images, self.val_images = split_data(config)
        self.data_fingerprint = data.fingerprint(self.train_images) + data.fingerprint(self.val_images)
        self.classes = self.train_images.classes
        self.notes: list[str] = []
        for warning in self.train_images.warnings:
            self.note(warning)
        self.config, chosen = resolve_schedule(config, len(self.train_images))
        config = self.config
        if chosen:
            self.note(chosen)
        self.img_size = config.img_size or (auto_img_size(self.train_images) if config.weights == models.NONE else None)
        if self.img_size and not config.img_size:
            self.note(f"small images: training at {self.img_size} px (set --img-size to change)")
        if config.patience and not len(self.val_images):
            self.note("--patience is ignored without a validation set (--val-split 0): the last epoch is kept")
        self.hp = resolve_hparams(config)
        self.skipped: dict[str, str] = {}
        self.saved: dict = {}
        self.pending_best: tuple[dict, dict] | None = None  # (weights, best row) not yet written
        self.pending_state: dict | None = None
        self.last_save = time.monotonic()

    def note(self, text: str) -> None:
        """Something the user should know about this run: kept for FitResult.notes and shown now."""
        self.notes.append(text)
        if self.hooks.on_message:
            self.hooks.on_message(text)

    # -- model and modules
    def build_model(self, weights: str | None) -> None:
        loaded = models.load_model(self.config.model, weights, len(self.classes), drop_rate=self.config.dropout,
                                   img_size=self.img_size, classes=self.classes)
        self.loaded, self.arch = loaded, loaded.arch
        for note in loaded.notes:
            self.note(note)
        self.model = loaded.model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.head_names = models.head_parameter_names(self.model)
        self.groups = models.stage_groups(self.model)

    def build_loaders(self) -> None:
        """Train, validation and un-augmented train loaders, from disk or from images decoded once.

        Training images are decoded as the augmentation needs them (random crops keep real pixels)
        by every reader, so the un-augmented pass over them and the image cache see the same
        pixels; validation images as the eval transform needs them.
        """
        c, rt = self.config, self.runtime
        pre = Preprocess.from_data_config(self.loaded.data_config, max_pixels=c.max_image_pixels,
                                          reduced_decode=c.reduced_decode)
        self.normalizer = pre.normalizer().to(self.device)
        augment = Augment(scale=crop_scale(self.loaded.data_config), hflip=c.hflip) if c.augment else None
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
        common = dict(threads=rt.decode_threads, ahead=rt.ahead, pin_memory=rt.pin_memory)
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
        cache (one pass), nor for one epoch.
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

    def loss_fn(self) -> nn.Module:
        weight = None
        if self.config.balance.value == "loss":
            counts = np.bincount(self.train_images.labels, minlength=len(self.classes)).astype(float)
            weight = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=self.device)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=self.config.label_smoothing)

    # -- strategy
    def setup_strategy(self) -> None:
        """The module to optimise and its loaders: a head on cached features, a frozen-backbone
        probe, or the whole model (gradual unfreezing then widens the trainable set per epoch)."""
        c, strategy = self.config, Strategy(self.config.strategy)
        self.module, self.loaders = self.model, (self.train_loader, self.val_loader)
        opt_module, head_names = self.model, self.head_names
        if strategy == Strategy.linear:
            models.set_trainable(self.model, self.head_names)
            classifier = self.model.get_submodule(models.classifier_names(self.model)[0])
            head = nn.Sequential(nn.Dropout(c.dropout), classifier)
            if c.cache_features:
                self.loaders = self._cached_loaders()
                self.module = head
            else:
                self.module = LinearProbe(self.model, head)
            opt_module, head_names = head, {n for n, _ in head.named_parameters()}
        self.optimizer = build_optimizer(opt_module, head_names, self.hp, c.momentum)
        steps = steps_per_epoch(self.loaders[0])
        if steps * c.epochs < FEW_STEPS and not c.max_steps:
            self.note(f"{len(self.train_images)} training images at --batch-size {c.batch_size} give {steps} optimizer "
                      f"step(s) per epoch, {steps * c.epochs} in all: with few images, raise --epochs (a few hundred "
                      f"steps is usual) or lower --batch-size")
        self.scheduler = cosine_with_warmup(self.optimizer, c.epochs * steps, int(c.warmup_epochs * steps))
        use_scaler = self.dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.ctx = StepContext(self.module, self.optimizer, self.scheduler, self.scaler, self.loss_fn(), self.device,
                               self.dtype, c.grad_clip, self.channels_last, 0, c.max_steps, self.normalizer)

    def set_phase(self, epoch: int) -> str:
        """Which parameters train in `epoch`; frozen BatchNorms stay in eval mode."""
        strategy = Strategy(self.config.strategy)
        if strategy == Strategy.linear:
            return "head"
        if strategy == Strategy.full:
            models.set_trainable(self.model, None)
            return "all"
        unfrozen = epoch - self.config.head_epochs + 1  # gradual: top stage groups, one more each epoch
        if unfrozen <= 0:
            models.set_trainable(self.model, self.head_names)
            return "head"
        trainable = set(self.head_names).union(*self.groups[max(0, len(self.groups) - unfrozen):])
        models.set_trainable(self.model, trainable)
        return "all" if unfrozen >= len(self.groups) else f"head+{unfrozen} group(s)"

    def _cached_loaders(self):
        """Run the frozen backbone once over un-augmented train and val images."""
        c = self.config
        out = []
        for loader, shuffle in ((self.train_eval_loader, True), (self.val_loader, False)):
            feats, labels, indices = self._features(loader)
            out.append(loaders.Loader(FeatureDataset(feats, labels, indices), c.batch_size, shuffle=shuffle, seed=c.seed))
        return tuple(out)

    @torch.inference_mode()
    def _features(self, loader):
        self.model.eval()
        feats, labels, indices = [], [], []
        for batch in loader:
            check_signals()
            self._record_skipped(loader, batch.skipped)
            if len(batch.labels) == 0:
                continue
            x = _to_device(batch.images, StepContext(None, None, None, None, None, self.device, None,
                                                     channels_last=self.channels_last, normalizer=self.normalizer))
            with dev.autocast(self.device, self.dtype):
                feats.append(models.pre_logits(self.model, x).float().cpu())
            labels.append(batch.labels)
            indices.append(batch.indices)
        if not feats and len(loader.dataset):
            from .errors import DataError

            raise DataError(f"{self.config.data}: no image could be read")
        if not feats:  # --val-split 0: no validation images
            return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
        return torch.cat(feats), torch.cat(labels), torch.cat(indices)

    def _record_skipped(self, loader, skipped) -> None:
        images = getattr(loader.dataset, "images", None)
        for i, reason in skipped:
            if images is not None:
                self.skipped[str(images.paths[i])] = reason

    # -- epochs, checkpoints, resume
    def run_epochs(self, start_epoch: int, history: list, best: dict, bad_epochs: int) -> tuple[list, dict, bool]:
        c = self.config
        stopped_early = False
        for epoch in range(start_epoch, c.epochs):
            check_signals()
            epoch_seed = c.seed * 1000 + epoch
            seed_everything(epoch_seed)
            self.loaders[0].set_epoch(epoch)
            phase = self.set_phase(epoch)
            self.module.train()
            for m in models.frozen_norm_modules(self.model):
                m.eval()
            start = time.perf_counter()
            stats = train_one_epoch(self.ctx, self.loaders[0], self.hooks.on_batch)
            self._record_skipped(self.loaders[0], stats.skipped)
            val, *_ = evaluate(self.module, self.loaders[1], self.ctx.loss_fn, self.device, self.dtype, self.channels_last,
                               self.normalizer)
            self._record_skipped(self.loaders[1], val.skipped)
            if epoch == start_epoch:
                self._check_skipped()
            row = {"epoch": epoch + 1, "phase": phase, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                   "val_loss": val.loss, "val_accuracy": val.accuracy, "lr": self.optimizer.param_groups[-1]["lr"],
                   "seconds": time.perf_counter() - start}
            history.append(row)
            improved = is_new_best(row, best, validated=len(self.val_images) > 0)
            if improved:
                best = {k: row[k] for k in ("epoch", "val_loss", "val_accuracy", "train_loss", "train_accuracy")}
            bad_epochs = 0 if improved else bad_epochs + 1
            self.save_epoch(epoch, history, best, bad_epochs, improved)
            if self.hooks.on_epoch:
                self.hooks.on_epoch(row)
            if c.max_steps is not None and self.ctx.global_step >= c.max_steps:
                break
            if c.patience and bad_epochs >= c.patience:
                stopped_early = True
                break
        return history, best, stopped_early

    def _check_skipped(self) -> None:
        """After the first epoch every image has been decoded once: a class with no readable
        image is bad input, and --strict fails on any skipped file now rather than at the end."""
        from .errors import DataError, StrictModeError

        bad = _counts_by_label(self.train_images, self.skipped)
        empty = [self.classes[k] for k, (total, skipped) in bad.items() if total and total == skipped]
        if empty or (self.config.strict and self.skipped):
            listed = data.write_skipped(self.run_dir / "skipped.csv", sorted(self.skipped.items()))
        if empty:
            raise DataError(f"every image of class(es) {', '.join(empty)} is unreadable; see {listed}")
        if self.config.strict and self.skipped:
            raise StrictModeError(f"--strict: {len(self.skipped)} unreadable image(s) skipped; see {listed}")

    def save_epoch(self, epoch: int, history: list, best: dict, bad_epochs: int, improved: bool) -> None:
        """Checkpoint a finished epoch: to disk when --checkpoint-every seconds have passed since
        the last write (or on the last epoch), else as an in-memory copy that `flush` writes on
        Ctrl-C, SIGTERM, a failure or the end of the run.

        A small dataset's epoch can take less time than the checkpoint: 15 images for 60 epochs spent
        6.3 of 9.9 s writing 60 MB of weights and optimizer state per epoch. A kill (SIGKILL, power)
        loses at most --checkpoint-every seconds of training; the resume from there is as exact.
        """
        import copy

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
            self.flush()

    def flush(self) -> None:
        """Write the checkpoint `save_epoch` kept in memory, if any."""
        from . import checkpoint

        if self.pending_best is not None:
            weights, best = self.pending_best
            checkpoint.save_state_dict(self.run_dir / checkpoint.MODEL_FILE, weights,
                                       {"format": "pt", "arch": self.arch, "epoch": best["epoch"]})
            self.write_config(best)
        if self.pending_state is not None:
            checkpoint.save_training_state(self.run_dir / checkpoint.STATE_FILE, self.pending_state)
            write_metrics_csv(self.run_dir / "metrics.csv", self.pending_state["history"])
        self.pending_best = self.pending_state = None
        self.last_save = time.monotonic()

    def start_run_dir(self) -> None:
        """A new run's directory: a previous run's files gone (--overwrite), then config.json, so that
        an interrupt from here on leaves a run that --resume can start again."""
        from . import checkpoint

        if self.config.overwrite:
            checkpoint.clear_run(self.run_dir)
        self.write_config({})

    def write_config(self, best: dict, final: dict | None = None, status: str = "running") -> None:
        import timm

        from . import checkpoint

        counts = self.class_counts()
        checkpoint.atomic_write_json(self.run_dir / checkpoint.CONFIG_FILE, {
            "model": self.arch, "classes": self.classes, "num_classes": len(self.classes),
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.loaded.data_config.items()},
            "weights_source": self.loaded.weights if not self.config.resume else self.saved.get("weights_source"),
            "hparams": self.hp, "best": best, "best_rule": BEST_RULE, "final": final, "status": status,
            "train_images": sum(c["train"] for c in counts.values()), "val_images": sum(c["val"] for c in counts.values()),
            "class_counts": counts, "data_fingerprint": self.data_fingerprint,
            "precision": str(self.dtype).replace("torch.", "") if self.dtype else "float32",
            "device": str(self.device), "versions": {"torch": torch.__version__, "timm": timm.__version__},
            "train_config": self.recorded_config(),
        })

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

    def restore_model(self) -> dict:
        """The interrupted run's state; its weights go into the model now, before setup_strategy
        caches features from the backbone (a fresh initialisation would otherwise be cached)."""
        from . import checkpoint

        state = checkpoint.load_training_state(self.run_dir / checkpoint.STATE_FILE)
        self.model.load_state_dict(state["model"])
        return state

    def restore(self, state: dict) -> tuple[int, list, dict, int]:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.ctx.global_step = state["global_step"]
        self.skipped.update(state.get("skipped", {}))
        return state["epoch"], list(state["history"]), dict(state["best"]), state["bad_epochs"]


def _counts_by_label(images: data.ImageList, skipped: dict[str, str]) -> dict[int, tuple[int, int]]:
    """{label: (images, skipped images)} for the classes of `images`."""
    out: dict[int, list[int]] = {}
    for path, label in zip(images.paths, images.labels):
        entry = out.setdefault(label, [0, 0])
        entry[0] += 1
        entry[1] += str(path) in skipped
    return {k: (v[0], v[1]) for k, v in out.items()}


def _finite(x: float) -> float:
    return x if x == x and math.isfinite(x) else float("inf")


def is_new_best(row: dict, best: dict, validated: bool = True) -> bool:
    """The one rule for the best epoch and for --patience: an epoch is the new best when its
    validation loss is lower than every earlier epoch's; --patience N stops after N epochs with no
    new best. Loss rather than accuracy: it moves with every image, where accuracy on a small
    validation set ties or jumps by whole images. Without a validation set (--val-split 0) every
    epoch is the new best: the last one is kept and the run never stops early."""
    if not best or not validated:
        return True
    return _finite(row["val_loss"]) < _finite(best["val_loss"])


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    import pandas as pd

    from . import checkpoint

    checkpoint.atomic_write_text(path, pd.DataFrame(history).to_csv(index=False))


def fit(config: TrainConfig, hooks: FitHooks | None = None) -> FitResult:
    """Train a classifier on `config.data` into the run directory `config.out` (finetune and train).

    With `config.resume` (a config from `resume_config`), `config.out` is an interrupted run: it
    continues after its last saved epoch, or starts again when no epoch had finished.
    """
    from . import checkpoint

    start = time.perf_counter()
    saved, restart = {}, False
    if config.resume:
        saved = _resumable_run(Path(config.out))
        config = resume_config(config.out, **_differences(config, resumed_config(saved, config.out)))
        restart = checkpoint.resume_point(config.out) == "start"
        if restart:  # nothing to continue from: the same run from its beginning
            config = dataclasses.replace(config, resume=False, overwrite=True)
    hooks = hooks or FitHooks()
    run = _Run(config, hooks)
    run.saved = saved
    if restart:
        run.note("no epoch of the interrupted run had finished: it starts again from the beginning")
    if hooks.on_start:
        hooks.on_start(run.config)
    if config.resume:
        _check_same_data(run, saved)
    seed_everything(config.seed)  # the random initialisation of the model and head
    run.build_model(models.NONE if config.resume else config.weights)
    if config.resume:
        run.loaded.data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["data_config"].items()}
    else:
        run.start_run_dir()
    with deferred_signals():
        history, best, stopped = _train(run)
        final = finish_run(run, best)
    (run.run_dir / checkpoint.STATE_FILE).unlink(missing_ok=True)  # complete: nothing left to resume
    skipped_file = data.write_skipped(run.run_dir / "skipped.csv", sorted(run.skipped.items()))
    counts = run.class_counts()
    return FitResult(run.run_dir, run.classes, history, dict(best, **final), stopped, time.perf_counter() - start,
                     str(run.device), str(run.dtype).replace("torch.", "") if run.dtype else "float32",
                     sum(c["train"] for c in counts.values()), sum(c["val"] for c in counts.values()), len(run.skipped),
                     skipped_file, run.hp, run.notes, counts)


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
    trained = saved.get("precision")
    now = dev.resolve_runtime(config.device, config.precision, config.num_workers).precision
    if trained and now != trained:
        from .errors import UsageError

        raise UsageError(f"--precision {config.precision.value} trains in {now} on this device; the run trained in "
                         f"{trained}: leave --precision out to resume in {trained}")
    return config


def _differences(config: TrainConfig, ours: TrainConfig) -> dict:
    """The fields of `config` that differ from the run's own settings `ours`: what was given. None
    is never given: it means "choose for me" (--batch-size, --epochs), and the run has chosen."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if getattr(config, f.name) is not None and getattr(config, f.name) != getattr(ours, f.name)}


def _check_same_data(run: _Run, saved: dict) -> None:
    """A resumed run must read the images it was trained on: same classes, same files."""
    from .errors import DataError

    where = f"--resume {run.run_dir}: {run.config.data}"
    if saved.get("classes") and saved["classes"] != run.classes:
        raise DataError(f"{where} now holds classes {run.classes}, the run was trained on {saved['classes']}")
    if saved.get("data_fingerprint") and saved["data_fingerprint"] != run.data_fingerprint:
        raise DataError(f"{where} does not hold the images the run was trained on (files were added, removed or "
                        f"changed since it started); a resumed run must read the same images")


def _train(run: _Run) -> tuple[list, dict, bool]:
    """Loaders, strategy, then the epochs; failures name the last good checkpoint."""
    history: list = []
    try:
        run.build_loaders()
        state = run.restore_model() if run.config.resume else None
        run.setup_strategy()
        start_epoch, history, best, bad = run.restore(state) if state else (0, history, {}, 0)
        try:
            return run.run_epochs(start_epoch, history, best, bad)
        finally:  # also on Ctrl-C, SIGTERM and a non-finite loss: the last finished epoch on disk
            run.flush()
    except TrainingError as exc:
        raise TrainingError(f"{exc}; {_last_good(run, history)}") from exc
    except torch.OutOfMemoryError as exc:  # the training step has its own hint; this is evaluation or the feature cache
        bs = run.config.batch_size
        raise TrainingError(f"out of memory on {run.device} outside the training step (evaluation or feature cache) at "
                            f"batch size {bs}: try --batch-size {max(1, bs // 2)}; {_last_good(run, history)}") from exc


def _last_good(run: _Run, history: list) -> str:
    if history:
        return f"the last good checkpoint (epoch {history[-1]['epoch']}) is in {run.run_dir}"
    return "no epoch finished, so there is no checkpoint"


def _resumable_run(run_dir: Path) -> dict:
    """The config.json of an unfinished run (see checkpoint.resume_point), else UsageError."""
    from . import checkpoint
    from .errors import UsageError

    if not (run_dir / checkpoint.CONFIG_FILE).is_file():
        raise UsageError(f"--resume {run_dir}: not a cnnxfer run directory (no config.json)")
    if checkpoint.resume_point(run_dir) is None:
        raise UsageError(f"--resume {run_dir}: nothing to resume: the run finished (--overwrite starts it again)")
    return checkpoint.load_run_config(run_dir)


def finish_run(run: _Run, best: dict) -> dict:
    """Reload the best weights, evaluate them on the validation set and write the reports."""
    from . import checkpoint, metrics

    state = models.read_weights_file(run.run_dir / checkpoint.MODEL_FILE)
    run.model.load_state_dict(state)
    stats, probs, targets, _ = evaluate(run.model, run.val_loader, run.ctx.loss_fn, run.device, run.dtype, run.channels_last,
                                        run.normalizer)
    final = {}
    if len(targets):  # --val-split 0: nothing to report on
        result = metrics.summarize(probs.numpy(), targets.numpy(), run.classes, stats.loss)
        metrics.save_reports(run.run_dir, result)
        final = {"final_val_accuracy": result.accuracy, "final_val_loss": result.loss}
    run.write_config(best, final or None, status="finished")
    return final
