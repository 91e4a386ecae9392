"""Several processes (torchrun, srun): the only module that calls torch.distributed.

The rank, world size and local rank come from the environment torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK) or, under SLURM's srun, from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID. With one
process every function here is the identity or a no-op, so commands and the training loop read
the same either way. The process group uses NCCL on CUDA and gloo otherwise; every collective
has a timeout (`init`), so a rank that dies ends the others instead of hanging them.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

DEFAULT_TIMEOUT_S = 1800.0  # a collective waits at most this long for a slow or dead rank


@dataclass(frozen=True)
class Dist:
    """Where this process stands among the processes of one job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes shared outputs."""
        return self.rank == 0


def from_environment(env: dict | None = None) -> Dist:
    """The job position from torchrun's variables, else SLURM's (under srun), else one process."""
    env = os.environ if env is None else env

    def number(*names: str) -> int | None:
        for name in names:
            if env.get(name, "").strip():
                try:
                    return int(env[name])
                except ValueError:
                    from .errors import UsageError

                    raise UsageError(f"environment variable {name}={env[name]!r} is not a number") from None
        return None

    world = number("WORLD_SIZE", "SLURM_NTASKS")
    if not world or world <= 1:
        return Dist()
    torchrun = bool(env.get("WORLD_SIZE", "").strip())
    rank = number("RANK") if torchrun else number("SLURM_PROCID")
    local = number("LOCAL_RANK") if torchrun else number("SLURM_LOCALID")
    return Dist(rank or 0, world, local or 0)


_state: dict[str, Any] = {"dist": Dist(), "owner": False}


def current() -> Dist:
    """This process's position once `init` ran (one process before that)."""
    return _state["dist"]


def init(device_type: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Dist:
    """Join the job's process group (once per process; later calls return the same position)."""
    info = from_environment()
    if not info.enabled:
        return info
    import torch.distributed as tdist

    if not tdist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", str(info.rank))  # srun sets only SLURM's names
        os.environ.setdefault("WORLD_SIZE", str(info.world))
        backend = "nccl" if device_type == "cuda" else "gloo"
        tdist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        _state["owner"] = True
    _state["dist"] = info
    return info


def shutdown() -> None:
    """Leave the process group this module joined (a no-op otherwise)."""
    if _state["owner"]:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()
        _state["owner"] = False
    _state["dist"] = Dist()


@contextlib.contextmanager
def session(device_type: str) -> Iterator[Dist]:
    """`init` for the length of one command, then `shutdown`."""
    info = init(device_type)
    try:
        yield info
    finally:
        shutdown()


def barrier() -> None:
    if current().enabled:
        import torch.distributed as tdist

        tdist.barrier()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (one process: [obj])."""
    if not current().enabled:
        return [obj]
    import torch.distributed as tdist

    out: list[Any] = [None] * current().world
    tdist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not current().enabled:
        return obj
    import torch.distributed as tdist

    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def main_first(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 alone (preparing a shared output folder, say); every rank then returns
    its result, or raises the exception it raised, so a bad input ends every rank the same way."""
    result, error = None, None
    if current().is_main:
        try:
            result = fn()
        except Exception as exc:  # raised on every rank below
            error = exc
    result, error = broadcast((result, error))
    if error is not None:
        raise error
    return result


def any_rank(flag: bool, device=None) -> bool:
    """True on every rank when it is true on any: a decision that ends a loop must be the same
    everywhere, or the ranks that go on wait forever for the ones that stopped. (A tensor on
    `device` - NCCL reduces only CUDA tensors - rather than a pickled object: it runs every step.)"""
    if not current().enabled:
        return bool(flag)
    import torch

    box = torch.tensor([1.0 if flag else 0.0], device=device)
    all_reduce_(box)
    return bool(box.item() > 0)


def all_reduce_(tensor, op: str = "sum"):
    """Sum (or average with op="mean") `tensor` over the ranks, in place."""
    if current().enabled:
        import torch.distributed as tdist

        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        if op == "mean":
            tensor.div_(current().world)
    return tensor


def my_share(items: Sequence[Any], info: Dist | None = None) -> list[Any]:
    """The items this rank takes: every world-th one from its rank (item k goes to rank k % world)."""
    info = info or current()
    return [item for k, item in enumerate(items) if k % info.world == info.rank]


def relaunch(nproc: int, argv: Sequence[str]) -> int:
    """`cnnxfer ... --nproc N`: the same command line (without --nproc) run by torchrun's own
    launcher with N processes on this machine. Returns the exit code of the first process that
    failed (128 + the signal for one killed by a signal), 0 when all finished."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "cnnxfer", *without_option(argv, "--nproc")])
    try:
        run(args)
    except ChildFailedError as exc:
        return _first_failure(exc.failures)
    except SignalException as exc:  # Ctrl-C or SIGTERM to the launcher: the workers had it too
        return 128 + int(exc.sigval)
    return 0


def _first_failure(failures: dict) -> int:
    """The exit code that names what went wrong: the lowest rank that failed on its own. When one
    rank fails the launcher stops the others with SIGTERM (-15, or 143 from our own handler), and
    which ranks it caught first is a race: those are the fallback, not the answer."""
    codes = {rank: (128 - f.exitcode if f.exitcode < 0 else f.exitcode) for rank, f in failures.items()}
    own = [rank for rank, code in codes.items() if code != 128 + signal.SIGTERM]
    return codes[min(own or codes)]


def without_option(argv: Sequence[str], name: str) -> list[str]:
    """`argv` without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out
