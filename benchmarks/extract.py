"""How fast is `cnnxfer extract`, against the model alone and against a plain PyTorch loop?

One run, the same JPEG files for every measurement:
  1. cnnxfer: `extract_features` end to end (discovery, model load, decode, forward, Parquet),
     default precision (auto) and default loader workers.
  2. model only: the same model on preloaded, preprocessed tensors, same batch size and the same
     precision path (autocast + channels_last where cnnxfer uses them): the most cnnxfer could reach.
  3. plain: torchvision ImageFolder + DataLoader, fp32, NCHW - the loop most tutorials write.
and the cosine similarity of cnnxfer's embeddings to fp32 embeddings of the same tensors.

Targets: cnnxfer / model-only >= 0.8, cnnxfer / plain >= 2.0, cosine >= 0.999.

On a machine shared with other jobs, wall-clock rates swing with their load; `--repeat N`
interleaves N rounds and keeps each one's best, and `--single-thread` measures the work instead:
one torch thread, no loader workers, CPU seconds rather than wall seconds.

    python benchmarks/extract.py [--model resnet18] [--images 512] [--batch-size 32] [--workers N]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import cpu_seconds, machine, print_table, save_random_weights, verdict, write_jpeg_folder


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="cnnxfer loader workers (default: cnnxfer's own)")
    parser.add_argument("--plain-workers", type=int, default=2, help="workers of the plain loop (tutorial default 2)")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds of 1-3; the best of each is kept")
    parser.add_argument("--single-thread", action="store_true",
                        help="1 torch thread, no loader workers, CPU time: the work, robust to other jobs' load")
    parser.add_argument("--keep", type=Path, default=None, help="write the images and outputs here and keep them")
    return parser.parse_args()


def preload(paths: list[Path], transform) -> torch.Tensor:
    """Decode + transform in one thread, as in a loader worker (torch gives each worker 1 thread;
    in a 2-thread main process the spinning OpenMP thread slows this 20x on a busy machine)."""
    from cnnxfer.data import load_image

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.stack([transform(load_image(p)) for p in paths])
    finally:
        torch.set_num_threads(threads)


@torch.inference_mode()
def model_only(model, x: torch.Tensor, batch_size: int, dtype, channels_last: bool, clock) -> tuple[np.ndarray, float]:
    """(embeddings, seconds) of the model alone on preloaded tensors; one untimed warm-up batch."""
    from cnnxfer import device as dev
    from cnnxfer import models

    cpu = torch.device("cpu")
    model = model.to(memory_format=torch.channels_last) if channels_last else model

    def forward(batch):
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with dev.autocast(cpu, dtype):
            return models.pre_logits(model, batch).float()

    forward(x[:batch_size])
    start = clock()
    out = [forward(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy(), clock() - start


@torch.inference_mode()
def plain_loop(name: str, weights: Path, root: Path, batch_size: int, workers: int) -> np.ndarray:
    """The usual tutorial loop: ImageFolder, Resize/CenterCrop/Normalize, fp32 NCHW."""
    import timm
    import torchvision
    from safetensors.torch import load_file
    from torchvision import transforms as T

    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(load_file(str(weights)))
    model.reset_classifier(0)
    model.eval()
    transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    dataset = torchvision.datasets.ImageFolder(str(root), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    return np.concatenate([model(x).numpy() for x, _ in loader])


def best(times: dict, key: str, seconds: float) -> None:
    times[key] = min(seconds, times.get(key, float("inf")))


def main() -> int:
    args = parse_args()
    from cnnxfer import ExtractConfig, data, extract_features, models, read_features
    from cnnxfer import device as dev

    cpu = dev.resolve_device("cpu")
    if args.single_thread:
        torch.set_num_threads(1)
        args.workers, args.plain_workers = 0, 0
    clock = cpu_seconds if args.single_thread else time.perf_counter
    dtype = dev.resolve_precision("auto", cpu)
    workers = args.workers if args.workers is not None else dev.default_num_workers(cpu)
    precision = str(dtype).replace("torch.", "") if dtype else "float32"
    channels_last = dev.use_channels_last(cpu)
    work = args.keep or Path(tempfile.mkdtemp(prefix="cnnxfer-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    try:
        print(machine())
        start = time.perf_counter()
        root = write_jpeg_folder(work / "images", args.images)
        weights = save_random_weights(args.model, work / f"{args.model}.safetensors")
        print(f"{args.images} JPEGs 256x256 q90 written in {time.perf_counter() - start:.1f} s; model {args.model} "
              f"(random weights from a file), batch {args.batch_size}, precision auto = {precision}, "
              f"channels_last {channels_last}, cnnxfer workers {workers}, plain workers {args.plain_workers}"
              + ("; single thread, CPU seconds" if args.single_thread else "; wall seconds"))

        loaded = models.load_model(args.model, str(weights))
        images = data.discover(root)
        start = clock()
        x = preload(images.paths, models.build_transform(loaded.data_config))
        times["decode"] = clock() - start
        fp32, times["model_fp32"] = model_only(loaded.model.eval(), x, args.batch_size, None, False, clock)
        out = work / "features.parquet"
        config = ExtractConfig(data=root, out=out, model=args.model, weights=str(weights),
                               batch_size=args.batch_size, num_workers=args.workers, overwrite=True)
        for _ in range(max(1, args.repeat)):  # interleaved, so a burst of load elsewhere hits all three alike
            model = models.load_model(args.model, str(weights)).model.eval()
            best(times, "model_auto", model_only(model, x, args.batch_size, dtype, channels_last, clock)[1])
            start = clock()
            summary = extract_features(config)
            best(times, "cnnxfer", clock() - start)
            start = clock()
            plain_loop(args.model, weights, root, args.batch_size, args.plain_workers)
            best(times, "plain", clock() - start)
        paths, _, emb = read_features(out)
        assert [str(p) for p in images.paths] == paths and summary.skipped == 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    n = args.images
    rate = {k: n / v for k, v in times.items()}
    cos = (emb * fp32).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(fp32, axis=1))
    unit = "CPU s" if args.single_thread else "seconds"
    print()
    print_table(["measurement", "img/s", unit], [[name, f"{rate[k]:.1f}", f"{times[k]:.2f}"] for name, k in [
        (f"1. cnnxfer extract (auto = {precision}, {workers} worker(s), end to end)", "cnnxfer"),
        (f"2. model only, preloaded tensors ({precision}{', channels_last' if channels_last else ''})", "model_auto"),
        ("   model only, preloaded tensors (fp32, NCHW)", "model_fp32"),
        (f"3. plain ImageFolder + DataLoader (fp32, NCHW, {args.plain_workers} workers)", "plain"),
        ("   decode + transform alone (cnnxfer's, 1 thread)", "decode"),
    ]])
    print()
    checks = [
        ("cnnxfer / model-only", rate["cnnxfer"] / rate["model_auto"], 0.8),
        ("cnnxfer / plain", rate["cnnxfer"] / rate["plain"], 2.0),
        ("cosine(cnnxfer auto, fp32), min over images", float(cos.min()), 0.999),
    ]
    print_table(["target", "value", "goal", ""], [
        [name, f"{v:.5f}" if "cosine" in name else f"{v:.2f}", f">= {t}", verdict(v, t)] for name, v, t in checks])
    return 0 if all(v >= t for _, v, t in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
