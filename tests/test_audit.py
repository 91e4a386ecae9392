"""`cnnxfer audit` (issue 20): each detector on real computations, the whole command on real digits
with ImageNet Lite0 and planted damage, and the bad input it refuses with one line."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import LITE0
from PIL import Image, ImageEnhance, ImageFilter

from cnnxfer import data, quality
from cnnxfer.cli import app
from cnnxfer.confident import find_label_issues
from cnnxfer.neighbours import nearest, normalise, pairs_above
from cnnxfer.probe import out_of_sample_probabilities

pytestmark = pytest.mark.usefixtures("one_thread")


def _digits(per_class: int, seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.permutation(np.flatnonzero(d.target == c))[:per_class] for c in range(10)])
    return d, idx


def test_confident_learning_finds_random_flips_on_held_out_probabilities():
    """10% of 500 digits relabelled at random: the flagged images are mostly the flipped ones, and
    the label suggested for them is mostly the true one."""
    d, idx = _digits(50)
    x, truth = d.data[idx], d.target[idx]
    rng = np.random.default_rng(1)
    flipped = rng.choice(len(idx), len(idx) // 10, replace=False)
    given = truth.copy()
    given[flipped] = (given[flipped] + rng.integers(1, 10, len(flipped))) % 10
    p, probe = out_of_sample_probabilities(x, given, 10)
    assert probe["folds"] == 5 and np.allclose(p.sum(1), 1.0)
    found = find_label_issues(given, p)
    hits = np.intersect1d(found.issues, flipped)
    assert len(hits) >= 0.8 * len(flipped) and len(hits) >= 0.6 * len(found.issues), (len(hits), len(found.issues))
    assert (found.suggested[hits] == truth[hits]).mean() > 0.9
    assert abs(found.estimated_total - len(flipped)) <= 0.5 * len(flipped)  # the joint's estimate of the noise
    assert np.all(np.diff(found.self_confidence[found.issues]) >= 0)  # least confident first


def test_out_of_sample_probabilities_come_from_folds_that_never_saw_the_image():
    """A feature that copies the label would make an in-sample probe certain of every label, the
    flipped ones included; held out, a flipped image's copy points to its given label only in its
    own fold's training images, so the probabilities follow the rest of the features."""
    d, idx = _digits(30)
    x, y = d.data[idx], d.target[idx].copy()
    y[:10] = (y[:10] + 1) % 10
    p, _ = out_of_sample_probabilities(x, y, 10)
    assert (p[:10].argmax(1) == d.target[idx][:10]).mean() >= 0.8  # the true class, not the given one


def test_folds_keep_a_group_together_and_stay_stratified():
    labels = np.repeat(np.arange(4), 25)
    groups = np.arange(100)
    groups[[3, 40, 77]] = 3  # copies of one image under three labels
    folds = data.stratified_folds(labels, 5, seed=0, groups=groups)
    held = [set(h.tolist()) for _, h in folds]
    assert sum({3, 40, 77} <= h for h in held) == 1
    assert sorted(i for h in held for i in h) == list(range(100))
    assert all(abs(len(h) - 20) <= 3 for h in held)


def test_nearest_matches_brute_force_across_blocks():
    rng = np.random.default_rng(0)
    x = normalise(rng.normal(size=(37, 6)))
    q = normalise(rng.normal(size=(11, 6)))
    sims, idx = nearest(x, x, 4, same=True, block=8)
    full = (x @ x.T).numpy()
    np.fill_diagonal(full, -np.inf)
    assert np.array_equal(idx, np.argsort(-full, 1)[:, :4]) and np.allclose(sims, np.sort(full, 1)[:, ::-1][:, :4], atol=1e-6)
    sims, idx = nearest(q, x, 5, block=4)
    assert np.array_equal(idx, np.argsort(-(q @ x.T).numpy(), 1)[:, :5])
    pairs = pairs_above(*nearest(x, x, 3, same=True), threshold=-1.0)
    assert all(a < b for a, b, _ in pairs) and len(pairs) == len({(a, b) for a, b, _ in pairs})


def test_quality_flags_the_damaged_copies_and_not_the_originals(tmp_path):
    """Real digits (8 px scans at 32 px) and scikit-image's photos, plus damaged copies: x0.2 dimmed, a 4 px
    blur, a blank image, a panorama strip and a thumbnail; a gray copy among colour photos."""
    import skimage.data

    d, idx = _digits(20)
    images = [Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BILINEAR).convert("RGB")
              for i in idx]
    damaged = {"dark": ImageEnhance.Brightness(images[0]).enhance(0.2),
               "blurry": images[1].filter(ImageFilter.GaussianBlur(4)),  # 1 px of the 8 px scan
               "low_information": Image.new("RGB", (32, 32), (90, 90, 90)),
               "odd_aspect": images[2].resize((128, 32)),
               "small": images[3].resize((8, 8))}
    rows = [quality.measure(Path(__file__), im, im.size) for im in images + list(damaged.values())]
    flags = quality.flag(pd.DataFrame(rows))
    by_issue = {}
    for f in flags:
        by_issue.setdefault(f["issue"], set()).add(f["row"])
    for k, issue in enumerate(damaged):
        assert len(images) + k in by_issue.get(issue, set()), (issue, by_issue)
    originals = {r for rows in by_issue.values() for r in rows if r < len(images)}
    assert len(originals) <= 2, by_issue  # at most 1% of 200 real digits, whatever the check
    assert "grayscale" not in by_issue  # a grayscale folder is not news
    photos = [Image.fromarray(getattr(skimage.data, n)()).convert("RGB") for n in ("astronaut", "coffee", "chelsea", "rocket")]
    photos.append(photos[0].convert("L").convert("RGB"))
    flags = quality.flag(pd.DataFrame([quality.measure(Path(__file__), im, im.size) for im in photos]))
    assert [f["row"] for f in flags if f["issue"] == "grayscale"] == [4]


def _sha(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, digits_folder):
    """25 digits per class in train/ and 5 in val/, with planted damage: a train image copied
    byte for byte into val/ (leakage), two 3s filed as 8s (label issues), a 3 copied into 8/ (a
    conflicting pair), a dark copy, a broken file."""
    root = tmp_path_factory.mktemp("audit") / "digits"
    for c in range(10):
        files = sorted((digits_folder / str(c)).glob("*.png"))[:30]
        for k, f in enumerate(files):
            dest = root / ("val" if k >= 25 else "train") / str(c)
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest / f.name)
    leak = sorted((root / "train" / "4").glob("*.png"))[0]
    shutil.copy(leak, root / "val" / "4" / ("copy_" + leak.name))
    wrong = sorted((root / "train" / "3").glob("*.png"))[:2]
    for f in wrong:
        f.rename(root / "train" / "8" / f.name)
    twin = sorted((root / "train" / "3").glob("*.png"))[5]
    shutil.copy(twin, root / "train" / "8" / ("twin_" + twin.name))  # a 3 filed twice: once as 8
    dark = sorted((root / "train" / "6").glob("*.png"))[0]
    ImageEnhance.Brightness(Image.open(dark).convert("RGB")).enhance(0.15).save(dark.with_name("dark_" + dark.name))
    (root / "train" / "2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    truth = {"leak": (str(leak), str(root / "val" / "4" / ("copy_" + leak.name))),
             "wrong": [str(root / "train" / "8" / f.name) for f in wrong], "dark": str(dark.with_name("dark_" + dark.name)),
             "broken": str(root / "train" / "2" / "broken.png"),
             "twin": (str(twin), str(root / "train" / "8" / ("twin_" + twin.name)))}
    return root, truth


@pytest.fixture(scope="module")
def audited(damaged, lite0_weights, tmp_path_factory):
    from typer.testing import CliRunner

    root, truth = damaged
    before = _sha(root)
    out = tmp_path_factory.mktemp("audit_out") / "audit"
    result = CliRunner().invoke(app, ["audit", str(root), "--model", LITE0, "--weights", str(lite0_weights), "--out", str(out)],
                                env={"COLUMNS": "200"})  # the summary's rows unwrapped, whatever the terminal
    assert result.exit_code == 0, result.output
    assert _sha(root) == before  # nothing of the user's moved, renamed or changed
    return out, pd.read_csv(out / "issues.csv", keep_default_na=False), truth, result.output


def test_audit_finds_the_planted_damage(audited):
    out, issues, truth, output = audited
    kind = lambda name: issues[issues["issue"] == name]  # noqa: E731
    leak = kind("leakage")
    assert {(r.path, r.other_path) for r in leak.itertuples()} >= {(truth["leak"][1], truth["leak"][0])}
    assert "SHA-256" in leak[leak["path"] == truth["leak"][1]]["detail"].iloc[0]
    labels = kind("label_issue")
    flagged = labels.set_index("path")
    # both planted 3s read as 3s held out; confident learning flags those its joint counts (the
    # estimated 8 -> 3 errors), so at least one, by the largest margin
    probs = pd.read_csv(out / "probabilities.csv").set_index("path")
    assert all(probs.loc[p, [str(c) for c in range(10)]].astype(float).idxmax() == "3" for p in truth["wrong"])
    caught = set(truth["wrong"]) & set(flagged.index)
    assert caught and all(str(flagged.loc[p, "given_label"]) == "8" and str(flagged.loc[p, "suggested_label"]) == "3" for p in caught)
    assert len(labels) <= 8  # two planted, a few real digits at most
    # the twin pair is a conflict; held out together, the 3 is judged by a model that never saw
    # its copy labelled 8, so the copy is the label issue and the original keeps its label
    conflict = kind("duplicate_conflicting_labels")
    assert {tuple(sorted((r.path, r.other_path))) for r in conflict.itertuples()} == {tuple(sorted(truth["twin"]))}
    assert truth["twin"][0] not in set(labels["path"])
    assert truth["dark"] in set(kind("dark")["path"])
    assert list(kind("unreadable")["path"]) == [truth["broken"]]
    summary = json.loads((out / "audit.json").read_text())
    assert summary["images"] == 303 and summary["split"] == "the train/ and val/ folders"
    assert summary["counts"]["label_issue"] == len(labels) and summary["how"]["label_issue"].startswith("confident learning")
    assert "label_issue" in output and "relabelled" in output  # words: a long path may wrap in a narrow table


def test_relabel_manifest_is_what_finetune_reads(audited):
    """relabel.csv: every readable image with its label, the label issues relabelled where the
    suggestion is confident and left out where it is not, the images too dark or blurred to learn
    from left out; finetune's reader takes it."""
    out, issues, truth, _ = audited
    images = data.discover(out / "relabel.csv", labelled=True)
    label_of = {str(p): images.classes[l] for p, l in zip(images.paths, images.labels)}
    flagged = issues[issues["issue"] == "label_issue"]
    sure = flagged[flagged["detail"].str.endswith("relabelled in relabel.csv")]
    unsure = set(flagged["path"]) - set(sure["path"])
    unusable = set(issues.loc[issues["issue"].isin(["dark", "overexposed", "blurry", "low_information"]), "path"])
    assert unusable and not unusable & set(flagged["path"])  # the dark copy: reported as dark, not as a label issue
    assert len(label_of) == 303 - len(unsure) - len(unusable) and not (unsure | unusable) & set(label_of)
    assert any(label_of.get(p) == "3" for p in truth["wrong"])
    assert all(label_of[r.path] == str(r.suggested_label) for r in sure.itertuples())
    probs = pd.read_csv(out / "probabilities.csv")
    assert list(probs.columns) == ["path", "given_label"] + [str(c) for c in range(10)]
    assert np.allclose(probs[[str(c) for c in range(10)]].sum(axis=1), 1.0, atol=1e-6)
    changed = [p for p, g in zip(probs["path"], probs["given_label"]) if p in label_of and label_of[p] != str(g)]
    assert sorted(changed) == sorted(sure["path"])
    summary = json.loads((out / "audit.json").read_text())
    assert (summary["relabelled"], summary["left_out"], summary["unusable_left_out"]) == (len(sure), len(unsure), len(unusable))


def test_audit_from_features_agrees_and_against_finds_a_test_copy(audited, damaged, tmp_path, cli_runner):
    """--features reuses the extracted features (no model): the same label issues; a test folder
    holding a copy of a training image is leakage through --against."""
    out, issues, truth, _ = audited
    root, _ = damaged
    test = tmp_path / "test" / "5"
    test.mkdir(parents=True)
    source = sorted((root / "train" / "5").glob("*.png"))[3]
    shutil.copy(source, test / "from_train.png")
    again = tmp_path / "again"
    result = cli_runner.invoke(app, ["audit", "--features", str(out / "features.parquet"), "--out", str(again)])
    assert result.exit_code == 0, result.output
    redo = pd.read_csv(again / "issues.csv", keep_default_na=False)
    assert set(redo.loc[redo["issue"] == "label_issue", "path"]) == set(issues.loc[issues["issue"] == "label_issue", "path"])
    assert truth["dark"] in set(redo.loc[redo["issue"] == "dark", "path"])  # quality decoded again from the paths
    result = cli_runner.invoke(app, ["audit", "--features", str(out / "features.parquet"), "--out", str(again), "--overwrite",
                                     "--against", str(tmp_path / "test"), "--model", LITE0, "--weights",
                                     json.loads((out / "audit.json").read_text())["config"]["weights"] or "none"])
    assert result.exit_code == 0, result.output
    redo = pd.read_csv(again / "issues.csv", keep_default_na=False)
    leak = redo[(redo["issue"] == "leakage") & (redo["path"] == str(test / "from_train.png"))]
    assert list(leak["other_path"]) == [str(source)]


def test_an_existing_audit_is_kept_without_overwrite_and_resumed_with_its_features(audited, damaged, cli_runner,
                                                                                   lite0_weights):
    """Without --overwrite nothing is touched; --resume keeps the features (not extracted again)
    and makes the findings again with new thresholds."""
    out, issues, *_ = audited
    root, _ = damaged
    before = (out / "issues.csv").read_bytes()
    result = cli_runner.invoke(app, ["audit", str(root), "--out", str(out), "--model", LITE0])
    assert result.exit_code == 2 and "--overwrite" in result.output and "--resume" in result.output
    assert (out / "issues.csv").read_bytes() == before
    features = (out / "features.parquet").stat().st_mtime_ns
    result = cli_runner.invoke(app, ["audit", str(root), "--out", str(out), "--model", LITE0, "--weights", str(lite0_weights),
                                     "--resume", "--dark", "0.0"])
    assert result.exit_code == 0, result.output
    assert (out / "features.parquet").stat().st_mtime_ns == features
    redo = pd.read_csv(out / "issues.csv", keep_default_na=False)
    assert "dark" not in set(redo["issue"])
    # the same label issues, and the dark images' own now that they are no longer called dark
    labels_now, labels_then = (set(t.loc[t["issue"] == "label_issue", "path"]) for t in (redo, issues))
    assert labels_then <= labels_now <= labels_then | set(issues.loc[issues["issue"] == "dark", "path"])


def test_bad_input_gets_one_line(tmp_path, cli_runner, test_resnet_weights, make_images):
    """A features file without labels, one class only, a folder of one image: exit 2, named."""
    flat = tmp_path / "flat"
    make_images(flat, {"": 6})
    plain = tmp_path / "plain.parquet"
    assert cli_runner.invoke(app, ["extract", str(flat), "--model", "test_resnet", "--weights", str(test_resnet_weights),
                                   "--out", str(plain)]).exit_code == 0
    result = cli_runner.invoke(app, ["audit", "--features", str(plain), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "has no label for every image" in result.output
    one = tmp_path / "one"
    make_images(one, {"cats": 5})
    result = cli_runner.invoke(app, ["audit", str(one), "--model", "test_resnet", "--weights", str(test_resnet_weights),
                                     "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "at least 2 classes" in result.output, result.output
    single = tmp_path / "single"
    make_images(single, {"cats": 1})
    result = cli_runner.invoke(app, ["audit", str(single), "--model", "test_resnet", "--weights", str(test_resnet_weights),
                                     "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "at least 2 classes" in result.output, result.output
    result = cli_runner.invoke(app, ["audit", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "needs DATA" in result.output


def test_outliers_and_images_nearer_another_class_on_real_digits():
    """Raw pixels of 40 digits per class: a negative (inverted) 0 among the 0s is far from every
    0, and a 3 labelled 8 sits among the 3s."""
    from cnnxfer import audit
    from cnnxfer.config import AuditConfig

    d, idx = _digits(40)
    x, y = d.data[idx].copy(), d.target[idx].copy()
    zero, three = int(np.flatnonzero(y == 0)[0]), int(np.flatnonzero(y == 3)[0])
    x[zero] = 16.0 - x[zero]
    y[three] = 8
    images = audit.ImageSet([f"img{i}.png" for i in range(len(y))], y, [str(c) for c in range(10)], ["train"] * len(y),
                            x, pd.DataFrame(), [])
    config = AuditConfig(features=Path("unused.parquet"))
    xn = normalise(x)
    rows = audit._outliers(images, nearest(xn, xn, config.neighbours, same=True), config)
    outliers = [r for r in rows if r["issue"] == "outlier"]
    nearer = {r["path"]: r for r in rows if r["issue"] == "nearer_other_class"}
    assert f"img{zero}.png" in {r["path"] for r in outliers} and len(outliers) <= 4
    assert nearer[f"img{three}.png"]["suggested_label"] == "3" and len(nearer) <= 12  # 3% of 400: real look-alikes
    note = audit._balance_note(np.array([40, 10]), ["cats", "dogs"])
    assert "4.0x the images of dogs" in note and "2.50x" in note


def test_pixels_tell_copies_from_look_alike_digits(tmp_path):
    """Real digits (the 8 px scans, 4x bicubic to 32 px): copies re-encoded as JPEG q70, cropped one
    pixel a side, reduced x0.8 or enlarged x1.5 are found among 150 look-alike digits; no pair of two
    different scans is, and the unreadable file is no pair at all."""
    from PIL import Image

    from cnnxfer import copies

    d, idx = _digits(15)
    paths = []
    for i, k in enumerate(idx):
        image = Image.fromarray(np.uint8(d.images[k] * 255 / 16)).resize((32, 32), Image.BICUBIC)
        image.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    n = len(paths)
    sources = {n: 3, n + 1: 40, n + 2: 77, n + 3: 120}
    Image.open(paths[3]).save(tmp_path / "jpeg.jpg", quality=70)
    Image.open(paths[40]).crop((1, 0, 31, 31)).save(tmp_path / "crop.png")
    Image.open(paths[77]).resize((26, 26), Image.BICUBIC).save(tmp_path / "small.png")
    Image.open(paths[120]).resize((48, 48), Image.BICUBIC).save(tmp_path / "large.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths += [str(tmp_path / f) for f in ("jpeg.jpg", "crop.png", "small.png", "large.png", "broken.png")]
    pixels = copies.Pixels(paths)
    assert pixels.similarity(3, n) > 0.99 and pixels.similarity(40, n + 1) > 0.99
    assert np.isnan(pixels.similarity(0, len(paths) - 1))
    found = copies.copies(pixels, copies.pixel_candidates(pixels, range(len(paths))))
    assert set(found) == {(s, c) for c, s in sources.items()}, found
    # an --against folder: its queries searched among the other images only
    assert (n + 2, 77) in copies.pixel_candidates(pixels, [n + 2], range(n))
