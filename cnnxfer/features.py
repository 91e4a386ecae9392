"""Level 1: a pretrained CNN as a feature extractor, streaming embeddings to Parquet.

The images are cut into parts of `part_size` (part k = images [k*K, (k+1)*K) of the sorted list,
whatever the number of processes). Each finished part is a Parquet file in `<out>.parts/`
(written as *.tmp, closed, then renamed) with a small JSON record beside it; `job.json` holds
the fingerprint of the job. A kill loses at most the parts in progress; `--resume` redoes only
what is missing, with any number of processes, and refuses changed inputs. When every part is
done rank 0 merges them into the single `<out>` file (row group by row group, so memory stays
flat) and removes the parts.
"""
from __future__ import annotations

import hashlib
import itertools
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

from . import checkpoint, data, loader as loaders, models
from .activations import Activations
from .predictor import flip_average
from .preprocess import Normalize, Preprocess
from .config import ExtractConfig, Tta, to_dict
from .errors import DataError, OutputExistsError, StrictModeError
from .session import Session, open_session
from .signals import deferred_signals

log = logging.getLogger(__name__)

JOB_FILE = "job.json"  # in <out>.parts/: the fingerprint a --resume must match

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
    """Model + options -> {column: (N, D) float32 features} for a batch of model inputs
    (Session.to_input's: normalised, on the device; Session.infer gives them, in autocast).

    The `--layers` hooks are registered once, for every batch; `close()` (or a `with` block)
    removes them.
    """

    def __init__(self, model: torch.nn.Module, layers: list[str], pool: str | None, tta: Tta | str):
        self.model, self.layers, self.tta = model, layers, Tta(tta)
        self.layer_pool = pool or "avg"
        self.taps = Activations(model, layers) if layers else None

    def close(self) -> None:
        if self.taps is not None:
            self.taps.close()

    def __enter__(self) -> "Embedder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.tta == Tta.flip:
            return flip_average(self._forward, x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        final = models.pre_logits(self.model, x)
        out = {column_name(None): final.float().flatten(1)}
        if self.taps is not None:
            for layer in self.layers:
                out[column_name(layer)] = models.pool_features(self.taps.outputs[layer].float(), self.layer_pool)
            self.taps.clear()
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


def _schema(columns: dict[str, int], metadata: dict, splits: bool = False) -> pa.Schema:
    fields = [pa.field("path", pa.string()), pa.field("label", pa.string())]
    fields += [pa.field("split", pa.string())] if splits else []
    fields += [pa.field(name, pa.list_(pa.float32(), dim)) for name, dim in columns.items()]
    return pa.schema(fields, metadata={"cnnxfer": json.dumps(metadata)})


def _record_batch(schema: pa.Schema, paths: list[str], labels: list[str | None], feats: dict[str, torch.Tensor],
                  splits: list[str] | None = None) -> pa.RecordBatch:
    arrays = [pa.array(paths, pa.string()), pa.array(labels, pa.string())]
    arrays += [pa.array(splits, pa.string())] if splits is not None else []
    for name in schema.names[len(arrays):]:
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


def _open_parts(config: ExtractConfig, parts_dir: Path, fingerprint: dict, session: Session) -> dict[int, dict]:
    """The finished parts of this job, by part number: none for a new job, the interrupted run's
    when resuming the same one. Rank 0 prepares the folder; every rank raises its errors."""

    def prepare() -> None:
        job = parts_dir / JOB_FILE
        finished = parts_dir.is_dir() and any(parts_dir.glob("part-*.json"))  # else nothing to keep or lose
        if finished and not config.overwrite:
            if not config.resume:
                raise OutputExistsError(f"an interrupted extraction is in {parts_dir}; pass --resume to continue it or "
                                        "--overwrite to start over")
            saved = checkpoint.read_json(job) if job.exists() else {"fingerprint": fingerprint}  # killed before it
            if saved.get("fingerprint") != fingerprint:
                changed = _changes(saved.get("fingerprint", {}), fingerprint)
                raise DataError(f"cannot resume {config.out}: {'; '.join(changed)} changed since the interrupted run; "
                                "run it again with the same options, or use --overwrite to start over")
            return
        shutil.rmtree(parts_dir, ignore_errors=True)
        parts_dir.mkdir(parents=True)
        checkpoint.atomic_write_json(job, {"fingerprint": fingerprint})

    session.main_first(prepare)
    return {int(p.name[5:11]): checkpoint.read_json(p) for p in sorted(parts_dir.glob("part-*.json"))}


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


def extract_features(config: ExtractConfig, progress: Progress | None = None, observe=None) -> ExtractSummary:
    """Run level 1: embeddings of every image in `config.data` to the Parquet file `config.out`.

    `observe(path, image, shown_size)` sees every image this run decodes (Preprocess.observe).

    Under torchrun every process embeds its share of the parts (part k goes to rank k % world);
    rank 0 merges them, in input order, into the same file one process writes.
    """
    out = Path(config.out)
    parts_dir = checkpoint.parts_dir(out)
    if out.exists() and not config.overwrite:
        if config.resume and not parts_dir.exists():
            raise OutputExistsError(f"{out} is already complete; pass --overwrite to extract again")
        if not config.resume:
            raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    start = time.perf_counter()
    _import_in_background("pandas")  # pyarrow converts the first batch through it: 0.3-0.5 s, now beside the model loading
    with open_session(config.device, config.precision, config.num_workers) as session:
        early = _FirstBatch.start(config, session, observe)  # decoding while timm imports and the model loads
        try:
            models.check_model_options(config.model, config.weights)  # before the data scan: a bad option is named first
            job = _prepare_job(config, session, early.images if early else None, observe)
            done = _open_parts(config, parts_dir, job.fingerprint, session)
        except BaseException:
            if early:
                early.drop()
            raise
        n_parts = -(-len(job.images) // config.part_size)
        mine = [p for p in range(n_parts) if p not in done and p % session.world == session.rank]
        resumed = sum(v["rows"] + len(v["skipped"]) for v in done.values())
        with deferred_signals(), job.embedder:  # the embedder's layer hooks come off at the end
            _run_parts(config, job, parts_dir, mine, session, resumed, progress if session.is_main else None,
                       early.take(job.preprocess, mine) if early else None)
        session.barrier()  # every part written before rank 0 merges them
        if not session.is_main:
            return ExtractSummary(out, 0, 0, None, {}, time.perf_counter() - start, str(session.device),
                                  session.precision, resumed)
        return _finish(config, job, parts_dir, n_parts, resumed, session, time.perf_counter() - start)


def _import_in_background(name: str) -> None:
    """Import `name` in a daemon thread (a later import in this thread waits for it, or finds it done)."""
    import importlib
    import sys
    import threading

    if name in sys.modules:
        return
    threading.Thread(target=importlib.import_module, args=(name,), name=f"import-{name}", daemon=True).start()


@dataclass
class _Job:
    images: data.ImageList
    loaded: models.LoadedModel
    preprocess: Preprocess
    normalizer: Normalize  # on the session's device
    embedder: Embedder
    metadata: dict
    fingerprint: dict


def _find_images(config: ExtractConfig) -> data.ImageList:
    # train/ + val/: rows labelled by class as finetune reads them, with a split column (not "train"/"val")
    return data.discover_split_dataset(config.data) or data.discover(config.data)


def _prepare_job(config: ExtractConfig, session: Session, images: data.ImageList | None = None, observe=None) -> _Job:
    """Images, model, preprocessing and the fingerprint a resume must match (the same on every rank)."""
    images = images if images is not None else _find_images(config)
    loaded = models.load_model(config.model, config.weights, None, img_size=config.img_size)
    if session.is_main:  # the next extract with this model can start decoding before it loads (_FirstBatch)
        models.remember_data_config(config.model, config.weights, config.img_size, loaded.data_config)
    model = session.place(loaded.model.eval())
    pool = config.pool.value if config.pool is not None else None
    if pool is not None:
        models.set_global_pool(model, pool)
    layers = models.resolve_layers(model, config.layers)
    preprocess = Preprocess.from_data_config(loaded.data_config, max_pixels=config.max_image_pixels,
                                             reduced_decode=config.reduced_decode, observe=observe)
    embedder = Embedder(model, layers, pool, config.tta)
    metadata = _metadata(config, loaded, layers, session)
    fingerprint = {"inputs": _input_fingerprint(images), "model": loaded.arch, "weights": loaded.weights,
                   "options": {k: metadata[k] for k in ("layers", "pool", "tta", "data_config", "precision", "decode")},
                   "part_size": config.part_size}
    return _Job(images, loaded, preprocess, preprocess.normalizer().to(session.device), embedder, metadata, fingerprint)


def _finish(config, job: _Job, parts_dir: Path, n_parts: int, resumed: int, session: Session,
            seconds: float) -> ExtractSummary:
    """Rank 0, every part done: merge them into `config.out`, list the skipped files, tidy up."""
    out = Path(config.out)
    records = {int(p.name[5:11]): checkpoint.read_json(p) for p in parts_dir.glob("part-*.json")}
    skipped = [tuple(s) for k in sorted(records) for s in records[k]["skipped"]]
    columns = next((r["columns"] for r in records.values() if r.get("columns")), {})
    rows = _merge_parts(out, parts_dir, n_parts)
    skip_file = skipped_path(out)
    if skipped:
        data.write_skipped(skip_file, skipped)
    elif skip_file.exists():
        skip_file.unlink()
    shutil.rmtree(parts_dir, ignore_errors=True)
    summary = ExtractSummary(out, rows, len(skipped), skip_file if skipped else None, columns, seconds,
                             str(session.device), session.precision, resumed, job.images.warnings + job.loaded.notes)
    if config.strict and skipped:
        raise StrictModeError(f"--strict: {len(skipped)} unreadable image(s) skipped; see {skip_file}")
    return summary


def _metadata(config: ExtractConfig, loaded: models.LoadedModel, layers, session: Session) -> dict:
    from .timm_import import import_timm

    timm = import_timm()

    return {
        "model": loaded.arch,
        "weights": loaded.weights,
        "layers": [column_name(None)] + [column_name(l) for l in layers],
        "layer_modules": layers,
        "pool": config.pool.value if config.pool is not None else "model",
        "tta": config.tta.value,
        "data_config": models.data_config_json(loaded.data_config),
        "precision": session.precision,
        "decode": "working resolution" if config.reduced_decode else "full",
        "device": str(session.device),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "cnnxfer": _version()},
        "classes": loaded.classes,
        "config": to_dict(config),
    }


def _version() -> str:
    from . import __version__

    return __version__


def _run_parts(config: ExtractConfig, job: _Job, parts_dir: Path, todo: list[int], session: Session, done: int,
               progress, early=None):
    """Embed the parts in `todo`, each into its own Parquet file with a JSON record beside it (a
    part counts as finished once its record exists; each part has one writer, so ranks never
    write the same file). `early`: these batches, the first decoded already (_FirstBatch.take)."""
    images = job.images
    loader = early or _loader(config, images, job.preprocess, todo, session)
    scale = session.world  # rank 0 shows its own progress as the job's
    part = _PartWriter(parts_dir, job.metadata)
    try:
        # Session.infer: Ctrl-C / SIGTERM act between batches (see signals.py)
        for batch, feats in session.infer(loader, job.embedder, job.normalizer):
            first = int(batch.indices[0]) if len(batch.indices) else batch.skipped[0][0]
            part.start(first // config.part_size)
            part.skipped += [(str(images.paths[i]), reason) for i, reason in batch.skipped]
            if feats is not None:
                idx = batch.indices.tolist()
                labels = [images.classes[images.labels[i]] if images.labels[i] is not None else None for i in idx]
                splits = [images.splits[i] for i in idx] if images.splits is not None else None
                part.write([str(images.paths[i]) for i in idx], labels, feats, splits)
            if part.rows + len(part.skipped) == min((part.part + 1) * config.part_size, len(images)) - part.part * config.part_size:
                part.start(None)  # its last image is in: the part is finished now, not when the next one starts
            done += (len(batch.indices) + len(batch.skipped)) * scale
            if progress:
                progress(min(done, len(images)), len(images))
        part.start(None)
    finally:
        part.abandon()


def _loader(config: ExtractConfig, images: data.ImageList, preprocess: Preprocess, todo: list[int], session: Session):
    return session.loader(loaders.ImageDataset(images, preprocess), config.batch_size, shard=False,
                          batches=_part_batches(len(images), config.part_size, config.batch_size, todo))


class _FirstBatch:
    """The first batch of a new extraction, decoded in a background thread while timm imports and
    the model loads (0.8-1 s on a 2-core CPU; decoding releases the GIL, importing holds it), when
    the preprocessing is known before the model is (models.known_data_config: a run directory's,
    or recorded by an earlier extract with the same timm model). `take` hands the batches over if
    the model's preprocessing and the parts to do are the ones guessed, else drops them.
    Not under torchrun or --resume, where the parts to do are known only later."""

    def __init__(self, config: ExtractConfig, images: data.ImageList, preprocess: Preprocess, session: Session):
        import threading

        self.images, self.preprocess = images, preprocess
        self.parts = list(range(-(-len(images) // config.part_size)))
        self.batches = iter(_loader(config, images, preprocess, self.parts, session))
        self.first: list = []
        self.thread = threading.Thread(target=self._decode, name="cnnxfer-first-batch", daemon=True)
        self.thread.start()

    @classmethod
    def start(cls, config: ExtractConfig, session: Session, observe=None) -> "_FirstBatch | None":
        if session.distributed or config.resume:
            return None
        try:
            data_config = models.known_data_config(config.model, config.weights, config.img_size)
            if data_config is None:
                return None
            preprocess = Preprocess.from_data_config(data_config, max_pixels=config.max_image_pixels,
                                                     reduced_decode=config.reduced_decode, observe=observe)
            images = _find_images(config)
        except Exception:  # a damaged record or config.json, bad input: met again in its turn, with its own message
            return None
        return cls(config, images, preprocess, session)

    def _decode(self) -> None:
        try:
            self.first.append(next(self.batches))
        except Exception as exc:  # StopIteration (no image), or any failure: the ordinary loader instead
            self.first.append(exc)

    def take(self, preprocess: Preprocess, todo: list[int]):
        """The batches, from the first, if they are the ones the job needs; else None."""
        self.thread.join()
        first = self.first[0]
        if isinstance(first, BaseException) or preprocess != self.preprocess or todo != self.parts:
            self.drop()
            return None
        return itertools.chain([first], self.batches)

    def drop(self) -> None:
        """Stop: the decoding threads end once the first batch is in."""
        self.thread.join()
        self.batches.close()


class _PartWriter:
    """The Parquet file of the part being embedded, written as *.tmp and renamed when complete."""

    def __init__(self, parts_dir: Path, metadata: dict):
        self.parts_dir, self.metadata = parts_dir, metadata
        self.part, self.writer, self.tmp, self.rows, self.skipped, self.columns = None, None, None, 0, [], None

    def start(self, part: int | None) -> None:
        """Finish the current part (rename it, write its record) when `part` is another one."""
        if part == self.part:
            return
        if self.part is not None:
            if self.writer is not None:
                self.writer.close()
                os.replace(self.tmp, self.parts_dir / f"part-{self.part:06d}.parquet")
            checkpoint.atomic_write_json(self.parts_dir / f"part-{self.part:06d}.json",
                                         {"rows": self.rows, "skipped": self.skipped, "columns": self.columns})
        self.part, self.writer, self.tmp, self.rows, self.skipped = part, None, None, 0, []

    def write(self, paths: list[str], labels: list[str | None], feats: dict[str, torch.Tensor],
              splits: list[str] | None = None) -> None:
        if self.writer is None:
            self.columns = {k: int(v.shape[1]) for k, v in feats.items()}
            self.schema = _schema(self.columns, self.metadata, splits is not None)
            self.tmp = self.parts_dir / f"part-{self.part:06d}.parquet.tmp"
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.writer.write_batch(_record_batch(self.schema, paths, labels, feats, splits))
        self.rows += len(paths)

    def abandon(self) -> None:
        """Interrupted mid-part: drop the unfinished part, keep the finished ones."""
        try:
            if self.writer is not None:
                self.writer.close()
        finally:
            if self.tmp is not None:  # also when the signal landed inside ParquetWriter(tmp) itself
                self.tmp.unlink(missing_ok=True)
            self.writer = self.tmp = None


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
