"""The run directory of finetune and train: the one owner of its files, writers and readers.

A run directory holds `model.safetensors` (the best epoch's weights, timm key names),
`config.json` (a config.RunConfig), `metrics.csv` and `curves.png`, `splits.csv` (which image
went to train and which to validation), `state.pt` while the run is unfinished (for --resume;
with `probe.safetensors` under --strategy auto), the validation reports and `skipped.csv`. Every
file is written atomically, and only by the process that owns the directory (`writer`: rank 0
under torchrun), so no two processes ever write the same file and a kill leaves each file's
previous version whole. Every command that reads a run directory reads it through here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import checkpoint, data
from .config import RunConfig
from .errors import CnnxferError

MODEL_FILE = "model.safetensors"
PROBE_FILE = "probe.safetensors"  # --strategy auto: the probe's weights while fine-tuning runs (save_probe)
CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
METRICS_FILE, SKIPPED_FILE, SPLITS_FILE = "metrics.csv", "skipped.csv", "splits.csv"
LEADERBOARD_FILE = "leaderboard.csv"  # several candidate backbones: how they ranked (leaderboard.py)
CURVES_PLOT, CONFUSION_CSV, CONFUSION_PLOT, REPORT_CSV = "curves.png", "confusion_matrix.csv", "confusion_matrix.png", "report.csv"
RELIABILITY_PLOT = "reliability.png"  # the calibration's reliability diagram and risk-coverage curve
CALIBRATE_SKIPPED = "calibrate.skipped.csv"  # the images `cnnxfer calibrate` could not read

# The files a training run writes into its directory (--overwrite removes them, and nothing else).
RUN_FILES = (MODEL_FILE, PROBE_FILE, CONFIG_FILE, STATE_FILE, METRICS_FILE, SKIPPED_FILE, SPLITS_FILE, CONFUSION_CSV,
             REPORT_CSV, CURVES_PLOT, CONFUSION_PLOT, RELIABILITY_PLOT, CALIBRATE_SKIPPED, LEADERBOARD_FILE)


def is_run_dir(path: Path | str) -> bool:
    """A finished or running cnnxfer run directory (config.json and model.safetensors)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file()


def read_config(run_dir: Path | str) -> RunConfig:
    """The RunConfig of `run_dir` (CnnxferError naming the file when it cannot be read)."""
    return RunConfig.from_dict(checkpoint.read_json(Path(run_dir) / CONFIG_FILE))


def resume_point(run_dir: Path | str) -> str | None:
    """What `--resume run_dir` does: "epoch" (continue after the last saved epoch), "start" (the
    run was interrupted before an epoch finished: it starts again), or None (not an unfinished
    training run). Reads only small files: the CLI asks this after an interrupt."""
    return _resume_point(Path(run_dir), _config_values(Path(run_dir)))


def read_unfinished(run_dir: Path | str) -> tuple[RunConfig, str] | None:
    """(its RunConfig, its resume_point) for an unfinished run, None otherwise: config.json read once."""
    values = _config_values(Path(run_dir))
    point = _resume_point(Path(run_dir), values)
    return (RunConfig.from_dict(values), point) if point else None


def _config_values(run_dir: Path) -> dict | None:
    try:
        values = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) else None


def _resume_point(run_dir: Path, values: dict | None) -> str | None:
    if values is None or "train_config" not in values:
        return None
    if (run_dir / STATE_FILE).is_file():
        return "epoch"
    return "start" if values.get("status") == "running" else None


def resume_hint(run_dir: Path | str) -> str:
    """After Ctrl-C or SIGTERM: what was kept in `run_dir` and how to go on, true to what is on disk."""
    point = resume_point(run_dir)
    if point == "epoch":
        return f"every finished epoch was kept - re-run with --resume {run_dir} to continue"
    if point == "start":
        return f"no epoch had finished - re-run with --resume {run_dir} to start it again"
    return "nothing of the run was saved yet - run the same command again"


def prepare(run_dir: Path | str, overwrite: bool, resume: bool = False) -> None:
    """Refuse an existing output folder unless --overwrite or --resume; the message offers
    --resume only for an unfinished training run, the one thing --resume continues."""
    again = f" or --resume {run_dir} to continue it" if resume_point(run_dir) else ""
    checkpoint.prepare_output(Path(run_dir), overwrite, resume, again)


def clear(run_dir: Path | str) -> None:
    """Remove a previous run's files, so that nothing of it (a state.pt to resume, a best model)
    is taken for the new run's; other files in the folder are the user's and stay."""
    for name in RUN_FILES:
        (Path(run_dir) / name).unlink(missing_ok=True)


class RunDir:
    def __init__(self, path: Path, writer: bool = True):
        self.path, self.writer = Path(path), writer

    def file(self, name: str) -> Path:
        return self.path / name

    # -- the run's settings and outcome
    def write_config(self, run: RunConfig) -> None:
        if self.writer:
            checkpoint.atomic_write_json(self.file(CONFIG_FILE), run.to_dict())

    def read_config(self) -> RunConfig:
        return read_config(self.path)

    def start(self, overwrite: bool, run: RunConfig) -> None:
        """A new run: a previous run's files gone (--overwrite), then config.json, so that an
        interrupt from here on leaves a run that --resume can start again."""
        if self.writer:
            if overwrite:
                clear(self.path)
            self.write_config(run)

    # -- weights and the resume state
    def save_best(self, weights: dict, arch: str, epoch: int) -> None:
        if self.writer:
            checkpoint.save_state_dict(self.file(MODEL_FILE), weights,
                                       {"format": "pt", "arch": arch, "epoch": epoch})

    def save_probe(self, weights: dict, arch: str) -> None:
        """--strategy auto: the probe, the candidate fine-tuning must beat, kept until the run ends."""
        if self.writer:
            checkpoint.save_state_dict(self.file(PROBE_FILE), weights, {"format": "pt", "arch": arch, "epoch": 0})

    def probe_weights(self) -> dict:
        return checkpoint.read_weights_file(self.file(PROBE_FILE))

    def best_weights(self) -> dict:
        return checkpoint.read_weights_file(self.file(MODEL_FILE))

    def save_state(self, state: dict) -> None:
        """The resume state (model, optimizer, scheduler, scaler, history...) and metrics.csv."""
        if self.writer:
            checkpoint.save_training_state(self.file(STATE_FILE), state)
            write_metrics_csv(self.file(METRICS_FILE), state["history"])

    def load_state(self) -> dict:
        return checkpoint.load_training_state(self.file(STATE_FILE))

    def finish(self) -> None:
        """The run is complete: nothing is left to resume."""
        if self.writer:
            self.file(STATE_FILE).unlink(missing_ok=True)
            self.file(PROBE_FILE).unlink(missing_ok=True)

    # -- reports
    def write_skipped(self, skipped: dict[str, str]) -> Path | None:
        """skipped.csv listing unreadable images (path -> reason); None when there were none."""
        path = self.file(SKIPPED_FILE)
        if not self.writer:
            return path if skipped else None
        return data.write_skipped(path, sorted(skipped.items()))

    def save_reports(self, evaluation) -> None:
        if self.writer:
            from . import metrics

            metrics.save_reports(self.path, evaluation)

    def save_splits(self, train: data.ImageList, val: data.ImageList) -> None:
        """splits.csv: every image of the run (path, label, split), so that which images validated
        the run is on record beside the fingerprint that checks them on --resume."""
        if self.writer:
            import pandas as pd

            rows = [(os.path.abspath(p), images.classes[label] if label is not None else "", split)
                    for split, images in (("train", train), ("val", val)) for p, label in zip(images.paths, images.labels)]
            frame = pd.DataFrame(rows, columns=["path", "label", "split"])
            checkpoint.atomic_write_text(self.file(SPLITS_FILE), frame.to_csv(index=False))

    def save_leaderboard(self, rows: list[dict]) -> None:
        """leaderboard.csv: the candidate backbones, best first (leaderboard.Entry.row)."""
        if self.writer:
            import pandas as pd

            frame = pd.DataFrame(rows)
            frame["rank"] = frame["rank"].astype("Int64")  # skipped candidates have none
            checkpoint.atomic_write_text(self.file(LEADERBOARD_FILE), frame.to_csv(index=False))

    def read_splits(self):
        """splits.csv as a DataFrame (path, label, split); CnnxferError when the run has none."""
        import pandas as pd

        path = self.file(SPLITS_FILE)
        if not path.is_file():
            raise CnnxferError(f"{path}: no such file (runs before splits.csv was written do not have it)")
        return pd.read_csv(path, dtype=str, keep_default_na=False)

    def save_plots(self) -> list[Path]:
        """curves.png and confusion_matrix.png from the run's CSVs, reliability.png from its
        calibration (rank 0)."""
        if not self.writer:
            return []
        from . import plots

        written = plots.save_run_plots(self.file(METRICS_FILE), self.file(CONFUSION_CSV), self.file(CURVES_PLOT),
                                       self.file(CONFUSION_PLOT))
        fitted = self.read_config().calibration if self.file(CONFIG_FILE).exists() else None
        if fitted:
            written.append(plots.save_figure(plots.reliability_figure(fitted), self.file(RELIABILITY_PLOT)))
        return written


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    import pandas as pd

    checkpoint.atomic_write_text(path, pd.DataFrame(history).to_csv(index=False))
