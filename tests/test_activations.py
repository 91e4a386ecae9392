"""The one activation-capture utility: what it keeps, what it changes, when it stops, and that it
always removes its hooks."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from cnnxfer.activations import Activations, capture


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(5, 2)).eval()


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_outputs_inputs_and_order_match_a_manual_forward():
    model, x = _net(), torch.randn(2, 3, 8, 8)
    with torch.no_grad(), Activations(model, ["2", "0"]) as acts:
        model(x)
        assert acts.order == ["0", "2"] and acts.calls == {"0": 1, "2": 1}
        kept = dict(acts.outputs)
    first = model[0](x)
    assert torch.equal(kept["0"], first) and torch.equal(kept["2"], model[2](model[1](first)))
    assert _hooks(model) == 0
    with torch.no_grad():
        inputs = capture(model, x, ["5"], keep="input")
        assert torch.equal(inputs["5"], model[4](model[3](model[2](model[1](model[0](x))))))


def test_stop_skips_the_rest_of_the_forward_and_hooks_go_even_on_errors():
    model, x = _net(), torch.randn(1, 3, 8, 8)
    ran = []
    model[5].register_forward_hook(lambda *a: ran.append(True))
    out = capture(model, x, ["1"])
    assert out["1"].shape == (1, 4, 6, 6) and not ran  # the Linear never ran
    assert _hooks(model) == 1  # only the test's own hook is left
    with pytest.raises(RuntimeError), Activations(model, ["0"]):
        model(torch.randn(1, 2, 8, 8))  # wrong channel count
    assert _hooks(model) == 1
    with pytest.raises(KeyError, match="no module named 'nope'"):
        Activations(model, ["nope"])


def test_callbacks_can_replace_inputs_and_outputs():
    model, x = _net(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        reference = model(x)
        with Activations(model, ["5"], keep=None, on_output=lambda name, m, args, out: out * 0):
            assert torch.equal(model(x), torch.zeros_like(reference))
        with Activations(model, ["5"], keep=None, on_input=lambda name, m, args: (args[0] * 0,)):
            assert torch.allclose(model(x), model[5].bias.expand_as(reference))
        assert torch.equal(model(x), reference)


def test_a_predicate_selects_modules_and_shared_modules_count_every_call():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(3, 3), relu, nn.Linear(3, 3), relu)
    with Activations(model, lambda name, m: isinstance(m, nn.ReLU), keep=None) as acts:
        model(torch.randn(2, 3))
        assert acts.calls == {"1": 2}  # one module, registered under its first name, called twice
        acts.clear()
        assert acts.calls == {}


def test_gradients_flow_from_kept_outputs():
    model = timm.create_model("resnet10t").eval()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    with Activations(model, ["layer2"]) as acts:
        model(x)
        acts.outputs["layer2"][0, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
