"""`cnnxfer inspect embedding`: the penultimate-layer features as a 2-D map (PCA and t-SNE from
scikit-learn), coloured by label with image thumbnails, and how well the labels cluster: the
leave-one-out k-nearest-neighbour accuracy in the map and in the full feature space.

The features come from a Parquet file written by `cnnxfer extract` (its `embedding` column and
recorded preprocessing, which also reads the thumbnails), or are computed from DATA with
--weights like `extract` does (the model's pre-logits features, `models.pre_logits`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import data, models
from ..config import InspectConfig, Method
from ..errors import DataError, UsageError
from ..preprocess import Preprocess
from . import subject as subj

DEFAULT_MAX_IMAGES = 2000  # t-SNE's cost grows with the square of the points
THUMBNAIL_PIXELS = 32


@dataclass
class EmbeddingResult:
    paths: list[str]
    labels: list[str | None]
    dim: int  # of the full features
    coords: dict[str, np.ndarray]  # method -> (N, 2)
    knn: dict[str, float | None]  # "full" and each method: leave-one-out k-NN accuracy (None: unlabelled)
    k: int
    source: str  # the Parquet file or the weights
    thumbnails: dict[int, np.ndarray] = field(default_factory=dict)  # point index -> (h, w, 3) uint8
    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable images, with the reason


def knn_accuracy(x: np.ndarray, labels: list, k: int = 5) -> float | None:
    """Leave-one-out accuracy of a k-nearest-neighbour vote (Euclidean), ties going to the nearer
    neighbour's class; None without labels or with fewer than k + 1 points."""
    from sklearn.neighbors import NearestNeighbors

    if any(label is None for label in labels) or len(labels) <= k:
        return None
    codes, y = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    correct = 0
    for i, row in enumerate(idx):
        neighbours = [j for j in row if j != i][:k]
        votes = np.zeros(len(codes))
        for rank, j in enumerate(neighbours):
            votes[y[j]] += 1 + 1e-6 * (k - rank)  # equal counts: the nearer neighbour's class wins
        correct += int(votes.argmax() == y[i])
    return correct / len(labels)


def project(features: np.ndarray, method: str, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2) by PCA, or by t-SNE after PCA to at most 50 dimensions."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n, d = features.shape
    if n < 3:
        raise DataError(f"an embedding map needs at least 3 images (got {n})")
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(features)
    reduced = PCA(n_components=min(50, d, n), random_state=seed).fit_transform(features) if d > 50 else features
    perplexity = min(perplexity, (n - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed).fit_transform(reduced)


def embed(features: np.ndarray, paths: list[str], labels: list, methods: list[str], *, k: int = 5,
          perplexity: float = 30.0, seed: int = 0, source: str = "") -> EmbeddingResult:
    features = np.asarray(features, dtype=np.float32)
    coords = {m: project(features, m, perplexity, seed) for m in methods}
    knn = {"full": knn_accuracy(features, labels, k), **{m: knn_accuracy(c, labels, k) for m, c in coords.items()}}
    return EmbeddingResult(list(paths), list(labels), features.shape[1], coords, knn, k, source)


def features_from_parquet(path: Path, limit: int | None, seed: int) -> tuple[np.ndarray, list[str], list, Preprocess | None]:
    """(features, paths, labels, the preprocessing recorded in the file) from `cnnxfer extract` output."""
    import pyarrow.parquet as pq

    from ..features import read_features

    try:
        meta = json.loads((pq.read_schema(path).metadata or {}).get(b"cnnxfer", b"{}"))
        paths, labels, x = read_features(path)
    except Exception as exc:
        raise DataError(f"{path}: not a features file from `cnnxfer extract`: {exc}") from exc
    if limit is not None and len(paths) > limit:
        codes = {v: i for i, v in enumerate(sorted({str(l) for l in labels}))}
        keep = subj.sample_evenly([codes[str(l)] for l in labels], limit, seed)
        x, paths, labels = x[keep], [paths[i] for i in keep], [labels[i] for i in keep]
    preprocess = Preprocess.from_data_config(meta["data_config"]) if meta.get("data_config") else None
    return x, paths, labels, preprocess


def features_from_images(subject: subj.Subject, images: data.ImageList, batch_size: int) -> tuple[np.ndarray, list[str], list]:
    """The model's pre-logits features of `images` (the readable ones)."""
    feats, paths, labels = [], [], []
    for batch in subject.batches(images, batch_size):
        with torch.no_grad(), subject.autocast():
            feats.append(models.pre_logits(subject.model, subject.normalize(batch.images)).float().cpu().numpy())
        for i in batch.indices.tolist():
            paths.append(str(images.paths[i]))
            labels.append(images.classes[images.labels[i]] if images.labels[i] is not None else None)
    if not feats:
        raise DataError("no image could be read")
    return np.concatenate(feats), paths, labels


def pick_thumbnails(points: np.ndarray, count: int, seed: int = 0) -> list[int]:
    """Up to `count` points, each at least 1/25 of the map's extent from the others (a greedy pass
    in a seeded random order), so thumbnails do not pile up."""
    if count <= 0 or not len(points):
        return []
    span = float(np.ptp(points, axis=0).max()) or 1.0
    chosen: list[int] = []
    for i in np.random.default_rng(seed).permutation(len(points)):
        if all(np.abs(points[i] - points[j]).max() >= span / 25 for j in chosen):
            chosen.append(int(i))
            if len(chosen) == count:
                break
    return chosen


def read_thumbnails(paths: list[str], chosen: list[int], preprocess: Preprocess | None) -> dict[int, np.ndarray]:
    """The chosen images as the model sees them, small; files that cannot be read are left out."""
    from PIL import Image

    if preprocess is None:
        return {}
    out = {}
    for i in chosen:
        try:
            picture = preprocess(Path(paths[i])).permute(1, 2, 0).numpy()
        except Exception:
            continue  # moved or unreadable since the features were extracted: the point stays, without picture
        picture = np.repeat(picture, 3, axis=2) if picture.shape[2] == 1 else picture
        out[i] = np.asarray(Image.fromarray(picture).resize((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS), Image.BILINEAR))
    return out


def save_embedding(result: EmbeddingResult, out: Path) -> list[Path]:
    from .. import report

    table = {"path": result.paths, "label": result.labels}
    for method, c in result.coords.items():
        table[f"{method}_x"], table[f"{method}_y"] = c[:, 0].tolist(), c[:, 1].tolist()
    result.files = [report.save_embedding_map(result, out / "embedding.png"),
                    report.save_table(table, out / "embedding.csv"),
                    report.save_json({"source": result.source, "images": len(result.paths), "dim": result.dim,
                                      "k": result.k, "knn_accuracy": result.knn}, out / "embedding.json")]
    return result.files


def run_embedding(config: InspectConfig) -> EmbeddingResult:
    """`cnnxfer inspect embedding`: features (from Parquet or computed), maps, k-NN, write."""
    methods = ["pca", "tsne"] if config.method == Method.both else [config.method.value]
    if config.knn < 1:
        raise UsageError(f"--knn must be at least 1 (got {config.knn})")
    limit = config.max_images or DEFAULT_MAX_IMAGES
    if config.features is not None:
        given = [name for name, value in (("--weights", config.weights), ("--model", config.model),
                                          ("--img-size", config.img_size)) if value is not None]
        if config.data is not None or given:
            raise UsageError(f"{', '.join(given) or 'DATA'} does not apply to a features file: its embeddings are "
                             "already computed (use DATA with --weights to compute them)")
        x, paths, labels, preprocess = features_from_parquet(Path(config.features), limit, config.seed)
        source = str(Path(config.features).resolve())
    else:
        subject = subj.load_subject(config)
        images = subj.read_images(config, limit=limit)
        x, paths, labels = features_from_images(subject, images, config.batch_size)
        preprocess, source = subject.preprocess, subject.loaded.weights
    out = subj.output_dir(config, "embedding")
    result = embed(x, paths, labels, methods, k=config.knn, perplexity=config.perplexity, seed=config.seed, source=source)
    result.thumbnails = read_thumbnails(paths, pick_thumbnails(result.coords[methods[-1]], config.thumbnails, config.seed),
                                        preprocess)
    if config.features is None:
        result.skipped = subj.write_skipped(subject, out)
    save_embedding(result, out)
    return result
