"""--budget: a wall-clock limit for a whole finetune command, start-up included.

The clock starts when the process does (`process_started`), so the user's "10 minutes" is what they
wait. The leaderboard (leaderboard.py) takes at most LEADERBOARD_SHARE of it; the probe comes
next; fine-tuning gets what is left, less what the end of the run needs (`Clock.reserve`: the
last validation, a refit of the probe, the reports).

`TimePlan` sizes the fine-tuning schedule to that time from measured speed: the step time from
the first MEASURE_STEPS steps, then from every finished epoch, and the validation time from the
last validation. Each time it counts the optimizer steps that fit (`steps_that_fit`: every epoch,
a partial last one included, ends with a validation), and makes them the run's schedule: the
cosine's length and warm-up (engine.Cosine), the step limit and the epochs (stopper.Stopper), and
the time after which no step starts (StepContext.stop_at), so that the run stops at its budget
even mid-epoch, with the best epoch kept.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

LEADERBOARD_SHARE = 0.35  # of the budget, at most, for ranking the candidates (leaderboard.py)
MEASURE_STEPS = 5  # fine-tuning steps timed before the schedule is sized to the measured speed
MIN_STEPS = 10  # fewer fine-tuning steps than this are not worth starting: the probe is the run
WARMUP_SHARE = 0.2  # the warm-up is at most this share of the steps (else --warmup-epochs)
BACKWARD_FACTOR = 4.0  # a training step ~ this many inference passes, before any step is measured
# Without --epochs, a budgeted run takes at most this many times the epochs the dataset's size
# gives (recipe.auto_epochs): 20 for most, where a fine-tuned EfficientNet-Lite0 validated best at
# epoch 2-3 of 5 and of 10 (Fashion-MNIST, 20 per class); beyond, more passes add overfitting, and
# the run ends before its budget.
MAX_EPOCHS_FACTOR = 4
END_SECONDS = 2.0  # writing the reports, plots and config.json at the end of a run (measured: under 1 s)


def process_started() -> float:
    """The time.monotonic() at which this process started (Linux's /proc), else now: the budget
    counts the interpreter's start and every import."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.monotonic() - min(max(age, 0.0), 60.0)
    except (OSError, ValueError, IndexError):
        return time.monotonic()


@dataclass
class Clock:
    """`seconds` of wall time from `start` (a time.monotonic() value); `before`: what the run
    spent in an earlier process (a resumed run)."""

    seconds: float
    start: float
    before: float = 0.0

    @property
    def end(self) -> float:
        return self.start + self.seconds

    def spent(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.end - time.monotonic()

    def record(self) -> dict:
        """What config.json keeps (hparams.budget): the whole budget and the time spent so far."""
        return {"seconds": round(self.before + self.seconds, 1), "spent": round(self.before + self.spent(), 1)}

    def margin(self) -> float:
        """Kept free at the end for what measurements miss (a slower last batch, a busy machine)."""
        return 1.0 + 0.01 * self.seconds


def steps_that_fit(seconds: float, step_seconds: float, steps_per_epoch: int, val_seconds: float,
                   into_epoch: int = 0, max_steps: int | None = None) -> int:
    """The most optimizer steps that fit in `seconds` when each epoch (of `steps_per_epoch`; the
    current one has `into_epoch` done already) ends with a validation of `val_seconds`, a partial
    last epoch included."""
    steps, left, chunk = 0, seconds, steps_per_epoch - into_epoch
    step_seconds = max(step_seconds, 1e-6)
    while chunk > 0:
        room = left - val_seconds
        n = min(chunk, int(room // step_seconds)) if room > 0 else 0
        if n <= 0:
            break
        steps += n
        left -= n * step_seconds + val_seconds
        if n < chunk or (max_steps is not None and steps >= max_steps):
            break
        chunk = steps_per_epoch
    return steps if max_steps is None else min(steps, max_steps)


class TimePlan:
    """The fine-tuning schedule of a --budget run, sized and re-sized to the time left.

    Args:
        clock: the command's budget.
        reserve: the seconds the end of the run needs after the last validation.
        steps_per_epoch: optimizer steps in one epoch.
        step_seconds, val_seconds: first estimates (from the probe's inference passes), replaced
            by measurements as they come.
        max_epochs, max_steps: limits the user set (--epochs, --max-steps), kept.
    """

    def __init__(self, clock: Clock, reserve: float, steps_per_epoch: int, step_seconds: float, val_seconds: float,
                 warmup_steps: int, max_epochs: int | None = None, max_steps: int | None = None):
        self.clock, self.reserve, self.spe = clock, reserve, steps_per_epoch
        self.step_seconds, self.val_seconds, self.warmup = step_seconds, val_seconds, warmup_steps
        self.max_epochs, self.max_steps = max_epochs, max_steps
        self.total = 0
        self.resized = 0  # how many times the measured speed changed the schedule
        self._steps_at_start = 0
        self._measure_from: tuple[float, int] | None = None
        self._measured = False

    @property
    def stop_at(self) -> float:
        """No training step starts after this: the last validation and the end must still fit."""
        return self.clock.end - self.clock.margin() - self.reserve - self.val_seconds

    def size(self, done_steps: int) -> int:
        """The planned total of optimizer steps, `done_steps` already taken (at an epoch's start or
        after MEASURE_STEPS into the first)."""
        into = done_steps % self.spe if self.spe else 0
        left = self.stop_at + self.val_seconds - time.monotonic()
        more = steps_that_fit(left, self.step_seconds, self.spe, self.val_seconds, into)
        total = done_steps + more
        if self.max_steps is not None:
            total = min(total, self.max_steps)
        if self.max_epochs is not None:
            total = min(total, self.max_epochs * self.spe)
        if self.total and abs(total - self.total) <= 0.05 * self.total:
            return self.total  # within 5%: the schedule stays as it is
        if self.total:
            self.resized += 1
        self.total = max(total, done_steps)
        return self.total

    def epochs(self) -> int:
        """The epochs the planned steps take (the last may be partial)."""
        return max(1, math.ceil(self.total / self.spe)) if self.spe else 1

    def warmup_steps(self) -> int:
        return min(self.warmup, int(WARMUP_SHARE * self.total))

    # -- measurements
    def epoch_started(self, global_step: int) -> None:
        self._steps_at_start = global_step

    def step_done(self, global_step: int) -> bool:
        """After each step: True once, when the run's first MEASURE_STEPS steps after its first
        (which pays for allocations and kernel choices) are timed: then re-size."""
        if self._measured:
            return False
        if self._measure_from is None:
            self._measure_from = (time.monotonic(), global_step)
            return False
        t0, s0 = self._measure_from
        if global_step - s0 >= MEASURE_STEPS:
            self.step_seconds, self._measured = (time.monotonic() - t0) / (global_step - s0), True
            return True
        return False

    def epoch_done(self, global_step: int, train_seconds: float, val_seconds: float) -> None:
        """After an epoch and its validation: the measured speeds."""
        steps = global_step - self._steps_at_start
        if steps > 0:
            self.step_seconds = train_seconds / steps
        self.val_seconds, self._measured = val_seconds, True


def describe(seconds: float) -> str:
    """90 -> "1m30s", 600 -> "10m", 45.2 -> "45s"."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs or not seconds else ""]
    return "".join(parts)


def refuse_if_short(clock: Clock, needed: float, what: str) -> None:
    """UsageError when the budget cannot cover `needed` more seconds from now (what: why, for the
    message), saying the budget it would take."""
    minimum = clock.spent() + needed + clock.margin()
    if clock.seconds < minimum:
        from .errors import UsageError

        raise UsageError(f"--budget {describe(clock.seconds)} is too small: {what} needs about {describe(minimum)} here "
                         f"(start-up included); give --budget {describe(math.ceil(minimum / 10) * 10)} or more")
