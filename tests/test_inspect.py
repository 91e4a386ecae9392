"""The inspect views against things known by hand: receptive fields of toy nets, an edge detector's
top patches, symmetric kernels' invariance, exact filter-grid pixels, Grad-CAM of a linear model,
FLOPs and dead units, and a digits classifier trained for the test (class models, embedding)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from cnnxfer.config import InspectConfig, RunConfig
from cnnxfer.session import resolve_session
from cnnxfer.inspect import subject as subj
from cnnxfer.inspect.class_model import class_models
from cnnxfer.inspect.embedding import embed, features_from_images, knn_accuracy
from cnnxfer.inspect.filters import filter_grid, first_conv, weight_changes
from cnnxfer.inspect.invariance import correlations, run_invariance
from cnnxfer.inspect.layers import describe_layers
from cnnxfer.inspect.patches import run_patches
from cnnxfer.inspect.receptive import measure_receptive_fields
from cnnxfer.inspect.worst import grad_cam
from cnnxfer.preprocess import Preprocess

pytestmark = pytest.mark.usefixtures("one_thread")


class Residual(nn.Module):
    def __init__(self, branch: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.branch, self.shortcut = branch, shortcut or nn.Identity()

    def forward(self, x):
        return self.shortcut(x) + torch.relu(self.branch(x))


# ---------------------------------------------------------------- receptive fields

def test_receptive_fields_equal_hand_computation_with_stride_dilation_pooling_and_a_residual():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(),  # "0": 3, jump 1
        nn.Conv2d(4, 4, 3, stride=2),  # "2": 3 + 2*1 = 5, jump 2
        nn.MaxPool2d(2, 2),  # "3": 5 + 1*2 = 7, jump 4
        nn.Conv2d(4, 4, 3, dilation=2),  # "4": 7 + 2*2*4 = 23
        Residual(nn.Conv2d(4, 4, 3, padding=1)),  # "5": max(23 + 2*4, 23) = 31, starts 1*4 px earlier
        nn.AdaptiveAvgPool2d(1),  # "6": the whole image
    ).eval()
    fields = measure_receptive_fields(net, ["0", "2", "3", "4", "5", "6"], (64, 48))
    expected = {"0": (3, 1, 0), "2": (5, 2, 0), "3": (7, 4, 0), "4": (23, 4, 0), "5": (31, 4, -4)}
    for name, (size, stride, first) in expected.items():
        f = fields[name]
        assert (f.size, f.stride, f.first, f.is_global) == ((size, size), (stride, stride), (first, first), False), name
    assert fields["4"].map_size == (11, 7) and fields["4"].box(2, 0) == (8, 0, 31, 23)  # 64x48 -> 62x46 -> 30x22 -> 15x11
    assert fields["5"].box(0, 0) == (0, 0, 27, 27)  # starts in the padding: clipped
    assert fields["6"].is_global and fields["6"].label == "global"
    # the same net on a 28 px input: the last conv's centre unit sees the whole image
    assert measure_receptive_fields(net, ["5"], (28, 28))["5"].label == "global"


def test_a_strided_residual_block_and_a_functional_max_pool():
    class Block(nn.Module):  # a ResNet downsampling block; max pooling called as a function
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.body = Residual(nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)),
                                 nn.Conv2d(8, 8, 1, stride=2))

        def forward(self, x):
            return self.body(torch.nn.functional.max_pool2d(torch.relu(self.stem(x)), 3, 2, 1))

    fields = measure_receptive_fields(Block().eval(), ["stem", "body"], (64, 64))
    # stem 3, jump 1, starts -1; max pool 3/2 pad 1: 3 + 2 = 5, jump 2, starts -2;
    # body: conv 3/2 pad 1: 5 + 2*2 = 9, jump 4, starts -4; conv 3 pad 1: 9 + 2*4 = 17, starts -8
    assert (fields["stem"].size, fields["stem"].first) == ((3, 3), (-1, -1))
    assert (fields["body"].size, fields["body"].stride, fields["body"].first) == ((17, 17), (4, 4), (-8, -8))


def test_resnet10t_receptive_fields_by_hand():
    model = timm.create_model("resnet10t").eval()
    fields = measure_receptive_fields(model, ["act1", "layer1", "layer2", "layer3"], (64, 64))
    # deep stem: 3x3/2, 3x3, 3x3 -> 11, jump 2; max pool 3/2 -> 15, jump 4; one basic block per stage
    # (two 3x3): layer1 15 + 2*2*4 = 31; layer2 31 + 2*4 + 2*8 = 55; layer3 reaches past a 64 px input
    assert [fields[n].size[0] for n in ("act1", "layer1", "layer2")] == [11, 31, 55]
    assert [fields[n].stride[0] for n in ("act1", "layer1", "layer2", "layer3")] == [2, 4, 8, 16]
    assert fields["act1"].first == (-5, -5) and fields["layer3"].label == "global"


# ---------------------------------------------------------------- patches

EDGE_NET = """
from torch import nn


def build(num_classes=2):
    return nn.Sequential(nn.Conv2d(3, 2, 3, bias=False), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(2, num_classes))
"""


def _factory(tmp_path: Path, source: str, name: str = "net.py") -> str:
    (tmp_path / name).write_text(source)
    return f"{tmp_path / name}:build"


def _edge_images(root: Path, n: int = 4, size: int = 32) -> Path:
    """v/: a vertical edge (dark left, bright right) at a random column; h/: the same edge turned
    a quarter (dark top, bright bottom); flat/: noise."""
    rng = np.random.default_rng(0)
    for k in range(n):
        cut = int(rng.integers(8, size - 8))
        vertical = np.full((size, size), 40, np.uint8)
        vertical[:, cut:] = 210
        for name, pixels in (("v", vertical), ("h", vertical.T.copy()),
                             ("flat", rng.integers(100, 140, (size, size)).astype(np.uint8))):
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, "L").convert("RGB").save(root / name / f"{k}.png")
    return root


def test_an_oriented_edge_kernel_ranks_patches_with_that_edge_first(tmp_path):
    spec = _factory(tmp_path, EDGE_NET)
    from cnnxfer import models

    net = models.build_architecture(spec, 2)
    edge = torch.tensor([[-1.0, 0.0, 1.0]] * 3)  # dark -> bright, left to right
    with torch.no_grad():
        net[0].weight.copy_(torch.stack([edge.expand(3, 3, 3), edge.T.expand(3, 3, 3)]))
    save_file(net.state_dict(), str(tmp_path / "edge.safetensors"))
    data = _edge_images(tmp_path / "edges")
    result = run_patches(InspectConfig(model=spec, weights=str(tmp_path / "edge.safetensors"), data=data, layer="0",
                                       top=4, img_size=32, out=tmp_path / "out", device="cpu", precision="fp32", num_workers=0))
    assert result.field.size == (3, 3) and result.units == [0, 1]
    for unit, label in ((0, "v"), (1, "h")):
        rows = [r for r in result.rows if r["unit"] == unit]
        assert [r["label"] for r in rows] == [label] * 4  # never the turned edge, nor noise
        for patch in result.patches[unit]:
            grey = patch.mean(axis=2)
            first, last = (grey[:, 0], grey[:, -1]) if unit == 0 else (grey[0], grey[-1])
            assert last.mean() - first.mean() > 150  # the edge, dark to bright, inside the patch
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"patches.png", "patches.csv", "patches.json"}


# ---------------------------------------------------------------- invariance

SYMMETRY_NET = """
from torch import nn


def build(num_classes=2):
    return nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(3, num_classes))
"""


def test_symmetric_kernels_are_invariant_and_an_antisymmetric_one_is_not(tmp_path, make_images):
    spec = _factory(tmp_path, SYMMETRY_NET)
    from cnnxfer import models

    net = models.build_architecture(spec, 2)
    mirror = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]])  # left-right symmetric
    anti = mirror.T.contiguous()  # left-right antisymmetric: hflip negates its response
    fourfold = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])  # the same turned a quarter
    with torch.no_grad():
        net[0].weight.copy_(torch.stack([k.expand(3, 3, 3) for k in (mirror, anti, fourfold)]))
    save_file(net.state_dict(), str(tmp_path / "sym.safetensors"))
    make_images(tmp_path / "imgs", {"a": 8, "b": 8}, size=(32, 32))
    result = run_invariance(InspectConfig(model=spec, weights=str(tmp_path / "sym.safetensors"), data=tmp_path / "imgs",
                                          layers=("0",), img_size=32, out=tmp_path / "out", device="cpu",
                                          precision="fp32", num_workers=0))
    r = result.correlations["0"]
    assert r["hflip"][0] > 0.999 and r["hflip"][1] < -0.99 and r["hflip"][2] > 0.999
    assert r["rot90"][2] > 0.999 and r["rot90"][0] < 0.9  # the mirror kernel turned is another kernel
    row = next(x for x in result.table if x["transform"] == "hflip")
    assert (row["units"], row["invariant"], round(row["percent"], 1)) == (3, 2, 66.7)


def test_units_that_do_not_vary_are_constant_not_invariant():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 3))
    a[:, 1] = 0.0  # a dead unit
    r = correlations(a, np.stack([a[:, 0], a[:, 1], -a[:, 2]], axis=1))
    assert r[0] == pytest.approx(1.0) and math.isnan(r[1]) and r[2] == pytest.approx(-1.0)


# ---------------------------------------------------------------- filters

def test_filter_grid_pixels_are_placed_exactly():
    w = torch.zeros(5, 3, 2, 2)
    w[0, 0, 0, 0] = 2.0  # red top-left at full scale
    w[1, 1, 1, 1] = -0.5  # green bottom-right at the negative end
    w[2] = 1.0
    w[3, 2] = torch.tensor([[1.0, -1.0], [0.5, 0.0]])
    grid = filter_grid(w, "filter", zoom=3, gap=1)
    assert grid.shape == (1 + 2 * 7, 1 + 3 * 7, 3)  # ceil(sqrt(5)) = 3 columns, 2 rows of 6 px tiles
    expected = (127.5 + 127.5 * w / w.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)).round().to(torch.uint8)
    for k in range(5):
        top, left = 1 + (k // 3) * 7, 1 + (k % 3) * 7
        tile = grid[top:top + 6, left:left + 6]
        want = np.repeat(np.repeat(expected[k].permute(1, 2, 0).numpy(), 3, axis=0), 3, axis=1)
        assert np.array_equal(tile, want), k
    assert tuple(grid[1, 1]) == (255, 128, 128) and tuple(grid[6, 12]) == (128, 0, 128)
    assert (grid[0] == 255).all() and (grid[:, 7] == 255).all() and (grid[8:, 15:] == 255).all()  # gaps, empty slot
    layer = filter_grid(w, "layer", zoom=1, gap=1)  # one scale: the 2.0 weight is the only 255
    assert tuple(layer[1, 1]) == (255, 128, 128) and tuple(layer[1, 7]) == (191, 191, 191)


def test_filter_grid_of_one_and_of_two_input_channels():
    grey = filter_grid(torch.tensor([[[[1.0, -1.0]]]]), zoom=1)
    assert grey.shape == (3, 4, 3) and tuple(grey[1, 1]) == (255, 255, 255) and tuple(grey[1, 2]) == (0, 0, 0)
    two = filter_grid(torch.tensor([[[[1.0]], [[-1.0]]]]), zoom=1)  # the channels side by side
    assert two.shape == (3, 5, 3) and tuple(two[1, 1]) == (255,) * 3 and tuple(two[1, 2]) == (255,) * 3
    assert tuple(two[1, 3]) == (0, 0, 0)


def test_first_conv_is_the_first_to_run_and_weight_change_is_relative():
    class Late(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(8, 2, 1)  # defined first, runs second
            self.stem = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.head(self.stem(x))

    assert first_conv(Late(), (16, 16), 3) == "stem"
    before = timm.create_model("resnet10t", num_classes=4)
    after = timm.create_model("resnet10t", num_classes=7)
    after.load_state_dict({k: v for k, v in before.state_dict().items() if not k.startswith("fc.")}, strict=False)
    with torch.no_grad():
        for p in after.layer2.parameters():
            p.mul_(1.5)
    rows = {r["stage"]: r for r in weight_changes(after, before)}
    assert rows["layer2"]["relative_change"] == pytest.approx(0.5, rel=1e-6)
    assert rows["layer1"]["relative_change"] == 0.0 and rows["stem"]["relative_change"] == 0.0
    assert rows["head"]["parameters"] == 0 and rows["head"]["not_compared"] == 7 * 512 + 7  # another head


# ---------------------------------------------------------------- Grad-CAM, layers

def test_grad_cam_of_a_linear_model_is_its_positive_evidence():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        net[4].weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]))
    x = torch.randn(2, 3, 8, 8)
    cams = grad_cam(net, x, "1", [0, 1])
    with torch.no_grad():
        a = net[1](net[0](x))
    for k in range(2):  # d logit_k / dA is w_k / 64 everywhere: the map is channel k itself, scaled
        expected = a[k, k] / a[k, k].max()
        assert np.allclose(cams[k], expected.numpy(), atol=1e-6)


def test_layers_table_parameters_flops_and_dead_units(tmp_path, make_images):
    source = """
from torch import nn


def build(num_classes=2):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, num_classes))
"""
    spec = _factory(tmp_path, source)
    from cnnxfer import models

    net = models.build_architecture(spec, 2)
    with torch.no_grad():  # large biases decide it: 1 of 4 and 3 of 6 units never positive, the rest always
        net[0].bias.copy_(torch.tensor([1e4, -1e4, 1e4, 1e4]))
        net[2].bias.copy_(torch.tensor([-1e6, -1e6, -1e6, 1e6, 1e6, 1e6]))
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    make_images(tmp_path / "imgs", {"": 4}, size=(16, 16))
    config = InspectConfig(model=spec, weights=str(tmp_path / "w.safetensors"), data=tmp_path / "imgs", img_size=16,
                           device="cpu", precision="fp32", num_workers=0)
    result = describe_layers(subj.load_subject(config), subj.read_images(config))
    rows = {r["stage"]: r for r in result.rows}
    assert rows["0"]["parameters"] == 3 * 4 * 9 + 4 and rows["2"]["parameters"] == 4 * 6 * 9 + 6
    assert rows["0"]["flops"] == 2 * 4 * 16 * 16 * 3 * 9 and rows["2"]["flops"] == 2 * 6 * 8 * 8 * 4 * 9
    # the weights file's own 2-class head is kept (not the factory's default of 1000 outputs)
    assert rows["total"]["flops"] == rows["0"]["flops"] + rows["2"]["flops"] + 2 * 6 * 2
    assert rows["1"]["dead_fraction"] == 0.25 and rows["3"]["dead_fraction"] == 0.5
    assert (rows["2"]["output_shape"], rows["2"]["stride"], rows["2"]["receptive_field"]) == ("6x8x8", "2", "5x5")
    assert rows["6"]["receptive_field"] == "global" and result.images == 4
    assert "after the last stage" not in rows  # every child of a Sequential is a stage


def test_layers_rows_add_up_to_the_model():
    model = timm.create_model("resnet10t").eval()
    subject = subj.Subject(None, model, Preprocess((3, 64, 64)), resolve_session("cpu", "fp32", 0))
    rows = {r["stage"]: r for r in describe_layers(subject).rows}
    stem = sum(p.numel() for m in (model.conv1, model.bn1) for p in m.parameters())
    assert rows["act1"]["parameters"] == stem  # conv1 and bn1 run before the first stage ends
    head = rows["after the last stage"]  # global pooling and the classifier
    assert head["parameters"] == 512 * 1000 + 1000 and head["flops"] == 2 * 512 * 1000
    stages = [r for name, r in rows.items() if name not in ("input", "total")]
    assert sum(r["parameters"] for r in stages) == rows["total"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert sum(r["flops"] for r in stages) == rows["total"]["flops"]


# ---------------------------------------------------------------- a trained digits classifier

@pytest.fixture(scope="module")
def digits_subject(digits_run):
    return subj.load_subject(InspectConfig(weights=str(digits_run), device="cpu", precision="fp32", num_workers=0))


def test_class_models_outscore_every_real_digit_and_are_classified_as_their_class(digits_subject, digits_folder):
    result = class_models(digits_subject, list(range(10)), steps=100)
    images = subj.read_images(InspectConfig(data=digits_folder), labelled=True)
    logits, labels = [], []
    for batch in digits_subject.batches(images, 512):
        with torch.no_grad():
            logits.append(digits_subject.model(digits_subject.normalize(batch.images)))
        labels.append(batch.labels)
    logits, labels = torch.cat(logits), torch.cat(labels)
    for c in range(10):
        best_real = float(logits[labels == c, c].max())
        assert result.scores[c] > best_real, (c, result.scores[c], best_real)
        assert result.predicted[c] == str(c), (c, result.predicted)
    assert result.images[0].shape == (32, 32, 3) and result.images[0].dtype == np.uint8


def test_embedding_of_the_trained_digits_run_separates_the_classes(digits_subject, digits_run):
    """Measured on this run's 360 validation digits: 5-NN leave-one-out accuracy 0.99 in the t-SNE
    map, 0.99 in the full 64-d space, ~0.6 in the PCA map (two directions cannot hold ten
    classes). The thresholds leave room for other machines' arithmetic: t-SNE 0.9, full 0.9."""
    from cnnxfer.recipe import run_split

    _, val = run_split(digits_run)
    x, paths, labels = features_from_images(digits_subject, val, 256)
    result = embed(x, paths, labels, ["pca", "tsne"])
    assert len(paths) == len(val) and result.dim == 64
    assert result.knn["tsne"] > 0.9 and result.knn["full"] > 0.9, result.knn
    assert result.knn["pca"] < result.knn["tsne"]


def test_knn_accuracy_matches_scikit_learn_leave_one_out():
    from sklearn.model_selection import LeaveOneOut, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (30, 5)), rng.normal(1.2, 1, (30, 5))])
    y = ["a"] * 30 + ["b"] * 30
    reference = cross_val_score(KNeighborsClassifier(3), x, y, cv=LeaveOneOut()).mean()
    assert knn_accuracy(x, y, 3) == pytest.approx(reference)
    assert knn_accuracy(x, [None] * 60, 3) is None
