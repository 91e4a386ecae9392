"""timm without torch._dynamo at import (cnnxfer/timm_import.py): faster start-up, torch left as it was."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
import torch
original = torch.compiler.disable
from cnnxfer.models import build_architecture
model = build_architecture("resnet10t", 3).eval()  # what every command does first
print("dynamo after timm:", "torch._dynamo" in sys.modules, "torch._dynamo.utils" in sys.modules)
print("disable restored:", torch.compiler.disable is original)
x = torch.randn(2, 3, 48, 48)
y = model(x)
import torchvision
box = torchvision.ops.roi_align(torch.arange(64.).view(1, 1, 8, 8), [torch.tensor([[0., 0., 3., 3.]])], 2, aligned=True)
print("roi_align:", box.flatten().tolist())
from timm.layers.typing import disable_compiler  # the decorator timm captured while it imported
double = disable_compiler(lambda a: a * 2)
compiled = torch.compile(lambda a: double(a) + 1, backend="eager")
print("disabled function compiles:", compiled(torch.ones(2)).tolist())
import torch._dynamo
print("real dynamo:", callable(getattr(torch._dynamo, "disable", None)))
print("model compiles:", torch.allclose(torch.compile(model, backend="eager")(x), y, atol=1e-5))
"""


def test_timm_loads_without_dynamo_and_torch_compile_still_works():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "dynamo after timm: False False"
    assert lines[1] == "disable restored: True"
    # the same op in a process that imports torchvision the ordinary way (dynamo loaded)
    ordinary = subprocess.run([sys.executable, "-c", "import torch, torchvision\n" + CHECK.split("import torchvision\n")[1]
                               .split("from timm")[0]], env=env, capture_output=True, text=True, timeout=300)
    assert ordinary.returncode == 0, ordinary.stderr
    assert lines[2] == ordinary.stdout.splitlines()[0] and lines[2].startswith("roi_align: [")
    assert lines[3:] == ["disabled function compiles: [3.0, 3.0]", "real dynamo: True", "model compiles: True"]
