"""How livedump gets hold of a VM: through its QMP monitor, through libvirt, or with ptrace.

Every kind of session answers the same questions for the pipeline: what
target the VM is (:meth:`target_arch`, and what it implies without the CPU
state: :meth:`target_default`), how to hold it still (:meth:`hold`),
where its RAM is (:meth:`prepare` before the hold, :meth:`ranges` inside
it), and what its vCPUs' registers are (:meth:`cpu_notes`, inside the
hold). A session that can also have QEMU take a background snapshot
(``--live``) is a :class:`SnapshotSource`. :func:`open_session` picks one as
``--via`` says; each kind is imported only when it is opened.
"""

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from livedump.errors import LivedumpError, MonitorUnavailable, UsageError
from livedump.transfer.memory import MemorySource
from livedump.vm.guardian import STALL_TIMEOUT, Guardian
from livedump.vm.pause import Pause
from livedump.vm.process import Address
from livedump.vmcore.arch import TargetDefault
from livedump.vmcore.blocks import Block, GuestRange
from livedump.vmcore.notes import CpuNotes

if TYPE_CHECKING:
    from livedump.live.snapshot import LiveSnapshot

VIAS = ("auto", "qmp", "ptrace")


@dataclass(frozen=True)
class RamMap:
    """The VM's RAM ranges, and whether they differ from the map read before the hold."""

    ranges: list[GuestRange]
    changed: bool = True


class Session(Protocol):
    pid: int
    via: str
    detail: str  # For the report: which monitor or domain, or why ptrace.

    def target_arch(self) -> str: ...
    def target_default(self, target: str) -> TargetDefault: ...
    def prepare(self) -> RamMap | None: ...
    def hold(self, pause: bool) -> AbstractContextManager[Pause]: ...
    def ranges(self, memory: MemorySource, prepared: RamMap | None) -> RamMap: ...
    def cpu_notes(self, memory: MemorySource, blocks: list[Block]) -> CpuNotes: ...
    def watcher(self) -> Guardian: ...
    def close(self) -> None: ...


@runtime_checkable
class SnapshotSource(Protocol):
    """A session through which QEMU can be asked for a background snapshot."""

    def live(self, target: str) -> "LiveSnapshot": ...


def check_request(live: bool, via: str, domain: str | None) -> None:
    """Refuse, before anything is touched, what no session could do."""
    if live and domain is not None:
        raise UsageError("--live is not available for a libvirt domain: the snapshot's pipe "
                         "cannot be passed through libvirt's monitor pass-through")
    if live and via == "ptrace":
        raise UsageError("--live needs the VM's QMP monitor (it asks QEMU for a snapshot), "
                         "not --via ptrace")


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
        from livedump.libvirt.session import LibvirtSession

        connect = functools.partial(LibvirtSession, found, stall)
    elif pid is None and qmp is None:
        raise UsageError("name the VM with --pid, --qmp or --domain")
    else:
        from livedump.qmp.session import connect_monitor

        connect = functools.partial(connect_monitor, pid, qmp, timeout, stall)
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
