"""File I/O with atomic writes, and safe reading of weights files.

Every file is written to a temporary name in the same folder and moved into place with
`os.replace`, so a kill at any moment leaves either the previous complete file or the new one.
No pickle of arbitrary objects anywhere: a resume state holds only tensors and plain containers
and is read with `weights_only=True`, like any .pth weights file. What the files of a run
directory are, and who reads them, is rundir.py's.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Iterator

from .errors import CnnxferError, OutputExistsError, WeightsError



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


def prepare_output(path: Path, overwrite: bool, resume: bool = False, again: str = "") -> None:
    """Refuse to touch an existing output unless --overwrite (or --resume) says so; `again` is
    what else the message offers (rundir.prepare says --resume for an unfinished run)."""
    path = Path(path)
    if path.exists() and not (overwrite or resume):
        if path.is_dir() and not any(path.iterdir()):
            return
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it{again}")


def parts_dir(out: Path) -> Path:
    """Where extract keeps the finished parts of `out` until it merges them (features.py)."""
    return Path(out).with_name(Path(out).name + ".parts")


def save_state_dict(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Save tensors as safetensors, atomically (contiguous CPU copies: channels_last and shared
    storage are not allowed in the format)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


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


# ---------------------------------------------------------------- weights files

def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from .pth/.pt/.bin with `weights_only=True` (never a full unpickle)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.stat().st_size == 0:
        raise WeightsError(f"corrupt weights file {path}: it is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise WeightsError(f"corrupt weights file {path}: {exc}") from exc
    else:
        state = _torch_load_safely(path)
    return _unwrap_state_dict(state, path)


def _torch_load_safely(path: Path):
    import pickle

    import torch

    major_minor = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if major_minor < (2, 6):
        # CVE-2025-32434: weights_only can be bypassed before torch 2.6.
        raise WeightsError(f"{path}: loading .pth files needs torch >= 2.6 (found {torch.__version__}); use .safetensors")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # torch names the forbidden GLOBAL; anything else is damaged bytes
            raise WeightsError(f"corrupt weights file {path}: not a readable torch or pickle file") from exc
        raise WeightsError(
            f"refusing to load {path}: it holds pickled Python objects, not just tensors "
            "(only safetensors or plain state dicts are loaded; re-save it with torch.save(model.state_dict()))"
        ) from exc
    except Exception as exc:  # damaged bytes raise anything: RuntimeError, EOFError, IndexError, KeyError...
        raise WeightsError(f"corrupt weights file {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def _unwrap_state_dict(state, path: Path) -> dict[str, torch.Tensor]:
    """Accept the usual wrappers: {'state_dict': ...}, {'model': ...}, DataParallel's 'module.'."""
    import torch

    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model", "state_dict_ema"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a state dict of tensors (timm key names expected)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state
