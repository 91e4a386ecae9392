"""`cnnxfer inspect ...` and `cnnxfer report` as a user runs them: every view on a timm model
(resnet10t), a model without timm's API or `forward_intermediates` (torchvision's resnet18 through
a factory file) and a hand-written module with functional calls; exit codes and messages for bad
input; and the report page checked file by file and in a real browser (headless Chromium)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cnnxfer import models
from cnnxfer.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")

TORCHVISION_NET = """
import torchvision


def build(num_classes):
    return torchvision.models.resnet18(num_classes=num_classes)
"""

HAND_WRITTEN_NET = """
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        x = x + F.relu(self.block(x))
        return self.head(x.mean(dim=(2, 3)))


def build(num_classes):
    return Net(num_classes)
"""

VIEWS = {  # view -> (arguments after the model options, files it writes)
    "filters": (["--compare", "none"], {"filters.png", "filters_compare.png", "weight_change.csv", "filters.json"}),
    "patches": (["DATA", "--units", "0,1", "--top", "2"], {"patches.png", "patches.csv", "patches.json"}),
    "class-model": (["--steps", "3"], {"class_model.png", "class_model.csv", "class_model.json"}),
    "embedding": (["DATA", "--thumbnails", "4"], {"embedding.png", "embedding.csv", "embedding.json"}),
    "invariance": (["DATA"], {"invariance.png", "invariance.csv", "invariance_units.csv", "invariance.json"}),
    "layers": (["DATA"], {"layers.csv", "layers.json"}),
    "errors": (["DATA", "--top", "3"], {"errors.png", "errors.csv", "errors.json"}),
}


def _invoke(*args):
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from conftest import _make_images

    root = tmp_path_factory.mktemp("inspect_images") / "data"
    _make_images(root, {"cat": 4, "dog": 4}, size=(32, 32))
    return root


@pytest.fixture(scope="module")
def model_options(tmp_path_factory):
    """--model/--weights for each kind of model: weights files with a two-class head."""
    root = tmp_path_factory.mktemp("inspect_models")
    options = {}
    for kind, spec in (("resnet10t", "resnet10t"), ("torchvision", "tv.py:build"), ("hand-written", "net.py:build")):
        if spec.endswith(":build"):
            source = TORCHVISION_NET if kind == "torchvision" else HAND_WRITTEN_NET
            (root / spec.split(":")[0]).write_text(source)
            spec = f"{root / spec.split(':')[0]}:build"
        torch.manual_seed(0)
        model = models.build_architecture(spec, 2)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / f"{kind}.safetensors"))
        options[kind] = ["--model", spec, "--weights", root / f"{kind}.safetensors", "--img-size", "32"]
    return options


@pytest.mark.parametrize("kind", ["resnet10t", "torchvision", "hand-written"])
def test_every_view_runs_on_each_kind_of_model(kind, model_options, images, tmp_path):
    net = models.build_architecture(str(model_options[kind][1]), 2)
    assert kind == "resnet10t" or not hasattr(net, "forward_intermediates")
    for view, (args, files) in VIEWS.items():
        out = tmp_path / view
        args = [images if a == "DATA" else a for a in args]
        result = _invoke("inspect", view, *args, *model_options[kind], "--out", out, "--device", "cpu")
        assert result.exit_code == 0, (kind, view, result.stdout, result.stderr, result.exception)
        assert {p.name for p in out.iterdir()} == files, (kind, view)
        for png in out.glob("*.png"):
            assert Image.open(png).size[0] > 10
    layers = json.loads((tmp_path / "layers" / "layers.json").read_text())["rows"]
    assert layers[0]["stage"] == "input" and layers[-1]["stage"] == "total"
    names = [r["stage"] for r in layers]
    assert len(names) == len(set(names))  # a stage named "head" is not the row after the last stage
    assert all(r["dead_fraction"] is not None for r in layers if r["stage"] not in ("input", "after the last stage", "total"))
    unit = _invoke("inspect", "class-model", *model_options[kind], "--layer", "0", "--unit", "1", "--steps", "2",
                   "--out", tmp_path / "unit", "--device", "cpu")
    assert unit.exit_code == 0 and "unit 1" in unit.stdout, unit.stderr


def test_embedding_reads_a_features_file_from_extract(tmp_path, images, test_resnet_weights):
    features = tmp_path / "f.parquet"
    extracted = _invoke("extract", images, "--model", "test_resnet", "--weights", test_resnet_weights, "--img-size", "32",
                        "--workers", "0", "--out", features)
    assert extracted.exit_code == 0, extracted.stderr
    result = _invoke("inspect", "embedding", features, "--method", "pca", "--knn", "3", "--out", tmp_path / "map")
    assert result.exit_code == 0, result.stderr
    summary = json.loads((tmp_path / "map" / "embedding.json").read_text())
    assert summary["images"] == 8 and summary["dim"] == 96 and set(summary["knn_accuracy"]) == {"full", "pca"}
    assert "3-NN accuracy" in result.stdout
    ignored = _invoke("inspect", "embedding", features, "--weights", test_resnet_weights, "--out", tmp_path / "other")
    assert ignored.exit_code == 2 and "--weights does not apply to a features file" in " ".join(ignored.stderr.split())


@pytest.mark.parametrize("args, message", [
    (["patches", "DATA", "--layer", "layer9"], "unknown layer 'layer9' for --layer"),
    (["patches", "DATA", "--layer", "layer1", "--units", "0,999"], "--units 999 is out of range"),
    (["patches", "DATA", "--units", "a,b"], "--units takes unit"),
    (["class-model", "--class", "zebra"], "--class zebra is not one of"),
    (["invariance", "DATA", "--transforms", "hflip,shear"], "--transforms: choose from"),
    (["errors", "DATA"], "the model has 1000 outputs and DATA has 2 classes"),
])
def test_bad_input_exits_2_with_one_line_naming_the_option(args, message, images, tmp_path, resnet10t_weights):
    weights = ["--model", "resnet10t", "--weights", resnet10t_weights, "--img-size", "32"]
    args = [images if a == "DATA" else a for a in args]
    result = _invoke("inspect", *args, *weights, "--out", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3  # one message (wrapped), not a stack


def test_existing_output_needs_overwrite_and_is_untouched(tmp_path, model_options):
    out = tmp_path / "filters"
    first = _invoke("inspect", "filters", *model_options["hand-written"], "--out", out)
    assert first.exit_code == 0
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = _invoke("inspect", "filters", *model_options["hand-written"], "--out", out)
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    assert _invoke("inspect", "filters", *model_options["hand-written"], "--out", out, "--overwrite").exit_code == 0


def test_unreadable_images_are_skipped_listed_and_warned_about(tmp_path, images, model_options):
    data = tmp_path / "data"
    shutil.copytree(images, data)
    (data / "cat" / "broken.jpg").write_text("not an image")
    result = _invoke("inspect", "invariance", data, *model_options["hand-written"], "--out", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert "1 unreadable image(s) skipped" in " ".join(result.stderr.split())
    listed = (tmp_path / "out" / "skipped.csv").read_text()
    assert "broken.jpg" in listed and json.loads((tmp_path / "out" / "invariance.json").read_text())["images"] == 8


def test_inspect_defaults_to_a_folder_inside_a_run_directory(tmp_path, digits_run):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    result = _invoke("inspect", "filters", "--weights", run)
    assert result.exit_code == 0, result.stderr
    assert (run / "inspect" / "filters" / "filters.png").is_file()


# ---------------------------------------------------------------- the report page

class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.ids, self.tags = [], set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for key in ("src", "href"):
            if attrs.get(key):
                self.refs.append((tag, attrs[key]))


@pytest.fixture(scope="module")
def report_run(tmp_path_factory, digits_run):
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(digits_run, run)
    result = _invoke("report", run, "--max-images", "120", "--device", "cpu")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return run


def test_report_page_is_self_contained_and_every_link_resolves(report_run):
    page = report_run / "report.html"
    text = page.read_text(encoding="utf-8")
    parser = _Links()
    parser.feed(text)
    assert "script" not in parser.tags and not re.search(r"(?i)\b(https?:|ftp:)|url\(|@import|src=\"//|href=\"//", text)
    for tag, ref in parser.refs:
        if ref.startswith("#"):
            assert ref[1:] in parser.ids, ref
            continue
        parsed = urlparse(ref)
        assert not parsed.scheme and not parsed.netloc, ref  # relative: nothing leaves the folder
        target = (report_run / unquote(parsed.path)).resolve()
        assert target.is_file() and report_run.resolve() in target.parents, ref
        if tag == "img":
            Image.open(target).verify()
    images = {ref for tag, ref in parser.refs if tag == "img"}
    assert {"curves.png", "confusion_matrix.png", "report_files/errors/errors.png", "report_files/filters/filters.png",
            "report_files/embedding/embedding.png", "report_files/invariance/invariance.png"} <= images
    links = {ref for tag, ref in parser.refs if tag == "a"}
    assert {"report.csv", "report_files/errors/errors.csv", "report_files/embedding/embedding.csv",
            "report_files/invariance/invariance.csv", "report_files/filters/filters.json"} <= links
    for heading in ("Summary", "Training curves", "Confusion matrix", "Per class", "Worst errors", "First-layer filters",
                    "Embedding map", "Invariance"):
        assert f"<h2>{heading}" in text, heading
    assert text.count('<tr class="avg">') == 2  # macro and weighted averages under the ten classes


def test_report_refuses_to_replace_a_page_without_overwrite(report_run):
    page = report_run / "report.html"
    before = page.read_bytes()
    result = _invoke("report", report_run)
    assert result.exit_code == 2 and "--overwrite" in result.stderr and page.read_bytes() == before


def test_report_without_images_says_so_and_keeps_the_rest(tmp_path, digits_run):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    config = json.loads((run / "config.json").read_text())
    config["train_config"]["data"] = str(tmp_path / "moved_away")
    (run / "config.json").write_text(json.dumps(config))
    result = _invoke("report", run, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    text = (run / "report.html").read_text()
    assert "data folder is gone" in " ".join(result.stderr.split()) and "data folder is gone" in text
    assert "<h2>First-layer filters" in text and "<h2>Per class" in text and "Worst errors" not in text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# no update checks, sync or other background traffic of the browser's own; any name resolves to nothing
QUIET = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-pings", "--disable-default-apps",
         "--disable-domain-reliability", "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0"]


def _chromium(page: Path, work: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """(screenshot pixels, console messages, URLs the page itself requested over the network)."""
    shot, net_log = work / "shot.png", work / "net.json"
    proc = subprocess.run([CHROMIUM, *QUIET, f"--user-data-dir={work / 'profile'}", "--window-size=1280,4000",
                           f"--screenshot={shot}", f"--log-net-log={net_log}", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    log = json.loads(net_log.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    # the browser's own requests carry no origin; a page's carry its origin ("null" for a file)
    requested = [e["params"]["url"] for e in log["events"] if e["type"] == start
                 and e.get("params", {}).get("initiator", "not an origin") != "not an origin"]
    return np.asarray(Image.open(shot).convert("L"), dtype=np.float32), console, requested


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium_without_errors_or_network(report_run, tmp_path):
    control = tmp_path / "control.html"  # the checks below must see what they look for
    control.write_text('<p>x</p><img src="https://example.com/x.png"><script>console.error("boom")</script>')
    _, console, requested = _chromium(control, tmp_path / "control")
    assert any("boom" in line for line in console) and requested == ["https://example.com/x.png"]
    pixels, console, requested = _chromium(report_run / "report.html", tmp_path / "report")
    assert console == [] and requested == []
    assert pixels.std() > 20  # not blank: text, tables and plots on the page
    rows = (np.abs(pixels - np.median(pixels)) > 30).mean(axis=1)
    assert (rows > 0.02).mean() > 0.3  # content down the page, not a header over an empty page


def test_the_page_templates_are_package_data():
    """An installed cnnxfer (a wheel, not this checkout) must carry the templates."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cnnxfer.inspect"]
    templates = root / "cnnxfer" / "inspect" / "templates"
    files = [p.relative_to(templates.parent).as_posix() for p in templates.iterdir()]
    assert files and all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), (files, patterns)
