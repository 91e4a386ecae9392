"""Everything the user sees: progress bars, tables, messages. The only module importing rich."""
from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .plots import figure as _figure, save_figure as _save_fig

console = Console()
err_console = Console(stderr=True)
_errors = Console(stderr=True)  # never quiet: every process reports its own errors
_who = ""  # under torchrun, which process an error comes from


def for_process(rank: int, world: int) -> None:
    """Several processes (torchrun): rank 0 alone shows progress, notes, tables and warnings;
    every rank shows its errors, naming itself."""
    global _who
    if world > 1:
        _who = f"(rank {rank}) "
        console.quiet = err_console.quiet = rank != 0


def error(message: str) -> None:
    _errors.print(f"[bold red]error:[/] {_who}{escape(message)}", highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """Something about a run worth knowing (a choice made for the user, a hint), on stderr."""
    err_console.print(f"[cyan]note:[/] {escape(message)}", highlight=False, soft_wrap=True)


def info_line(message: str) -> None:
    console.print(message, highlight=False, soft_wrap=True)


# Without a terminal (a file, CI, nohup, a cluster job) progress is written as plain lines: one at
# each tenth of the work when PROGRESS_MIN_GAP seconds have passed since the last, and at least every
# PROGRESS_MAX_GAP seconds; a run of a few seconds writes none (its summary follows at once).
PROGRESS_MIN_GAP = 5.0
PROGRESS_MAX_GAP = 60.0


def progress_due(state: dict, done: int, total: int, now: float) -> bool:
    """Whether a progress line is due at time `now` (seconds); `state` starts as {} at time 0."""
    last, tenth = state.setdefault("last", 0.0), state.setdefault("tenth", 0)
    reached = int(10 * done / total) if total else 0
    if now - last >= PROGRESS_MAX_GAP or (reached > tenth and now - last >= PROGRESS_MIN_GAP):
        state.update(last=now, tenth=reached)
        return True
    return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


@contextlib.contextmanager
def image_progress(description: str) -> Iterator:
    """A progress bar with images/s on a terminal, throttled plain lines otherwise; yields a
    callback (done, total)."""
    import time

    terminal = err_console.is_terminal
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err_console, transient=False, disable=not terminal,
    )
    task, start, due = None, None, {}

    def update(done: int, total: int) -> None:
        nonlocal task, start
        now = time.perf_counter()
        if start is None:
            start = (now, done)
            if terminal:
                task = progress.add_task(description, total=total, completed=done, rate="")
            return
        t0, d0 = start
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        if terminal:
            progress.update(task, completed=done, total=total, rate=f"{rate:,.1f} img/s")
        elif progress_due(due, done, total, now - t0):
            left = f", about {_duration((total - done) / rate)} left" if rate > 0 and done < total else ""
            _plain(f"{description}: {done:,}/{total:,} images ({done / max(total, 1):.0%}), {rate:,.1f} img/s, "
                   f"{_duration(now - t0)} elapsed{left}")

    with progress:
        yield update


def _plain(line: str) -> None:
    """One log line on stderr, never wrapped, without markup."""
    err_console.print(line, markup=False, highlight=False, soft_wrap=True)


def table(title: str, rows: list[tuple], headers: tuple = ("", "")) -> Table:
    t = Table(title=title, title_justify="left", show_header=any(headers))
    for h in headers:
        t.add_column(h)
    for row in rows:
        t.add_row(*[str(c) for c in row])
    return t


def show(renderable) -> None:
    console.print(renderable)


def environment(info) -> None:
    rows = [(k, v) for k, v in info.versions.items()]
    rows += [
        ("device", info.device),
        ("device name", info.device_name),
        ("memory", f"{info.memory_gib:.1f} GiB" if info.memory_gib else "-"),
        ("precision (auto)", info.precision),
        ("channels_last", "yes" if info.channels_last else "no"),
        ("torch threads", info.threads),
        ("decode threads", info.workers),
    ]
    show(table("cnnxfer info", rows))


def extract_summary(s) -> None:
    rows = [
        ("output", s.out),
        ("images", f"{s.images:,}" + (f" ({s.resumed:,} from the interrupted run)" if s.resumed else "")),
        ("skipped", f"{s.skipped:,}" + (f" (listed in {s.skipped_file})" if s.skipped_file else "")),
        ("columns", ", ".join(f"{k} [{v}]" for k, v in s.columns.items())),
        ("time", f"{s.seconds:.1f} s ({s.images_per_second:,.1f} img/s)"),
        ("device", f"{s.device} / {s.precision}"),
    ]
    for w in s.warnings:
        warn(w)
    show(table("extract", rows))


def epoch_line(row: dict, epochs: int) -> str:
    """One finished epoch in under 80 columns, so that it neither wraps in an 80-column terminal
    nor leaves its time on a line of its own in a log file; greppable: `grep ^epoch`."""
    width = len(str(epochs))
    val = row["val_loss"]
    val_text = f"val {val:.4f} {row['val_accuracy']:6.1%}" if val == val else "val -"  # NaN: no validation set
    return (f"epoch {row['epoch']:>{width}}/{epochs}  train {row['train_loss']:.4f} {row['train_accuracy']:6.1%}  "
            f"{val_text}  lr {row['lr']:.1e}  {row['seconds']:.1f}s")


@contextlib.contextmanager
def fit_progress() -> Iterator[tuple]:
    """Yields (on_batch, on_epoch, on_message, on_start) callbacks, in training.FitHooks' order: one
    line per finished epoch (and a line when the trainable part changes), with a bar for the epoch
    in progress on a terminal, or a plain line at most every PROGRESS_MAX_GAP seconds without one.
    The number of epochs comes with on_start (the run may choose it)."""
    import time

    terminal = err_console.is_terminal
    progress = Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
        console=err_console, transient=True, disable=not terminal,
    )
    state = {"task": None, "epoch": 1, "phase": "all", "start": None, "due": {}}
    epochs = 0

    def on_start(config) -> None:
        nonlocal epochs
        epochs = config.epochs

    def on_batch(step: int, steps: int, loss: float) -> None:
        if terminal:
            if state["task"] is None:
                state["task"] = progress.add_task("train", total=steps, epoch=state["epoch"], epochs=epochs, loss="")
            progress.update(state["task"], completed=step, total=steps, loss=f"{loss:.4f}")
            return
        now = time.perf_counter()
        state["start"] = state["start"] or now
        if now - state["start"] >= PROGRESS_MAX_GAP and progress_due(state["due"], 0, 0, now - state["start"]):
            _plain(f"epoch {state['epoch']}/{epochs}  batch {step}/{steps}  loss {loss:.4f}")

    def on_epoch(row: dict) -> None:
        if state["task"] is not None:
            progress.remove_task(state["task"])
        state.update(task=None, epoch=row["epoch"] + 1, start=None, due={})
        if row["phase"] != state["phase"]:  # gradual unfreezing: say what trains from this epoch on
            state["phase"] = row["phase"]
            progress.console.print(f"training {row['phase']} from epoch {row['epoch']}", markup=False, highlight=False,
                                   soft_wrap=True)
        progress.console.print(epoch_line(row, epochs), markup=False, highlight=False, soft_wrap=True)

    def on_message(message: str) -> None:
        progress.console.print(f"[cyan]note:[/] {escape(message)}", highlight=False, soft_wrap=True)

    with progress:
        yield on_batch, on_epoch, on_message, on_start


def fit_summary(result, notes_shown: bool = False) -> None:
    """The run's summary table; its notes too unless they were shown as they came (fit_progress)."""
    if not notes_shown:
        for message in result.notes:
            note(message)
    best = result.best
    rows = [
        ("run directory", result.run_dir),
        ("classes", f"{len(result.classes)}: {', '.join(result.classes[:10])}{' ...' if len(result.classes) > 10 else ''}"),
        ("images", f"{result.train_images:,} train / {result.val_images:,} val (readable)"),
        ("skipped", f"{result.skipped:,}" + (f" (listed in {result.skipped_file})" if result.skipped_file else "")),
        *_strategy_rows(result),
        ("val accuracy", _metric(best.get("val_accuracy"))),
        ("val loss", _metric(best.get("val_loss")) + " (cross-entropy)"),
        ("time", f"{result.seconds:.1f} s on {result.device} / {result.precision}"),
    ]
    if result.budget:
        rows.append(("budget", f"{result.budget['spent']:.0f} s of {result.budget['seconds']:.0f} s when the run "
                               f"ended (start-up included)"))
    if result.leaderboard:
        show(leaderboard_table(result.leaderboard))
    show(table("fit", rows))
    if result.class_counts:
        show(class_counts_table(result.class_counts))


def leaderboard_table(rows: list[dict]):
    """The candidate backbones, best first (leaderboard.csv)."""
    from pathlib import Path

    out = Table(title="leaderboard: the cross-validated probe on each backbone's frozen features")
    for name in ("rank", "backbone", "CV accuracy", "images/s", "params", "note"):
        out.add_column(name)
    for row in rows:
        weights = row["weights"] if row["weights"] in ("hub", "none") else Path(row["weights"]).name
        out.add_row(str(row["rank"] or "-"), escape(f"{row['model']} ({weights})"),
                    "-" if row["probe_cv_accuracy"] is None else f"{row['probe_cv_accuracy']:.4f}",
                    f"{row['images_per_second']:.0f}" if row["images_per_second"] else "-",
                    f"{row['parameters'] / 1e6:.1f}M", escape(row["note"] or ""))
    return out


def _strategy_rows(result) -> list[tuple[str, str]]:
    """What ran and what was kept: the probe's strength, the epochs, for --strategy auto both
    candidates' validation figures and the winner, and a kept probe's refit on every image."""
    rows = _candidate_rows(result)
    refit = (result.probe or {}).get("refit")
    if refit and result.best.get("epoch") == 0:
        rows.append(("saved", f"the probe fitted again on the training and validation images together "
                              f"({refit['images']} images; {refit['how']})"))
    return rows


def _candidate_rows(result) -> list[tuple[str, str]]:
    best, probe = result.best, result.probe
    epochs = [row for row in result.history if row.get("phase") != "probe"]
    hp = result.hparams
    loop = (f"{hp['optimizer']} lr {hp['lr']:.3g} wd {hp['weight_decay']:.3g}, BatchNorm statistics {hp.get('bn_stats', 'update')}")
    stopped = " (stopped early: --patience epochs without a new best)" if result.stopped_early else ""
    rows = [("strategy", result.strategy)] if result.strategy else []
    if probe:
        rows.append(("probe", f"{probe['how']}; validation accuracy {_metric(probe.get('val_accuracy'))}"))
    folds = result.selection
    if folds:  # auto without validation images
        kept = "the probe" if folds["winner"] == "probe" else f"fine-tuned, its last epoch ({len(epochs)})"
        rows.append(("kept", f"{kept}, by {folds['folds']}-fold cross-validation on the training images (no "
                             f"validation images): probe accuracy {folds['probe_accuracy']:.4f}, fine-tuned "
                             f"{folds['finetuned_accuracy']:.4f}"))
        return rows
    if not epochs:  # --strategy linear: the probe is the run
        return rows + [("kept", "the probe (logistic regression solved to convergence, no epochs)")]
    best_tuned = min(epochs, key=lambda r: _loss_key(r["val_loss"]))
    rows += [("fine-tuning", f"{len(epochs)} epoch(s), {loop}")]
    if result.strategy == "auto" and probe:
        winner = "the probe" if best.get("epoch") == 0 else f"fine-tuned epoch {best.get('epoch')}"
        rows.append(("kept", f"{winner}, by validation accuracy, ties by the calibrated loss (fine-tuned epoch "
                             f"{best_tuned['epoch']}, the lowest validation loss of its epochs: {_pair(best_tuned)}; "
                             f"probe: {_pair(probe)}){stopped}"))
    else:
        rows.append(("best epoch", f"{best.get('epoch')} of {len(epochs)}, by {result.best_rule}{stopped}"))
    return rows


def _pair(row: dict) -> str:
    return f"accuracy {_metric(row.get('val_accuracy'))}, loss {_metric(row.get('val_loss'))}"


def _loss_key(value) -> float:
    return float("inf") if value is None or value != value else value


MAX_CLASS_ROWS = 30


def class_counts_table(counts: dict) -> Table:
    """Readable training and validation images per class; with many classes, the smallest (the
    ones a user must look at), the rest counted in config.json."""
    names = list(counts)
    if len(names) > MAX_CLASS_ROWS:
        names = sorted(names, key=lambda n: (counts[n]["val"], counts[n]["train"], n))[:MAX_CLASS_ROWS]
    title = "per class" if len(names) == len(counts) else f"per class: the {len(names)} smallest of {len(counts)}"
    t = Table(title=title, title_justify="left")
    for col in ("class", "train", "val"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for name in names:
        t.add_row(name, f"{counts[name]['train']:,}", f"{counts[name]['val']:,}")
    return t


def _metric(value) -> str:
    return "- (no validation set)" if value is None or value != value else f"{value:.4f}"


def evaluation_summary(result, title: str = "evaluate") -> None:
    for w in getattr(result, "warnings", []):
        warn(w)
    rows = [("data", str(result.data))] if getattr(result, "data", None) else []
    rows += [("accuracy", f"{result.accuracy:.4f}"), ("images", f"{result.images:,}"),
            ("skipped", f"{result.skipped:,}" + (f" (listed in {result.skipped_file})" if result.skipped_file else ""))]
    if getattr(result, "trained_on", 0):
        warn(f"{result.trained_on:,} of the {result.images:,} images evaluated trained this run: the accuracy is "
             f"optimistic; evaluate on images it never saw for a fair estimate")
    rows += _calibration_rows(result)
    show(table(title, rows))
    per_class = Table(title="per class", title_justify="left")
    for col in ("class", "precision", "recall", "f1", "support"):
        per_class.add_column(col, justify="left" if col == "class" else "right")
    for r in result.report.itertuples():
        per_class.add_row(str(r[1]), f"{r.precision:.3f}", f"{r.recall:.3f}", f"{r.f1:.3f}", str(int(r.support)))
    show(per_class)


def _calibration_rows(result) -> list[tuple[str, str]]:
    """evaluate's calibration, abstention, conformal and unknown-class figures, where measured."""
    rows, c = [], result.calibration
    if c:
        rows.append(("calibration", f"ECE {c['ece']:.4f} (classwise {c['classwise_ece']:.4f}), NLL {c['nll']:.4f}, "
                                    f"Brier {c['brier']:.4f}; {c['applied']}"))
    if result.selective:
        s = result.selective
        accuracy = "no image" if s["accuracy"] != s["accuracy"] else f"accuracy {s['accuracy']:.4f}"
        rows.append(("min confidence", f"{s['min_confidence']:g}: {accuracy} on {s['coverage']:.1%} of the images "
                                       f"({s['abstained']:,} abstained)"))
    if result.conformal:
        s = result.conformal
        rows.append(("prediction sets", f"coverage {s['coverage']:.4f} (asked {s['asked']:g}), mean size {s['mean_size']:.2f}, "
                                        f"{s['single']:.1%} of one class"))
    if result.unknown:
        u = result.unknown
        rows.append(("unknown classes", f"AUROC {u['auroc']:.4f} (max probability), {u['false_accept']:.1%} of the "
                                        f"{u['images']:,} unknown images accepted at 95% of DATA accepted"))
        if u.get("feature"):
            f = u["feature"]
            rows.append(("unknown, by features", f"AUROC {f['auroc']:.4f} (cosine to the nearest class mean), "
                                                 f"{f['false_accept']:.1%} accepted at 95% of DATA accepted"))
    return rows


def predictions_summary(pred, out, skipped_file, config=None) -> None:
    for w in pred.images.warnings:
        warn(w)
    counts = {}
    for i in pred.probs.argmax(1).tolist():
        counts[pred.classes[i]] = counts.get(pred.classes[i], 0) + 1
    rows = [("output", out), ("images", f"{len(pred.indices):,}"),
            ("skipped", f"{len(pred.skipped):,}" + (f" (listed in {skipped_file})" if pred.skipped else "")),
            ("predicted", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))]
    calibrated = pred.calibration
    rows.append(("probabilities", f"calibrated: logits / {calibrated['temperature']:.3g} ({calibrated['fitted_on']})"
                 if calibrated else "raw softmax" + ("" if config is None or not config.calibrated else
                                                       " (the model has no fitted temperature)")))
    if config is not None and config.min_confidence is not None:
        kept = int((pred.probs.max(1) >= config.min_confidence).sum()) if len(pred.probs) else 0
        rows.append(("abstained", f"{len(pred.indices) - kept:,} below {config.min_confidence:g}"))
    if config is not None and config.coverage is not None and len(pred.probs):
        rows.append(("prediction sets", f"at coverage {config.coverage:g}: columns set and set_size"))
    rows.append(("time", f"{pred.seconds:.1f} s on {pred.device}" + (f" ({pred.backend})" if pred.backend != "pytorch" else "")))
    show(table("predict", rows))


def calibration_summary(fitted: dict, run_dir) -> None:
    b, a = fitted["before"], fitted["after"]
    rows = [("run", str(run_dir)), ("fitted on", f"{fitted['images']:,} {fitted['fitted_on']}"),
            ("temperature", f"{fitted['temperature']:.4g}"),
            ("ECE", f"{b['ece']:.4f} -> {a['ece']:.4f}"), ("NLL", f"{b['nll']:.4f} -> {a['nll']:.4f}"),
            ("Brier", f"{b['brier']:.4f} -> {a['brier']:.4f}"),
            ("conformal scores", f"{len(fitted['conformal']['scores']):,} ({fitted['conformal']['method'].upper()})"),
            ("skipped", f"{fitted.get('skipped', 0):,}" + (f" (listed in {run_dir}/calibrate.skipped.csv)" if fitted.get("skipped") else "")),
            ("written", f"{run_dir}/config.json (calibration)")]
    show(table("calibrate", rows))


def export_summary(result) -> None:
    for message in result.notes:
        note(message)
    v, info = result.verification, result.info
    c, h, w = info.input_size
    rows = [
        ("file", f"{result.out} ({result.bytes / 2**20:.1f} MiB)" + (f" + {result.sidecar}" if result.sidecar else "")),
        ("format", result.format + (f", opset {info.opset}" if info.opset else "") + f", {info.precision}"),
        ("input", f"images: uint8 (batch, {c}, {h}, {w}), RGB 0-255, normalised inside"),
        ("output", f"logits: float32 (batch, {len(info.classes)})"),
        ("classes", f"{len(info.classes)}: {', '.join(info.classes[:10])}{' ...' if len(info.classes) > 10 else ''}"),
        ("preprocessing", f"resize {info.interpolation}, crop_pct {info.crop_pct:g} ({info.crop_mode}), "
                          f"mean {_floats(info.mean)}, std {_floats(info.std)}"),
        ("verified", f"{v.images} images from {v.source}, batch {' and '.join(map(str, v.batch_sizes))}"),
        ("max |logit diff|", f"{v.max_abs_diff:.2e} (tolerance {v.tolerance:g}; logits up to {v.max_abs_logit:.3g})"),
        ("top-1 agreement", f"{v.top1_agreement:.1%}"),
        ("time", f"{result.seconds:.1f} s"),
    ]
    show(table("export", rows))


def _floats(values) -> str:
    return "(" + ", ".join(f"{x:.3f}" for x in values) + ")"


@contextlib.contextmanager
def status(description: str) -> Iterator:
    """A spinner naming the step in progress on a terminal, a line per step otherwise; yields a
    callback(step name)."""
    if not err_console.is_terminal:
        yield lambda step: _plain(f"{description}: {step}")
        return
    with err_console.status(description) as spinner:
        yield lambda step: spinner.update(f"{description}: {step}")


_STYLE = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red", "SKIP": "dim", "ERROR": "bold magenta"}


def sanity_report(result) -> None:
    """One row per check: status, the measured figure, and what to look at on WARN/FAIL."""
    for w in result.warnings:
        warn(w)
    if result.lr_plot:
        lr = next((c for c in result.checks if c.name == "lr_find"), None)
        if lr and lr.details.get("lrs"):
            save_lr_plot(lr.details, result.lr_plot)
    t = Table(title=f"sanity-check: {result.model} ({result.weights}) on {result.device}/{result.precision}", title_justify="left")
    for col in ("check", "status", "result", "look at"):
        t.add_column(col, overflow="fold")
    for c in result.checks:
        t.add_row(c.name, f"[{_STYLE.get(c.status, '')}]{c.status}[/]", c.summary, c.hint if c.status in ("WARN", "FAIL", "ERROR") else "")
    show(t)
    counts = result.to_dict()["counts"]
    info_line(f"{counts['PASS']} passed, {counts['WARN']} warned, {counts['FAIL']} failed"
              + (f", {counts['ERROR']} raised an error" if counts.get("ERROR") else "")
              + (f"; unreadable files listed in {result.skipped_file}" if result.skipped_file else "")
              + (f"; lr plot in {result.lr_plot}" if result.lr_plot else ""))


def save_lr_plot(details: dict, path) -> None:
    fig = _figure((6, 4))
    ax = fig.subplots()
    ax.plot(details["lrs"], details["losses"])
    ax.set_xscale("log"), ax.set_xlabel("learning rate"), ax.set_ylabel("loss (smoothed)"), ax.grid(alpha=0.3)
    if details.get("suggested_lr"):
        ax.axvline(details["suggested_lr"], color="green", linestyle="--", label=f"suggested {details['suggested_lr']:.2g}")
    if details.get("configured_lr"):
        ax.axvline(details["configured_lr"], color="red", linestyle=":", label=f"configured {details['configured_lr']:.2g}")
    if ax.get_legend_handles_labels()[1]:  # an empty legend() warns on stderr
        ax.legend()
    _save_fig(fig, path)


# ---------------------------------------------------------------- inspect: files

def save_image(array, path):
    """An (H, W, 3) uint8 array as a PNG, pixel for pixel, atomically."""
    from pathlib import Path

    from PIL import Image

    from .checkpoint import atomic_path

    with atomic_path(Path(path)) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", optimize=True)
    return Path(path)


def save_table(rows, path):
    """Rows (a list of dicts, or a dict of columns) as CSV, atomically."""
    from pathlib import Path

    import pandas as pd

    from .checkpoint import atomic_write_text

    atomic_write_text(Path(path), pd.DataFrame(rows).to_csv(index=False, float_format="%.6g"))
    return Path(path)


def save_json(obj, path):
    from pathlib import Path

    from .check_result import _jsonable
    from .checkpoint import atomic_write_json

    atomic_write_json(Path(path), _jsonable(obj))
    return Path(path)


def _save(fig, path):
    from pathlib import Path

    return _save_fig(fig, Path(path))


def save_filters_comparison(result, path):
    """The filter grids of --compare (before) and the inspected weights (after), side by side,
    and the relative weight change per stage."""
    fig = _figure((13, 4.2))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.2]})
    for ax, grid, title in ((axes[0], result.compare_grid, f"before: {_short(result.compare)}"),
                            (axes[1], result.grid, f"after: {_short(result.weights)}")):
        ax.imshow(grid, interpolation="nearest")
        ax.set_title(title, fontsize=9), ax.axis("off")
    changes = [c for c in result.changes if c["parameters"]]
    axes[2].barh([c["stage"] for c in changes][::-1], [c["relative_change"] for c in changes][::-1], color="tab:blue")
    axes[2].set_xlabel("relative weight change ||after - before|| / ||before||"), axes[2].grid(alpha=0.3, axis="x")
    return _save(fig, path)


def _short(text, width: int = 40) -> str:
    text = str(text)
    return text if len(text) <= width else "..." + text[-(width - 3):]


def save_patches_figure(result, path):
    """The patches grid (a row per unit, best first) with the unit numbers beside the rows."""
    grid = result.grid()
    fig = _figure((min(16, 1.0 + grid.shape[1] / 60), min(40, 0.6 + grid.shape[0] / 60)))
    ax = fig.subplots()
    ax.imshow(grid, interpolation="nearest")
    row = grid.shape[0] / max(1, len(result.units))
    ax.set_yticks([row * (k + 0.5) for k in range(len(result.units))], [f"unit {u}" for u in result.units])
    ax.set_xticks([])
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"{result.layer}: top {result.top} patches per unit (receptive field {result.field.label})", fontsize=9)
    return _save(fig, path)


def save_image_grid(images, captions, path, cols: int = 5):
    """Images with a caption under each (class models)."""
    import math

    n = len(images)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = _figure((2.2 * cols, 2.5 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k], interpolation="nearest")
            ax.set_title(captions[k], fontsize=8)
    return _save(fig, path)


def save_embedding_map(result, path):
    """Each method's 2-D map, points coloured by label, thumbnails spread over the last map."""
    import numpy as np
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    methods = list(result.coords)
    fig = _figure((7 * len(methods), 6.5))
    axes = fig.subplots(1, len(methods), squeeze=False)
    labels = np.asarray([str(l) for l in result.labels])
    names = sorted(set(labels), key=lambda v: (len(v), v))
    colours = {name: _colour(k, len(names)) for k, name in enumerate(names)}
    for ax, method in zip(axes[0], methods):
        xy = result.coords[method]
        for name in names:
            mask = labels == name
            ax.scatter(xy[mask, 0], xy[mask, 1], s=8, color=colours[name], label=name, alpha=0.7)
        knn = result.knn.get(method)
        name = {"pca": "PCA", "tsne": "t-SNE"}.get(method, method)
        ax.set_title(name + (f": {result.k}-NN accuracy {knn:.1%} in 2-D" if knn is not None else ""), fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
        if method == methods[-1]:
            for i, thumb in result.thumbnails.items():
                box = AnnotationBbox(OffsetImage(thumb, zoom=0.7), xy[i], frameon=True, pad=0.1,
                                     bboxprops={"edgecolor": colours[labels[i]], "linewidth": 1.5})
                ax.add_artist(box)
    if len(names) <= 20:
        axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2, frameon=False)
    full = result.knn.get("full")
    if full is not None:
        fig.suptitle(f"{len(labels)} images; {result.k}-NN accuracy in the full {result.dim}-d space {full:.1%}", fontsize=10)
    return _save(fig, path)


def _colour(k: int, n: int):
    import matplotlib

    return matplotlib.colormaps["tab10" if n <= 10 else "tab20"](k % (10 if n <= 10 else 20))


def save_invariance_chart(result, path):
    """Per stage, the percentage of invariant units, one bar per transform."""
    import numpy as np

    fig = _figure((max(5, 1.2 * len(result.layers) + 2), 4))
    ax = fig.subplots()
    width = 0.8 / len(result.transforms)
    x = np.arange(len(result.layers))
    for k, t in enumerate(result.transforms):
        values = [next(r["percent"] for r in result.table if r["stage"] == layer and r["transform"] == t) for layer in result.layers]
        ax.bar(x + (k - (len(result.transforms) - 1) / 2) * width, values, width, label=t)
    ax.set_xticks(x, result.layers, rotation=30, ha="right")
    ax.set_ylabel(f"% of units with r >= {result.threshold:g}"), ax.set_ylim(0, 100), ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title(f"invariance over {result.images} images", fontsize=10)
    return _save(fig, path)


def save_errors_figure(result, path, cols: int = 4):
    """The worst images, each beside its Grad-CAM heat map, captioned true / predicted / p."""
    import math

    n = len(result.rows)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = _figure((3.2 * cols, 1.9 * rows + 0.3))
    axes = fig.subplots(rows, 2 * cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (row, picture, cam) in enumerate(zip(result.rows, result.pictures, result.heatmaps)):
        left, right = axes[k // cols][2 * (k % cols)], axes[k // cols][2 * (k % cols) + 1]
        left.imshow(picture, interpolation="nearest")
        right.imshow(picture, interpolation="nearest")
        right.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
        left.set_title(f"true {row['true']} / pred {row['predicted']}\np={row['probability']:.2f} loss {row['loss']:.2f}",
                       fontsize=7, color="black" if row["correct"] else "firebrick")
    return _save(fig, path)


# ---------------------------------------------------------------- inspect: summaries

def _files_row(result) -> tuple:
    return ("files", ", ".join(str(f) for f in result.files))


def filters_summary(r) -> None:
    rows = [("layer", f"{r.layer} {tuple(r.weight_shape)}"), ("scale", r.scale), ("weights", r.weights)]
    if r.compare:
        rows.append(("compared with", r.compare))
        rows += [(f"change {c['stage']}", f"{c['relative_change']:.3g}") for c in r.changes if c["parameters"]]
    show(table("inspect filters", rows + [_files_row(r)]))


def patches_summary(r) -> None:
    t = Table(title=f"inspect patches: {r.layer}, receptive field {r.field.label}, {r.images} images", title_justify="left")
    for col in ("unit", "best activation", "top images (classes)"):
        t.add_column(col)
    for unit in r.units:
        best = [x for x in r.rows if x["unit"] == unit]
        t.add_row(str(unit), f"{best[0]['activation']:.3g}" if best else "-",
                  ", ".join(str(x["label"]) for x in best if x["label"] is not None) or "-")
    show(t)
    info_line(", ".join(str(f) for f in r.files))


def class_model_summary(r) -> None:
    t = Table(title="inspect class-model", title_justify="left")
    for col in ("target", "score", "predicted", "probability"):
        t.add_column(col)
    for k, (target, score, pred) in enumerate(zip(r.targets, r.scores, r.predicted)):
        t.add_row(target, f"{score:.3g}", pred, f"{r.probabilities[k]:.3f}" if r.probabilities else "-")
    show(t)
    info_line(", ".join(str(f) for f in r.files))


def embedding_summary(r) -> None:
    rows = [("images", f"{len(r.paths):,}"), ("features", f"{r.dim}-d from {r.source}")]
    names = {"full": "full space", "pca": "PCA map", "tsne": "t-SNE map"}
    rows += [(f"{r.k}-NN accuracy ({names.get(m, m)})", "-" if v is None else f"{v:.1%}") for m, v in r.knn.items()]
    show(table("inspect embedding", rows + [_files_row(r)]))


def invariance_summary(r) -> None:
    t = Table(title=f"inspect invariance: units with r >= {r.threshold:g} over {r.images} images (count, %)",
              title_justify="left")
    t.add_column("stage")
    for tr in r.transforms:
        t.add_column(tr, justify="right")
    for layer in r.layers:
        cells = [next(x for x in r.table if x["stage"] == layer and x["transform"] == tr) for tr in r.transforms]
        t.add_row(f"{layer} ({cells[0]['units']})", *[f"{c['invariant']} ({c['percent']:.0f}%)" for c in cells])
    show(t)
    if r.scale_mode == "pad":
        note("the model takes one input size only: for 'scale' the smaller image was centred on the mean colour")
    info_line(", ".join(str(f) for f in r.files))


def layers_summary(r) -> None:
    t = Table(title=f"inspect layers: input {'x'.join(map(str, r.input_size))}"
              + (f", dead units over {r.images} images" if r.images else ""), title_justify="left")
    for col in ("stage", "output", "stride", "receptive field", "parameters", "FLOPs", "dead units"):
        t.add_column(col, justify="left" if col in ("stage", "output") else "right")
    for row in r.rows:
        dead = row["dead_fraction"]
        t.add_row(row["stage"], row["output_shape"], row["stride"], row["receptive_field"], f"{row['parameters']:,}",
                  _flops(row["flops"]), "-" if dead is None else f"{dead:.1%}")
    show(t)
    info_line(", ".join(str(f) for f in r.files))


def _flops(value: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return str(value)


def errors_summary(r) -> None:
    t = Table(title=f"inspect errors: accuracy {r.accuracy:.1%}, {r.mistakes} wrong of {r.images}; heat maps at {r.layer}",
              title_justify="left")
    for col in ("image", "true", "predicted", "p", "loss"):
        t.add_column(col, overflow="fold")
    for row in r.rows:
        t.add_row(row["path"], row["true"], row["predicted"], f"{row['probability']:.3f}", f"{row['loss']:.3g}")
    show(t)
    info_line(", ".join(str(f) for f in r.files))


def page_summary(r) -> None:
    for message in r.notes:
        warn(message)
    rows = [("page", r.path), ("sections", ", ".join(r.sections)),
            ("images", f"{r.images:,} from {r.data}" if r.data else "none (no --data, and the run's data folder is gone)"),
            ("time", f"{r.seconds:.1f} s")]
    show(table("report", rows))


def skipped_images(skipped) -> None:
    """One warning for the images no pass could read (each view lists them in its skipped.csv)."""
    if skipped:
        path, reason = skipped[0]
        warn(f"{len(skipped)} unreadable image(s) skipped and listed in skipped.csv, e.g. {path}: {reason}")


AUDIT_ORDER = ("label_issue", "duplicate_conflicting_labels", "leakage", "duplicate", "outlier", "nearer_other_class",
               "unreadable", "dark", "overexposed", "blurry", "low_information", "grayscale", "odd_aspect", "small")


def audit_summary(r) -> None:
    """The counts of each issue and where the files are."""
    for message in r.notes:
        warn(message)
    t = Table(title=f"audit: {r.images:,} images, {len(r.classes)} classes", title_justify="left")
    t.add_column("issue")
    t.add_column("found", justify="right")
    for issue in AUDIT_ORDER:
        if r.counts.get(issue):
            t.add_row(issue, f"{r.counts[issue]:,}")
    if not r.counts:
        t.add_row("none", "0")
    show(t)
    probe = r.probe
    rows = [("label errors", f"about {r.estimated_label_errors:,} estimated by confident learning; in {r.out / 'relabel.csv'} "
                             f"{r.relabelled:,} relabelled, {r.left_out:,} left out (no confident suggestion)"
                             + (f", {r.unusable_left_out:,} too dark, bright, blurred or blank left out" if r.unusable_left_out else "")),
            ("probe", f"{probe['folds']}-fold held-out accuracy {probe['accuracy']:.1%} (C={probe['c']:.3g})"),
            ("split", f"train/val from {r.split}" + (f"; {r.against:,} --against images" if r.against else "")),
            ("balance", r.balance),
            ("unreadable", f"{r.skipped:,}"),
            ("issues", r.out / "issues.csv"),
            ("time", f"{r.seconds:.1f} s")]
    show(table("audit", rows))
