"""Several processes on one machine (torchrun, gloo on loopback): the same results as one process.

Every test here starts real `python -m torch.distributed.run --standalone` jobs on this CPU, with
a timeout, so a hang fails the test instead of the suite.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cnnxfer import ExtractConfig, distributed, extract_features, read_features

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240


def _env() -> dict:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", PYTHONPATH=str(ROOT),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID"):
        env.pop(name, None)
    return env


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "cnnxfer", *map(str, args)]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=TIMEOUT, check=False)


def _children(pid: int) -> list[int]:
    """The process ids whose parent is `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


# ---------------------------------------------------------------- the environment

def test_rank_and_world_come_from_torchrun_or_slurm():
    assert distributed.from_environment({}) == distributed.Dist()
    assert distributed.from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == distributed.Dist(3, 4, 1)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert distributed.from_environment(slurm) == distributed.Dist(5, 8, 1)
    assert not distributed.from_environment({"WORLD_SIZE": "1", "RANK": "0"}).enabled
    assert distributed.my_share(list(range(7)), distributed.Dist(1, 3, 1)) == [1, 4]


# ---------------------------------------------------------------- extraction

@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    from conftest import _make_images

    root = tmp_path_factory.mktemp("dist") / "ds"
    _make_images(root, {"a": 45, "b": 44}, size=(64, 48))
    (root / "b" / "broken.jpg").write_bytes(b"not an image")
    return root


def _extract_args(data: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", data, "--model", "resnet10t", "--weights", weights, "--img-size", "64", "--precision", "fp32",
            "--batch-size", "3", "--part-size", "6", "--workers", "1", "--out", out, *extra]


def test_sharded_extract_equals_one_process(tmp_path, many_images, resnet10t_weights):
    one = extract_features(ExtractConfig(data=many_images, out=tmp_path / "one.parquet", model="resnet10t",
                                         weights=str(resnet10t_weights), img_size=64, precision="fp32", batch_size=3,
                                         part_size=6, num_workers=1))
    start = time.perf_counter()
    result = run(torchrun(2, *_extract_args(many_images, resnet10t_weights, tmp_path / "two.parquet")))
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"2 processes: {time.perf_counter() - start:.1f} s wall")
    a, b = read_features(one.out), read_features(tmp_path / "two.parquet")
    assert a[0] == b[0] and a[1] == b[1] and len(a[0]) == 89  # same rows in the same order
    np.testing.assert_allclose(a[2], b[2], atol=1e-5)
    assert (tmp_path / "two.skipped.csv").read_text() == (tmp_path / "one.skipped.csv").read_text()
    assert result.stdout.count("columns") == 1  # one summary: rank 0 alone prints


def test_a_killed_rank_then_resume_with_2_and_3_processes(tmp_path, many_images, resnet10t_weights):
    reference = tmp_path / "ref.parquet"
    extract_features(ExtractConfig(data=many_images, out=reference, model="resnet10t", weights=str(resnet10t_weights),
                                   img_size=64, precision="fp32", batch_size=3, part_size=6, num_workers=1))
    for nproc in (2, 3):
        out = tmp_path / f"out{nproc}.parquet"
        parts = out.with_name(out.name + ".parts")
        proc = subprocess.Popen(torchrun(2, *_extract_args(many_images, resnet10t_weights, out)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        deadline = time.monotonic() + TIMEOUT
        while len(list(parts.glob("part-*.json"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        workers = _children(proc.pid)
        assert proc.poll() is None and workers, "finished before a rank could be killed"
        os.kill(workers[-1], signal.SIGKILL)
        proc.communicate(timeout=TIMEOUT)
        assert proc.returncode != 0 and not out.exists()
        finished = {p.name: p.read_bytes() for p in parts.glob("part-*")}
        assert any(name.endswith(".json") for name in finished)
        mtimes = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*")}
        result = run(torchrun(nproc, *_extract_args(many_images, resnet10t_weights, out, "--resume")))
        assert result.returncode == 0, result.stderr[-3000:]
        a, b = read_features(reference), read_features(out)
        assert a[0] == b[0] and a[1] == b[1]
        np.testing.assert_allclose(a[2], b[2], atol=1e-5)
        assert not parts.exists()
        assert mtimes  # finished parts were reused, not rewritten: the resume embedded the rest only
        assert f"resumed" in result.stdout or "images" in result.stdout


# ---------------------------------------------------------------- training

NET = '''
import torch.nn as nn


def build(num_classes: int) -> nn.Module:
    """A small CNN without BatchNorm: one process and several see the same numbers."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(16, num_classes),
    )
'''


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("net") / "net.py"
    path.write_text(NET)
    return f"{path}:build"


@pytest.fixture(scope="module")
def odd_colours(tmp_path_factory) -> Path:
    """3 classes x 13 noisy colour PNGs: a 20% split holds out 3 of each, 9 in all (odd)."""
    from helpers import write_colour_folder

    return write_colour_folder(tmp_path_factory.mktemp("odd") / "data", {"blue": 13, "green": 13, "red": 13})


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path, atol: float = 2e-5) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch_allclose = np.allclose(wa[k].numpy(), wb[k].numpy(), atol=atol, rtol=1e-4)
        assert torch_allclose, (k, float(np.abs(wa[k].numpy() - wb[k].numpy()).max()))


def _metrics(run: Path):
    import pandas as pd

    return pd.read_csv(run / "metrics.csv")


def _one_process(data: Path, out: Path, **options):
    from cnnxfer import TrainConfig, fit

    return fit(TrainConfig(data=data, out=out, precision="fp32", num_workers=0, checkpoint_every=0, **options))


def _fit_args(command: str, data: Path, out: Path, *extra) -> list[str]:
    return [command, data, "--out", out, "--precision", "fp32", "--workers", "0", "--checkpoint-every", "0", *extra]


@pytest.mark.parametrize("strategy", ["full", "gradual"])
def test_data_parallel_training_equals_one_process(tmp_path, odd_colours, net, strategy):
    """Global batch 8 over 2 processes (4 each) vs one process at 8: the same weights, the same
    validation counts and metrics (9 validation images: 5 on one rank, 4 on the other); gradual
    crosses two unfreeze boundaries (the newly unfrozen parameters must be synchronised)."""
    start_weights = str(_initial_weights(tmp_path, net)) if strategy == "gradual" else "none"
    options = dict(model=net, weights=start_weights, strategy=strategy, epochs=3, batch_size=8, augment=False,
                   label_smoothing=0.0, optimizer="sgd", lr=0.05)
    one = _one_process(odd_colours, tmp_path / "one", **options)
    extra = ["--model", net, "--epochs", "3", "--batch-size", "8", "--no-augment", "--label-smoothing", "0",
             "--optimizer", "sgd", "--lr", "0.05"]
    command = "train" if strategy == "full" else "finetune"
    if strategy == "gradual":
        extra += ["--weights", start_weights, "--strategy", "gradual"]
    start = time.perf_counter()
    result = run(torchrun(2, *_fit_args(command, odd_colours, tmp_path / "two", *extra)))
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"{strategy}: 2 processes {seconds:.1f} s wall (imports included), 1 process {one.seconds:.1f} s")
    _assert_same_weights(tmp_path / "one", tmp_path / "two")
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert list(b["epoch"]) == [1, 2, 3]  # one row per epoch: rank 0 alone writes
    np.testing.assert_allclose(a[["train_loss", "val_loss", "val_accuracy"]], b[["train_loss", "val_loss", "val_accuracy"]],
                               atol=1e-4)
    assert list(a["phase"]) == list(b["phase"])
    if strategy == "gradual":  # the backbone unfreezes during the run: DDP is built again for it
        assert b["phase"][0] == "head" and len(set(b["phase"])) == 3
    import json

    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["val_images"] == 9 == one.val_images and config["world_size"] == 2


def _initial_weights(tmp_path: Path, net: str) -> Path:
    """The same starting weights for both gradual runs (finetune needs --weights)."""
    import torch
    from safetensors.torch import save_file

    from cnnxfer import models

    path = tmp_path / "start.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        model = models.build_architecture(net, 3)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_linear_with_cached_features_over_two_processes(tmp_path, odd_colours, test_resnet_weights):
    """Linear (the probe) on a timm model: features computed in shards, gathered, the probe fitted
    on all of them on every rank; the run directory loads into a bare timm model."""
    import timm

    options = dict(model="test_resnet", weights=str(test_resnet_weights), strategy="linear", epochs=3, batch_size=8,
                   img_size=32)
    _one_process(odd_colours, tmp_path / "one", **options)
    result = run(torchrun(2, *_fit_args("finetune", odd_colours, tmp_path / "two", "--model", "test_resnet", "--weights",
                                        test_resnet_weights, "--strategy", "linear", "--epochs", "3", "--batch-size", "8",
                                        "--img-size", "32")))
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-4)
    model = timm.create_model("test_resnet", num_classes=3)
    model.load_state_dict(_weights(tmp_path / "two"))  # strict: no "module." prefixes, nothing missing
    assert list(_metrics(tmp_path / "two")["phase"]) == ["probe"]  # the exact probe: no epochs


def test_exit_code_is_the_rank_that_failed_not_the_one_the_launcher_stopped():
    from types import SimpleNamespace as F

    # rank 1 failed with 2; the launcher then stopped rank 0 (SIGTERM), which can be seen first
    assert distributed._first_failure({0: F(exitcode=143), 1: F(exitcode=2)}) == 2
    assert distributed._first_failure({0: F(exitcode=-15), 1: F(exitcode=2)}) == 2
    assert distributed._first_failure({0: F(exitcode=2), 1: F(exitcode=1)}) == 2
    assert distributed._first_failure({1: F(exitcode=-9), 0: F(exitcode=-15)}) == 137
    assert distributed._first_failure({0: F(exitcode=143), 1: F(exitcode=143)}) == 143


def test_batch_that_does_not_divide_is_refused_with_exit_2(tmp_path, odd_colours, net):
    cmd = [sys.executable, "-m", "cnnxfer", *map(str, _fit_args("train", odd_colours, tmp_path / "r", "--model", net,
                                                                 "--batch-size", "7", "--nproc", "2"))]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=TIMEOUT, check=False)
    assert result.returncode == 2, result.stderr[-3000:]  # --nproc passes on the first failed rank's exit code
    assert "--batch-size 7" in result.stderr and "divide" in result.stderr


def test_a_run_resumes_with_another_number_of_processes(tmp_path, odd_colours, net):
    """Interrupted in one process after epoch 2, resumed with 2: the same as one uninterrupted
    process (global batches and augmentation do not depend on the number of processes)."""
    from cnnxfer import FitHooks, TrainConfig, fit

    options = dict(model=net, weights="none", epochs=4, batch_size=4, optimizer="sgd", lr=0.05, precision="fp32",
                   num_workers=0, checkpoint_every=0)
    fit(TrainConfig(data=odd_colours, out=tmp_path / "whole", **options))

    def stop(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(TrainConfig(data=odd_colours, out=tmp_path / "cut", **options), FitHooks(on_epoch=stop))
    resumed = run(torchrun(2, "train", "--resume", tmp_path / "cut"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(tmp_path / "whole", tmp_path / "cut")


def test_a_killed_rank_then_resume_equals_an_uninterrupted_run(tmp_path, odd_colours, net):
    """SIGKILL a worker after the first epoch was saved; --resume with 2 processes finishes equal to
    an uninterrupted 2-process run."""
    extra = ["--model", net, "--epochs", "6", "--batch-size", "4", "--no-augment", "--optimizer", "sgd", "--lr", "0.05"]
    whole = run(torchrun(2, *_fit_args("train", odd_colours, tmp_path / "whole", *extra)))
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = tmp_path / "cut"
    proc = subprocess.Popen(torchrun(2, *_fit_args("train", odd_colours, cut, *extra)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
        if (cut / "metrics.csv").exists() and len((cut / "metrics.csv").read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    workers = _children(proc.pid)
    assert proc.poll() is None and workers, "finished before a rank could be killed"
    os.kill(workers[-1], signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode != 0 and (cut / "state.pt").exists()
    resumed = run(torchrun(2, "train", "--resume", cut))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(tmp_path / "whole", cut)
    a, b = _metrics(tmp_path / "whole"), _metrics(cut)
    assert list(b["epoch"]) == list(range(1, 7))
    np.testing.assert_allclose(a[["train_loss", "val_loss"]], b[["train_loss", "val_loss"]], atol=1e-5)


def test_nproc_runs_the_command_under_torchrun_and_unreadable_images_do_not_hang(tmp_path, net):
    """--nproc 2 through the CLI, with unreadable files that leave one process a batch slice with
    no image: the step is skipped on both (a rank that skipped alone would wait forever)."""
    from helpers import write_colour_folder

    data = write_colour_folder(tmp_path / "data", {"blue": 6, "red": 6})
    for i in range(4):  # sorted last in blue/: with no shuffle they would fill one slice; shuffled, some batch meets them
        (data / "blue" / f"zz{i}.png").write_bytes(b"not a png")
    env = _env()
    cmd = [sys.executable, "-m", "cnnxfer", *map(str, _fit_args("train", data, tmp_path / "run", "--model", net, "--epochs", "3",
                                                                 "--batch-size", "4", "--val-split", "0", "--nproc", "2"))]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory") == 1  # one summary: rank 0 alone prints
    skipped = (tmp_path / "run" / "skipped.csv").read_text().splitlines()
    assert len(skipped) == 1 + 4  # every rank's unreadable files, listed once


def test_sigterm_to_one_rank_ends_the_job_with_143_and_keeps_the_epochs(tmp_path, odd_colours, net):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "cnnxfer", *map(str, _fit_args("train", odd_colours, run_dir, "--model", net, "--epochs",
                                                                 "200", "--batch-size", "4", "--nproc", "2"))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + TIMEOUT
    while not (run_dir / "state.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    launcher = [pid for pid in _children(proc.pid)]  # cnnxfer -> its torchrun agent's workers
    workers = [w for pid in launcher for w in _children(pid)] or launcher
    assert proc.poll() is None and workers
    os.kill(workers[-1], signal.SIGTERM)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143, stderr[-3000:]
    assert (run_dir / "state.pt").exists() and "--resume" in stderr


def test_predict_and_evaluate_over_two_processes_equal_one(tmp_path, odd_colours, net):
    """9 + 30 images over 2 processes: every image once, the same CSV and the same metrics."""
    import json

    import pandas as pd

    _one_process(odd_colours, tmp_path / "run", model=net, weights="none", epochs=1, batch_size=8)
    common = ["--weights", tmp_path / "run", "--precision", "fp32", "--batch-size", "5"]
    for n, suffix in ((1, "one"), (2, "two")):
        head = [sys.executable, "-m", "cnnxfer"]
        tail = ["--nproc", str(n)]
        pred = subprocess.run([*head, "predict", str(odd_colours), "--out", str(tmp_path / f"{suffix}.csv"),
                               *map(str, common), *tail], capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
        assert pred.returncode == 0, pred.stderr[-3000:]
        ev = subprocess.run([*head, "evaluate", str(odd_colours), "--json", str(tmp_path / f"{suffix}.json"),
                             *map(str, common), *tail], capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
        assert ev.returncode == 0, ev.stderr[-3000:]
    a, b = pd.read_csv(tmp_path / "one.csv"), pd.read_csv(tmp_path / "two.csv")
    assert list(a["path"]) == list(b["path"]) and len(b) == 39 and list(a["prediction"]) == list(b["prediction"])
    np.testing.assert_allclose(a["probability"], b["probability"], atol=1e-5)
    ja, jb = (json.loads((tmp_path / f"{s}.json").read_text()) for s in ("one", "two"))
    assert ja["images"] == jb["images"] == 39 and ja["confusion_matrix"] == jb["confusion_matrix"]
    assert ja["accuracy"] == pytest.approx(jb["accuracy"]) and ja["loss"] == pytest.approx(jb["loss"], abs=1e-5)
