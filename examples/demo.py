"""The three levels of transfer learning, end to end, offline, on real data shipped with
scikit-learn and scikit-image. Every step is a real `cnnxfer` command, printed before it runs,
so you can type the same against your own folders.

    python examples/demo.py            # the full demo (a few minutes on a laptop CPU)
    python examples/demo.py --quick    # a short version (used by the tests)

Task: a network learns digits 0-4 from all their images (the "pretraining"), then must learn
digits 5-9 from only a few labelled images each; the rest of 5-9 is held out for testing.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import write_digits_transfer, write_textures  # noqa: E402

FULL = {"source_epochs": 15, "target_epochs": 40, "texture_epochs": 30, "labels_per_class": 10}
QUICK = {"source_epochs": 6, "target_epochs": 25, "texture_epochs": 12, "labels_per_class": 10}


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


def linear_probe(run: Path, train: Path, test: Path, out: Path) -> tuple[float, float]:
    """Level 1: embeddings from `run`'s network, then a logistic regression on them."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cnnxfer import read_features

    seconds = 0.0
    for name, folder in (("train", train), ("test", test)):
        seconds += cnnxfer("extract", str(folder), "--weights", str(run), "--out", str(out / f"{name}.parquet"), "--overwrite")
    start = time.perf_counter()
    _, y_train, x_train = read_features(out / "train.parquet")
    _, y_test, x_test = read_features(out / "test.parquet")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5)).fit(x_train, y_train)
    return float(clf.score(x_test, y_test)), seconds + time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer epochs (about a minute)")
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--model", default="resnet10t", help="any timm architecture")
    parser.add_argument("--labels-per-class", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results table as JSON")
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    if args.labels_per_class:
        plan["labels_per_class"] = args.labels_per_class
    out, model = args.out, args.model
    data = write_digits_transfer(out / "data", plan["labels_per_class"])
    textures = write_textures(out / "data")
    runs = out / "runs"
    common = ["--model", model, "--hflip", "0", "--overwrite"]
    results = []
    n_source = sum(1 for _ in data["source"].rglob("*.png"))
    n_few = sum(1 for _ in data["target_train"].rglob("*.png"))

    print("\n== sanity-check the setup before training ==")
    cnnxfer("sanity-check", str(data["source"]), "--model", model, "--weights", "none", "--only", "data,init_loss,overfit,gradcheck",
            "--json", str(out / "sanity.json"), quiet=False)

    print("\n== level 3: train from scratch on digits 0-4 (the 'pretraining' task) ==")
    t = cnnxfer("train", str(data["source"]), "--epochs", str(plan["source_epochs"]), "--out", str(runs / "source"), *common)
    results.append(("digits 0-4", "level 3: train from scratch", n_source, _val_accuracy(runs / "source"), t, "val split"))

    print("\n== level 1: features from that network + logistic regression, digits 5-9 ==")
    acc, t = linear_probe(runs / "source", data["target_train"], data["target_test"], out)
    results.append(("digits 5-9", "level 1: extract + logistic regression", n_few, acc, t, "held out"))

    print("\n== level 2: fine-tune that network on the few labelled 5-9 images ==")
    t = cnnxfer("finetune", str(data["target_train"]), "--weights", str(runs / "source"), "--strategy", "full", "--val-split", "0",
                "--batch-size", "16", "--epochs", str(plan["target_epochs"]), "--out", str(runs / "finetune"), *common)
    results.append(("digits 5-9", "level 2: finetune", n_few, accuracy_of(runs / "finetune", data["target_test"], out), t, "held out"))

    print("\n== baseline: train from scratch on the same few labelled images ==")
    t = cnnxfer("train", str(data["target_train"]), "--val-split", "0", "--batch-size", "16", "--epochs", str(plan["target_epochs"]),
                "--out", str(runs / "scratch"), *common)
    results.append(("digits 5-9", "baseline: train from scratch", n_few, accuracy_of(runs / "scratch", data["target_test"], out), t, "held out"))

    print("\n== a photographic task: grass / gravel / brick textures ==")
    n_tex = sum(1 for _ in textures["train"].rglob("*.png"))
    t = cnnxfer("train", str(textures["train"]), "--model", model, "--epochs", str(plan["texture_epochs"]), "--val-split", "0",
                "--batch-size", "16",
                "--out", str(runs / "textures"), "--overwrite")
    results.append(("textures", "level 3: train from scratch", n_tex, accuracy_of(runs / "textures", textures["test"], out), t, "held out"))

    _print_table(results)
    if args.json:
        args.json.write_text(json.dumps([dict(zip(("task", "method", "labelled_images", "test_accuracy", "seconds", "tested_on"), r))
                                         for r in results], indent=2))
    return 0


def _val_accuracy(run: Path) -> float:
    return json.loads((run / "config.json").read_text())["best"]["val_accuracy"]


def _print_table(results) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="cnnxfer demo: the three levels on real data (measured in this run)", title_justify="left")
    for col in ("task", "method", "labelled images", "test accuracy", "seconds", "tested on"):
        table.add_column(col, justify="right" if col in ("labelled images", "test accuracy", "seconds") else "left")
    for task, method, n, acc, seconds, tested in results:
        table.add_row(task, method, str(n), f"{acc:.1%}", f"{seconds:.0f}", tested)
    Console(width=120).print(table)  # wide enough for one line per row, also when piped


if __name__ == "__main__":
    sys.exit(main())
