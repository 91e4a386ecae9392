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
