"""The VM through its QMP monitor: paused with ``stop``/``cont``, mapped with
``info mtree -f`` and ``gpa2hva``, its CPU notes from QEMU's one-page dump."""

import abc
import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

from livedump.errors import GuestMemoryError, MonitorError, MonitorUnavailable, PermissionDenied
from livedump.qmp import memory_devices, notes, ram_map
from livedump.qmp.memory_devices import VirtioMem
from livedump.qmp.monitor import Monitor
from livedump.qmp.transport import QMPTransport
from livedump.transfer.memory import MemorySource, page_with_data, read_maps
from livedump.vm.guardian import STALL_TIMEOUT, Guardian
from livedump.vm.pause import Control, Pause, not_paused, paused
from livedump.vm.process import Address, QmpEndpoint, qemu_executable, qmp_endpoints
from livedump.vm.session import RamMap
from livedump.vmcore import arch as arches
from livedump.vmcore.arch import TargetDefault
from livedump.vmcore.blocks import Block, GuestRange
from livedump.vmcore.elf import read_loads
from livedump.vmcore.notes import CpuNotes, NoCpuNotes, QemuNotes, parse

if TYPE_CHECKING:
    from livedump.live.snapshot import LiveSnapshot


class MonitoredSession(abc.ABC):
    """A VM mapped through QEMU's monitor (``info mtree -f``, ``gpa2hva``, ``info
    ramblock``): over QMP itself (:class:`MonitorSession`), or through libvirt."""

    via = "qmp"
    header_source = "QEMU's dump-guest-memory"

    def __init__(self, monitor: Monitor, pid: int, detail: str,
                 stall: float = STALL_TIMEOUT) -> None:
        self.monitor = monitor
        self.pid = pid
        self.detail = detail
        self.stall = stall
        self._view: list[ram_map.FlatRange] = []
        self._still = False  # inside the hold: paused, by us or before us
        self._devices: list[VirtioMem] = []
        # The flat view cut down to what QEMU's dump takes, and what was cut out.
        self._dumped: list[ram_map.FlatRange] = []
        self._unplugged: list[ram_map.FlatRange] = []
        self._header: bytes | None = None  # of QEMU's dump in this pause, if taken
        self._guardian: Guardian | None = None

    def target_arch(self) -> str:
        return self.monitor.target_arch()

    def target_default(self, target: str) -> TargetDefault:
        """What ``target`` implies without the CPU state: on qemu-system-aarch64,
        an AArch64 or AArch32 vmcore as the CPU model is, asked of QOM."""
        if target != "aarch64":
            return arches.for_target(target)
        try:
            return arches.for_target(target, self.monitor.first_cpu_is_aarch64())
        except MonitorError as e:
            return arches.unknown_cpu(target, f"its CPU model did not say: {e}")

    def prepare(self) -> RamMap:
        """The map, read and checked before the pause so its round trips cost the
        guest nothing (a partly plugged virtio-mem device's blocks excepted:
        they are learned inside the pause)."""
        self._view = ram_map.flat_view(self.monitor)
        self._devices = memory_devices.virtio_mem_devices(self.monitor)
        return RamMap(self._checked(self._view, None))

    def _checked(self, view: list[ram_map.FlatRange],
                 loads: list[tuple[int, int]] | None) -> list[GuestRange]:
        """The RAM ranges of ``view`` that QEMU's dump takes, checked against QEMU's
        RAM blocks and mappings: in a virtio-mem device's window, its plugged
        blocks alone (from ``loads``, the PT_LOADs of QEMU's dump, where the
        plugged size does not say; none where neither does)."""
        plugged = {d: d.spans(loads) if loads is not None or not d.partly_plugged else []
                   for d in self._devices}
        self._dumped, self._unplugged = memory_devices.clip(view, self._devices, plugged)
        ranges = []
        for r in ram_map.guest_ranges(self.monitor, view):
            pieces = memory_devices.pieces_of(r.gpa, r.size, self._devices, plugged)
            ranges += [r] if pieces is None else [
                dataclasses.replace(r, gpa=lo, size=hi - lo, hva=r.hva + lo - r.gpa)
                for lo, hi in pieces]
        ram_map.check_map(ranges, self.monitor.ram_blocks(), read_maps(self.pid))
        return ranges

    @contextlib.contextmanager
    def hold(self, pause: bool) -> Iterator[Pause]:
        if not pause:
            with not_paused(self.control()) as p:
                # A guest paused already (--no-pause asks only not to pause
                # it) gives QEMU's notes: its one-page dump leaves it paused.
                self._still = not p.was_running
                yield p
            return
        with paused(self.control(), self.watcher()) as p:
            self._still = True
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
        have changed with it). A partly plugged virtio-mem device's blocks
        come from QEMU's dump, whose notes then serve as the CPU notes."""
        view = ram_map.flat_view(self.monitor)
        # A virtio-mem device comes with a change of the view; its plugged size without.
        devices = (memory_devices.virtio_mem_devices(self.monitor)
                   if self._devices or view != self._view else [])
        self._header, loads = None, None
        if partial := [d for d in devices if d.partly_plugged]:
            if not self._still:
                d = partial[0]
                raise GuestMemoryError(
                    f"virtio-mem device {d.id} has {d.plugged:#x} of its {d.max_size:#x} "
                    "bytes plugged, and only QEMU's own dump can say which blocks, which "
                    "stops the guest: dump without --no-pause (or with --via ptrace)")
            self._header = self.qemu_header()
            loads = read_loads(self._header)
        if view == self._view and devices == self._devices and loads is None \
                and prepared is not None:
            return RamMap(prepared.ranges, changed=False)
        self._view, self._devices = view, devices
        return RamMap(self._checked(view, loads))

    def cpu_notes(self, memory: MemorySource, blocks: list[Block]) -> CpuNotes:
        """Inside the pause: QEMU's notes for this instant, or why there are none."""
        if not self._still:  # QEMU's one-page dump would stop the guest.
            return NoCpuNotes("no CPU registers with --no-pause")
        # A page QEMU has: its dump of a hole would create the page (a huge one).
        gpa = page_with_data(self.pid, blocks)
        try:
            if self._header is not None:  # Taken in this pause, for the map.
                return dataclasses.replace(parse(self._header), source=self.header_source)
            return self.qemu_notes(blocks[0].gpa if gpa is None else gpa)
        except MonitorError as e:
            return NoCpuNotes(f"QEMU gave no CPU state ({e})")

    def qemu_header(self) -> bytes:
        """The headers and notes of QEMU's whole dump of the paused guest."""
        return notes.dump_header(self.monitor, watch=self.watcher().fifo)

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

        return LiveSnapshot(self.monitor, target, self, self.watcher())

    # The RAM map as a snapshot needs it (live.snapshot.SnapshotMap).

    def dumped(self) -> list[ram_map.FlatRange]:
        return self._dumped

    def unsent(self) -> list[ram_map.FlatRange]:
        return self._unplugged

    def needs_pause(self) -> bool:
        return any(d.partly_plugged for d in self._devices)

    def changed(self) -> bool:
        return ram_map.flat_view(self.monitor) != self._view


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
