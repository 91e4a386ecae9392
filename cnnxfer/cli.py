"""The `cnnxfer` command: parse options, build a config, call one library function, render.

No ML logic lives here. Library errors become one red line on stderr and exit 2 (bad input)
or 1 (runtime failure); Ctrl-C exits 130 and SIGTERM 143.
"""
from __future__ import annotations

import functools
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import config as cfg
from .config import DEFAULT_MAX_IMAGE_PIXELS
from .errors import CnnxferError

class _Command(typer.core.TyperCommand):
    """Usage lines in the usual notation, the same in every command: `extract [OPTIONS] DATA`, and
    `train [OPTIONS] [DATA]` where DATA may be left out (typer writes {data} and [data])."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or param.name.upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class _Typer(typer.Typer):
    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", _Command)
        return super().command(*args, **kwargs)


app = _Typer(
    help="Transfer learning with convolutional networks: extract, finetune, train, sanity-check.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

_E = cfg.ExtractConfig.__dataclass_fields__


def _default(fields, name):
    return fields[name].default


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that `finally` blocks (checkpoints) run."""


def _on_sigterm(signum, frame):
    raise Terminated()


def handle_errors(fn=None, *, interrupted=None):
    """Run a command; map library errors, Ctrl-C and SIGTERM to exit codes.

    `interrupted(kwargs)` says after Ctrl-C / SIGTERM what was kept and how to go on, from the
    command's own options; a command without it (nothing to continue) says only that it stopped.
    """

    if fn is None:
        return functools.partial(handle_errors, interrupted=interrupted)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from . import distributed, report  # here, not at import: --help and usage errors never load rich's console

        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            rank = distributed.from_environment()
            report.for_process(rank.rank, rank.world)
            nproc = kwargs.pop("nproc", 1) or 1
            if nproc > 1 and not rank.enabled:  # --nproc: this same command line under torchrun
                raise typer.Exit(distributed.relaunch(nproc, sys.argv[1:]))
            return fn(*args, **kwargs)
        except CnnxferError as exc:
            report.error(str(exc))
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt:
            report.error("interrupted (Ctrl-C)" + (f"; {interrupted(kwargs)}" if interrupted else ""))
            raise typer.Exit(130)
        except Terminated:
            report.error("terminated (SIGTERM)" + (f"; {interrupted(kwargs)}" if interrupted else ""))
            raise typer.Exit(143)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


def _extract_interrupted(kwargs) -> str:
    from .checkpoint import parts_dir

    if any(parts_dir(kwargs["out"]).glob("part-*.json")):  # a part's record is written once it is complete
        return "finished parts were kept - re-run with --resume to continue"
    return "nothing was saved yet - run the same command again"


def _fit_interrupted(kwargs) -> str:
    from .rundir import resume_hint  # reads the run directory: the message says what is there

    return resume_hint(kwargs.get("resume") or kwargs["out"])


Device = Annotated[str, typer.Option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")]
PrecisionOpt = Annotated[cfg.Precision, typer.Option("--precision", help="auto: bf16/fp16 autocast on CUDA and bf16-capable CPUs, else fp32.")]
Weights = Annotated[Optional[str], typer.Option("--weights", "-w", help="hub (timm pretrained), none (random init), a .safetensors/.pth file, or a cnnxfer run directory.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="timm architecture (resnet50) or your own path/to/file.py:factory.")]
ImgSize = Annotated[Optional[int], typer.Option("--img-size", help="Input size in pixels (default: the model's own).")]
Candidates = Annotated[Optional[str], typer.Option("--model", "-m", help="timm architecture (resnet50) or your own path/to/file.py:factory; several, comma-separated (with one --weights each), are ranked by the cross-validated probe on their frozen features and the best is fine-tuned (leaderboard.csv).")]
CandidateWeights = Annotated[Optional[str], typer.Option("--weights", "-w", help="hub (timm pretrained), none (random init), a .safetensors/.pth file, or a cnnxfer run directory; comma-separated, one per --model.")]
Budget = Annotated[Optional[str], typer.Option("--budget", help="Wall time for the whole command, start-up included: 90s, 10m, 2h, 1h30m. The candidates' ranking, the probe and a fine-tuning schedule sized to the measured speed fit in it; the run stops in time even mid-epoch, keeping its best. With --resume: the time the continuation may take (default: what the run had left).")]
MaxPixels = Annotated[int, typer.Option("--max-image-pixels", min=1, help="Refuse (skip) images with more pixels: a guard against decompression bombs. Raise it for huge scans.")]
Workers = Annotated[Optional[int], typer.Option("--workers", min=0, help="Image decoding threads (default: every core; 0 decodes in the main thread).")]
Strict = Annotated[bool, typer.Option("--strict", help="Exit 1 if any image was skipped as unreadable.")]


@app.command()
@handle_errors
def info(device: Device = "auto", precision: PrecisionOpt = cfg.Precision.auto) -> None:
    """Show versions, the device cnnxfer would use, GPU name/memory, precision and threads.

    Example: cnnxfer info --device auto
    """
    from . import device as dev, report

    report.environment(dev.describe_environment(device, precision.value))


@app.command()
@handle_errors(interrupted=_extract_interrupted)
def extract(
    data: Annotated[Path, typer.Argument(exists=True, metavar="DATA", help="Image folder (class subfolders or flat), one image, or a CSV manifest (path,label).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output Parquet file.")] = Path("features.parquet"),
    model: ModelOpt = None,
    weights: Weights = "hub",
    layers: Annotated[Optional[str], typer.Option("--layers", help="Also embed these stages, comma-separated names or indices (e.g. layer2,layer3 or 1,2).")] = None,
    pool: Annotated[Optional[cfg.Pool], typer.Option("--pool", help="Global pooling (default: the model's own; avg for --layers).")] = None,
    tta: Annotated[cfg.Tta, typer.Option("--tta", help="flip: average with the mirrored image.")] = cfg.Tta.none,
    img_size: ImgSize = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")] = _default(_E, "batch_size"),
    part_size: Annotated[int, typer.Option("--part-size", min=1, help="Images per finished part: the most a kill can cost, and the unit of work of each process under torchrun.")] = _default(_E, "part_size"),
    workers: Workers = None,
    max_image_pixels: MaxPixels = DEFAULT_MAX_IMAGE_PIXELS,
    device: Device = "auto",
    precision: PrecisionOpt = cfg.Precision.auto,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted extraction into the same --out (with any number of processes).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    strict: Strict = False,
    nproc: Nproc = 1,
) -> None:
    """Level 1: embed every image with a pretrained CNN and write the features to Parquet.

    Example: cnnxfer extract photos/ --model resnet50 --out features.parquet
    """
    from . import features, report

    config = cfg.ExtractConfig(
        data=data, out=out, model=model, weights=weights, layers=tuple(l for l in (layers or "").split(",") if l.strip()),
        pool=pool, tta=tta, img_size=img_size, batch_size=batch_size, num_workers=workers, device=device,
        precision=precision, resume=resume, overwrite=overwrite, strict=strict, max_image_pixels=max_image_pixels,
        part_size=part_size,
    )
    with report.image_progress("extract") as progress:
        summary = features.extract_features(config, progress)
    report.extract_summary(summary)


_T = cfg.TrainConfig.__dataclass_fields__
DataArg = Annotated[Optional[Path], typer.Argument(exists=True, metavar="DATA", help="Labelled images: class subfolders (optionally train/ and val/) or a CSV manifest. Not needed with --resume.")]
RunOut = Annotated[Path, typer.Option("--out", "-o", help="Run directory to create.")]
Epochs = Annotated[Optional[int], typer.Option("--epochs", "-e", min=1, help=f"Passes over the training images (default: {cfg.FINETUNE_EPOCHS} for finetune, {cfg.TRAIN_EPOCHS} for train, more on small datasets so that a run takes at least {cfg.MIN_FINETUNE_STEPS} / {cfg.MIN_STEPS} optimizer steps; the run says what it chose).")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", "-b", min=1, help=f"Images per optimizer step (default: {cfg.BATCH_SIZE}, or about an eighth of the training images when they are fewer than {8 * cfg.BATCH_SIZE}).")]
InferBatch = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]
Lr = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default: 0.1*batch/256*4 for SGD from scratch, 1e-3 AdamW fine-tuning, 3e-3 linear).")]
OptimizerOpt = Annotated[Optional[cfg.Optimizer], typer.Option("--optimizer", help="Default: sgd (momentum, nesterov) for train, adamw for finetune.")]
WeightDecay = Annotated[Optional[float], typer.Option("--weight-decay", help="Default: 5e-4 for SGD, 0.05 for AdamW.")]
Warmup = Annotated[float, typer.Option("--warmup-epochs", help="Linear warmup before the cosine decay.")]
Smoothing = Annotated[float, typer.Option("--label-smoothing", help="Cross-entropy label smoothing.")]
Dropout = Annotated[float, typer.Option("--dropout", help="Dropout before the classifier.")]
Clip = Annotated[Optional[float], typer.Option("--grad-clip", help="Clip the gradient norm to this value.")]
BalanceOpt = Annotated[cfg.Balance, typer.Option("--balance", help="Class imbalance: loss (weighted loss) or sampler (balanced sampling).")]
Augment = Annotated[bool, typer.Option("--augment/--no-augment", help="Random resized crop + horizontal flip.")]
CacheImagesOpt = Annotated[cfg.CacheImages, typer.Option("--cache-images", help="Decode the images once and keep them in memory: auto = when they fit (1/8 of RAM, at most 4 GiB).")]
Hflip = Annotated[float, typer.Option("--hflip", help="Horizontal flip probability (0 for digits, text...).")]
ValSplit = Annotated[float, typer.Option("--val-split", help="Stratified validation fraction when DATA has no train/ and val/.")]
Patience = Annotated[Optional[int], typer.Option("--patience", min=1, help="Stop after this many epochs without a new best epoch. The best epoch, the one kept in the run directory, is the one with the lowest validation loss.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of every random choice (split, initialisation, order, augmentation).")]
Resume = Annotated[Optional[Path], typer.Option("--resume", exists=True, file_okay=False, help="Continue an interrupted run directory from its last saved epoch with the run's own settings. Only options that say where and how to run may be given beside it: --device, --workers, --checkpoint-every, --cache-images, --strict, DATA (the same images moved), --precision (the same dtype).")]
CheckpointEvery = Annotated[float, typer.Option("--checkpoint-every", min=0, help="Seconds between checkpoint writes (0: every epoch). Ctrl-C and SIGTERM always save the last finished epoch.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")]
Nproc = Annotated[int, typer.Option("--nproc", min=1, help="Processes on this machine, one per GPU: runs this command under torchrun (--standalone --nproc-per-node N). For several machines or SLURM, launch cnnxfer with torchrun or srun instead (README).")]
SyncBn = Annotated[bool, typer.Option("--sync-bn", help="Several GPUs: BatchNorm statistics over the whole global batch (SyncBatchNorm). Without it each process normalises its share and the running statistics are averaged before every evaluation.")]


_PARAM_FIELDS = {"workers": "num_workers", "cache": "cache_features"}  # options whose TrainConfig field is named otherwise


def _given(ctx: typer.Context) -> set[str]:
    """The TrainConfig fields of the options typed on the command line (not left at their defaults)."""
    def typed(name: str) -> bool:  # by the source's name: typer ships its own copy of click's enum
        source = ctx.get_parameter_source(name)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    return {_PARAM_FIELDS.get(name, name) for name in ctx.params if typed(name)}


def _run_fit(ctx: typer.Context, values: dict, resume: Optional[Path]) -> None:
    from . import report, training
    from .budget import process_started
    from .errors import UsageError

    if resume is None and values["data"] is None:
        raise UsageError("give DATA (a folder of labelled images) or --resume RUN_DIR")
    started = process_started()  # --budget counts from here: the interpreter's start
    with report.fit_progress() as hooks:
        if resume is None:
            overwrite = values.pop("overwrite")
            result = training.fit(cfg.TrainConfig(**values), training.FitHooks(*hooks), overwrite=overwrite,
                                  started=started)
        else:  # the run's own settings; what was typed beside --resume is applied or refused, never ignored
            given = {k: v for k, v in values.items() if k in _given(ctx)}
            result = training.resume(resume, training.FitHooks(*hooks), started=started, **given)
    report.fit_summary(result, notes_shown=True)


@app.command()
@handle_errors(interrupted=_fit_interrupted)
def finetune(
    ctx: typer.Context,
    data: DataArg = None,
    model: Candidates = None,
    weights: CandidateWeights = "hub",
    out: RunOut = Path("runs/finetune"),
    budget: Budget = None,
    strategy: Annotated[cfg.Strategy, typer.Option("--strategy", help="auto: the probe, then fine-tuning from it; the run keeps whichever validates better. linear: the probe alone (logistic regression on the frozen backbone's features, its strength chosen by cross-validation; seconds). gradual: head first, then unfreeze stage by stage; full: everything.")] = cfg.Strategy.auto,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    backbone_lr_mult: Annotated[float, typer.Option("--backbone-lr-mult", help="Backbone learning rate as a fraction of --lr.")] = _default(_T, "backbone_lr_mult"),
    optimizer: OptimizerOpt = None,
    weight_decay: WeightDecay = None,
    warmup_epochs: Warmup = _default(_T, "warmup_epochs"),
    label_smoothing: Smoothing = _default(_T, "label_smoothing"),
    dropout: Dropout = _default(_T, "dropout"),
    grad_clip: Clip = None,
    balance: BalanceOpt = cfg.Balance.none,
    augment: Augment = True,
    hflip: Hflip = _default(_T, "hflip"),
    cache_images: CacheImagesOpt = cfg.CacheImages.auto,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="linear: compute the frozen backbone's features once (un-augmented).")] = True,
    head_epochs: Annotated[int, typer.Option("--head-epochs", help="gradual: epochs with the backbone frozen before unfreezing.")] = _default(_T, "head_epochs"),
    head_init: Annotated[cfg.HeadInit, typer.Option("--head-init", help="Where a new head starts: probe (fitted on the frozen features, then fine-tuned) or zero (every class equally likely).")] = cfg.HeadInit.probe,
    bn_stats: Annotated[cfg.BnStats, typer.Option("--bn-stats", help="BatchNorm while fine-tuning: frozen keeps the pretrained running statistics, update learns them from each batch; auto: frozen when fine-tuning pretrained weights, update from scratch.")] = cfg.BnStats.auto,
    val_split: ValSplit = _default(_T, "val_split"),
    patience: Patience = None,
    img_size: ImgSize = None,
    seed: Seed = 0,
    workers: Workers = None,
    max_image_pixels: MaxPixels = DEFAULT_MAX_IMAGE_PIXELS,
    device: Device = "auto",
    precision: PrecisionOpt = cfg.Precision.auto,
    resume: Resume = None,
    checkpoint_every: CheckpointEvery = _default(_T, "checkpoint_every"),
    overwrite: Overwrite = False,
    strict: Strict = False,
    sync_bn: SyncBn = False,
    nproc: Nproc = 1,
) -> None:
    """Level 2: put a new head on a pretrained CNN for your classes and fine-tune it.

    Example: cnnxfer finetune photos/ --model resnet50 --strategy gradual --out runs/photos
    """
    values = dict(
        data=data, out=out, model=model, weights=weights, strategy=strategy, epochs=epochs,
        batch_size=batch_size, lr=lr, backbone_lr_mult=backbone_lr_mult, optimizer=optimizer, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, dropout=dropout, grad_clip=grad_clip, balance=balance,
        augment=augment, hflip=hflip, cache_features=cache, cache_images=cache_images, head_epochs=head_epochs,
        head_init=head_init, bn_stats=bn_stats, val_split=val_split, patience=patience,
        img_size=img_size, seed=seed, num_workers=workers, device=device, precision=precision,
        overwrite=overwrite, strict=strict, max_image_pixels=max_image_pixels, checkpoint_every=checkpoint_every,
        sync_bn=sync_bn, budget=budget,
    )
    _run_fit(ctx, values, resume)


@app.command()
@handle_errors(interrupted=_fit_interrupted)
def train(
    ctx: typer.Context,
    data: DataArg = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Required, except with --resume: a timm architecture (resnet10t) or your own path/to/file.py:factory.")] = None,
    out: RunOut = Path("runs/train"),
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    optimizer: OptimizerOpt = None,
    weight_decay: WeightDecay = None,
    warmup_epochs: Warmup = _default(_T, "warmup_epochs"),
    label_smoothing: Smoothing = _default(_T, "label_smoothing"),
    dropout: Dropout = _default(_T, "dropout"),
    grad_clip: Clip = None,
    balance: BalanceOpt = cfg.Balance.none,
    augment: Augment = True,
    hflip: Hflip = _default(_T, "hflip"),
    cache_images: CacheImagesOpt = cfg.CacheImages.auto,
    val_split: ValSplit = _default(_T, "val_split"),
    patience: Patience = None,
    img_size: Annotated[Optional[int], typer.Option("--img-size", help="Input size (default: the images' own size when <= 64 px, else the model's).")] = None,
    seed: Seed = 0,
    workers: Workers = None,
    max_image_pixels: MaxPixels = DEFAULT_MAX_IMAGE_PIXELS,
    device: Device = "auto",
    precision: PrecisionOpt = cfg.Precision.auto,
    resume: Resume = None,
    checkpoint_every: CheckpointEvery = _default(_T, "checkpoint_every"),
    overwrite: Overwrite = False,
    strict: Strict = False,
    sync_bn: SyncBn = False,
    nproc: Nproc = 1,
) -> None:
    """Level 3: train a CNN from scratch (any timm architecture or your own file.py:factory).

    Example: cnnxfer train digits/ --model resnet10t --epochs 30 --out runs/digits
    """
    values = dict(
        data=data, out=out, model=model, weights="none", strategy=cfg.Strategy.full, epochs=epochs,
        batch_size=batch_size, lr=lr, backbone_lr_mult=1.0, optimizer=optimizer, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, dropout=dropout, grad_clip=grad_clip, balance=balance,
        augment=augment, hflip=hflip, cache_images=cache_images, val_split=val_split, patience=patience, img_size=img_size, seed=seed,
        num_workers=workers, device=device, precision=precision, overwrite=overwrite, strict=strict,
        max_image_pixels=max_image_pixels, checkpoint_every=checkpoint_every, sync_bn=sync_bn,
    )
    _run_fit(ctx, values, resume)


RunWeights = Annotated[str, typer.Option("--weights", "-w", help="A cnnxfer run directory (from finetune or train), or a file from `cnnxfer export` (.onnx, TorchScript) with the preprocessing it carries.")]


_P, _V, _C = cfg.PredictConfig.__dataclass_fields__, cfg.EvaluateConfig.__dataclass_fields__, cfg.CalibrateConfig.__dataclass_fields__
Calibrated = Annotated[bool, typer.Option("--calibration/--no-calibration", help="Divide the logits by the temperature fitted on the run's validation images (config.json's calibration; `cnnxfer calibrate` refits it); --no-calibration: the raw softmax.")]
Coverage = Annotated[Optional[float], typer.Option("--coverage", help="Conformal prediction sets (RAPS, split conformal on the run's validation images): per image the smallest set of classes that holds the true class with this probability, e.g. 0.9.")]


@app.command()
@handle_errors
def predict(
    images: Annotated[Path, typer.Argument(exists=True, metavar="IMAGES", help="One image, a folder of images (flat or class subfolders) or a CSV manifest.")],
    weights: RunWeights,
    out: Annotated[Path, typer.Option("--out", "-o", help="Predictions file: .csv or .parquet.")] = _default(_P, "out"),
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes listed per image, most probable first.")] = _default(_P, "top_k"),
    tta: Annotated[cfg.Tta, typer.Option("--tta", help="flip: average with the mirrored image.")] = _default(_P, "tta"),
    batch_size: InferBatch = _default(_P, "batch_size"),
    workers: Workers = _default(_P, "num_workers"),
    max_image_pixels: MaxPixels = _default(_P, "max_image_pixels"),
    device: Device = _default(_P, "device"),
    precision: PrecisionOpt = _default(_P, "precision"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing predictions file.")] = False,
    strict: Strict = False,
    calibrated: Calibrated = True,
    min_confidence: Annotated[Optional[float], typer.Option("--min-confidence", help="Below this probability the prediction column says abstained (the top classes stay listed), e.g. 0.8.")] = None,
    coverage: Coverage = None,
    nproc: Nproc = 1,
) -> None:
    """Predict the top-k classes of every image with a trained run.

    Probabilities are calibrated (temperature scaling) where the run fitted it; --min-confidence
    abstains below a probability; --coverage 0.9 adds a prediction set per image.

    Example: cnnxfer predict new_photos/ --weights runs/photos --out predictions.csv --coverage 0.9
    """
    from . import evaluate, report

    config = cfg.PredictConfig(images=images, weights=weights, out=out, top_k=top_k, tta=tta, batch_size=batch_size,
                               num_workers=workers, device=device, precision=precision, overwrite=overwrite,
                               strict=strict, max_image_pixels=max_image_pixels, calibrated=calibrated,
                               min_confidence=min_confidence, coverage=coverage)
    with report.image_progress("predict") as progress:
        pred = evaluate.predict_folder(config, progress)
    report.predictions_summary(pred, out, evaluate.skipped_file_for(out), config)


@app.command()
@handle_errors
def evaluate(
    data: Annotated[Path, typer.Argument(exists=True, metavar="DATA", help="Labelled images (class subfolders named like the run's classes) or a CSV manifest.")],
    weights: RunWeights,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write accuracy (top-level key), per-class report and confusion matrix as JSON.")] = None,
    tta: Annotated[cfg.Tta, typer.Option("--tta", help="flip: average with the mirrored image.")] = _default(_V, "tta"),
    batch_size: InferBatch = _default(_V, "batch_size"),
    workers: Workers = _default(_V, "num_workers"),
    max_image_pixels: MaxPixels = _default(_V, "max_image_pixels"),
    device: Device = _default(_V, "device"),
    precision: PrecisionOpt = _default(_V, "precision"),
    strict: Strict = False,
    calibrated: Calibrated = True,
    min_confidence: Annotated[Optional[float], typer.Option("--min-confidence", help="Also the accuracy of the images predicted at or above this probability, and the share of them (coverage).")] = None,
    coverage: Coverage = None,
    unknown: Annotated[Optional[Path], typer.Option("--unknown", exists=True, help="Images of classes the model never saw: how well its confidence tells them from DATA's (AUROC; false accepts at 95% of DATA accepted).")] = None,
    nproc: Nproc = 1,
) -> None:
    """Accuracy, per-class precision/recall/F1, confusion matrix and calibration (ECE, NLL, Brier) of a trained run on labelled images.

    Example: cnnxfer evaluate test/ --weights runs/photos --json metrics.json --coverage 0.9
    """
    from . import evaluate as ev, report

    config = cfg.EvaluateConfig(data=data, weights=weights, json_path=json_path, tta=tta, batch_size=batch_size,
                                num_workers=workers, device=device, precision=precision, strict=strict,
                                max_image_pixels=max_image_pixels, calibrated=calibrated, min_confidence=min_confidence,
                                coverage=coverage, unknown=unknown)
    with report.image_progress("evaluate") as progress:
        result = ev.evaluate_folder(config, progress)
    report.evaluation_summary(result)


@app.command()
@handle_errors
def calibrate(
    run_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, metavar="RUN_DIR", help="A cnnxfer run directory (from finetune or train).")],
    data: Annotated[Path, typer.Option("--data", exists=True, help="Labelled images of the run's classes that it never trained on (class subfolders or a CSV manifest).")],
    tta: Annotated[cfg.Tta, typer.Option("--tta", help="flip: average with the mirrored image (then predict with --tta flip too).")] = _default(_C, "tta"),
    batch_size: InferBatch = _default(_C, "batch_size"),
    workers: Workers = _default(_C, "num_workers"),
    max_image_pixels: MaxPixels = _default(_C, "max_image_pixels"),
    device: Device = _default(_C, "device"),
    precision: PrecisionOpt = _default(_C, "precision"),
) -> None:
    """Fit the run's temperature and conformal scores again on other labelled images.

    finetune and train fit them on the validation images at the end of the run; this replaces them in RUN_DIR/config.json (predict, evaluate and export then use these). Unreadable images are skipped and listed in RUN_DIR/calibrate.skipped.csv.

    Example: cnnxfer calibrate runs/photos --data held_out/
    """
    from . import evaluate as ev, report

    config = cfg.CalibrateConfig(run=run_dir, data=data, tta=tta, batch_size=batch_size, num_workers=workers,
                                 device=device, precision=precision, max_image_pixels=max_image_pixels)
    with report.image_progress("calibrate") as progress:
        fitted = ev.calibrate_run(config, progress)
    report.calibration_summary(fitted, run_dir)


@app.command()
@handle_errors
def export(
    run_dir: Annotated[Optional[Path], typer.Argument(exists=True, file_okay=False, metavar="RUN_DIR", help="A cnnxfer run directory (from finetune or train); or leave it out and give --model and --weights.")] = None,
    fmt: Annotated[cfg.ExportFormat, typer.Option("--format", "-f", help="onnx (for onnxruntime and other ONNX runtimes; needs the export extra) or torchscript (torch.jit.load, no Python model code).")] = cfg.ExportFormat.onnx,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The file to write (default: model.onnx, or model.pt for torchscript, which also gets model.pt.json).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", exists=True, help="Images to verify the exported file on (default: the run's data folder; random images without one).")] = None,
    tolerance: Annotated[Optional[float], typer.Option("--tolerance", help="Largest absolute logit difference to the PyTorch model allowed (default: 1e-3; 5e-2 with --half).")] = None,
    half: Annotated[bool, typer.Option("--half", help="fp16 weights and compute, for GPUs: needs CUDA here (and onnxruntime-gpu to verify an ONNX file).")] = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Without RUN_DIR: a timm architecture or path/to/file.py:factory.")] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", "-w", help="With --model: a .safetensors/.pth state dict, hub or none.")] = None,
    classes: Annotated[Optional[Path], typer.Option("--classes", exists=True, dir_okay=False, help="With --model: a text file with one class name per line, in the order of the outputs (default: 0, 1, ...).")] = None,
    img_size: Annotated[Optional[int], typer.Option("--img-size", help="With --model: the input size in pixels (default: the model's own).")] = None,
    max_image_pixels: MaxPixels = DEFAULT_MAX_IMAGE_PIXELS,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
) -> None:
    """Export a trained model to ONNX or TorchScript, verified against PyTorch, with its preprocessing.

    The file takes uint8 RGB images (N, 3, H, W) and normalises inside; it carries the class names,
    input size, mean/std, interpolation and crop, so `predict --weights FILE` needs nothing else.

    Example: cnnxfer export runs/photos --format onnx --out photos.onnx
    """
    from . import export as exp, report

    config = cfg.ExportConfig(run_dir=run_dir, format=fmt, out=out, model=model, weights=weights, classes=classes,
                              img_size=img_size, data=data, half=half, tolerance=tolerance, overwrite=overwrite,
                              max_image_pixels=max_image_pixels)
    with report.status("export") as progress:
        progress(f"{fmt.value}: export and verify")
        result = exp.export_model(config)
    report.export_summary(result)


@app.command("convert-weights")
@handle_errors
def convert_weights(
    source: Annotated[Path, typer.Argument(exists=True, dir_okay=False, metavar="SOURCE", help="A state dict from another implementation of the architecture (.pth/.pt/.bin, read with weights_only=True, or .safetensors).")],
    model: Annotated[str, typer.Option("--model", "-m", help="The timm architecture whose tensors SOURCE holds, in the same order (e.g. tf_efficientnet_lite0).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The .safetensors file to write, with timm's key names.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
) -> None:
    """Rename another library's weights to timm's keys, pairing tensors in module order.

    Every pair must have the same shape and the result must load strictly, or nothing is written.
    The file then works as --weights in every command.

    Example: cnnxfer convert-weights efficientnet-lite0.pth --model tf_efficientnet_lite0 --out lite0.safetensors
    """
    from . import convert, report

    result = convert.convert_weights_file(source, model, out, overwrite=overwrite)
    report.show(report.table("convert-weights", [("output", out), ("model", model), ("tensors", f"{result.pairs} renamed, "
                                                 "every shape matching; loads strictly")]))


_S = cfg.SanityConfig.__dataclass_fields__


@app.command("sanity-check")
@handle_errors
def sanity_check(
    data: Annotated[Path, typer.Argument(exists=True, metavar="DATA", help="Labelled images: class subfolders (optionally train/ and val/) or a CSV manifest.")],
    model: ModelOpt = None,
    weights: Annotated[Optional[str], typer.Option("--weights", "-w", help="none (random init, default), hub, a weights file or a run directory.")] = "none",
    only: Annotated[Optional[str], typer.Option("--only", help=f"Comma-separated subset of: {', '.join(cfg.SANITY_CHECKS)}.")] = None,
    lr_find: Annotated[bool, typer.Option("--lr-find", help="Also run the learning-rate range test (table + PNG plot).")] = False,
    lr: Annotated[Optional[float], typer.Option("--lr", help="The learning rate you plan to train with (checked by --lr-find).")] = None,
    optimizer: OptimizerOpt = None,
    img_size: ImgSize = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=2, help="Images in the overfit subset.")] = _default(_S, "batch_size"),
    overfit_steps: Annotated[int, typer.Option("--overfit-steps", min=1, help="Steps the overfit check always takes (unless memorised sooner); it goes on while the loss still falls clearly, up to 10x this.")] = _default(_S, "overfit_steps"),
    overfit_seconds: Annotated[float, typer.Option("--overfit-seconds", min=0, help="No overfit steps beyond --overfit-steps after this many seconds.")] = _default(_S, "overfit_seconds"),
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON.")] = None,
    seed: Seed = 0,
    workers: Workers = None,
    max_image_pixels: MaxPixels = DEFAULT_MAX_IMAGE_PIXELS,
    device: Device = "auto",
    precision: PrecisionOpt = cfg.Precision.auto,
) -> None:
    """Check data, model and training setup before a long run: PASS / WARN / FAIL per check.

    The overfit check trains on one batch until it is memorised: PASS at 100% train accuracy and a
    loss <= 0.05; FAIL when the loss stays near chance (ln(C), where a model that ignores its input
    ends), never falls, diverges or turns non-finite, or nothing is trainable; WARN with the figures
    when it is learning but not memorised within the budget (it says what to raise). A check that
    raises is reported as ERROR with the exception. Exit code 1 when any check fails or errors.

    Example: cnnxfer sanity-check photos/ --model resnet50 --lr-find
    """
    from . import report, sanity

    config = cfg.SanityConfig(
        data=data, model=model, weights=weights, only=tuple(c.strip() for c in (only or "").split(",") if c.strip()),
        lr_find=lr_find, lr=lr, optimizer=optimizer, img_size=img_size, batch_size=batch_size, overfit_steps=overfit_steps,
        overfit_seconds=overfit_seconds, json_path=json_path, seed=seed, num_workers=workers, device=device, precision=precision,
        max_image_pixels=max_image_pixels,
    )
    with report.status("sanity-check") as progress:
        result = sanity.run_checks(config, progress)
    report.sanity_report(result)
    if result.failed:
        raise typer.Exit(1)


# ---------------------------------------------------------------- inspect and report

inspect_app = _Typer(
    help="What did the network learn? Filters, top patches, class models, embedding maps, invariance, layers, "
         "worst errors; each writes PNG + CSV/JSON and prints a table.\n\nExample: cnnxfer inspect filters --weights runs/photos",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
app.add_typer(inspect_app, name="inspect")

_I = cfg.InspectConfig.__dataclass_fields__
Images = Annotated[Path, typer.Argument(exists=True, help="Images: class subfolders, a flat folder or a CSV manifest.")]
InspectWeights = Annotated[Optional[str], typer.Option("--weights", "-w", help="A cnnxfer run directory, a .safetensors/.pth file (with --model), hub or none.")]
InspectOut = Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the files (default: RUN_DIR/inspect/<view> for a run directory, else inspect/<view>).")]
MaxImages = Annotated[Optional[int], typer.Option("--max-images", min=1, help="Use at most this many images, drawn evenly across classes (--seed).")]
Layer = Annotated[Optional[str], typer.Option("--layer", help="A stage name or index (e.g. layer3 or -1), or any module name; default the last stage.")]
Top = Annotated[int, typer.Option("--top", "-k", min=1, help="How many images to show.")]
InspectOverwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the files of an earlier run in --out.")]


def _inspect(view: str, summary: str, **fields) -> None:
    """Build the InspectConfig, run one view of cnnxfer.inspect, print its table."""
    import importlib

    from . import report

    config = cfg.InspectConfig(**fields)
    module, run = view.split(":")
    with report.status(f"inspect {summary}"):
        result = getattr(importlib.import_module(f".inspect.{module}", __package__), run)(config)
    getattr(report, f"{summary}_summary")(result)
    report.skipped_images(result.skipped)


@inspect_app.command("filters")
@handle_errors
def inspect_filters(
    weights: InspectWeights = None, model: ModelOpt = None,
    compare: Annotated[Optional[str], typer.Option("--compare", help="Other weights of the same architecture (e.g. hub, before fine-tuning): grids side by side and the relative weight change per stage.")] = None,
    scale: Annotated[cfg.FilterScale, typer.Option("--scale", help="filter: each filter to its own largest weight; layer: one scale, magnitudes compare.")] = cfg.FilterScale.filter,
    img_size: ImgSize = None, out: InspectOut = None, device: Device = "auto", overwrite: InspectOverwrite = False,
) -> None:
    """The first layer's filters as an image grid (0 = grey), and what fine-tuning changed with --compare.

    Example: cnnxfer inspect filters --weights runs/photos --compare hub
    """
    _inspect("filters:run_filters", "filters", weights=weights, model=model, compare=compare, filter_scale=scale,
             img_size=img_size, out=out, device=device, overwrite=overwrite)


@inspect_app.command("patches")
@handle_errors
def inspect_patches(
    data: Images, weights: InspectWeights = None, model: ModelOpt = None, layer: Layer = None,
    units: Annotated[Optional[str], typer.Option("--units", help="Unit (channel) numbers, comma-separated (default: the first 8).")] = None,
    top: Top = _default(_I, "top"), max_images: MaxImages = None, img_size: ImgSize = None,
    batch_size: BatchSize = _default(_I, "batch_size"), workers: Workers = None, max_image_pixels: MaxPixels = DEFAULT_MAX_IMAGE_PIXELS,
    out: InspectOut = None, device: Device = "auto", precision: PrecisionOpt = cfg.Precision.auto, overwrite: InspectOverwrite = False,
) -> None:
    """The image patches that most activate each unit of a layer, cropped to the unit's measured receptive field.

    Receptive fields are measured by backpropagating from one unit; "global" means it sees the whole image.
    Example: cnnxfer inspect patches photos/ --weights runs/photos --layer layer3 --units 0,5,9 --top 8
    """
    _inspect("patches:run_patches", "patches", data=data, weights=weights, model=model, layer=layer, units=units or (),
             top=top, max_images=max_images, img_size=img_size, batch_size=batch_size, num_workers=workers,
             max_image_pixels=max_image_pixels, out=out, device=device, precision=precision, overwrite=overwrite)


@inspect_app.command("class-model")
@handle_errors
def inspect_class_model(
    weights: InspectWeights = None, model: ModelOpt = None,
    class_name: Annotated[Optional[str], typer.Option("--class", help="Class name(s) or output number(s), comma-separated (default: the first 10 classes).")] = None,
    layer: Annotated[Optional[str], typer.Option("--layer", help="Maximise a unit of this layer instead of a class score.")] = None,
    unit: Annotated[Optional[int], typer.Option("--unit", min=0, help="The unit (channel) of --layer (default 0).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1)] = _default(_I, "steps"),
    lr: Annotated[float, typer.Option("--lr", help="Adam step size, in normalised input units.")] = _default(_I, "lr"),
    l2: Annotated[float, typer.Option("--l2", help="lambda of S_c(I) - lambda ||I||^2 (mean square of the normalised image).")] = _default(_I, "l2"),
    jitter: Annotated[int, typer.Option("--jitter", min=0, help="Random shift in pixels per step (with a 0.95-1.05 random scale).")] = _default(_I, "jitter"),
    blur_every: Annotated[int, typer.Option("--blur-every", min=0, help="Blur lightly every N steps (0: never).")] = _default(_I, "blur_every"),
    seed: Seed = 0, img_size: ImgSize = None, out: InspectOut = None, device: Device = "auto", overwrite: InspectOverwrite = False,
) -> None:
    """The input that maximises a class score, argmax_I S_c(I) - lambda ||I||^2, regularised (jitter, scale, blur).

    Optimised in the model's own input normalisation; --layer/--unit maximise one unit instead.
    Example: cnnxfer inspect class-model --weights runs/digits --class 3,7 --steps 300
    """
    _inspect("class_model:run_class_model", "class_model", weights=weights, model=model, class_name=class_name, layer=layer,
             unit=unit, steps=steps, lr=lr, l2=l2, jitter=jitter, blur_every=blur_every, seed=seed, img_size=img_size,
             out=out, device=device, overwrite=overwrite)


@inspect_app.command("embedding")
@handle_errors
def inspect_embedding(
    source: Annotated[Path, typer.Argument(exists=True, help="FEATURES.parquet from `cnnxfer extract`, or images (with --weights).")],
    weights: InspectWeights = None, model: ModelOpt = None,
    method: Annotated[cfg.Method, typer.Option("--method", help="pca, tsne (scikit-learn) or both.")] = cfg.Method.both,
    perplexity: Annotated[float, typer.Option("--perplexity", min=1.0)] = _default(_I, "perplexity"),
    knn: Annotated[int, typer.Option("--knn", min=1, help="k of the leave-one-out k-NN accuracy.")] = _default(_I, "knn"),
    thumbnails: Annotated[int, typer.Option("--thumbnails", min=0, help="At most this many image thumbnails on the map.")] = _default(_I, "thumbnails"),
    max_images: Annotated[Optional[int], typer.Option("--max-images", min=3, help="Use at most this many images (default 2000), evenly across classes.")] = None,
    seed: Seed = 0, img_size: ImgSize = None, batch_size: BatchSize = _default(_I, "batch_size"), workers: Workers = None,
    out: InspectOut = None, device: Device = "auto", precision: PrecisionOpt = cfg.Precision.auto, overwrite: InspectOverwrite = False,
) -> None:
    """A 2-D map (PCA, t-SNE) of the penultimate-layer features, coloured by label with thumbnails, and k-NN accuracy.

    Example: cnnxfer inspect embedding features.parquet --method tsne
    """
    parquet = source.suffix.lower() == ".parquet"
    _inspect("embedding:run_embedding", "embedding", features=source if parquet else None, data=None if parquet else source,
             weights=weights, model=model, method=method, perplexity=perplexity, knn=knn, thumbnails=thumbnails,
             max_images=max_images, seed=seed, img_size=img_size, batch_size=batch_size, num_workers=workers, out=out,
             device=device, precision=precision, overwrite=overwrite)


@inspect_app.command("invariance")
@handle_errors
def inspect_invariance(
    data: Images, weights: InspectWeights = None, model: ModelOpt = None,
    threshold: Annotated[float, typer.Option("--threshold", help="A unit is invariant when r(response to x, response to g(x)) >= this.")] = _default(_I, "threshold"),
    layers: Annotated[Optional[str], typer.Option("--layers", help="Stages or modules, comma-separated (default: every stage).")] = None,
    transforms: Annotated[str, typer.Option("--transforms", help="Comma-separated subset of hflip, vflip, scale, rot90.")] = ",".join(cfg.INVARIANCE_TRANSFORMS),
    max_images: Annotated[Optional[int], typer.Option("--max-images", min=3, help="Use at most this many images (default 500), evenly across classes.")] = None,
    seed: Seed = 0, img_size: ImgSize = None, batch_size: BatchSize = _default(_I, "batch_size"), workers: Workers = None,
    out: InspectOut = None, device: Device = "auto", precision: PrecisionOpt = cfg.Precision.auto, overwrite: InspectOverwrite = False,
) -> None:
    """Per stage, units invariant to hflip, vflip, scale 2^-1/2 and rot90 (count, %).

    A unit's response to an image is its activation averaged over positions; it is invariant to g when the
    Pearson correlation, over the images, of its responses to x and to g(x) is >= --threshold (0.9).
    Units whose response never varies count as constant. Example: cnnxfer inspect invariance photos/ --weights runs/photos
    """
    _inspect("invariance:run_invariance", "invariance", data=data, weights=weights, model=model, threshold=threshold,
             layers=layers or (), transforms=transforms, max_images=max_images, seed=seed, img_size=img_size,
             batch_size=batch_size, num_workers=workers, out=out, device=device, precision=precision, overwrite=overwrite)


@inspect_app.command("layers")
@handle_errors
def inspect_layers(
    data: Annotated[Optional[Path], typer.Argument(exists=True, help="Optional images: adds the fraction of dead units per stage.")] = None,
    weights: InspectWeights = None, model: ModelOpt = None, max_images: MaxImages = None, img_size: ImgSize = None,
    batch_size: BatchSize = _default(_I, "batch_size"), workers: Workers = None, out: InspectOut = None, device: Device = "auto",
    precision: PrecisionOpt = cfg.Precision.auto, overwrite: InspectOverwrite = False,
) -> None:
    """Per stage: output shape, stride, measured receptive field, parameters, FLOPs, and on DATA the dead units.

    A unit is dead when it is never positive on any image at any position. Example: cnnxfer inspect layers --model resnet50 --weights none
    """
    _inspect("layers:run_layers", "layers", data=data, weights=weights, model=model, max_images=max_images, img_size=img_size,
             batch_size=batch_size, num_workers=workers, out=out, device=device, precision=precision, overwrite=overwrite)


@inspect_app.command("errors")
@handle_errors
def inspect_errors(
    data: Annotated[Path, typer.Argument(exists=True, help="Labelled images (class subfolders named like the model's classes).")],
    weights: InspectWeights = None, model: ModelOpt = None, top: Top = _default(_I, "top"),
    layer: Annotated[Optional[str], typer.Option("--layer", help="Where Grad-CAM looks (default: the last stage with a spatial map).")] = None,
    max_images: MaxImages = None, img_size: ImgSize = None, batch_size: BatchSize = _default(_I, "batch_size"), workers: Workers = None,
    out: InspectOut = None, device: Device = "auto", precision: PrecisionOpt = cfg.Precision.auto, overwrite: InspectOverwrite = False,
) -> None:
    """The images the model gets most wrong (highest loss): true and predicted class, probability, Grad-CAM heat map.

    Example: cnnxfer inspect errors test_photos/ --weights runs/photos --top 16
    """
    _inspect("worst:run_errors", "errors", data=data, weights=weights, model=model, top=top, layer=layer, max_images=max_images,
             img_size=img_size, batch_size=batch_size, num_workers=workers, out=out, device=device, precision=precision,
             overwrite=overwrite)


_A = cfg.AuditConfig.__dataclass_fields__


@app.command("audit")
@handle_errors
def audit(
    data: Annotated[Optional[Path], typer.Argument(exists=True, metavar="DATA", help="Labelled images: class folders (train/ and val/ inside for your split), or a CSV manifest (path,label). Not needed with --features.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for issues.csv, relabel.csv, probabilities.csv, quality.csv, audit.json and the features.")] = _default(_A, "out"),
    model: ModelOpt = None, weights: Weights = "hub",
    features: Annotated[Optional[Path], typer.Option("--features", exists=True, dir_okay=False, help="Labelled features from cnnxfer extract (or an earlier audit's features.parquet) instead of a model.")] = None,
    against: Annotated[Optional[Path], typer.Option("--against", exists=True, help="A second folder (a test set): its duplicates of DATA images are reported as leakage.")] = None,
    folds: Annotated[int, typer.Option("--folds", help="Folds of the cross-validated probe whose held-out probabilities find label issues.")] = _default(_A, "folds"),
    rank_by: Annotated[str, typer.Option("--rank-by", help="Order of the label issues: self_confidence (p of the given label) or margin.")] = _default(_A, "rank_by"),
    filter_by: Annotated[str, typer.Option("--filter-by", help="Which images confident learning flags: below_threshold (its pruned set where p(given) is far under its class's threshold, plus any such image), or the paper's both, prune_by_noise_rate, confident_joint.")] = _default(_A, "filter_by"),
    duplicate_threshold: Annotated[float, typer.Option("--duplicate-threshold", help="Cosine similarity of embeddings from which two images are near-duplicates.")] = _default(_A, "duplicate_threshold"),
    neighbours: Annotated[int, typer.Option("--neighbours", help="k of the k-nearest-neighbour distances of the outlier checks.")] = _default(_A, "neighbours"),
    outlier_z: Annotated[float, typer.Option("--outlier-z", help="Outlier: log k-NN distance this many robust SDs above its class's median.")] = _default(_A, "outlier_z"),
    dark: Annotated[float, typer.Option("--dark", help="Dark: the 99th percentile of luminance (0-1) below this.")] = _default(_A, "dark"),
    overexposed: Annotated[float, typer.Option("--overexposed", help="Overexposed: the 1st percentile of luminance (0-1) above this.")] = _default(_A, "overexposed"),
    blur_z: Annotated[float, typer.Option("--blur-z", help="Blurry: log sharpness this many robust SDs below the folder's median.")] = _default(_A, "blur_z"),
    min_entropy: Annotated[float, typer.Option("--min-entropy", help="Low information: luminance histogram entropy below this many bits.")] = _default(_A, "min_entropy"),
    max_aspect: Annotated[float, typer.Option("--max-aspect", help="Odd aspect: long side / short side above this.")] = _default(_A, "max_aspect"),
    val_split: ValSplit = _default(_A, "val_split"), seed: Seed = _default(_A, "seed"),
    img_size: ImgSize = None, batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")] = _default(_A, "batch_size"),
    workers: Workers = None, max_image_pixels: MaxPixels = DEFAULT_MAX_IMAGE_PIXELS, device: Device = "auto",
    precision: PrecisionOpt = cfg.Precision.auto,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier audit's files in --out.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Keep the features of an earlier audit in --out (finishing an interrupted extraction) and make the findings again, e.g. with other thresholds.")] = False,
) -> None:
    """Find the mislabelled, duplicated, leaked, odd and unreadable images of a labelled folder; never changes a file of yours.

    Writes OUT/issues.csv (path, issue, score, given and suggested label, the other image of a pair, how it was found) and OUT/relabel.csv, a path,label manifest with the suggested labels that finetune reads.
    Example: cnnxfer audit photos/ --model resnet50 --out audit/
    """
    from . import audit as audit_module, report

    config = cfg.AuditConfig(data=data, out=out, model=model, weights=weights, features=features, against=against, folds=folds,
                             rank_by=rank_by, filter_by=filter_by, duplicate_threshold=duplicate_threshold, neighbours=neighbours, outlier_z=outlier_z,
                             val_split=val_split, seed=seed, dark=dark, overexposed=overexposed, blur_z=blur_z, min_entropy=min_entropy,
                             max_aspect=max_aspect, img_size=img_size,
                             batch_size=batch_size, num_workers=workers, device=device, precision=precision,
                             max_image_pixels=max_image_pixels, overwrite=overwrite, resume=resume)
    with report.status("audit") as progress:
        result = audit_module.run_audit(config, progress)
    report.audit_summary(result)


@app.command("report")
@handle_errors
def report_page(
    run_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="A cnnxfer run directory (from finetune or train), or an audit folder (from audit).")],
    data: Annotated[Optional[Path], typer.Option("--data", exists=True, help="Labelled images for errors, embedding and invariance (default: the run's validation images, if its data folder is still there).")] = None,
    max_images: Annotated[Optional[int], typer.Option("--max-images", min=3, help="Use at most this many images (default 500), evenly across classes.")] = None,
    batch_size: BatchSize = _default(_I, "batch_size"), workers: Workers = None, device: Device = "auto",
    precision: PrecisionOpt = cfg.Precision.auto, overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing report.html.")] = False,
    audit: Annotated[Optional[Path], typer.Option("--audit", exists=True, file_okay=False, help="An audit folder (from cnnxfer audit) whose findings the run's page shows too.")] = None,
) -> None:
    """One offline page, RUN_DIR/report.html: summary, curves, confusion matrix, per-class table, worst errors, filters, embedding, invariance.

    Given an audit folder instead, AUDIT_DIR/report.html shows what cnnxfer audit found: the counts, the estimated
    label errors, and the worst images of each issue as thumbnails (pairs side by side).
    Images and tables are files beside it (report_files/), linked relatively: no network, no server.
    Example: cnnxfer report runs/photos --data test_photos/ --audit audit/
    """
    from . import report
    from .inspect import page

    config = cfg.InspectConfig(weights=str(run_dir), data=data, max_images=max_images, batch_size=batch_size,
                               num_workers=workers, device=device, precision=precision, overwrite=overwrite)
    with report.status("report") as progress:
        result = page.write_report(config, progress, audit=audit)
    report.page_summary(result)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()
