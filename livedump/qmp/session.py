"""The VM through its QMP monitor: paused with ``stop``/``cont``, mapped with
``info mtree -f`` and ``gpa2hva``, its CPU notes from QEMU's one-page dump."""

import abc
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from livedump.errors import MonitorError, MonitorUnavailable, PermissionDenied
from livedump.qmp import notes, ram_map
from livedump.qmp.monitor import Monitor
from livedump.qmp.transport import QMPTransport
from livedump.transfer.memory import MemorySource, read_maps
from livedump.vm.guardian import STALL_TIMEOUT, Guardian
from livedump.vm.pause import Control, Pause, not_paused, paused
from livedump.vm.process import Address, QmpEndpoint, qemu_executable, qmp_endpoints
from livedump.vm.session import RamMap
from livedump.vmcore.blocks import Block, GuestRange
from livedump.vmcore.notes import CpuNotes, NoCpuNotes, QemuNotes

if TYPE_CHECKING:
    from livedump.live.snapshot import LiveSnapshot


class MonitoredSession(abc.ABC):
    """A VM mapped through QEMU's monitor (``info mtree -f``, ``gpa2hva``, ``info
    ramblock``): over QMP itself (:class:`MonitorSession`), or through libvirt."""

    via = "qmp"

    def __init__(self, monitor: Monitor, pid: int, detail: str,
                 stall: float = STALL_TIMEOUT) -> None:
        self.monitor = monitor
        self.pid = pid
        self.detail = detail
        self.stall = stall
        self._view: list[ram_map.FlatRange] = []
        self._paused = False
        self._guardian: Guardian | None = None

    def target_arch(self) -> str:
        return self.monitor.target_arch()

    def prepare(self) -> RamMap:
        """The map, read and checked before the pause so its round trips cost the
        guest nothing."""
        self._view = ram_map.flat_view(self.monitor)
        return RamMap(self._checked(self._view))

    def _checked(self, view: list[ram_map.FlatRange]) -> list[GuestRange]:
        """The RAM ranges of ``view``, checked against QEMU's RAM blocks and mappings."""
        ranges = ram_map.guest_ranges(self.monitor, view)
        ram_map.check_map(ranges, self.monitor.ram_blocks(), read_maps(self.pid))
        return ranges

    @contextlib.contextmanager
    def hold(self, pause: bool) -> Iterator[Pause]:
        self._paused = pause
        if not pause:
            with not_paused(self.control()) as p:
                yield p
            return
        with paused(self.control(), self.watcher()) as p:
            yield p

    def watcher(self) -> Guardian:
        """The session's guardian, started on first need: it lets the VM go if
        livedump dies, or stalls while it holds the VM."""
        if self._guardian is None:
            self._guardian = self.guardian()
        return self._guardian

    def control(self) -> Control:
        """What pauses and resumes the guest."""
        return self.monitor

    @abc.abstractmethod
    def guardian(self) -> Guardian:
        """A guardian that can resume the guest without us."""

    def ranges(self, memory: MemorySource, prepared: RamMap | None) -> RamMap:
        """Inside the pause: ``prepared`` itself if the map is unchanged, else the
        new map, checked (then QEMU's RAM blocks are read again, as they may
        have changed with it)."""
        view = ram_map.flat_view(self.monitor)
        if view == self._view and prepared is not None:
            return RamMap(prepared.ranges, changed=False)
        self._view = view
        return RamMap(self._checked(view))

    def cpu_notes(self, memory: MemorySource, blocks: list[Block]) -> CpuNotes:
        """Inside the pause: QEMU's notes for this instant, or why there are none."""
        if not self._paused:  # QEMU's one-page dump would stop the guest.
            return NoCpuNotes("no CPU registers with --no-pause")
        try:
            return self.qemu_notes(blocks[0].gpa)
        except MonitorError as e:
            return NoCpuNotes(f"QEMU gave no CPU state ({e})")

    def qemu_notes(self, gpa: int) -> QemuNotes:
        return notes.from_qemu(self.monitor, gpa, watch=self.watcher().fifo)

    def close(self) -> None:
        try:
            if self._guardian is not None:
                self._guardian.close()
        finally:
            self.monitor.close()


class MonitorSession(MonitoredSession):
    """The VM through QMP: ``stop``/``cont`` on the monitor, and QEMU's background
    snapshot for ``--live``."""

    def guardian(self) -> Guardian:
        """A guardian on a connection of its own to the same monitor: this one's."""
        transport = self.monitor.transport
        assert isinstance(transport, QMPTransport)
        return Guardian.over_qmp(transport.fileno(), self.stall)

    def live(self, target: str) -> "LiveSnapshot":
        """A background snapshot, mapped by the flat view the vmcore's layout comes from."""
        from livedump.live.snapshot import LiveSnapshot

        return LiveSnapshot(self.monitor, target, lambda: self._view, self.watcher())


def connect_monitor(pid: int | None, qmp: Address | None, timeout: float,
                     stall: float) -> MonitorSession:
    """Connect to the VM's first answering QMP monitor."""
    if pid is not None:
        qemu_executable(pid)
    if qmp is not None:
        endpoints = [QmpEndpoint(qmp, "--qmp")]
    else:
        assert pid is not None
        endpoints = qmp_endpoints(pid)
    if not endpoints:
        raise MonitorUnavailable(f"QEMU PID {pid} has no QMP monitor on its command line")

    failures = []
    for endpoint in endpoints:
        if endpoint.address is None:
            failures.append(str(endpoint))
            continue
        try:
            # Refused, not passed over, if its peer is not QEMU: the user or
            # QEMU's command line named it, and something else serves it.
            transport = QMPTransport(endpoint.address, timeout, pid)
        except (MonitorUnavailable, PermissionDenied) as e:
            failures.append(str(e))
            continue
        assert transport.peer_pid is not None
        return MonitorSession(Monitor(transport), transport.peer_pid, str(endpoint), stall)
    raise MonitorUnavailable("no QMP monitor answered: " + "; ".join(failures))
