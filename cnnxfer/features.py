"""Level 1: a pretrained CNN as a feature extractor, streaming embeddings to Parquet.

The run writes finished parts into `<out>.parts/` (each written as *.tmp, closed, then renamed),
with a JSON manifest of the finished parts. A kill loses at most the part in progress; `--resume`
redoes only what is missing and refuses changed inputs. When every part is done they are merged
into the single `<out>` file (row group by row group, so memory stays flat) and the parts removed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import checkpoint, data, device as dev, loader as loaders, models
from .predictor import flip_average
from .preprocess import Preprocess
from .config import ExtractConfig, to_dict
from .errors import DataError, OutputExistsError, StrictModeError
from .signals import check_signals, deferred_signals

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (images done now, total images)


@dataclass
class ExtractSummary:
    out: Path
    images: int
    skipped: int
    skipped_file: Path | None
    columns: dict[str, int]
    seconds: float
    device: str
    precision: str
    resumed: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return (self.images - self.resumed) / self.seconds if self.seconds > 0 else 0.0


def column_name(layer: str | None) -> str:
    return "embedding" if layer is None else "embedding_" + layer.replace(".", "_")


def skipped_path(out: Path) -> Path:
    """features.parquet -> features.skipped.csv (features.v2.parquet -> features.v2.skipped.csv)."""
    return out.with_name(out.with_suffix("").name + ".skipped.csv")


class Embedder:
    """Model + options -> {column: (N, D) float32 features} for a batch of uint8 images."""

    def __init__(self, model: torch.nn.Module, layers: list[str], pool: str | None, tta: str,
                 runtime: dev.Runtime, preprocess: Preprocess):
        self.model, self.layers, self.tta = model, layers, tta
        self.layer_pool = pool or "avg"
        self.device, self.dtype, self.channels_last = runtime.device, runtime.dtype, runtime.channels_last
        self.normalize = preprocess.normalizer().to(runtime.device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.normalize(images.to(self.device, non_blocking=True))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.tta == "flip":
            return flip_average(self._forward, x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        taps = models.LayerTaps(self.model, self.layers) if self.layers else None
        try:
            with dev.autocast(self.device, self.dtype):
                final = models.pre_logits(self.model, x)
            out = {column_name(None): final.float().flatten(1)}
            for layer in self.layers:
                out[column_name(layer)] = models.pool_features(taps.outputs[layer].float(), self.layer_pool)
        finally:
            if taps:
                taps.close()
        return out


def _input_fingerprint(images: data.ImageList) -> str:
    """Paths, sizes and mtimes: a resume over changed inputs must be noticed."""
    h = hashlib.sha256()
    for path, label in zip(images.paths, images.labels):
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{path}\t{label}\t{stamp}\n".encode())
    return h.hexdigest()


def _schema(columns: dict[str, int], metadata: dict) -> pa.Schema:
    fields = [pa.field("path", pa.string()), pa.field("label", pa.string())]
    fields += [pa.field(name, pa.list_(pa.float32(), dim)) for name, dim in columns.items()]
    return pa.schema(fields, metadata={"cnnxfer": json.dumps(metadata)})


def _record_batch(schema: pa.Schema, paths: list[str], labels: list[str | None], feats: dict[str, torch.Tensor]) -> pa.RecordBatch:
    arrays = [pa.array(paths, pa.string()), pa.array(labels, pa.string())]
    for name in schema.names[2:]:
        matrix = feats[name].cpu().numpy()
        flat = pa.array(matrix.reshape(-1), pa.float32())
        arrays.append(pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1]))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _part_batches(n: int, part_size: int, batch_size: int, todo: list[int]) -> list[list[int]]:
    """Batches that never cross a part boundary, over the parts still to do."""
    out = []
    for part in todo:
        start, stop = part * part_size, min((part + 1) * part_size, n)
        out += [list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size)]
    return out


def _open_manifest(config: ExtractConfig, parts_dir: Path, fingerprint: dict) -> dict:
    """The manifest of finished parts: new, or the interrupted run's when resuming the same job."""
    path = parts_dir / "manifest.json"
    if parts_dir.exists() and not config.overwrite:
        if not config.resume:
            raise OutputExistsError(f"an interrupted extraction is in {parts_dir}; pass --resume to continue it or --overwrite to start over")
        manifest = checkpoint.read_json(path) if path.exists() else {"fingerprint": fingerprint, "parts": {}}
        if manifest.get("fingerprint") != fingerprint:
            changed = _changes(manifest.get("fingerprint", {}), fingerprint)
            raise DataError(f"cannot resume {config.out}: {'; '.join(changed)} changed since the interrupted run; "
                            "run it again with the same options, or use --overwrite to start over")
        return manifest
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir(parents=True)
    manifest = {"fingerprint": fingerprint, "parts": {}}
    checkpoint.atomic_write_json(path, manifest)
    return manifest


_OPTION_NAMES = {"layers": "--layers", "pool": "--pool", "tta": "--tta", "precision": "--precision",
                 "data_config": "preprocessing (--img-size)", "model": "--model", "weights": "--weights",
                 "part_size": "part size", "inputs": "the input images"}


def _changes(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, named as the user set it: "--tta none -> flip"."""
    out = []
    for key in new:
        if key == "options":
            out += _changes(old.get("options") or {}, new["options"])
        elif old.get(key) != new[key]:
            name = _OPTION_NAMES.get(key, key)
            out.append(name if key in ("inputs", "data_config") else
                       f"{name} {_shown(key, old.get(key))} -> {_shown(key, new[key])}")
    return out


def _shown(key: str, value) -> str:
    if key == "layers" and isinstance(value, list):  # the columns: embedding, embedding_<layer>...
        value = [v.removeprefix("embedding_") for v in value if v != column_name(None)]
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    return str(value)


def extract_features(config: ExtractConfig, progress: Progress | None = None) -> ExtractSummary:
    """Run level 1: embeddings of every image in `config.data` to the Parquet file `config.out`."""
    out = Path(config.out)
    parts_dir = checkpoint.parts_dir(out)
    if out.exists() and not config.overwrite:
        if config.resume and not parts_dir.exists():
            raise OutputExistsError(f"{out} is already complete; pass --overwrite to extract again")
        if not config.resume:
            raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    start = time.perf_counter()
    runtime = dev.resolve_runtime(config.device, config.precision, config.num_workers)
    models.check_model_options(config.model, config.weights)  # before the data scan: a bad option is named first
    images = data.discover(config.data)
    loaded = models.load_model(config.model, config.weights, None, img_size=config.img_size)
    model = loaded.model.eval().to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.pool is not None:
        models.set_global_pool(model, getattr(config.pool, "value", config.pool))
    layers = models.resolve_layers(model, config.layers)
    preprocess = Preprocess.from_data_config(loaded.data_config, max_pixels=config.max_image_pixels,
                                             reduced_decode=config.reduced_decode)
    embedder = Embedder(model, layers, getattr(config.pool, "value", config.pool), getattr(config.tta, "value", config.tta),
                        runtime, preprocess)
    metadata = _metadata(config, loaded, layers, runtime)
    fingerprint = {"inputs": _input_fingerprint(images), "model": loaded.arch, "weights": loaded.weights,
                   "options": {k: metadata[k] for k in ("layers", "pool", "tta", "data_config", "precision", "decode")},
                   "part_size": config.part_size}
    manifest = _open_manifest(config, parts_dir, fingerprint)
    n_parts = -(-len(images) // config.part_size)
    todo = [p for p in range(n_parts) if str(p) not in manifest["parts"]]
    resumed = sum(v["rows"] + len(v["skipped"]) for v in manifest["parts"].values())
    with deferred_signals():
        columns = _run_parts(config, images, preprocess, embedder, metadata, parts_dir, manifest, todo, runtime, resumed,
                             progress)
    skipped = [tuple(s) for p in sorted(manifest["parts"], key=int) for s in manifest["parts"][p]["skipped"]]
    rows = _merge_parts(out, parts_dir, n_parts)
    skip_file = skipped_path(out)
    if skipped:
        data.write_skipped(skip_file, skipped)
    elif skip_file.exists():
        skip_file.unlink()
    shutil.rmtree(parts_dir, ignore_errors=True)
    summary = ExtractSummary(out, rows, len(skipped), skip_file if skipped else None, columns or manifest.get("columns", {}),
                             time.perf_counter() - start, str(runtime.device), runtime.precision, resumed,
                             images.warnings + loaded.notes)
    if config.strict and skipped:
        raise StrictModeError(f"--strict: {len(skipped)} unreadable image(s) skipped; see {skip_file}")
    return summary


def _metadata(config: ExtractConfig, loaded: models.LoadedModel, layers, runtime: dev.Runtime) -> dict:
    import timm

    return {
        "model": loaded.arch,
        "weights": loaded.weights,
        "layers": [column_name(None)] + [column_name(l) for l in layers],
        "layer_modules": layers,
        "pool": getattr(config.pool, "value", config.pool) or "model",
        "tta": getattr(config.tta, "value", config.tta),
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in loaded.data_config.items()},
        "precision": runtime.precision,
        "decode": "working resolution" if config.reduced_decode else "full",
        "device": str(runtime.device),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "cnnxfer": _version()},
        "classes": loaded.classes,
        "config": to_dict(config),
    }


def _version() -> str:
    from . import __version__

    return __version__


def _run_parts(config, images, preprocess, embedder, metadata, parts_dir, manifest, todo, runtime, done, progress):
    """Embed the parts in `todo`, each into its own Parquet file, recording each in the manifest."""
    loader = loaders.Loader(loaders.ImageDataset(images, preprocess), config.batch_size,
                            batches=_part_batches(len(images), config.part_size, config.batch_size, todo),
                            threads=runtime.decode_threads, ahead=runtime.ahead, pin_memory=runtime.pin_memory)
    columns, schema, writer, tmp, current, rows, skipped = manifest.get("columns"), None, None, None, None, 0, []
    try:
        for batch in loader:
            check_signals()  # Ctrl-C / SIGTERM act here, between batches (see signals.py)
            part = int(batch.indices[0]) // config.part_size if len(batch.indices) else batch.skipped[0][0] // config.part_size
            if part != current:
                _finish_part(writer, tmp, parts_dir, current, rows, skipped, manifest)
                writer, tmp, current, rows, skipped = None, None, part, 0, []
            skipped += [(str(images.paths[i]), reason) for i, reason in batch.skipped]
            if len(batch.indices):
                feats = embedder(batch.images)
                if columns is None:
                    columns = {k: int(v.shape[1]) for k, v in feats.items()}
                    manifest["columns"] = columns
                schema = schema or _schema(columns, metadata)
                if writer is None:
                    tmp = parts_dir / f"part-{part:06d}.parquet.tmp"
                    writer = pq.ParquetWriter(tmp, schema)
                idx = batch.indices.tolist()
                labels = [images.classes[images.labels[i]] if images.labels[i] is not None else None for i in idx]
                writer.write_batch(_record_batch(schema, [str(images.paths[i]) for i in idx], labels, feats))
                rows += len(idx)
            done += len(batch.indices) + len(batch.skipped)
            if progress:
                progress(done, len(images))
        _finish_part(writer, tmp, parts_dir, current, rows, skipped, manifest)
        writer = None
    finally:
        try:
            if writer is not None:  # interrupted mid-part: drop the unfinished part, keep the finished ones
                writer.close()
        finally:
            if tmp is not None:  # also when the signal landed inside ParquetWriter(tmp) itself
                tmp.unlink(missing_ok=True)
    return columns


def _finish_part(writer, tmp, parts_dir, part, rows, skipped, manifest) -> None:
    if part is None:
        return
    if writer is not None:
        writer.close()
        os.replace(tmp, parts_dir / f"part-{part:06d}.parquet")
    manifest["parts"][str(part)] = {"rows": rows, "skipped": skipped}
    checkpoint.atomic_write_json(parts_dir / "manifest.json", manifest)


def _merge_parts(out: Path, parts_dir: Path, n_parts: int) -> int:
    """Concatenate the finished parts into `out`, one row group at a time; returns the row count."""
    files = [parts_dir / f"part-{p:06d}.parquet" for p in range(n_parts)]
    files = [f for f in files if f.exists()]
    if not files:
        raise DataError(f"no image could be read; see {skipped_path(out)}")
    schema = pq.read_schema(files[0])
    rows = 0
    with checkpoint.atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for f in files:
                pf = pq.ParquetFile(f)
                for g in range(pf.num_row_groups):
                    table = pf.read_row_group(g)
                    writer.write_table(table)
                    rows += table.num_rows
    return rows


def read_features(path: Path, column: str = "embedding"):
    """(paths, labels, float32 matrix) from a cnnxfer Parquet file; a helper for users and tests."""
    import numpy as np

    table = pq.read_table(path, columns=["path", "label", column])
    matrix = np.asarray(table.column(column).combine_chunks().flatten(), dtype=np.float32)
    return table.column("path").to_pylist(), table.column("label").to_pylist(), matrix.reshape(table.num_rows, -1)
