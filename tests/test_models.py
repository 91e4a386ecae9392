"""Models and weights (cnnxfer/models.py): safe loading, unwrapping, heads, custom factories, hub, taps."""
from __future__ import annotations

import os
import pickle
import random
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from cnnxfer import checkpoint, models, rundir
from cnnxfer.activations import Activations
from cnnxfer.errors import ModelError, UsageError, WeightsError

CUSTOM_MODEL = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.hidden = nn.Linear(32, 12)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.hidden(self.features(x).flatten(1))))


def make(num_classes):
    return Tiny(num_classes)


def no_classes():
    return Tiny(3)


def not_a_module(num_classes):
    return "model"


NOT_CALLABLE = 3
"""


@pytest.fixture
def custom_model_file(tmp_path) -> Path:
    path = tmp_path / "my_models" / "tiny_cnn.py"
    path.parent.mkdir()
    path.write_text(CUSTOM_MODEL)
    return path


def _state(name: str, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model(name, **kwargs).state_dict()


def _assert_state_equal(model: torch.nn.Module, state: dict[str, torch.Tensor], skip: tuple[str, ...] = ()):
    own = model.state_dict()
    for k, v in state.items():
        if not k.startswith(skip):
            assert torch.equal(own[k], v), k


# ---------------------------------------------------------------- weight files

def test_safetensors_file_loads_exactly(resnet10t_weights):
    loaded = models.load_model("resnet10t", str(resnet10t_weights))
    _assert_state_equal(loaded.model, load_file(str(resnet10t_weights)))
    assert loaded.weights == str(resnet10t_weights.resolve()) and loaded.notes == []
    assert loaded.data_config["input_size"] == (3, 176, 176)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix", "state_dict_and_module"])
def test_pth_state_dicts_and_common_wrappers(tmp_path, wrap):
    state = _state("test_resnet", seed=1)
    obj = {f"module.{k}": v for k, v in state.items()} if "module" in wrap else state
    if wrap.startswith("state_dict"):
        obj = {"state_dict": obj, "epoch": 3}
    elif wrap == "model":
        obj = {"model": obj, "optimizer": {}}
    torch.save(obj, tmp_path / "w.pth")
    assert models.read_weights_file(tmp_path / "w.pth").keys() == state.keys()
    loaded = models.load_model("test_resnet", str(tmp_path / "w.pth"))
    _assert_state_equal(loaded.model, state)


class _RunsCode:
    """Unpickling this would run a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("how", ["torch_zip", "raw_pickle", "inside_state_dict"])
def test_pickle_with_code_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if how == "torch_zip":
        torch.save({"fc.weight": torch.zeros(2), "payload": _RunsCode(marker)}, path)
    elif how == "raw_pickle":
        with open(path, "wb") as fh:
            pickle.dump({"payload": _RunsCode(marker)}, fh)
    else:
        state = _state("test_resnet")
        state["fc.weight"] = _RunsCode(marker)
        torch.save({"state_dict": state}, path)
    with pytest.raises(WeightsError) as info:
        models.load_model("test_resnet", str(path))
    assert info.value.exit_code == 2
    assert "refusing to load" in str(info.value) or "corrupt weights file" in str(info.value)
    time.sleep(0.05)
    assert not marker.exists(), "the pickle's code ran"


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_corrupt_weight_files(tmp_path, suffix, damage):
    state = _state("test_resnet")
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    blob = path.read_bytes()
    # random bytes make torch.load raise UnpicklingError, IndexError, KeyError, UnicodeDecodeError...
    variants = {"empty": [b""], "truncated": [blob[: len(blob) // 2], blob[:100]],
                "garbage": [random.Random(seed).randbytes(4096) for seed in range(40)]}[damage]
    for variant in variants:
        path.write_bytes(variant)
        with pytest.raises(WeightsError, match="corrupt weights file") as info:
            models.read_weights_file(path)
        assert str(path) in str(info.value)


def test_missing_weights_file_and_folder(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        models.load_model("test_resnet", str(tmp_path / "nope.safetensors"))
    with pytest.raises(WeightsError, match="not a cnnxfer run directory"):
        models.load_model("test_resnet", str(tmp_path))


def test_a_file_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="not a state dict"):
        models.load_model("test_resnet", str(tmp_path / "list.pth"))


def test_wrong_architecture_lists_missing_and_unexpected_keys(timm_weights):
    with pytest.raises(WeightsError) as info:
        models.load_model("resnet10t", str(timm_weights("test_efficientnet")))
    message = str(info.value)
    assert info.value.exit_code == 2 and "do not fit the model" in message
    assert "missing: conv1.0.weight" in message and "unexpected: blocks.0.0." in message
    assert "more)" in message  # long lists are shortened, with a count


def test_same_keys_different_shapes_are_listed(test_resnet_weights, tmp_path):
    state = load_file(str(test_resnet_weights))
    state["layer1.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsError, match=r"shape mismatch: layer1.0.conv1.weight \(1, 1, 1, 1\) vs"):
        models.load_model("test_resnet", str(tmp_path / "w.safetensors"))


def test_1000_class_head_into_5_classes_is_reinitialised_with_a_note(resnet10t_weights):
    loaded = models.load_model("resnet10t", str(resnet10t_weights), num_classes=5)
    state = load_file(str(resnet10t_weights))
    assert loaded.model.fc.weight.shape == (5, 512)
    assert any("re-initialised" in n and "5 classes" in n for n in loaded.notes)
    _assert_state_equal(loaded.model, state, skip=("fc.",))  # everything else kept
    assert models.model_num_classes(loaded.model) == 5


def test_run_directory_restores_architecture_classes_and_preprocessing(tmp_path, test_resnet_weights):
    run = tmp_path / "run"
    model = timm.create_model("test_resnet", num_classes=3)
    checkpoint.save_state_dict(run / rundir.MODEL_FILE, model.state_dict())
    data_config = {"input_size": [3, 64, 64], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
                   "crop_pct": 1.0, "crop_mode": "center"}
    checkpoint.atomic_write_json(run / rundir.CONFIG_FILE, {"model": "test_resnet", "classes": ["a", "b", "c"],
                                                                "data_config": data_config})
    loaded = models.load_model(None, str(run))
    assert loaded.arch == "test_resnet" and loaded.classes == ["a", "b", "c"]
    assert loaded.data_config["input_size"] == [3, 64, 64]
    _assert_state_equal(loaded.model, model.state_dict())
    with pytest.raises(UsageError, match="does not match"):
        models.load_model("resnet10t", str(run))
    again = models.load_model(None, str(run), num_classes=2)
    assert again.model.fc.out_features == 2 and again.notes == ["new classifier for 2 classes (the run's was for classes a, b, c)"]


def test_model_is_required_without_a_run_directory(resnet10t_weights):
    with pytest.raises(UsageError, match="--model is required"):
        models.load_model(None, str(resnet10t_weights))


def test_weights_none_is_random_init():
    a = models.load_model("test_resnet", "none").model
    assert models.model_num_classes(a) == 1000


# ---------------------------------------------------------------- architectures

def test_unknown_timm_name_suggests_close_names():
    with pytest.raises(ModelError, match="unknown model 'resnt50'; did you mean .*resnet50") as info:
        models.load_model("resnt50", "none")
    assert info.value.exit_code == 2
    with pytest.raises(ModelError, match="unknown model 'qqqqzzzz'; see"):
        models.load_model("qqqqzzzz", "none")


def test_custom_file_factory(custom_model_file):
    loaded = models.load_model(f"{custom_model_file}:make", "none", num_classes=4)
    assert not loaded.is_timm and loaded.model.fc.out_features == 4
    assert loaded.data_config["input_size"] == (3, 224, 224)  # the ImageNet default for custom models
    x = torch.randn(2, 3, 16, 16)
    model = loaded.model.eval()
    expected = torch.relu(model.hidden(model.features(x).flatten(1)))
    assert torch.allclose(models.pre_logits(model, x), expected)  # the input of the last Linear
    assert models.classifier_names(model) == ["fc"]


def test_custom_module_factory(tmp_path, monkeypatch):
    package = tmp_path / "site" / "zoo_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(CUSTOM_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "zoo_pkg", raising=False)
    loaded = models.load_model("zoo_pkg.nets:make", "none", num_classes=2)
    assert loaded.model.fc.out_features == 2


def test_custom_model_with_its_own_weights(custom_model_file, tmp_path):
    spec = f"{custom_model_file}:make"
    torch.manual_seed(5)
    reference = models.build_architecture(spec, 7)
    save_file(reference.state_dict(), str(tmp_path / "custom.safetensors"))
    loaded = models.load_model(spec, str(tmp_path / "custom.safetensors"))  # num_classes None: factory default
    assert loaded.notes and "re-initialised" in loaded.notes[0]  # 7-class file into the 1000-class default
    _assert_state_equal(loaded.model, reference.state_dict(), skip=("fc.",))
    loaded = models.load_model(spec, str(tmp_path / "custom.safetensors"), num_classes=7)
    _assert_state_equal(loaded.model, reference.state_dict())


@pytest.mark.parametrize("suffix, pattern", [
    (":", "must look like"),
    ("missing.py:make", "does not exist"),
    ("FILE:nothing_here", "not a callable"),
    ("FILE:NOT_CALLABLE", "not a callable"),
    ("FILE:no_classes", "must accept num_classes"),
    ("FILE:not_a_module", "not a torch.nn.Module"),
    ("no_such_package_xyz.mod:make", "cannot import module 'no_such_package_xyz.mod'"),
    ("BROKEN:make", "cannot import custom model file .*ZeroDivisionError"),
])
def test_bad_custom_specs_are_clear_model_errors(custom_model_file, tmp_path, suffix, pattern):
    broken = tmp_path / "broken.py"
    broken.write_text("x = 1 / 0\n")
    spec = suffix.replace("FILE", str(custom_model_file)).replace("BROKEN", str(broken))
    with pytest.raises(ModelError, match=pattern) as info:
        models.load_model(spec, "none")
    assert info.value.exit_code == 2


# ---------------------------------------------------------------- hub

@pytest.mark.parametrize("offline_env", [True, False])
def test_hub_unreachable_fails_fast_and_points_to_weights(tmp_path, monkeypatch, offline_env):
    if not offline_env and models._hub_reachable(2.0):
        pytest.skip("the hub is reachable from this machine: the offline path cannot be tested without HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        models.load_model("resnet10t", "hub")
    assert time.perf_counter() - start < 10
    assert "--weights" in str(info.value) and info.value.exit_code == 2


def test_hub_uses_the_local_hf_cache_offline(tmp_path, monkeypatch, resnet10t_weights):
    from huggingface_hub import constants

    hub_id = timm.create_model("resnet10t").pretrained_cfg["hf_hub_id"]
    repo = tmp_path / "hub" / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    cached = repo / "snapshots" / "0123abcd" / "model.safetensors"
    cached.write_bytes(resnet10t_weights.read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = models.load_model("resnet10t", "hub")
    assert loaded.weights == f"hub-cache:{cached}"
    _assert_state_equal(loaded.model, load_file(str(resnet10t_weights)))


def test_custom_model_ignores_hub_default(custom_model_file):
    loaded = models.load_model(f"{custom_model_file}:make", "hub", num_classes=3)
    assert loaded.model.fc.out_features == 3


# ---------------------------------------------------------------- preprocessing, pooling, layers

def test_data_config_and_small_images():
    model = timm.create_model("test_resnet")
    config = models.resolve_data_config(model)
    assert config["input_size"] == (3, 160, 160) and config["mean"] == (0.5, 0.5, 0.5)
    small = models.resolve_data_config(model, img_size=32)
    assert small["input_size"] == (3, 32, 32) and small["crop_pct"] == 1.0
    from PIL import Image

    from cnnxfer.preprocess import Preprocess

    assert Preprocess.from_data_config(small).transform(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_resolve_layers_by_name_and_index():
    model = timm.create_model("resnet10t")
    assert models.available_layers(model) == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert models.resolve_layers(model, ["1", " layer3", "-1", "layer2.0.conv1"]) == ["layer1", "layer3", "layer4", "layer2.0.conv1"]
    with pytest.raises(UsageError, match="out of range"):
        models.resolve_layers(model, ["9"])
    with pytest.raises(UsageError, match="unknown layer 'layer9'"):
        models.resolve_layers(model, ["layer9"])


def test_pool_features():
    t = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.equal(models.pool_features(t, "avg"), t.mean(dim=(2, 3)))
    assert torch.equal(models.pool_features(t, "max"), t.amax(dim=(2, 3)))
    assert torch.allclose(models.pool_features(t, "avgmax"), 0.5 * (t.mean(dim=(2, 3)) + t.amax(dim=(2, 3))))
    tokens = torch.randn(2, 5, 4)
    assert torch.allclose(models.pool_features(tokens, "avg"), tokens.mean(1))


def test_set_global_pool_keeps_the_trained_classifier(resnet10t_weights):
    model = models.load_model("resnet10t", str(resnet10t_weights)).model.eval()
    fc = model.fc.weight.clone()
    models.set_global_pool(model, "max")
    assert torch.equal(model.fc.weight, fc)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(models.pre_logits(model, x), model.forward_features(x).amax(dim=(2, 3)), atol=1e-6)


def test_activations_match_forward_intermediates():
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet").eval()
    taps = Activations(model, ["blocks.1", "blocks.3"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
        expected = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    taps.close()
    assert torch.allclose(taps.outputs["blocks.1"], expected[0]) and torch.allclose(taps.outputs["blocks.3"], expected[1])
    assert not model.get_submodule("blocks.1")._forward_hooks  # removed


def test_stage_groups_cover_the_backbone_in_order():
    model = timm.create_model("resnet10t")
    groups = models.stage_groups(model)
    flat = [n for g in groups for n in g]
    head = models.head_parameter_names(model)
    assert head == {"fc.weight", "fc.bias"}
    assert sorted(flat) == sorted(n for n, _ in model.named_parameters() if n not in head)
    assert groups[-1][0].startswith("layer4") and groups[0][0].startswith("conv1")
