"""How livedump gets hold of a VM: through its QMP monitor, through libvirt, or with ptrace.

Every kind of session answers the same questions for the pipeline: what
target the VM is (:meth:`target_arch`), how to hold it still (:meth:`hold`),
where its RAM is (:meth:`prepare` before the pause, :meth:`ranges` inside
it), and what its vCPUs' registers are (:meth:`cpu_notes`, inside the
pause). :func:`open_session` picks one as ``--via`` says.
"""

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

from livedump.errors import (
    LivedumpError,
    MonitorError,
    MonitorUnavailable,
    PermissionDenied,
    UsageError,
)
from livedump.qmp import ram_map
from livedump.qmp.monitor import Monitor, QMPTransport
from livedump.transfer.memory import ProcessMemory, read_maps
from livedump.vm.guardian import STALL_TIMEOUT, Guardian
from livedump.vm.pause import Control, Pause, not_paused, paused
from livedump.vm.process import Address, QmpEndpoint, qemu_executable, qmp_endpoints
from livedump.vmcore import notes
from livedump.vmcore.blocks import Block, GuestRange

# What only some sessions need is imported when one is opened: a dump through
# the monitor starts sooner without DWARF, ptrace, libvirt and migration code.
if TYPE_CHECKING:
    from livedump.libvirt.domain import Domain
    from livedump.live.snapshot import LiveSnapshot

VIAS = ("auto", "qmp", "ptrace")


class Session(Protocol):
    pid: int
    via: str
    detail: str  # For the report: which monitor or domain, or why ptrace.

    def target_arch(self) -> str: ...
    def prepare(self) -> list[GuestRange] | None: ...
    def hold(self, pause: bool) -> AbstractContextManager[Pause]: ...
    def ranges(self, memory: ProcessMemory, prepared: list[GuestRange] | None
               ) -> list[GuestRange]: ...
    def cpu_notes(self, memory: ProcessMemory, blocks: list[Block]
                  ) -> notes.QemuNotes | str: ...
    def live(self, target: str) -> "LiveSnapshot": ...
    def watcher(self) -> Guardian: ...
    def close(self) -> None: ...


class MonitorSession:
    """The VM through QMP: ``stop``/``cont``, and the RAM map from ``info mtree -f``."""

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

    def prepare(self) -> list[GuestRange]:
        """The map, read and checked before the pause so its round trips cost the
        guest nothing."""
        self._view = ram_map.flat_view(self.monitor)
        return self._checked(self._view)

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

    def guardian(self) -> Guardian:
        """A guardian that can resume the guest without us."""
        transport = self.monitor.transport
        assert isinstance(transport, QMPTransport)
        return Guardian.over_qmp(transport.fileno(), self.stall)

    def ranges(self, memory: ProcessMemory, prepared: list[GuestRange] | None
               ) -> list[GuestRange]:
        """Inside the pause: ``prepared`` itself if the map is unchanged, else the
        new map, checked (then QEMU's RAM blocks are read again, as they may
        have changed with it)."""
        view = ram_map.flat_view(self.monitor)
        if view == self._view and prepared is not None:
            return prepared
        self._view = view
        return self._checked(view)

    def cpu_notes(self, memory: ProcessMemory, blocks: list[Block]) -> notes.QemuNotes | str:
        """Inside the pause: QEMU's notes for this instant, or why there are none."""
        if not self._paused:  # QEMU's one-page dump would stop the guest.
            return "no CPU registers with --no-pause"
        try:
            return self.qemu_notes(blocks[0].gpa)
        except MonitorError as e:
            return f"QEMU gave no CPU state ({e})"

    def qemu_notes(self, gpa: int) -> notes.QemuNotes:
        return notes.from_qemu(self.monitor, gpa, watch=self.watcher().fifo)

    def live(self, target: str) -> "LiveSnapshot":
        """A background snapshot, mapped by the flat view the vmcore's layout comes from."""
        from livedump.live.snapshot import LiveSnapshot

        return LiveSnapshot(self.monitor, target, lambda: self._view, self.watcher())

    def close(self) -> None:
        try:
            if self._guardian is not None:
                self._guardian.close()
        finally:
            self.monitor.close()


class LibvirtSession(MonitorSession):
    """A libvirt domain: paused by libvirt, mapped through libvirt's monitor pass-through.

    libvirt holds QEMU's only monitor, so the monitor commands go through
    libvirt (which marks the domain "tainted: custom-monitor"), and libvirt
    suspends and resumes the guest, so its view of the domain stays true.
    """

    via = "libvirt"

    def __init__(self, domain: "Domain", stall: float = STALL_TIMEOUT) -> None:
        from livedump.libvirt.domain import PassThrough

        super().__init__(Monitor(PassThrough(domain)), domain.pid,
                         f"domain {domain.name} at {domain.uri}, monitor pass-through "
                         "(libvirt now marks the domain tainted: custom-monitor)", stall)
        self.domain = domain
        try:
            # The first command: does the monitor answer (a hung QEMU's does not)?
            self._arch = self.monitor.target_arch()
        except BaseException:
            self.close()
            raise

    def target_arch(self) -> str:
        return self._arch

    def control(self) -> Control:
        return self.domain

    def guardian(self) -> Guardian:
        return Guardian.over_libvirt(self.domain.uri, self.domain.uuid, self.stall)

    def qemu_notes(self, gpa: int) -> notes.QemuNotes:
        # Never QEMU's dump-guest-memory through the pass-through: libvirtd 9.0
        # crashes on its completion event. libvirt's own dump, cut after the notes.
        return dataclasses.replace(notes.from_pipe(self.domain.dump_memory_only,
                                                   watch=self.watcher().fifo),
                                   source="libvirt's memory-only dump")

    def live(self, target: str) -> "LiveSnapshot":
        raise UsageError("--live is not available for a libvirt domain: the snapshot's pipe "
                         "cannot be passed through libvirt's monitor pass-through")


def open_session(pid: int | None, qmp: Address | None, via: str, timeout: float,
                 debug_file: str | None, domain: str | None = None,
                 uri: str | None = None, stall: float = STALL_TIMEOUT) -> Session:
    """A session on the VM, by ``via``: ``qmp``, ``ptrace``, or ``auto`` (QMP if one answers).

    A libvirt ``domain`` is reached through libvirt's pass-through to its
    monitor, unless ``via`` is ``ptrace``: then libvirt only says which
    process runs it.
    """
    connect: Callable[[], Session]
    if domain is not None:
        from livedump.libvirt.domain import Domain, default_uri

        found = Domain(domain, uri or default_uri(), timeout)
        pid = found.pid
        if via == "ptrace":
            found.close()  # Not involved any further.
        connect = functools.partial(LibvirtSession, found, stall)
    elif pid is None and qmp is None:
        raise UsageError("name the VM with --pid, --qmp or --domain")
    else:
        connect = functools.partial(_monitor_session, pid, qmp, timeout, stall)
    if via == "ptrace":
        if pid is None:
            raise UsageError("--via ptrace needs --pid or --domain")
        from livedump.ptrace.session import PtraceSession

        return PtraceSession(pid, debug_file, "--via ptrace", stall)
    try:
        return connect()
    except MonitorUnavailable as e:
        if via == "qmp" or pid is None:
            raise
        reason = f"no usable QMP monitor ({e})"
    from livedump.ptrace.session import PtraceSession

    try:
        return PtraceSession(pid, debug_file, reason, stall)
    except LivedumpError as e:
        # Say both why the monitor could not serve and why ptrace could not.
        e.args = (f"{reason}; and for ptrace mode: {e}",)
        raise


def _monitor_session(pid: int | None, qmp: Address | None, timeout: float,
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
