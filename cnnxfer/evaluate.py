"""`predict` and `evaluate`: any model behind the Predictor interface over a folder of images.

A run directory runs in PyTorch (predictor.TorchPredictor); a file written by `cnnxfer export`
runs in onnxruntime or TorchScript (export.py) with the preprocessing it carries. Both go through
the same batch loop (predictor.predict_images) and the same numpy metrics (metrics.py). Each
command opens one Session (session.py): the device, the precision, and under torchrun each
process's share of the images, gathered in image order at the end.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import calibration, checkpoint, data, rundir
from .config import CalibrateConfig, EvaluateConfig, Precision, PredictConfig, Tta
from .errors import DataError, StrictModeError, UsageError
from .metrics import Evaluation, log_loss, softmax, summarize
from .predictor import Predictor, TorchPredictor, predict_images
from .session import Session, open_session

ABSTAINED = "abstained"  # predict --min-confidence: the prediction of an image below it
SET_SEPARATOR = "|"  # between the classes of a prediction set in predictions.csv
WEIGHTS_HELP = "a cnnxfer run directory (from finetune or train) or a file from `cnnxfer export` (.onnx, TorchScript)"


@dataclass
class Predictions:
    """Class probabilities for the readable images of a folder."""

    images: data.ImageList
    probs: np.ndarray  # (N, C), rows in the order of `indices`
    indices: np.ndarray  # index of each row's image in `images`
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    backend: str = "pytorch"
    calibration: dict | None = None  # what was applied: the model's temperature and conformal scores (None: raw)


def load_predictor(weights: str, session: Session, *, precision: Precision | str = Precision.auto,
                   tta: Tta | str = Tta.none) -> Predictor:
    """The Predictor for `--weights` on `session`: a run directory in PyTorch (in the session's
    precision), an exported file in its runtime (in its own: `precision` other than auto must name it)."""
    if rundir.is_run_dir(weights):
        return TorchPredictor.from_run(weights, session, tta)
    from . import export

    if export.is_exported(weights):
        return export.load_predictor(Path(weights), session, precision=precision, tta=tta)
    raise UsageError(f"--weights {weights} must be {WEIGHTS_HELP}")


def predict(images: data.ImageList, weights: str, session: Session, *, precision: Precision | str = Precision.auto,
            tta: Tta | str = Tta.none, batch_size: int = 64, progress=None,
            max_image_pixels: int = data.DEFAULT_MAX_IMAGE_PIXELS, calibrated: bool = True) -> Predictions:
    """Run a trained model (a run directory, or a file from `cnnxfer export`) over `images` on
    `session`; under torchrun each process predicts its share and every process gets them all.
    `calibrated`: the logits divided by the temperature fitted for the model (none fitted: as they are)."""
    start = time.perf_counter()
    predictor = load_predictor(weights, session, precision=precision, tta=tta)
    out = predict_images(predictor, images, batch_size=batch_size, max_pixels=max_image_pixels, progress=progress)
    indices, logits = session.gather(out.indices, out.logits)
    skipped = sorted(s for part in session.gather_objects(out.skipped) for s in part)
    skipped = [(str(images.paths[i]), reason) for i, reason in skipped]
    applied = predictor.calibration if calibrated else None
    probs = softmax(logits / (applied["temperature"] if applied else 1.0))
    return Predictions(images, probs, indices, predictor.classes, skipped, time.perf_counter() - start,
                       predictor.device, predictor.backend, applied)


def session_precision(weights: str, precision: Precision | str) -> Precision | str:
    """The precision to open a command's Session with: --precision for a run directory; fp32 for an
    exported file, which computes in its own (load_predictor checks --precision against it)."""
    return precision if rundir.is_run_dir(weights) else Precision.fp32


def model_classes(weights: str) -> list[str]:
    """The class names of `--weights` (a run directory or an exported file), read without loading it."""
    if rundir.is_run_dir(weights):
        classes = rundir.read_config(Path(weights)).classes
        if not classes:
            raise UsageError(f"{weights}/config.json lists no classes")
        return classes
    from . import export

    if export.is_exported(weights):
        return export.read_info(Path(weights)).classes
    raise UsageError(f"--weights {weights} must be {WEIGHTS_HELP}")


def write_predictions(pred: Predictions, out: Path, top_k: int = 5, min_confidence: float | None = None,
                      sets: list[np.ndarray] | None = None) -> Path:
    """One row per readable image: path, predicted class and probability, then the top-k; CSV or
    Parquet by the extension of `out`. `min_confidence`: the prediction is "abstained" where the
    probability is below it. `sets`: each image's conformal prediction set (class indices)."""
    suffix = _check_out_suffix(out)
    k = max(1, min(top_k, len(pred.classes)))
    top_i = np.argsort(-pred.probs, axis=1, kind="stable")[:, :k]
    top_p = np.take_along_axis(pred.probs, top_i, axis=1)
    rows = {"path": [str(pred.images.paths[i]) for i in pred.indices.tolist()]}
    if pred.images.labelled:
        rows["label"] = [pred.images.classes[pred.images.labels[i]] for i in pred.indices.tolist()]
    rows["prediction"] = [pred.classes[i] for i in top_i[:, 0].tolist()]
    if min_confidence is not None:
        rows["prediction"] = [c if p >= min_confidence else ABSTAINED for c, p in zip(rows["prediction"], top_p[:, 0])]
    rows["probability"] = top_p[:, 0].tolist()
    if sets is not None:
        rows["set"] = [SET_SEPARATOR.join(pred.classes[i] for i in row) for row in sets]
        rows["set_size"] = [len(row) for row in sets]
    for j in range(k):
        rows[f"top{j + 1}_class"] = [pred.classes[i] for i in top_i[:, j].tolist()]
        rows[f"top{j + 1}_prob"] = top_p[:, j].tolist()
    df = pd.DataFrame(rows)
    with checkpoint.atomic_path(Path(out)) as tmp:
        df.to_csv(tmp, index=False) if suffix == ".csv" else df.to_parquet(tmp, index=False)
    return Path(out)


def _check_out_suffix(out: Path) -> str:
    suffix = Path(out).suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise UsageError(f"--out {out}: use a .csv or .parquet file name")
    return suffix


def skipped_file_for(out: Path) -> Path:
    from .features import skipped_path

    return skipped_path(Path(out))


def predict_folder(config: PredictConfig, progress=None) -> Predictions:
    """`cnnxfer predict`: top-k classes per image to CSV/Parquet, unreadable files listed beside it;
    abstentions below --min-confidence, conformal sets at --coverage."""
    out = Path(config.out)
    checkpoint.prepare_output(out, config.overwrite)
    _check_out_suffix(out)  # options first: a bad one is named before any image is read
    model_classes(config.weights)
    if config.coverage is not None:
        conformal_for(config.weights, config.coverage, config.calibrated)
    images = data.discover(config.images, labelled=None, classes=None)
    with open_session(config.device, session_precision(config.weights, config.precision), config.num_workers) as session:
        pred = predict(images, config.weights, session, precision=config.precision, tta=config.tta,
                       batch_size=config.batch_size, progress=progress, max_image_pixels=config.max_image_pixels,
                       calibrated=config.calibrated)
    sets = calibration.sets_for(pred.probs, pred.calibration, config.coverage) if config.coverage is not None else None
    if session.is_main:  # under torchrun every process predicted its share; rank 0 writes them all
        write_predictions(pred, out, config.top_k, config.min_confidence, sets)
        data.write_skipped(skipped_file_for(out), pred.skipped)
    if config.strict and pred.skipped:
        raise StrictModeError(f"--strict: {len(pred.skipped)} unreadable image(s) skipped; see {skipped_file_for(out)}")
    return pred


def conformal_for(weights: str, coverage: float, calibrated: bool) -> dict:
    """The calibration of `weights` that --coverage needs, checked before any image is read."""
    if not calibrated:
        raise UsageError("--coverage uses the calibrated probabilities its conformal scores were fitted on: "
                         "leave out --no-calibration")
    fitted = read_calibration(weights)
    if not fitted or not fitted.get("conformal"):
        raise UsageError(f"--coverage: {weights} has no conformal scores (a run without validation images, or from an "
                         f"older cnnxfer): fit them with `cnnxfer calibrate RUN_DIR --data HELD_OUT_IMAGES`")
    calibration.check_coverage(fitted, coverage)
    return fitted


def read_calibration(weights: str) -> dict | None:
    """The calibration a run directory's config.json or an exported file's metadata carries."""
    if rundir.is_run_dir(weights):
        return rundir.read_config(Path(weights)).calibration
    from . import export

    return export.read_info(Path(weights)).calibration if export.is_exported(weights) else None


def evaluate_folder(config: EvaluateConfig, progress=None) -> Evaluation:
    """`cnnxfer evaluate`: accuracy, per-class report, confusion matrix and calibration on a labelled
    folder; at --min-confidence the accuracy of what is kept, at --coverage the conformal sets', with
    --unknown how well the confidence tells the classes the model never saw.

    Unreadable images are listed in `config.skipped_path` (default: beside `config.json_path`, else
    evaluate.skipped.csv in the current folder, like sanity-check's list).
    """
    weights, json_path = config.weights, config.json_path
    classes = model_classes(weights)
    if config.coverage is not None:
        conformal_for(weights, config.coverage, config.calibrated)
    data_path = Path(config.data)
    split = data.find_split_folders(data_path)
    if split and "train" not in classes:  # a train/ + val/ dataset, as finetune takes it: score val/
        data_path = split[1]
    images = data.discover(data_path, labelled=True, classes=classes)
    unknown = data.discover(config.unknown, labelled=None, classes=None) if config.unknown else None
    with open_session(config.device, session_precision(weights, config.precision), config.num_workers) as session:
        run = lambda imgs: predict(imgs, weights, session, precision=config.precision, tta=config.tta,  # noqa: E731
                                   batch_size=config.batch_size, progress=progress,
                                   max_image_pixels=config.max_image_pixels, calibrated=config.calibrated)
        pred = run(images)
        strange = run(unknown) if unknown is not None else None
        features = _unknown_features(weights, session, images, unknown, config) if unknown is not None else None
    targets = np.array([images.labels[i] for i in pred.indices.tolist()], dtype=np.int64)
    if len(targets) == 0:
        raise DataError(f"{data_path}: no image could be read")
    result = summarize(pred.probs, targets, classes, log_loss(pred.probs, targets))
    result.skipped, result.data, result.warnings = len(pred.skipped), Path(data_path), images.warnings
    result.trained_on = trained_on(images, pred.indices.tolist(), weights)
    result.calibration = calibration.measure(pred.probs, targets, pred.calibration)
    if config.min_confidence is not None:
        result.selective = calibration.at_threshold(pred.probs, targets, config.min_confidence)
    if config.coverage is not None:
        result.conformal = calibration.set_coverage(calibration.sets_for(pred.probs, pred.calibration, config.coverage),
                                                    targets, config.coverage)
    if strange is not None:
        if not len(strange.indices):
            raise DataError(f"--unknown {config.unknown}: no image could be read")
        result.unknown = calibration.unknown_separation(pred.probs, strange.probs, str(config.unknown), features)
    skipped = pred.skipped + (strange.skipped if strange is not None else [])
    if skipped:
        default = skipped_file_for(json_path) if json_path else Path("evaluate.skipped.csv")
        result.skipped_file = Path(config.skipped_path or default)
        if session.is_main:
            data.write_skipped(result.skipped_file, skipped)
    if json_path and session.is_main:
        checkpoint.atomic_write_json(Path(json_path), result.to_dict())
    if config.strict and skipped:
        raise StrictModeError(f"--strict: {len(skipped)} unreadable image(s) skipped; see {result.skipped_file}")
    return result


def _unknown_features(weights: str, session: Session, images: data.ImageList, unknown: data.ImageList,
                      config: EvaluateConfig) -> tuple | None:
    """(DATA's features, the unknown images', the training classes' means) in the run's feature
    space, for evaluate --unknown's second score; None for an exported file, or a run whose training
    images cannot be found."""
    from .predictor import FeaturePredictor
    from .recipe import run_split

    split = run_split(weights) if rundir.is_run_dir(weights) else None
    if split is None:
        return None
    predictor = FeaturePredictor.from_run(weights, session)

    def embed(imgs: data.ImageList) -> tuple[np.ndarray, np.ndarray]:
        out = predict_images(predictor, imgs, batch_size=config.batch_size, max_pixels=config.max_image_pixels)
        return session.gather(out.indices, out.logits)

    train_idx, train = embed(split[0])
    labels = np.array([split[0].labels[i] for i in train_idx.tolist()])
    return embed(images)[1], embed(unknown)[1], calibration.class_means(train, labels, len(split[0].classes))


def calibrate_run(config: CalibrateConfig, progress=None) -> dict:
    """`cnnxfer calibrate`: the run's temperature and conformal scores fitted again on the labelled
    images of `config.data` (its raw probabilities), written into its config.json (atomically)."""
    run_dir = Path(config.run)
    if not rundir.is_run_dir(run_dir):
        raise UsageError(f"RUN_DIR {run_dir} is not a cnnxfer run directory (no config.json)")
    classes = model_classes(str(run_dir))
    images = data.discover(Path(config.data), labelled=True, classes=classes)
    with open_session(config.device, config.precision, config.num_workers) as session:
        pred = predict(images, str(run_dir), session, precision=config.precision, tta=config.tta,
                       batch_size=config.batch_size, progress=progress, max_image_pixels=config.max_image_pixels,
                       calibrated=False)
    targets = np.array([images.labels[i] for i in pred.indices.tolist()], dtype=np.int64)
    if len(targets) == 0:
        raise DataError(f"{config.data}: no image could be read")
    seen = trained_on(images, pred.indices.tolist(), str(run_dir))
    if seen:
        raise DataError(f"{config.data}: {seen} of its {len(targets)} images trained {run_dir}; calibrate on images "
                        f"it never saw (the scores would be optimistic)")
    fitted = calibration.fit(pred.probs, targets, f"held-out images in {Path(config.data).resolve()}")
    fitted["skipped"] = len(pred.skipped)
    if session.is_main:
        (run_dir / rundir.CALIBRATE_SKIPPED).unlink(missing_ok=True)  # an earlier calibrate's list
        data.write_skipped(run_dir / rundir.CALIBRATE_SKIPPED, pred.skipped)
        run = dataclasses.replace(rundir.read_config(run_dir), calibration=fitted)
        rundir.RunDir(run_dir).write_config(run)
        rundir.RunDir(run_dir).save_plots()
    return fitted


def trained_on(images: data.ImageList, indices: list[int], weights: str) -> int:
    """How many of the evaluated images (`indices` into `images`) the run in `weights` trained on.

    The run's training images are those its splits.csv lists (recipe.run_split); its validation images
    too when the kept probe was fitted again on both (probing.ProbeStage.refit_kept). 0 for an exported file, and
    for an older run without splits.csv whose data folder is gone or moved.
    """
    from .recipe import run_split

    if not rundir.is_run_dir(weights):
        return 0
    run, split = rundir.read_config(weights), run_split(weights)
    if split is None:
        return 0
    train, val = split
    refit = (run.probe or {}).get("refit") and (run.best or {}).get("epoch") == 0
    seen = {os.path.realpath(p) for p in [*train.paths, *(val.paths if refit else [])]}
    return sum(os.path.realpath(images.paths[i]) in seen for i in indices)
