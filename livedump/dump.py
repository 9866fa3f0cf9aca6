"""The pipeline: attach, locate, coalesce, write, resume, the same for every mode.

Everything that can be slow (finding and greeting the monitor, loading
QEMU's debug info, reading the RAM map through the monitor, opening files,
building the header) happens before the guest is held. While it is held:
the RAM map is confirmed (one ``info mtree -f``) or read (from QEMU's own
structures, in ptrace mode), the vCPUs' registers are taken (from QEMU's
one-page dump, or from its memory in ptrace mode), and memory is read.
Each chunk is written as soon as it is read (into a pipe, the last few after
the guest runs again).
"""

import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from livedump import __version__
from livedump.errors import GuestMemoryError, LivedumpError, ProcessNotFound, UsageError
from livedump.proc import alive
from livedump.transfer.copier import Writer, copy
from livedump.transfer.memory import (
    Mapping,
    MemorySource,
    PageMap,
    Populated,
    ProcessMemory,
    check_blocks,
    read_maps,
)
from livedump.transfer.output import STDOUT, Output
from livedump.vm.guardian import STALL_TIMEOUT
from livedump.vm.lock import VMLock
from livedump.vm.process import Address
from livedump.vm.session import RamMap, Session, SnapshotSource, check_request, open_session
from livedump.vmcore import arch as arches
from livedump.vmcore.blocks import Block, coalesce
from livedump.vmcore.elf import CoreLayout, Note
from livedump.vmcore.notes import CpuNotes, NoCpuNotes, QemuNotes
from livedump.vmcore.vmcoreinfo import Result as VmcoreinfoResult
from livedump.vmcore.vmcoreinfo import Search as VmcoreinfoSearch

if TYPE_CHECKING:
    from livedump.live.snapshot import LiveSnapshot

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
    domain: str | None = None
    connect: str | None = None  # libvirt URI
    via: str = "auto"
    debug_file: str | None = None
    arch: str | None = None
    force: bool = False
    allow_readable_by_others: bool = False  # a file its filesystem lets others read
    qmp_timeout: float = 3.0
    pause: bool = True
    live: bool = False
    progress: Progress | None = None
    stall_timeout: float = STALL_TIMEOUT  # the guardian's: see livedump.vm.guardian
    core: str | None = None  # a core file of QEMU, instead of a running VM


@dataclass
class Summary:
    """What was done, for the report."""

    output: str
    pid: int
    arch: str
    arch_from: str  # QEMU's judgement, --arch, or what the QEMU target implies
    elf_class: int
    via: str
    detail: str
    was_running: bool
    paused: bool
    vmcoreinfo: VmcoreinfoResult
    live: bool = False  # memory from QEMU's background snapshot, after the pause
    cpu_notes: str = ""
    blocks: list[Block] = field(default_factory=list)
    file_size: int = 0
    file_mode: int | None = None  # the file's permission bits (None: standard output)
    read_bytes: int = 0
    written_bytes: int = 0
    wall_seconds: float = 0.0
    pause_seconds: float = 0.0

    @property
    def memory_bytes(self) -> int:
        return sum(b.size for b in self.blocks)


@dataclass
class _Plan:
    """The blocks of one RAM map, and which of them the page map can thin out."""

    blocks: list[Block]
    private: list[bool]


@runtime_checkable
class _Image(Protocol):
    """A session over an image of QEMU's memory (a core file) rather than a
    process: nothing to lock or watch, its memory and mappings its own."""

    memory: "_ImageMemory"


class _ImageMemory(MemorySource, Populated, Protocol):
    def maps(self) -> list[Mapping]: ...


class _Copy(Protocol):
    """How memory gets into the vmcore: chosen once, inside the hold, then
    :meth:`inside` while the VM is held and :meth:`after` once it is let go."""

    live: bool

    def inside(self, layout: CoreLayout, plan: _Plan, writer: Writer) -> None: ...
    def after(self, out: Output, layout: CoreLayout, writer: Writer,
              progress: Progress | None) -> tuple[int, int]: ...


class _Direct:
    """Read from QEMU's memory while the VM is held."""

    live = False

    def __init__(self, memory: MemorySource, pagemap: Populated) -> None:
        self.memory, self.pagemap = memory, pagemap
        self.read = 0

    def inside(self, layout: CoreLayout, plan: _Plan, writer: Writer) -> None:
        self.read = copy(layout, plan.private, self.memory, self.pagemap, writer)

    def after(self, out: Output, layout: CoreLayout, writer: Writer,
              progress: Progress | None) -> tuple[int, int]:
        return self.read, writer.written


class _Snapshot:
    """QEMU's background snapshot: taken inside the hold, read after it."""

    live = True

    def __init__(self, snapshot: "LiveSnapshot") -> None:
        self.snapshot = snapshot

    def inside(self, layout: CoreLayout, plan: _Plan, writer: Writer) -> None:
        self.snapshot.start(layout)  # Returns once QEMU took the snapshot.

    def after(self, out: Output, layout: CoreLayout, writer: Writer,
              progress: Progress | None) -> tuple[int, int]:
        return self.snapshot.write(out, layout, progress.update if progress else None,
                                   writer.inspect)


def dump(request: Request) -> Summary:
    """Write a vmcore of the VM ``request`` names; return what was done."""
    started = time.monotonic()
    progress = request.progress
    if request.live and (request.output == STDOUT or not request.pause):
        raise UsageError("--live writes the vmcore out of order: it needs an output file, "
                         "and pauses the guest (not with --no-pause)")
    check_request(request.live, request.via, request.domain)
    pid: int | None = None
    try:
        with contextlib.ExitStack() as stack:
            # Claim the VM before touching it, where its PID is known up front.
            if request.pid is not None:
                stack.enter_context(VMLock(request.pid))
            session = _open(request)
            stack.callback(session.close)
            pid = session.pid
            image = session if isinstance(session, _Image) else None
            if request.pid is None and image is None:
                stack.enter_context(VMLock(pid))
            if request.live and not isinstance(session, SnapshotSource):
                raise UsageError(f"--live needs the VM's QMP monitor, and none could serve "
                                 f"({session.detail})")
            if progress:
                stack.callback(progress.close)
            wanted = arches.lookup(request.arch) if request.arch else None
            qemu_target = session.target_arch()
            target = arches.for_target(qemu_target) if wanted is None else None
            # The guardian: lets the VM go should livedump die or stall while it
            # holds it, and removes the partial file of a livedump that died.
            guardian = (session.watcher() if image is None and (request.pause or
                        request.output != STDOUT) else None)
            if guardian:
                stack.callback(guardian.partial, None)  # Once the file is gone (or in place).
            out = stack.enter_context(Output(request.output, request.force,
                                             request.allow_readable_by_others))
            if guardian and out.partial_path is not None:
                guardian.partial(out.partial_path)

            def written(length: int) -> None:
                if progress:
                    progress.update(length)
                if guardian:
                    guardian.beat()  # Progress: the stall limit starts again.

            memory: MemorySource
            pagemap: Populated
            maps: Callable[[], Sequence[Mapping]]
            if image is not None:
                memory = pagemap = image.memory
                maps = image.memory.maps
            else:
                memory = stack.enter_context(ProcessMemory(pid))
                pagemap = stack.enter_context(PageMap(pid))
                maps = functools.partial(read_maps, pid)
            prepared = session.prepare()
            plan = _plan(prepared, maps) if prepared is not None else None
            live = (stack.enter_context(session.live(qemu_target))
                    if isinstance(session, SnapshotSource) and request.live else None)
            with Writer(out, written) as writer:
                with session.hold(request.pause) as pause:
                    ram = session.ranges(memory, prepared)
                    if plan is None or ram.changed:
                        plan = _plan(ram, maps)
                    cpu = session.cpu_notes(memory, plan.blocks)
                    arch, arch_from, cpu = _arch(wanted, target, cpu)
                    if guardian:
                        guardian.beat()
                    search = VmcoreinfoSearch(arch, cpu, out.is_stdout)
                    layout = CoreLayout(arch, plan.blocks, [
                        *([cpu] if isinstance(cpu, QemuNotes) else []),
                        provenance_note(pid, request.core),
                        *search.notes])
                    writer.inspect = search.inspector(layout)
                    if progress:
                        progress.start(layout.size)
                    # A paused guest cannot change: the normal way is as consistent.
                    copier: _Copy = (_Snapshot(live) if live and live.ready and pause.was_running
                                     else _Direct(memory, pagemap))
                    copier.inside(layout, plan, writer)
                writer.finish()
            read, written_bytes = copier.after(out, layout, writer, progress)
            vmcoreinfo = search.finish(out)
            out.commit()
    except LivedumpError:
        # Whatever failed, QEMU's exit is the cause to report (also from the way out:
        # a monitor gone with QEMU fails what puts the VM back).
        if pid is not None and request.core is None and not alive(pid):
            raise ProcessNotFound(f"QEMU (PID {pid}) exited during the dump") from None
        raise
    return Summary(
        output=request.output, pid=pid, arch=arch.name, arch_from=arch_from,
        elf_class=layout.bits,
        via=session.via, detail=session.detail, was_running=pause.was_running,
        paused=request.pause and pause.was_running, live=copier.live,
        blocks=layout.blocks, cpu_notes=cpu.summary(), vmcoreinfo=vmcoreinfo,
        file_size=layout.size, file_mode=out.mode,
        read_bytes=read, written_bytes=written_bytes,
        wall_seconds=time.monotonic() - started, pause_seconds=pause.seconds,
    )


def _open(request: Request) -> Session:
    """The session the request names: a core file, or a running VM."""
    if request.core is not None:
        from livedump.coredump.session import CoreSession

        return CoreSession(request.core, request.debug_file)
    return open_session(request.pid, request.qmp, request.via, request.qmp_timeout,
                        request.debug_file, request.domain, request.connect,
                        request.stall_timeout)


def _plan(ram: RamMap, maps: Callable[[], Sequence[Mapping]]) -> _Plan:
    blocks = coalesce(ram.ranges)
    if not blocks:
        raise GuestMemoryError("the VM has no RAM in its memory map")
    return _Plan(blocks, check_blocks(blocks, maps()))


def _arch(wanted: arches.Arch | None, target: arches.TargetDefault | None,
          cpu: CpuNotes) -> tuple[arches.Arch, str, CpuNotes]:
    """The vmcore's architecture, where it comes from, and its CPU notes.

    ``--arch``, else QEMU's own judgement (the identity of its notes), else
    what the target implies. QEMU's notes go only into a vmcore of their kind.
    """
    if isinstance(cpu, QemuNotes):
        if wanted is None:
            return cpu.arch, "QEMU's, from the CPU state", cpu
        if (wanted.machine, wanted.byteorder) == (cpu.arch.machine, cpu.arch.byteorder):
            return cpu.arch, "--arch", cpu  # QEMU's class too: the notes are encoded for it.
        return wanted, "--arch", NoCpuNotes(f"QEMU's CPU notes are for {cpu.arch.name}, "
                                            f"not --arch {wanted.name}")
    if wanted is not None:
        return wanted, "--arch", cpu
    assert target is not None
    return target.arch, str(target), cpu


def provenance_note(pid: int, core: str | None = None) -> Note:
    text = f"livedump {__version__}\npid {pid}\n" + (f"core {core}\n" if core else "")
    return Note("LIVEDUMP", NT_LIVEDUMP_INFO, text.encode())
