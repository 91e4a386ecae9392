"""The figures of a run directory (matplotlib, rendered straight to files).

rundir.py writes them for every run, whoever calls `fit`; report.py draws its other figures
(sanity checks, inspect) on the same `figure` and `save_figure`.
"""
from __future__ import annotations

from pathlib import Path

from .checkpoint import atomic_path


def save_run_plots(metrics_csv: Path, confusion_csv: Path, curves_png: Path, confusion_png: Path) -> list[Path]:
    """curves.png (loss and accuracy per epoch) and confusion_matrix.png from a run's CSVs (each
    where its CSV exists); rundir.RunDir.save_plots names the files."""
    import pandas as pd

    written = []
    if metrics_csv.exists():
        written.append(save_figure(curves_figure(pd.read_csv(metrics_csv)), curves_png))
    if confusion_csv.exists():
        written.append(save_figure(confusion_figure(pd.read_csv(confusion_csv, index_col=0)), confusion_png))
    return written


def figure(figsize):
    """A figure that renders straight to files. Built from matplotlib.figure, not pyplot: pyplot would
    need a backend switch (matplotlib.use), which changes the backend of whoever imported cnnxfer,
    a notebook's inline plots included, and keeps figures in a global registry."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="tight")


def curves_figure(metrics):
    """Loss and accuracy per epoch, train and val. The loss axis is logarithmic: a first-epoch
    validation loss of 30 (BatchNorm statistics not settled yet) above a curve near 0.5 would
    otherwise flatten the rest of the curve against the bottom of a linear axis."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    fig = figure((10, 4))
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        positive = False
        for split in ("train", "val"):
            values = metrics[f"{split}_{metric}"]
            if values.notna().any():  # no validation set: no val line
                ax.plot(metrics["epoch"], values, "o-", label=split)
                positive = positive or bool((values > 0).any())
        if metric == "loss" and positive:  # a probe that fits its images exactly has a training loss of 0
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())  # 0.5, 1, 2 rather than 5x10^-1
            ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 1.25, 1.5 ticks
        ax.set_xlabel("epoch"), ax.set_ylabel(metric + (" (log scale)" if metric == "loss" else "")), ax.grid(alpha=0.3)
        ax.legend()
    return fig


def confusion_figure(cm):
    n = len(cm)
    fig = figure((max(4, 0.5 * n + 2), max(3.5, 0.5 * n + 1.5)))
    ax = fig.subplots()
    ax.imshow(cm.values, cmap="Blues")
    ax.set_xticks(range(n), cm.columns, rotation=45, ha="right"), ax.set_yticks(range(n), cm.index)
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm.values[i, j]), ha="center", va="center", fontsize=8)
    return fig


def reliability_figure(fitted: dict):
    """The reliability diagram of a run's calibration (calibration.fit): accuracy against mean
    confidence per confidence bin, raw and with the temperature, the diagonal being perfect; bar
    widths show how many images each bin holds. Beside it the risk-coverage curve: the accuracy of
    the images kept at each confidence threshold (predict --min-confidence)."""
    fig = figure((10, 4.2))
    ax, rc = fig.subplots(1, 2)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    for key, colour, label in (("before", "tab:red", "raw softmax"),
                               ("after", "tab:blue", f"temperature {fitted['temperature']:.3g}")):
        bins = [b for b in fitted[key]["reliability"] if b["count"]]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", color=colour,
                label=f"{label}: ECE {fitted[key]['ece']:.3f}")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (mean top probability in the bin)"), ax.set_ylabel("accuracy in the bin")
    ax.set_title(f"reliability, {fitted['images']} held-out images", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    curve = fitted.get("risk_coverage") or {}
    if curve.get("coverage"):
        rc.plot(curve["coverage"], curve["accuracy"], color="tab:blue")
        rc.set_ylim(max(0.0, min(curve["accuracy"]) - 0.05), 1.005)
        rc.set_title(f"risk-coverage (area under risk {curve['aurc']:.3f})", fontsize=10)
    rc.set_xlabel("coverage (share of images predicted)"), rc.set_ylabel("accuracy of those predicted")
    rc.set_xlim(0, 1.0)
    return fig


def save_figure(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
