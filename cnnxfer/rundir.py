"""The run directory of finetune and train: one owner of its files.

A run directory holds `model.safetensors` (the best epoch's weights, timm key names),
`config.json` (a config.RunConfig), `metrics.csv`, `state.pt` while the run is unfinished (for
--resume; with `probe.safetensors` under --strategy auto), the validation reports and `skipped.csv`. Every file is written atomically, and only by
the process that owns the directory (`writer`: rank 0 under torchrun), so no two processes ever
write the same file and a kill leaves each file's previous version whole.
"""
from __future__ import annotations

from pathlib import Path

from . import checkpoint, data
from .config import RunConfig

METRICS_FILE, SKIPPED_FILE = "metrics.csv", "skipped.csv"


class RunDir:
    def __init__(self, path: Path, writer: bool = True):
        self.path, self.writer = Path(path), writer

    def file(self, name: str) -> Path:
        return self.path / name

    # -- the run's settings and outcome
    def write_config(self, run: RunConfig) -> None:
        if self.writer:
            checkpoint.atomic_write_json(self.file(checkpoint.CONFIG_FILE), run.to_dict())

    def read_config(self) -> RunConfig:
        return RunConfig.from_dict(checkpoint.load_run_config(self.path))

    def start(self, overwrite: bool, run: RunConfig) -> None:
        """A new run: a previous run's files gone (--overwrite), then config.json, so that an
        interrupt from here on leaves a run that --resume can start again."""
        if self.writer:
            if overwrite:
                checkpoint.clear_run(self.path)
            self.write_config(run)

    # -- weights and the resume state
    def save_best(self, weights: dict, arch: str, epoch: int) -> None:
        if self.writer:
            checkpoint.save_state_dict(self.file(checkpoint.MODEL_FILE), weights,
                                       {"format": "pt", "arch": arch, "epoch": epoch})

    def save_probe(self, weights: dict, arch: str) -> None:
        """--strategy auto: the probe, the candidate fine-tuning must beat, kept until the run ends."""
        if self.writer:
            checkpoint.save_state_dict(self.file(checkpoint.PROBE_FILE), weights, {"format": "pt", "arch": arch, "epoch": 0})

    def probe_weights(self) -> dict:
        from . import models

        return models.read_weights_file(self.file(checkpoint.PROBE_FILE))

    def best_weights(self) -> dict:
        from . import models

        return models.read_weights_file(self.file(checkpoint.MODEL_FILE))

    def save_state(self, state: dict) -> None:
        """The resume state (model, optimizer, scheduler, scaler, history...) and metrics.csv."""
        if self.writer:
            checkpoint.save_training_state(self.file(checkpoint.STATE_FILE), state)
            write_metrics_csv(self.file(METRICS_FILE), state["history"])

    def load_state(self) -> dict:
        return checkpoint.load_training_state(self.file(checkpoint.STATE_FILE))

    def finish(self) -> None:
        """The run is complete: nothing is left to resume."""
        if self.writer:
            self.file(checkpoint.STATE_FILE).unlink(missing_ok=True)
            self.file(checkpoint.PROBE_FILE).unlink(missing_ok=True)

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


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    import pandas as pd

    checkpoint.atomic_write_text(path, pd.DataFrame(history).to_csv(index=False))
