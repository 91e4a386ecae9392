"""The run directory's one owner (cnnxfer/rundir.py): what a run from Python leaves, and its readers."""
from __future__ import annotations

import pandas as pd
import pytest

from cnnxfer import recipe, rundir, training
from cnnxfer.config import TrainConfig
from cnnxfer.errors import OutputExistsError
from cnnxfer.recipe import split_data


def _fit(data, out, **options):
    return training.fit(TrainConfig(data=data, out=out, model="test_resnet", weights="none", epochs=2, batch_size=8,
                                    img_size=32, precision="fp32", num_workers=0, **options), overwrite=True)


def test_a_python_fit_leaves_the_plots_and_which_image_went_where(colours, tmp_path):
    result = _fit(colours, tmp_path / "run", val_split=0.25, seed=3)
    run = result.run_dir
    for png in (rundir.CURVES_PLOT, rundir.CONFUSION_PLOT):  # drawn by fit, not by the CLI
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    splits = pd.read_csv(run / rundir.SPLITS_FILE, dtype=str)
    train, val = split_data(colours, 0.25, 3)
    assert sorted(splits[splits.split == "val"].path) == sorted(str(p.resolve()) for p in val.paths)
    assert len(splits[splits.split == "train"]) == result.train_images and len(val) == result.val_images
    assert dict(zip(splits.path, splits.label)) == {str(p.resolve()): train.classes[label]
                                                    for images in (train, val) for p, label in zip(images.paths, images.labels)}
    again_train, again_val = recipe.run_split(run)  # what evaluate and the report page read
    assert [str(p) for p in again_val.paths] == list(splits[splits.split == "val"].path)
    assert again_val.labels == [val.classes.index(c) for c in splits[splits.split == "val"].label]


def test_the_owner_answers_for_the_directory_and_overwrite_removes_only_run_files(colours, tmp_path):
    run = tmp_path / "run"
    _fit(colours, run)
    assert rundir.is_run_dir(run) and rundir.resume_point(run) is None  # finished: nothing to resume
    assert rundir.read_config(run).classes == sorted(p.name for p in colours.iterdir())
    (run / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        rundir.prepare(run, overwrite=False)
    rundir.clear(run)
    assert [p.name for p in run.iterdir()] == ["notes.txt"]  # splits.csv and the plots went with the rest
