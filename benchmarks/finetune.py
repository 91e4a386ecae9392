"""How fast are `cnnxfer finetune --strategy linear` and `cnnxfer train`?

One run, the same images for every measurement (scikit-learn's digits at 64 px, split as in its
own example: first half train, second half validation):
  1. linear: `finetune --strategy linear` with the frozen-backbone feature cache and without it
     (`--no-cache`, the backbone runs every epoch); seconds per epoch from metrics.csv, epochs 2+.
  2. train: `cnnxfer train` with its defaults (precision auto, channels_last, loader workers)
     against a plain hand-written fp32 NCHW loop on the same model, batch size and number of
     steps, its images decoded once into memory (the data costs it nothing), the same optimizer,
     schedule and label smoothing. Both without augmentation, so the final accuracies compare the
     numerics alone (`--augment`: cnnxfer with its default augmentation, still decoding every
     image every epoch in its loader). Step throughput = images / time between the first and last
     step of each epoch (steady state); end-to-end includes evaluation and loader start-up.

Targets: linear cached >= 5x faster per epoch (epochs 2+); cnnxfer train >= 1.7x the plain loop's
step throughput, at a comparable accuracy.

On a shared machine, other jobs stall torch's OpenMP threads (two threads on two busy cores ran
5-10x slower here); compare the ratios of one run, and try `--threads 1` for a steadier picture.

    python benchmarks/finetune.py [--model resnet10t] [--epochs 5] [--linear-epochs 3] [--threads N]
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
from common import machine, print_table, save_random_weights, verdict

from cnnxfer import engine, training, recipe
from cnnxfer.config import Strategy, TrainConfig

SIZE, BATCH = 64, 64


def write_digits(root: Path, size: int = SIZE) -> Path:
    """sklearn digits as size x size RGB PNGs in train/<digit>/ and val/<digit>/."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    half = len(digits.images) // 2
    for i, (image, target) in enumerate(zip(digits.images, digits.target)):
        folder = root / ("train" if i < half else "val") / str(int(target))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "L").resize((size, size), Image.BILINEAR).convert("RGB").save(folder / f"{i:04d}.png")
    return root


class StepTimer:
    """on_batch hook: the steady-state step throughput (first to last step of each epoch)."""

    def __init__(self):
        self.epochs: list[list[float]] = [[]]

    def __call__(self, step: int, steps: int, loss: float) -> None:
        self.epochs[-1].append(time.perf_counter())
        if step == steps:
            self.epochs.append([])

    def images_per_second(self, batch: int) -> float:
        spans = [(len(t) - 1, t[-1] - t[0]) for t in self.epochs if len(t) > 1]
        return sum(n for n, _ in spans) * batch / sum(s for _, s in spans)


# ---------------------------------------------------------------- 1. linear: cache vs no cache

def bench_linear(data: Path, weights: Path, model: str, epochs: int, work: Path) -> dict:
    out = {}
    for cache in (True, False):
        start = time.perf_counter()
        result = training.fit(TrainConfig(data=data, out=work / f"linear_{cache}", model=model, weights=str(weights),
                                        strategy=Strategy.linear, cache_features=cache, epochs=epochs, batch_size=BATCH,
                                        img_size=SIZE), overwrite=True)
        seconds = [h["seconds"] for h in result.history]
        out[cache] = {"epoch_s": float(np.mean(seconds[1:])), "total_s": time.perf_counter() - start,
                      "acc": result.history[-1]["val_accuracy"]}
    return out


# ---------------------------------------------------------------- 2. train: cnnxfer vs plain

def bench_cnnxfer_train(data: Path, model: str, epochs: int, augment: bool, work: Path) -> dict:
    timer = StepTimer()
    start = time.perf_counter()
    result = training.fit(TrainConfig(data=data, out=work / "train", model=model, weights="none", epochs=epochs,
                                    batch_size=BATCH, augment=augment, hflip=0.0),
                        training.FitHooks(on_batch=timer), overwrite=True)
    total = time.perf_counter() - start
    steps = sum(len(t) for t in timer.epochs)
    return {"step_ips": timer.images_per_second(BATCH), "e2e_ips": steps * BATCH / total, "steps": steps,
            "acc": result.history[-1]["val_accuracy"], "precision": result.precision, "seconds": total}


def _load_split(folder: Path, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    paths = sorted(folder.glob("*/*.png"))
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths])
    x = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x, torch.tensor([int(p.parent.name) for p in paths])


def bench_plain(data: Path, model_name: str, steps: int) -> dict:
    """What a tutorial loop does: fp32, NCHW, SGD + cosine, images already in memory; the same
    hyperparameters as cnnxfer's defaults for `train` (recipe.resolve_hparams)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    x_train, y_train = _load_split(data / "train", mean, std)
    x_val, y_val = _load_split(data / "val", mean, std)
    hp = recipe.resolve_hparams(TrainConfig(data=data, out=data, weights="none", batch_size=BATCH))
    lr, wd = hp["lr"], hp["weight_decay"]
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)
    per_epoch = len(x_train) // BATCH
    sched = engine.cosine_with_warmup(opt, steps, per_epoch)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    timer, step = StepTimer(), 0
    start = time.perf_counter()
    model.train()
    while step < steps:
        order = torch.randperm(len(x_train))
        for b in range(per_epoch):
            if step == steps:
                break
            idx = order[b * BATCH:(b + 1) * BATCH]
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            timer(b + 1, per_epoch, loss.item())
    train_s = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(x_val[i:i + 256]).argmax(1) for i in range(0, len(x_val), 256)])
    return {"step_ips": timer.images_per_second(BATCH), "e2e_ips": steps * BATCH / (time.perf_counter() - start),
            "acc": float((preds == y_val).float().mean()), "seconds": train_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--epochs", type=int, default=5, help="train: epochs for cnnxfer and the plain loop")
    parser.add_argument("--linear-epochs", type=int, default=3)
    parser.add_argument("--augment", action="store_true", help="train: cnnxfer with its default augmentation")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory(prefix="cnnxfer-bench-") as tmp:
        work = Path(tmp)
        data = write_digits(work / "digits64")
        weights = save_random_weights(args.model, work / f"{args.model}.safetensors")
        # plain, cnnxfer, plain again: on a shared machine the load drifts, so the reference is
        # the mean of a measurement on either side of cnnxfer's
        steps = args.epochs * (len(list((data / "train").glob("*/*.png"))) // BATCH)
        before = bench_plain(data, args.model, steps)
        ours = bench_cnnxfer_train(data, args.model, args.epochs, args.augment, work)
        assert ours["steps"] == steps, (ours["steps"], steps)
        after = bench_plain(data, args.model, steps)
        plain = {k: (before[k] + after[k]) / 2 for k in ("step_ips", "e2e_ips", "seconds")}
        plain["acc"] = before["acc"]  # the same seed and steps: the same run twice
        linear = bench_linear(data, weights, args.model, args.linear_epochs, work)
    speedup = linear[False]["epoch_s"] / linear[True]["epoch_s"]
    ratio = ours["step_ips"] / plain["step_ips"]
    print(f"\n{args.model}, {SIZE} px, batch {BATCH}; train: {args.epochs} epochs = {ours['steps']} steps each "
          f"(cnnxfer {ours['precision']}{' + augmentation' if args.augment else ''}, plain float32); "
          f"load average {os.getloadavg()[0]:.1f} at end\n")
    print_table(
        ["measurement", "cnnxfer", "reference", "ratio", "target", "verdict"],
        [
            ["linear: s/epoch (epochs 2+), cache vs --no-cache", f"{linear[True]['epoch_s']:.3f}",
             f"{linear[False]['epoch_s']:.3f}", f"{speedup:.1f}x", ">= 5x", verdict(speedup, 5.0)],
            ["linear: total s incl. feature pass", f"{linear[True]['total_s']:.1f}", f"{linear[False]['total_s']:.1f}",
             f"{linear[False]['total_s'] / linear[True]['total_s']:.1f}x", "", ""],
            ["linear: final val accuracy (random-init backbone)", f"{linear[True]['acc']:.3f}",
             f"{linear[False]['acc']:.3f}", "", "", ""],
            ["train: step img/s vs plain fp32 loop", f"{ours['step_ips']:.0f}",
             f"{plain['step_ips']:.0f} ({before['step_ips']:.0f}/{after['step_ips']:.0f})",
             f"{ratio:.2f}x", ">= 1.7x", verdict(ratio, 1.7)],
            ["train: end-to-end img/s (eval, loaders)", f"{ours['e2e_ips']:.0f}", f"{plain['e2e_ips']:.0f}",
             f"{ours['e2e_ips'] / plain['e2e_ips']:.2f}x", "", ""],
            ["train: final val accuracy", f"{ours['acc']:.3f}", f"{plain['acc']:.3f}",
             f"{ours['acc'] - plain['acc']:+.3f}", ">= -0.01", "PASS" if ours["acc"] >= plain["acc"] - 0.01 else "MISS"],
        ],
    )


if __name__ == "__main__":
    main()
