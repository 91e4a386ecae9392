"""Everything the user sees: progress bars, tables, messages. The only module importing rich."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def info_line(message: str) -> None:
    console.print(message, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def image_progress(description: str) -> Iterator:
    """A progress bar with images/s; yields a callback (done, total)."""
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err_console, transient=False, disable=not err_console.is_terminal,
    )
    task = None
    start = [None]

    def update(done: int, total: int) -> None:
        import time

        nonlocal task
        now = time.perf_counter()
        if task is None:
            task = progress.add_task(description, total=total, completed=done, rate="")
            start[0] = (now, done)
            return
        t0, d0 = start[0]
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        progress.update(task, completed=done, total=total, rate=f"{rate:,.1f} img/s")

    with progress:
        yield update


def table(title: str, rows: list[tuple], headers: tuple = ("", "")) -> Table:
    t = Table(title=title, title_justify="left", show_header=any(headers))
    for h in headers:
        t.add_column(h)
    for row in rows:
        t.add_row(*[str(c) for c in row])
    return t


def show(renderable) -> None:
    console.print(renderable)


def environment(info) -> None:
    rows = [(k, v) for k, v in info.versions.items()]
    rows += [
        ("device", info.device),
        ("device name", info.device_name),
        ("memory", f"{info.memory_gib:.1f} GiB" if info.memory_gib else "-"),
        ("precision (auto)", info.precision),
        ("channels_last", "yes" if info.channels_last else "no"),
        ("torch threads", info.threads),
        ("loader workers", info.workers),
    ]
    show(table("cnnxfer info", rows))


def extract_summary(s) -> None:
    rows = [
        ("output", s.out),
        ("images", f"{s.images:,}" + (f" ({s.resumed:,} from the interrupted run)" if s.resumed else "")),
        ("skipped", f"{s.skipped:,}" + (f" (listed in {s.skipped_file})" if s.skipped_file else "")),
        ("columns", ", ".join(f"{k} [{v}]" for k, v in s.columns.items())),
        ("time", f"{s.seconds:.1f} s ({s.images_per_second:,.1f} img/s)"),
        ("device", f"{s.device} / {s.precision}"),
    ]
    for w in s.warnings:
        warn(w)
    show(table("extract", rows))
