"""Run-directory I/O with atomic writes.

Every file is written to a temporary name in the same folder and moved into place with
`os.replace`, so a kill at any moment leaves either the previous complete file or the new one.
A run directory holds `model.safetensors` (timm key names) + `config.json`, and `state.pt`
(optimizer, scheduler, scaler, RNG) for `--resume`. No pickle of arbitrary objects anywhere:
`state.pt` holds only tensors and plain containers and is read with `weights_only=True`.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Iterator

from .errors import CnnxferError, OutputExistsError

MODEL_FILE = "model.safetensors"
PROBE_FILE = "probe.safetensors"  # --strategy auto: the probe's weights while fine-tuning runs (rundir.save_probe)
CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed.

    The result has the mode any program would give a new file under the user's umask (0644 under
    022): `tempfile.mkstemp` makes 0600 files, and a rename keeps the mode, so every output used to
    be private - unreadable to a teammate, a web server or a job under another account.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _new_temp_file(path)
    try:
        yield tmp
        os.chmod(tmp, mode)  # writers that replace the file (rather than write into it) get it back too
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
            raise CnnxferError(f"disk full while writing {path}; the previous version is untouched") from exc
        raise


def _new_temp_file(path: Path) -> tuple[Path, int]:
    """An empty, new hidden file beside `path` and its permission bits. It is created with 0666 and
    the kernel applies the umask, as for any new file; reading the umask (os.umask sets it) would
    race with other threads creating files."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, os.fstat(fd).st_mode & 0o777
        finally:
            os.close(fd)
    raise CnnxferError(f"cannot create a temporary file beside {path}")


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "value"):  # str Enums
        return obj.value
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CnnxferError(f"{path}: cannot read JSON: {exc}") from exc


def prepare_output(path: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse to touch an existing output unless --overwrite (or --resume) says so. The message
    offers --resume only for an unfinished training run, the one thing --resume continues."""
    path = Path(path)
    if path.exists() and not (overwrite or resume):
        if path.is_dir() and not any(path.iterdir()):
            return
        again = f" or --resume {path} to continue it" if resume_point(path) else ""
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it{again}")


# The files a training run writes into its directory (--overwrite removes them, and nothing else).
RUN_FILES = (MODEL_FILE, PROBE_FILE, CONFIG_FILE, STATE_FILE, "metrics.csv", "skipped.csv", "confusion_matrix.csv", "report.csv",
             "curves.png", "confusion_matrix.png")


def clear_run(run_dir: Path) -> None:
    """Remove a previous run's files, so that nothing of it (a state.pt to resume, a best model)
    is taken for the new run's; other files in the folder are the user's and stay."""
    for name in RUN_FILES:
        (Path(run_dir) / name).unlink(missing_ok=True)


def resume_point(run_dir: Path) -> str | None:
    """What `--resume run_dir` does: "epoch" (continue after the last saved epoch), "start" (the
    run was interrupted before an epoch finished: it starts again), or None (not an unfinished
    training run). Reads only small files: the CLI asks this after an interrupt."""
    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or "train_config" not in config:
        return None
    if (run_dir / STATE_FILE).is_file():
        return "epoch"
    return "start" if config.get("status") == "running" else None


def parts_dir(out: Path) -> Path:
    """Where extract keeps the finished parts of `out` until it merges them (features.py)."""
    return Path(out).with_name(Path(out).name + ".parts")


def resume_hint(run_dir: Path) -> str:
    """After Ctrl-C or SIGTERM: what was kept in `run_dir` and how to go on, true to what is on disk."""
    point = resume_point(run_dir)
    if point == "epoch":
        return f"every finished epoch was kept - re-run with --resume {run_dir} to continue"
    if point == "start":
        return f"no epoch had finished - re-run with --resume {run_dir} to start it again"
    return "nothing of the run was saved yet - run the same command again"


def save_state_dict(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Save tensors as safetensors, atomically (contiguous CPU copies: channels_last and shared
    storage are not allowed in the format)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def is_run_dir(path: Path | str) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file()


def load_run_config(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / CONFIG_FILE)


def save_training_state(path: Path, state: dict) -> None:
    """The resume state (tensors and plain containers only, loadable with weights_only=True)."""
    import torch  # here, not at the top: resume_hint runs after an interrupt, maybe mid-import of torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: Path) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CnnxferError(f"{path}: cannot read the resume state: {exc}") from exc
