"""`cnnxfer extract` (and every command's --help) through the real CLI: exit codes, files, messages."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import typer

from cnnxfer import read_features
from cnnxfer.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> dict:
    return typer.main.get_command(app).commands


def _fast(weights: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "test_resnet", "--weights", str(weights), "--img-size", "32", "--workers", "0",
            "--precision", "fp32", "--out", str(out), *extra]


def _offline_env(tmp_path: Path, offline: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"), PYTHONPATH=str(ROOT))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


# ---------------------------------------------------------------- help

def _all_commands(group, prefix=()) -> list[tuple[tuple[str, ...], object]]:
    """(words, command) for every command and group, sub-commands (`inspect filters`) included."""
    out = []
    for name, command in group.commands.items():
        out.append(((*prefix, name), command))
        if hasattr(command, "commands"):
            out += _all_commands(command, (*prefix, name))
    return out


def test_every_command_has_help_with_an_example(cli_runner):
    commands = _all_commands(typer.main.get_command(app))
    names = {" ".join(words) for words, _ in commands}
    assert {"info", "extract", "report", "inspect", "inspect filters", "inspect errors"} <= names
    top = cli_runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    for words, command in commands:
        parent = cli_runner.invoke(app, [*words[:-1], "--help"])
        assert words[-1] in parent.stdout, words
        result = cli_runner.invoke(app, [*words, "--help"])
        assert result.exit_code == 0, (words, result.output)
        first_line = (command.help or "").strip().splitlines()[0]
        assert len(first_line) > 20 and first_line[:30] in " ".join(result.stdout.split()), words
        assert "Example: cnnxfer " + " ".join(words) in " ".join(result.stdout.split()), words


HEAVY = ("torch", "numpy", "PIL", "pandas", "pyarrow", "matplotlib", "timm")
_PROBE = """
import sys
from cnnxfer.cli import app
try:
    app(sys.argv[1:], prog_name="cnnxfer")
except SystemExit as exc:
    code = exc.code
print(code, *[m for m in {heavy!r} if m in sys.modules], file=sys.stderr)
"""


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["extract", "--help"], 0), (["train", "--help"], 0),
                                        (["sanity-check", "--help"], 0), (["extract"], 2), (["train", "--epochs", "x"], 2)])
def test_help_and_usage_errors_do_not_import_torch(args, code):
    """Help, usage and option errors answer in a fraction of a second: torch, numpy, Pillow and
    pandas are imported by the commands that run, not by the CLI module."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), *args], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.stderr.strip().splitlines()[-1].split() == [str(code)], proc.stderr


def test_the_python_api_loads_on_first_use():
    code = ("import sys, cnnxfer\n"
            "assert 'torch' not in sys.modules\n"
            "from cnnxfer import fit, TrainConfig, extract_features, CnnxferError\n"
            "assert 'torch' in sys.modules and callable(fit)\n"
            "assert all(getattr(cnnxfer, name) is not None for name in cnnxfer.__all__)\n"
            "assert set(cnnxfer.__all__) <= set(dir(cnnxfer))\n"
            "try:\n    cnnxfer.no_such_name\nexcept AttributeError as exc:\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no attribute 'no_such_name'" in proc.stdout


def test_every_option_has_help_and_arguments_read_alike(cli_runner):
    """Every option says what it does, and the usage line writes arguments one way: DATA when
    required, [DATA] when it may be left out."""
    for name, command in _commands().items():
        assert [p.opts[0] for p in command.params if not p.help] == [], name
        usage = " ".join(cli_runner.invoke(app, [name, "--help"]).stdout.split()[:6])
        assert "{" not in usage and ("[DATA]" in usage) == (name in ("train", "finetune", "audit")), usage
    assert "IMAGES" in cli_runner.invoke(app, ["predict", "--help"]).stdout
    train_model = next(p for p in _commands()["train"].params if p.name == "model")
    assert train_model.help.startswith("Required, except with --resume")


def test_no_arguments_shows_help(cli_runner):
    result = cli_runner.invoke(app, [])
    assert "extract" in result.output and result.exit_code in (0, 2)


# ---------------------------------------------------------------- extract end to end

def test_extract_writes_parquet_and_a_summary(cli_runner, tmp_path, tiny_folder, test_resnet_weights):
    out = tmp_path / "feats.parquet"
    result = cli_runner.invoke(app, ["extract", str(tiny_folder), *_fast(test_resnet_weights, out)])
    assert result.exit_code == 0, result.output
    _, labels, matrix = read_features(out)
    assert labels == ["cat"] * 3 + ["dog"] * 3 and matrix.shape == (6, 96)
    assert "6" in result.stdout and "embedding [96]" in result.stdout and "cpu / float32" in result.stdout
    assert not (tmp_path / "feats.skipped.csv").exists()


def test_extract_options_reach_the_output(cli_runner, tmp_path, tiny_folder, test_resnet_weights):
    out = tmp_path / "opts.parquet"
    args = _fast(test_resnet_weights, out, "--layers", "layer1, 3", "--pool", "max", "--tta", "flip", "-b", "4")
    result = cli_runner.invoke(app, ["extract", str(tiny_folder), *args])
    assert result.exit_code == 0, result.output
    schema = pq.read_schema(out)
    assert schema.names == ["path", "label", "embedding", "embedding_layer1", "embedding_layer3"]
    meta = json.loads(schema.metadata[b"cnnxfer"])
    assert meta["pool"] == "max" and meta["tta"] == "flip" and meta["config"]["batch_size"] == 4


def test_existing_output_exits_2_and_is_untouched(cli_runner, tmp_path, tiny_folder, test_resnet_weights):
    out = tmp_path / "feats.parquet"
    args = ["extract", str(tiny_folder), *_fast(test_resnet_weights, out)]
    assert cli_runner.invoke(app, args).exit_code == 0
    blob, mtime = out.read_bytes(), out.stat().st_mtime_ns
    time.sleep(0.01)
    result = cli_runner.invoke(app, args)
    assert result.exit_code == 2
    assert "already exists" in result.stderr and "--overwrite" in result.stderr and "Traceback" not in result.output
    assert out.read_bytes() == blob and out.stat().st_mtime_ns == mtime
    result = cli_runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0 and out.stat().st_mtime_ns != mtime


def test_dirty_folder_exit_0_with_skip_list_and_strict_exit_1(cli_runner, tmp_path, dirty_folder, test_resnet_weights):
    out = tmp_path / "dirty.parquet"
    result = cli_runner.invoke(app, ["extract", str(dirty_folder.root), *_fast(test_resnet_weights, out)])
    assert result.exit_code == 0, result.output
    # the default Pillow limit lets the two small "bombs" through; the other broken files are skipped
    broken = [p for p, reason in dirty_folder.skipped.items() if "pixels" not in reason]
    assert len(read_features(out)[0]) == len(dirty_folder.valid) + 2
    skip_csv = tmp_path / "dirty.skipped.csv"
    assert len(skip_csv.read_text(encoding="utf-8").splitlines()) == 1 + len(broken)
    assert "skipped" in result.stdout and "holds no images" in result.stderr and "empty" in result.stderr
    result = cli_runner.invoke(app, ["extract", str(dirty_folder.root), *_fast(test_resnet_weights, out), "--overwrite", "--strict"])
    assert result.exit_code == 1 and "--strict" in result.stderr



def test_max_image_pixels_option_skips_the_bombs_and_says_how_to_read_them(cli_runner, tmp_path, dirty_folder, test_resnet_weights):
    out = tmp_path / "dirty.parquet"
    result = cli_runner.invoke(app, ["extract", str(dirty_folder.root), *_fast(test_resnet_weights, out),
                                     "--max-image-pixels", str(dirty_folder.max_image_pixels)])
    assert result.exit_code == 0, result.output
    assert len(read_features(out)[0]) == len(dirty_folder.valid)
    rows = (tmp_path / "dirty.skipped.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert len(rows) == len(dirty_folder.skipped)
    bombs = [r for r in rows if "too many pixels" in r]
    assert len(bombs) == 2 and all("--max-image-pixels" in r for r in bombs)

def _phone_folder(root: Path) -> Path:
    """What a phone's camera folder holds: a big JPEG stored landscape with EXIF orientation 6, an
    iPhone .HEIC, an AVIF, a PNG screenshot, plus a camera RAW and an SVG that nothing here decodes."""
    import numpy as np
    import pillow_heif
    from PIL import Image

    pillow_heif.register_heif_opener()
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).resize((1600, 1200), Image.BICUBIC)
    folder = root / "camera"
    folder.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(folder / "IMG_0001.JPG", quality=90, exif=exif.tobytes())
    base.save(folder / "IMG_0002.HEIC", quality=90)
    base.save(folder / "IMG_0003.avif", quality=90)
    base.save(folder / "Screenshot.png")
    (folder / "DSC_0004.NEF").write_bytes(b"II*\x00" + bytes(64))
    (folder / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    return root


def test_phone_folder_heic_avif_and_unreadable_formats_listed(cli_runner, tmp_path, test_resnet_weights):
    """HEIC and AVIF photos are read; a RAW file and an SVG are skipped, listed with what to do."""
    root = _phone_folder(tmp_path / "phone")
    out = tmp_path / "phone.parquet"
    result = cli_runner.invoke(app, ["extract", str(root), *_fast(test_resnet_weights, out)])
    assert result.exit_code == 0, result.output
    paths, labels, _ = read_features(out)
    assert sorted(Path(p).name for p in paths) == ["IMG_0001.JPG", "IMG_0002.HEIC", "IMG_0003.avif", "Screenshot.png"]
    rows = (tmp_path / "phone.skipped.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert len(rows) == 2
    assert any("DSC_0004.NEF" in r and "camera RAW" in r for r in rows)
    assert any("logo.svg" in r and "rasterise" in r for r in rows)


def test_reduced_decode_embeddings_agree_with_full_decode(tmp_path, resnet10t_weights):
    """Embeddings of large photos decoded at the working resolution vs every pixel: cosine >= 0.9999
    (benchmarks/photos.py measured min 0.99999 with random weights, 0.99997 for a fine-tuned resnet18)."""
    import numpy as np

    from cnnxfer import ExtractConfig, extract_features

    root = _phone_folder(tmp_path / "phone")
    out = {}
    for reduced in (True, False):
        path = tmp_path / f"{reduced}.parquet"
        extract_features(ExtractConfig(data=root, out=path, model="resnet10t", weights=str(resnet10t_weights),
                                       precision="fp32", reduced_decode=reduced))
        out[reduced] = read_features(path)
    assert out[True][0] == out[False][0] and len(out[True][0]) == 4
    a, b = out[True][2], out[False][2]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.9999, cos


def test_csv_manifest_input(cli_runner, tmp_path, make_images, test_resnet_weights):
    make_images(tmp_path / "imgs", {"a": 2})
    (tmp_path / "list.csv").write_text("path,label\nimgs/a/img0.jpg,yes\nimgs/a/img1.jpg,no\n")
    out = tmp_path / "m.parquet"
    result = cli_runner.invoke(app, ["extract", str(tmp_path / "list.csv"), *_fast(test_resnet_weights, out)])
    assert result.exit_code == 0, result.output
    assert read_features(out)[1] == ["yes", "no"]


# ---------------------------------------------------------------- bad input: exit 2, one clear line

class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_pickle_with_code_is_refused(cli_runner, tmp_path, tiny_folder):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": _RunsCode(marker)}, evil)
    out = tmp_path / "o.parquet"
    result = cli_runner.invoke(app, ["extract", str(tiny_folder), *_fast(evil, out)])
    assert result.exit_code == 2 and "refusing to load" in result.stderr
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_empty_or_truncated_weights_are_corrupt(cli_runner, tmp_path, tiny_folder, test_resnet_weights, suffix):
    for name, blob in (("empty", b""), ("cut", test_resnet_weights.read_bytes()[:5000])):
        weights = tmp_path / f"{name}{suffix}"
        weights.write_bytes(blob)
        result = cli_runner.invoke(app, ["extract", str(tiny_folder), *_fast(weights, tmp_path / "o.parquet")])
        assert result.exit_code == 2, result.output
        assert "corrupt weights file" in result.stderr and "Traceback" not in result.output


def test_wrong_architecture_weights(cli_runner, tmp_path, tiny_folder, timm_weights):
    weights = timm_weights("test_efficientnet")
    result = cli_runner.invoke(app, ["extract", str(tiny_folder), *_fast(weights, tmp_path / "o.parquet")])
    assert result.exit_code == 2
    assert "do not fit the model" in result.stderr and "missing:" in result.stderr and "unexpected:" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "resnt50", "--weights", "none"], "did you mean"),
    (["--model", "nothere.py:make", "--weights", "none"], "does not exist"),
    (["--weights", "none"], "--model is required"),
    (["--model", "test_resnet", "--weights", "none", "--device", "gpu"], "unknown device 'gpu'"),
    (["--model", "test_resnet", "--weights", "none", "--layers", "layer9"], "unknown layer 'layer9'"),
    (["--model", "test_resnet", "--weights", "none", "--precision", "fp16", "--device", "cpu"], "fp16"),
])
def test_bad_options_exit_2_with_a_clear_message(cli_runner, tmp_path, tiny_folder, args, message):
    result = cli_runner.invoke(app, ["extract", str(tiny_folder), "--out", str(tmp_path / "o.parquet"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "o.parquet").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
def test_cuda_on_a_cpu_machine_exits_2(cli_runner, tmp_path, tiny_folder):
    result = cli_runner.invoke(app, ["extract", str(tiny_folder), "--model", "test_resnet", "--weights", "none",
                                     "--device", "cuda", "--out", str(tmp_path / "o.parquet")])
    assert result.exit_code == 2 and "cuda is not available" in result.stderr


def test_missing_input_exits_2(cli_runner, tmp_path):
    result = cli_runner.invoke(app, ["extract", str(tmp_path / "nope"), "--model", "test_resnet"])
    assert result.exit_code == 2 and "Usage:" in result.output and "Traceback" not in result.output


def _skip_if_hub_reachable(offline: bool) -> None:
    from cnnxfer.models import _hub_reachable

    if not offline and _hub_reachable(2.0):
        pytest.skip("the hub is reachable from this machine")


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE=1", "no-network"])
def test_hub_without_network_fails_fast_and_names_weights(cli_runner, tmp_path, monkeypatch, tiny_folder, offline):
    _skip_if_hub_reachable(offline)
    for key, value in _offline_env(tmp_path, offline).items():
        monkeypatch.setenv(key, value)
    if not offline:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = tmp_path / "o.parquet"
    start = time.perf_counter()
    result = cli_runner.invoke(app, ["extract", str(tiny_folder), "--model", "resnet10t", "--out", str(out)])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 2, result.output
    assert "--weights" in result.stderr and "Traceback" not in result.output
    assert elapsed < 10, f"took {elapsed:.1f} s (timm's download retries?)"
    assert not out.exists()


def test_hub_without_network_in_a_fresh_process(tmp_path, tiny_folder):
    """The same from a new interpreter (huggingface_hub reads its environment at import)."""
    _skip_if_hub_reachable(False)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cnnxfer", "extract", str(tiny_folder), "--model", "resnet10t",
                           "--out", str(tmp_path / "o.parquet")], capture_output=True, text=True,
                          env=_offline_env(tmp_path, False), timeout=120, check=False)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2 and "--weights" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # imports included (slow on a busy 2-core machine); timm's retries alone would take ~45 s
    assert elapsed < 30, f"took {elapsed:.1f} s"


# ---------------------------------------------------------------- signals

@pytest.mark.parametrize("sig, code, when", [(signal.SIGINT, 130, "start"), (signal.SIGTERM, 143, "mid-part")])
def test_signal_exit_code_then_resume(tmp_path, make_images, resnet10t_weights, sig, code, when):
    """A signal before any part finished: "run the same command again" (and it works); after one:
    "--resume" (and it works). Either way the unfinished part is dropped."""
    make_images(tmp_path / "ds", {"a": 16, "b": 16})
    out = tmp_path / "s.parquet"
    args = [sys.executable, "-m", "cnnxfer", "extract", str(tmp_path / "ds"), "--model", "resnet10t",
            "--weights", str(resnet10t_weights), "--img-size", "64", "--out", str(out), "-b", "2", "--part-size", "8"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_offline_env(tmp_path, True))
    parts = tmp_path / "s.parquet.parts"
    deadline = time.monotonic() + 60

    def ready() -> bool:
        # "start": the job is written just before the loader starts (a signal then used to be lost
        # in a loader's fork); "mid-part": one part finished and the next one is being written
        if when == "start":
            return (parts / "job.json").exists()
        return bool(list(parts.glob("part-*.json"))) and bool(list(parts.glob("part-*.tmp")))

    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "finished before the signal; use more images"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and not out.exists()
    assert not list(parts.glob("*.tmp"))  # the unfinished part is dropped
    finished = bool(list(parts.glob("part-*.json")))
    if finished:
        assert "--resume" in stderr, stderr
    else:
        assert "run the same command again" in stderr, stderr
    again = subprocess.run([*args, "--resume"] if finished else args, capture_output=True, text=True,
                           env=_offline_env(tmp_path, True), timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    assert len(read_features(out)[0]) == 32 and not parts.exists()
    if when == "mid-part":
        assert finished and "from the interrupted run" in again.stdout


# ---------------------------------------------------------------- messages a new user tripped on

def test_an_empty_folder_says_no_images_not_no_class_folders(cli_runner, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli_runner.invoke(app, ["extract", str(tmp_path / "empty"), "--model", "test_resnet", "--weights", "none",
                                     "--out", str(tmp_path / "f.parquet")])
    assert result.exit_code == 2 and "no images found" in result.stderr and "class folders" not in result.stderr


def test_a_resume_with_other_options_names_them(tmp_path, make_images, test_resnet_weights, cli_runner):
    from cnnxfer.config import ExtractConfig
    from cnnxfer.features import extract_features

    make_images(tmp_path / "ds", {"a": 4, "b": 4})
    out = tmp_path / "f.parquet"

    def interrupt(done, total):
        if done >= 4:
            raise KeyboardInterrupt  # after the first part of 4 images

    with pytest.raises(KeyboardInterrupt):
        extract_features(ExtractConfig(data=tmp_path / "ds", out=out, model="test_resnet", weights=str(test_resnet_weights),
                                       img_size=32, num_workers=0, batch_size=2, part_size=4, precision="fp32"), interrupt)
    assert (tmp_path / "f.parquet.parts" / "part-000000.json").exists()  # the first part finished
    result = cli_runner.invoke(app, ["extract", str(tmp_path / "ds"), *_fast(test_resnet_weights, out, "--resume",
                                                                              "--tta", "flip", "--layers", "layer1")])
    assert result.exit_code == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "--tta none -> flip" in message and "--layers (none) -> layer1" in message and "--pool" not in message
