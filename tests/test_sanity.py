"""Model-level sanity checks, on real models and real computation (no mocks).

Gradient checks are judged against models with a known-wrong backward: a custom
autograd.Function ReLU whose backward is scaled. The correct models include a timm ResNet
with ReLU and max-pool kinks, which must not raise false alarms.
"""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from torch import nn

from cnnxfer.sanity import (
    CheckResult,
    check_cost,
    check_gradient_flow,
    check_gradients,
    check_init_loss,
    check_modes,
    check_overfit_result,
    lr_range_test,
)


class ScaledReLUFunction(torch.autograd.Function):
    """ReLU with a backward multiplied by `scale`: scale 1 is correct, anything else is a bug."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(x)
        ctx.scale = scale
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0).to(grad.dtype) * ctx.scale, None


class CustomReLU(nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return ScaledReLUFunction.apply(x, self.scale)


class SmallCNN(nn.Module):
    """conv-bn-relu-maxpool-linear, for 16x16 inputs."""

    def __init__(self, act: nn.Module | None = None, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = act if act is not None else nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 8 * 8, classes)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.bn(self.conv(x)))).flatten(1))


class InlineBadReLU(SmallCNN):
    """The wrong backward is called inline in forward, not from a module of its own."""

    def forward(self, x):
        x = ScaledReLUFunction.apply(self.bn(self.conv(x)), 2.0)
        return self.fc(self.pool(x).flatten(1))


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class NoisyInEval(SmallCNN):
    """Adds noise whatever the mode: a model that is random at inference."""

    def forward(self, x):
        out = super().forward(x)
        return out + torch.rand_like(out)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: on a busy 2-core machine, OpenMP threads waiting at barriers made
    them up to 8x slower than one thread does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_cnn(act=None, seed=0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(act)


def timm_resnet(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=3)


def batch(n=8, size=16, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen), torch.arange(n) % classes


def assert_json(result: CheckResult):
    json.dumps(result.to_dict(), allow_nan=False)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("act", [nn.ReLU(), CustomReLU(1.0)], ids=["nn.ReLU", "custom-correct"])
def test_gradients_pass_on_correct_small_cnn(act):
    x, y = batch()
    result = check_gradients(small_cnn(act), x, y)
    assert result.status == "PASS", result.summary
    layers = {row["layer"]: row for row in result.details["layers"]}
    assert {"<input>", "conv", "bn", "fc"} <= set(layers)
    assert all(row["worst_rel_error"] < 1e-4 for row in layers.values())
    assert "worst relative error" in result.summary
    assert_json(result)


@pytest.mark.parametrize("seed", [0, 1])
def test_gradients_pass_on_timm_resnet_despite_kinks(seed):
    # 32 px through ReLU + max-pool: finite differences cross kinks; that must not be a failure
    x, y = batch(n=4, size=32, seed=seed)
    result = check_gradients(timm_resnet(seed), x, y, seed=seed)
    assert result.status == "PASS", result.summary
    assert len([row for row in result.details["layers"] if row["checked"]]) >= 20


@pytest.mark.parametrize("scale", [2.0, 0.5])
def test_gradients_fail_and_name_the_wrong_backward(scale):
    x, y = batch()
    result = check_gradients(small_cnn(CustomReLU(scale)), x, y)
    assert result.status == "FAIL"
    # parameters before the faulty function are wrong, after it right; the function is named
    assert "'act'" in result.summary
    assert result.details["culprits"] == ["'act'"]
    assert {"conv", "bn", "<input>"} <= set(result.details["bad_layers"])
    assert "fc" not in result.details["bad_layers"]
    worst = max(row["worst_rel_error"] for row in result.details["layers"])
    assert worst == pytest.approx(abs(scale - 1) / (scale + 1), rel=1e-3)
    assert result.hint
    assert_json(result)


def test_gradients_localise_a_wrong_backward_inside_a_timm_block():
    model = timm_resnet()
    model.layer2[0].act1 = CustomReLU(2.0)  # inside a zero-init residual branch
    x, y = batch(n=4, size=32)
    result = check_gradients(model, x, y)
    assert result.status == "FAIL"
    assert "'layer2.0.act1'" in result.summary


def test_gradients_point_into_a_forward_for_an_inline_function():
    x, y = batch()
    result = check_gradients(InlineBadReLU(), x, y)
    assert result.status == "FAIL"
    assert "'<root>' (after 'bn')" in result.summary


def test_gradients_skip_a_model_that_is_random_in_eval():
    x, y = batch()
    result = check_gradients(NoisyInEval(), x, y)
    assert result.status == "SKIP"
    assert "deterministic" in result.summary


# --------------------------------------------------------------------------- init loss


def test_init_loss_near_log_classes_passes():
    x, y = batch(size=32)
    result = check_init_loss(timm_resnet(), x, y, 3)
    assert result.status == "PASS", result.summary
    assert result.details["expected"] == pytest.approx(math.log(3))
    assert abs(result.details["loss"] - math.log(3)) < 0.5


def test_init_loss_warns_on_huge_final_layer():
    model = timm_resnet()
    with torch.no_grad():
        model.fc.weight.mul_(1000)
    x, y = batch(size=32)
    result = check_init_loss(model, x, y, 3)
    assert result.status == "WARN"
    assert result.details["loss"] > 2 * math.log(3)
    assert "init scale" in result.hint


def test_init_loss_fails_when_head_does_not_match_classes():
    x, y = batch(size=32)
    result = check_init_loss(timm_resnet(), x, y, 5)
    assert result.status == "FAIL"
    assert "head" in result.hint


# --------------------------------------------------------------------------- gradient flow


def test_gradient_flow_passes_timm_resnet_with_zero_init_branches():
    x, y = batch(size=32)
    result = check_gradient_flow(timm_resnet(), x, y)
    assert result.status == "PASS", result.summary
    statuses = {row["layer"]: row["status"] for row in result.details["layers"]}
    # timm zero-initialises the last BN of each block: the branch is silent by design
    assert statuses["layer1.0.conv1"] == "gated at init"
    assert statuses["fc"] == "ok"
    assert_json(result)


def test_gradient_flow_flags_a_layer_multiplied_by_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Scale(0.0),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 3))
    x, y = batch()
    result = check_gradient_flow(model, x, y)
    assert result.status == "WARN"
    assert "vanishing" in result.summary and "0" in result.details["layers"][0]["layer"]
    assert {row["layer"]: row["status"] for row in result.details["layers"]}["0"] == "vanishing"


def test_gradient_flow_flags_dead_relu():
    model = small_cnn()
    model.bn = nn.Identity()
    with torch.no_grad():
        model.conv.bias.fill_(-100.0)
    x, y = batch()
    result = check_gradient_flow(model, x, y)
    assert result.status == "WARN"
    assert "dead ReLU" in result.summary and "(act)" in result.summary
    dead = {row["activation"]: row["dead_fraction"] for row in result.details["activations"]}
    assert dead["act"] == 1.0


def test_train_mode_checks_skip_a_batch_of_one():
    x, y = batch(n=1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    assert check_gradient_flow(model, x, y).status == "SKIP"
    assert lr_range_test(model, x, y, steps=5).status == "SKIP"


# --------------------------------------------------------------------------- cost


def test_cost_counts_conv_flops_and_params_exactly():
    model = nn.Conv2d(3, 8, 3, padding=1)
    x, y = torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long)
    result = check_cost(model, x, y, torch.device("cpu"))
    assert result.status == "PASS", result.summary
    # a multiply-add is two FLOPs: 2 * C_out * H * W * C_in * k * k per image
    assert result.details["flops_per_image"] == 2 * 8 * 16 * 16 * 3 * 3 * 3
    assert result.details["params_total"] == 8 * 3 * 3 * 3 + 8
    assert result.details["activation_bytes_per_image"] == 8 * 16 * 16 * 4
    assert result.details["forward_s"] > 0 and result.details["forward_backward_s"] > 0
    assert_json(result)


def test_cost_counts_linear_flops_exactly():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    model[1].requires_grad_(False)
    x, y = torch.randn(4, 3, 4, 4), torch.zeros(4, dtype=torch.long)
    result = check_cost(model, x, y, torch.device("cpu"))
    assert result.details["flops_per_image"] == 2 * 48 * 5
    assert result.details["params_trainable"] == 0
    assert result.details["forward_backward_s"] is None


# --------------------------------------------------------------------------- modes


def test_modes_pass_with_dropout_that_respects_eval():
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(3 * 16 * 16, 3))
    x, _ = batch()
    result = check_modes(model, x)
    assert result.status == "PASS", result.summary
    assert result.details["eval_relative_difference"] == 0.0
    assert result.details["train_eval_relative_difference"] > 0


def test_modes_fail_when_random_in_eval():
    x, _ = batch()
    result = check_modes(NoisyInEval(), x)
    assert result.status == "FAIL"
    assert "random in eval mode" in result.hint


def test_modes_warn_on_negative_batchnorm_variance():
    model = small_cnn()
    model.bn.running_var[0] = -1e-6  # still above -eps: outputs stay finite
    x, _ = batch()
    result = check_modes(model, x)
    assert result.status == "WARN"
    assert result.details["batchnorm_negative_var"] == ["bn"]


def test_modes_fail_on_non_finite_outputs_and_name_the_layer():
    model = small_cnn()
    model.bn.running_mean[0] = float("nan")
    x, _ = batch()
    result = check_modes(model, x)
    assert result.status == "FAIL"
    assert "non-finite" in result.summary and "bn" in result.summary
    assert_json(result)


# --------------------------------------------------------------------------- learning rate


def test_lr_range_flags_a_diverging_lr_and_suggests_a_sane_one():
    x, y = batch(size=32)
    model = timm_resnet()
    result = lr_range_test(model, x, y, configured_lr=10.0, steps=30)
    assert result.status == "WARN"
    assert "configured lr 10 diverges" in result.summary
    details = result.details
    assert details["diverged_at"] is not None and details["diverged_at"] <= 10.0
    assert 1e-4 <= details["suggested_lr"] <= 1.0
    assert len(details["lrs"]) == len(details["losses"]) <= 30
    assert_json(result)
    # the same sweep accepts a modest lr
    assert lr_range_test(model, x, y, configured_lr=1e-3, steps=30).status == "PASS"


# --------------------------------------------------------------------------- overfit


def test_overfit_result_passes_a_memorised_subset():
    result = check_overfit_result([1.1, 0.4, 0.02], [0.3, 0.8, 1.0])
    assert result.status == "PASS"
    assert result.details["final_accuracy"] == 1.0


CHANCE = math.log(10)
FALLING = [CHANCE * 0.97 ** i for i in range(60)]  # 2.30 -> 0.39, still falling 3% a step
STUCK = [CHANCE + 0.01 * (-1) ** i for i in range(60)]  # what a model that ignores its input does


@pytest.mark.parametrize("losses, why", [
    (STUCK, "stayed near chance"),
    ([0.9 + 0.001 * (i % 3) for i in range(60)], "never fell"),  # e.g. frozen, from weights that fit a bit
    ([1.0 + 0.1 * i for i in range(60)], "diverged"),
    (FALLING[:30] + [float("nan")], "non-finite at step 31"),
])
def test_overfit_result_fails_when_stuck_diverging_or_non_finite(losses, why):
    result = check_overfit_result(losses, [0.2] * len(losses), chance=CHANCE)
    assert result.status == "FAIL" and why in result.hint
    assert "labels aligned with images" in result.hint


def test_overfit_result_fails_without_steps():
    assert check_overfit_result([], []).status == "FAIL"


@pytest.mark.parametrize("losses, stopped, raise_", [
    (FALLING, "the step limit (10x --overfit-steps)", "raise --overfit-steps"),
    (FALLING, "the time limit (--overfit-seconds)", "raise --overfit-seconds"),
    (FALLING[:30] + [0.9] * 30, "the loss stopped falling clearly", "try another --lr"),  # learned, then a plateau
])
def test_overfit_result_warns_when_learning_but_not_memorised(losses, stopped, raise_):
    result = check_overfit_result(losses, [0.9] * len(losses), chance=CHANCE, stopped=stopped)
    assert result.status == "WARN" and raise_ in result.hint
    assert "learning: loss" in result.summary and "90.0%" in result.summary and stopped in result.summary


# --------------------------------------------------------------------------- no side effects

CHECKS = {
    "gradients": lambda m, x, y: check_gradients(m, x, y, params_per_layer=1),
    "init_loss": lambda m, x, y: check_init_loss(m, x, y, 3),
    "gradient_flow": check_gradient_flow,
    "cost": lambda m, x, y: check_cost(m, x, y, torch.device("cpu")),
    "modes": lambda m, x, y: check_modes(m, x),
    "lr_range": lambda m, x, y: lr_range_test(m, x, y, steps=10),
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_checks_leave_the_model_untouched(name):
    model = timm_resnet()
    x, y = batch(n=4, size=32)
    model.train()
    with torch.no_grad():
        model(x)  # running stats away from their defaults
    model.layer1.eval()  # mixed modes must come back exactly
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()
    result = CHECKS[name](model, x, y)
    assert result.status in {"PASS", "WARN", "FAIL", "SKIP"}
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert result.seconds > 0
    assert_json(result)


# --------------------------------------------------------------------------- the command on real data

import json as _json
import shutil as _shutil

from typer.testing import CliRunner

from cnnxfer.cli import app as _app
from cnnxfer.config import SanityConfig
from cnnxfer.sanity import run_checks


def _digits_subset(digits_folder, root, per_class=12, classes=("0", "1", "2", "3")):
    for c in classes:
        (root / c).mkdir(parents=True)
        for f in sorted((digits_folder / c).iterdir())[:per_class]:
            _shutil.copy(f, root / c / f.name)
    return root


def test_sanity_check_command_passes_a_sound_setup_and_writes_json(digits_folder, tmp_path, cli_runner):
    data = _digits_subset(digits_folder, tmp_path / "digits")
    out = tmp_path / "report.json"
    result = cli_runner.invoke(_app, ["sanity-check", str(data), "--model", "resnet10t", "--json", str(out),
                                      "--only", "data,init_loss,overfit,gradcheck,modes"])
    assert result.exit_code == 0, result.stdout + result.stderr
    report = _json.loads(out.read_text())
    assert report["passed"] is True and report["counts"]["FAIL"] == 0
    assert [c["name"] for c in report["checks"]] == ["data", "init_loss", "overfit", "gradcheck", "modes"]
    overfit = next(c for c in report["checks"] if c["name"] == "overfit")
    assert overfit["status"] == "PASS" and overfit["details"]["final_accuracy"] == 1.0
    assert "PASS" in result.stdout and "overfit" in result.stdout


def _factory(tmp_path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text("import torch\nimport torch.nn as nn\n\n" + body)
    return f"{path}:build"


TWO_CONV = (  # ~1.5k parameters: correct, but it needs ~600-850 steps to memorise 16 digits
    "def build(num_classes):\n"
    "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),\n"
    "                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
    "                         nn.Flatten(), nn.Linear(16, num_classes))\n")
BLIND = (
    "class Blind(nn.Module):\n"
    "    def __init__(self, num_classes):\n"
    "        super().__init__()\n"
    "        self.features = nn.Conv2d(3, 8, 3)\n"
    "        self.fc = nn.Linear(8, num_classes)\n"
    "    def forward(self, x):\n"
    "        h = self.features(x).mean((2, 3))\n"
    "        return self.fc(h * 0)  # the input never reaches the logits\n"
    "def build(num_classes):\n"
    "    return Blind(num_classes)\n")


def _overfit_check(tmp_path, data, factory, *args) -> tuple[int, dict]:
    out = tmp_path / "report.json"
    result = CliRunner().invoke(_app, ["sanity-check", str(data), "--model", factory, "--only", "overfit",
                                       "--precision", "fp32", "--json", str(out), *args])
    assert result.exit_code in (0, 1), result.stdout + result.stderr
    return result.exit_code, _json.loads(out.read_text())["checks"][0]


def test_a_correct_small_cnn_that_learns_slowly_does_not_fail(digits_folder, tmp_path):
    """The issue's case: 93.8% and a loss of ~0.6 after 300 steps, still falling: the check goes on
    and the model memorises the 16 digits (it used to be an overfit FAIL at step 300)."""
    data = _digits_subset(digits_folder, tmp_path / "digits", classes=tuple("0123456789"))
    code, check = _overfit_check(tmp_path, data, _factory(tmp_path, "two_conv", TWO_CONV))
    assert code == 0 and check["status"] == "PASS", check["summary"]
    assert 300 < check["details"]["steps"] < 3000 and check["details"]["images"] == 16
    # with no time to go on past 150 steps it is learning, not memorised: WARN with the figures
    code, check = _overfit_check(tmp_path, data, _factory(tmp_path, "two_conv", TWO_CONV), "--overfit-steps", "150",
                                 "--overfit-seconds", "0")
    assert code == 0 and check["status"] == "WARN" and check["details"]["steps"] == 150
    assert "learning: loss" in check["summary"] and "raise --overfit-seconds" in check["hint"]


def test_a_model_that_ignores_its_input_fails_the_overfit_check(digits_folder, tmp_path):
    data = _digits_subset(digits_folder, tmp_path / "digits")
    code, check = _overfit_check(tmp_path, data, _factory(tmp_path, "blind", BLIND), "--overfit-steps", "60")
    assert code == 1 and check["status"] == "FAIL" and "labels aligned with images" in check["hint"]
    assert "stayed near chance" in check["hint"] and check["details"]["steps"] == 60  # stuck: no extension


@pytest.mark.parametrize("freeze", ["requires_grad", "lr 0"])
def test_a_frozen_network_fails_the_overfit_check(digits_folder, tmp_path, freeze):
    data = _digits_subset(digits_folder, tmp_path / "digits")
    body = TWO_CONV.replace("def build(", "def _build(") + (
        "def build(num_classes):\n    return _build(num_classes).requires_grad_(False)\n"
        if freeze == "requires_grad" else "build = _build\n")
    code, check = _overfit_check(tmp_path, data, _factory(tmp_path, "frozen", body), "--overfit-steps", "60",
                                 *(["--lr", "0"] if freeze == "lr 0" else []))
    assert code == 1 and check["status"] == "FAIL"
    assert ("no trainable parameter" in check["summary"] if freeze == "requires_grad" else
            check["details"]["steps"] == 60 and check["details"]["end_loss"] == pytest.approx(check["details"]["start_loss"]))


def test_labels_not_aligned_with_the_images_fail_the_overfit_check():
    """Labels shuffled apart from their images at every step (a data pipeline that shuffles images
    and labels separately) leave nothing to learn: the loss stays at chance, however able the
    model. (A fixed relabelling is a dataset like any other: a network memorises it.)"""
    from cnnxfer.overfit import Budget, check_overfit, repeat
    from cnnxfer.session import resolve_session

    x, y = batch(n=16, size=16, classes=4)
    torch.manual_seed(0)
    model = SmallCNN(classes=4)
    aligned = check_overfit(model, repeat(x, y), resolve_session("cpu", "fp32", 0), budget=Budget(steps=100))
    assert aligned.status == "PASS"

    def shuffled():
        g = torch.Generator().manual_seed(0)
        while True:
            yield x, y[torch.randperm(len(y), generator=g)]

    result = check_overfit(model, shuffled(), resolve_session("cpu", "fp32", 0), budget=Budget(steps=100))
    assert result.status == "FAIL" and "stayed near chance" in result.hint
    assert result.details["chance_loss"] == pytest.approx(math.log(4))


def test_an_exception_inside_a_check_is_reported_as_an_error(digits_folder, tmp_path):
    data = _digits_subset(digits_folder, tmp_path / "digits")
    body = (TWO_CONV.replace("def build(", "def _build(") +
            "class Fragile(nn.Module):\n"
            "    def __init__(self, num_classes):\n"
            "        super().__init__()\n"
            "        self.net = _build(num_classes)\n"
            "    def forward(self, x):\n"
            "        if self.training:\n"
            "            raise RuntimeError('boom in train mode')\n"
            "        return self.net(x)\n"
            "def build(num_classes):\n"
            "    return Fragile(num_classes)\n")
    out = tmp_path / "report.json"
    result = CliRunner().invoke(_app, ["sanity-check", str(data), "--model", _factory(tmp_path, "fragile", body),
                                       "--only", "init_loss,overfit", "--json", str(out)])
    assert result.exit_code == 1, result.stdout + result.stderr
    init_loss, overfit = _json.loads(out.read_text())["checks"]
    assert init_loss["status"] == "PASS"  # eval mode: the other checks still run
    assert overfit["status"] == "ERROR" and "RuntimeError: boom in train mode" in overfit["summary"]
    assert "fragile.py:" in overfit["summary"] and "overfit FAIL" not in result.stdout
    assert "1 raised an error" in result.stdout


def test_lr_of_ten_on_a_real_model_and_data_is_flagged(digits_folder, tmp_path):
    data = _digits_subset(digits_folder, tmp_path / "digits", per_class=8, classes=tuple("0123456789"))
    config = SanityConfig(data=data, model="resnet10t", only=("lr_find",), lr=10.0, out_dir=tmp_path)
    check = run_checks(config).checks[0]
    assert check.name == "lr_find" and check.status == "WARN" and "diverges" in check.summary
    sane = run_checks(SanityConfig(data=data, model="resnet10t", only=("lr_find",), out_dir=tmp_path)).checks[0]
    assert sane.status == "PASS" and 1e-3 < sane.details["suggested_lr"] < 10


def test_data_check_finds_duplicates_unreadable_files_and_imbalance(tmp_path, make_images):
    root = tmp_path / "data"
    make_images(root / "train", {"a": 30, "b": 2})
    make_images(root / "val", {"a": 3, "b": 1}, seed=99)
    leaked = root / "val" / "a" / "leak.jpg"
    _shutil.copy(root / "train" / "a" / "img0.jpg", leaked)
    (root / "train" / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    report = run_checks(SanityConfig(data=root, model="resnet10t", only=("data",), out_dir=tmp_path))
    check = report.checks[0]
    assert check.status == "WARN"
    assert check.details["duplicates_train_val"] == [[str(root / "train" / "a" / "img0.jpg"), str(leaked)]]
    assert check.details["unreadable"] == 1 and check.details["imbalance_ratio"] == 10.0
    assert "broken.jpg" in (tmp_path / "sanity.skipped.csv").read_text()


def test_unknown_check_name_is_a_usage_error(tiny_folder, cli_runner):
    result = cli_runner.invoke(_app, ["sanity-check", str(tiny_folder), "--model", "resnet10t", "--only", "overfitt"])
    assert result.exit_code == 2 and "overfitt" in result.stderr
