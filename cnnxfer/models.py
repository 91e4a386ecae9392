"""Models and weights: timm names or `file.py:factory`, safe weight loading, heads, freezing,
preprocessing, embeddings and layer names (activations.py captures what layers compute).

`--weights` takes one of: `hub` (timm's pretrained weights: download when online, the local
cache offline), `none` (random initialisation), a `.safetensors` / `.pth` / `.pt` / `.bin` state
dict with timm key names, or a cnnxfer run directory (architecture, classes and preprocessing
then come from its config.json).
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from . import rundir
from .checkpoint import read_weights_file
from .config import absolute_spec, is_custom_spec  # noqa: F401 (models.absolute_spec is used by training)
from .errors import ModelError, UsageError, WeightsError

log = logging.getLogger(__name__)

HUB, NONE = "hub", "none"
DEFAULT_DATA_CONFIG = {
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "crop_mode": "center",
}


@dataclass
class LoadedModel:
    """A model ready for a command, and where everything about it came from."""

    model: nn.Module
    arch: str
    weights: str  # "hub:<id>", "none", a file path or a run directory
    data_config: dict
    classes: list[str] = field(default_factory=list)
    run_config: "RunConfig | None" = None  # the run directory's config.json, when loaded from one
    notes: list[str] = field(default_factory=list)
    new_head: bool = False  # the classifier was not in the weights (other classes): it starts untrained

    @property
    def is_timm(self) -> bool:
        return not is_custom_spec(self.arch)


# ---------------------------------------------------------------- architectures

def _load_factory(spec: str) -> Callable[..., nn.Module]:
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ModelError(f"custom model '{spec}' must look like path/to/file.py:factory or package.module:factory")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelError(f"custom model file {path} does not exist")
        module_name = f"cnnxfer_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # lets DataLoader workers and dataclasses find it
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise ModelError(f"cannot import custom model file {path}: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ModelError(f"cannot import module '{target}' for custom model '{spec}': {exc}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ModelError(f"'{name}' is not a callable in {target}")
    return factory


def _check_timm_name(name: str) -> None:
    from .timm_import import import_timm

    timm = import_timm()

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()`"
    raise ModelError(f"unknown model '{name}'{hint}")


def build_architecture(spec: str, num_classes: int | None, drop_rate: float = 0.0, **kwargs) -> nn.Module:
    """Create the architecture with random weights (timm's init, Kaiming for custom models)."""
    if is_custom_spec(spec):
        factory = _load_factory(spec)
        try:
            model = factory(num_classes=num_classes if num_classes is not None else 1000)
        except TypeError as exc:
            raise ModelError(f"custom factory {spec} must accept num_classes=...: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise ModelError(f"custom factory {spec} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    from .timm_import import import_timm

    timm = import_timm()

    _check_timm_name(spec)
    args = dict(pretrained=False, drop_rate=drop_rate, **kwargs)
    if num_classes is not None:
        args["num_classes"] = num_classes
    return timm.create_model(spec, **args)


def kaiming_init(model: nn.Module) -> None:
    """He initialisation for conv/linear layers of a custom model trained from scratch."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_uniform_(module.weight, a=5**0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


# ---------------------------------------------------------------- weight files

def classifier_names(model: nn.Module) -> list[str]:
    """Qualified names of the classifier module(s): timm's pretrained_cfg, else the last Linear."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    if names:
        return [names] if isinstance(names, str) else list(names)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load `state` into `model`; a classifier of another size is left new (a replaced head).

    Returns notes for the user; raises WeightsError listing missing/unexpected/mismatched keys.
    """
    own = model.state_dict()
    heads = tuple(f"{n}." for n in classifier_names(model))
    notes, state = [], dict(state)
    dropped = [k for k in state if k.startswith(heads) and k in own and state[k].shape != own[k].shape]
    for k in dropped:
        del state[k]
    if dropped:
        notes.append(f"new classifier ({', '.join(sorted({k.rsplit('.', 1)[0] for k in dropped}))}) re-initialised for {model_num_classes(model)} classes")
    head_missing = {k for k in own if k.startswith(heads)} if dropped else set()
    missing = [k for k in own if k not in state and k not in head_missing and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.endswith("num_batches_tracked")]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                more = f" (+{len(keys) - 6} more)" if len(keys) > 6 else ""
                parts.append(f"{label}: {', '.join(keys[:6])}{more}")
        raise WeightsError(f"weights {source} do not fit the model; " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    return notes


def weights_head_size(spec: str, path: Path) -> int | None:
    """How many outputs the classifier in the weights file `path` has, for the architecture `spec`
    (None when the file holds no classifier by that name). Reads shapes only where the format allows."""
    names = classifier_names(build_architecture(spec, None))
    keys = [f"{n}.weight" for n in names]
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                present = set(f.keys())
                return next((int(f.get_slice(k).get_shape()[0]) for k in keys if k in present), None)
        except Exception as exc:
            raise WeightsError(f"corrupt weights file {path}: {exc}") from exc
    state = read_weights_file(path)
    return next((int(state[k].shape[0]) for k in keys if k in state), None)


def model_num_classes(model: nn.Module) -> int | None:
    if getattr(model, "num_classes", None) is not None:
        return int(model.num_classes)
    names = classifier_names(model)
    module = model.get_submodule(names[0]) if names else None
    return getattr(module, "out_features", None)


# ---------------------------------------------------------------- hub

def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers within `timeout` s (DNS included, which has no timeout of its own)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        return False
    result = []

    def probe():
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result)


def _cached_pretrained_file(cfg: dict) -> str | None:
    """A locally cached copy of timm's pretrained weights (HF cache or torch hub cache), if any."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for filename in ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
                found = try_to_load_from_cache(hub_id.split("@")[0], filename)
                if isinstance(found, str):
                    return found
        except Exception:  # an old or absent huggingface_hub: treat as not cached
            pass
    url = cfg.get("url")
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if cached.is_file():
            return str(cached)
    return None


def create_pretrained(name: str, num_classes: int | None, drop_rate: float = 0.0) -> tuple[nn.Module, str]:
    """timm's pretrained weights: downloaded when online; offline, the local cache or a fast, clear error."""
    from .timm_import import import_timm

    timm = import_timm()

    model = build_architecture(name, num_classes, drop_rate)  # validates the name, gives pretrained_cfg
    cfg = dict(model.pretrained_cfg)
    if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
        raise WeightsError(f"timm has no pretrained weights for '{name}'; pass --weights FILE or --weights none")
    source = f"hub:{cfg.get('hf_hub_id') or cfg.get('url')}"
    args = dict(pretrained=True, drop_rate=drop_rate)
    if num_classes is not None:
        args["num_classes"] = num_classes
    if not _hub_reachable():
        cached = _cached_pretrained_file(cfg)
        if cached is None:
            raise WeightsError(
                f"cannot download pretrained weights for '{name}': the hub is unreachable (offline or HF_HUB_OFFLINE=1) "
                "and they are not cached; pass local weights with --weights FILE (.safetensors/.pth, timm key names) "
                "or a cnnxfer run directory, or --weights none for random initialisation"
            )
        args["pretrained_cfg_overlay"] = dict(file=cached)
        source = f"hub-cache:{cached}"
    try:
        return timm.create_model(name, **args), source
    except Exception as exc:
        raise WeightsError(f"downloading pretrained weights for '{name}' failed: {type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------- one entry point

def _model_required(weights: str) -> str:
    # `train` has no --weights (it always starts from none): only name it where it can be given
    if weights == NONE:
        return "--model is required: a timm architecture (resnet50) or path/to/file.py:factory"
    return "--model is required unless --weights is a cnnxfer run directory"


def check_model_options(spec: str | None, weights: str | None) -> None:
    """Fail fast on --model and --weights, before any image is read: a missing or unknown model,
    a weights path that does not exist or a folder that is not a run directory."""
    weights = weights or HUB
    if weights not in (HUB, NONE):
        path = Path(weights)
        if rundir.is_run_dir(path):
            return  # it names its own architecture (load_model checks a --model beside it)
        if not path.exists():
            raise WeightsError(f"weights file {path} does not exist")
        if path.is_dir():
            raise WeightsError(f"{path} is a folder but not a cnnxfer run directory (needs config.json and model.safetensors)")
    if spec is None:
        raise UsageError(_model_required(weights))
    if is_custom_spec(spec):
        target = spec.rpartition(":")[0]
        if target.endswith(".py") and not Path(target).is_file():
            raise ModelError(f"custom model file {target} does not exist")
    else:
        _check_timm_name(spec)


def load_model(
    spec: str | None,
    weights: str | None,
    num_classes: int | None = None,
    *,
    drop_rate: float = 0.0,
    img_size: int | None = None,
    classes: list[str] | None = None,
) -> LoadedModel:
    """The model for any command. `num_classes=None` keeps the weights' own head (extract).

    `classes` (the names behind `num_classes`) gives a run directory's model a new head when its
    run had other classes, even as many: its head's rows belong to those classes.
    """
    weights = weights or HUB
    if weights not in (HUB, NONE) and rundir.is_run_dir(weights):
        return _load_run_dir(Path(weights), spec, num_classes, drop_rate, img_size, classes)
    check_model_options(spec, weights)  # a missing weights path is named before a missing --model
    notes: list[str] = []
    new_head = weights == NONE
    if weights == HUB and not is_custom_spec(spec):
        model, source = create_pretrained(spec, num_classes, drop_rate)
        new_head = num_classes is not None and num_classes != model.pretrained_cfg.get("num_classes", num_classes)
    else:
        model, source = build_architecture(spec, num_classes, drop_rate), weights
        if weights == NONE and is_custom_spec(spec):
            kaiming_init(model)
        elif weights not in (HUB, NONE):
            path = Path(weights)
            state = read_weights_file(path)
            own = model.state_dict()
            new_head = num_classes is not None and any(
                k not in state or state[k].shape != own[k].shape for n in classifier_names(model) for k in own
                if k.startswith(f"{n}."))
            notes = load_weights(model, state, str(path))
            source = str(path.resolve())
    return LoadedModel(model, spec, source, resolve_data_config(model, img_size), notes=notes, new_head=new_head)


def _load_run_dir(run_dir: Path, spec, num_classes, drop_rate, img_size, new_classes=None) -> LoadedModel:
    config = rundir.read_config(run_dir)
    arch = config.model
    if not arch:
        raise WeightsError(f"{run_dir}/config.json names no model architecture")
    if spec and spec != arch:
        raise UsageError(f"--model {spec} does not match the run directory's model {arch}; leave --model out")
    classes = list(config.classes)
    model = build_architecture(arch, len(classes) or None, drop_rate)
    state = read_weights_file(run_dir / rundir.MODEL_FILE)
    load_weights(model, state, str(run_dir))
    notes = []
    other = num_classes is not None and (num_classes != len(classes) or (new_classes and list(new_classes) != classes))
    if other:
        model = replace_classifier(model, arch, num_classes, drop_rate)
        notes.append(f"new classifier for {_names(new_classes) if new_classes else f'{num_classes} classes'} (the run's "
                     f"was for {_names(classes)})")
    data_config = dict(config.data_config or resolve_data_config(model))
    if img_size:
        data_config = resolve_data_config(model, img_size, data_config)
    return LoadedModel(model, arch, str(run_dir.resolve()), data_config, classes, config, notes, new_head=bool(other))


def _names(classes: list[str], most: int = 5) -> str:
    shown = ", ".join(classes[:most]) + (f" ... ({len(classes)})" if len(classes) > most else "")
    return f"classes {shown}"


def replace_classifier(model: nn.Module, arch: str, num_classes: int, drop_rate: float = 0.0) -> nn.Module:
    """A model of the same architecture with a new `num_classes` head and every other weight kept.
    The head is new even when it has the old one's shape (other classes, as many)."""
    fresh = build_architecture(arch, num_classes, drop_rate)
    heads = tuple(f"{n}." for n in classifier_names(fresh))
    new_head = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith(heads)}
    load_weights(fresh, model.state_dict(), "the previous model")
    fresh.load_state_dict(new_head, strict=False)
    return fresh


# ---------------------------------------------------------------- preprocessing

def as_data_config(values: dict) -> dict:
    """A data config as cnnxfer holds it in memory: sequences as tuples (JSON gives lists)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def data_config_json(values: dict) -> dict:
    """A data config as JSON keeps it: sequences as lists (what config.json and the caches compare)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def known_data_config(spec: str | None, weights: str | None, img_size: int | None) -> dict | None:
    """The preprocessing `load_model(spec, weights, img_size=img_size)` will give, where it is known
    before timm is imported and the model built: a run directory's own (config.json), or the one an
    earlier load of the same timm model recorded (`remember_data_config`). None otherwise. A guess
    to start decoding early with: the caller checks it against the model's once loaded."""
    weights = weights or HUB
    if weights not in (HUB, NONE) and rundir.is_run_dir(weights):
        saved = rundir.read_config(weights).data_config if not img_size else None
        return as_data_config(saved) if saved else None
    key = _data_config_key(spec, weights, img_size)
    found = _read_data_configs().get(key) if key else None
    return as_data_config(found) if isinstance(found, dict) else None


def remember_data_config(spec: str | None, weights: str | None, img_size: int | None, data_config: dict) -> None:
    """Record a timm model's preprocessing for `known_data_config` (in the user's cache folder; a
    cache that cannot be written is no error)."""
    key = _data_config_key(spec, weights or HUB, img_size)
    if key is None:
        return
    configs = _read_data_configs()
    value = data_config_json(data_config)
    if configs.get(key) == value:
        return
    configs[key] = value
    try:
        from .checkpoint import atomic_write_json

        atomic_write_json(_data_config_file(), configs)
    except Exception as exc:  # a read-only home, a full disk: the next command decodes later, nothing else
        log.debug("cannot record the preprocessing of %s: %s", spec, exc)


def _data_config_key(spec: str | None, weights: str, img_size: int | None) -> str | None:
    """timm version, model name, pretrained or not, --img-size: what timm's data config depends on
    (custom models and run directories have none here)."""
    if not spec or is_custom_spec(spec) or (weights not in (HUB, NONE) and rundir.is_run_dir(weights)):
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        timm_version = version("timm")
    except PackageNotFoundError:
        return None
    return f"timm {timm_version}|{spec}|{'hub' if weights == HUB else 'random or file'}|{img_size or ''}"


def _data_config_file() -> Path:
    """$CNNXFER_CACHE, else $XDG_CACHE_HOME/cnnxfer, else ~/.cache/cnnxfer: data_configs.json."""
    cache = os.environ.get("CNNXFER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cnnxfer")
    return Path(cache) / "data_configs.json"


def _read_data_configs() -> dict:
    import json

    try:
        configs = json.loads(_data_config_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return configs if isinstance(configs, dict) else {}


def resolve_data_config(model: nn.Module, img_size: int | None = None, base: dict | None = None) -> dict:
    """timm's preprocessing for the model (input size, mean/std, interpolation, crop), `img_size` overriding.

    Small images (<= 64 px, e.g. digits) keep their whole field of view: crop_pct 1.0.
    """
    if base is None:
        try:
            from timm.data import resolve_model_data_config  # timm is imported: this model was built with it

            base = resolve_model_data_config(model)
        except Exception:
            base = dict(DEFAULT_DATA_CONFIG)
    config = {k: base[k] for k in DEFAULT_DATA_CONFIG if k in base}
    for k, v in DEFAULT_DATA_CONFIG.items():
        config.setdefault(k, v)
    config = as_data_config(config)
    if img_size:
        config["input_size"] = (3, int(img_size), int(img_size))
        if img_size <= 64:
            config["crop_pct"] = 1.0
    return config


# ---------------------------------------------------------------- embeddings and taps

def set_global_pool(model: nn.Module, pool: str | None) -> None:
    """Use `pool` (avg|max|avgmax) for the model's own pooled features (timm models only)."""
    if pool is None:
        return
    if not hasattr(model, "reset_classifier"):
        raise UsageError("--pool applies to timm models' final features; custom models keep their own pooling")
    head = classifier_names(model)
    saved = {n: model.get_submodule(n) for n in head}
    model.reset_classifier(model_num_classes(model) or 0, global_pool=pool)
    for name, module in saved.items():  # keep the trained classifier: only the pooling changes
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, module)


def pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled features the classifier sees: timm's forward_head(pre_logits=True), else the input
    of the last Linear layer of a custom model."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    names = classifier_names(model)
    if not names:
        raise ModelError("custom model has no nn.Linear classifier to take pre-logits features from")
    from .activations import capture

    return capture(model, x, names[:1], keep="input", detach=False)[names[0]].flatten(1)


def available_layers(model: nn.Module) -> list[str]:
    """Names `--layers` accepts: timm's feature stages, or the top-level children of a custom model."""
    info = getattr(model, "feature_info", None)
    if info is not None:
        try:
            return [f["module"] for f in info]
        except TypeError:
            return [f["module"] for f in info.info]
    return [n for n, _ in model.named_children()]


def resolve_layers(model: nn.Module, layers: Sequence[str]) -> list[str]:
    """Module names for `--layers`: names (any submodule) or indices into `available_layers`."""
    stages, modules, out = available_layers(model), dict(model.named_modules()), []
    for layer in layers:
        layer = layer.strip()
        if layer.lstrip("-").isdigit() and stages:
            index = int(layer)
            if not -len(stages) <= index < len(stages):
                raise UsageError(f"--layers index {index} out of range; this model has stages {stages}")
            layer = stages[index]
        if layer not in modules or not layer:
            raise UsageError(f"unknown layer '{layer}' for --layers; choose from {', '.join(stages)} (or any module name)")
        out.append(layer)
    return out


def pool_features(t: torch.Tensor, pool: str = "avg") -> torch.Tensor:
    """(N, C, H, W) maps or (N, L, C) tokens to (N, D) vectors."""
    if t.dim() == 4:
        if pool == "avg":
            return t.mean(dim=(2, 3))
        if pool == "max":
            return t.amax(dim=(2, 3))
        return 0.5 * (t.mean(dim=(2, 3)) + t.amax(dim=(2, 3)))
    if t.dim() == 3:
        return t.mean(dim=1) if pool == "avg" else t.amax(dim=1) if pool == "max" else 0.5 * (t.mean(1) + t.amax(1))
    return t.flatten(1)


# ---------------------------------------------------------------- freezing

def head_parameter_names(model: nn.Module) -> set[str]:
    prefixes = tuple(f"{n}." for n in classifier_names(model))
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


def stage_groups(model: nn.Module) -> list[list[str]]:
    """Backbone parameter names grouped from input to output, for gradual unfreezing: the stem,
    one group per feature stage, and whatever follows the last stage (e.g. a pre-logits norm)."""
    head = head_parameter_names(model)
    stages = [s for s in available_layers(model) if s]
    groups: list[list[str]] = [[] for _ in range(len(stages) + 2)]
    seen_stage = False
    for name, _ in model.named_parameters():
        if name in head:
            continue
        stage = next((i for i, s in enumerate(stages) if name == s or name.startswith(s + ".")), None)
        if stage is not None:
            seen_stage = True
            groups[stage + 1].append(name)
        else:
            groups[-1 if seen_stage else 0].append(name)
    return [g for g in groups if g]


def set_trainable(model: nn.Module, trainable: set[str] | None) -> None:
    """requires_grad for the named parameters only (None: all); frozen BatchNorms are kept in eval mode by the engine."""
    for name, p in model.named_parameters():
        p.requires_grad_(trainable is None or name in trainable)


def frozen_norm_modules(model: nn.Module, all_of_them: bool = False) -> list[nn.Module]:
    """BatchNorm layers that must stay in eval mode (running statistics fixed): those whose
    parameters are all frozen, or every one with `all_of_them` (--bn-stats frozen)."""
    out = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if all_of_them or (params and not any(p.requires_grad for p in params)):
                out.append(module)
    return out


# ---------------------------------------------------------------- new heads

def zero_head(model: nn.Module) -> None:
    """A new classifier that says nothing yet: zero weights and bias give every class the same
    probability, so the loss starts at ln(classes). timm initialises EfficientNet's classifier with
    weights up to 1/sqrt(classes) (+-0.58 for 3 classes), which put the first loss at 3.6-4.2."""
    for name in classifier_names(model):
        for param in model.get_submodule(name).parameters():
            nn.init.zeros_(param)


def set_linear_head(model: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Put a fitted linear classifier (classes x features) into the model's classifier(s); False,
    leaving them as they are, when a classifier is not an nn.Linear of that shape."""
    modules = [model.get_submodule(name) for name in classifier_names(model)]
    if not modules or not all(isinstance(m, nn.Linear) and m.weight.shape == weight.shape and m.bias is not None
                              for m in modules):
        return False
    with torch.no_grad():
        for module in modules:  # several (a distillation head beside the classifier): each gets the probe
            module.weight.copy_(weight)
            module.bias.copy_(bias)
    return True
