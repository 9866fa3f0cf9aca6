"""Hold the guest still while its memory is read, and let it go afterwards.

Only a VM that was running is stopped, and only what we stopped is resumed:
a VM that was paused (by its operator, a debugger, or a panic) stays paused.
The VM is paused by whoever controls it: its QMP monitor (``stop``/``cont``),
or libvirt (``suspend``/``resume``).
"""

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from livedump import signals
from livedump.errors import LivedumpError, MonitorError
from livedump.vm.guardian import Guardian


class Control(Protocol):
    """What can pause a VM: a :class:`~livedump.qmp.monitor.Monitor`, a libvirt
    :class:`~livedump.libvirt.domain.Domain`."""

    def running(self) -> bool: ...
    def stop(self) -> None: ...
    def cont(self) -> None: ...


@dataclass
class Pause:
    """What the pause did: whether the guest was running, and for how long we held it."""

    was_running: bool
    stopped_at: float = 0.0
    resumed_at: float = 0.0

    @property
    def seconds(self) -> float:
        return self.resumed_at - self.stopped_at


@contextlib.contextmanager
def paused(monitor: Control, guardian: Guardian | None = None) -> Iterator[Pause]:
    """Keep the guest's vCPUs stopped for the duration of the block.

    ``guardian`` is told before the stop and after the resume, so that it
    resumes the guest if this process dies in between.
    """
    pause = Pause(was_running=False)
    try:
        # A signal that arrives meanwhile is raised when the mask is lifted,
        # inside this try: the guest is resumed all the same.
        with signals.deferred():
            pause.was_running = monitor.running()
            if pause.was_running:
                if guardian:
                    guardian.paused()
                # From before the command: QEMU stops the guest before it replies.
                pause.stopped_at = time.monotonic()
                monitor.stop()  # If this fails, it may have stopped the guest still.
        yield pause
    finally:
        if pause.was_running:
            with signals.deferred():
                try:
                    _resume(monitor, pause)
                except LivedumpError:
                    # Last resort: the guardian's own connection to the monitor.
                    if guardian is None or not guardian.rescue():
                        raise
                    pause.resumed_at = time.monotonic()
                else:
                    if guardian:
                        guardian.resumed()


def _resume(monitor: Control, pause: Pause) -> None:
    try:
        monitor.cont()
    except LivedumpError as e:
        raise MonitorError(
            f"could not resume the VM, which livedump paused ({e}); "
            "resume it with 'virsh resume DOMAIN' or the QMP command 'cont'"
        ) from None
    pause.resumed_at = time.monotonic()


@contextlib.contextmanager
def not_paused(monitor: Control) -> Iterator[Pause]:
    """Leave the guest as it is (``--no-pause``): the dump may be inconsistent."""
    yield Pause(was_running=monitor.running())
