"""What the user sees from report.py: plots (files only, nothing global) and log lines."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from cnnxfer import plots, report

ROOT = Path(__file__).resolve().parents[1]


def _spiky_metrics(n: int = 12) -> pd.DataFrame:
    """A first-epoch validation loss of 30 (BatchNorm statistics not settled), then ~0.6 to 0.35."""
    epochs = np.arange(1, n + 1)
    train = np.linspace(1.2, 0.3, n)
    val = np.r_[30.0, np.linspace(0.6, 0.35, n - 1)]
    return pd.DataFrame({"epoch": epochs, "phase": "all", "train_loss": train, "train_accuracy": np.linspace(0.5, 0.95, n),
                         "val_loss": val, "val_accuracy": np.linspace(0.4, 0.9, n), "lr": 1e-3, "seconds": 0.5})


def _height_fraction(ax, low: float, high: float) -> float:
    """The fraction of the axis height that the values low..high span, in the axis' own scale."""
    f = ax.yaxis.get_transform().transform
    bottom, top = ax.get_ylim()
    return float((f(high) - f(low)) / (f(top) - f(bottom)))


def test_a_first_epoch_loss_spike_leaves_the_rest_of_the_loss_curve_readable():
    metrics = _spiky_metrics()
    loss_ax = plots.curves_figure(metrics).axes[0]
    rest = pd.concat([metrics["train_loss"], metrics["val_loss"][1:]])
    # on a linear axis up to 30 the values 0.3..1.2 would fill 3% of the panel
    assert _height_fraction(loss_ax, rest.min(), rest.max()) > 0.25
    bottom, top = loss_ax.get_ylim()
    assert bottom < rest.min() and top >= 30  # nothing is cut off either


def _write_run_csvs(run: Path) -> None:
    run.mkdir()
    _spiky_metrics().to_csv(run / "metrics.csv", index=False)
    cm = pd.DataFrame([[3, 1], [0, 4]], index=["a", "b"], columns=["a", "b"])
    cm.index.name = "true\\predicted"
    cm.to_csv(run / "confusion_matrix.csv")


def test_plots_are_written_without_touching_the_callers_matplotlib_backend(tmp_path):
    """A notebook user's backend (here svg) stays as it was, and pyplot's global figure registry is
    never loaded."""
    run = tmp_path / "run"
    _write_run_csvs(run)
    code = ("import sys, matplotlib\n"
            "matplotlib.use('svg')\n"
            "from cnnxfer import report, rundir\n"
            f"written = rundir.RunDir({str(run)!r}).save_plots()\n"
            f"report.save_lr_plot({{'lrs': [1e-4, 1e-3, 1e-2], 'losses': [2.0, 1.5, 3.0]}}, {str(tmp_path / 'lr.png')!r})\n"
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules, len(written))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["svg", "False", "2"]
    assert proc.stderr == ""  # no warnings (an empty legend warns)
    for name in ("run/curves.png", "run/confusion_matrix.png", "lr.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- log lines


def test_an_epoch_line_fits_80_columns_with_large_figures():
    row = {"epoch": 100, "phase": "head+2 group(s)", "train_loss": 12.3456, "train_accuracy": 1.0, "val_loss": 31.0,
           "val_accuracy": 1.0, "lr": 0.1234, "seconds": 98765.4}
    line = report.epoch_line(row, 100)
    assert line == "epoch 100/100  train 12.3456 100.0%  val 31.0000 100.0%  lr 1.2e-01  98765.4s" and len(line) < 80
    no_val = report.epoch_line(dict(row, epoch=7, val_loss=float("nan"), val_accuracy=float("nan")), 100)
    assert no_val.startswith("epoch   7/100") and "val -" in no_val


def test_progress_lines_without_a_terminal_come_at_a_sensible_rate():
    """A tenth of the work, if 5 s passed since the last line; at least one a minute."""
    state, lines = {}, []
    for second in range(0, 600):
        done = min(1000, second * 4)  # 250 s for 1000 images
        if report.progress_due(state, done, 1000, float(second)):
            lines.append((second, done))
    assert [d for _, d in lines] == [100 * k for k in range(1, 11)] + [1000] * 5  # then one a minute
    assert all(b - a >= report.PROGRESS_MIN_GAP for (a, _), (b, _) in zip(lines, lines[1:]))
    fast = {}
    assert not any(report.progress_due(fast, d, 1000, d / 1000) for d in range(0, 1001, 10))  # 1 s in all: no line


def test_messages_print_as_text_not_markup(monkeypatch):
    """A message holding square brackets (an extra to install, a folder named "photos [2]") prints
    as it is: rich would take "[export]" for a style and drop it."""
    from rich.console import Console

    console = Console(record=True, width=200)
    monkeypatch.setattr(report, "err_console", console)
    monkeypatch.setattr(report, "_errors", console)  # errors have their own console (never quiet)
    report.error("install it: pip install 'cnnxfer[export]'")
    report.warn("class folder 'photos [2]' holds no images")
    report.note("[bold]x[/bold]")
    text = console.export_text()
    assert "pip install 'cnnxfer[export]'" in text and "'photos [2]'" in text and "[bold]x[/bold]" in text
