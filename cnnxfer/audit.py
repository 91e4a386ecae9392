"""`cnnxfer audit`: the mislabelled, duplicated, leaked, odd and broken images of a labelled folder.

One pass of the backbone gives every image an embedding (features.extract_features, resumable)
and, on the same decode, its quality numbers and content hash (quality.measure). Then, on the
features alone:
- label issues: confident learning (confident.py) on the held-out probabilities of the
  cross-validated probe (probe.out_of_sample_probabilities): no image is judged by a model that
  trained on it;
- duplicates: identical files by SHA-256, near-duplicates by cosine similarity of embeddings
  (neighbours.py, blockwise) or, for the nearest pairs by embedding or by pixels, by pixel
  correlation with crops searched (copies.py); a pair across train/val (or between DATA and --against) is leakage,
  a pair under two labels is a conflict, any other pair a duplicate;
- outliers: the mean cosine distance to an image's k nearest neighbours of its own class, far above
  its class's typical (`outlier`), or larger than to another class's nearest (`nearer_other_class`);
- quality (quality.flag), unreadable files, and the class balance.
Findings go to files in OUT (issues.csv, relabel.csv, probabilities.csv, quality.csv, audit.json);
relabel.csv is the folder as a manifest with the label issues relabelled where the suggestion is
confident (p(suggested) at or above that class's threshold and RELABEL_AT) and left out where it is
not, and the images too dark, bright, blurred or blank to learn from left out;
no image of the user's is moved, renamed or changed.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import checkpoint, confident, copies, data, quality
from .config import AuditConfig, ExtractConfig, to_dict
from .errors import DataError, OutputExistsError, UsageError
from .neighbours import nearest, normalise, pairs_above

log = logging.getLogger(__name__)

AUDIT_JSON, ISSUES, RELABEL, PROBABILITIES, QUALITY = "audit.json", "issues.csv", "relabel.csv", "probabilities.csv", "quality.csv"
FEATURES, AGAINST = "features.parquet", "against.parquet"
OUTPUTS = (AUDIT_JSON, ISSUES, RELABEL, PROBABILITIES, QUALITY, FEATURES, AGAINST, "features.skipped.csv", "against.skipped.csv")
ISSUE_COLUMNS = ("path", "issue", "score", "given_label", "suggested_label", "other_path", "detail")
NEARER_SHARE = 0.7  # of the k nearest images in one other class (0.5: 6% of 240 clean digits flagged)
COPY_RATIO = 0.25  # a near-duplicate is at least 4x nearer than the folder's typical nearest neighbour
DUPLICATE_NEIGHBOURS = 8  # candidates per image for the duplicate pairs (a group larger than this is found through its members)
UNUSABLE = {"dark", "overexposed", "blurry", "low_information"}  # explain a low p(given); left out of relabel.csv
RELABEL_AT = 0.8  # a label issue is relabelled in relabel.csv at p(suggested) >= max(its class's threshold, this)
# most severe first within each kind: which end of the score is worse
LOW_IS_WORSE = {"label_issue", "dark", "blurry", "low_information", "grayscale", "small"}
Progress = Callable[[str], None]


@dataclass
class ImageSet:
    """Audited images that decoded: paths, labels (-1 none), splits, features and quality numbers."""

    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    splits: list[str]
    features: np.ndarray
    quality: pd.DataFrame
    skipped: list[tuple[str, str]]


@dataclass
class AuditResult:
    out: Path
    images: int
    classes: list[str]
    counts: dict[str, int]  # issue kind -> rows in issues.csv
    class_counts: dict[str, int]
    imbalance: float
    balance: str
    split: str  # where train/val came from
    probe: dict
    estimated_label_errors: int
    relabelled: int  # label issues whose suggested label is confident: changed in relabel.csv
    duplicate_threshold: float
    left_out: int = 0  # label issues without a confident suggestion: not in relabel.csv
    unusable_left_out: int = 0  # images too dark, bright, blurred or blank: not in relabel.csv either
    against: int = 0
    skipped: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def run_audit(config: AuditConfig, progress: Progress | None = None) -> AuditResult:
    """Audit `config.data` (or the labelled features `config.features`) into `config.out`."""
    start = time.perf_counter()
    step = progress or (lambda name: None)
    out = Path(config.out)
    _prepare(out, config.overwrite, config.resume)
    notes: list[str] = []
    step("features")
    images, split = _audited_images(config, out, notes)
    against = _against_images(config, out, images) if config.against else None
    step("duplicates")
    x = normalise(images.features)
    near = nearest(x, x, max(DUPLICATE_NEIGHBOURS, config.neighbours), same=True)  # one pass for both
    # one reader of the pixels for both searches: DATA's images first, then --against's
    pixels = copies.Pixels(images.paths + (against.paths if against is not None else []))
    pairs, threshold = _duplicate_pairs(images, near, config, pixels)
    rows = _unreadable(images) + _duplicate_rows(images, pairs)
    if against is not None:
        rows += _leaks_against(images, against, threshold, pixels)
    step("label issues")
    flagged = quality.flag(images.quality, _thresholds(config))
    unusable = {f["row"] for f in flagged if f["issue"] in UNUSABLE}
    labels, probabilities, probe = _label_issues(images, config, _groups(len(images.paths), pairs), unusable)
    rows += labels
    step("outliers")
    rows += _outliers(images, near, config)
    rows += [_row(images, f["row"], f["issue"], f["score"], detail=f["detail"]) for f in flagged]
    counts = np.bincount(images.labels, minlength=len(images.classes))
    result = AuditResult(out=out, images=len(images.paths), classes=images.classes, counts={},
                         class_counts=dict(zip(images.classes, counts.tolist())),
                         imbalance=float(counts.max() / max(counts.min(), 1)), balance=_balance_note(counts, images.classes),
                         split=split, probe=probe, estimated_label_errors=int(probe.pop("estimated_total")), relabelled=0,
                         duplicate_threshold=threshold, against=len(against.paths) if against else 0,
                         skipped=len(images.skipped) + (len(against.skipped) if against else 0), notes=notes)
    step("writing")
    _write(out, images, rows, probabilities, config, result)
    result.seconds = time.perf_counter() - start
    return result


def _prepare(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse an earlier audit's files unless --overwrite (all replaced) or --resume (its features,
    finished or interrupted, are kept and continued; the findings are made again)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the audit's files")
    present = [name for name in OUTPUTS if (out / name).exists()]
    interrupted = checkpoint.parts_dir(out / FEATURES).exists()
    if (present or interrupted) and not (overwrite or resume):
        hint = " or --resume to finish its interrupted extraction" if interrupted else " (--resume keeps its features)"
        raise OutputExistsError(f"{out / (present[0] if present else FEATURES)} already exists; pass --overwrite to "
                                f"replace the audit{hint}")
    kept = (FEATURES, AGAINST, "features.skipped.csv", "against.skipped.csv") if resume else ()
    for name in present:
        if name not in kept:
            (out / name).unlink()
    if present:  # the report page of the findings replaced (cnnxfer report AUDIT_DIR): out of date now
        (out / "report.html").unlink(missing_ok=True)
        shutil.rmtree(out / "report_files", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _thresholds(config: AuditConfig) -> quality.Thresholds:
    return quality.Thresholds(config.dark, config.overexposed, config.blur_z, config.min_entropy, config.max_aspect)


# ---------------------------------------------------------------- the images and their features

def _audited_images(config: AuditConfig, out: Path, notes: list[str]) -> tuple[ImageSet, str]:
    if config.features is not None:
        images = _read_features(Path(config.features), None, config)
    else:
        images = _extract(config, config.data, out / FEATURES, labelled=True)
    if len(images.classes) < 2 or len({int(l) for l in images.labels}) < 2:
        found = ", ".join(sorted({images.classes[l] for l in images.labels})) or "none"
        raise DataError(f"{config.features or config.data}: the audit needs images of at least 2 classes "
                        f"(found {len(images.paths)} readable image(s) of class(es): {found})")
    unmeasured = int(images.quality["sha256"].isna().sum())
    if unmeasured:
        notes.append(f"{unmeasured} image(s) of the features could not be read again for the quality checks and "
                     "exact duplicates (moved or deleted since?); the log names them")
    split = _split(images, config)
    return images, split


def _extract(config: AuditConfig, folder: Path, out: Path, labelled: bool, classes=None) -> ImageSet:
    from .features import extract_features, skipped_path

    if labelled and not Path(folder).is_file() and data.find_split_folders(folder) is None:
        data.discover(folder, labelled=True)  # a flat folder or an empty one: named here, not as an extraction fault
    measured: dict[str, dict] = {}
    finished = config.resume and out.exists() and not checkpoint.parts_dir(out).exists()
    if not finished:  # --resume of a finished extraction: its features as they are, the quality decoded again
        extract_features(ExtractConfig(data=folder, out=out, model=config.model, weights=config.weights, img_size=config.img_size,
                                       batch_size=config.batch_size, num_workers=config.num_workers, device=config.device,
                                       precision=config.precision, max_image_pixels=config.max_image_pixels,
                                       resume=config.resume, overwrite=not config.resume),
                         observe=lambda path, image, shown: measured.__setitem__(os.path.abspath(path), quality.measure(path, image, shown)))
    images = _read_features(out, measured, config, classes, need_labels=labelled)
    skip = skipped_path(out)
    if skip.exists():
        images.skipped = [(os.path.abspath(r["path"]), r["reason"]) for r in csv.DictReader(io.StringIO(skip.read_text()))]
    return images


def _read_features(path: Path, measured: dict | None, config: AuditConfig, classes=None, need_labels=True) -> ImageSet:
    import pyarrow.parquet as pq

    from .features import read_features

    try:
        schema = pq.read_schema(path)
        paths, names, matrix = read_features(path)
    except Exception as exc:  # not Parquet, or not one cnnxfer wrote
        raise DataError(f"{path}: cannot read features ({exc.__class__.__name__}: {exc}); give a file from cnnxfer extract") from None
    if need_labels and (not names or any(n is None or n == "" for n in names)):
        raise DataError(f"{path} has no label for every image: the audit needs labelled features "
                        "(cnnxfer extract on class folders or a path,label manifest)")
    classes = list(classes) if classes is not None else sorted({n for n in names if n})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index.get(n, -1) if n else -1 for n in names], dtype=np.int64)
    splits = pq.read_table(path, columns=["split"]).column("split").to_pylist() if "split" in schema.names else [""] * len(paths)
    meta = json.loads((schema.metadata or {}).get(b"cnnxfer", b"{}"))
    table = _quality_table([os.path.abspath(p) for p in paths], measured or {}, meta.get("data_config"), config)
    return ImageSet([os.path.abspath(p) for p in paths], labels, classes, [s or "" for s in splits], matrix, table, [])


def _quality_table(paths: list[str], measured: dict, data_config: dict | None, config: AuditConfig) -> pd.DataFrame:
    """quality.measure for every path: from the extraction's decode, else decoded now (a resumed
    extraction's earlier parts, or --features) at the same working resolution."""
    from .preprocess import Preprocess

    missing = [p for p in paths if p not in measured]
    if missing:
        preprocess = Preprocess.from_data_config(data_config or {"input_size": (3, 224, 224)}, max_pixels=config.max_image_pixels)

        def one(path: str) -> tuple[str, dict | None]:
            try:
                image, shown = preprocess.decode(Path(path))
                return path, quality.measure(Path(path), image, shown)
            except Exception as exc:  # moved or deleted since the features were made: no quality numbers for it
                log.warning("audit: %s: no quality measures (%s)", path, exc)
                return path, None

        with ThreadPoolExecutor(max(2, (config.num_workers or 0))) as pool:
            measured = {**measured, **{p: m for p, m in pool.map(one, missing) if m is not None}}
    rows = [measured.get(p) or dict.fromkeys(quality.COLUMNS, np.nan) for p in paths]
    table = pd.DataFrame(rows, columns=list(quality.COLUMNS))
    table.insert(0, "path", paths)
    return table


def _split(images: ImageSet, config: AuditConfig) -> str:
    """Fill images.splits; say where they came from."""
    if any(images.splits):
        return "the train/ and val/ folders"
    source = Path(config.data) if config.data is not None else None
    listed = data.discover(source, labelled=True) if source is not None and source.exists() else None
    if listed is None:  # --features alone: split the rows as they stand
        order, labels = images.paths, images.labels.tolist()
    else:
        order, labels = [os.path.abspath(p) for p in listed.paths], listed.labels
    train, val = data.stratified_split(labels, config.val_split, config.seed)
    of = {order[i]: "val" for i in val}
    images.splits = [of.get(p, "train") for p in images.paths]
    return f"the split finetune makes (--val-split {config.val_split}, --seed {config.seed})"


def _against_images(config: AuditConfig, out: Path, images: ImageSet) -> ImageSet:
    against = _extract(config, Path(config.against), out / AGAINST, labelled=False, classes=images.classes)
    against.splits = ["against"] * len(against.paths)
    return against


# ---------------------------------------------------------------- detectors

def _row(images: ImageSet, i: int, issue: str, score: float, suggested: int | None = None, other: str = "",
         detail: str = "") -> dict:
    given = images.labels[i] if i < len(images.labels) else -1
    return {"path": images.paths[i] if i < len(images.paths) else "", "issue": issue, "score": score,
            "given_label": images.classes[given] if given >= 0 else "",
            "suggested_label": images.classes[suggested] if suggested is not None and suggested >= 0 else "",
            "other_path": other, "detail": detail}


def _unreadable(images: ImageSet) -> list[dict]:
    """The files that did not decode, labelled by their class folder when it is a class."""
    rows = []
    for path, reason in images.skipped:
        folder = Path(path).parent.name
        rows.append({"path": path, "issue": "unreadable", "score": float("nan"),
                     "given_label": folder if folder in images.classes else "", "suggested_label": "",
                     "other_path": "", "detail": reason})
    return rows


def _label_issues(images: ImageSet, config: AuditConfig, groups: np.ndarray,
                  unusable: set[int]) -> tuple[list[dict], np.ndarray, dict]:
    """Confident learning on held-out probabilities; copies are held out together (`groups`), so a
    mislabelled copy cannot teach the model that judges its twin. The `unusable` images (too dark,
    blurred, blank) are reported for that and not as label issues: their low p(given) is the
    image's fault (on the benchmark, 9 of 10 blurred Fashion-MNIST copies were flagged otherwise)."""
    from .probe import out_of_sample_probabilities

    k = len(images.classes)
    counts = np.bincount(images.labels, minlength=k)
    small = [images.classes[c] for c in range(k) if 0 < counts[c] < 2]
    if small:
        raise DataError(f"class(es) {', '.join(small)} have one readable image: the audit's cross-validation needs 2+ per class")
    probabilities, probe = out_of_sample_probabilities(images.features, images.labels, k, config.folds, config.seed,
                                                       groups=groups)
    found = confident.find_label_issues(images.labels, probabilities, filter_by=config.filter_by, rank_by=config.rank_by)
    t, rows = found.thresholds, []
    for i in found.issues:
        if i in unusable:
            continue
        j = int(found.suggested[i])
        # as likely as a typical image of the suggested class, and likely in itself: on the benchmark's
        # Fashion-MNIST (random flips) p >= t alone relabelled 38 flips and 30 correct labels, with 0.8 30 and 2
        sure = bool(probabilities[i, j] >= max(t[j], RELABEL_AT))
        rows.append({**_row(images, i, "label_issue", float(found.self_confidence[i]), j,
                            detail=f"held out: p(given)={found.self_confidence[i]:.3f} (its class's threshold "
                                   f"{t[images.labels[i]]:.2f}), p(suggested)={probabilities[i, j]:.3f} (threshold "
                                   f"{max(t[j], RELABEL_AT):.2f}): "
                                   + ("relabelled in relabel.csv" if sure else "left out of relabel.csv")),
                     "relabel": sure})
    probe = {**probe, "estimated_total": found.estimated_total, "unusable_not_judged": len(unusable & set(found.issues.tolist())), "thresholds": found.thresholds.tolist(),
             "estimated_errors": found.estimated_errors.round(1).tolist()}
    return rows, probabilities, probe


def _duplicate_pairs(images: ImageSet, near: tuple[np.ndarray, np.ndarray], config: AuditConfig,
                     pixels: copies.Pixels) -> tuple[dict[tuple[int, int], tuple[float, str]], float]:
    """{(a, b): (similarity, how)} of the duplicate pairs (a < b), and the embedding threshold used."""
    sims, idx = near[0][:, :DUPLICATE_NEIGHBOURS], near[1][:, :DUPLICATE_NEIGHBOURS]
    threshold = duplicate_threshold(sims[:, 0], config.duplicate_threshold)
    found = {(a, b): (s, f"cosine similarity of embeddings {s:.3f} >= {threshold:.3f}")
             for a, b, s in pairs_above(sims, idx, threshold)}
    candidates = _embedding_candidates(sims, idx) + copies.pixel_candidates(pixels, range(len(images.paths)))
    for pair, s in copies.copies(pixels, candidates).items():
        found.setdefault(pair, (s, copies.describe(s)))
    for group in _same_hash(images.quality["sha256"].tolist()):
        for a, b in zip(group, group[1:]):
            found[(min(a, b), max(a, b))] = (1.0, "identical files (SHA-256)")
    return found, threshold


def _embedding_candidates(sims: np.ndarray, idx: np.ndarray) -> list[tuple[int, int]]:
    """Every image with its copies.CANDIDATES nearest by embedding, from cosine copies.FLOOR."""
    keep = sims[:, :copies.CANDIDATES] >= copies.FLOOR
    return [(int(a), int(idx[a, j])) for a, j in zip(*np.nonzero(keep))]


def _groups(n: int, pairs) -> np.ndarray:
    """Connected components of the duplicate pairs: one id per image (union-find)."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        parent[root(a)] = root(b)
    return np.array([root(i) for i in range(n)])


def _duplicate_rows(images: ImageSet, found: dict) -> list[dict]:
    rows = []
    for (a, b), (s, how) in sorted(found.items(), key=lambda kv: -kv[1][0]):
        if images.splits[a] != images.splits[b]:
            first, second = (a, b) if images.splits[a] == "val" else (b, a)  # the validation copy is the one to look at
            rows.append(_row(images, first, "leakage", s, other=images.paths[second],
                             detail=f"{images.splits[first]} copy of a {images.splits[second]} image: {how}"))
        if images.labels[a] != images.labels[b]:
            rows.append(_row(images, a, "duplicate_conflicting_labels", s, int(images.labels[b]), images.paths[b],
                             detail=f"labelled {images.classes[images.labels[a]]} and {images.classes[images.labels[b]]}: {how}"))
        elif images.splits[a] == images.splits[b]:
            rows.append(_row(images, a, "duplicate", s, other=images.paths[b], detail=how))
    return rows


def duplicate_threshold(nearest_similarity: np.ndarray, ceiling: float) -> float:
    """The similarity from which a pair is a near-duplicate: --duplicate-threshold, raised where
    the folder's images are all alike so that a copy must be at least COPY_RATIO times nearer
    (in cosine distance) than the median image's nearest neighbour. Measured with ImageNet Lite0:
    that median is 0.84 on Fashion-MNIST but 0.96 on the 8x8 digits, whose natural neighbours
    (0.98) are nearer than resized or re-encoded copies of one image (0.95-0.99)."""
    typical = 1.0 - float(np.median(nearest_similarity)) if len(nearest_similarity) else 1.0
    return max(ceiling, 1.0 - COPY_RATIO * typical)


def _leaks_against(images: ImageSet, against: ImageSet, threshold: float, pixels: copies.Pixels) -> list[dict]:
    """Rows for the --against images that duplicate a DATA image: by hash, embedding threshold or pixels."""
    sims, idx = nearest(normalise(against.features), normalise(images.features), DUPLICATE_NEIGHBOURS)
    found = {(a, b): (s, f"cosine similarity {s:.3f} >= {threshold:.3f}") for a, b, s in pairs_above(sims, idx, threshold, same=False)}
    n = len(images.paths)  # `pixels` holds DATA's rows first, then --against's
    candidates = [(b, n + a) for a, b in _embedding_candidates(sims, idx)]
    candidates += [(b, a) for a, b in copies.pixel_candidates(pixels, range(n, n + len(against.paths)), range(n))]
    for (b, a), s in copies.copies(pixels, candidates).items():
        found.setdefault((a - n, b), (s, copies.describe(s)))
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(images.quality["sha256"]):
        by_hash.setdefault(h, []).append(i)
    for a, h in enumerate(against.quality["sha256"]):
        for b in by_hash.get(h, []) if isinstance(h, str) else []:
            found[(a, b)] = (1.0, "identical files (SHA-256)")
    return [{"path": against.paths[a], "issue": "leakage", "score": s, "given_label": "",
             "suggested_label": "", "other_path": images.paths[b],
             "detail": f"--against image that duplicates a DATA image ({images.splits[b]}): {how}"}
            for (a, b), (s, how) in sorted(found.items(), key=lambda kv: -kv[1][0])]


def _same_hash(hashes: list) -> list[list[int]]:
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        if isinstance(h, str):
            groups.setdefault(h, []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def knn_distances(features: np.ndarray, labels: np.ndarray, classes: int, k: int) -> np.ndarray:
    """(N, classes): the mean cosine distance from every image to its k nearest images of each
    class (itself left out); NaN for a class without images."""
    x = normalise(features)
    out = np.full((len(labels), classes), np.nan)
    everyone = np.arange(len(labels))
    for c in range(classes):
        members = np.flatnonzero(labels == c)
        if not len(members):
            continue
        keys = x[members]
        own, _ = nearest(keys, keys, k, same=True)
        if own.shape[1]:
            out[members, c] = 1.0 - own.mean(1)
        others = np.setdiff1d(everyone, members)
        sims, _ = nearest(x[others], keys, k)
        out[others, c] = 1.0 - sims.mean(1)
    return out


def _outliers(images: ImageSet, near: tuple[np.ndarray, np.ndarray], config: AuditConfig) -> list[dict]:
    k = len(images.classes)
    dist = knn_distances(images.features, images.labels, k, config.neighbours)
    rows = np.arange(len(images.labels))
    own = dist[rows, images.labels]
    other = np.nan_to_num(dist, nan=np.inf)
    found = []
    for c in range(k):
        members = np.flatnonzero((images.labels == c) & np.isfinite(own))
        if len(members) < 3:
            continue
        z = quality.robust_z(np.log(np.maximum(own[members], 1e-6)))
        for i, zi in zip(members[z > config.outlier_z], z[z > config.outlier_z]):
            found.append(_row(images, int(i), "outlier", float(own[i]),
                              detail=f"mean cosine distance {own[i]:.3f} to its {config.neighbours} nearest "
                                     f"{images.classes[c]} images, {zi:.1f} robust SDs above the class's median"))
    idx = near[1][:, :config.neighbours]
    votes = np.stack([np.bincount(images.labels[r], minlength=k) for r in idx]) if idx.shape[1] else np.zeros((len(rows), k))
    majority = votes.argmax(1)
    share = votes[rows, majority] / max(idx.shape[1], 1)
    for i in np.flatnonzero((majority != images.labels) & (share >= NEARER_SHARE) & (other[rows, majority] < own)):
        j = int(majority[i])
        found.append(_row(images, int(i), "nearer_other_class", float(share[i]), j,
                          detail=f"{votes[i, j]} of its {idx.shape[1]} nearest images are {images.classes[j]}, and their mean "
                                 f"cosine distance {other[i, j]:.3f} is below its own class's {own[i]:.3f}"))
    return found


def _balance_note(counts: np.ndarray, classes: list[str]) -> str:
    low, high = int(counts.argmin()), int(counts.argmax())
    ratio = counts[high] / max(counts[low], 1)
    if ratio < 1.5:
        return f"balanced enough (largest/smallest {ratio:.2f}): --balance is not needed"
    weight = len(counts) and counts.sum() / (len(counts) * max(counts[low], 1))
    return (f"{classes[high]} has {ratio:.1f}x the images of {classes[low]}: --balance loss weighs each "
            f"{classes[low]} image {weight:.2f}x (each class counts the same in the loss); --balance sampler draws "
            f"classes equally often, showing each {classes[low]} image about {ratio:.1f}x as often as a {classes[high]} one")


# ---------------------------------------------------------------- outputs

def _write(out: Path, images: ImageSet, rows: list[dict], probabilities: np.ndarray, config: AuditConfig,
           result: AuditResult) -> None:
    issues = pd.DataFrame(rows, columns=list(ISSUE_COLUMNS))
    if len(issues):
        worse = np.where(issues["issue"].isin(LOW_IS_WORSE), issues["score"], -issues["score"])
        issues = issues.assign(_o=worse).sort_values(["issue", "_o"], kind="stable").drop(columns="_o")
    result.counts = issues["issue"].value_counts().to_dict()
    _atomic_csv(out / ISSUES, issues)
    flagged = [r for r in rows if r["issue"] == "label_issue"]
    relabel = {r["path"]: r["suggested_label"] for r in flagged if r["relabel"]}
    left_out = {r["path"] for r in flagged if not r["relabel"]}
    result.relabelled, result.left_out = len(relabel), len(left_out)
    unusable = {r["path"] for r in rows if r["issue"] in UNUSABLE} - left_out
    result.unusable_left_out = len(unusable)
    left_out |= unusable
    kept = [(p, relabel.get(p, images.classes[l])) for p, l in zip(images.paths, images.labels) if p not in left_out]
    _atomic_csv(out / RELABEL, pd.DataFrame(kept, columns=["path", "label"]))
    probs = pd.DataFrame(probabilities, columns=images.classes)
    probs.insert(0, "given_label", [images.classes[l] for l in images.labels])
    probs.insert(0, "path", images.paths)
    _atomic_csv(out / PROBABILITIES, probs)
    _atomic_csv(out / QUALITY, images.quality.assign(split=images.splits))
    checkpoint.atomic_write_json(out / AUDIT_JSON, {
        "config": to_dict(config), "images": result.images, "classes": images.classes, "counts": result.counts,
        "class_counts": result.class_counts, "imbalance": result.imbalance, "balance": result.balance,
        "split": result.split, "probe": result.probe, "estimated_label_errors": result.estimated_label_errors,
        "relabelled": result.relabelled, "left_out": result.left_out, "unusable_left_out": result.unusable_left_out, "duplicate_threshold": result.duplicate_threshold, "against": result.against, "skipped": result.skipped, "notes": result.notes,
        "how": HOW})


def _atomic_csv(path: Path, frame: pd.DataFrame) -> None:
    checkpoint.atomic_write_text(path, frame.to_csv(index=False))


HOW = {
    "label_issue": "confident learning (Northcutt et al. 2021) on held-out probabilities: the k-fold cross-validated "
                   "probe on the features gives each image probabilities from a fold that did not train on it (copies "
                   "held out together); per-class thresholds t (mean p of a class over its images); the confident "
                   "joint, calibrated to the label counts, estimates the errors per (given, likely) pair and in all; "
                   "--filter-by below_threshold (default) flags the images pruned by noise rate whose p(given) is "
                   "under 0.35 t, and any image predicted as another class with p(given) under 0.2 t, at most the "
                   "estimated number, least confident first; images flagged dark, overexposed, blurry or low_information are "
                   "reported for that instead; score = p(given label), lowest first",
    "leakage": "a duplicate pair across train/val (or DATA/--against): identical files by SHA-256, or cosine similarity "
               "of embeddings at or above --duplicate-threshold, raised to 1 - (1 - the median image's nearest-neighbour "
               "similarity) / 4 in a folder of look-alikes (duplicate_threshold in audit.json), or one image twice by its "
               "pixels: each image's 5 nearest by embedding and by 16x16 pixels compared in grayscale at the smaller "
               "one's size (at most 32 px) and the larger's, crops of up to 6% a side searched; normalised correlation "
               "0.99+, or 0.97+ with every other candidate of both at least 3x as far; score = similarity",
    "duplicate": "a duplicate pair within one split and one label; score = similarity",
    "duplicate_conflicting_labels": "a duplicate pair under two labels (also a label issue); score = similarity",
    "outlier": "mean cosine distance to the k nearest images of its own class, more than --outlier-z robust SDs "
               "(1.4826 MAD) of the log distance above its class's median; score = distance",
    "nearer_other_class": "more than half of its k nearest images (cosine) are of one other class, and that class's k "
                          "nearest are nearer on average than its own class's; score = that class's share of the k",
    "unreadable": "the file did not decode (reason in detail)",
    **quality.HOW,
}
