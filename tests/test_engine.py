"""The training engine (cnnxfer/engine.py) with real computation on tiny models and folders.

Each test trains `test_resnet` / `resnet10t` at 32 px on a few dozen generated images for one to
three epochs, then compares the run directory against an independent reference: the weights file
the test saved itself, a second run that takes another code path, or an uninterrupted run.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from helpers import COLOURS, write_colour_folder

from cnnxfer import training, recipe, engine, epochs, models, trainset
from cnnxfer.config import Balance, Strategy, TrainConfig
from cnnxfer.errors import DataError, OutputExistsError, TrainingError, UsageError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def test_resnet_3(tmp_path_factory) -> Path:
    """`test_resnet` weights with a 3-class head, so the head is not re-initialised and every
    tensor of the fine-tuned model can be compared with this file. Seed 123: not the random
    initialisation fit itself makes (seed 0), so a run that silently ignored the file would show."""
    torch.manual_seed(123)
    model = timm.create_model("test_resnet", num_classes=3)
    path = tmp_path_factory.mktemp("weights") / "test_resnet_3.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def fit(data: Path, out: Path, hooks: training.FitHooks | None = None, **kwargs) -> training.FitResult:
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("precision", "fp32")
    kwargs.setdefault("img_size", 32)
    kwargs.setdefault("batch_size", 8)
    return training.fit(TrainConfig(data=data, out=out, **kwargs), hooks)


def read_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def without_seconds(rows: list[dict]) -> list[dict]:
    """metrics.csv rows without the wall-clock column, for exact comparisons between runs."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def changed(before: dict, after: dict, prefixes: tuple[str, ...]) -> list[str]:
    """Names under `prefixes` whose tensors differ (parameters and buffers alike)."""
    return [k for k in before if k.startswith(prefixes) and not torch.equal(before[k], after[k])]


NET_SOURCE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)
        self.train_calls = 0

    def forward(self, x):
        out = self.fc(torch.relu(self.conv(x)).mean((2, 3)))
        if self.training:
            self.train_calls += 1
{extra}
        return out


def factory(num_classes=1000):
    return Net(num_classes)
"""


def custom_model_file(folder: Path, *extra: str) -> str:
    """A `file.py:factory` spec for a tiny conv net; `extra` lines run in forward() on the logits
    `out` and the input `x` (training forwards are counted in `self.train_calls`)."""
    path = folder / "net.py"
    path.write_text(NET_SOURCE.format(extra="\n".join(" " * 8 + line for line in extra)))
    return f"{path}:factory"


# ---------------------------------------------------------------- hyperparameters and schedule

def test_resolve_hparams_defaults():
    scratch = recipe.resolve_hparams(TrainConfig(data=Path("."), out=Path("o"), weights="none", batch_size=64))
    assert scratch == {"optimizer": "sgd", "lr": pytest.approx(0.1 * 64 / 256 * 4), "weight_decay": 5e-4, "backbone_lr_mult": 1.0,
                       "bn_stats": "update"}
    tune = recipe.resolve_hparams(TrainConfig(data=Path("."), out=Path("o"), strategy=Strategy.gradual, batch_size=16))
    assert tune == {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "backbone_lr_mult": 0.1, "bn_stats": "frozen"}
    big = recipe.resolve_hparams(TrainConfig(data=Path("."), out=Path("o"), batch_size=64))
    assert big["bn_stats"] == "frozen"  # on large batches too: updated statistics sank full fine-tuning to 54.6% (recipe)
    linear = recipe.resolve_hparams(TrainConfig(data=Path("."), out=Path("o"), strategy=Strategy.linear, lr=0.5))
    assert linear["lr"] == 0.5


def test_optimizer_groups_and_cosine_warmup():
    model = timm.create_model("test_resnet", num_classes=3)
    hp = {"optimizer": "sgd", "lr": 0.2, "weight_decay": 1e-4, "backbone_lr_mult": 0.1}
    opt = engine.build_optimizer(model, models.head_parameter_names(model), hp, momentum=0.9)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["head"]["lr"] == 0.2 and groups["backbone"]["lr"] == pytest.approx(0.02)
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 1e-4
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    sched = engine.cosine_with_warmup(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[-1]["lr"] / 0.2)
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1.0)  # linear warmup to the peak
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))  # then cosine decay
    assert lrs[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))


# ---------------------------------------------------------------- strategies

def test_linear_leaves_backbone_and_batchnorm_stats_unchanged(colours, test_resnet_3, tmp_path):
    result = fit(colours, tmp_path / "run", model="test_resnet", weights=str(test_resnet_3), strategy=Strategy.linear, epochs=2, lr=0.05)
    before, after = load_file(str(test_resnet_3)), load_file(str(result.run_dir / "model.safetensors"))
    assert before.keys() == after.keys()
    backbone = tuple(k for k in before if not k.startswith("fc."))
    assert any("running_mean" in k for k in backbone)  # the buffers are compared too
    assert changed(before, after, backbone) == []
    assert set(changed(before, after, ("fc.",))) == {"fc.weight", "fc.bias"}
    assert [h["phase"] for h in result.history] == ["probe"]  # the exact probe: no epochs (--epochs does not apply)


def test_linear_without_the_cache_trains_the_head_on_features_computed_every_step(colours, test_resnet_weights, tmp_path):
    """--no-cache keeps the training loop (a head trained on freshly augmented images). A new head
    starts from the probe: without augmentation and with a learning rate of 0, its features and
    head are exactly the cached probe's (the one fitted on the training images: the cached run then
    saves that probe fitted again with the validation images, which the loop does not)."""
    common = dict(model="test_resnet", weights=str(test_resnet_weights), strategy=Strategy.linear, augment=False,
                  dropout=0.0, seed=3)
    cached = fit(colours, tmp_path / "cached", **common)
    loop = fit(colours, tmp_path / "loop", cache_features=False, epochs=2, lr=0.0, **common)
    assert [h["phase"] for h in loop.history] == ["probe", "head", "head"]
    assert cached.probe["refit"]["images"] == cached.train_images + cached.val_images and "refit" not in loop.probe
    for key in ("train_loss", "val_loss", "val_accuracy"):  # the same probe
        assert loop.history[0][key] == pytest.approx(cached.history[0][key], rel=1e-5)
    for key in ("val_loss", "val_accuracy"):  # and the loop's head never moved off it
        assert loop.history[2][key] == pytest.approx(cached.history[0][key], rel=1e-4)
    a, b = load_file(str(cached.run_dir / "model.safetensors")), load_file(str(loop.run_dir / "model.safetensors"))
    moving = fit(colours, tmp_path / "moving", cache_features=False, epochs=2, lr=0.05, **{**common, "augment": True})
    c = load_file(str(moving.run_dir / "model.safetensors"))
    assert not torch.equal(c["fc.weight"], b["fc.weight"])  # the loop trains the head from the probe
    assert changed(a, c, tuple(k for k in a if not k.startswith("fc."))) == []  # and nothing else


def test_gradual_freezes_the_backbone_for_head_epochs_then_unfreezes_top_down(colours, test_resnet_3, tmp_path):
    from cnnxfer import checkpoint

    snapshots = []  # the model after each epoch, from the resume state fit writes before on_epoch

    def snapshot(row):
        snapshots.append(checkpoint.load_training_state(tmp_path / "run" / "state.pt")["model"])

    # bn_stats update: the unfrozen stages' BatchNorm statistics must be seen to move (at batch 8
    # fine-tuning would keep them frozen: recipe.resolve_bn_stats)
    result = fit(colours, tmp_path / "run", training.FitHooks(on_epoch=snapshot), model="test_resnet", weights=str(test_resnet_3),
                 strategy=Strategy.gradual, epochs=3, head_epochs=1, lr=1e-2, checkpoint_every=0, bn_stats="update")
    assert [h["phase"] for h in result.history] == ["head", "head+1 group(s)", "head+2 group(s)"]
    start = load_file(str(test_resnet_3))
    backbone = tuple(f"{s}." for s in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"))
    # epoch 1: only the head; frozen BatchNorms (eval mode) keep their running statistics too
    assert changed(start, snapshots[0], backbone) == [] and changed(start, snapshots[0], ("fc.",))
    # epoch 2: layer4 joins (its BatchNorm statistics update again), nothing below it moves
    assert changed(snapshots[0], snapshots[1], backbone[:5]) == []
    moved = changed(snapshots[0], snapshots[1], ("layer4.",))
    assert any(k.endswith("conv1.weight") for k in moved) and any(k.endswith("running_var") for k in moved)
    # epoch 3: layer3 as well; the stem, layer1 and layer2 are never touched
    assert changed(start, snapshots[2], backbone[:4]) == []
    assert changed(snapshots[1], snapshots[2], ("layer3.",)) and changed(snapshots[1], snapshots[2], ("layer4.",))


def test_full_training_from_scratch_learns_a_separable_problem(tmp_path):
    data = tmp_path / "data"
    write_colour_folder(data / "train", dict.fromkeys(COLOURS, 16), seed=1)
    write_colour_folder(data / "val", dict.fromkeys(COLOURS, 8), seed=2)
    result = fit(data, tmp_path / "run", model="resnet10t", weights="none", epochs=4, batch_size=16)
    assert (result.train_images, result.val_images) == (48, 24)  # train/ and val/ used as given
    assert result.best["val_accuracy"] >= 0.9
    assert result.best["final_val_accuracy"] == pytest.approx(result.best["val_accuracy"])
    assert result.hparams["optimizer"] == "sgd"
    files = {p.name for p in result.run_dir.iterdir()}
    assert {"model.safetensors", "config.json", "metrics.csv", "confusion_matrix.csv", "report.csv"} <= files
    assert "state.pt" not in files  # a finished run has nothing to resume
    assert len(read_metrics(result.run_dir)) == 4


# ---------------------------------------------------------------- resume

def test_interrupted_then_resumed_equals_uninterrupted(colours, tmp_path):
    """Augmentation, dropout, shuffling and a loader worker: every random stream must be restored."""
    common = dict(model="resnet10t", weights="none", epochs=3, dropout=0.2, num_workers=1, augment=True)
    fit(colours, tmp_path / "whole", **common)

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    # no checkpoint is due by time: the interrupt itself writes the one epoch 2 kept in memory
    with pytest.raises(KeyboardInterrupt):
        fit(colours, tmp_path / "cut", training.FitHooks(on_epoch=stop_after_two), checkpoint_every=3600, **common)
    assert (tmp_path / "cut" / "state.pt").is_file() and len(read_metrics(tmp_path / "cut")) == 2
    resumed = training.resume(tmp_path / "cut")
    assert len(resumed.history) == 3
    assert without_seconds(read_metrics(tmp_path / "cut")) == without_seconds(read_metrics(tmp_path / "whole"))
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut" / "state.pt").exists()


def _stopped_after_epoch_1_then_resumed_equals_whole(data, tmp_path, common: dict) -> None:
    """A run stopped (Ctrl-C) after epoch 1 and resumed writes the metrics and weights of the same
    run left uninterrupted."""
    fit(data, tmp_path / "whole", **common)

    def stop_after_one(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(data, tmp_path / "cut", training.FitHooks(on_epoch=stop_after_one), **common)
    training.resume(tmp_path / "cut")
    assert without_seconds(read_metrics(tmp_path / "cut")) == without_seconds(read_metrics(tmp_path / "whole"))
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", [Strategy.gradual, Strategy.auto])
def test_resumed_finetune_equals_uninterrupted(colours, test_resnet_3, tmp_path, strategy):
    """Resuming rebuilds the model from state.pt: gradual unfreezing must pick up at the right
    stage, and auto's probe (epoch 0, a candidate for the best) is not fitted again. (linear is the
    probe alone now: no epoch to stop after.)"""
    common = dict(model="test_resnet", weights=str(test_resnet_3), strategy=strategy, epochs=3, lr=1e-2)
    _stopped_after_epoch_1_then_resumed_equals_whole(colours, tmp_path, common)


def test_balanced_sampling_resumes_exactly(tmp_path):
    """--balance sampler draws each epoch's batches from (seed, epoch): a resumed run draws what the
    uninterrupted one drew (the sampler's generator was seeded once per run, so a resume re-drew
    epoch 1's batches in epoch 2)."""
    data = write_colour_folder(tmp_path / "data", {"blue": 16, "green": 5, "red": 5})
    common = dict(model="test_resnet", weights="none", epochs=3, balance=Balance.sampler, augment=False)
    _stopped_after_epoch_1_then_resumed_equals_whole(data, tmp_path, common)


@pytest.mark.parametrize("every", [0, 3600])
def test_checkpoints_are_written_every_epoch_or_kept_in_memory_until_due(colours, tmp_path, every):
    from cnnxfer import checkpoint

    on_disk = []  # (state.pt epoch or None, model.safetensors present) as each epoch ends

    def look(row):
        state = tmp_path / "run" / "state.pt"
        on_disk.append((checkpoint.load_training_state(state)["epoch"] if state.exists() else None,
                        (tmp_path / "run" / "model.safetensors").exists()))

    result = fit(colours, tmp_path / "run", training.FitHooks(on_epoch=look), model="test_resnet", weights="none", epochs=3,
                 checkpoint_every=every)
    if every == 0:
        assert on_disk == [(1, True), (2, True), (3, True)]
    else:  # nothing written until the last epoch: it is always due
        assert on_disk == [(None, False), (None, False), (3, True)]
    assert len(read_metrics(tmp_path / "run")) == 3 and not (tmp_path / "run" / "state.pt").exists()
    # finish_run evaluates model.safetensors from disk: the best epoch's weights, whenever they were written
    assert result.best["final_val_accuracy"] == pytest.approx(result.history[result.best["epoch"] - 1]["val_accuracy"])

def test_resume_refuses_a_finished_run_and_a_missing_one(colours, tmp_path):
    fit(colours, tmp_path / "run", model="test_resnet", weights="none", epochs=1)
    with pytest.raises(UsageError, match="nothing to resume"):
        training.resume_config(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="not a cnnxfer run directory"):
        training.resume_config(tmp_path / "empty")


def test_resume_refuses_a_data_folder_whose_classes_changed(tmp_path):
    data = write_colour_folder(tmp_path / "data", dict.fromkeys(COLOURS, 6))

    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(data, tmp_path / "run", training.FitHooks(on_epoch=stop), model="test_resnet", weights="none", epochs=2)
    (data / "red").rename(data / "purple")
    with pytest.raises(DataError, match="the run was trained on"):
        training.resume(tmp_path / "run")


def test_existing_run_dir_is_untouched_without_overwrite(colours, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        fit(colours, run, model="test_resnet", weights="none", epochs=1)
    assert [p.name for p in run.iterdir()] == ["keep.txt"] and (run / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------- faults

def test_non_finite_loss_names_step_and_lr_and_keeps_last_good_epoch(colours, tmp_path):
    # 30 training images at batch 8: 3 steps per epoch (the ragged 4th batch takes none); the
    # 6th training forward, in epoch 2, returns inf.
    spec = custom_model_file(tmp_path, "if self.train_calls >= 6:", "    out = out + float('inf')")
    with pytest.raises(TrainingError) as info:
        fit(colours, tmp_path / "run", model=spec, weights="none", epochs=3, lr=0.01)
    message = str(info.value)
    assert "at step 6 (learning rate 0.00" in message and "peak --lr 0.01)" in message and "try --lr 0.001" in message
    assert "epoch 1" in message and str(tmp_path / "run") in message
    run = tmp_path / "run"
    assert len(read_metrics(run)) == 1 and (run / "state.pt").is_file()
    loaded = models.load_model(None, str(run))  # the last good checkpoint loads
    assert loaded.classes == sorted(COLOURS)
    assert all(torch.isfinite(v).all() for v in loaded.model.state_dict().values() if v.is_floating_point())


def test_huge_learning_rate_is_caught(colours, tmp_path):
    with pytest.raises(TrainingError, match=r"at step \d+ \(learning rate \S+, peak --lr 1e\+06\): the learning rate is likely too high \(try --lr 1e\+05\)"):
        fit(colours, tmp_path / "run", model="test_resnet", weights="none", epochs=2, lr=1e6, warmup_epochs=0)


def test_out_of_memory_suggests_a_batch_size_that_fits(colours, tmp_path):
    spec = custom_model_file(tmp_path, "if x.shape[0] > 5:", "    raise torch.OutOfMemoryError('CUDA out of memory (simulated)')")
    with pytest.raises(TrainingError, match=r"out of memory on cpu at batch size 16: --batch-size 4 fits"):
        fit(colours, tmp_path / "run", model=spec, weights="none", epochs=1, batch_size=16)


def test_out_of_memory_while_evaluating_is_a_training_error(colours, tmp_path):
    spec = custom_model_file(tmp_path, "if not self.training and x.shape[0] > 2:",
                             "    raise torch.OutOfMemoryError('CUDA out of memory (simulated)')")
    with pytest.raises(TrainingError, match=r"outside the training step .* batch size 8: try --batch-size 4; no epoch"):
        fit(colours, tmp_path / "run", model=spec, weights="none", epochs=1)


# ---------------------------------------------------------------- options

@pytest.mark.parametrize("balance", [Balance.loss, Balance.sampler])
def test_class_imbalance_options_run(balance, tmp_path):
    data = write_colour_folder(tmp_path / "data", {"blue": 20, "green": 4, "red": 4})
    result = fit(data, tmp_path / "run", model="test_resnet", weights="none", epochs=2, balance=balance)
    assert len(result.history) == 2 and all(math.isfinite(h["train_loss"]) for h in result.history)
    saved = models.load_model(None, str(result.run_dir)).run_config
    assert saved.train_config["balance"] == balance.value


def test_balanced_loss_weights_and_sampler(tmp_path):
    data = write_colour_folder(tmp_path / "data", {"blue": 20, "green": 5, "red": 5})
    from cnnxfer import device, distributed

    config = TrainConfig(data=data, out=tmp_path / "run", model="test_resnet", weights="none", balance=Balance.loss,
                         val_split=0.2)
    run = trainset.read_data(config, lambda note: None)
    weight = epochs.loss_fn(run, torch.device("cpu")).weight  # n / (classes * count): blue 16 -> 24/48, green/red 4 -> 2
    torch.testing.assert_close(weight, torch.tensor([0.5, 2.0, 2.0]))
    from cnnxfer.loader import Loader

    labels = np.array(run.train.labels)
    loader = Loader(labels, 8, weights=trainset._balanced_weights(run), seed=0)
    draws = []
    for epoch in range(20):
        loader.set_epoch(epoch)
        order = [i for batch in loader.batches() for i in batch]
        assert order == [i for batch in loader.batches() for i in batch]  # the same draw when resumed
        draws.append(order)
    assert draws[0] != draws[1]  # each epoch its own draw
    counts = np.bincount(labels[np.concatenate(draws)], minlength=3) / (20 * len(labels))
    assert counts == pytest.approx([1 / 3] * 3, abs=0.06)  # balanced, though blue has 4x the images


def test_early_stopping_stops_when_validation_loss_stalls(colours, test_resnet_3, tmp_path):
    # lr 0 (the head trained on features computed every step): the validation loss never improves after epoch 1.
    result = fit(colours, tmp_path / "run", model="test_resnet", weights=str(test_resnet_3), strategy=Strategy.linear,
                 cache_features=False, epochs=6, lr=0.0, patience=2)
    assert result.stopped_early and len(result.history) == 3


def test_unreadable_training_images_are_skipped_and_listed(colours, tmp_path):
    data = tmp_path / "data"
    write_colour_folder(data, dict.fromkeys(COLOURS, 6))
    (data / "red" / "text.png").write_text("not an image")
    good = (data / "blue" / "000.png").read_bytes()
    (data / "blue" / "truncated.png").write_bytes(good[: len(good) // 2])
    result = fit(data, tmp_path / "run", model="test_resnet", weights="none", epochs=2, val_split=0.3)
    assert result.skipped == 2
    with open(result.skipped_file, newline="") as fh:
        rows = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(fh)}
    assert set(rows) == {"text.png", "truncated.png"} and all(rows.values())



@pytest.mark.parametrize("augment", [True, False])
def test_images_held_in_memory_train_exactly_like_images_read_every_epoch(colours, tmp_path, augment):
    """--cache-images on/off: the same pixels, transforms and random stream, so the same weights."""
    data = tmp_path / "data"
    write_colour_folder(data, dict.fromkeys(COLOURS, 6))
    (data / "red" / "text.png").write_text("not an image")
    runs = {mode: fit(data, tmp_path / mode, model="test_resnet", weights="none", epochs=2, val_split=0.3,
                      augment=augment, cache_images=mode) for mode in ("on", "off")}
    assert any("into memory" in n for n in runs["on"].notes)
    assert not any("into memory" in n for n in runs["off"].notes)
    on, off = (load_file(str(tmp_path / mode / "model.safetensors")) for mode in ("on", "off"))
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(read_metrics(tmp_path / "on")) == drop(read_metrics(tmp_path / "off"))
    assert runs["on"].skipped == runs["off"].skipped == 1


def test_cache_images_auto_streams_what_does_not_fit_and_what_is_read_once(colours, tmp_path, monkeypatch):
    result = fit(colours, tmp_path / "fits", model="test_resnet", weights="none", epochs=2)
    assert "36 images decoded once into memory; --cache-images off reads them from disk every epoch" in result.notes
    result = fit(colours, tmp_path / "one_epoch", model="test_resnet", weights="none", epochs=1)
    assert not any("into memory" in n for n in result.notes)
    monkeypatch.setattr("cnnxfer.loader.CACHE_MAX_BYTES", 1000)  # 36 images of 32x32x3 bytes do not fit
    result = fit(colours, tmp_path / "too_big", model="test_resnet", weights="none", epochs=2)
    assert any("reading them from disk every epoch" in n for n in result.notes)
    assert not any("into memory" in n for n in result.notes)
    result = fit(colours, tmp_path / "forced", model="test_resnet", weights="none", epochs=2, cache_images="on")
    assert any("into memory" in n for n in result.notes)


def test_linear_with_its_feature_cache_decodes_each_image_once_without_holding_it(colours, test_resnet_3, tmp_path):
    result = fit(colours, tmp_path / "run", model="test_resnet", weights=str(test_resnet_3), strategy=Strategy.linear, epochs=3)
    assert not any("into memory" in n for n in result.notes)


def test_a_run_with_few_optimizer_steps_says_so_as_it_starts(colours, tmp_path):
    shown = []
    result = fit(colours, tmp_path / "few", training.FitHooks(on_message=shown.append), model="test_resnet", weights="none",
                 epochs=2)  # 30 training images at batch 8: 3 steps per epoch
    few = [n for n in result.notes if "optimizer step" in n]
    assert few == ["30 training images at --batch-size 8 give 3 optimizer step(s) per epoch, 6 in all: with few images, "
                   "raise --epochs (a few hundred steps is usual) or lower --batch-size"]
    assert shown == result.notes  # every note reaches the hook as it is made
    result = fit(colours, tmp_path / "enough", model="test_resnet", weights="none", epochs=7, batch_size=2)  # 15 x 7 = 105
    assert not [n for n in result.notes if "optimizer step" in n]

@pytest.mark.parametrize("n, weights, expected", [
    # fine-tuning pretrained weights starts from the probe's head: 5 epochs, at least 30 steps
    (15, "hub", (5, 10)),  # the demo's 3 labels x 5 digits: 3 steps per epoch
    (15, "none", (5, 100)),  # from scratch: at least 300 steps
    (120, "none", (15, 38)),
    (160, "hub", (20, 5)),  # 20 Fashion-MNIST images per class, less the validation fifth: 40 steps
    (900, "hub", (64, 5)),
    (900, "none", (64, 30)),
    (5000, "hub", (64, 5)),
])
def test_left_out_batch_size_and_epochs_are_chosen_from_the_dataset_size(n, weights, expected):
    config, note = recipe.resolve_schedule(TrainConfig(data=Path("."), out=Path("o"), weights=weights), n)
    assert (config.batch_size, config.epochs) == expected
    steps = config.epochs * (1 if n <= config.batch_size else n // config.batch_size)
    assert steps >= (300 if weights == "none" else 30)
    assert n - (n // config.batch_size) * config.batch_size < max(1, n // config.batch_size)
    assert (note is None) == (expected in ((64, 5), (64, 30)))


def test_the_users_batch_size_and_epochs_are_kept():
    config, note = recipe.resolve_schedule(TrainConfig(data=Path("."), out=Path("o"), batch_size=16), 15)
    assert (config.batch_size, config.epochs) == (16, 30) and "--epochs 30" in note and "--batch-size" not in note
    config, note = recipe.resolve_schedule(TrainConfig(data=Path("."), out=Path("o"), batch_size=64, epochs=2), 15)
    assert (config.batch_size, config.epochs, note) == (64, 2, None)


def test_a_small_dataset_with_default_options_gets_enough_steps_and_resumes_exactly(tmp_path):
    """32 images, --batch-size and --epochs left out: 8 batches of 4 for 38 epochs (304 steps),
    said once, recorded in config.json; a run interrupted at epoch 20 resumes to the same result."""
    data = write_colour_folder(tmp_path / "data", {"blue": 16, "red": 16})
    common = dict(model="test_resnet", weights="none", val_split=0.0, batch_size=None)
    shown = []
    whole = fit(data, tmp_path / "whole", training.FitHooks(on_message=shown.append), **common)
    assert [n for n in shown if "chosen" in n] == [
        "32 training images: --batch-size 4 and --epochs 38 chosen (304 optimizer steps in all); set --batch-size and "
        "--epochs to choose otherwise"]
    saved = json.loads((whole.run_dir / "config.json").read_text())["train_config"]
    assert (saved["batch_size"], saved["epochs"]) == (4, 38) and len(whole.history) == 38

    def stop_at_20(row):
        if row["epoch"] == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(data, tmp_path / "cut", training.FitHooks(on_epoch=stop_at_20), **common)
    started = []
    training.resume(tmp_path / "cut", training.FitHooks(on_start=started.append))
    assert (started[0].batch_size, started[0].epochs) == (4, 38)
    assert without_seconds(read_metrics(tmp_path / "cut")) == without_seconds(read_metrics(tmp_path / "whole"))


def test_a_class_with_only_unreadable_images_is_named(tmp_path):
    data = write_colour_folder(tmp_path / "data", {"blue": 6, "green": 6})
    (data / "red").mkdir()
    for i in range(6):
        (data / "red" / f"{i}.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(DataError, match=r"class\(es\) red is unreadable"):
        fit(data, tmp_path / "run", model="test_resnet", weights="none", epochs=1)


def test_val_split_zero_trains_on_everything_and_keeps_the_last_epoch(colours, tmp_path):
    result = fit(colours, tmp_path / "run", model="test_resnet", weights="none", epochs=3, val_split=0.0, patience=1)
    assert (result.train_images, result.val_images) == (36, 0)
    assert not result.stopped_early and len(result.history) == 3 and result.best["epoch"] == 3
    assert any("--patience is ignored" in note for note in result.notes)
    assert not (result.run_dir / "confusion_matrix.csv").exists()  # nothing to report on
    assert models.load_model(None, str(result.run_dir)).classes == sorted(COLOURS)
    linear = fit(colours, tmp_path / "linear", model="test_resnet", weights=str(result.run_dir / "model.safetensors"),
                 strategy=Strategy.linear, cache_features=False, epochs=2, val_split=0.0)
    assert linear.val_images == 0 and linear.best["epoch"] == 2
