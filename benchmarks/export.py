"""How fast does an exported ONNX file run in onnxruntime, against PyTorch eager in cnnxfer?

resnet18 at 224 px with seeded random weights saved to a file (nothing downloads), exported with
`cnnxfer export --model resnet18 --weights FILE --format onnx` (verified on a few of the bundled
photos), then run on the same uint8 batches, as `predict` feeds them, by:
  - PyTorch eager in fp32 (cnnxfer's TorchPredictor: channels_last on the CPU),
  - PyTorch eager at cnnxfer's default precision (`--precision auto`: bf16 autocast on a CPU with
    native bf16, fp32 elsewhere; the table says which),
  - onnxruntime on the CPU (cnnxfer's OnnxPredictor: the exported file, fp32, its default threads).
Each includes the normalisation (inside the ONNX graph, on the device for PyTorch). Images/s from
wall time, batch 1 and 32, measured side by side in one run: the backends take turns within every
repeat (interleaved, so a burst of load from other jobs hits them alike) and the best repeat of each
is kept. Image decoding is left out: it costs every backend the same.

    python benchmarks/export.py [--repeats 5] [--seconds 1.5]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, save_random_weights, write_jpeg_folder

from cnnxfer.config import ExportConfig
from cnnxfer.export import OnnxPredictor, export_model, read_info
from cnnxfer.models import load_model
from cnnxfer.predictor import TorchPredictor
from cnnxfer.session import resolve_session

MODEL, SIZE, BATCHES = "resnet18", 224, (1, 32)


def images_per_second(predictor, batch: torch.Tensor, seconds: float) -> float:
    """Calls on `batch` for about `seconds` (at least 2); images per second of wall time."""
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        predictor(batch)
        calls += 1
    return calls * len(batch) / (time.perf_counter() - start)


def build(work: Path) -> dict:
    weights = save_random_weights(MODEL, work / f"{MODEL}.safetensors")
    photos = write_jpeg_folder(work / "photos", 18, size=256)
    result = export_model(ExportConfig(model=MODEL, weights=str(weights), data=photos, out=work / f"{MODEL}.onnx"))
    v = result.verification
    print(f"export: {result.seconds:.1f} s, opset {result.info.opset}, {result.bytes / 2**20:.1f} MiB; verified on "
          f"{v.images} photos: max |logit diff| {v.max_abs_diff:.2e} (logits up to {v.max_abs_logit:.2f}), top-1 "
          f"agreement {v.top1_agreement:.0%}")
    loaded = load_model(MODEL, str(weights))
    classes, config = read_info(result.out).classes, loaded.data_config
    fp32, auto = resolve_session("cpu", "fp32", 0), resolve_session("cpu", "auto", 0)
    return {
        "PyTorch eager fp32": TorchPredictor(loaded.model, config, classes, fp32),
        f"PyTorch eager {auto.precision} (cnnxfer default)": TorchPredictor(loaded.model, config, classes, auto),
        "onnxruntime fp32 (exported file)": OnnxPredictor(result.out, read_info(result.out), fp32),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.5, help="per backend, batch size and repeat")
    args = parser.parse_args()
    print(machine())
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        backends = build(Path(tmp))
        g = torch.Generator().manual_seed(0)
        inputs = {b: torch.randint(0, 256, (b, 3, SIZE, SIZE), dtype=torch.uint8, generator=g) for b in BATCHES}
        reference = backends["PyTorch eager fp32"](inputs[32])
        for name, predictor in backends.items():  # warm-up, and how far each is from fp32 PyTorch
            diff = np.abs(predictor(inputs[32]) - reference).max()
            predictor(inputs[1])
            print(f"{name}: max |logit diff| to PyTorch fp32 {diff:.2e}")
        best = {(name, b): 0.0 for name in backends for b in BATCHES}
        for _ in range(args.repeats):
            for b in BATCHES:
                for name, predictor in backends.items():
                    best[name, b] = max(best[name, b], images_per_second(predictor, inputs[b], args.seconds))
    base = {b: best["PyTorch eager fp32", b] for b in BATCHES}
    rows = [[name] + [f"{best[name, b]:.1f} ({best[name, b] / base[b]:.2f}x)" for b in BATCHES] for name in backends]
    print(f"\n{MODEL} at {SIZE} px, images/s (x PyTorch eager fp32), best of {args.repeats} interleaved repeats; "
          f"torch {torch.get_num_threads()} threads, onnxruntime its default")
    print_table(["backend"] + [f"batch {b}" for b in BATCHES], rows)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
