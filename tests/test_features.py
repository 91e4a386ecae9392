"""Level 1 extraction (cnnxfer/features.py), checked against a direct timm forward on the same tensors."""
from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from cnnxfer import ExtractConfig, extract_features, read_features
from cnnxfer.errors import DataError, OutputExistsError, StrictModeError, UsageError
from cnnxfer.features import skipped_path

ROOT = Path(__file__).resolve().parents[1]


def _extract(tmp_path: Path, data: Path, name: str = "out.parquet", progress=None, **kwargs):
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("precision", "fp32")
    return extract_features(ExtractConfig(data=data, out=tmp_path / name, **kwargs), progress)


def _rows(path: Path, column: str = "embedding"):
    paths, labels, matrix = read_features(path, column)
    return paths, labels, torch.from_numpy(matrix.copy())


def _timm_model_and_inputs(name: str, weights: Path, paths: list[str]):
    """The reference: timm's own model, data config and eval transform on PIL-decoded RGB images."""
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config, is_training=False)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    return model, x


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=1).min())


# ---------------------------------------------------------------- embeddings vs timm

@pytest.mark.parametrize("name", ["resnet10t", "test_efficientnet"])
def test_fp32_embeddings_equal_a_direct_timm_forward(tmp_path, tiny_folder, timm_weights, name):
    summary = _extract(tmp_path, tiny_folder, model=name, weights=str(timm_weights(name)))
    paths, labels, emb = _rows(summary.out)
    assert summary.images == 6 and summary.skipped == 0 and summary.skipped_file is None
    assert labels == ["cat"] * 3 + ["dog"] * 3
    assert paths == sorted(str(p) for p in tiny_folder.rglob("*.jpg"))
    model, x = _timm_model_and_inputs(name, timm_weights(name), paths)
    model.reset_classifier(0)  # timm's pooled pre-logits features
    with torch.no_grad():
        expected = model(x)
    assert emb.shape == expected.shape == (6, model.num_features)
    assert torch.allclose(emb, expected, rtol=1e-3, atol=1e-4)
    assert _min_cosine(emb, expected) > 0.9999
    assert summary.precision == "float32" and summary.columns == {"embedding": model.num_features}


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_reduced_precision_is_close_to_fp32(tmp_path, tiny_folder, resnet10t_weights, precision):
    common = dict(model="resnet10t", weights=str(resnet10t_weights))
    fp32 = _rows(_extract(tmp_path, tiny_folder, "fp32.parquet", **common).out)[2]
    summary = _extract(tmp_path, tiny_folder, "low.parquet", precision=precision, **common)
    low = _rows(summary.out)[2]
    from cnnxfer.device import cpu_has_native_bf16

    bf16 = precision == "bf16" or cpu_has_native_bf16()
    assert summary.precision == ("bfloat16" if bf16 else "float32")
    assert low.dtype == torch.float32  # stored as float32 whatever the compute precision
    assert _min_cosine(low, fp32) > 0.999
    if bf16:
        assert not torch.equal(low, fp32)  # really computed in bf16


def test_layers_equal_timm_features_only_pooled(tmp_path, tiny_folder, resnet10t_weights):
    summary = _extract(tmp_path, tiny_folder, model="resnet10t", weights=str(resnet10t_weights), layers=("layer2", "3"))
    assert list(summary.columns) == ["embedding", "embedding_layer2", "embedding_layer3"]
    meta = json.loads(pq.read_schema(summary.out).metadata[b"cnnxfer"])
    assert meta["layers"] == list(summary.columns) and meta["layer_modules"] == ["layer2", "layer3"]
    paths = _rows(summary.out)[0]
    _, x = _timm_model_and_inputs("resnet10t", resnet10t_weights, paths)
    features = timm.create_model("resnet10t", features_only=True, out_indices=(2, 3)).eval()
    features.load_state_dict(load_file(str(resnet10t_weights)), strict=False)
    with torch.no_grad():
        maps = features(x)
    for column, fmap in zip(["embedding_layer2", "embedding_layer3"], maps):
        got = _rows(summary.out, column)[2]
        expected = fmap.mean(dim=(2, 3))
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, rtol=1e-3, atol=1e-4) and _min_cosine(got, expected) > 0.9999


def test_tta_flip_is_the_mean_of_both_forwards(tmp_path, tiny_folder, resnet10t_weights):
    common = dict(model="resnet10t", weights=str(resnet10t_weights))
    summary = _extract(tmp_path, tiny_folder, "tta.parquet", tta="flip", **common)
    paths, _, got = _rows(summary.out)
    plain = _rows(_extract(tmp_path, tiny_folder, "plain.parquet", **common).out)[2]
    model, x = _timm_model_and_inputs("resnet10t", resnet10t_weights, paths)
    model.reset_classifier(0)
    with torch.no_grad():
        expected = 0.5 * (model(x) + model(torch.flip(x, dims=[3])))
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(got, plain, rtol=1e-3, atol=1e-4)


def test_pool_max_matches_manual_max_pooling(tmp_path, tiny_folder, resnet10t_weights):
    common = dict(model="resnet10t", weights=str(resnet10t_weights), layers=("layer3",))
    summary = _extract(tmp_path, tiny_folder, "max.parquet", pool="max", **common)
    paths, _, got = _rows(summary.out)
    avg = _rows(_extract(tmp_path, tiny_folder, "avg.parquet", **common).out)[2]
    model, x = _timm_model_and_inputs("resnet10t", resnet10t_weights, paths)
    with torch.no_grad():
        fmap = model.forward_features(x)
        layer3 = model.forward_intermediates(x, indices=[3], intermediates_only=True)[0]
    assert torch.allclose(got, fmap.amax(dim=(2, 3)), rtol=1e-3, atol=1e-4)
    assert torch.allclose(avg, fmap.mean(dim=(2, 3)), rtol=1e-3, atol=1e-4)
    assert _min_cosine(got, avg) < 0.999  # max really differs from avg
    assert torch.allclose(_rows(summary.out, "embedding_layer3")[2], layer3.amax(dim=(2, 3)), rtol=1e-3, atol=1e-4)
    assert json.loads(pq.read_schema(summary.out).metadata[b"cnnxfer"])["pool"] == "max"


def test_custom_model_embedding_is_the_input_of_the_last_linear(tmp_path, tiny_folder):
    source = tmp_path / "net.py"
    source.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self, num_classes):
                super().__init__()
                self.conv = nn.Conv2d(3, 6, 3, stride=2)
                self.pool = nn.AdaptiveMaxPool2d(3)
                self.hidden = nn.Linear(54, 10)
                self.head = nn.Linear(10, num_classes)

            def forward(self, x):
                return self.head(torch.tanh(self.hidden(self.pool(torch.relu(self.conv(x))).flatten(1))))

        def make(num_classes):
            return Net(num_classes)
    """))
    torch.manual_seed(3)
    spec = f"{source}:make"
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("ref_net", source)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    reference = module.make(1000).eval()
    save_file(reference.state_dict(), str(tmp_path / "net.safetensors"))
    summary = _extract(tmp_path, tiny_folder, model=spec, weights=str(tmp_path / "net.safetensors"), img_size=40)
    paths, _, got = _rows(summary.out)
    transform = timm.data.create_transform(input_size=(3, 40, 40), crop_pct=1.0, interpolation="bilinear",
                                           mean=timm.data.IMAGENET_DEFAULT_MEAN, std=timm.data.IMAGENET_DEFAULT_STD)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        expected = torch.tanh(reference.hidden(reference.pool(torch.relu(reference.conv(x))).flatten(1)))
    assert summary.columns == {"embedding": 10}
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-5)
    with pytest.raises(UsageError, match="--pool"):
        _extract(tmp_path, tiny_folder, "pooled.parquet", model=spec, weights="none", pool="max", img_size=40)


# ---------------------------------------------------------------- dirty folders and skip lists

def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_dirty_folder_gives_the_valid_images_and_a_skip_list(tmp_path, dirty_folder, test_resnet_weights):
    before = _tree(dirty_folder.root)
    summary = _extract(
        tmp_path, dirty_folder.root, model="test_resnet", weights=str(test_resnet_weights), img_size=32,
        max_image_pixels=dirty_folder.max_image_pixels, num_workers=None,  # the default worker processes
    )
    paths, labels, emb = _rows(summary.out)
    assert dict(zip(paths, labels)) == {str(p): label for p, label in dirty_folder.valid.items()}
    assert len(paths) == len(set(paths)) == summary.images == len(dirty_folder.valid)
    assert torch.isfinite(emb).all()
    assert summary.skipped_file == skipped_path(summary.out) == tmp_path / "out.skipped.csv"
    with open(summary.skipped_file, newline="", encoding="utf-8") as fh:
        skipped = {row["path"]: row["reason"] for row in csv.DictReader(fh)}
    assert set(skipped) == {str(p) for p in dirty_folder.skipped} and summary.skipped == len(skipped)
    for path, pattern in dirty_folder.skipped.items():
        assert re.search(pattern, skipped[str(path)]), (path.name, skipped[str(path)])
    assert any("'" + str(dirty_folder.root / "empty") + "'" in w for w in summary.warnings)
    assert _tree(dirty_folder.root) == before  # nothing written into the input folder
    assert not Path(str(summary.out) + ".parts").exists()


def test_strict_mode_fails_after_writing(tmp_path, dirty_folder, test_resnet_weights):
    with pytest.raises(StrictModeError, match="skipped"):
        _extract(tmp_path, dirty_folder.root, model="test_resnet", weights=str(test_resnet_weights), img_size=32,
                 max_image_pixels=dirty_folder.max_image_pixels, strict=True)
    assert (tmp_path / "out.parquet").exists() and (tmp_path / "out.skipped.csv").exists()


def test_no_readable_image_is_a_data_error(tmp_path, test_resnet_weights):
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.jpg").write_text("not a jpeg")
    with pytest.raises(DataError, match="no image could be read"):
        _extract(tmp_path, tmp_path / "bad", model="test_resnet", weights=str(test_resnet_weights), img_size=32)
    assert not (tmp_path / "out.parquet").exists()


# ---------------------------------------------------------------- resume

def _resume_dataset(root: Path, make_images) -> Path:
    make_images(root, {"a": 9, "b": 8})
    (root / "a" / "img10_broken.jpg").write_text("not an image")  # index 1 after sorting: in part 0
    return root


def _skipped(out: Path) -> list[str]:
    with open(skipped_path(out), newline="", encoding="utf-8") as fh:
        return [row["path"] for row in csv.DictReader(fh)]


def _interrupt_after(n: int):
    seen = []

    def progress(done, total):
        seen.append(done)
        if done >= n:
            raise KeyboardInterrupt

    return progress, seen


def test_resume_after_interrupt_equals_one_full_run(tmp_path, make_images, test_resnet_weights):
    data_root = _resume_dataset(tmp_path / "ds", make_images)
    common = dict(model="test_resnet", weights=str(test_resnet_weights), img_size=32, part_size=4, batch_size=2)
    progress, seen = _interrupt_after(9)
    with pytest.raises(KeyboardInterrupt):
        _extract(tmp_path, data_root, "resumed.parquet", progress, **common)
    parts = tmp_path / "resumed.parquet.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["job.json", "part-000000.json", "part-000000.parquet",
                                                       "part-000001.json", "part-000001.parquet"]
    assert not (tmp_path / "resumed.parquet").exists()
    assert seen == sorted(seen) and seen[-1] == 10

    with pytest.raises(OutputExistsError, match="--resume"):
        _extract(tmp_path, data_root, "resumed.parquet", **common)  # neither --resume nor --overwrite
    summary = _extract(tmp_path, data_root, "resumed.parquet", resume=True, **common)
    full = _extract(tmp_path, data_root, "full.parquet", **common)
    assert summary.resumed == 8 and summary.images == full.images == 17
    got, expected = _rows(summary.out), _rows(full.out)
    assert got[0] == expected[0] and got[1] == expected[1]  # same paths in the same order, no duplicates
    assert torch.allclose(got[2], expected[2], atol=1e-6)
    assert _skipped(summary.out) == _skipped(full.out) == [str(data_root / "a" / "img10_broken.jpg")]
    assert not parts.exists()


def test_resume_refuses_changed_inputs_and_options(tmp_path, make_images, test_resnet_weights, write_image):
    data_root = _resume_dataset(tmp_path / "ds", make_images)
    common = dict(model="test_resnet", weights=str(test_resnet_weights), img_size=32, part_size=4, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        _extract(tmp_path, data_root, "r.parquet", _interrupt_after(9)[0], **common)
    job = (tmp_path / "r.parquet.parts" / "job.json").read_bytes()
    with pytest.raises(DataError, match="--pool model -> max changed"):  # named, with both values
        _extract(tmp_path, data_root, "r.parquet", resume=True, pool="max", **common)
    write_image(data_root / "b" / "img3.jpg", seed=999)  # same name, new content
    with pytest.raises(DataError, match="the input images changed"):
        _extract(tmp_path, data_root, "r.parquet", resume=True, **common)
    assert (tmp_path / "r.parquet.parts" / "job.json").read_bytes() == job
    summary = _extract(tmp_path, data_root, "r.parquet", overwrite=True, **common)
    assert summary.resumed == 0 and summary.images == 17


def test_existing_output_is_untouched_without_overwrite(tmp_path, tiny_folder, test_resnet_weights):
    common = dict(model="test_resnet", weights=str(test_resnet_weights), img_size=32)
    out = _extract(tmp_path, tiny_folder, **common).out
    blob, mtime = out.read_bytes(), out.stat().st_mtime_ns
    with pytest.raises(OutputExistsError, match="--overwrite") as info:
        _extract(tmp_path, tiny_folder, **common)
    assert info.value.exit_code == 2
    with pytest.raises(OutputExistsError, match="already complete"):
        _extract(tmp_path, tiny_folder, resume=True, **common)
    assert out.read_bytes() == blob and out.stat().st_mtime_ns == mtime
    _extract(tmp_path, tiny_folder, overwrite=True, **common)
    assert out.stat().st_mtime_ns != mtime


_KILL_SCRIPT = """
import sys, time
from pathlib import Path
from cnnxfer import ExtractConfig, extract_features

data, out, weights = sys.argv[1:4]
config = ExtractConfig(data=Path(data), out=Path(out), model="test_resnet", weights=weights, img_size=32,
                       part_size=4, batch_size=2, num_workers=0, precision="fp32")
extract_features(config, lambda done, total: time.sleep(0.1))  # slow enough to be killed mid-run
"""


def test_sigkill_then_resume_equals_one_full_run(tmp_path, make_images, test_resnet_weights):
    data_root = _resume_dataset(tmp_path / "ds", make_images)
    out = tmp_path / "killed.parquet"
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(data_root), str(out), str(test_resnet_weights)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first_part = tmp_path / "killed.parquet.parts" / "part-000000.json"  # a part is done once its record is written
    deadline = time.monotonic() + 60
    while not first_part.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0].decode(errors="replace")
    assert first_part.exists() and proc.returncode == -signal.SIGKILL, output
    assert not out.exists()

    common = dict(model="test_resnet", weights=str(test_resnet_weights), img_size=32, part_size=4, batch_size=2)
    summary = _extract(tmp_path, data_root, "killed.parquet", resume=True, **common)
    full = _extract(tmp_path, data_root, "full.parquet", **common)
    assert 4 <= summary.resumed < 18
    got, expected = _rows(summary.out), _rows(full.out)
    assert got[0] == expected[0] and got[1] == expected[1]
    assert torch.allclose(got[2], expected[2], atol=1e-6)
    assert _skipped(summary.out) == _skipped(full.out) == [str(data_root / "a" / "img10_broken.jpg")]


# ---------------------------------------------------------------- Parquet contents and readers

def test_parquet_columns_metadata_and_readers(tmp_path, make_images, test_resnet_weights):
    make_images(tmp_path / "flat", {"": ["b.jpg", "a.png", "c.jpg"]})
    summary = _extract(tmp_path, tmp_path / "flat", model="test_resnet", weights=str(test_resnet_weights),
                       img_size=32, layers=("layer1",))
    schema = pq.read_schema(summary.out)
    assert schema.names == ["path", "label", "embedding", "embedding_layer1"]
    for name, dim in (("embedding", 96), ("embedding_layer1", 32)):
        kind = schema.field(name).type
        assert pa.types.is_fixed_size_list(kind) and kind.list_size == dim and kind.value_type == pa.float32()
    meta = json.loads(schema.metadata[b"cnnxfer"])
    assert meta["model"] == "test_resnet" and meta["weights"] == str(test_resnet_weights.resolve())
    assert meta["layers"] == ["embedding", "embedding_layer1"] and meta["pool"] == "model"
    assert meta["data_config"]["input_size"] == [3, 32, 32]
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["timm"] == timm.__version__
    assert meta["config"]["part_size"] == 1024 and meta["precision"] == "float32"

    table = pq.read_table(summary.out)
    assert table.column("label").null_count == 3  # a flat folder is unlabelled
    assert table.column("path").to_pylist() == [str(tmp_path / "flat" / n) for n in ("a.png", "b.jpg", "c.jpg")]
    frame = table.to_pandas()
    assert frame["label"].isna().all() and len(frame["embedding"].iloc[0]) == 96
    import pandas as pd

    frame = pd.read_parquet(summary.out)
    matrix = np.stack(frame["embedding"].to_numpy())
    assert matrix.shape == (3, 96) and matrix.dtype == np.float32
    assert np.allclose(matrix, read_features(summary.out)[2])


def test_parquet_is_readable_by_duckdb(tmp_path, tiny_folder, test_resnet_weights):
    duckdb = pytest.importorskip("duckdb")
    summary = _extract(tmp_path, tiny_folder, model="test_resnet", weights=str(test_resnet_weights), img_size=32)
    rows = duckdb.sql(f"SELECT label, count(*), min(len(embedding)) FROM '{summary.out}' GROUP BY label ORDER BY label").fetchall()
    assert rows == [("cat", 3, 96), ("dog", 3, 96)]
    first = duckdb.sql(f"SELECT embedding FROM '{summary.out}' ORDER BY path LIMIT 1").fetchall()[0][0]
    assert np.allclose(np.array(first, dtype=np.float32), read_features(summary.out)[2][0])


def test_csv_manifest_input(tmp_path, make_images, test_resnet_weights):
    written = make_images(tmp_path / "images", {"x": 2, "y": 2})
    manifest = tmp_path / "lists" / "train.csv"
    manifest.parent.mkdir()
    lines = ["path,label"] + [f"../images/{p.parent.name}/{p.name},{'odd' if i % 2 else 'even'}"
                              for i, p in enumerate(written["x"] + written["y"])]
    manifest.write_text("\n".join(lines) + "\n")
    summary = _extract(tmp_path, manifest, model="test_resnet", weights=str(test_resnet_weights), img_size=32)
    paths, labels, emb = _rows(summary.out)
    assert [Path(p).resolve() for p in paths] == [p.resolve() for p in written["x"] + written["y"]]
    assert labels == ["even", "odd", "even", "odd"] and emb.shape == (4, 96)
    assert json.loads(pq.read_schema(summary.out).metadata[b"cnnxfer"])["classes"] == []  # weights' classes, none here


def test_bad_layer_fails_before_writing(tmp_path, tiny_folder, test_resnet_weights):
    with pytest.raises(UsageError, match="unknown layer 'layer9'"):
        _extract(tmp_path, tiny_folder, model="test_resnet", weights=str(test_resnet_weights), layers=("layer9",))
    assert list(tmp_path.iterdir()) == [tiny_folder]


def test_the_first_batch_decodes_while_the_model_loads_and_changes_nothing(tmp_path, make_images, test_resnet_weights,
                                                                           monkeypatch):
    """A first extract records the model's preprocessing; the next decodes its first batch before
    timm imports (features._FirstBatch) and writes the same file; a wrong record is dropped."""
    from cnnxfer import features, models

    monkeypatch.setenv("CNNXFER_CACHE", str(tmp_path / "cache"))
    make_images(tmp_path / "data", {"a": 5, "b": 4})
    taken = []
    take = features._FirstBatch.take

    def counted(self, *args):
        batches = take(self, *args)
        taken.append(batches is not None)
        return batches

    monkeypatch.setattr(features._FirstBatch, "take", counted)
    common = dict(model="test_resnet", weights=str(test_resnet_weights), img_size=40, batch_size=4, part_size=4)
    _extract(tmp_path, tmp_path / "data", "cold.parquet", **common)
    assert taken == []  # nothing known yet: the ordinary loader
    known = models.known_data_config("test_resnet", str(test_resnet_weights), 40)
    assert known is not None and known["input_size"] == (3, 40, 40)
    _extract(tmp_path, tmp_path / "data", "warm.parquet", **common)
    assert taken == [True]
    cold, warm = _rows(tmp_path / "cold.parquet"), _rows(tmp_path / "warm.parquet")
    assert cold[0] == warm[0] and cold[1] == warm[1] and torch.equal(cold[2], warm[2])
    models.remember_data_config("test_resnet", str(test_resnet_weights), 40, dict(known, crop_pct=0.5))  # a wrong guess
    _extract(tmp_path, tmp_path / "data", "wrong.parquet", **common)
    assert taken == [True, False] and torch.equal(_rows(tmp_path / "wrong.parquet")[2], cold[2])
    assert models.known_data_config("test_resnet", str(test_resnet_weights), 40)["crop_pct"] == known["crop_pct"]
    (tmp_path / "cache" / "data_configs.json").write_text('{"timm 0|x": 1, ' + '"' + next(iter(
        json.loads((tmp_path / "cache" / "data_configs.json").read_text()))) + '": {"input_size": [3]}}')
    _extract(tmp_path, tmp_path / "data", "damaged.parquet", **common)  # a damaged record: the ordinary loader
    assert taken == [True, False] and torch.equal(_rows(tmp_path / "damaged.parquet")[2], cold[2])


def test_a_run_directory_knows_its_preprocessing_before_it_loads(digits_run, tmp_path):
    from cnnxfer import models

    loaded = models.load_model(None, str(digits_run))
    known = models.known_data_config(None, str(digits_run), None)
    assert known == {k: tuple(v) if isinstance(v, list) else v for k, v in loaded.data_config.items()}
    assert models.known_data_config(None, str(digits_run), 48) is None  # another size: only the model knows
    assert models.known_data_config(f"{tmp_path / 'net.py'}:build", "none", None) is None  # a custom model: no record
