"""What a run trains on and with which settings, chosen for the user where left out: the
train/validation split, the input size for small images, the crop scale, the batch size and
number of epochs from the dataset size, and the optimizer's hyperparameters.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from . import data, models
from .config import BnStats, Optimizer, Strategy, TrainConfig
from .engine import epoch_steps

FEW_STEPS = 100  # fewer optimizer steps in a whole run from scratch than this gets a note
FEW_FINETUNE_STEPS = 25  # likewise when fine-tuning pretrained weights, which starts from the probe


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
    """From scratch: TRAIN_EPOCHS, or more when that is under MIN_STEPS optimizer steps (a small
    dataset needs more passes for the same number of updates). Fine-tuning pretrained weights:
    FINETUNE_EPOCHS, or more when that is under MIN_FINETUNE_STEPS.

    Fine-tuning starts from the probe's head (LP-FT) and needs few passes: EfficientNet-Lite0 on 20
    Fashion-MNIST images per class validated best at epoch 2-3 of 5 and of 10, and 5 epochs tested
    82.9%/81.9% against 82.6% for 10 (1,000 test images); the old rule (at least 300 steps) meant
    38 epochs and 7 minutes on 164 photos, whose best epoch was the 7th."""
    from .config import FINETUNE_EPOCHS, MIN_FINETUNE_STEPS, MIN_STEPS, TRAIN_EPOCHS

    epochs, steps = (TRAIN_EPOCHS, MIN_STEPS) if from_scratch else (FINETUNE_EPOCHS, MIN_FINETUNE_STEPS)
    return max(epochs, math.ceil(steps / epoch_steps(n_train, batch_size)))


def resolve_schedule(config: TrainConfig, n_train: int) -> tuple[TrainConfig, str | None]:
    """The config with --batch-size and --epochs chosen from the number of training images where
    the user left them out, and a note saying so when the choice is not the large-dataset default.
    The run saves this config, so --resume continues with exactly these values."""
    from .config import BATCH_SIZE, FINETUNE_EPOCHS, TRAIN_EPOCHS

    from_scratch = config.weights == models.NONE
    if Strategy(config.strategy) == Strategy.linear and config.cache_features:  # the probe: one pass, no steps
        return dataclasses.replace(config, batch_size=config.batch_size or BATCH_SIZE, epochs=config.epochs or 1), None
    batch_size = config.batch_size or auto_batch_size(n_train)
    epochs = config.epochs or auto_epochs(n_train, batch_size, from_scratch)
    chosen = {"--batch-size": batch_size} if config.batch_size is None and batch_size != BATCH_SIZE else {}
    if config.epochs is None and config.budget:
        from .budget import MAX_EPOCHS_FACTOR

        epochs *= MAX_EPOCHS_FACTOR  # at most: the time decides (budget.TimePlan)
        chosen["--epochs"] = f"{epochs} at most"
    elif config.epochs is None and epochs != (TRAIN_EPOCHS if from_scratch else FINETUNE_EPOCHS):
        chosen["--epochs"] = epochs
    note = None
    if chosen:
        steps = epochs * epoch_steps(n_train, batch_size)
        steps = "as many as the --budget fits" if config.budget else f"{steps} optimizer steps in all"
        note = (f"{n_train} training images: {' and '.join(f'{k} {v}' for k, v in chosen.items())} chosen "
                f"({steps}); set {' and '.join(chosen)} to choose otherwise")
    return dataclasses.replace(config, batch_size=batch_size, epochs=epochs), note


def probe_ignores(config: TrainConfig) -> list[str]:
    """The training-loop options given to --strategy linear with its feature cache (the exact probe), which
    has no epochs, learning rate or optimizer: named, never ignored silently."""
    from .config import option_flag

    if Strategy(config.strategy) != Strategy.linear or not config.cache_features:
        return []
    loop = ("epochs", "lr", "optimizer", "weight_decay", "patience", "grad_clip")
    return [option_flag(name) for name in loop if getattr(config, name) is not None]


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
    return {"optimizer": optimizer.value, "lr": lr, "weight_decay": weight_decay, "backbone_lr_mult": mult,
            "bn_stats": resolve_bn_stats(config).value}


def resolve_bn_stats(config: TrainConfig) -> BnStats:
    """--bn-stats auto: fine-tuning pretrained weights keeps their running statistics (BatchNorm in
    eval mode, Keras's fine-tuning advice too); from scratch BatchNorm learns them. Measured on
    EfficientNet-Lite0 ImageNet weights: updating them from batches of 20 upscaled 28 px
    Fashion-MNIST images took `full` from 82.6% to 53.0%, and from batches of 64 digits at 100 per
    class from 89.4% to 54.6%: the probe's head was fitted on features normalised by the
    pretrained statistics, and batch statistics of a far domain move every feature under it."""
    if BnStats(config.bn_stats) != BnStats.auto:
        return BnStats(config.bn_stats)
    if config.weights == models.NONE:
        return BnStats.update
    return BnStats.frozen


def split_data(folder: Path | str, val_split: float, seed: int) -> tuple[data.ImageList, data.ImageList]:
    """train/ and val/ folders when `folder` has them, else a stratified, seeded --val-split.

    The train list's warnings (shown as notes) name the empty class folders left out and the
    classes too small to validate or to split in proportion.
    """
    folders = data.find_split_folders(folder)
    if folders:
        train = data.discover(folders[0], labelled=True)
        val = data.discover(folders[1], labelled=True, classes=train.classes)
        train.warnings += val.warnings
        unseen = [c for c, n in val.class_counts().items() if not n]
        if unseen:
            train.warnings.append(f"{folders[1]} holds no image of class(es) {', '.join(unseen)}: validation never sees them")
        return train, val
    images = data.discover(folder, labelled=True)
    if len(images.classes) < 2:
        from .errors import DataError

        found = f"{len(images.classes)} class with images ({', '.join(images.classes)})" if images.classes else "no class"
        raise DataError(f"{folder}: found {found}; classification needs at least 2")
    train_idx, val_idx = data.stratified_split(images.labels, val_split, seed)
    train, val = images.subset(train_idx), images.subset(val_idx)
    train.warnings, train.ignored = images.warnings + _small_classes(images, val, val_split), images.ignored
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


def run_split(run_dir: Path | str) -> tuple[data.ImageList, data.ImageList] | None:
    """The training and validation images of the run in `run_dir`: its splits.csv, else (runs
    from before splits.csv) its seeded split drawn again from the data folder in config.json.
    None when the images cannot be found (the folder gone, moved or changed beyond reading)."""
    from . import rundir

    runs = rundir.RunDir(run_dir)
    run = runs.read_config()
    saved = run.train_config
    if not saved.get("data") or not Path(saved["data"]).exists():
        return None
    if runs.file(rundir.SPLITS_FILE).is_file():
        rows = runs.read_splits()
        index = {name: k for k, name in enumerate(run.classes)}
        return tuple(data.ImageList([Path(p) for p in part.path], [index.get(label) for label in part.label],
                                    list(run.classes), Path(saved["data"]))
                     for part in (rows[rows.split == "train"], rows[rows.split == "val"]))
    try:
        return split_data(Path(saved["data"]), saved.get("val_split", 0.2), saved.get("seed", 0))
    except Exception:  # the folder changed beyond reading (a class removed...): nothing to compare with
        return None


def working_img_size(img_size: int | None, weights: str, images: data.ImageList) -> int | None:
    """The --img-size a run uses: the one given, else for a model trained from scratch on small
    images their own size (auto_img_size), else None (the pretrained model's own)."""
    from .models import NONE

    return img_size or (auto_img_size(images) if weights == NONE else None)


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
