"""How long does a command take to start, against importing torch and against its own steady state?

Builds its inputs (once, under --work): a photo (scikit-image's astronaut, JPEG q90), a tiny run
directory (`cnnxfer train` on 12 small JPEGs, resnet10t, one epoch), 96 phone photos (the photo
benchmark's maker: skimage's colour photos upscaled to 4032x3024 with noise, JPEG q90, a quarter
portraits with EXIF orientation) and resnet18 random weights in a local file (the extract model of
benchmarks/photos.py, batch 32). Then, in one run, interleaved, --repeat rounds (medians):

  import torch     wall seconds of `python -c "import torch"`
  predict one      wall seconds of `cnnxfer predict one.jpg --weights RUN_DIR`
  extract 96       `cnnxfer extract` on the 96 photos: its wall seconds and the rate it reports
                   (images / its own time: model loading and warm-up included, Python's start-up
                   and the CLI's imports not)
  steady           the same extraction run twice in one Python process: the second pass's rate

Ratios are taken within each round (neighbours in time), then their median. Targets: predict one
<= 2x import torch; extract 96's own rate >= 0.8x steady. With --before DIR
(another checkout of cnnxfer, e.g. `git worktree add /tmp/before COMMIT`) every row runs for both
checkouts in the same rounds. Children run with bytecode caching on (as an installed package has
its .pyc files) and one discarded warm-up round (.pyc written, files in the page cache).

    python benchmarks/startup.py [--work DIR] [--repeat N] [--before DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, verdict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL, BATCH, PHOTOS = "resnet18", 32, 96

STEADY = """
import json, sys
from pathlib import Path
from cnnxfer import ExtractConfig, extract_features
config = ExtractConfig(data=Path(sys.argv[1]), out=Path(sys.argv[2]), model=sys.argv[3], weights=sys.argv[4],
                       batch_size=int(sys.argv[5]), overwrite=True)
rates = [extract_features(config).images_per_second for _ in range(2)]
print(json.dumps(rates))
"""

MAKE = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from common import save_random_weights, write_photo_folder
import numpy as np, skimage.data
from PIL import Image
work = Path(sys.argv[2])
Image.fromarray(skimage.data.astronaut()).save(work / "one.jpg", quality=90)
tiny = work / "tiny"
rng = np.random.default_rng(0)
for c in ("cat", "dog"):
    (tiny / c).mkdir(parents=True, exist_ok=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tiny / c / f"img{i}.jpg")
save_random_weights(sys.argv[3], work / f"{sys.argv[3]}.safetensors")
write_photo_folder(work / "phone", int(sys.argv[4]), (4032, 3024))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="where inputs are written once (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds; each figure is their median")
    parser.add_argument("--before", type=Path, default=None, help="another cnnxfer checkout, measured in the same rounds")
    return parser.parse_args()


def child_env(checkout: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPATH=str(checkout), COLUMNS="200", NO_COLOR="1")
    return env


def timed(args: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def build_inputs(work: Path) -> None:
    if (work / ".complete").exists():
        return
    start = time.perf_counter()
    env = child_env(ROOT)
    subprocess.run([sys.executable, "-c", MAKE, str(Path(__file__).parent), str(work), MODEL, str(PHOTOS)],
                   check=True, env=env)
    subprocess.run([sys.executable, "-m", "cnnxfer", "train", str(work / "tiny"), "--model", "resnet10t", "--epochs", "1",
                    "--out", str(work / "run"), "--overwrite"], check=True, env=env, capture_output=True)
    (work / ".complete").write_text("")
    print(f"inputs written in {time.perf_counter() - start:.0f} s", flush=True)


def one_round(name: str, checkout: Path, work: Path, out: dict) -> None:
    env, py = child_env(checkout), sys.executable
    seconds, _ = timed([py, "-m", "cnnxfer", "predict", str(work / "one.jpg"), "--weights", str(work / "run"),
                        "--out", str(work / f"pred_{name}.csv"), "--overwrite"], env)
    out.setdefault("predict", []).append(seconds)
    seconds, stdout = timed([py, "-m", "cnnxfer", "extract", str(work / "phone"), "--model", MODEL, "--weights",
                             str(work / f"{MODEL}.safetensors"), "--batch-size", str(BATCH),
                             "--out", str(work / f"feat_{name}.parquet"), "--overwrite"], env)
    out.setdefault("extract_wall", []).append(seconds)
    out.setdefault("extract_rate", []).append(float(re.search(r"\(([\d.,]+) img/s\)", stdout).group(1).replace(",", "")))
    _, stdout = timed([py, "-c", STEADY, str(work / "phone"), str(work / f"steady_{name}.parquet"), MODEL,
                       str(work / f"{MODEL}.safetensors"), str(BATCH)], env)
    out.setdefault("steady_rate", []).append(json.loads(stdout)[1])


def main() -> int:
    args = parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="cnnxfer-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    build_inputs(work)
    checkouts = {"after": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    results = {name: {} for name in checkouts}
    torch_s = []
    for r in range(args.repeat + 1):  # round 0 warms up: .pyc files, the page cache
        seconds, _ = timed([sys.executable, "-c", "import torch"], child_env(ROOT))
        scratch = {}
        for name, checkout in checkouts.items():
            one_round(name, checkout, work, scratch if r == 0 else results[name])
        if r:
            torch_s.append(seconds)
            print(f"round {r}: import torch {seconds:.2f} s; " + "; ".join(
                f"{n}: predict {v['predict'][-1]:.2f} s, extract {v['extract_wall'][-1]:.2f} s "
                f"({v['extract_rate'][-1]:.1f} img/s, steady {v['steady_rate'][-1]:.1f})" for n, v in results.items()),
                flush=True)
    med = statistics.median
    t = med(torch_s)
    print(f"\nmedians of {args.repeat} rounds; {PHOTOS} phone photos 4032x3024, {MODEL} batch {BATCH}; "
          f"import torch {t:.2f} s")
    rows, checks = [], []
    for name, v in results.items():
        # ratios within each round (the figures it compares ran seconds apart), then their median:
        # on a shared machine the load changes between rounds more than between neighbours
        vs_torch = med(p / s for p, s in zip(v["predict"], torch_s))
        own_vs_steady = med(o / s for o, s in zip(v["extract_rate"], v["steady_rate"]))
        rows.append([name, f"{med(v['predict']):.2f}", f"{vs_torch:.2f}x", f"{med(v['extract_wall']):.2f}",
                     f"{med(v['extract_rate']):.1f}", f"{med(v['steady_rate']):.1f}", f"{own_vs_steady:.2f}"])
        checks += [(f"{name}: predict one / import torch", vs_torch, 2.0, "<="),
                   (f"{name}: extract own rate / steady", own_vs_steady, 0.8, ">=")]
    print_table(["checkout", "predict one s", "vs torch", "extract 96 wall s", "own img/s", "steady img/s", "own/steady"],
                rows)
    print()
    print_table(["target", "value", "goal", ""], [
        [n, f"{v:.2f}", f"{op} {g}", verdict(v, g) if op == ">=" else verdict(g, v)] for n, v, g, op in checks])
    return 0 if all((v >= g) if op == ">=" else (v <= g) for _, v, g, op in checks if not _.startswith("before")) else 1


if __name__ == "__main__":
    sys.exit(main())
