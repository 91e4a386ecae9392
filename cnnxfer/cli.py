"""The `cnnxfer` command: parse options, build a config, call one library function, render.

No ML logic lives here. Library errors become one red line on stderr and exit 2 (bad input)
or 1 (runtime failure); Ctrl-C exits 130 and SIGTERM 143.
"""
from __future__ import annotations

import functools
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import config as cfg
from .errors import CnnxferError

app = typer.Typer(
    help="Transfer learning with convolutional networks: extract, finetune, train, sanity-check.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

_E = cfg.ExtractConfig.__dataclass_fields__


def _default(fields, name):
    return fields[name].default


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that `finally` blocks (checkpoints) run."""


def _on_sigterm(signum, frame):
    raise Terminated()


def handle_errors(fn):
    """Run a command; map library errors, Ctrl-C and SIGTERM to exit codes."""
    from . import report

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except CnnxferError as exc:
            report.error(str(exc))
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt:
            report.error("interrupted (Ctrl-C); finished work was kept - re-run with --resume to continue")
            raise typer.Exit(130)
        except Terminated:
            report.error("terminated (SIGTERM); finished work was kept - re-run with --resume to continue")
            raise typer.Exit(143)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


Device = Annotated[str, typer.Option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")]
PrecisionOpt = Annotated[cfg.Precision, typer.Option("--precision", help="auto: bf16/fp16 autocast on CUDA and bf16-capable CPUs, else fp32.")]
Weights = Annotated[Optional[str], typer.Option("--weights", "-w", help="hub (timm pretrained), none (random init), a .safetensors/.pth file, or a cnnxfer run directory.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="timm architecture (resnet50) or your own path/to/file.py:factory.")]
ImgSize = Annotated[Optional[int], typer.Option("--img-size", help="Input size in pixels (default: the model's own).")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="DataLoader worker processes (default: sized from the CPU count).")]
Strict = Annotated[bool, typer.Option("--strict", help="Exit 1 if any image was skipped as unreadable.")]


@app.command()
@handle_errors
def info(device: Device = "auto", precision: PrecisionOpt = cfg.Precision.auto) -> None:
    """Show versions, the device cnnxfer would use, GPU name/memory, precision and threads.

    Example: cnnxfer info --device auto
    """
    from . import device as dev, report

    report.environment(dev.describe_environment(device, precision.value))


@app.command()
@handle_errors
def extract(
    data: Annotated[Path, typer.Argument(exists=True, help="Image folder (class subfolders or flat) or a CSV manifest (path,label).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output Parquet file.")] = Path("features.parquet"),
    model: ModelOpt = None,
    weights: Weights = "hub",
    layers: Annotated[Optional[str], typer.Option("--layers", help="Also embed these stages, comma-separated names or indices (e.g. layer2,layer3 or 1,2).")] = None,
    pool: Annotated[Optional[cfg.Pool], typer.Option("--pool", help="Global pooling (default: the model's own; avg for --layers).")] = None,
    tta: Annotated[cfg.Tta, typer.Option("--tta", help="flip: average with the mirrored image.")] = cfg.Tta.none,
    img_size: ImgSize = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = _default(_E, "batch_size"),
    workers: Workers = None,
    device: Device = "auto",
    precision: PrecisionOpt = cfg.Precision.auto,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted extraction into the same --out.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    strict: Strict = False,
) -> None:
    """Level 1: embed every image with a pretrained CNN and write the features to Parquet.

    Example: cnnxfer extract photos/ --model resnet50 --out features.parquet
    """
    from . import features, report

    config = cfg.ExtractConfig(
        data=data, out=out, model=model, weights=weights, layers=tuple(l for l in (layers or "").split(",") if l.strip()),
        pool=pool, tta=tta, img_size=img_size, batch_size=batch_size, num_workers=workers, device=device,
        precision=precision, resume=resume, overwrite=overwrite, strict=strict,
    )
    with report.image_progress("extract") as progress:
        summary = features.extract_features(config, progress)
    report.extract_summary(summary)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()
