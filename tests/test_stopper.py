"""When a run stops (cnnxfer/stopper.py), on real runs and on the rule itself."""
from __future__ import annotations

import math

from cnnxfer import training
from cnnxfer.config import TrainConfig
from cnnxfer.stopper import Stopper, is_new_best


def _row(epoch: int, loss: float) -> dict:
    return {"epoch": epoch, "val_loss": loss}


def test_patience_counts_epochs_without_a_lower_validation_loss():
    stopper, best = Stopper(epochs=10, patience=2), {}
    stops = []
    for epoch, loss in enumerate([1.0, 0.8, 0.9, 0.79, 0.85, 0.86, 0.5], start=1):
        if stopper.improved(_row(epoch, loss), best):
            best = _row(epoch, loss)
        stops.append(stopper.should_stop(global_step=epoch))
        if stops[-1]:
            break
    assert best["epoch"] == 4 and stops == [False, False, False, False, False, True]  # 0.85, 0.86: two bad epochs
    assert stopper.stopped_early and stopper.bad_epochs == 2


def test_step_limit_stops_without_calling_it_early_and_nan_never_wins():
    stopper = Stopper(epochs=10, max_steps=30)
    assert not stopper.should_stop(29) and stopper.should_stop(30) and not stopper.stopped_early
    assert not is_new_best(_row(2, math.nan), _row(1, 3.0)) and is_new_best(_row(2, 3.0), _row(1, math.nan))
    unvalidated = Stopper(epochs=3, patience=1, validated=False)  # --val-split 0: the last epoch is kept, never early
    assert all(unvalidated.improved(_row(e, 9.0), _row(e - 1, 1.0)) for e in (1, 2, 3))
    assert not unvalidated.should_stop(3)


def test_a_run_stops_where_the_stopper_replayed_on_its_whole_history_says(colours, tmp_path):
    """The same run with and without --patience 1: the patient run is the whole run cut where the
    Stopper, replayed on the whole run's validation losses, stops (every run is deterministic)."""
    common = dict(data=colours, model="test_resnet", weights="none", epochs=6, batch_size=8, img_size=32,
                  precision="fp32", num_workers=0, lr=0.3)
    whole = training.fit(TrainConfig(out=tmp_path / "whole", **common)).history
    patient = training.fit(TrainConfig(out=tmp_path / "patient", patience=1, **common))
    replay, best, cut = Stopper(6, patience=1), {}, len(whole)
    for k, row in enumerate(whole):
        if replay.improved(row, best):
            best = row
        if replay.should_stop(0):
            cut = k + 1
            break
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(patient.history) == strip(whole[:cut])
    assert patient.stopped_early == replay.stopped_early and patient.best["epoch"] == best["epoch"]
