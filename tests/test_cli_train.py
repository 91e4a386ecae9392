"""`cnnxfer finetune` / `cnnxfer train` as a user runs them: exit codes, files, messages, signals,
and scikit-learn's digits example as the accuracy reference."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import COLOURS, write_colour_folder

from cnnxfer import training
from cnnxfer.cli import app
from cnnxfer.config import TrainConfig

FAST = ["--img-size", "32", "--workers", "0", "--batch-size", "8"]
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finished_run(colours, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    result = _invoke("train", colours, "--model", "test_resnet", "--epochs", "2", "--out", run, *FAST)
    assert result.exit_code == 0, result.stderr
    return run


def _invoke(*args):
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [str(a) for a in args])


def metrics_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def cnnxfer_process(*args) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "cnnxfer", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------- the commands

@pytest.mark.parametrize("command", ["finetune", "train", "predict", "evaluate"])
def test_help_text_ends_with_an_example(command):
    result = _invoke(command, "--help")
    assert result.exit_code == 0 and f"Example: cnnxfer {command}" in result.stdout


def test_train_writes_a_complete_run_directory(finished_run):
    files = {p.name for p in finished_run.iterdir()}
    assert {"model.safetensors", "config.json", "metrics.csv", "confusion_matrix.csv", "report.csv",
            "curves.png", "confusion_matrix.png"} <= files
    assert "state.pt" not in files and "skipped.csv" not in files and not [f for f in files if f.endswith(".tmp")]
    config = json.loads((finished_run / "config.json").read_text())
    assert config["model"] == "test_resnet" and config["classes"] == sorted(COLOURS)
    assert config["data_config"]["input_size"] == [3, 32, 32] and config["weights_source"] == "none"
    assert config["train_config"]["epochs"] == 2 and config["final"]["final_val_accuracy"] is not None
    assert [r["epoch"] for r in metrics_rows(finished_run)] == ["1", "2"]
    assert (finished_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



def test_train_prints_each_note_once(colours, tmp_path):
    result = _invoke("train", colours, "--model", "test_resnet", "--epochs", "1", "--out", tmp_path / "run", *FAST)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("optimizer step(s) per epoch") == 1 and "note:" in result.stderr

def test_finetune_accepts_a_run_directory_as_weights(finished_run, colours, tmp_path):
    result = _invoke("finetune", colours, "--weights", finished_run, "--strategy", "linear", "--epochs", "1",
                     "--out", tmp_path / "tuned", *FAST)
    assert result.exit_code == 0, result.stderr
    before = load_file(str(finished_run / "model.safetensors"))
    after = load_file(str(tmp_path / "tuned" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("fc."))
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["model"] == "test_resnet"


@pytest.mark.parametrize("classes", [("blue", "red"), ("a", "b", "c")])
def test_finetuning_a_run_on_other_classes_announces_one_new_head(finished_run, colours, tmp_path, classes):
    """Fewer classes, or as many under other names: the run's head belongs to its own classes, so
    the head is new (said once) and the backbone is the run's."""
    data = tmp_path / "data"
    for name, source in zip(classes, sorted(COLOURS)):
        (data / name).mkdir(parents=True)
        for f in sorted((colours / source).iterdir()):
            (data / name / f.name).write_bytes(f.read_bytes())
    result = _invoke("finetune", data, "--weights", finished_run, "--strategy", "linear",  # the probe: no epochs to give
                     "--out", tmp_path / "tuned", *FAST)
    assert result.exit_code == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:") and ("classifier" in line or "head" in line)]
    assert len(notes) == 1 and f"new classifier for classes {', '.join(classes)}" in notes[0], result.stderr
    before = load_file(str(finished_run / "model.safetensors"))
    after = load_file(str(tmp_path / "tuned" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("fc."))
    from cnnxfer import models

    for names, kept in ((list(classes), False), (sorted(COLOURS), True)):  # the head a fine-tuning run starts from
        start = models.load_model(None, str(finished_run), len(names), classes=names).model.state_dict()["fc.weight"]
        assert torch.equal(start, before["fc.weight"]) == kept, names


def test_existing_run_directory_without_overwrite_exits_2_untouched(finished_run, colours):
    before = {p.name: p.stat().st_mtime_ns for p in finished_run.iterdir()}
    result = _invoke("train", colours, "--model", "test_resnet", "--epochs", "1", "--out", finished_run, *FAST)
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in finished_run.iterdir()} == before


def test_resume_of_a_finished_run_exits_2(finished_run):
    result = _invoke("train", "--resume", finished_run)
    assert result.exit_code == 2 and "nothing to resume" in result.stderr


def test_no_data_and_no_resume_exits_2():
    result = _invoke("train", "--model", "test_resnet")
    assert result.exit_code == 2 and "--resume" in result.stderr


# ---------------------------------------------------------------- failures

def test_divergence_exits_1_naming_step_and_learning_rate(colours, tmp_path):
    result = _invoke("train", colours, "--model", "test_resnet", "--epochs", "2", "--lr", "1e6", "--warmup-epochs", "0",
                     "--out", tmp_path / "run", *FAST)
    assert result.exit_code == 1
    assert "at step" in result.stderr and "peak --lr 1e+06" in result.stderr and "try --lr 1e+05" in result.stderr
    assert "no epoch finished" in result.stderr


def test_out_of_memory_exits_1_with_a_batch_size_that_fits(colours, tmp_path):
    (tmp_path / "hungry.py").write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "class Hungry(nn.Module):\n"
        "    def __init__(self, num_classes):\n"
        "        super().__init__()\n"
        "        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, num_classes)\n\n"
        "    def forward(self, x):\n"
        "        if x.shape[0] > 3:\n"
        "            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')\n"
        "        return self.fc(self.conv(x).mean((2, 3)))\n\n\n"
        "def build(num_classes=1000):\n"
        "    return Hungry(num_classes)\n"
    )
    result = _invoke("train", colours, "--model", f"{tmp_path / 'hungry.py'}:build", "--epochs", "1",
                     "--out", tmp_path / "run", "--img-size", "32", "--workers", "0", "--batch-size", "24")
    assert result.exit_code == 1
    error = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    fits = int(error.split("--batch-size ")[1].split()[0])
    assert "batch size 24" in error and 1 <= fits <= 3


def test_a_class_whose_images_are_all_unreadable_exits_2_naming_it(tmp_path):
    data = write_colour_folder(tmp_path / "data", {"blue": 6, "red": 6})
    (data / "broken_class").mkdir()
    for i in range(4):
        (data / "broken_class" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = _invoke("train", data, "--model", "test_resnet", "--epochs", "1", "--out", tmp_path / "run", *FAST)
    assert result.exit_code == 2 and "broken_class" in result.stderr


def test_unreadable_images_are_skipped_and_strict_fails(tmp_path):
    data = write_colour_folder(tmp_path / "data", {"blue": 6, "red": 6})
    (data / "red" / "zero.png").write_bytes(b"")
    result = _invoke("train", data, "--model", "test_resnet", "--epochs", "1", "--out", tmp_path / "run", *FAST)
    assert result.exit_code == 0, result.stderr
    skipped = (tmp_path / "run" / "skipped.csv").read_text()
    assert "zero.png" in skipped and "empty file" in skipped
    result = _invoke("train", data, "--model", "test_resnet", "--epochs", "3", "--out", tmp_path / "strict", "--strict", *FAST)
    assert result.exit_code == 1 and "--strict: 1 unreadable image(s)" in result.stderr
    assert "zero.png" in (tmp_path / "strict" / "skipped.csv").read_text()
    assert not (tmp_path / "strict" / "metrics.csv").exists()  # stopped after the first pass, not at the end


# ---------------------------------------------------------------- logs without a terminal

EPOCH_LINE = r"epoch +\d+/\d+  train \d+\.\d{4} +\d+\.\d%  val (\d+\.\d{4} +\d+\.\d%|-)  lr \d\.\de[+-]\d\d  \d+\.\ds"


def test_a_log_file_gets_one_clean_line_per_epoch(colours, tmp_path):
    """Piped to a file (CI, nohup, a cluster job): each epoch is one line under 80 columns, its time
    included, and nothing of the terminal's progress bar (carriage returns, escape codes)."""
    import re

    proc = cnnxfer_process("train", colours, "--model", "test_resnet", "--epochs", "3", "--out", tmp_path / "run", *FAST)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    lines = stderr.splitlines()
    epochs = [line for line in lines if line.startswith("epoch")]
    assert len(epochs) == 3 and all(re.fullmatch(EPOCH_LINE, line) for line in epochs), epochs
    assert all(len(line) < 80 for line in epochs)
    assert not [line for line in lines if re.fullmatch(r"\s*\d+(\.\d+)?s\s*", line)]
    assert "\r" not in stderr + stdout and "\x1b" not in stderr + stdout


def test_an_oversized_image_is_skipped_without_a_raw_pillow_warning(tmp_path):
    """A 92 MP photo (over Pillow's 89.5 MP default, under twice it, where Image.open only warns) is
    listed as skipped by train and by sanity-check, with no DecompressionBombWarning on stderr."""
    data = write_colour_folder(tmp_path / "data", {"blue": 8, "red": 8})
    Image.new("L", (9600, 9600), 128).save(data / "red" / "huge.png")  # 110 kB: PNG compresses it
    proc = cnnxfer_process("train", data, "--model", "test_resnet", "--epochs", "1", "--out", tmp_path / "run", *FAST)
    _, train_err = proc.communicate(timeout=300)
    assert proc.returncode == 0, train_err
    assert "huge.png,too many pixels" in (tmp_path / "run" / "skipped.csv").read_text()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    sanity = subprocess.run([sys.executable, "-m", "cnnxfer", "sanity-check", str(data), "--model", "test_resnet",
                             "--only", "data", "--img-size", "32"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert "huge.png" in (tmp_path / "sanity.skipped.csv").read_text()
    for stderr in (train_err, sanity.stderr):
        assert "Warning" not in stderr and "warnings.warn" not in stderr, stderr


# ---------------------------------------------------------------- signals and --resume

@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_the_epoch_and_resume_finishes_like_an_uninterrupted_run(sig, code, tmp_path):
    data = write_colour_folder(tmp_path / "data", dict.fromkeys(COLOURS, 24))
    run, epochs = tmp_path / "run", 6
    args = ["--model", "test_resnet", "--epochs", epochs, "--img-size", "32", "--batch-size", "8", "--workers", "1"]
    # a checkpoint every epoch, so metrics.csv appearing means an epoch is done (the kept-in-memory
    # path is tested in test_engine)
    proc = cnnxfer_process("train", data, "--out", run, *args, "--checkpoint-every", "0")
    deadline = time.monotonic() + 120
    while not (run / "metrics.csv").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "--resume" in stderr and (run / "state.pt").is_file()
    done = len(metrics_rows(run))
    assert 1 <= done < epochs
    proc = cnnxfer_process("train", "--resume", run)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert not (run / "state.pt").exists()
    # the same run without an interruption, in this process (same seed, precision and loader worker)
    whole = training.fit(TrainConfig(data=data, out=tmp_path / "whole", model="test_resnet", weights="none", epochs=epochs,
                                   img_size=32, batch_size=8, num_workers=1))
    assert without_seconds(metrics_rows(run)) == without_seconds(metrics_rows(whole.run_dir))
    a, b = load_file(str(run / "model.safetensors")), load_file(str(whole.run_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- accuracy: scikit-learn's digits example

@pytest.fixture(scope="module")
def digits_example(tmp_path_factory) -> tuple[Path, float]:
    """scikit-learn's "Recognizing hand-written digits" example: the first half of `load_digits`
    trains, the second half tests, SVC(gamma=0.001) scores 96.9%. Returns the same split as
    train/ and val/ folders of 8x8 images upscaled to 32x32 PNGs, and the SVC score computed here."""
    from sklearn import svm
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.images) // 2  # train_test_split(test_size=0.5, shuffle=False)
    x = digits.images.reshape(len(digits.images), -1)
    svc = svm.SVC(gamma=0.001).fit(x[:n], digits.target[:n]).score(x[n:], digits.target[n:])
    root = tmp_path_factory.mktemp("digits") / "digits"
    for i, (image, target) in enumerate(zip(digits.images, digits.target)):
        folder = root / ("train" if i < n else "val") / str(int(target))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "L").resize((32, 32), Image.BILINEAR).save(folder / f"{i:04d}.png")
    return root, svc


@pytest.mark.slow
def test_train_beats_the_sklearn_digits_example_svc(digits_example, tmp_path):
    data, svc = digits_example
    assert svc == pytest.approx(0.9689, abs=5e-4)
    run = tmp_path / "digits"
    result = _invoke("train", data, "--model", "resnet10t", "--epochs", "10", "--hflip", "0", "--out", run)
    assert result.exit_code == 0, result.stderr
    rows = metrics_rows(run)
    # the last epoch, not the best one: validation is the example's test half, so selecting on it
    # would flatter the score
    last = float(rows[-1]["val_accuracy"])
    assert last > svc, f"cnnxfer {last:.4f} vs SVC {svc:.4f}: {[r['val_accuracy'][:5] for r in rows]}"
    result = _invoke("evaluate", data / "val", "--weights", run, "--json", tmp_path / "digits.json")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "digits.json").read_text())["accuracy"] > svc


# ---------------------------------------------------------------- issue 10: runs a user can trust

def _interrupted_run(data: Path, run: Path, after_epoch: int = 1, **config) -> None:
    """A run stopped by Ctrl-C after `after_epoch` epochs (in this process: the interrupt path is
    the engine's own, a KeyboardInterrupt at the end of an epoch)."""

    def stop(row):
        if row["epoch"] == after_epoch:
            raise KeyboardInterrupt

    config = {"model": "test_resnet", "weights": "none", "epochs": 3, "img_size": 32, "batch_size": 8, "num_workers": 0,
              **config}
    with pytest.raises(KeyboardInterrupt):
        training.fit(TrainConfig(data=data, out=run, **config), training.FitHooks(on_epoch=stop))
    assert (run / "state.pt").is_file()


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"{path} never appeared: {proc.poll()}"


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_a_finetune_from_a_run_directory_resumes_after_ctrl_c(finished_run, tmp_path):
    """Issue 10.1: `finetune --weights RUN_DIR` leaves --model out; its resume must rebuild the same
    architecture (it said "--model is required ...", with or without --model / --weights added)."""
    data = write_colour_folder(tmp_path / "data", dict.fromkeys(COLOURS, 24))
    args = ["--weights", finished_run, "--strategy", "gradual", "--epochs", 5, "--img-size", 32, "--batch-size", 8,
            "--workers", 1, "--lr", "0.01"]
    run = tmp_path / "ft"
    proc = cnnxfer_process("finetune", data, "--out", run, *args, "--checkpoint-every", 0)
    _wait_for(run / "metrics.csv", proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert f"every finished epoch was kept - re-run with --resume {run} to continue" in stderr
    assert 1 <= len(metrics_rows(run)) < 5
    saved = json.loads((run / "config.json").read_text())["train_config"]
    assert saved["model"] == "test_resnet" and saved["weights"] == str(finished_run.resolve())
    # the same model and weights may be named again: they are the run's own
    proc = cnnxfer_process("finetune", "--resume", run, "--model", "test_resnet", "--weights", finished_run)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    whole = _invoke("finetune", data, "--out", tmp_path / "whole", *args)
    assert whole.exit_code == 0, whole.stderr
    assert without_seconds(metrics_rows(run)) == without_seconds(metrics_rows(tmp_path / "whole"))
    assert _same_weights(run, tmp_path / "whole")


SLOW_NET = """
import time
from torch import nn


class Slow(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, num_classes)

    def forward(self, x):
        if self.training:
            time.sleep(0.4)  # a long first epoch, for the interrupt to land in
        return self.fc(self.conv(x).relu().mean((2, 3)))


def build(num_classes=1000):
    return Slow(num_classes)
"""


@pytest.mark.slow
def test_ctrl_c_before_the_first_epoch_ends_then_resume_starts_the_run_again(colours, tmp_path):
    """Issue 10.2: it said "finished work was kept - re-run with --resume", then --resume said
    "nothing to resume" and the first command "already exists"."""
    (tmp_path / "slow.py").write_text(SLOW_NET)
    args = ["--model", f"{tmp_path / 'slow.py'}:build", "--epochs", 2, "--img-size", 32, "--batch-size", 8,
            "--workers", 0, "--checkpoint-every", 0]
    run = tmp_path / "run"
    _interrupted_run(colours, run)  # an older run in the folder, with a state.pt that is not this run's
    (run / "mine.txt").write_text("the user's")
    proc = cnnxfer_process("train", colours, "--out", run, *args, "--overwrite")
    deadline = time.monotonic() + 120  # --overwrite removes config.json, then state.pt, then writes config.json
    while ((run / "state.pt").exists() or not (run / "config.json").exists()) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # the run has started; its first epoch takes seconds
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert f"no epoch had finished - re-run with --resume {run} to start it again" in stderr
    assert not (run / "metrics.csv").exists() and not (run / "state.pt").exists()
    assert (run / "mine.txt").read_text() == "the user's"
    again = _invoke("train", colours, "--out", run, *args)  # the first command names the way on
    assert again.exit_code == 2 and f"--resume {run} to continue it" in again.stderr
    resumed = _invoke("train", "--resume", run)
    assert resumed.exit_code == 0, resumed.stderr
    assert "no epoch of the interrupted run had finished: it starts again from the beginning" in resumed.stderr
    whole = _invoke("train", colours, "--out", tmp_path / "whole", *args)
    assert whole.exit_code == 0, whole.stderr
    assert without_seconds(metrics_rows(run)) == without_seconds(metrics_rows(tmp_path / "whole"))
    assert _same_weights(run, tmp_path / "whole")
    assert json.loads((run / "config.json").read_text())["status"] == "finished"
    finished = _invoke("train", "--resume", run)
    assert finished.exit_code == 2 and "nothing to resume: the run finished" in finished.stderr


def test_resume_refuses_options_that_change_the_result_and_applies_where_to_run(colours, tmp_path):
    """Issue 10.3: `train --resume RUN --epochs 8 --lr 0.001` ran on with the saved settings, no word."""
    run = tmp_path / "run"
    _interrupted_run(colours, run, epochs=3)
    before = (run / "state.pt").read_bytes()
    result = _invoke("train", "--resume", run, "--epochs", 8, "--lr", "0.001", "--no-augment", "--device", "cpu")
    assert result.exit_code == 2
    assert "--epochs 8 (the run has 3)" in result.stderr and "--lr 0.001 (the run has the default)" in result.stderr
    assert "--no-augment (the run has --augment)" in result.stderr and "--device" not in result.stderr
    assert (run / "state.pt").read_bytes() == before and len(metrics_rows(run)) == 1  # nothing touched
    trained_in = json.loads((run / "config.json").read_text())["precision"]
    other = "fp32" if trained_in != "float32" else "bf16"
    result = _invoke("train", "--resume", run, "--precision", other)
    assert result.exit_code == 2 and f"the run trained in {trained_in}" in result.stderr
    # where and how to run: applied. The images moved to another folder are the same images.
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copytree(colours, moved / "data")
    result = _invoke("train", moved / "data", "--resume", run, "--device", "cpu", "--workers", 1, "--checkpoint-every", 0,
                     "--cache-images", "off", "--epochs", 3, "--model", "test_resnet")
    assert result.exit_code == 0, result.stderr
    recorded = json.loads((run / "config.json").read_text())["train_config"]
    assert (recorded["num_workers"], recorded["checkpoint_every"], recorded["cache_images"]) == (1, 0, "off")
    assert recorded["data"] == str((moved / "data").resolve()) and recorded["epochs"] == 3
    whole = training.fit(TrainConfig(data=colours, out=tmp_path / "whole", model="test_resnet", weights="none", epochs=3,
                                   img_size=32, batch_size=8, num_workers=0))
    assert without_seconds(metrics_rows(run)) == without_seconds(metrics_rows(whole.run_dir))
    assert _same_weights(run, whole.run_dir)


def test_resume_refuses_data_that_is_not_the_runs_images(tmp_path):
    data = write_colour_folder(tmp_path / "data", dict.fromkeys(COLOURS, 8))
    run = tmp_path / "run"
    _interrupted_run(data, run)
    (data / "red" / "000.png").unlink()  # the split, and with it every batch, would differ
    result = _invoke("train", "--resume", run)
    assert result.exit_code == 2 and "does not hold the images the run was trained on" in result.stderr


def test_an_empty_class_folder_is_left_out_with_a_warning_everywhere(tmp_path):
    """Issue 10.5: an empty class folder became a class in train, sanity-check (ln(5)), evaluate
    (a 0-support row in the macro average) and predict (offered in the top 3)."""
    data = write_colour_folder(tmp_path / "data", dict.fromkeys(COLOURS, 8))
    (data / "empty_class").mkdir()
    warning = f"class folder '{data / 'empty_class'}' holds no images (left out of the classes)"
    run = tmp_path / "run"
    result = _invoke("train", data, "--model", "test_resnet", "--epochs", 1, "--out", run, *FAST)
    assert result.exit_code == 0, result.stderr
    assert warning in result.stderr and json.loads((run / "config.json").read_text())["classes"] == sorted(COLOURS)
    result = _invoke("sanity-check", data, "--model", "test_resnet", "--img-size", 32, "--workers", 0,
                     "--only", "data,init_loss", "--json", tmp_path / "sanity.json")
    assert warning in result.stderr
    report = json.loads((tmp_path / "sanity.json").read_text())
    assert report["classes"] == sorted(COLOURS)
    init = next(c for c in report["checks"] if c["name"] == "init_loss")
    assert init["details"]["num_classes"] == 3 and init["details"]["expected"] == pytest.approx(np.log(3))
    result = _invoke("evaluate", data, "--weights", run, "--workers", 0, "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.stderr
    assert warning.replace(" (left out of the classes)", "") in result.stderr
    assert [r["class"] for r in json.loads((tmp_path / "eval.json").read_text())["per_class"]][:3] == sorted(COLOURS)
    result = _invoke("predict", data, "--weights", run, "--workers", 0, "--top-k", 5, "--out", tmp_path / "p.csv")
    assert result.exit_code == 0, result.stderr
    assert warning in result.stderr
    with open(tmp_path / "p.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert [c for c in header if c.endswith("_class")] == ["top1_class", "top2_class", "top3_class"]


def test_classes_too_small_to_validate_are_named_and_counts_leave_out_unreadable_files(tmp_path):
    """Issue 10.6: with 20 + 20 + 1 images the single one trained and validation never saw its
    class, unmentioned; the image counts included unreadable files."""
    data = write_colour_folder(tmp_path / "data", {"blue": 20, "green": 20, "red": 1})
    for i in range(3):
        (data / "blue" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    run = tmp_path / "run"
    result = _invoke("train", data, "--model", "test_resnet", "--epochs", 2, "--out", run, "--cache-images", "on", *FAST)
    assert result.exit_code == 0, result.stderr
    assert ("class(es) too small to split 80/20 for validation: red (1 image: none held out, so validation never sees it)"
            in result.stderr)
    assert "41 images decoded once into memory (3 unreadable file(s) skipped)" in result.stderr
    # readable images per class: blue's 23 files split 18/5 with the 3 unreadable among them
    counts = json.loads((run / "config.json").read_text())["class_counts"]
    assert counts["red"] == {"train": 1, "val": 0} and counts["green"] == {"train": 16, "val": 4}
    assert counts["blue"]["train"] + counts["blue"]["val"] == 20 and counts["blue"]["train"] <= 18
    table = result.stdout[result.stdout.index("per class"):]
    assert re.search(r"red\s*│\s*1\s*│\s*0", table) and re.search(r"green\s*│\s*16\s*│\s*4", table)
    train, val = sum(c["train"] for c in counts.values()), sum(c["val"] for c in counts.values())
    assert train + val == 41 and f"{train} train / {val} val" in result.stdout


SCRIPTED_NET = """
import torch
from torch import nn

# Validation logits per epoch for the 6 validation images, in order: blue, blue, green, green, red, red.
RIGHT = torch.eye(3)[[0, 0, 1, 1, 2, 2]]
ONE_WRONG = RIGHT.clone()
ONE_WRONG[0] = torch.tensor([0.0, 0.5, 0.0])
SCRIPT = [1.0 * RIGHT,  # epoch 1: every image right, unsure: accuracy 1.0, the highest loss
          torch.cat([ONE_WRONG[:1], 3.0 * RIGHT[1:]]),  # epoch 2: one wrong, the rest sure: 5/6, the lowest loss
          torch.cat([4.0 * ONE_WRONG[:1], 3.0 * RIGHT[1:]])]  # epoch 3: the same one confidently wrong


class Scripted(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.fc = nn.Linear(3, num_classes)
        self.validations = 0

    def forward(self, x):
        out = self.fc(x.mean((2, 3)))
        if self.training or len(x) != 6:
            return out
        self.validations += 1
        return SCRIPT[min(self.validations, len(SCRIPT)) - 1] + 0 * out


def build(num_classes=1000):
    return Scripted(num_classes)
"""


def test_the_best_epoch_and_patience_follow_one_stated_rule(colours, tmp_path):
    """Issue 10.7: best was the highest accuracy while --patience watched the loss, and nobody was
    told. Epoch 1 here has the best accuracy, epoch 2 the lowest loss, epoch 3 neither."""
    (tmp_path / "scripted.py").write_text(SCRIPTED_NET)
    run = tmp_path / "run"
    result = _invoke("train", colours, "--model", f"{tmp_path / 'scripted.py'}:build", "--epochs", 5, "--patience", 1,
                     "--out", run, *FAST)
    assert result.exit_code == 0, result.stderr
    rows = metrics_rows(run)
    accuracy, loss = [float(r["val_accuracy"]) for r in rows], [float(r["val_loss"]) for r in rows]
    assert accuracy == pytest.approx([1.0, 5 / 6, 5 / 6]) and loss[1] < min(loss[0], loss[2])  # the script as designed
    config = json.loads((run / "config.json").read_text())
    assert config["best"]["epoch"] == 2 and config["best_rule"] == "the lowest validation loss"
    assert re.search(r"best epoch\s*│\s*2 of 3, by the lowest validation loss \(stopped early", result.stdout)
    assert "lowest validation loss" in re.sub(r"[│\s]+", " ", _invoke("train", "--help").stdout)  # the --patience help
    assert "lowest validation loss" in (ROOT / "README.md").read_text()


def test_messages_name_only_the_commands_own_options_and_come_before_the_scan(finished_run, tmp_path):
    """Issue 10.8: predict offered --resume, train --weights; a missing --model came after the scan."""
    data = write_colour_folder(tmp_path / "data", dict.fromkeys(COLOURS, 4))
    (data / "empty_class").mkdir()  # the scan would warn about it
    result = _invoke("train", data, "--out", tmp_path / "run", *FAST)
    assert result.exit_code == 2 and "--model is required" in result.stderr
    assert "--weights" not in result.stderr and "holds no images" not in result.stderr
    result = _invoke("train", data, "--model", "resnt18", "--out", tmp_path / "run", *FAST)
    assert result.exit_code == 2 and "did you mean" in result.stderr and "holds no images" not in result.stderr
    result = _invoke("finetune", data, "--out", tmp_path / "run", *FAST)
    assert result.exit_code == 2 and "--model is required unless --weights is a cnnxfer run directory" in result.stderr
    out = tmp_path / "p.csv"
    out.write_text("keep")
    result = _invoke("predict", data, "--weights", finished_run, "--out", out)
    assert result.exit_code == 2 and "--overwrite" in result.stderr and "--resume" not in result.stderr
    result = _invoke("train", data, "--model", "test_resnet", "--out", finished_run, *FAST)
    assert result.exit_code == 2 and "--overwrite" in result.stderr and "--resume" not in result.stderr  # it finished


INTERRUPTING_NET = """
import os
import signal

from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, num_classes)

    def forward(self, x):
        if not self.training and os.environ.get("PRESS_CTRL_C"):
            os.kill(os.getpid(), signal.SIGINT)  # a user pressing Ctrl-C while predict computes
        return self.fc(self.conv(x).relu().mean((2, 3)))


def build(num_classes=1000):
    return Net(num_classes)
"""


def test_ctrl_c_in_a_command_without_resume_does_not_offer_it(colours, tmp_path):
    (tmp_path / "net.py").write_text(INTERRUPTING_NET)
    run = tmp_path / "run"
    result = _invoke("train", colours, "--model", f"{tmp_path / 'net.py'}:build", "--epochs", 1, "--out", run, *FAST)
    assert result.exit_code == 0, result.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PRESS_CTRL_C="1")
    proc = subprocess.run([sys.executable, "-m", "cnnxfer", "predict", str(colours), "--weights", str(run), "--out",
                           str(tmp_path / "p.csv"), "--workers", "0"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted (Ctrl-C)" in proc.stderr and "--resume" not in proc.stderr
