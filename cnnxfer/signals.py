"""Ctrl-C and SIGTERM that act at batch boundaries, never inside a fork or a destructor.

Used by every long loop (training, extraction) so that an interrupt always ends with the finished
work saved, a clean message and exit 130 / 143, and `--resume` can continue.
"""
from __future__ import annotations

import contextlib
import signal
import threading

_pending_signals: list[int] = []
_previous_handlers: dict[int, object] = {}


@contextlib.contextmanager
def deferred_signals():
    """Ctrl-C and SIGTERM during a run act at the next batch boundary (`check_signals`), through
    the handler that was installed before (the CLI's: finished work kept, exit 130 / 143).

    A handler that raises at an arbitrary moment loses the signal when that moment is a fork
    handler or a `__del__`: every epoch's DataLoader worker starts with a fork, and a SIGTERM sent
    just after an epoch's checkpoint printed "Exception ignored in _releaseLock" while the run went
    on to the end. A second signal acts at once.
    """
    if threading.current_thread() is not threading.main_thread() or _previous_handlers:
        yield  # signal handlers can only be set from the main thread; nested runs share the outer one
        return
    sigs = (signal.SIGINT, signal.SIGTERM)

    def remember(signum, frame):
        if _pending_signals:
            _deliver(signum)
        _pending_signals.append(signum)

    _previous_handlers.update({s: signal.getsignal(s) for s in sigs})
    for s in sigs:
        signal.signal(s, remember)
    try:
        yield
    finally:
        _restore_handlers()
        _pending_signals.clear()


def _restore_handlers() -> None:
    for s, handler in _previous_handlers.items():
        signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    _previous_handlers.clear()


def _deliver(signum: int) -> None:
    previous = _previous_handlers.get(signum)
    _restore_handlers()
    if callable(previous):
        previous(signum, None)
    else:
        signal.raise_signal(signum)  # SIG_DFL: terminate as if never deferred; SIG_IGN: nothing


def check_signals() -> None:
    """Act on a signal that arrived during `deferred_signals` (a no-op otherwise)."""
    if _pending_signals:
        signum = _pending_signals.pop(0)
        _pending_signals.clear()
        _deliver(signum)
