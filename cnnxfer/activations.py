"""One way to see inside a model: forward hooks on named modules, removed when done.

Everything in cnnxfer that needs what a layer takes in or gives out goes through `Activations`:
the extractor's `--layers` and a custom model's pre-logits features (features, models), the
gradient check's probes (gradcheck), the dead-unit and activation-memory counts (sanity), and
every `cnnxfer inspect` view. Hooks are registered once, for as many forwards as the caller
likes, and always removed (a context manager), so no model is left carrying them.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn

Selector = Sequence[str] | Callable[[str, nn.Module], bool]


class StopForward(Exception):
    """Raised by a hook once every requested layer has produced its output (see `capture`)."""


class Activations:
    """Capture, and optionally change, what named modules take in and give out during forwards.

        with Activations(model, ["layer1", "layer3"]) as acts:
            model(x)
        acts.outputs["layer1"]

    Args:
        model: any nn.Module.
        layers: module names ("" is the model itself), or a predicate (name, module) -> bool over
            `model.named_modules()` (names of the root module are reported as "<root>").
        keep: "output" (default) keeps each module's last output in `outputs`, "input" its first
            positional input in `inputs`, None keeps nothing (the callbacks do the work).
        detach: keep detached tensors (default False, so gradients can flow from them: Grad-CAM,
            receptive fields).
        on_input: (name, module, args) -> new args or None, before the module runs.
        on_output: (name, module, args, output) -> new output or None, after it ran.
        stop: raise StopForward once every named layer has run (`capture` catches it): the rest
            of the forward, often most of its cost, is skipped.

    `order` lists the modules in the order their forwards finished; `calls` counts the forwards of
    each module since the last `clear()` (a module called twice, such as a shared ReLU, counts 2).
    """

    def __init__(self, model: nn.Module, layers: Selector, *, keep: str | None = "output", detach: bool = False,
                 on_input: Callable | None = None, on_output: Callable | None = None, stop: bool = False):
        if keep not in ("output", "input", None):
            raise ValueError(f"keep must be 'output', 'input' or None, not {keep!r}")
        self.keep, self.detach, self.on_input, self.on_output = keep, detach, on_input, on_output
        self.modules = _select(model, layers)
        self.stop = stop
        self.outputs: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.order: list[str] = []
        self.calls: dict[str, int] = {}
        self._handles = []
        for name, module in self.modules:
            if keep == "input" or on_input is not None:
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self._handles.append(module.register_forward_hook(self._post_hook(name)))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.modules]

    def _keep(self, value):
        value = value[0] if isinstance(value, (tuple, list)) else value
        return value.detach() if self.detach and torch.is_tensor(value) else value

    def _pre_hook(self, name: str):
        def hook(module, args):
            if self.keep == "input" and args:
                self.inputs[name] = self._keep(args[0])
            if self.on_input is not None:
                return self.on_input(name, module, args)
            return None
        return hook

    def _post_hook(self, name: str):
        def hook(module, args, output):
            self.calls[name] = self.calls.get(name, 0) + 1
            if name not in self.order:
                self.order.append(name)
            if self.on_output is not None:
                changed = self.on_output(name, module, args, output)
                output = output if changed is None else changed
            if self.keep == "output":
                self.outputs[name] = self._keep(output)
            if self.stop and len(self.order) == len(self.modules):
                raise StopForward()
            return output if self.on_output is not None else None
        return hook

    def clear(self) -> None:
        """Forget what was kept (the hooks stay): call between batches so tensors can be freed."""
        self.outputs.clear()
        self.inputs.clear()
        self.calls.clear()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "Activations":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _select(model: nn.Module, layers: Selector) -> list[tuple[str, nn.Module]]:
    if callable(layers):
        return [(name or "<root>", module) for name, module in model.named_modules() if layers(name or "<root>", module)]
    out = []
    for name in layers:
        try:
            out.append((name or "<root>", model.get_submodule(name) if name not in ("", "<root>") else model))
        except AttributeError:
            raise KeyError(f"the model has no module named '{name}'") from None
    return out


def capture(model: nn.Module, x: torch.Tensor, layers: Iterable[str], *, keep: str = "output",
            detach: bool = True) -> dict[str, torch.Tensor]:
    """The outputs (or inputs) of `layers` for the input `x`, running the model only as far as needed."""
    names = list(dict.fromkeys(layers))
    with Activations(model, names, keep=keep, detach=detach, stop=True) as acts:
        try:
            model(x)
        except StopForward:
            pass
    found = acts.outputs if keep == "output" else acts.inputs
    missing = [n for n in names if n not in found]
    if missing:
        raise RuntimeError(f"layer(s) {', '.join(missing)} did not run in the forward pass")
    return {n: found[n] for n in names}
