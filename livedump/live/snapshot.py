"""``--live``: a vmcore of one instant, the guest paused for milliseconds.

QEMU (6.0 on) can take a *background snapshot*: a migration that saves the
devices with the guest stopped, write-protects guest RAM with userfaultfd,
lets the guest run again, and then streams RAM as it was at that instant
(a page the guest is about to write is sent first). livedump starts such
a migration into a pipe passed over the monitor, and the pages are placed
into the vmcore by their guest-physical address while the guest runs.

For an x86 guest the pause is QEMU's own: livedump sends no ``stop``, the
RAM map is read before and confirmed after the snapshot point, and the CPU
notes are built from the vCPUs' state the stream carries after RAM
(:mod:`livedump.live.devices`), so the vmcore's header is written last, its
memory placed where the largest notes QEMU could give leave it. QEMU
resumes the guest itself once write protection is armed (7.2 always; later
QEMUs when it ran before, which livedump made sure of); livedump sends
``cont`` only if QEMU shows, by its events and status, that it did not.
Other targets: livedump pauses the guest itself and takes QEMU's CPU notes
from its one-page dump first, as the normal mode does.

Every migration capability and parameter livedump changes is put back,
whatever happens. A snapshot once started is never cancelled, nor its
writes made to fail: QEMU write-protects guest RAM for it, and QEMU 7.2
lifts that protection only when a snapshot completes (a guest write to a
page left protected would block its vCPU for ever). So whatever ends the
dump, the stream is read to its end and dropped, the settings put back
once the migration has ended, and only then is the error reported; if
livedump dies, its guardian, which holds a copy of the stream, does it.
"""

import bisect
import contextlib
import fcntl
import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from livedump import signals
from livedump.errors import LivedumpError, MonitorError, SnapshotError
from livedump.live import devices
from livedump.live.stream import MigrationStream, Page, RamBlock
from livedump.qmp import notes
from livedump.qmp.monitor import Command, Monitor, capabilities_command
from livedump.qmp.ram_map import FlatRange
from livedump.transfer.output import Output
from livedump.vm.guardian import MIGRATION_IDLE, Guardian, drain
from livedump.vm.pause import Pause
from livedump.vmcore.blocks import Block
from livedump.vmcore.elf import CoreLayout
from livedump.vmcore.notes import CpuNotes, NoCpuNotes, QemuNotes
from livedump.vmcore.vmcoreinfo import MAGIC, Inspect
from livedump.vmcore.x86_notes import SEGMENTS, Segment, X86State, qemu_notes

BACKGROUND_SNAPSHOT = "background-snapshot"
# Capabilities left as they are: they do not change what the stream holds.
# Every other one is turned off for the snapshot (and back on afterwards),
# as each either conflicts with a background snapshot or changes the stream.
_NEUTRAL_CAPABILITIES = {"events"}
_FD_NAME = "livedump-snapshot"
_PIPE_SIZE = 1 << 20
_SETTLE_TIMEOUT = 30.0
_POLL = 0.01
_MIN_VERSION = (6, 0)
_PROGRESS_STEP = 64 << 20
# QEMU targets whose vCPU state livedump reads from the stream (the "cpu"
# sections of target/i386), so that the snapshot is the only pause.
X86_TARGETS = ("x86_64", "i386")
# How long QEMU may take to resume the guest once the snapshot point is taken
# before livedump resumes it. Every QEMU tried does so from its main loop at
# once; a loaded host may delay that loop for seconds, and a 'cont' sent then
# would only say livedump paused a guest it did not.
_RESUME_GRACE = 10.0
_STREAM_NOTES = "QEMU's background snapshot"


@dataclass(frozen=True)
class _Segment:
    """Block offsets [start, end) of one RAM block, and where each of its copies
    in guest-physical space lies in the file: file offset = block offset + delta."""

    start: int
    end: int
    deltas: tuple[int, ...]


class _Sink(Protocol):
    def write_at(self, offset: int, data: bytes | memoryview) -> None: ...


class Gathered:
    """Writes into ``out`` at consecutive offsets, gathered into one: a
    background snapshot sends each block's pages mostly in order, and a
    ``pwrite`` a page cost more than reading them from the stream."""

    def __init__(self, out: Output, size: int = 1 << 20) -> None:
        self.out = out
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = self._used = 0

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        n = len(data)
        if self._used and (offset != self._start + self._used or self._used + n > len(self._buf)):
            self.flush()
        if n > len(self._buf):
            self.out.write_at(offset, data)
            return
        if not self._used:
            self._start = offset
        self._view[self._used : self._used + n] = data
        self._used += n

    def flush(self) -> None:
        """Write what is gathered."""
        if self._used:
            self.out.write_at(self._start, self._view[: self._used])
            self._used = 0


class Placement:
    """Where each page of each RAM block of the stream goes in the vmcore.

    The map is the normal mode's: the flat view's RAM ranges, each named
    after the memory region it shows at an offset into it, coalesced into
    the layout's blocks. A region is the RAM block of the same name (QEMU
    prefixes a device's blocks with its path: ``0000:00:02.0/vga.vram``).
    A block may show at several addresses (``pc.bios`` at the top of 4 GiB
    and below 1 MiB); each copy is written.
    """

    def __init__(self, layout: CoreLayout, view: Sequence[FlatRange],
                 blocks: Sequence[RamBlock]) -> None:
        extents: dict[int, list[tuple[int, int, int]]] = {}
        for fr in view:
            if not fr.dumped:
                continue
            index = block_of(fr.name, [b.name for b in blocks])
            if fr.offset + fr.size > blocks[index].size:
                raise SnapshotError(f"region {fr.name!r} at {fr.gpa:#x} reaches past the end "
                                    f"of RAM block {blocks[index].name!r}")
            file_offset = _file_offset(layout, fr.gpa)
            extents.setdefault(index, []).append(
                (fr.offset, fr.offset + fr.size, file_offset - fr.offset))
        self._starts: list[list[int]] = [[] for _ in blocks]
        self._segments: list[list[_Segment]] = [[] for _ in blocks]
        for index, runs in extents.items():
            for segment in _disjoint(runs):
                self._starts[index].append(segment.start)
                self._segments[index].append(segment)

    def place(self, out: _Sink, page: Page, page_size: int, inspect: Inspect | None = None
              ) -> int:
        """Write one page where it belongs (nowhere if no guest address shows it);
        return the bytes written. ``inspect`` is shown each copy that may start the
        guest kernel's VMCOREINFO text (which starts a page of its own)."""
        block, offset, data = page
        if isinstance(data, int):
            data = memoryview(bytes([data]) * page_size)
        written = 0
        segments = self._segments[block]
        end = offset + page_size
        # From the segment the page starts in (or the first after it), while they
        # overlap the page: one, unless the page straddles a boundary.
        for i in range(max(bisect.bisect_right(self._starts[block], offset) - 1, 0),
                       len(segments)):
            segment = segments[i]
            if segment.start >= end:
                break
            lo, hi = max(offset, segment.start), min(end, segment.end)
            piece = data[lo - offset:hi - offset]
            for delta in segment.deltas if lo < hi else ():
                out.write_at(lo + delta, piece)
                written += hi - lo
                if inspect is not None and piece[:len(MAGIC)] == MAGIC:
                    inspect(lo + delta, bytes(piece), hi - lo)
        return written


def _progress(sent: int, layout: CoreLayout) -> int:
    """How far along the vmcore ``sent`` bytes of the stream's RAM are, roughly
    (the stream holds RAM that no PT_LOAD shows, and shows some twice)."""
    return min(len(layout.header) + sent, layout.size)


def block_of(region: str, names: Sequence[str]) -> int:
    """The index of the RAM block backing memory region ``region``: the block of
    that name, or the one device's block ending in ``/region``."""
    if region in names:
        return names.index(region)
    found = [i for i, name in enumerate(names) if name.endswith("/" + region)]
    if len(found) != 1:
        which = "no RAM block" if not found else f"RAM blocks {[names[i] for i in found]}"
        raise SnapshotError(f"{which} in the migration for memory region {region!r}")
    return found[0]


def _file_offset(layout: CoreLayout, gpa: int) -> int:
    for block, offset in zip(layout.blocks, layout.offsets, strict=True):
        if block.gpa <= gpa < block.end:
            return offset + gpa - block.gpa
    raise SnapshotError(f"guest-physical {gpa:#x} is in no block of the vmcore")


def _disjoint(runs: list[tuple[int, int, int]]) -> Iterator[_Segment]:
    """Split overlapping (start, end, delta) runs into disjoint segments."""
    bounds = sorted({b for start, end, _ in runs for b in (start, end)})
    for start, end in itertools.pairwise(bounds):
        deltas = tuple(d for s, e, d in runs if s <= start and end <= e)
        if deltas:
            yield _Segment(start, end, deltas)


class SnapshotMap(Protocol):
    """What a snapshot needs of the session's RAM map."""

    def dumped(self) -> Sequence[FlatRange]:
        """The RAM the vmcore shows, as the layout was made from it."""

    def unsent(self) -> Sequence[FlatRange]:
        """RAM QEMU neither dumps nor migrates (a virtio-mem device's unplugged
        blocks): not waited for in the stream."""

    def needs_pause(self) -> bool:
        """Whether the map can be read only with the guest paused (a partly
        plugged virtio-mem device's blocks come from QEMU's own dump): then
        livedump keeps its own pause."""

    def changed(self) -> bool:
        """Read again: whether the map differs from the one the layout came from."""


class LiveSnapshot:
    """A background snapshot of a VM through its monitor.

    Entered before the pause: checks that QEMU can take one and sets the
    capabilities up. :meth:`start`, inside the pause, starts it and returns
    once QEMU has taken the snapshot point; :meth:`write`, after the guest
    runs again, fills the vmcore from the stream. Leaving reads what is
    left of the stream to its end, waits until the migration has ended,
    and puts back what was changed.
    """

    def __init__(self, monitor: Monitor, target: str, ram: SnapshotMap,
                 guardian: Guardian) -> None:
        self.monitor = monitor
        self.guardian = guardian
        self.target = target
        self._ram = ram
        self._capabilities: dict[str, bool] = {}  # what was changed, with its old value
        self._parameters: dict[str, object] = {}
        self.ready = False  # set up for a snapshot (not if the guest was paused)
        self._fd = -1  # the stream's read end
        self._named = False  # QEMU may hold its write end, by the name _FD_NAME
        self._started = False  # 'migrate' was sent: the stream must be read to its end
        self._ending = ""  # the migration's final state, once it is known
        self._known: list[RamBlock] = []  # the RAM blocks, as the monitor lists them
        self._stream: MigrationStream | None = None
        self._placement: Placement | None = None
        # The CPU notes come from the stream, and QEMU's pause is the only one.
        self.from_stream = False
        self._cpus = 0  # the vCPUs the monitor counts: the stream must hold as many
        self._pause: Pause | None = None  # QEMU's, as its events time it
        self._resume_pending = False  # QEMU's resume not yet seen (the stream comes first)

    def __enter__(self) -> "LiveSnapshot":
        m = self.monitor
        if not m.running():
            return self  # A paused guest cannot change: the normal way serves.
        version = m.version()
        if version[:2] < _MIN_VERSION:
            raise SnapshotError(f"--live needs QEMU 6.0 or newer (this is QEMU "
                                f"{'.'.join(map(str, version))})")
        status, _ = m.migration_status()
        if status not in MIGRATION_IDLE:
            raise SnapshotError(f"a migration is under way on this VM ({status}); --live "
                                "would need to start one")
        try:
            self._setup()
            # Checked now, while nothing is paused: every dumped region has its block.
            self._known = [RamBlock(b.name, b.used) for b in m.ram_blocks()]
            names = [b.name for b in self._known]
            for fr in self._ram.dumped():
                if fr.dumped:
                    block_of(fr.name, names)
            if self.target in X86_TARGETS and not self._ram.needs_pause():
                self._cpus = m.cpu_count()
                self.from_stream = True
            self._pass_pipe()
        except BaseException:
            self.__exit__()
            raise
        self.ready = True
        return self

    def _setup(self) -> None:
        m = self.monitor
        capabilities = m.migration_capabilities()
        if BACKGROUND_SNAPSHOT not in capabilities:
            raise SnapshotError("this QEMU has no background snapshots (--live needs 6.0 "
                                "or newer)")
        wanted = {name: name == BACKGROUND_SNAPSHOT for name in capabilities
                  if name not in _NEUTRAL_CAPABILITIES}
        changes = {name: state for name, state in wanted.items() if capabilities[name] != state}
        parameters = m.migration_parameters()
        self._capabilities = {name: capabilities[name] for name in changes}
        if parameters.get("tls-creds"):  # The snapshot goes to livedump, unencrypted.
            self._parameters = {"tls-creds": parameters["tls-creds"]}
        # Told first: if livedump dies from here on, the guardian puts them back.
        self.guardian.restore_on_death(self._restoring())
        if self._parameters:
            m.set_migration_parameters({"tls-creds": ""})
        try:
            m.set_migration_capabilities(changes)
        except MonitorError as e:
            raise SnapshotError(f"QEMU cannot take a background snapshot of this VM: "
                                f"{str(e).split(': ', 1)[-1]}") from None

    def _pass_pipe(self) -> None:
        """Give QEMU the pipe's write end, before the pause: one round trip less in it."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        self._fd = read_end
        try:
            try:
                fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
            except OSError:
                pass  # A smaller pipe only means more wake-ups.
            # Told first: if livedump dies from here on, the guardian lets QEMU's
            # write end go, or reads the stream to its end.
            self.guardian.stream(read_end, _FD_NAME)
            self._named = True
            self.monitor.send_fd(write_end, _FD_NAME)
        finally:
            os.close(write_end)  # QEMU's copy is the only writer: EOF when it is done.

    def own_pause(self) -> None:
        """The caller pauses the guest and takes QEMU's notes from its one-page dump
        (as for other targets): the snapshot is started inside that pause."""
        self.from_stream = False

    @contextlib.contextmanager
    def hold(self) -> Iterator[Pause]:
        """The pause of a snapshot whose notes come from the stream: QEMU's own,
        from the snapshot's start; livedump neither stops nor resumes the guest
        (a guest paused now stays paused, and is dumped the normal way)."""
        self._pause = Pause(was_running=self.monitor.running())
        yield self._pause

    def start(self, layout: CoreLayout) -> None:
        """Start the snapshot; return once QEMU has taken it.

        From 'migrate' until the stream has been read to its end, livedump sends
        QEMU nothing: a vCPU may write a page not yet sent while it holds QEMU's
        big lock (TCG pushes an interrupt frame so), and waits for QEMU's
        migration thread, which waits for livedump to read the stream, while a
        command waits for the lock. So QEMU's resume is seen, and the map
        confirmed, once the stream is read (:meth:`write`).

        If this fails, the guest is resumed first and the stream read to its
        end after (on leaving): a guest resumed before QEMU stops it for the
        snapshot point is resumed by QEMU too, afterwards.
        """
        self.guardian.streaming()
        self._started = True
        self.monitor.events()  # Those before are not this snapshot's.
        if self.from_stream:
            # QEMU pauses the guest now: if livedump dies before QEMU (or livedump)
            # resumes it, the guardian does.
            self.guardian.paused()
        self.monitor.migrate(f"fd:{_FD_NAME}")
        self._named = False  # The migration took it.
        self._stream = MigrationStream(self._fd, self.target, self._known, self.guardian.beat)
        try:
            blocks = self._stream.read_setup()
            names = [b.name for b in blocks]
            for fr in self._ram.unsent():  # Never sent: not waited for.
                self._stream.excuse(block_of(fr.name, names), fr.offset, fr.size)
            self._placement = Placement(layout, self._ram.dumped(), blocks)
            self._stream.wait_snapshot()
        except SnapshotError as e:
            if not self.from_stream:  # The guest is ours to resume first.
                raise
            raise SnapshotError(f"{e}; migration {self._finish()}") from None
        self._resume_pending = self.from_stream

    def _after_stream(self) -> None:
        """Once the stream is read: QEMU's resume seen (or made), and the map, read
        before the snapshot and unchanged after it, known to have held at its point."""
        if self._resume_pending:
            self._resume_pending = False
            self._resumed()
            self.guardian.resumed()
            if self._ram.changed():
                raise SnapshotError("the VM's memory map changed while the snapshot was "
                                    "taken; run livedump again")

    def _resumed(self) -> None:
        """Wait until QEMU runs the guest again after the snapshot point, as its events
        and status show; resume it only if QEMU does not. QEMU's STOP and RESUME
        events time the pause."""
        deadline = time.monotonic() + _RESUME_GRACE
        span: dict[str, float] = {}
        while True:
            running = self.monitor.running()
            for name, stamp in self.monitor.events():
                if name in ("STOP", "RESUME"):
                    span.setdefault(name, stamp)
            if running or "RESUME" in span:
                break
            if time.monotonic() > deadline:
                # This QEMU leaves the guest paused at the snapshot point; it ran just
                # before (the snapshot is taken only of a running guest).
                self.monitor.cont()
                span.setdefault("RESUME", time.time())
                break
            time.sleep(_POLL / 10)
        if self._pause is not None and "STOP" in span:
            self._pause.stopped_at = span["STOP"]
            self._pause.resumed_at = span.get("RESUME", span["STOP"])

    def candidates(self, blocks: Sequence[Block]) -> list[QemuNotes]:
        """Notes of the size the stream's may have, one for each ELF identity QEMU
        may choose (long mode first): the vmcore's memory is placed after the
        largest, before the stream says which it is."""
        regs = 16 if self.target == "x86_64" else 8
        segment = Segment(0, 0, 0, 0)
        forms = []
        for efer in ((1 << 10, 0) if regs == 16 else (0,)):
            cpus = [X86State(index=i, regs=(0,) * regs, rip=0, rflags=0,
                             segs=(segment,) * len(SEGMENTS), ldt=segment, tr=segment,
                             gdt=segment, idt=segment, cr=(0,) * 5, efer=efer)
                    for i in range(self._cpus)]
            forms.append(qemu_notes(cpus, blocks, _STREAM_NOTES))
        return forms

    def paused_notes(self, gpa: int) -> CpuNotes:
        """QEMU's notes for a guest found paused (dumped the normal way): from its
        one-page dump, which a paused guest allows."""
        try:
            return notes.from_qemu(self.monitor, gpa, watch=self.guardian.fifo)
        except MonitorError as e:
            return NoCpuNotes(f"QEMU gave no CPU state ({e})")

    def cpu_notes(self, blocks: Sequence[Block]) -> CpuNotes:
        """Once the stream was read: QEMU's notes for the snapshot point, built from
        the vCPU state the stream carries, or why there are none."""
        assert self._stream is not None
        state = self._stream.device_state
        try:
            if state is None:
                raise SnapshotError("its device state is larger than livedump reads")
            found = devices.sections(state)
            if found is None:
                raise SnapshotError("it carries no description of its device state "
                                    "(is the machine's suppress-vmdesc on?)")
            cpus = devices.x86_cpus(found)
            if len(cpus) != self._cpus:
                raise SnapshotError(f"it holds {len(cpus)} vCPUs, the monitor counted "
                                    f"{self._cpus}")
        except SnapshotError as e:
            return NoCpuNotes(f"no CPU state from QEMU's background snapshot: {e}")
        return qemu_notes(cpus, blocks, _STREAM_NOTES)

    def write(self, out: Output, layout: CoreLayout, progress: Callable[[int], None] | None,
              inspect: Inspect | None = None) -> tuple[int, int]:
        """Write the vmcore from the stream: (bytes of pages received, bytes written)."""
        stream, placement = self._stream, self._placement
        assert stream is not None and placement is not None
        if not self.from_stream:  # Else written last, once the notes are known.
            out.write_at(0, layout.header)
        out.extend(layout.size)  # What no page fills stays a hole.
        page_size = stream.page_size
        received = written = reported = 0
        gathered = Gathered(out)
        try:
            for page in stream.pages():
                if not isinstance(page[2], int):
                    received += page_size
                written += placement.place(gathered, page, page_size, inspect)
                if progress and stream.done - reported >= _PROGRESS_STEP:
                    progress(_progress(stream.done, layout) - _progress(reported, layout))
                    reported = stream.done
            gathered.flush()
        except SnapshotError as e:
            raise SnapshotError(f"{e}; migration {self._finish()}") from None
        status = self._finish()
        if status != "completed":
            raise SnapshotError(f"the snapshot did not complete: migration {status}")
        self._after_stream()
        if progress:
            progress(layout.size - _progress(reported, layout))
        return received, written

    def _finish(self) -> str:
        """Read the stream to its end (what is left of it: dropped), wait until the
        migration has ended, and let the pipe go; the migration's final state."""
        if self._fd >= 0:
            if self._named:
                try:
                    self.monitor.close_fd(_FD_NAME)  # Else no end of file would come.
                except LivedumpError:
                    pass  # A migration took it after all, or QEMU is gone.
                self._named = False
            if self._started:
                drain(self._fd, self._ended, self.guardian.beat)
            os.close(self._fd)
            self._fd = -1
            self.guardian.stream_done()
        if self._started and not self._ending:
            self._ending = self._settle()
        return self._ending or "not started"

    def _ended(self) -> bool:
        """Whether the migration has ended (not known: not yet, the stream will tell)."""
        try:
            return self.monitor.migration_status()[0] in MIGRATION_IDLE
        except LivedumpError:
            return False

    def _settle(self) -> str:
        """Wait until QEMU's migration has ended; its final state, and why it failed."""
        deadline = time.monotonic() + _SETTLE_TIMEOUT
        while (status := self.monitor.migration_status())[0] not in MIGRATION_IDLE:
            if time.monotonic() > deadline:
                raise SnapshotError(f"QEMU's migration did not end within "
                                    f"{_SETTLE_TIMEOUT:g} s (still {status[0]})")
            time.sleep(_POLL)
        return f"{status[0]} ({status[1]})" if status[1] else status[0]

    def _restoring(self) -> list[Command]:
        """The commands that put back what was changed."""
        return ([capabilities_command(self._capabilities)] if self._capabilities else []) + (
            [("migrate-set-parameters", self._parameters)] if self._parameters else [])

    def _restore(self) -> None:
        for command, arguments in self._restoring():
            self.monitor.transport.execute(command, arguments)
        self._capabilities, self._parameters = {}, {}
        self.guardian.restored()

    def __exit__(self, *exc: object) -> None:
        # No signal may leave the stream half read, or QEMU's settings half put back.
        with signals.deferred():
            try:
                self._finish()
                with contextlib.suppress(LivedumpError):  # The dump's error comes first.
                    self._after_stream()
            finally:
                self._restore()
