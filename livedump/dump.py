"""The pipeline: attach, locate, coalesce, write, resume, the same for every mode.

Everything that can be slow (finding and greeting the monitor, loading
QEMU's debug info, reading the RAM map through the monitor, opening files,
building the header) happens before the guest is held. While it is held:
the RAM map is confirmed (one ``info mtree -f``) or read (from QEMU's own
structures, in ptrace mode), the vCPUs' registers are taken (from QEMU's
one-page dump, or from its memory in ptrace mode), and memory is read.
Each chunk is written as soon as it is read (into a pipe, the last few after
the guest runs again). ``--live`` on x86 holds nothing itself: QEMU's
background snapshot is the pause, and its stream brings the CPU notes, so
the header is written last (see :mod:`livedump.live.snapshot`). With a
dump level or ``--format kdump``, that vmcore goes to a spool no name leads
to, and the file asked for is written from it (:mod:`livedump.transfer.spool`).
"""

import contextlib
import dataclasses
import functools
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypedDict, runtime_checkable

from livedump import __version__
from livedump.errors import (
    GuestMemoryError,
    LivedumpError,
    ProcessNotFound,
    SnapshotError,
    UsageError,
)
from livedump.proc import alive
from livedump.transfer.copier import Writer, copy
from livedump.transfer.kdump_copy import (
    Found,
    find_vmcoreinfo,
    page_decision,
    stage_kdump,
    staging_budget,
)
from livedump.transfer.memory import (
    BackingFiles,
    Mapping,
    MemorySource,
    PageMap,
    Populated,
    ProcessMemory,
    Span,
    check_blocks,
    read_maps,
)
from livedump.transfer.output import STDOUT, Output
from livedump.transfer.spool import Spool
from livedump.vm.guardian import STALL_TIMEOUT, Guardian
from livedump.vm.lock import VMLock
from livedump.vm.pause import Pause
from livedump.vm.process import Address
from livedump.vm.session import RamMap, Session, SnapshotSource, check_request, open_session
from livedump.vmcore import arch as arches
from livedump.vmcore.blocks import Block, coalesce, without_pages
from livedump.vmcore.elf import CoreLayout, Note, Notes
from livedump.vmcore.kdump import DEFAULT_COMPRESSION, PAGE, Bitmap, check_format
from livedump.vmcore.notes import CpuNotes, NoCpuNotes, QemuNotes
from livedump.vmcore.pagefilter import STRUCT_PAGE_LEVELS
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
    format: str = "elf"  # or "kdump": makedumpfile's kdump-compressed format
    compress: str | None = None  # kdump's page compression (default zstd)
    dump_level: int = 0  # makedumpfile's -d: the classes of pages left out
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
    qemu_target: str = ""  # as query-target names it
    warnings: list[str] = field(default_factory=list)  # each a line of the report
    cpu_notes: str = ""
    blocks: list[Block] = field(default_factory=list)
    file_size: int = 0
    file_mode: int | None = None  # the file's permission bits (None: standard output)
    read_bytes: int = 0
    written_bytes: int = 0
    wall_seconds: float = 0.0
    pause_seconds: float = 0.0
    format: str = "elf"
    kdump: dict[str, object] | None = None  # pages kept and left out, bytes (kdump only)
    pages: dict[str, object] | None = None  # pages left out of an ELF vmcore (-d)

    @property
    def memory_bytes(self) -> int:
        return sum(b.size for b in self.blocks)


@dataclass
class _Plan:
    """The blocks of one RAM map, and each one's parts by QEMU's mappings."""

    blocks: list[Block]
    spans: list[list[Span]]

    def private(self) -> list[bool]:
        """Per block, whether it is all private anonymous memory: there, and only
        there, a page QEMU never populated holds nothing."""
        return [all(s.private for s in spans) for spans in self.spans]


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
        self.read = copy(layout, plan.spans, self.memory, self.pagemap, writer)

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
    _check(request)
    pid: int | None = None
    try:
        with contextlib.ExitStack() as stack:
            # Claim the VM before touching it, where its PID is known up front.
            if request.pid is not None:
                stack.enter_context(VMLock(request.pid))
            session = _open(request)
            stack.callback(session.close)
            pid = session.pid
            run = _prepare(request, session, stack)
            vmcore = _vmcore(run)
            with vmcore.copying():
                with run.hold() as pause:
                    vmcore.inside(run.confirm(pause), pause)
            made = vmcore.after()
            run.out.commit()
    except LivedumpError:
        # Whatever failed, QEMU's exit is the cause to report (also from the way out:
        # a monitor gone with QEMU fails what puts the VM back).
        if pid is not None and request.core is None and not alive(pid):
            raise ProcessNotFound(f"QEMU (PID {pid}) exited during the dump") from None
        raise
    return Summary(
        output=request.output, pid=pid, qemu_target=run.qemu_target, via=session.via,
        detail=session.detail, was_running=pause.was_running,
        paused=request.pause and pause.was_running, file_mode=run.out.mode,
        wall_seconds=time.monotonic() - started, pause_seconds=pause.seconds, **made)


def _check(request: Request) -> None:
    """Refuse, before anything is touched, what cannot be done."""
    if request.live and ((request.output == STDOUT and request.format != "kdump")
                         or not request.pause):
        raise UsageError("--live writes an ELF vmcore out of order: it needs an output file "
                         "(--format kdump may go to standard output), and pauses the guest "
                         "(not with --no-pause)")
    check_request(request.live, request.via, request.domain)
    check_format(request.format, request.compress, request.dump_level)


@dataclass
class _Run:
    """A dump made ready before the hold: what the steps inside and after it share."""

    request: Request
    session: Session
    out: Output
    memory: MemorySource
    pagemap: Populated
    sources: "_Sources"
    prepared: RamMap | None  # the RAM map read before the hold, if the session can
    plan: _Plan | None
    wanted: arches.Arch | None  # --arch
    target: arches.TargetDefault | None
    qemu_target: str
    warnings: list[str]
    provenance: Note
    guardian: Guardian | None
    live: "LiveSnapshot | None"
    streamed: bool  # the snapshot's own pause, the CPU notes from its stream
    spool: Spool | None
    hint: Found | None  # VMCOREINFO, found before the hold

    def written(self, length: int) -> None:
        """Told each part written: it is progress, for the user and the guardian."""
        if self.request.progress:
            self.request.progress.update(length)
        if self.guardian:
            self.guardian.beat()  # Progress: the stall limit starts again.

    def hold(self) -> AbstractContextManager[Pause]:
        """The session's pause; a streamed snapshot's is QEMU's own."""
        return (self.live.hold() if self.live and self.streamed
                else self.session.hold(self.request.pause))

    def confirm(self, pause: Pause) -> "_Held":
        """Inside the hold, for every writer: the RAM map confirmed (planned again
        only if it changed), the vCPUs' registers, the vmcore's architecture."""
        ram = self.session.ranges(self.memory, self.prepared)
        plan = (self.plan if self.plan is not None and not ram.changed
                else _plan(ram, self.sources))
        data_offset = 0
        cpu: CpuNotes
        if self.live and self.streamed and pause.was_running:
            # Memory goes after the largest notes the stream may give.
            forms = self.live.candidates(plan.blocks)
            to_stdout = (self.spool or self.out).is_stdout
            data_offset = max(_layout(
                c.arch, plan.blocks, c, self.provenance,
                VmcoreinfoSearch(c.arch, c, to_stdout).room).data_offset for c in forms)
            cpu = forms[0]
        elif self.live and self.streamed:
            cpu = self.live.paused_notes(plan.blocks[0].gpa)
        else:
            cpu = self.session.cpu_notes(self.memory, plan.blocks)
        arch, arch_from, cpu = _arch(self.wanted, self.target, cpu)
        if self.guardian:
            self.guardian.beat()
        return _Held(plan, cpu, arch, arch_from, data_offset)


@dataclass(frozen=True)
class _Held:
    """What :meth:`_Run.confirm` settled inside the hold."""

    plan: _Plan
    cpu: CpuNotes
    arch: arches.Arch
    arch_from: str
    data_offset: int  # where memory starts in a live ELF vmcore (0: after the notes)


def _prepare(request: Request, session: Session, stack: contextlib.ExitStack) -> _Run:
    """Everything that can be slow, before the guest is held: the VM claimed, its
    target asked, the output opened, its RAM mapped, QEMU's snapshot set up."""
    pid = session.pid
    image = session if isinstance(session, _Image) else None
    if request.pid is None and image is None:
        stack.enter_context(VMLock(pid))
    if request.live and not isinstance(session, SnapshotSource):
        raise UsageError(f"--live needs the VM's QMP monitor, and none could serve "
                         f"({session.detail})")
    if request.progress:
        stack.callback(request.progress.close)
    wanted = arches.lookup(request.arch) if request.arch else None
    qemu_target = _target(session, wanted)
    target = session.target_default(qemu_target) if wanted is None else None
    warnings = ([w] if wanted and qemu_target
                and (w := arches.contradiction(wanted, qemu_target)) else [])
    provenance = provenance_note(pid, request.core)
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
    memory: MemorySource
    pagemap: Populated
    if image is not None:
        memory = pagemap = image.memory
        sources = _Sources(image.memory.maps, None)  # What a core lacks is zeros.
    else:
        memory = stack.enter_context(ProcessMemory(pid))
        pagemap = stack.enter_context(PageMap(pid))
        sources = _Sources(functools.partial(read_maps, pid),
                           stack.enter_context(BackingFiles(pid)))
    prepared = session.prepare()
    plan = _plan(prepared, sources) if prepared is not None else None
    live = (stack.enter_context(session.live(qemu_target))
            if isinstance(session, SnapshotSource) and request.live else None)
    streamed = live is not None and live.ready and live.from_stream and wanted is None
    if live is not None and not streamed:
        live.own_pause()  # --arch: QEMU's notes from the pause, as without --live
    # The pages kept are decided by the guest kernel's structures (VMCOREINFO's).
    decides_pages = request.format == "kdump" or bool(request.dump_level & STRUCT_PAGE_LEVELS)
    # --live with a dump level or kdump: the live ELF vmcore goes to a spool,
    # the file asked for is written from it once the snapshot is whole (the
    # pages a level keeps are known only then). A guest found paused is
    # dumped the normal way.
    spool = (stack.enter_context(Spool(_spool_directory(request.output)))
             if live is not None and live.ready and decides_pages else None)
    # VMCOREINFO does not move while the kernel runs: found before the
    # hold where the struct page array (or, for kdump, where the kernel's
    # memory ends) is read before the copy; confirmed inside.
    hint = (find_vmcoreinfo(arches.lookup(request.arch or "x86_64"),
                            NoCpuNotes("not yet"), memory, plan.blocks, plan.spans, pagemap)
            if plan is not None and spool is None and decides_pages else None)
    return _Run(request, session, out, memory, pagemap, sources, prepared, plan, wanted,
                target, qemu_target, warnings, provenance, guardian, live, streamed, spool,
                hint)


class _Written(TypedDict):
    """What the report says of the vmcore written (:class:`Summary`'s fields; the
    rest are the run's)."""

    arch: str
    arch_from: str
    elf_class: int
    cpu_notes: str
    blocks: list[Block]
    vmcoreinfo: VmcoreinfoResult
    warnings: list[str]
    file_size: int
    read_bytes: int
    written_bytes: int
    live: bool
    format: str
    kdump: dict[str, object] | None
    pages: dict[str, object] | None


class _Vmcore(Protocol):
    """How the vmcore is written: chosen once, before the hold (:func:`_vmcore`);
    :meth:`inside` while the VM is held, :meth:`after` once it is let go."""

    def copying(self) -> AbstractContextManager[object]: ...
    def inside(self, held: _Held, pause: Pause) -> None: ...
    def after(self) -> _Written: ...


def _vmcore(run: _Run) -> _Vmcore:
    """A kdump file staged from guest memory; else an ELF vmcore, into the output or
    (then rewritten from it) into the spool."""
    return _Kdump(run) if run.request.format == "kdump" and run.spool is None else _Elf(run)


class _Kdump:
    """A kdump file staged from guest memory: pages read while the VM is held, and
    compressed, where they may wait, once it runs (out of the guest's pause)."""

    def __init__(self, run: _Run) -> None:
        self.run = run

    def copying(self) -> AbstractContextManager[object]:
        return contextlib.nullcontext()

    def inside(self, held: _Held, pause: Pause) -> None:
        run, request, plan = self.run, self.run.request, held.plan
        if request.progress:
            request.progress.start(sum(b.size for b in plan.blocks))
        self.held = held
        self.pending = stage_kdump(run.out, held.arch, held.cpu, plan.blocks, plan.spans,
                                   run.memory, run.pagemap,
                                   request.compress or DEFAULT_COMPRESSION, request.dump_level,
                                   run.provenance, run.written, hint=run.hint,
                                   budget=staging_budget())

    def after(self) -> _Written:
        made, held = self.pending.finish(), self.held
        return {"arch": held.arch.name, "arch_from": held.arch_from, "elf_class": 64,
                "cpu_notes": held.cpu.summary(), "blocks": held.plan.blocks,
                "vmcoreinfo": made.vmcoreinfo, "warnings": self.run.warnings + made.warnings,
                "file_size": made.size, "read_bytes": made.stats.read_bytes,
                "written_bytes": made.size, "live": False, "format": "kdump",
                "kdump": made.report(), "pages": None}


class _Elf:
    """An ELF vmcore, each chunk written as soon as it is read; into the spool
    (if any), then the file asked for written from it."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.out: Output = run.spool or run.out
        self.writer = Writer(self.out, run.written)

    @contextlib.contextmanager
    def copying(self) -> Iterator[None]:
        """The writer (a pipe's thread) around the hold, drained once the VM runs."""
        with self.writer:
            yield
            self.writer.finish()

    def inside(self, held: _Held, pause: Pause) -> None:
        run, request, plan = self.run, self.run.request, held.plan
        self.pages: dict[str, object] | None = None
        if request.dump_level & STRUCT_PAGE_LEVELS and run.spool is None:
            plan, self.pages = _filter(plan, held.arch, held.cpu, run.memory, run.pagemap,
                                       run.sources, request.dump_level, run.hint,
                                       run.warnings)
        self.held = held
        self.search = VmcoreinfoSearch(held.arch, held.cpu, self.out.is_stdout)
        self.layout = _layout(held.arch, plan.blocks, held.cpu, run.provenance,
                              self.search.room, held.data_offset)
        self.writer.inspect = self.search.inspector(self.layout)
        if request.progress:  # From a spool: its pages are read once more.
            request.progress.start(self.layout.size +
                                   (_memory(self.layout) if run.spool else 0))
        # A paused guest cannot change: the normal way is as consistent.
        live = run.live
        self.copier: _Copy = (_Snapshot(live) if live and live.ready and pause.was_running
                              else _Direct(run.memory, run.pagemap))
        self.copier.inside(self.layout, plan, self.writer)

    def after(self) -> _Written:
        run, layout, search = self.run, self.layout, self.search
        arch, arch_from, cpu = self.held.arch, self.held.arch_from, self.held.cpu
        read, written = self.copier.after(self.out, layout, self.writer,
                                          run.request.progress)
        if run.live and run.streamed and self.copier.live:
            cpu = run.live.cpu_notes(layout.blocks)
            arch, arch_from, cpu = _arch(None, run.target, cpu)
            final = _layout(arch, layout.blocks, cpu, run.provenance, search.room,
                            layout.data_offset)
            if final.offsets != layout.offsets:
                raise SnapshotError("the vmcore's notes outgrew the room left for them")
            search.settle(arch, cpu, final)
            layout = final
            self.out.write_at(0, layout.header)
        vmcoreinfo = search.finish(self.out)
        made: _Written = {
            "arch": arch.name, "arch_from": arch_from, "elf_class": layout.bits,
            "cpu_notes": cpu.summary(), "blocks": layout.blocks, "vmcoreinfo": vmcoreinfo,
            "warnings": run.warnings, "file_size": layout.size, "read_bytes": read,
            "written_bytes": written, "live": self.copier.live, "format": "elf",
            "kdump": None, "pages": self.pages}
        if run.spool is None:
            return made
        run.spool.seal()
        # The VMCOREINFO found in the stream: confirmed against the spool.
        hint = (Found(vmcoreinfo.gpa, search.text)
                if search.text is not None and vmcoreinfo.gpa is not None else None)
        rewrite = _kdump_from if run.request.format == "kdump" else _elf_from
        return rewrite(run, run.spool, layout, arch, cpu, hint, made)


def _kdump_from(run: _Run, spool: Spool, spooled: CoreLayout, arch: arches.Arch,
                cpu: CpuNotes, hint: Found | None, elf: _Written) -> _Written:
    """The kdump file of the ELF vmcore in ``spool`` (of layout ``spooled``, reported
    as ``elf``); what the report says of the file."""
    request = run.request
    blocks = _spooled(spooled)
    # Every page the stream said is zero is a hole: not read, known to be zeros.
    made = stage_kdump(run.out, arch, cpu, blocks, [[Span(0, b.size, True)] for b in blocks],
                       spool, spool,
                       request.compress or DEFAULT_COMPRESSION, request.dump_level,
                       run.provenance, run.written, hint=hint).finish()
    return {**elf, "elf_class": 64, "format": "kdump", "vmcoreinfo": made.vmcoreinfo,
            "kdump": made.report() | {"spool_bytes": spool.allocated},
            "warnings": run.warnings + made.warnings, "file_size": made.size,
            "written_bytes": made.size}


def _elf_from(run: _Run, spool: Spool, spooled: CoreLayout, arch: arches.Arch,
              cpu: CpuNotes, hint: Found | None, elf: _Written) -> _Written:
    """The ELF vmcore of the one in ``spool`` (of layout ``spooled``) less the pages
    the dump level leaves out (as :func:`_filter` decides for the normal mode); what
    the report says of it."""
    out, dump_level = run.out, run.request.dump_level
    blocks = _spooled(spooled)
    end = max(b.hva + b.size for b in blocks)
    # The spool as a process's only mapping: private, so its holes are zeros.
    sources = _Sources(lambda: [Mapping(0, end, "r--p", 0, "")], None)
    plan, pages = _filter(_plan_of(blocks, sources), arch, cpu, spool, spool, sources,
                          dump_level, hint, run.warnings)
    search = VmcoreinfoSearch(arch, cpu, out.is_stdout)
    layout = _layout(arch, plan.blocks, cpu, run.provenance, search.room)
    with Writer(out, run.written) as writer:
        writer.inspect = search.inspector(layout)
        copy(layout, plan.spans, spool, spool, writer)
        writer.finish()
    # The blocks kept, where they are in QEMU (as the normal mode reports them).
    kept = [dataclasses.replace(k, hva=b.hva + k.gpa - b.gpa)
            for k in layout.blocks for b in spooled.blocks if b.gpa <= k.gpa < b.end]
    return {**elf, "vmcoreinfo": search.finish(out), "file_size": layout.size,
            "written_bytes": writer.written, "blocks": kept,
            "pages": pages | {"spool_bytes": spool.allocated}}


def _spooled(layout: CoreLayout) -> list[Block]:
    """``layout``'s blocks as a spool holds them: at their file offset."""
    return [dataclasses.replace(b, hva=o)
            for b, o in zip(layout.blocks, layout.offsets, strict=True)]


def _spool_directory(output: str) -> str:
    """Where a spool goes: beside the output, which fills no other filesystem; for
    standard output, the temporary directory (``TMPDIR``)."""
    return tempfile.gettempdir() if output == STDOUT else os.path.dirname(
        os.path.abspath(output))


def _memory(layout: CoreLayout) -> int:
    return sum(b.size for b in layout.blocks)


def _filter(plan: _Plan, arch: arches.Arch, cpu: CpuNotes, memory: MemorySource,
            pagemap: Populated, sources: "_Sources", dump_level: int, hint: Found | None,
            warnings: list[str]) -> tuple[_Plan, dict[str, object]]:
    """The plan less the pages ``dump_level`` leaves out (``makedumpfile -E``'s ELF),
    and what the report says of them; zero pages need no help, as they are holes."""
    try:
        ram = Bitmap.of_ram(plan.blocks, PAGE)
    except ValueError:
        ram = Bitmap(0)
    notes = cpu.data if isinstance(cpu, QemuNotes) and arch.bits == 64 else b""
    decision = page_decision(arch, cpu, notes, memory, plan.blocks, plan.spans, pagemap, ram,
                             dump_level, hint)
    if decision.undecided:
        warnings.append(f"dump level {dump_level}: page cache, user and free pages were kept: "
                        f"{decision.undecided}")
    # As makedumpfile, up to where the kernel's memory ends (device memory beyond).
    end = decision.end_pfn * PAGE if decision.end_pfn is not None else None
    blocks, _ = without_pages(plan.blocks, plan.private(), decision.pfns(), PAGE, end)
    return _plan_of(blocks, sources), {"dump_level": dump_level,
                                    "excluded_pages": decision.counts()}


def _layout(arch: arches.Arch, blocks: list[Block], cpu: CpuNotes, provenance: Note,
            room: int, data_offset: int = 0) -> CoreLayout:
    """The vmcore's layout: QEMU's notes, ours, then ``room`` for VMCOREINFO."""
    notes: list[Notes] = [*([cpu] if isinstance(cpu, QemuNotes) else []), provenance]
    return CoreLayout(arch, blocks, notes, room, data_offset)


@dataclass(frozen=True)
class _Sources:
    """Where a plan's blocks are read from: QEMU's mappings, and for a process
    the files behind its shared memory (none for a core file, where memory the
    core lacks is zeros)."""

    maps: Callable[[], Sequence[Mapping]]
    files: BackingFiles | None


def _plan(ram: RamMap, sources: _Sources) -> _Plan:
    blocks = coalesce(ram.ranges)
    if not blocks:
        raise GuestMemoryError("the VM has no RAM in its memory map")
    return _plan_of(blocks, sources)


def _plan_of(blocks: list[Block], sources: _Sources) -> _Plan:
    """The plan for ``blocks``: each one's parts by the mappings that cover it."""
    covering = check_blocks(blocks, sources.maps())
    if sources.files is None:
        return _Plan(blocks, [[Span(0, b.size, True)] for b in blocks])
    files = sources.files
    return _Plan(blocks, [files.spans(b, c) for b, c in zip(blocks, covering, strict=True)])


def _target(session: Session, wanted: arches.Arch | None) -> str:
    """QEMU's target, as ``query-target`` names it; "" where only ``--arch``
    could say (a QEMU binary of another name, in ptrace mode), and it did."""
    try:
        return session.target_arch()
    except UsageError:
        if wanted is None:
            raise
        return ""


def _open(request: Request) -> Session:
    """The session the request names: a core file, or a running VM."""
    if request.core is not None:
        from livedump.coredump.session import CoreSession

        return CoreSession(request.core, request.debug_file)
    return open_session(request.pid, request.qmp, request.via, request.qmp_timeout,
                        request.debug_file, request.domain, request.connect,
                        request.stall_timeout)


def _arch(wanted: arches.Arch | None, target: arches.TargetDefault | None,
          cpu: CpuNotes) -> tuple[arches.Arch, str, CpuNotes]:
    """The vmcore's architecture, where it comes from, and its CPU notes.

    ``--arch``, else QEMU's own judgement (the identity of its notes), else
    what the target implies, where it can tell. QEMU's notes go only into a
    vmcore of their kind.
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
    if target.unknown:
        raise UsageError(target.unknown)
    return target.arch, str(target), cpu


def provenance_note(pid: int, core: str | None = None) -> Note:
    text = f"livedump {__version__}\npid {pid}\n" + (f"core {core}\n" if core else "")
    return Note("LIVEDUMP", NT_LIVEDUMP_INFO, text.encode())
