"""The audit section of the report page: what `cnnxfer audit` found, read back from its folder.

`build_section(audit_dir, page_dir, files)` reads AUDIT_DIR's audit.json and issues.csv (plus
quality.csv and probabilities.csv for each image's split, label and hash) and returns the
template's context: a summary, the estimated error matrix (given x likely), and one gallery per
issue kind, its worst rows first (issues.csv is already sorted so), pairs side by side.
Thumbnails are decoded with the safe decoder (cnnxfer.data) and written as PNGs under
`files`/audit/; the user's images are only read. A file that no longer decodes, or is gone, gets
a placeholder and a note instead of a thumbnail. The page itself is written by page.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .. import checkpoint, data, quality
from ..errors import DataError

# the file names cnnxfer.audit writes (it sits above this module, so they are repeated here; a test compares them)
AUDIT_JSON, ISSUES, RELABEL = "audit.json", "issues.csv", "relabel.csv"
PROBABILITIES, QUALITY = "probabilities.csv", "quality.csv"
DEFAULT_TOP = 12  # rows shown per issue kind; issues.csv holds them all
THUMB = 96  # pixels, the long side of a thumbnail
MATRIX_CLASSES = 15  # a larger error matrix shows only the classes with estimated errors
PAIRS = ("duplicate_conflicting_labels", "leakage", "duplicate")
TITLES = {  # the page's order: what changes a label or a split first, then the images themselves
    "label_issue": "Label issues", "duplicate_conflicting_labels": "Duplicates with conflicting labels",
    "leakage": "Leakage between splits", "duplicate": "Duplicates", "outlier": "Outliers",
    "nearer_other_class": "Nearer another class", "unreadable": "Unreadable files", "dark": "Dark",
    "overexposed": "Overexposed", "blurry": "Blurry", "low_information": "Low information (near blank)",
    "grayscale": "Grayscale in a colour folder", "odd_aspect": "Odd aspect ratio", "small": "Small",
}
SCORES = {
    "label_issue": "p(given)", "duplicate_conflicting_labels": "similarity", "leakage": "similarity",
    "duplicate": "similarity", "outlier": "distance", "nearer_other_class": "share of neighbours",
    "dark": "99th pct luminance", "overexposed": "1st pct luminance", "blurry": "sharpness z", "low_information": "entropy",
    "grayscale": "channel spread", "odd_aspect": "aspect", "small": "px (sqrt area)",
}


def is_audit_dir(folder: Path) -> bool:
    """A folder `cnnxfer audit` wrote (its audit.json and issues.csv)."""
    return (Path(folder) / AUDIT_JSON).is_file() and (Path(folder) / ISSUES).is_file()


def build_section(audit_dir: Path, page_dir: Path, files: Path, top: int = DEFAULT_TOP, copy_files: bool = False) -> dict:
    """The audit section's template context.

    Args:
        page_dir: the folder of the page; every address is relative to it.
        files: the page's report_files folder; thumbnails go to files/audit/ (replaced).
        copy_files: copy issues.csv, relabel.csv and audit.json beside the thumbnails (a run's page,
            so that its folder stays self-contained) instead of linking them where they are.
    """
    audit_dir = Path(audit_dir)
    summary = read_summary(audit_dir)
    issues = _read_issues(audit_dir / ISSUES)
    known = _known_images(audit_dir)
    folder = files / "audit"
    if folder.exists():
        shutil.rmtree(folder)  # ours (report_files/audit): thumbnails of an earlier page
    config = summary.get("config", {})
    thumbs = Thumbnails(folder, page_dir, config.get("max_image_pixels") or data.DEFAULT_MAX_IMAGE_PIXELS,
                        {p: k.get("sha256") for p, k in known.items()})
    groups = [_group(kind, rows, summary, thumbs, known, top) for kind, rows in _by_kind(issues)]
    source = config.get("data") or config.get("features") or "-"
    return {"summary": _summary_rows(summary, audit_dir), "counts": _counts(issues), "matrix": _matrix(summary),
            "estimated": summary.get("estimated_label_errors", 0), "groups": groups,
            "files": _file_links(audit_dir, page_dir, folder, copy_files),
            "notes": list(summary.get("notes", [])) + thumbs.notes(),
            "model": config.get("model") or config.get("features") or "-", "data": source,
            "images": int(summary.get("images", 0)), "shown": thumbs.written}


def read_summary(audit_dir: Path) -> dict:
    """audit.json, checked for the keys the page reads."""
    path = Path(audit_dir) / AUDIT_JSON
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    keys = ("images", "classes", "counts", "probe", "how")
    missing = [k for k in keys if k not in summary] if isinstance(summary, dict) else list(keys)
    if missing:
        raise DataError(f"{path} is not a cnnxfer audit.json (missing {', '.join(missing)}); re-run cnnxfer audit")
    return summary


def _read_issues(path: Path) -> pd.DataFrame:
    """issues.csv with every label as text (pandas would read the class "8" as the number 8)."""
    columns = {"path", "issue", "score", "given_label", "suggested_label", "other_path", "detail"}
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if not columns <= set(frame.columns):
        raise DataError(f"{path} is not a cnnxfer issues.csv (missing {', '.join(sorted(columns - set(frame.columns)))})")
    return frame


def _known_images(audit_dir: Path) -> dict[str, dict]:
    """path -> {"label", "split", "sha256"} for the audited images that decoded."""
    known: dict[str, dict] = {}
    for name, columns in ((PROBABILITIES, ["path", "given_label"]), (QUALITY, ["path", "split", "sha256"])):
        path = audit_dir / name
        if not path.is_file():
            continue
        table = pd.read_csv(path, usecols=lambda c: c in columns, dtype=str, keep_default_na=False)
        for row in table.to_dict(orient="records"):
            entry = known.setdefault(row.pop("path"), {})
            entry.update({("label" if k == "given_label" else k): v for k, v in row.items()})
    return known


def _by_kind(issues: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(kind, its rows) in the page's order; a kind this page does not know goes last, not missing."""
    present = list(dict.fromkeys(issues["issue"]))
    order = [k for k in TITLES if k in present] + [k for k in present if k not in TITLES]
    return [(kind, issues[issues["issue"] == kind]) for kind in order]


def _group(kind: str, rows: pd.DataFrame, summary: dict, thumbs: Thumbnails, known: dict, top: int) -> dict:
    pair = kind in PAIRS
    items = [(_pair if pair else _single)(row, thumbs, known) for row in rows.head(top).to_dict(orient="records")]
    return {"issue": kind, "title": TITLES.get(kind, kind.replace("_", " ").capitalize()), "count": len(rows),
            "how": summary["how"].get(kind, "see issues.csv"), "score_name": SCORES.get(kind, "score"), "pair": pair,
            "rows": items}


def _single(row: dict, thumbs: Thumbnails, known: dict) -> dict:
    return {"thumb": thumbs(row["path"]), "path": row["path"], "name": _short(row["path"]), "given": row["given_label"],
            "suggested": row["suggested_label"], "split": known.get(row["path"], {}).get("split", ""),
            "score": _score(row["score"]), "detail": row["detail"]}


def _pair(row: dict, thumbs: Thumbnails, known: dict) -> dict:
    """Both images of a pair; the second's label is the conflicting one for a conflict, else its own."""
    other = known.get(row["other_path"], {})
    a = _side(row["path"], row["given_label"] or known.get(row["path"], {}).get("label", ""), thumbs, known)
    b = _side(row["other_path"], row["suggested_label"] or other.get("label", ""), thumbs, known)
    return {"a": a, "b": b, "score": _score(row["score"]), "detail": row["detail"]}


def _side(path: str, label: str, thumbs: Thumbnails, known: dict) -> dict:
    split = known.get(path, {}).get("split") or ("--against" if path and path not in known else "")
    return {"thumb": thumbs(path), "path": path, "name": _short(path), "label": label, "split": split}


def _short(path: str) -> str:
    """The class folder and file name: enough to tell images apart; the full path is on hover."""
    parts = Path(path).parts
    return "/".join(parts[-2:]) if parts else "-"


def _score(text: str) -> str:
    try:
        value = float(text)
    except ValueError:
        return ""
    return "" if math.isnan(value) else f"{value:.3g}"


def _summary_rows(summary: dict, audit_dir: Path) -> list[tuple[str, str]]:
    config, probe, classes = summary.get("config", {}), summary["probe"], summary["classes"]
    against = summary.get("against") or 0
    rows = [("audit folder", str(audit_dir.resolve())), ("images", _images_text(summary)),
            ("classes", f"{len(classes)}: " + ", ".join(map(str, classes[:20])) + (", ..." if len(classes) > 20 else "")),
            ("features", f"{config.get('model') or '-'} ({config.get('weights') or config.get('features') or '-'})"),
            ("label errors", f"about {summary.get('estimated_label_errors', 0):,} estimated by confident learning; "
                             f"in relabel.csv {summary.get('relabelled', 0):,} relabelled, {summary.get('left_out', 0):,} left out "
                             "(no confident suggestion)"),
            ("probe", _probe_text(probe)),
            ("split", f"train/val from {summary.get('split', '-')}"
                      + (f"; {against:,} --against images" if against else "")),
            ("class balance", summary.get("balance", "-")),
            ("duplicate threshold", _threshold_text(summary.get("duplicate_threshold"), config.get("duplicate_threshold")))]
    return rows


def _images_text(summary: dict) -> str:
    skipped = summary.get("skipped") or 0
    return f"{summary['images']:,} audited" + (f", {skipped:,} unreadable (skipped)" if skipped else "")


def _probe_text(probe: dict) -> str:
    text = f"{probe.get('folds', '-')}-fold held-out accuracy "
    text += "-" if probe.get("accuracy") is None else f"{100 * probe['accuracy']:.1f}%"
    if probe.get("c") is not None:
        temperature = f", temperature {probe['temperature']:.2f}" if probe.get("temperature") else ""
        text += f" (C={probe['c']:.3g}{temperature})"
    return text


def _threshold_text(used, asked) -> str:
    if used is None:
        return "-"
    text = f"cosine similarity {used:.3f}"
    if asked is not None and used > asked + 1e-9:
        text += f" (--duplicate-threshold {asked:g}, raised: the folder's images are alike)"
    return text


def _counts(issues: pd.DataFrame) -> list[dict]:
    """Every kind the audit looks for, found or not (a 0 says it was checked), in the page's order."""
    found = issues["issue"].value_counts().to_dict()
    kinds = list(TITLES) + [k for k in found if k not in TITLES]
    return [{"issue": k, "title": TITLES.get(k, k), "count": int(found.get(k, 0))} for k in kinds]


def _matrix(summary: dict) -> dict | None:
    """The estimated error matrix (given x likely) when anything is off its diagonal, else None."""
    matrix, classes = summary["probe"].get("estimated_errors"), summary["classes"]
    if not matrix or len(matrix) != len(classes):
        return None
    k = len(classes)
    off = [i for i in range(k) if any(matrix[i][j] > 0 or matrix[j][i] > 0 for j in range(k) if j != i)]
    if not off:
        return None
    keep = off if k > MATRIX_CLASSES else list(range(k))
    rows = [{"given": classes[i], "cells": [_cell(matrix[i][j], i == j) for j in keep]} for i in keep]
    return {"classes": [classes[j] for j in keep], "rows": rows, "left_out": len(keep) < len(classes)}


def _cell(value: float, diagonal: bool) -> dict:
    text = f"{value:.1f}".removesuffix(".0")
    return {"text": text if value or diagonal else "·", "kind": "diag" if diagonal else "off" if value > 0 else "zero"}


def _file_links(audit_dir: Path, page_dir: Path, folder: Path, copy_files: bool) -> dict[str, str]:
    """{file name: its address relative to the page} for the audit's tables."""
    names = (ISSUES, RELABEL, AUDIT_JSON) if copy_files else (ISSUES, RELABEL, AUDIT_JSON, QUALITY, PROBABILITIES)
    links = {}
    for name in names:
        source = audit_dir / name
        if not source.is_file():
            continue
        target = source
        if copy_files:
            target = folder / name
            folder.mkdir(parents=True, exist_ok=True)
            with checkpoint.atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
        links[name] = Path(os.path.relpath(target, page_dir)).as_posix()
    return links


@dataclass
class Thumbnails:
    """One PNG per image under `folder` (named by a hash of its path, so an image in two sections
    is decoded once), or a placeholder saying why there is none."""

    folder: Path
    page_dir: Path
    max_pixels: int
    hashes: dict[str, str | None]  # path -> its SHA-256 at audit time (quality.csv), to notice a changed file
    made: dict[str, dict] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    written: int = 0

    def __call__(self, path: str) -> dict:
        if path not in self.made:
            self.made[path] = self._make(path)
        return self.made[path]

    def notes(self) -> list[str]:
        notes = []
        if self.missing:
            notes.append(f"{len(self.missing)} image(s) found by the audit no longer exist (e.g. {self.missing[0]}); "
                         "they are shown as placeholders. Re-run cnnxfer audit for current findings.")
        if self.changed:
            notes.append(f"{len(self.changed)} image(s) changed since the audit (e.g. {self.changed[0]}): their thumbnails "
                         "show the file as it is now, the findings are about the file as it was.")
        return notes

    def _make(self, path: str) -> dict:
        source = Path(path)
        if not path or not source.exists():
            self.missing.append(path)
            return {"src": None, "note": "file no longer exists", "reason": path, "small": False}
        try:
            image, _ = data.decode_image(source, self.max_pixels, reduction=lambda w, h: max(1.0, max(w, h) / THUMB))
            image.thumbnail((THUMB, THUMB))
        except Exception as exc:  # any decoder fault: a placeholder with the reason, never a crash (RELIABILITY.md)
            return {"src": None, "note": "unreadable", "reason": data.describe_failure(source, exc), "small": False}
        if self.hashes.get(path) and quality.file_hash(source) != self.hashes[path]:
            self.changed.append(path)
        target = self.folder / (hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:16] + ".png")
        self.folder.mkdir(parents=True, exist_ok=True)
        with checkpoint.atomic_path(target) as tmp:
            image.save(tmp, format="PNG")
        self.written += 1
        return {"src": Path(os.path.relpath(target, self.page_dir)).as_posix(), "note": "", "reason": "",
                "small": max(image.size) < THUMB}

