"""Device, precision and worker selection (cnnxfer/device.py) and `cnnxfer info`."""
from __future__ import annotations

import re

import pytest
import torch

from cnnxfer import device as dev
from cnnxfer.cli import app
from cnnxfer.errors import DeviceError, UsageError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")


def _cpuinfo_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return ""


@pytest.mark.skipif(torch.cuda.is_available() or dev._mps_available(), reason="auto picks an accelerator here")
def test_auto_is_cpu_without_accelerator():
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert dev.resolve_device(None) == torch.device("cpu")  # an unset option means auto


@pytest.mark.parametrize("spec", ["cpu", "CPU", " cpu "])
def test_cpu_spellings(spec):
    assert dev.resolve_device(spec) == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_unavailable_is_a_clear_device_error(spec):
    with pytest.raises(DeviceError) as info:
        dev.resolve_device(spec)
    assert info.value.exit_code == 2
    assert "cuda" in str(info.value) and "not available" in str(info.value)


@pytest.mark.skipif(dev._mps_available(), reason="checks the no-MPS error path")
def test_mps_unavailable_is_a_device_error():
    with pytest.raises(DeviceError, match="mps is not available"):
        dev.resolve_device("mps")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "tpu", "cuda0", "cpu:1"])
def test_bad_device_spec_is_usage_error_naming_the_choices(spec):
    with pytest.raises(UsageError) as info:
        dev.resolve_device(spec)
    assert info.value.exit_code == 2
    assert spec.strip().lower() in str(info.value) and "auto, cpu, cuda" in str(info.value)


def test_cpu_bf16_detection_matches_cpuinfo():
    flags = _cpuinfo_flags()
    expected = bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags)) or (
        "aarch64" in __import__("platform").machine() and re.search(r"\bbf16\b", flags) is not None
    )
    assert dev.cpu_has_native_bf16() is expected


def test_precision_rules_on_cpu():
    cpu = torch.device("cpu")
    assert dev.resolve_precision("fp32", cpu) is None
    assert dev.resolve_precision("bf16", cpu) is torch.bfloat16
    auto = dev.resolve_precision("auto", cpu)
    assert auto is (torch.bfloat16 if dev.cpu_has_native_bf16() else None)
    assert dev.resolve_precision(None, cpu) is auto
    with pytest.raises(UsageError, match="fp16 is not supported on CPU"):
        dev.resolve_precision("fp16", cpu)
    with pytest.raises(UsageError, match="unknown precision 'fp8'"):
        dev.resolve_precision("fp8", cpu)


def test_precision_auto_follows_cpuinfo(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    assert dev.resolve_precision("auto", cpu) is None
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: True)
    assert dev.resolve_precision("auto", cpu) is torch.bfloat16


def test_autocast_context():
    cpu = torch.device("cpu")
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with dev.autocast(cpu, None):
        assert layer(x).dtype == torch.float32
    with dev.autocast(cpu, torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("cores", [1, 2, 16])
def test_decode_threads_use_every_core(monkeypatch, cores, device):
    monkeypatch.setattr(dev.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert dev.default_decode_threads(torch.device(device)) == cores


def test_runtime_on_cpu_takes_turns_and_honours_workers():
    rt = dev.resolve_runtime("cpu", "fp32", None)
    assert rt.device == torch.device("cpu") and rt.dtype is None and rt.precision == "float32"
    assert rt.ahead == 0 and not rt.pin_memory and rt.decode_threads == dev.usable_cores()
    assert dev.resolve_runtime("cpu", "bf16", 0).decode_threads == 0
    assert dev.resolve_runtime("cpu", "bf16", 3).dtype is torch.bfloat16
    with pytest.raises(UsageError, match="--workers"):
        dev.resolve_runtime("cpu", "auto", -1)


def test_describe_environment():
    info = dev.describe_environment("cpu", "fp32")
    assert info.device == "cpu" and info.precision == "float32"
    assert info.versions["torch"] == torch.__version__
    assert info.threads == torch.get_num_threads()


def test_info_command(cli_runner):
    result = cli_runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    expected = str(dev.resolve_device("auto"))
    assert expected in result.stdout and torch.__version__ in result.stdout


@no_cuda
def test_info_command_bad_device_exits_2(cli_runner):
    result = cli_runner.invoke(app, ["info", "--device", "cuda"])
    assert result.exit_code == 2
    assert "not available" in result.stderr and "Traceback" not in result.output


def test_precision_vocabularies_translate_both_ways():
    from cnnxfer.config import Precision

    for option in ("fp32", "bf16", "fp16"):
        name = dev.precision_dtype_name(option)
        assert name == dev.dtype_name(dev.resolve_precision(option, torch.device("cuda")))
        assert dev.dtype_name_precision(name) == option
        assert dev.precision_dtype_name(Precision(option)) == name  # a config's enum reads the same
    assert dev.dtype_name(None) == "float32" and dev.dtype_name(torch.bfloat16) == "bfloat16"
    assert dev.precision_dtype_name("auto") is None and dev.dtype_name_precision("float64") is None
