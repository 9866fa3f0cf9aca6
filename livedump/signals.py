"""Turn termination signals into an exception, and hold them off where needed.

SIGINT, SIGTERM and SIGHUP all raise :class:`~livedump.errors.Interrupted`
so that every ``finally`` runs and a paused VM is resumed. While a monitor
exchange or the resume itself is under way they are held pending, so no
command is torn in half; they take effect as soon as it completes.

Another thread can make the main thread stop the same way, with an
exception of its choosing (:func:`raise_in_main`): a signal of our own
carries it, held off like the others.

Holding off takes two parts. The signal mask keeps a signal from the
thread that blocks it; but the kernel then hands a signal sent to the
process to any thread that does not (a library's own thread, such as
OpenBLAS's, started with none blocked), and Python runs the handler in the
main thread all the same. So the handler itself also waits while the main
thread is inside :func:`deferred`.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator

from livedump.errors import Interrupted

TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Sent by livedump to itself only: carries an exception from another thread.
RELAYED = signal.SIGUSR2
HELD = (*TERMINATING, RELAYED)

_relayed: list[Interrupted] = []
_depth = 0  # how many deferred() blocks the main thread is in
_pending: list[int] = []  # signals handled meanwhile, to raise at the outermost end


def _raise(signum: int, frame: object) -> None:
    if _depth:
        _pending.append(signum)
    else:
        _raise_now(signum)


def _raise_now(signum: int) -> None:
    if signum != RELAYED:
        raise Interrupted(signum, signal.Signals(signum).name)
    if _relayed:
        raise _relayed.pop(0)


def install() -> None:
    """Make the terminating signals raise :class:`Interrupted` (main thread only)."""
    for sig in HELD:
        signal.signal(sig, _raise)


def raise_in_main(error: Interrupted) -> None:
    """Have the main thread raise ``error`` as soon as no signal is held off there
    (if :func:`install` was called: else the signal would end the process)."""
    main = threading.main_thread().ident
    if main is not None and signal.getsignal(RELAYED) is _raise:
        _relayed.append(error)
        signal.pthread_kill(main, RELAYED)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold the terminating signals pending for the duration of the block; the
    first that came meanwhile is raised as it ends (in the main thread)."""
    global _depth
    main = threading.current_thread() is threading.main_thread()
    if main:
        _depth += 1
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # Runs the handlers of those held.
        if main:
            _depth -= 1
            if not _depth and _pending:
                signum = _pending[0]
                _pending.clear()
                _raise_now(signum)
