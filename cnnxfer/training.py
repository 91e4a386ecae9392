"""finetune and train: one run, from labelled images and a model to a run directory (`fit`),
and the continuation of an interrupted one (`resume`).

`_fit` reads top to bottom: the data (trainset.py, with the settings recipe.py chooses), the
model, the run directory (rundir.py, its one owner), the probe (probing.py), the epochs
(epochs.py: strategy.py says which parameters train, engine.py is the step, the Stopper says
when to stop), the end. Where and how it computes is the Session's (session.py), which is the
only way the run talks to other processes.

With several processes (torchrun) the run is data-parallel and gives what one process gives:
each process takes its slice of every global batch (`--batch-size` stays the global batch, so the
learning rate and schedule do not change with the number of processes), DistributedDataParallel
averages the gradients, BatchNorm statistics are averaged before each evaluation, validation is
gathered so that every image counts once, every decision that ends a loop is taken together,
and only rank 0 writes. The linear strategy computes its cached features in shards and trains
the head on all of them on every rank.

Determinism: every epoch reseeds torch/numpy/random from (seed, epoch) and the training loader's
order and augmentation likewise (`Loader.set_epoch`), so a run resumed from its last epoch
checkpoint repeats exactly what the uninterrupted run would have done (same machine and
versions), with any number of processes that divides the batch.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import budget, device as dev, models, rundir, trainset
from .budget import END_SECONDS, Clock, refuse_if_short
from .config import RunConfig, Strategy, TrainConfig, resumed_config, to_dict
from .engine import BatchHook, seed_everything
from .epochs import Checkpoints, Loop
from .errors import TrainingError, UsageError
from .leaderboard import Leaderboard, parse_candidates
from .probing import AUTO_RULE, ProbeStage
from .rundir import RunDir
from .session import Session, open_session
from .signals import deferred_signals
from .stopper import BEST_RULE, Stopper


@dataclass
class FitHooks:
    """Optional callbacks the CLI's progress display plugs into (rank 0's alone under torchrun)."""

    on_batch: BatchHook | None = None
    on_epoch: Callable[[dict], None] | None = None
    on_message: Callable[[str], None] | None = None
    on_start: Callable[[TrainConfig], None] | None = None  # the run's config, epochs and batch size resolved


@dataclass
class FitResult:
    run_dir: Path
    classes: list[str]
    history: list[dict]
    best: dict
    stopped_early: bool
    seconds: float
    device: str
    precision: str
    train_images: int
    val_images: int
    skipped: int
    skipped_file: Path | None
    hparams: dict
    notes: list[str] = field(default_factory=list)
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> readable {"train": n, "val": n}
    best_rule: str = BEST_RULE
    world_size: int = 1
    probe: dict | None = None  # the probe's strength, cross-validated and validation figures (probe.describe_fit)
    strategy: str = ""  # as run: auto, linear, gradual or full
    selection: dict | None = None  # auto without validation images: the cross-validation (selection.CrossValidation)
    leaderboard: list[dict] | None = None  # several candidate backbones: their ranking (leaderboard.csv's rows)
    budget: dict | None = None  # --budget: {"seconds", "spent"} (spent: until the result, the summary aside)


# ---------------------------------------------------------------- the two entry points

def fit(config: TrainConfig, hooks: FitHooks | None = None, *, overwrite: bool = False,
        started: float | None = None) -> FitResult:
    """Train a classifier on `config.data` into the run directory `config.out` (finetune and train).
    Several candidate backbones (`model="a,b"`, `weights="wa,wb"`) are ranked first (leaderboard.py)
    and the leader is the run's model.

    Args:
        overwrite: replace the files of an earlier run in `config.out` (else an existing run is refused).
        started: the time.monotonic() from which `config.budget` counts (the CLI: the process's
            start, budget.process_started); default now.
    """
    start = time.perf_counter()
    clock = Clock(config.budget, time.monotonic() if started is None else started) if config.budget else None
    with open_session(config.device, config.precision, config.num_workers) as session:
        return _fit(config, hooks, session, start, overwrite=overwrite, clock=clock)


def resume(run_dir: Path | str, hooks: FitHooks | None = None, started: float | None = None, **given) -> FitResult:
    """Continue the interrupted run in `run_dir` after its last saved epoch, or start it again when
    no epoch had finished, with the run's own settings.

    Args:
        given: options given beside --resume, as TrainConfig fields (device="cpu", num_workers=2):
            those that say where and how to run apply (config.RUN_FIELDS; `data` where the same
            images are now; `precision` when it trains in the run's own dtype); any other that
            differs from the run's own setting raises UsageError naming it.
    """
    start, run_dir = time.perf_counter(), Path(run_dir)
    saved, config, point = resume_config(run_dir, **given)
    clock = None
    if config.budget:  # the time the run had left, or a --budget given beside --resume
        spent = 0.0 if given.get("budget") else float((saved.hparams or {}).get("budget", {}).get("spent", 0.0))
        clock = Clock(max(config.budget - spent, 0.0), time.monotonic() if started is None else started, before=spent)
    with open_session(config.device, config.precision, config.num_workers) as session:
        if saved.precision and session.precision != saved.precision:
            raise UsageError(f"--precision {config.precision.value} trains in {session.precision} on this device; the "
                             f"run trained in {saved.precision}: leave --precision out to resume in {saved.precision}")
        if point == "start":  # nothing to continue from: the same run from its beginning
            return _fit(config, hooks, session, start, overwrite=True, restarted=True, clock=clock)
        return _fit(config, hooks, session, start, saved=saved, clock=clock)


def resume_config(run_dir: Path | str, **given) -> tuple[RunConfig, TrainConfig, str]:
    """(the interrupted run's RunConfig, the TrainConfig that continues it, its rundir.resume_point);
    UsageError when `run_dir` is not an unfinished run or `given` would change its result (see `resume`)."""
    run_dir = Path(run_dir)
    if not (run_dir / rundir.CONFIG_FILE).is_file():
        raise UsageError(f"--resume {run_dir}: not a cnnxfer run directory (no config.json)")
    unfinished = rundir.read_unfinished(run_dir)
    if unfinished is None:
        raise UsageError(f"--resume {run_dir}: nothing to resume: the run finished (--overwrite starts it again)")
    saved, point = unfinished
    return saved, resumed_config(saved, run_dir, given), point


# ---------------------------------------------------------------- one run, top to bottom

def _fit(config: TrainConfig, hooks: FitHooks | None, session: Session, start: float, *, overwrite: bool = False,
         saved: RunConfig | None = None, restarted: bool = False, clock: Clock | None = None) -> FitResult:
    """Candidates, data, model, run directory, probe, epochs, the end. `saved`: the interrupted run
    resumed; `clock`: the --budget."""
    hooks = (hooks or FitHooks()) if session.is_main else FitHooks()
    notes = _Notes(hooks.on_message)
    if restarted:
        notes("no epoch of the interrupted run had finished: it starts again from the beginning")
    if session.distributed and (config.batch_size or 0) % session.world:
        raise UsageError(f"--batch-size {config.batch_size} is the global batch: it must divide by the "
                         f"{session.world} processes (each takes an equal share of every batch)")
    session.main_first(lambda: rundir.prepare(config.out, overwrite, resume=saved is not None))
    board = None
    if saved is None and len(parse_candidates(config.model, config.weights)) > 1:
        config, board = _rank(config, session, clock, notes)
    # a resumed run takes its weights from state.pt: the original --weights need not exist any more
    models.check_model_options(config.model, models.NONE if saved else config.weights)
    run = trainset.read_data(config, notes)
    if hooks.on_start:
        hooks.on_start(run.config)
    if saved is not None:
        trainset.check_same_data(saved, run, Path(config.out))
    seed_everything(run.config.seed)  # the random initialisation of the model and head
    loaded, step_dtype = _build_model(run, session, saved, notes)
    if clock is not None and saved is None and board is None:
        _refuse_short_budget(run, loaded, session, clock)
    runs = RunDir(config.out, writer=session.is_main)
    skips = trainset.Skips(session, run)
    probe = ProbeStage(run, loaded.model, loaded.arch, session, skips, runs, notes, saved)
    if board is not None:
        handover = board.handover(board.leader())
        if handover and handover["data_config"] == models.data_config_json(loaded.data_config):
            probe.handover = handover  # the same images through the same preprocessing: the same features
    record = _Record(run, loaded, session, skips, probe, saved, clock, board)
    if saved is None:  # from here on an interrupt leaves a run that --resume can start again
        runs.start(overwrite, record(best={}))
        runs.save_splits(run.train, run.val)
        if board is not None:
            runs.save_leaderboard(board.rows())
    with deferred_signals():
        data = trainset.build_loaders(run, loaded.data_config, session, notes)
        state = runs.load_state() if saved is not None else None
        if state is not None:  # into the model before the plan caches features from the backbone
            loaded.model.load_state_dict(state["model"])
            skips.skipped.update(state.get("skipped", {}))
        history, best, stopped = _train(run, loaded, step_dtype, session, data, skips, probe, runs, record, state, hooks,
                                        notes, clock)
        final = _finish(run, loaded.model, session, data, probe, runs, record, best)
    seconds = time.perf_counter() - start
    return record.result(runs, history, dict(best, **final), stopped, seconds, notes.all)


def _rank(config: TrainConfig, session: Session, clock: Clock | None, notes) -> tuple[TrainConfig, Leaderboard]:
    """The leaderboard of the candidate backbones; the config of the leader's run."""
    from . import recipe

    candidates = parse_candidates(config.model, config.weights)
    for candidate in candidates:  # a typo in any of them is named before anything is computed
        models.check_model_options(candidate.model, candidate.weights)
    train, val = recipe.split_data(config.data, config.val_split, config.seed)  # the run's own split (read_data)
    board = Leaderboard(config, candidates, train, len(val), session, notes, clock)
    leader = board.rank().candidate
    return dataclasses.replace(config, model=leader.model, weights=leader.weights), board


def _refuse_short_budget(run: trainset.RunData, loaded: models.LoadedModel, session: Session, clock: Clock) -> None:
    """A --budget too small for even the probe is refused before the run directory is written."""
    from .leaderboard import inference_speed, probe_seconds

    model = loaded.model
    was_training = model.training
    speed, dim = inference_speed(loaded, run.train, run.config, session)
    model.train(was_training)
    images = len(run.train) + len(run.val)
    needed = images / speed + probe_seconds(len(run.train), dim, len(run.classes)) + END_SECONDS
    refuse_if_short(clock, needed, f"the probe on {images} images with {loaded.arch} ({speed:.0f} images/s)")


def _build_model(run: trainset.RunData, session: Session, saved: RunConfig | None, note) -> tuple[models.LoadedModel, torch.dtype | None]:
    """The model with its new head, on the device, and the dtype its training steps use."""
    c = run.config
    loaded = models.load_model(c.model, models.NONE if saved else c.weights, len(run.classes), drop_rate=c.dropout,
                               img_size=run.img_size, classes=run.classes)
    for text in loaded.notes:
        note(text)
    if c.sync_bn:
        if session.device.type != "cuda":
            raise UsageError("--sync-bn synchronises BatchNorm across GPUs (it needs CUDA); on a CPU the "
                             "processes' BatchNorm statistics are averaged before each evaluation instead")
        loaded.model = nn.SyncBatchNorm.convert_sync_batchnorm(loaded.model)
    if loaded.new_head and c.weights != models.NONE:
        models.zero_head(loaded.model)  # every class equally likely: the loss starts at ln(classes), not above
    loaded.model = session.place(loaded.model)
    if saved is not None:
        loaded.data_config = models.as_data_config(saved.data_config)
    return loaded, _step_dtype(run, loaded.model, session, saved, note)


def _step_dtype(run: trainset.RunData, model: nn.Module, session: Session, saved: RunConfig | None, note):
    """The dtype of the training steps (device.training_dtype), recorded in the run's hparams
    so that a resumed run steps in the same one."""
    recorded = (saved.hparams or {}).get("step_precision") if saved is not None else None
    if recorded is not None:
        dtype = None if recorded == "float32" else getattr(torch, recorded)
    else:
        dtype = dev.training_dtype(session.runtime, model, run.config.precision)
        if dtype != session.dtype:
            note(f"precision auto: training steps in float32, evaluation in {session.precision} (bf16 "
                 f"trains models with depthwise convolutions slower than fp32 on a CPU)")
    run.hp["step_precision"] = dev.dtype_name(dtype)
    return dtype


def _train(run, loaded, step_dtype, session, data, skips, probe: ProbeStage, runs: RunDir, record, state, hooks, notes,
           clock: Clock | None = None):
    """The probe, then the epochs; (history, best, stopped early). Failures name the last good checkpoint."""
    c, history = run.config, []
    try:
        loop = Loop(run, loaded.model, step_dtype, session, data, skips, notes)
        saver = Checkpoints(runs, loaded.arch, lambda best: record(best=best), c.checkpoint_every, c.epochs)
        stopper = Stopper(c.epochs, c.patience, c.max_steps, validated=len(run.val) > 0)
        best: dict = {}
        if state is not None:
            loop.restore(state)
            start_epoch, history, best, stopper.bad_epochs = (state["epoch"], list(state["history"]), dict(state["best"]),
                                                               state["bad_epochs"])
            if start_epoch == 0 and history and history[0].get("phase") == "probe":
                # interrupted after the probe, before the folds decided
                probe.select_by_cross_validation(_fold, _fold_budget(clock))
        else:
            start_epoch = 0
            if probe.comes_first(loop.plan.probe_only, loaded.new_head):
                def save(row, kept, candidate):
                    saver.save(-1, loop.state(-1, [row], kept, 0), candidate)
                    saver.flush()

                history, best = probe.fit_epoch_zero(data, loop.plan.probe_only, save)
                if probe.row is not None:
                    probe.select_by_cross_validation(_fold, _fold_budget(clock))
        if loop.plan.probe_only or probe.keeps_probe:
            return history, best, False
        if clock is not None:
            loop.time_plan = _time_plan(clock, run, loop, probe, loaded)
            more = loop.time_plan.size(loop.ctx.global_step) - loop.ctx.global_step
            if more < budget.MIN_STEPS and probe.candidate(history) is not None:
                notes(f"--budget: {budget.describe(max(clock.left(), 0))} left, time for about {more} fine-tuning "
                      f"step(s): fewer than {budget.MIN_STEPS}, so the probe is the run")
                return history, best, False
        try:
            history, best = loop.run_epochs(start_epoch, history, best, stopper, saver, hooks.on_batch, hooks.on_epoch,
                                            scored=probe.candidate(history) is not None)
        finally:  # also on Ctrl-C, SIGTERM and a non-finite loss: the last finished epoch on disk
            saver.flush()
        return history, probe.keep_better(history, best, lambda kept: record(best=kept)), stopper.stopped_early
    except TrainingError as exc:
        raise TrainingError(f"{exc}; {_last_good(history, runs)}") from exc
    except torch.OutOfMemoryError as exc:  # the training step has its own hint; this is evaluation or the feature cache
        bs = c.batch_size
        raise TrainingError(f"out of memory on {session.device} outside the training step (evaluation or feature cache) "
                            f"at batch size {bs}: try --batch-size {max(1, bs // 2)}; {_last_good(history, runs)}") from exc


def _time_plan(clock: Clock, run, loop: Loop, probe: ProbeStage, loaded: models.LoadedModel) -> budget.TimePlan:
    """The fine-tuning schedule sized to the budget, first from the probe's inference speed."""
    from .engine import steps_per_epoch

    from .leaderboard import inference_speed

    c = run.config
    speed = probe.images_per_second
    if not speed:  # no probe ran: the inference speed, measured
        speed = inference_speed(loaded, run.train, c, loop.session)[0]
    val_seconds = probe.val_seconds or len(run.val) / speed
    may_refit = probe.auto and len(run.val) and probe.fit is not None
    reserve = val_seconds + (1.3 * probe.fit.seconds if may_refit else 0.0) + budget.END_SECONDS
    spe = steps_per_epoch(loop.loaders[0])
    return budget.TimePlan(clock, reserve, spe, budget.BACKWARD_FACTOR * c.batch_size / speed, val_seconds,
                           warmup_steps=int(c.warmup_epochs * spe), max_epochs=c.epochs, max_steps=c.max_steps)


def _fold_budget(clock: Clock | None) -> float | None:
    """Under --budget, each cross-validation fold's share of the time left (the run keeps one)."""
    from .selection import FOLDS

    return None if clock is None else max(clock.left(), 0.0) / (FOLDS + 1)


def _fold(config: TrainConfig) -> FitResult:
    """One fold of selection.cross_validate: a run of its own in a temporary folder."""
    return fit(config, overwrite=True)


def _last_good(history: list, runs: RunDir) -> str:
    if history:
        return f"the last good checkpoint (epoch {history[-1]['epoch']}) is in {runs.path}"
    return "no epoch finished, so there is no checkpoint"


def _finish(run, model: nn.Module, session: Session, data, probe: ProbeStage, runs: RunDir, record, best: dict) -> dict:
    """Reload the best weights, evaluate them on the validation set, write the reports and plots."""
    from . import calibration, metrics
    from .epochs import evaluate

    session.barrier()  # rank 0 wrote model.safetensors
    model.load_state_dict(runs.best_weights())
    stats, probs, targets, _ = evaluate(model, data.val, session, data.normalizer)
    final, fitted = {}, None
    if len(targets):  # --val-split 0: nothing to report on
        result = metrics.summarize(probs.numpy(), targets.numpy(), run.classes, stats.loss)
        runs.save_reports(result)
        final = {"final_val_accuracy": result.accuracy, "final_val_loss": result.loss}
        fitted = calibration.fit(probs.numpy(), targets.numpy(), "the run's validation images")
        probe.refit_kept(best, data)
        if probe.refit_held_out is not None:  # the kept head has now seen the validation images too:
            # its own cross-validation held every image out once (its temperature is in the head already)
            fitted = calibration.fit(*probe.refit_held_out, "the held-out probabilities of the kept probe's "
                                     "cross-validation on the training and validation images")
    runs.write_config(record(best=best, final=final or None, status="finished", calibration=fitted))
    runs.finish()
    runs.save_plots()
    return final


# ---------------------------------------------------------------- what the run records

class _Notes:
    """What the user should know about the run: kept for FitResult.notes and shown as it happens."""

    def __init__(self, show: Callable[[str], None] | None):
        self.show, self.all = show, []

    def __call__(self, text: str) -> None:
        self.all.append(text)
        if self.show:
            self.show(text)


class _Record:
    """config.json's RunConfig and the FitResult, from the run's parts."""

    def __init__(self, run: trainset.RunData, loaded: models.LoadedModel, session: Session, skips: trainset.Skips,
                 probe: ProbeStage, saved: RunConfig | None, clock: Clock | None = None,
                 board: Leaderboard | None = None):
        self.run, self.loaded, self.session, self.skips, self.probe, self.saved = run, loaded, session, skips, probe, saved
        self.clock, self.board = clock, board

    @property
    def best_rule(self) -> str:
        """How the kept epoch was chosen, as the summary and config.json say it (stopper.is_new_best)."""
        return AUTO_RULE if Strategy(self.run.config.strategy) == Strategy.auto else BEST_RULE

    def __call__(self, best: dict, final: dict | None = None, status: str = "running",
                 calibration: dict | None = None) -> RunConfig:
        from .timm_import import import_timm

        timm = import_timm()

        counts, loaded, session = self.skips.class_counts(), self.loaded, self.session
        weights = loaded.weights if self.saved is None else self.saved.weights_source
        if self.clock is not None:
            self.run.hp["budget"] = self.clock.record()
        return RunConfig(
            model=loaded.arch, classes=self.run.classes, train_config=self.recorded_config(), weights_source=weights,
            data_config=models.data_config_json(loaded.data_config),
            hparams=self.run.hp, best=best, best_rule=self.best_rule, final=final, status=status,
            train_images=sum(c["train"] for c in counts.values()), val_images=sum(c["val"] for c in counts.values()),
            class_counts=counts, data_fingerprint=self.run.fingerprint, precision=session.precision,
            probe=self.probe.summary(), selection=self.probe.selection, device=str(session.device),
            world_size=session.world, versions={"torch": torch.__version__, "timm": timm.__version__},
            calibration=calibration)

    def recorded_config(self) -> dict:
        """The TrainConfig as config.json keeps it, to rebuild this run on --resume from any folder:
        the architecture actually built (also when --weights named a run directory, which leaves
        --model out) and absolute paths for the data, the weights and a model file."""
        c = self.run.config
        values = to_dict(c)
        values.update(model=models.absolute_spec(self.loaded.arch), data=str(Path(c.data).resolve()))
        if c.weights not in (models.HUB, models.NONE):
            values["weights"] = str(Path(c.weights).resolve())
        return values

    def result(self, runs: RunDir, history: list, best: dict, stopped: bool, seconds: float, notes: list[str]) -> FitResult:
        self.skips.merge()
        skipped_file = runs.write_skipped(self.skips.skipped)
        counts, session = self.skips.class_counts(), self.session
        return FitResult(runs.path, self.run.classes, history, best, stopped, seconds, str(session.device),
                         session.precision, sum(c["train"] for c in counts.values()),
                         sum(c["val"] for c in counts.values()), len(self.skips), skipped_file, self.run.hp, notes,
                         counts, world_size=session.world, probe=self.probe.summary(),
                         strategy=Strategy(self.run.config.strategy).value, selection=self.probe.selection,
                         best_rule=self.best_rule, leaderboard=self.board.rows() if self.board else None,
                         budget=self.clock.record() if self.clock else None)
