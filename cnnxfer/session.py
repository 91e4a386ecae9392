"""Where and how a command computes: one Session per command (Lightning Fabric is the model).

`open_session(device, precision, workers)` resolves the device, the precision and the decode
threads once (device.resolve_runtime), joins the torchrun job when there is one
(distributed.init) and leaves it at the end. Every command then goes through the Session for
what depends on them: placing a model (`place`), wrapping it for DistributedDataParallel
(`wrap`), building loaders (`loader`: decode threads, pinned memory, this process's slice),
turning a uint8 batch into the model's input (`to_input`), running a forward pass (`infer`, the
one inference batch path), and gathering or reducing results over the processes (`gather`,
`gather_objects`, `agree`, `mean_`). `is_main` says which process prints and writes.

With one process every collective here is the identity.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from . import device as dev, distributed, loader as loaders
from .signals import check_signals


@dataclass(frozen=True)
class Session:
    runtime: dev.Runtime
    dist: distributed.Dist = distributed.Dist()

    # -- where
    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype of inference (None: fp32)."""
        return self.runtime.dtype

    @property
    def precision(self) -> str:
        return self.runtime.precision

    @property
    def channels_last(self) -> bool:
        return self.runtime.channels_last

    @property
    def is_main(self) -> bool:
        """The one process that prints and writes shared outputs (rank 0)."""
        return self.dist.is_main

    @property
    def world(self) -> int:
        return self.dist.world

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def distributed(self) -> bool:
        return self.dist.enabled

    @property
    def shard(self) -> tuple[int, int] | None:
        """(rank, world) under torchrun: this process's slice of every batch."""
        return (self.dist.rank, self.dist.world) if self.dist.enabled else None

    def autocast(self, dtype: torch.dtype | None | str = "session"):
        """Autocast in the session's dtype (or `dtype`; None: fp32)."""
        return dev.autocast(self.device, self.dtype if dtype == "session" else dtype)

    # -- models and data
    def place(self, model: nn.Module) -> nn.Module:
        """`model` on the session's device, in channels_last where that pays."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` in DistributedDataParallel under torchrun (itself otherwise). DDP reduces only
        the parameters that require grad when it is built: wrap again when that set changes."""
        if not self.dist.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)

    def loader(self, dataset, batch_size: int, *, shard: bool = True, **options) -> loaders.Loader:
        """A Loader with the session's decode threads, read-ahead and pinning (`options` may set
        them otherwise), taking this process's slice of every batch under torchrun (`shard=False`:
        every process reads all of it, or the batches it is given)."""
        settings = {"threads": self.runtime.decode_threads, "ahead": self.runtime.ahead,
                    "pin_memory": self.runtime.pin_memory, "shard": self.shard if shard else None, **options}
        return loaders.Loader(dataset, batch_size, **settings)

    def to_input(self, images: torch.Tensor, normalizer: nn.Module | None = None) -> torch.Tensor:
        """A batch as the loaders give it -> the model's input on the device (device.to_input)."""
        return dev.to_input(images, self.device, normalizer, self.channels_last)

    def infer(self, loader, forward: Callable[[Any], Any], normalizer: nn.Module | None = None,
              dtype: torch.dtype | None | str = "session", *, raw: bool = False) -> Iterator[tuple[Any, Any]]:
        """The one inference batch path: every batch of `loader` through `forward` under inference
        mode, yielding (batch, output) for batches with a readable image and (batch, None) for
        those without. Ctrl-C and SIGTERM act between batches.

        `forward` takes the model's input (`to_input`, in autocast to `dtype`); with `raw` it takes
        the batch's images as the loader gives them, on the CPU and outside autocast (a Predictor,
        which places them itself: an exported file's runtime may compute elsewhere, in its own dtype).
        """
        with torch.inference_mode():
            for batch in loader:
                check_signals()
                if not len(batch.indices):
                    yield batch, None
                    continue
                if raw:
                    out = forward(batch.images)
                else:
                    with self.autocast(dtype):
                        out = forward(self.to_input(batch.images, normalizer))
                yield batch, out

    # -- several processes
    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order ([obj] with one process)."""
        return distributed.all_gather(obj)

    def gather(self, indices, *columns):
        """Every process's rows (tensors or arrays indexed like `indices`), in dataset order:
        (indices, *columns) sorted by index. One process: its own rows, sorted."""
        if self.dist.enabled:
            parts = [p for p in distributed.all_gather((indices, *columns)) if len(p[0])]
            if parts:
                indices, *columns = (_cat([p[k] for p in parts]) for k in range(len(columns) + 1))
        if not len(indices):
            return (indices, *columns)
        order = torch.argsort(indices) if isinstance(indices, torch.Tensor) else np.argsort(indices, kind="stable")
        return (indices[order], *(c[order] for c in columns))

    def agree(self, flag: bool) -> bool:
        """True on every process when it is true on any: a decision that ends a loop must be the
        same everywhere, or the processes that go on wait forever for the ones that stopped."""
        return distributed.any_rank(flag, self.device)

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` averaged over the processes, in place."""
        return distributed.all_reduce_(tensor, op="mean")

    def barrier(self) -> None:
        distributed.barrier()

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """`fn` on the main process alone; every process returns its result or raises its error."""
        return distributed.main_first(fn)


def _cat(parts: list):
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)


def resolve_session(device: str = "auto", precision: str = "auto", workers: int | None = None) -> Session:
    """A Session for one process, not joined to a job (the torchrun position is read, not joined):
    what a library caller gets to run a model here and now."""
    return Session(dev.resolve_runtime(device, precision, workers), distributed.current())


@contextlib.contextmanager
def open_session(device: str = "auto", precision: str = "auto", workers: int | None = None) -> Iterator[Session]:
    """The command's Session: runtime resolved once, the torchrun job joined for its length."""
    runtime = dev.resolve_runtime(device, precision, workers)
    with distributed.session(runtime.device.type) as dist:
        yield Session(runtime, dist)
