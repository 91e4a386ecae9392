"""`cnnxfer report RUN_DIR`: one self-contained, offline page beside the run.

RUN_DIR/report.html shows the run's summary, curves, confusion matrix and per-class table (files
the run already holds), and the inspect views computed for it now: the worst errors with heat
maps, the first-layer filters, the embedding map and the invariance table. Their PNG/CSV/JSON
files go to RUN_DIR/report_files/<view>/ and the page links them relatively, so the folder can be
zipped, copied or opened from disk: no script, no CDN, no server, nothing fetched. The page is a
jinja2 template (templates/report.html.j2, with its stylesheet inlined).

`cnnxfer report AUDIT_DIR` (a folder `cnnxfer audit` wrote) writes AUDIT_DIR/report.html instead:
the audit's findings as tables and thumbnail galleries (audit_page.py, templates/audit.html.j2);
`--audit AUDIT_DIR` adds the same section to a run's page.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from .. import checkpoint, data, rundir
from ..config import InspectConfig, RunConfig
from ..errors import CnnxferError, DataError, OutputExistsError, UsageError
from . import audit_page
from . import subject as subj
from .embedding import embed, features_from_images, pick_thumbnails, read_thumbnails, save_embedding
from .filters import inspect_filters, save_filters
from .invariance import measure_invariance, save_invariance
from .worst import find_errors, save_errors

log = logging.getLogger(__name__)

PAGE, FILES = "report.html", "report_files"
DEFAULT_MAX_IMAGES = 500


@dataclass
class PageResult:
    path: Path
    sections: list[str]
    notes: list[str] = field(default_factory=list)
    images: int = 0
    data: str | None = None
    seconds: float = 0.0


def write_report(config: InspectConfig, progress: Callable[[str], None] | None = None,
                 audit: Path | None = None) -> PageResult:
    """Compute the views for the run directory `config.weights` (with the findings of the audit
    folder `audit`, if given) and write RUN_DIR/report.html; given an audit folder, write_audit_report."""
    from .. import report

    start = time.perf_counter()
    run_dir = Path(config.weights)
    if audit_page.is_audit_dir(run_dir):
        return write_audit_report(config, run_dir, audit, progress)
    _check_run_dir(run_dir, audit)
    page, files = run_dir / PAGE, run_dir / FILES
    _refuse_existing(page, files, config.overwrite)
    step = progress or (lambda name: None)
    run = rundir.read_config(run_dir)
    runs = rundir.RunDir(run_dir)
    if not all(runs.file(png).exists() for csv, png in ((rundir.METRICS_FILE, rundir.CURVES_PLOT),
                                                        (rundir.CONFUSION_CSV, rundir.CONFUSION_PLOT))
               if runs.file(csv).exists()) or (run.calibration and not runs.file(rundir.RELIABILITY_PLOT).exists()):
        runs.save_plots()  # the run's plots, only when one is missing (runs from before fit wrote them)
    subject = subj.load_subject(config)
    images, source, notes = _report_images(config, run, run_dir, subject)
    sections: dict[str, dict | None] = dict.fromkeys(("filters", "errors", "embedding", "invariance", "audit"))
    sections["summary"] = {"rows": _summary_rows(run, run_dir, subject)}
    views = [("filters", lambda: _filters(subject, files))]
    if images is not None:
        views += [("errors", lambda: _errors(subject, images, files, config)),
                  ("embedding", lambda: _embedding(subject, images, files, config)),
                  ("invariance", lambda: _invariance(subject, images, files, config))]
    if audit is not None:
        views.append(("audit", lambda: audit_page.build_section(audit, run_dir, files, copy_files=True)))
    for name, view in views:
        step(name)
        try:
            sections[name] = view()
        except CnnxferError as exc:  # one view that cannot run on this model leaves the others on the page
            notes.append(f"{name}: {exc}")
            log.warning("report: %s could not be computed: %s", name, exc)
    skipped = subj.write_skipped(subject, files) if files.exists() else []
    if skipped:
        notes.append(f"{len(skipped)} unreadable image(s) were skipped; see {FILES}/skipped.csv")
    context = {"title": run_dir.resolve().name, "run": run, "sections": sections, "notes": notes, "data": source,
               "images": len(images) if images is not None else 0, "classes": _per_class(run_dir),
               "run_files": _run_files(run_dir), "calibration": _calibration_rows(run.calibration),
               "generated": time.strftime("%Y-%m-%d %H:%M")}
    checkpoint.atomic_write_text(page, render(context))
    return PageResult(page, [name for name, section in sections.items() if section], notes, context["images"], source,
                      time.perf_counter() - start)


def write_audit_report(config: InspectConfig, audit_dir: Path, audit: Path | None = None,
                       progress: Callable[[str], None] | None = None) -> PageResult:
    """AUDIT_DIR/report.html: the findings of `cnnxfer audit` with thumbnails (nothing is recomputed)."""
    start = time.perf_counter()
    given = [name for name, value in (("--data", config.data), ("--max-images", config.max_images), ("--audit", audit))
             if value is not None]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise UsageError(f"{', '.join(given)} {verb} to a run directory; {audit_dir} is an audit folder, whose page shows "
                         "the images the audit found (pass the run directory with --audit to combine them)")
    page, files = audit_dir / PAGE, audit_dir / FILES
    _refuse_existing(page, files, config.overwrite)
    (progress or (lambda name: None))("audit")
    section = audit_page.build_section(audit_dir, audit_dir, files)
    audited = Path(section["data"]).name if section["data"] != "-" else audit_dir.resolve().name
    context = {"title": audited, "audit": section, "notes": [], "generated": time.strftime("%Y-%m-%d %H:%M")}
    checkpoint.atomic_write_text(page, render(context, "audit.html.j2"))
    return PageResult(page, ["audit"] + [g["issue"] for g in section["groups"]], section["notes"], section["images"],
                      f"{section['data']} (audited; {section['shown']} thumbnails)", time.perf_counter() - start)


def _check_run_dir(run_dir: Path, audit: Path | None) -> None:
    if not rundir.is_run_dir(run_dir):
        raise UsageError(f"{run_dir} is neither a cnnxfer run directory (config.json and model.safetensors) "
                         f"nor an audit folder ({audit_page.AUDIT_JSON} and {audit_page.ISSUES})")
    if audit is not None and not audit_page.is_audit_dir(audit):
        raise UsageError(f"--audit {audit} is not a folder cnnxfer audit wrote (needs {audit_page.AUDIT_JSON} and "
                         f"{audit_page.ISSUES})")


def _refuse_existing(page: Path, files: Path, overwrite: bool) -> None:
    if (page.exists() or files.exists()) and not overwrite:
        raise OutputExistsError(f"{page} already exists; pass --overwrite to replace it")


def render(context: dict, template: str = "report.html.j2") -> str:
    """The page from templates/report.html.j2 or audit.html.j2 (autoescaped; the stylesheet inlined)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("cnnxfer.inspect", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined)
    env.filters["pct"] = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    env.filters["num"] = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
    return env.get_template(template).render(**context)


def _report_images(config: InspectConfig, run: RunConfig, run_dir: Path, subject: subj.Subject) -> tuple[data.ImageList | None, str | None, list[str]]:
    """--data, else the run's validation images when its data folder is still there."""
    classes = list(run.classes)
    limit = config.max_images or DEFAULT_MAX_IMAGES
    if config.data is not None:
        return subj.read_images(config, limit=limit, labelled=True, classes=classes), str(config.data), []
    from ..recipe import run_split

    folder, split = run.train_config.get("data"), run_split(run_dir)
    if split is None:
        return None, None, ["no images: the run's data folder is gone and no --data was given, so errors, "
                            "embedding and invariance are left out"]
    train, val = split
    images = val if len(val) else train
    which = "validation" if len(val) else "training (the run has no validation split)"
    images = _as_classes(images, classes)
    if len(images) > limit:
        images = images.subset(subj.sample_evenly(images.labels, limit, config.seed))
    return images, f"{folder} ({which} images)", []


def _as_classes(images: data.ImageList, classes: list[str]) -> data.ImageList:
    """Relabel to the run's class order (the folder order can only differ if folders changed since)."""
    if not classes or images.classes == classes:
        return images
    missing = [c for c in images.classes if c not in classes]
    if missing:
        raise DataError(f"class folder(s) {', '.join(missing)} are not among the run's classes")
    labels = [classes.index(images.classes[l]) for l in images.labels]
    return data.ImageList(images.paths, labels, classes, images.root)


def _filters(subject, files: Path) -> dict:
    result = inspect_filters(subject)
    save_filters(result, files / "filters")
    return {"layer": result.layer, "shape": "x".join(map(str, result.weight_shape)), "files": _links(result.files, files)}


def _errors(subject, images, files: Path, config: InspectConfig) -> dict:
    result = find_errors(subject, images, top=config.top, batch_size=config.batch_size)
    save_errors(result, files / "errors")
    return {"rows": result.rows, "accuracy": result.accuracy, "mistakes": result.mistakes, "images": result.images,
            "layer": result.layer, "files": _links(result.files, files)}


def _embedding(subject, images, files: Path, config: InspectConfig) -> dict:
    x, paths, labels = features_from_images(subject, images, config.batch_size)
    result = embed(x, paths, labels, ["pca", "tsne"], k=config.knn, perplexity=config.perplexity, seed=config.seed,
                   source=subject.loaded.weights)
    result.thumbnails = read_thumbnails(paths, pick_thumbnails(result.coords["tsne"], config.thumbnails, config.seed),
                                        subject.preprocess)
    save_embedding(result, files / "embedding")
    return {"knn": result.knn, "k": result.k, "dim": result.dim, "images": len(paths), "files": _links(result.files, files)}


def _invariance(subject, images, files: Path, config: InspectConfig) -> dict:
    result = measure_invariance(subject, images, subj.stages(subject.model), list(config.transforms), config.threshold,
                                config.batch_size)
    save_invariance(result, files / "invariance")
    rows = [{"stage": layer, "units": next(r["units"] for r in result.table if r["stage"] == layer),
             "cells": [next(r for r in result.table if r["stage"] == layer and r["transform"] == t) for t in result.transforms]}
            for layer in result.layers]
    return {"transforms": result.transforms, "rows": rows, "threshold": result.threshold, "images": result.images,
            "files": _links(result.files, files)}


def _links(paths: list[Path], files: Path) -> dict[str, str]:
    """{file name: its address relative to the page}."""
    return {p.name: f"{FILES}/{p.relative_to(files).as_posix()}" for p in paths}


def _summary_rows(run: RunConfig, run_dir: Path, subject: subj.Subject) -> list[tuple[str, str]]:
    best, final, hp, train = run.best, run.final or {}, run.hparams, run.train_config
    params = sum(p.numel() for p in subject.model.parameters())
    rows = [("run directory", str(run_dir.resolve())), ("model", f"{run.model} ({params:,} parameters)"),
            ("started from", str(run.weights_source)), ("classes", f"{len(run.classes)}: " + ", ".join(run.classes[:20])),
            ("images", f"{run.train_images} train / {run.val_images} validation"),
            ("input", "x".join(str(v) for v in run.data_config.get("input_size", []))),
            ("strategy", _strategy(run, train)),
            ("optimizer", f"{hp.get('optimizer', '-')} lr {hp.get('lr', '-')} weight decay {hp.get('weight_decay', '-')}"),
            ("best epoch", str(best.get("epoch", "-"))),
            ("validation accuracy", _pct(final.get("final_val_accuracy", best.get("val_accuracy")))),
            ("validation loss", _fmt(final.get("final_val_loss", best.get("val_loss")))),
            ("device", f"{run.device} / {run.precision}" + (f" x {run.world_size} processes" if run.world_size > 1 else ""))]
    return rows


def _calibration_rows(fitted: dict | None) -> list[tuple[str, str]]:
    """The kept calibration (config.json), before and after its temperature."""
    if not fitted:
        return []
    b, a = fitted["before"], fitted["after"]
    return [("fitted on", f"{fitted['fitted_on']} ({fitted['images']} images)"), ("temperature", f"{fitted['temperature']:.3g}"),
            ("ECE (15 bins)", f"{b['ece']:.4f} raw, {a['ece']:.4f} calibrated"),
            ("classwise ECE", f"{b['classwise_ece']:.4f} raw, {a['classwise_ece']:.4f} calibrated"),
            ("NLL", f"{b['nll']:.4f} raw, {a['nll']:.4f} calibrated"), ("Brier", f"{b['brier']:.4f} raw, {a['brier']:.4f} calibrated"),
            ("prediction sets", f"{len(fitted['conformal']['scores'])} conformal scores ({fitted['conformal']['method'].upper()}): "
                                f"predict --coverage up to {len(fitted['conformal']['scores']) / (len(fitted['conformal']['scores']) + 1):.3f}")]


def _strategy(run: RunConfig, train: dict) -> str:
    """The strategy, its epochs, and the probe's strength when it fitted one."""
    text = f"{train.get('strategy', '-')}, {train.get('epochs', '-')} epochs"
    if run.probe:
        text = (f"{train.get('strategy')}: the probe alone" if train.get("strategy") == "linear" else text) + \
               f"; probe {run.probe.get('how', '')}"
    return text


def _pct(v) -> str:
    return "-" if v is None or v != v else f"{100 * v:.2f}%"


def _fmt(v) -> str:
    return "-" if v is None or v != v else f"{v:.4g}"


def _per_class(run_dir: Path) -> list[dict]:
    path = run_dir / "report.csv"
    return pd.read_csv(path).to_dict(orient="records") if path.exists() else []


def _run_files(run_dir: Path) -> dict[str, str | None]:
    names = ("curves.png", "metrics.csv", "confusion_matrix.png", "confusion_matrix.csv", "report.csv", "config.json",
             "reliability.png")
    return {name.replace(".", "_"): name if (run_dir / name).exists() else None for name in names}
