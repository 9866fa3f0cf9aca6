"""Turn termination signals into an exception, and hold them off where needed.

SIGINT, SIGTERM and SIGHUP all raise :class:`~livedump.errors.Interrupted`
so that every ``finally`` runs and a paused VM is resumed. While a monitor
exchange or the resume itself is under way they are held pending, so no
command is torn in half; they take effect as soon as it completes.
"""

import contextlib
import signal
from collections.abc import Iterator

from .errors import Interrupted

TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise(signum: int, frame: object) -> None:
    raise Interrupted(signum, signal.Signals(signum).name)


def install() -> None:
    """Make the terminating signals raise :class:`Interrupted` (main thread only)."""
    for sig in TERMINATING:
        signal.signal(sig, _raise)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold the terminating signals pending for the duration of the block."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
