"""`cnnxfer report AUDIT_DIR` (issue 20): the audit's findings as one offline page, on a real audit of
digits with planted damage (a byte copy across train/val, a copy within a class, a copy under another
class, a darkened copy, a broken file); every link resolves inside the folder and no file of the
user's changes. `cnnxfer report RUN_DIR --audit AUDIT_DIR` adds the same section to a run's page."""
from __future__ import annotations

import hashlib
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from cnnxfer import audit
from cnnxfer.cli import app
from cnnxfer.config import AuditConfig
from cnnxfer.inspect import audit_page

pytestmark = pytest.mark.usefixtures("one_thread")


def _sha(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def planted(tmp_path_factory, digits_folder) -> tuple[Path, dict]:
    """8 train + 2 val digits per class, and the damage each section of the page shows."""
    root = tmp_path_factory.mktemp("audit_page") / "digits"
    for c in range(10):
        for k, f in enumerate(sorted((digits_folder / str(c)).glob("*.png"))[:10]):
            dest = root / ("val" if k >= 8 else "train") / str(c)
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest / f.name)
    train = {c: sorted((root / "train" / str(c)).glob("*.png")) for c in (1, 3, 4, 6)}
    truth = {"leak": (root / "val" / "4" / f"copy_{train[4][0].name}", train[4][0]),
             "duplicate": (train[6][0], root / "train" / "6" / f"dup_{train[6][0].name}"),
             "conflict": (train[3][0], root / "train" / "8" / f"conflict_{train[3][0].name}"),
             "dark": root / "train" / "1" / f"dark_{train[1][0].name}", "broken": root / "train" / "2" / "broken.png"}
    for original, copy in (truth["leak"][::-1], truth["duplicate"], truth["conflict"]):
        shutil.copy(original, copy)
    ImageEnhance.Brightness(Image.open(train[1][0]).convert("RGB")).enhance(0.15).save(truth["dark"])
    truth["broken"].write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root, {k: tuple(map(str, v)) if isinstance(v, tuple) else str(v) for k, v in truth.items()}


@pytest.fixture(scope="module")
def audited(planted, test_resnet_weights, tmp_path_factory) -> Path:
    root, _ = planted
    out = tmp_path_factory.mktemp("audit_page_out") / "audit"
    audit.run_audit(AuditConfig(data=root, out=out, model="test_resnet", weights=str(test_resnet_weights), device="cpu",
                                num_workers=0, precision="fp32"))
    return out


@pytest.fixture(scope="module")
def page(audited, planted) -> tuple[Path, str, dict[str, str]]:
    from typer.testing import CliRunner

    root, _ = planted
    before = _sha(root)
    result = CliRunner().invoke(app, ["report", str(audited)])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert _sha(root) == before  # the user's images are only read: nothing changed, nothing added
    return audited / "report.html", (audited / "report.html").read_text(encoding="utf-8"), before


class _Page(HTMLParser):
    """Ids, references, and for each gallery section the titles (full paths) of its figures."""

    def __init__(self):
        super().__init__()
        self.ids, self.refs, self.section, self.pairs = set(), [], None, {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.ids.add(attrs.get("id"))
        if tag == "section":
            self.section = attrs.get("id")
        if tag == "figure":
            self.pairs.setdefault(self.section, []).append([attrs["title"]])
        if tag == "img" and self.section in self.pairs and len(self.pairs[self.section][-1]) == 1:
            self.pairs[self.section][-1].append(attrs["src"])
        for key in ("src", "href"):
            if attrs.get(key):
                self.refs.append((tag, attrs[key]))


def _parse(text: str) -> _Page:
    parser = _Page()
    parser.feed(text)
    return parser


def test_the_page_shows_every_finding_with_its_thumbnails(page, planted, audited):
    _, text, _ = page
    _, truth = planted
    for heading in ("Audit summary", "Label issues", "Duplicates with conflicting labels", "Leakage between splits",
                    "Duplicates", "Unreadable files", "Dark"):
        assert f"<h2>{heading}" in text, heading
    parsed = _parse(text)
    thumbnail = lambda path: f"report_files/audit/{hashlib.sha1(path.encode()).hexdigest()[:16]}.png"  # noqa: E731
    for section, pair in (("audit-leakage", truth["leak"]), ("audit-duplicate", truth["duplicate"]),
                          ("audit-duplicate_conflicting_labels", truth["conflict"])):
        shown = {tuple(figure) for figure in parsed.pairs[section]}
        assert {(p, thumbnail(p)) for p in pair} <= shown, (section, shown)  # both images of the pair, side by side
    assert thumbnail(truth["dark"]) in {ref for _, ref in parsed.refs}
    assert truth["broken"] in text and "unreadable</div>" in text  # a placeholder, not a thumbnail
    counts = pd.read_csv(audited / "issues.csv")["issue"].value_counts()
    assert re.search(rf'Leakage between splits</a></td><td class="n">{counts["leakage"]}<', text)
    for how in ("confident learning", "identical files by SHA-256", "99th percentile of luminance"):
        assert how in text


def test_every_link_resolves_inside_the_folder_and_nothing_is_fetched(page, audited):
    _, text, _ = page
    parsed = _parse(text)
    assert not re.search(r"(?i)\b(https?:|ftp:)|url\(|@import|<script|src=\"//|href=\"//", text)
    for tag, ref in parsed.refs:
        if ref.startswith("#"):
            assert ref[1:] in parsed.ids, ref
            continue
        parsed_ref = urlparse(ref)
        assert not parsed_ref.scheme and not parsed_ref.netloc, ref
        target = (audited / unquote(parsed_ref.path)).resolve()
        assert target.is_file() and audited.resolve() in target.parents, ref
        if tag == "img":
            with Image.open(target) as im:
                assert im.format == "PNG" and max(im.size) <= audit_page.THUMB
    links = {ref for tag, ref in parsed.refs if tag == "a"}
    assert {"issues.csv", "relabel.csv", "audit.json"} <= links


def test_an_existing_page_is_kept_without_overwrite(page, audited, cli_runner):
    path, _, _ = page
    before = path.read_bytes()
    result = cli_runner.invoke(app, ["report", str(audited)])
    assert result.exit_code == 2 and "--overwrite" in result.stderr and path.read_bytes() == before
    result = cli_runner.invoke(app, ["report", str(audited), "--data", str(audited)])
    assert result.exit_code == 2 and "--data" in result.stderr


def test_a_file_gone_since_the_audit_is_a_placeholder_and_a_note(audited, planted, tmp_path, cli_runner):
    """Another copy of the audit whose dark image has since been deleted (issues.csv pointed elsewhere:
    the test deletes nothing of the planted folder)."""
    _, truth = planted
    copy = tmp_path / "audit"
    shutil.copytree(audited, copy, ignore=shutil.ignore_patterns("report*"))
    gone = str(tmp_path / "deleted_since.png")
    issues = pd.read_csv(copy / "issues.csv", dtype=str, keep_default_na=False)
    issues.loc[issues["path"] == truth["dark"], "path"] = gone
    issues.to_csv(copy / "issues.csv", index=False)
    result = cli_runner.invoke(app, ["report", str(copy)])
    assert result.exit_code == 0, result.stderr
    text = (copy / "report.html").read_text(encoding="utf-8")
    assert "file no longer exists</div>" in text and "no longer exist" in " ".join(result.stderr.split())
    assert gone in text


def test_the_page_reads_the_files_audit_writes():
    assert (audit_page.AUDIT_JSON, audit_page.ISSUES, audit_page.RELABEL, audit_page.PROBABILITIES, audit_page.QUALITY) == \
           (audit.AUDIT_JSON, audit.ISSUES, audit.RELABEL, audit.PROBABILITIES, audit.QUALITY)
    assert set(audit_page.TITLES) == set(audit.HOW)  # every kind the audit writes has its place on the page


def test_a_run_page_with_audit_carries_the_section_and_its_files(audited, digits_run, tmp_path, cli_runner):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    result = cli_runner.invoke(app, ["report", str(run), "--audit", str(audited), "--max-images", "30", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    text = (run / "report.html").read_text(encoding="utf-8")
    assert '<a href="#audit">Audit</a>' in text and "<h2>Audit summary" in text and "<h2>Worst errors" in text
    for tag, ref in _parse(text).refs:
        if not ref.startswith("#"):
            assert (run / unquote(ref)).resolve().is_file() and run.resolve() in (run / ref).resolve().parents, ref
    assert (run / "report_files" / "audit" / "issues.csv").read_bytes() == (audited / "issues.csv").read_bytes()
