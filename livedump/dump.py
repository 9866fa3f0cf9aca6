"""The pipeline: attach, locate, coalesce, write, resume.

Everything that can be slow (finding and greeting the monitor, reading the
RAM map, opening files, building the header) happens before the guest is
paused. Inside the pause: one ``info mtree -f`` to confirm the map has not
changed meanwhile, and the reading of memory. Writing overlaps the reading
and may end after the guest runs again.
"""

import time
from dataclasses import dataclass, field
from typing import Protocol

from . import __version__, locate
from . import arch as arches
from .attach import not_paused, paused
from .coalesce import Block, coalesce
from .elfcore import CoreLayout, Note
from .guardian import Guardian
from .errors import GuestMemoryError, MonitorUnavailable, UsageError
from .monitor import Address, Monitor, QMPTransport, describe
from .lock import VMLock
from .output import Output
from .procmem import PageMap, ProcessMemory, check_blocks, read_maps
from .stream import Writer, copy
from .target import QmpEndpoint, is_qemu, qemu_executable, qmp_endpoints

# Our own note under the "LIVEDUMP" owner: text lines saying who made the dump.
# The type is "LVDP" in ASCII, far from the small numbers that gdb and crash
# read as CORE notes (1 would be taken for NT_PRSTATUS whatever the owner).
NT_LIVEDUMP_INFO = 0x4C564450


class Progress(Protocol):
    """Told the size of the vmcore, then of each part written."""

    def start(self, total: int) -> None: ...
    def update(self, done: int) -> None: ...
    def close(self) -> None: ...


@dataclass
class Request:
    """What the user asked for."""

    output: str
    pid: int | None = None
    qmp: Address | None = None
    arch: str | None = None
    force: bool = False
    qmp_timeout: float = 3.0
    pause: bool = True
    progress: Progress | None = None


@dataclass
class Summary:
    """What was done, for the report."""

    output: str
    pid: int
    arch: str
    elf_class: int
    via: str
    monitor: str
    was_running: bool
    paused: bool
    blocks: list[Block] = field(default_factory=list)
    file_size: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    wall_seconds: float = 0.0
    pause_seconds: float = 0.0

    @property
    def memory_bytes(self) -> int:
        return sum(b.size for b in self.blocks)


@dataclass
class _Plan:
    """The RAM map and file layout, prepared before the guest is paused."""

    view: list[locate.FlatRange]
    layout: CoreLayout
    private: list[bool]


def dump(request: Request) -> Summary:
    """Write a vmcore of the VM ``request`` names; return what was done."""
    started = time.monotonic()
    monitor, endpoint, pid = _attach_monitor(request)
    try:
        arch = arches.lookup(request.arch or monitor.target_arch())
        with (
            VMLock(pid),
            Output(request.output, request.force) as out,
            ProcessMemory(pid) as memory,
            PageMap(pid) as pagemap,
        ):
            plan = _plan(monitor, pid, arch, locate.flat_view(monitor))
            progress = request.progress
            hold = paused if request.pause else not_paused
            with (
                Guardian(monitor.transport.fileno()) as guardian,
                Writer(out, progress.update if progress else None) as writer,
            ):
                with hold(monitor, guardian) as pause:
                    if request.pause:
                        # Only a changed map costs more round trips inside the pause.
                        view = locate.flat_view(monitor)
                        if view != plan.view:
                            plan = _plan(monitor, pid, arch, view)
                    if progress:
                        progress.start(plan.layout.size)
                    read = copy(plan.layout, plan.private, memory, pagemap, writer)
                writer.finish()
            out.commit()
    finally:
        if request.progress:
            request.progress.close()
        monitor.close()
    return Summary(
        output=request.output, pid=pid, arch=arch.name, elf_class=plan.layout.bits,
        via="qmp", monitor=str(endpoint), was_running=pause.was_running,
        paused=request.pause and pause.was_running, blocks=plan.layout.blocks,
        file_size=plan.layout.size, read_bytes=read, written_bytes=writer.written,
        wall_seconds=time.monotonic() - started, pause_seconds=pause.seconds,
    )


def _plan(monitor: Monitor, pid: int, arch: arches.Arch, view: list[locate.FlatRange]) -> _Plan:
    blocks = coalesce(locate.guest_ranges(monitor, view))
    if not blocks:
        raise GuestMemoryError("the VM has no RAM in its memory map")
    private = check_blocks(blocks, read_maps(pid))
    return _Plan(view, CoreLayout(arch, blocks, [_provenance(pid)]), private)


def _attach_monitor(request: Request) -> tuple[Monitor, QmpEndpoint, int]:
    """Connect to the VM's first answering QMP monitor; return it with the QEMU PID."""
    if request.pid is not None:
        qemu_executable(request.pid)
    if request.qmp is not None:
        endpoints = [QmpEndpoint(request.qmp, "--qmp")]
    elif request.pid is not None:
        endpoints = qmp_endpoints(request.pid)
    else:
        raise UsageError("name the VM with --pid or --qmp")

    failures = []
    for endpoint in endpoints:
        if endpoint.address is None:
            failures.append(str(endpoint))
            continue
        try:
            transport = QMPTransport(endpoint.address, request.qmp_timeout)
        except MonitorUnavailable as e:
            failures.append(str(e))
            continue
        try:
            pid = _check_peer(request.pid, transport)
        except BaseException:
            transport.close()
            raise
        return Monitor(transport), endpoint, pid
    if not endpoints:
        raise MonitorUnavailable(f"QEMU PID {request.pid} has no QMP monitor on its command line")
    raise MonitorUnavailable("no QMP monitor answered: " + "; ".join(failures))


def _check_peer(pid: int | None, transport: QMPTransport) -> int:
    """The QEMU PID, from the user or the socket's peer, checked to agree.

    A peer that is not QEMU at all is a relay (socat, a management daemon's
    proxy): then only ``--pid`` can say which process to read.
    """
    peer = transport.peer_pid
    where = describe(transport.address)
    if pid is None:
        if peer is None:
            raise UsageError(f"cannot tell which process serves {where}; add --pid")
        qemu_executable(peer)
        return peer
    if peer is not None and peer != pid and is_qemu(peer):
        raise UsageError(f"{where} belongs to QEMU PID {peer}, not to PID {pid}")
    return pid


def _provenance(pid: int) -> Note:
    text = f"livedump {__version__}\npid {pid}\nvia qmp\n"
    return Note("LIVEDUMP", NT_LIVEDUMP_INFO, text.encode())
