"""Atomic output files: complete or absent, and readable by others as the user's umask says."""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest
import torch

from cnnxfer import checkpoint
from cnnxfer.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_mode_of_a_new_file_under_the_umask(tmp_path, mask, expected):
    with umask(mask):
        checkpoint.atomic_write_text(tmp_path / "a.txt", "a")
        checkpoint.atomic_write_json(tmp_path / "b.json", {"b": 1})
        checkpoint.save_state_dict(tmp_path / "c.safetensors", {"w": torch.ones(2)})
        checkpoint.save_training_state(tmp_path / "d.pt", {"epoch": 1})
        with checkpoint.atomic_path(tmp_path / "e.bin") as tmp:
            tmp.unlink()  # a writer that creates its file anew (not writing into the temp file)
            tmp.write_bytes(b"e")
        open(tmp_path / "plain.txt", "w").close()  # what any other program gets
    assert mode(tmp_path / "plain.txt") == expected
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == dict.fromkeys(
        ["a.txt", "b.json", "c.safetensors", "d.pt", "e.bin", "plain.txt"], expected)


def test_a_failed_write_leaves_the_previous_file_and_no_temp_file(tmp_path):
    target = tmp_path / "out.txt"
    checkpoint.atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with checkpoint.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600)])
def test_every_output_of_the_commands_follows_the_umask(colours, tmp_path, mask, expected):
    from typer.testing import CliRunner

    fast = ["--workers", "0", "--batch-size", "8"]
    run, out = tmp_path / "run", tmp_path / "out"
    unreadable = colours.parent / "with_broken"
    if not unreadable.exists():
        import shutil

        shutil.copytree(colours, unreadable)
        (unreadable / "red" / "broken.png").write_bytes(b"not a png")
    with umask(mask):
        runner = CliRunner()
        for args in (["train", unreadable, "--model", "test_resnet", "--epochs", "1", "--img-size", "32", "--out", run],
                     ["predict", unreadable, "--weights", run, "--out", out / "pred.csv"],
                     ["evaluate", unreadable, "--weights", run, "--json", out / "metrics.json"],
                     ["extract", unreadable, "--weights", run, "--out", out / "features.parquet"]):
            result = runner.invoke(app, [str(a) for a in args] + fast)
            assert result.exit_code == 0, result.stderr
    files = [p for p in (*run.iterdir(), *out.iterdir())]
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "metrics.csv", "curves.png", "skipped.csv",
                                       "pred.csv", "pred.skipped.csv", "metrics.json", "features.parquet",
                                       "features.skipped.csv"}
    assert {p.name: oct(mode(p)) for p in files} == {p.name: oct(expected) for p in files}
