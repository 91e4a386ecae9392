"""`finetune --budget` and the leaderboard (issue 19): the schedule sized to measured speed, the stop
at the budget even mid-epoch on a slow model, the ranking of a pretrained backbone above a random
one on real images, a budget too small refused with its minimum, and the resume of a budgeted run.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import LITE0
from helpers import COLOURS, write_colour_folder
from typer.testing import CliRunner

from cnnxfer import TrainConfig, training
from cnnxfer.budget import Clock, TimePlan, steps_that_fit
from cnnxfer.cli import app
from cnnxfer.config import parse_duration
from cnnxfer.engine import Cosine
from cnnxfer.errors import UsageError
from cnnxfer.leaderboard import parse_candidates

pytestmark = pytest.mark.usefixtures("one_thread")

# A model whose training step is slow (0.25 s) while its inference is fast: the probe's speed
# promises far more steps than fit, and only the measured steps tell. Its classifier is one
# linear layer on pooled features, so the probe and the fine-tuning are a run's usual ones.
SLOW_NET = '''
import time
from torch import nn


class Slow(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        if self.training:
            time.sleep(0.25)
        return self.fc(self.body(x))


def build(num_classes):
    return Slow(num_classes)
'''


def test_durations_read_as_people_write_them():
    assert [parse_duration(t, "--budget") for t in ("90", "90s", "10m", "2h", "1h30m", "1.5m")] == \
        [90, 90, 600, 7200, 5400, 90]
    for bad in ("", "m", "10 minutes", "-5s", "5x"):
        with pytest.raises(UsageError, match="--budget takes a duration"):
            parse_duration(bad, "--budget")
    with pytest.raises(UsageError, match="--budget must be more than 0"):
        TrainConfig(data=Path("."), out=Path("."), budget=0)


def test_the_steps_that_fit_count_every_validation_and_a_partial_last_epoch():
    # epochs of 4 steps (0.5 s each) and a validation of 1 s: 3 s an epoch
    assert steps_that_fit(9.0, 0.5, 4, 1.0) == 12  # three whole epochs
    assert steps_that_fit(10.0, 0.5, 4, 1.0) == 12  # a fourth epoch's step and its validation: 10.5 s > 10 ...
    assert steps_that_fit(10.5, 0.5, 4, 1.0) == 13  # ... fit in 10.5
    assert steps_that_fit(2.0, 0.5, 4, 1.0) == 2  # a part of the first epoch
    assert steps_that_fit(1.0, 0.5, 4, 1.0) == 0  # the validation alone takes the time
    assert steps_that_fit(9.0, 0.5, 4, 1.0, into_epoch=3) == 10  # 1 step + val, 2 epochs (6 s), 1 step + val
    assert steps_that_fit(100.0, 0.5, 4, 1.0, max_steps=7) == 7


def test_the_schedule_fits_a_measured_throughput_and_follows_it_when_it_changes():
    """A plan sized from an estimate, then from measured speeds: the planned steps, validations
    and reserve fit in the time left; a step twice as slow halves the steps to come."""
    clock = Clock(seconds=60.0, start=time.monotonic())
    plan = TimePlan(clock, reserve=5.0, steps_per_epoch=10, step_seconds=0.2, val_seconds=1.0, warmup_steps=10)
    total = plan.size(0)
    left = clock.left() - clock.margin() - plan.reserve
    epochs = -(-total // 10)
    assert total * 0.2 + epochs * 1.0 <= left < (total + 1) * 0.2 + epochs * 1.0 + 1.0  # fills it, no more
    assert plan.epochs() == epochs and plan.warmup_steps() == min(10, int(0.2 * total))
    cosine = Cosine(total, plan.warmup_steps())
    assert cosine(total) == 0.0 and cosine(0) < 1.0  # decays to zero at the planned end
    plan.step_seconds = 0.4  # measured: twice as slow
    slower = plan.size(0)
    assert slower < 0.6 * total and plan.resized == 1
    assert plan.size(0) == slower  # the same speed: the schedule stays
    assert plan.stop_at <= clock.end - clock.margin() - plan.reserve - plan.val_seconds


def test_candidates_pair_models_and_weights():
    assert [(c.model, c.weights) for c in parse_candidates("a,b", "wa,wb")] == [("a", "wa"), ("b", "wb")]
    assert [(c.model, c.weights) for c in parse_candidates("a,b", "hub")] == [("a", "hub"), ("b", "hub")]
    assert [(c.model, c.weights) for c in parse_candidates("a", "w1,w2")] == [("a", "w1"), ("a", "w2")]
    assert len(parse_candidates("a", "hub")) == 1
    with pytest.raises(UsageError, match="--model names 3 candidates and --weights 2"):
        parse_candidates("a,b,c", "w1,w2")


def test_the_stop_arrives_within_the_budget_on_a_slow_model(tmp_path):
    """Every training step takes 0.25 s, an epoch 84 of them (21 s): the 14 s budget ends inside
    the first epoch however fast the machine, so the run stops mid-epoch, validates, and ends
    finished, within the budget + 5%. (With 42 steps, 10.5 s, a fast start let the whole epoch fit.)"""
    (tmp_path / "slow.py").write_text(SLOW_NET)
    data = write_colour_folder(tmp_path / "data", dict.fromkeys(COLOURS, 70))
    start = time.monotonic()
    result = training.fit(TrainConfig(data=data, out=tmp_path / "run", model=f"{tmp_path / 'slow.py'}:build",
                                      weights="none", batch_size=2, img_size=32, num_workers=0, precision="fp32",
                                      budget=14, hflip=0.0), started=start)
    wall = time.monotonic() - start
    assert wall <= 14 * 1.05, wall
    assert len(result.history) == 1, result.history  # one epoch (--strategy full from scratch: no probe) ...
    assert result.history[0]["seconds"] < 14  # ... cut short: its 84 steps would sleep 21 s alone
    assert len(pd.read_csv(tmp_path / "run" / "metrics.csv")) == 1
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["status"] == "finished" and config["hparams"]["budget"]["seconds"] == 14
    assert config["hparams"]["budget"]["spent"] <= 14
    assert (tmp_path / "run" / "model.safetensors").is_file() and not (tmp_path / "run" / "state.pt").exists()


def test_the_leaderboard_ranks_a_pretrained_backbone_above_a_random_one(digits_folder, lite0_weights, tmp_path):
    """Real ImageNet weights and the same architecture randomly initialised, on 12 digits per
    class: the pretrained one ranks first, and it is the run's model. (Random convolutional
    features probe digits nearly as well as ImageNet's: a linear model almost solves them on raw
    pixels; the random draw is seeded, and the ranking treats a difference within one standard
    error as a tie, which pretrained weights win.)"""
    import shutil

    data = tmp_path / "digits"
    for digit in range(10):
        (data / str(digit)).mkdir(parents=True)
        for f in sorted((digits_folder / str(digit)).glob("*.png"))[:12]:
            shutil.copy(f, data / str(digit) / f.name)
    result = training.fit(TrainConfig(data=data, out=tmp_path / "run", model=f"{LITE0},{LITE0}",
                                      weights=f"none,{lite0_weights}", strategy="linear", img_size=64,
                                      num_workers=0, precision="fp32", hflip=0.0))
    board = pd.read_csv(tmp_path / "run" / "leaderboard.csv")
    assert list(board["rank"]) == [1, 2] and list(board["weights"]) == [str(lite0_weights), "none"]
    pretrained, random = board["probe_cv_accuracy"]
    assert pretrained >= random - math.sqrt(random * (1 - random) / 100), board.to_string()  # within the noise, or above
    assert (board["images"] == 100).all()  # every training image (2 of 12 per class held out), both candidates
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["weights_source"] == str(Path(lite0_weights).resolve())
    # the leader's probe is the run's: its features and fit were handed over, not computed again
    assert result.probe["cv_accuracy"] == pytest.approx(pretrained)
    assert result.leaderboard[0]["weights"] == str(lite0_weights)


def test_a_budget_too_small_for_the_probe_is_refused_with_its_minimum(colours, tmp_path):
    result = CliRunner().invoke(app, ["finetune", str(colours), "--model", "test_resnet", "--weights", "none",
                                      "--budget", "1s", "--out", str(tmp_path / "run"), "--workers", "0"])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip().splitlines()[-1]
    assert "--budget 1s is too small: the probe on 36 images with test_resnet" in message
    needed = int(message.rsplit("give --budget ", 1)[1].split("s or more")[0].replace("m", ""))
    assert needed > 1
    assert not (tmp_path / "run" / "config.json").exists()  # nothing of a run was written
    bad = CliRunner().invoke(app, ["finetune", str(colours), "--model", "test_resnet", "--budget", "ten minutes"])
    assert bad.exit_code == 2 and "--budget takes a duration such as 90s" in bad.stderr


def test_a_budgeted_run_resumes_with_the_time_it_had_left(tmp_path):
    """Ctrl-C after the first fine-tuned epoch keeps it; --resume continues with what was left of
    the budget (recorded in config.json) and ends finished; the time spent adds up."""
    data = write_colour_folder(tmp_path / "data", dict.fromkeys(COLOURS, 12))
    run = tmp_path / "run"

    def stop(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    config = dict(data=data, out=run, model="test_resnet", weights="none", img_size=32, batch_size=4, num_workers=0,
                  precision="fp32", budget=20, checkpoint_every=0)
    with pytest.raises(KeyboardInterrupt):
        training.fit(TrainConfig(**config), training.FitHooks(on_epoch=stop))
    saved = json.loads((run / "config.json").read_text())
    spent = saved["hparams"]["budget"]["spent"]
    assert (run / "state.pt").is_file() and 0 < spent < 20
    start = time.monotonic()
    result = training.resume(run, started=start)
    assert time.monotonic() - start <= (20 - spent) * 1.05 + 1
    assert result.budget["seconds"] == 20 and spent < result.budget["spent"] <= 20 * 1.05
    assert json.loads((run / "config.json").read_text())["status"] == "finished"
    tuned = [row for row in result.history if row.get("phase") != "probe"]
    assert tuned[0]["epoch"] == 1 and len(tuned) >= 2  # the first epoch kept, more after it


def test_a_short_budget_ranks_on_fewer_images_and_leaves_out_a_random_backbone_first():
    """The ranking sample shrinks to fit the leaderboard's time; when even 10 images per class do
    not fit, candidates are left out: the random initialisation first, then the slowest."""
    from cnnxfer.data import ImageList
    from cnnxfer.leaderboard import Candidate, Entry, Leaderboard

    train = ImageList([Path(f"{k}.png") for k in range(400)], [k % 4 for k in range(400)], list("abcd"), Path("."))
    config = TrainConfig(data=Path("."), out=Path("."))

    def board(seconds):
        b = Leaderboard(config, [], train, 0, session=None, note=lambda text: None)
        b.entries = [Entry(Candidate("fast", "w1"), images_per_second=100.0, dim=8),
                     Entry(Candidate("slow", "w2"), images_per_second=10.0, dim=8),
                     Entry(Candidate("fast", "none"), images_per_second=100.0, dim=8)]
        live = list(b.entries)
        return b._sample_size(live, seconds), [e.candidate.label for e in live]

    assert board(None) == (100, ["fast (w1)", "slow (w2)", "fast (none)"])  # no limit: every image
    assert board(1000.0) == (100, ["fast (w1)", "slow (w2)", "fast (none)"])  # it all fits
    per_class, live = board(25.0)  # 100 per class would take 4 + 40 + 4 s: fewer per class
    assert 10 <= per_class < 100 and len(live) == 3
    # 10 per class take 0.4 + 4 + 0.4 s: the random one goes first, then the slowest
    assert board(4.5) == (10, ["fast (w1)", "slow (w2)"])
    assert board(4.0) == (100, ["fast (w1)"])  # one left: it leads, ranked on every image (handed to its run)
