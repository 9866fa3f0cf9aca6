"""Copy guest memory into a kdump-compressed vmcore: read, sorted and compressed in one pass.

Worker threads, one per CPU, take the chunks of guest memory in pfn order;
each reads the pages of its chunk that the file keeps (runs of them: pages
left out are never read), where and as the ELF copy reads them
(:func:`~livedump.transfer.copier.extents`: pages that hold nothing are
zeros never read, shared memory QEMU has not mapped is read from its file),
tells zero pages apart (dump level 1) and compresses the others page by
page. Reading (process_vm_readv, or the file) and the compression libraries
release the GIL, so the workers run on every CPU.
The main thread takes the chunks back in order, gives each page its place
in the data area and writes data and descriptors, so the file's pages come
in pfn order as makedumpfile's do. A worker runs at most a few chunks ahead
of the writing, so memory use stays bounded.
"""

import dataclasses
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from livedump import signals
from livedump.errors import DumpIOError
from livedump.transfer.copier import CHUNK, Source, extents
from livedump.transfer.memory import PAGE_SIZE, Buffer, MemorySource, Populated, Span
from livedump.transfer.output import Output
from livedump.vmcore.arch import Arch
from livedump.vmcore.blocks import Block
from livedump.vmcore.elf import ElfStructs, Note
from livedump.vmcore.kdump import (
    COMPRESS_FLAGS,
    DL_ZERO,
    PAGE,
    Bitmap,
    FlatSink,
    KdumpLayout,
    Sink,
    Utsname,
    compress_page,
    compressor,
    count_prstatus,
    descriptor,
    find_note,
)
from livedump.vmcore.notes import CpuNotes, QemuNotes
from livedump.vmcore.pagefilter import STRUCT_PAGE_LEVELS, Decision, decide
from livedump.vmcore.vmcoreinfo import (
    NAME,
    NT_VMCOREINFO,
    Inspect,
    Invalid,
    ReadPhys,
    Search,
    kernel_phys,
    parse,
)
from livedump.vmcore.vmcoreinfo import Result as VmcoreinfoResult

WORKERS = max(1, os.cpu_count() or 1)
_AHEAD = 2  # chunks each worker may be ahead of the writing
_WAIT_STEP = 0.1

# One chunk of guest memory: its guest-physical address, length, and where it is
# read (None: nothing there, so zeros, not read).
_Piece = tuple[int, int, Source | None]
# A chunk to copy, and the bytes of guest memory it stands for in the progress
# (its own and those of chunks before it with no page kept, never handed out).
_Work = tuple[_Piece, int]
# A page as a worker left it: None for a page of zeros (dump level 1), else the
# bytes to store and their descriptor flags.
_Page = tuple[bytes, int] | None
T = TypeVar("T")


@dataclass
class KdumpStats:
    """What the copy did, for the report: pages by class, bytes before and after."""

    ram_pages: int = 0
    excluded: dict[str, int] = field(default_factory=dict)  # class -> pages left out
    zero_pages: int = 0  # kept as the one page of zeros (dump level 1)
    stored_pages: int = 0  # kept with data of their own
    read_bytes: int = 0
    data_bytes: int = 0  # the stored pages' bytes before compression
    compressed_bytes: int = 0  # the same pages as written
    end: int = 0  # the file's size


@dataclass
class _Chunk:
    pages: list[_Page]
    read: int  # bytes read from QEMU
    length: int  # bytes of guest memory it covers


def copy_kdump(layout: KdumpLayout, spans: Sequence[Sequence[Span]], memory: MemorySource,
               pagemap: Populated, sink: Sink, compression: str, dump_level: int,
               inspect: Inspect | None = None, on_written: Callable[[int], None] | None = None,
               workers: int = WORKERS, budget: int = 0) -> "Staged":
    """Read every page ``layout`` keeps; ``inspect(gpa, data, length)`` sees each
    chunk read (the VMCOREINFO search). Up to ``budget`` bytes of pages are kept
    as read, to be compressed by :meth:`Staged.finish` once the guest runs again;
    the rest is compressed as it is read. The headers and bitmaps are the caller's."""
    run = _Run(layout, memory, sink, compression, dump_level, inspect, on_written, workers,
               budget)
    work = _with_kept(pieces(layout.blocks, spans, pagemap), layout)
    return Staged(run, list(run.results(work, run.read)))


class Staged:
    """Guest memory read, partly compressed: :meth:`finish` writes it all."""

    def __init__(self, run: "_Run", chunks: list["_Chunk"]) -> None:
        self._run, self._chunks = run, chunks

    def finish(self) -> KdumpStats:
        """Compress what was kept as read, and write every page and descriptor."""
        chunks, self._chunks = self._chunks, []
        return self._run.write(self._run.results(chunks, self._run.compress_rest))


_RAW = -1  # a page's flags while it waits for compression


class _Run:
    def __init__(self, layout: KdumpLayout, memory: MemorySource, sink: Sink,
                 compression: str, dump_level: int, inspect: Inspect | None,
                 on_written: Callable[[int], None] | None, workers: int, budget: int) -> None:
        self.layout, self.memory, self.sink = layout, memory, sink
        self.compress, self.flag = compressor(compression), COMPRESS_FLAGS[compression]
        self.zeros = bytes(layout.page)
        self.skip_zero = bool(dump_level & DL_ZERO)
        self.inspect, self.on_written = inspect, on_written
        self.workers = workers
        self.budget = budget  # bytes of pages that may wait, uncompressed, for finish()
        self._zero_stored: _Page = None  # a zero page as stored, where level 1 is off
        self._count_lock = threading.Lock()

    def results(self, items: Sequence[T], work: Callable[[T, Buffer], "_Chunk"]
                ) -> Iterator["_Chunk"]:
        """``work`` done on each of ``items`` by the worker threads, in order; a
        worker runs at most a few items ahead of the one taken."""
        return _Ordered(items, work, self.workers).results()

    def write(self, chunks: Iterator["_Chunk"]) -> KdumpStats:
        stats = KdumpStats(ram_pages=self.layout.ram.count())
        data_at = self.layout.data_offset
        if self.skip_zero:  # makedumpfile's pd_zero: one page of zeros, first
            self.sink.write_at(data_at, self.zeros)
            data_at += self.layout.page
        zero_desc = descriptor(self.layout.data_offset, self.layout.page, 0)
        index = 0  # descriptors written
        for chunk in chunks:
            stats.read_bytes += chunk.read
            descs, data = [], []
            for page in chunk.pages:
                if page is None:
                    descs.append(zero_desc)
                    stats.zero_pages += 1
                    continue
                stored, flags = page
                descs.append(descriptor(data_at, len(stored), flags))
                data.append(stored)
                data_at += len(stored)
                stats.stored_pages += 1
                stats.data_bytes += self.layout.page
                stats.compressed_bytes += len(stored)
            blob = b"".join(data)
            self.sink.write_at(data_at - len(blob), blob)
            self.sink.write_at(self.layout.desc_offset + index * len(zero_desc),
                               b"".join(descs))
            index += len(descs)
            if self.on_written:
                self.on_written(chunk.length)
        if index != self.layout.num_dumpable:
            raise DumpIOError(f"{index} page descriptors written for "
                              f"{self.layout.num_dumpable} pages kept")
        stats.end = data_at
        return stats

    def read(self, work: _Work, buf: Buffer) -> "_Chunk":
        """The chunk's pages the file keeps, and only those read: a run of kept
        pages at a time (``inspect`` sees each run)."""
        (gpa, length, source), accounts = work
        size = self.layout.page
        runs = self.layout.dumpable.runs(gpa // size, length // size)
        if source is None:
            return _Chunk([self._zero_page() for _, n in runs for _ in range(n)], 0, accounts)
        pages: list[_Page] = []
        read = 0
        for pfn, n in runs:
            at = pfn * size - gpa
            data = bytes(source.at(at).read(self.memory, buf, n * size))
            read += n * size
            if self.inspect:
                self.inspect(gpa + at, data, n * size)
            for i in range(n):
                page = data[i * size:(i + 1) * size]
                if page == self.zeros:
                    pages.append(self._zero_page())
                elif self._may_wait(size):
                    pages.append((page, _RAW))
                else:
                    pages.append(compress_page(page, self.compress, self.flag))
        return _Chunk(pages, read, accounts)

    def _may_wait(self, size: int) -> bool:
        with self._count_lock:
            if self.budget < size:
                return False
            self.budget -= size
            return True

    def compress_rest(self, chunk: "_Chunk", buf: Buffer) -> "_Chunk":
        pages = [compress_page(p[0], self.compress, self.flag) if p and p[1] == _RAW else p
                 for p in chunk.pages]
        return _Chunk(pages, chunk.read, chunk.length)

    def _zero_page(self) -> _Page:
        if self.skip_zero:
            return None
        if self._zero_stored is None:
            self._zero_stored = compress_page(self.zeros, self.compress, self.flag)
        return self._zero_stored


class _Ordered(Generic[T]):
    """Worker threads, one per CPU, doing ``work`` on items taken in turn; their
    results taken back in order by the main thread, in steps (signals are handled
    meanwhile). The first error stops them all and is raised in the main thread."""

    def __init__(self, items: Sequence[T], work: Callable[[T, Buffer], "_Chunk"],
                 count: int) -> None:
        self.items, self.work, self.count = items, work, count
        self.error: BaseException | None = None
        self._claim = threading.Lock()
        self._ready = threading.Condition()
        self._done: dict[int, _Chunk] = {}
        self._next = 0
        self._feed = iter(enumerate(items))

    def results(self) -> Iterator["_Chunk"]:
        ended = [threading.Event() for _ in range(self.count)]
        with signals.deferred():  # Signals are for the main thread.
            for i, e in enumerate(ended):
                threading.Thread(target=self._work, args=(e,), daemon=True,
                                 name=f"livedump-kdump-{i}").start()
        try:
            for seq in range(len(self.items)):
                yield self._take(seq)
        except BaseException as e:  # GeneratorExit too: the taker gave up
            self._fail(e)
            for e2 in ended:
                e2.wait(10.0)
            raise
        for e2 in ended:
            while not e2.wait(_WAIT_STEP):
                pass

    def _fail(self, error: BaseException) -> None:
        with self._ready:
            if self.error is None:
                self.error = error
            self._ready.notify_all()

    def _take(self, seq: int) -> "_Chunk":
        with self._ready:
            self._next = seq
            self._ready.notify_all()
            while seq not in self._done:
                if self.error is not None:
                    raise self.error
                self._ready.wait(_WAIT_STEP)
            return self._done.pop(seq)

    def _work(self, ended: threading.Event) -> None:
        try:
            buf = Buffer(CHUNK)
            while self.error is None:
                with self._claim:
                    item = next(self._feed, None)
                if item is None:
                    return
                seq, piece = item
                with self._ready:  # Not too far ahead of the taking.
                    while seq > self._next + _AHEAD * self.count and self.error is None:
                        self._ready.wait(_WAIT_STEP)
                chunk = self.work(piece, buf)
                with self._ready:
                    self._done[seq] = chunk
                    self._ready.notify_all()
        except BaseException as e:  # Raised in the main thread.
            self._fail(e)
        finally:
            ended.set()


def _with_kept(pieces: Iterable[_Piece], layout: KdumpLayout) -> list[_Work]:
    """The pieces with a page the file keeps: only those go to the workers (a
    filtered dump leaves most chunks out whole); the others' bytes are counted
    with the next one's, or with an empty piece at the end."""
    work: list[_Work] = []
    skipped = 0
    for gpa, length, hva in pieces:
        if layout.dumpable.any_set(gpa // layout.page, length // layout.page):
            work.append(((gpa, length, hva), skipped + length))
            skipped = 0
        else:
            skipped += length
    if skipped:
        work.append(((0, 0, None), skipped))
    return work


def pieces(blocks: Sequence[Block], spans: Sequence[Sequence[Span]],
            pagemap: Populated) -> Iterator[_Piece]:
    """The blocks in chunks, read as the ELF path reads them (:func:`extents`)."""
    for block, parts in zip(blocks, spans, strict=True):
        for offset, length, source in extents(block, parts, pagemap):
            for done in range(0, length, CHUNK):
                yield (block.gpa + offset + done, min(CHUNK, length - done),
                       source.at(done) if source else None)


@dataclass(frozen=True)
class Found:
    """A VMCOREINFO page found in guest memory: where, and its text."""

    gpa: int
    text: bytes


@dataclass
class Made:
    """A kdump file written: its size, what went in, and what the report says."""

    size: int
    stats: KdumpStats
    vmcoreinfo: VmcoreinfoResult
    compression: str
    dump_level: int
    warnings: list[str] = field(default_factory=list)

    def report(self) -> dict[str, object]:
        s = self.stats
        return {"compression": self.compression, "dump_level": self.dump_level,
                "ram_pages": s.ram_pages, "kept_pages": s.stored_pages + s.zero_pages,
                "stored_pages": s.stored_pages, "zero_pages": s.zero_pages,
                "excluded_pages": s.excluded,
                "bytes_before_compression": s.data_bytes,
                "bytes_after_compression": s.compressed_bytes}


def write_kdump(out: Output, arch: Arch, cpu: CpuNotes, blocks: Sequence[Block],
                spans: Sequence[Sequence[Span]], memory: MemorySource, pagemap: Populated,
                compression: str, dump_level: int, provenance: Note,
                on_written: Callable[[int], None] | None = None,
                workers: int = WORKERS, hint: Found | None = None, budget: int = 0) -> Made:
    """:func:`stage_kdump`, then its finish: all of it while the VM is held."""
    return stage_kdump(out, arch, cpu, blocks, spans, memory, pagemap, compression,
                       dump_level, provenance, on_written, workers, hint, budget).finish()


def staging_budget() -> int:
    """Bytes of pages that may wait uncompressed in memory until the guest runs
    again: a quarter of what the host has available."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except (OSError, ValueError, IndexError):
        pass
    return 0


def stage_kdump(out: Output, arch: Arch, cpu: CpuNotes, blocks: Sequence[Block],
                spans: Sequence[Sequence[Span]], memory: MemorySource, pagemap: Populated,
                compression: str, dump_level: int, provenance: Note,
                on_written: Callable[[int], None] | None = None,
                workers: int = WORKERS, hint: Found | None = None,
                budget: int = 0) -> "PendingKdump":
    """Read the guest memory of a kdump file into ``out`` (flattened into a pipe);
    its :meth:`~PendingKdump.finish` compresses what waits and writes the rest.

    ``spans[i]``: block ``i``'s parts by QEMU's mappings, which say, with
    ``pagemap``, where its pages are read and which hold nothing (as for an
    ELF vmcore: see :func:`~livedump.transfer.copier.extents`).

    Called while the VM is held: VMCOREINFO is looked for in the memory read,
    as for an ELF vmcore, then checked against guest memory, and with it the
    guest's utsname read, so the headers written last describe this memory.
    Levels that read the struct page array need VMCOREINFO first: QEMU's, or
    ``hint`` (found before the hold) once confirmed, or else a search now.
    Up to ``budget`` bytes of pages wait uncompressed for ``finish``, which
    may run once the guest runs again: compression is then out of its pause.
    """
    search = Search(arch, cpu, to_stdout=False)  # Flattened: the headers may come last.
    s64 = ElfStructs(64, True)
    notes = (cpu.data if isinstance(cpu, QemuNotes) else b"") + provenance.encode(s64)
    layout = KdumpLayout(arch, blocks, PAGE, note_room=len(notes) + search.room)
    read_at = guest_reader(memory, blocks, spans, pagemap)
    decision = page_decision(arch, cpu, notes, memory, blocks, spans, pagemap, layout.ram,
                             dump_level, hint)
    ram_pages = layout.ram.count()
    if decision.end_pfn is not None and decision.end_pfn < layout.max_mapnr:
        # As makedumpfile: the file ends with the kernel's memory.
        blocks, spans = _clip(blocks, spans, decision.end_pfn * PAGE)
        layout = KdumpLayout(arch, blocks, PAGE, note_room=len(notes) + search.room)
    beyond = ram_pages - layout.ram.count()
    layout.exclude_bits(decision.bits)
    flat = FlatSink(out.write) if out.is_stdout else None
    sink: Sink = flat or out
    staged = copy_kdump(layout, spans, memory, pagemap, sink, compression, dump_level,
                        None if search.result else search.look, on_written, workers, budget)
    result, text = search.validate(read_at)
    if text is not None:
        notes += Note(NAME, NT_VMCOREINFO, text).encode(s64)
    info = find_note(notes, NAME)
    entries = _entries(notes[info[0]:info[0] + info[1]] if info else b"")
    uts = guest_utsname(entries, arch, read_at)
    # "%ld": negative where KASLR put the kernel below its link address.
    phys_base = int(entries.get("NUMBER(phys_base)", "0"), 0) & (1 << 64) - 1 if entries else 0
    headers = [*layout.bitmaps(), *layout.headers(
        notes=notes, vmcoreinfo=info, uts=uts, compression=compression,
        dump_level=dump_level, phys_base=phys_base, nr_cpus=count_prstatus(notes))]
    warnings = []
    if decision.undecided:
        warnings.append(f"dump level {dump_level}: only zero pages could be told apart, "
                        f"so page cache, user and free pages were kept: {decision.undecided}")
    excluded = decision.counts() | ({"beyond_kernel_memory": beyond} if beyond else {})

    def finish() -> Made:
        stats = staged.finish()
        stats.ram_pages, stats.excluded = ram_pages, excluded
        for offset, data in headers:
            sink.write_at(offset, data)
        if flat:
            flat.end()
        else:
            out.extend(stats.end)
        return Made(stats.end, stats, result, compression, dump_level, warnings)
    return PendingKdump(finish)


@dataclass
class PendingKdump:
    """Guest memory read for a kdump file: ``finish()`` writes the file."""

    finish: Callable[[], Made]


def page_decision(arch: Arch, cpu: CpuNotes, notes: bytes, memory: MemorySource,
                  blocks: Sequence[Block], spans: Sequence[Sequence[Span]],
                  pagemap: Populated, ram: Bitmap, dump_level: int,
                  hint: Found | None) -> Decision:
    """The pages ``dump_level`` leaves out, decided while the VM is held, with
    VMCOREINFO from QEMU's ``notes`` (64-bit), else ``hint`` once confirmed, else
    (where the level needs it) looked for now."""
    read_at = guest_reader(memory, blocks, spans, pagemap)
    qemus = find_note(notes, NAME)
    known = _entries(notes[qemus[0]:qemus[0] + qemus[1]]) if qemus else None
    if known is None and hint is not None and read_at(hint.gpa, len(hint.text)) == hint.text:
        known = _entries(hint.text)
    if known is None and dump_level & STRUCT_PAGE_LEVELS:
        found = find_vmcoreinfo(arch, cpu, memory, blocks, spans, pagemap)
        known = _entries(found.text) if found else None
    return decide(known, arch, read_at, ram, ram.size, dump_level)


def _clip(blocks: Sequence[Block], spans: Sequence[Sequence[Span]],
          end: int) -> tuple[list[Block], list[list[Span]]]:
    """The blocks (and their spans) below guest-physical ``end``."""
    kept: list[Block] = []
    kept_spans: list[list[Span]] = []
    for b, parts in zip(blocks, spans, strict=True):
        if b.gpa < end:
            size = min(b.size, end - b.gpa)
            kept.append(Block(b.gpa, size, b.hva))
            kept_spans.append([dataclasses.replace(s, end=min(s.end, size))
                               for s in parts if s.start < size])
    return kept, kept_spans


def _entries(text: bytes) -> dict[str, str] | None:
    try:
        return parse(text.rstrip(b"\0")) if text else None
    except Invalid:
        return None


def guest_reader(memory: MemorySource, blocks: Sequence[Block], spans: Sequence[Sequence[Span]],
                 pagemap: Populated) -> ReadPhys:
    """Reads of guest-physical memory (None outside its RAM), as the copy reads
    it (:func:`~livedump.transfer.copier.extents`): pages that hold nothing
    are zeros, none is created."""
    def read_at(gpa: int, n: int) -> bytes | None:
        for b, parts in zip(blocks, spans, strict=True):
            if b.gpa <= gpa and gpa + n <= b.end:
                offset = gpa - b.gpa
                start = offset - offset % PAGE_SIZE
                end = min(b.size, -(-(offset + n) // PAGE_SIZE) * PAGE_SIZE)
                if n == 0:
                    return b""
                runs = list(extents(b, parts, pagemap, start, end))
                first, skip = runs[0][2], offset - start
                if len(runs) == 1 and first is not None:  # most reads: one run of data
                    return bytes(first.read(memory, Buffer(end - start), end - start)
                                 [skip:skip + n])
                data = memoryview(bytearray(end - start))
                for at, length, source in runs:
                    if source is not None:
                        data[at - start:at - start + length] = source.read(
                            memory, Buffer(length), length)
                return bytes(data[skip:skip + n])
        return None
    return read_at


def guest_utsname(entries: dict[str, str] | None, arch: Arch, read_at: ReadPhys) -> Utsname:
    """The running kernel's ``init_uts_ns.name``, where VMCOREINFO locates it; else
    what VMCOREINFO says (its release), the rest left empty."""
    if not entries:
        return Utsname()
    try:
        va = int(entries["SYMBOL(init_uts_ns)"], 16)
        pa = kernel_phys(entries, arch, va)
        name = int(entries.get("OFFSET(uts_namespace.name)", "x"))
    except (KeyError, ValueError, Invalid):
        pa = None
    raw = read_at(pa + name, Utsname.SIZE) if pa is not None else None
    if raw is None:
        return Utsname(release=entries["OSRELEASE"].encode())
    return Utsname.unpack(raw)


def find_vmcoreinfo(arch: Arch, cpu: CpuNotes, memory: MemorySource, blocks: Sequence[Block],
                    spans: Sequence[Sequence[Span]], pagemap: Populated) -> Found | None:
    """VMCOREINFO, looked for through all of guest memory as the copy would (pages
    that hold nothing not read), and checked as it is; None where none (or more
    than one) passes."""
    search = Search(arch, cpu, to_stdout=False)
    buf = Buffer(CHUNK)
    for gpa, n, source in pieces(blocks, spans, pagemap):
        if source is not None:
            search.look(gpa, bytes(source.read(memory, buf, n)), n)
    result, text = search.validate(guest_reader(memory, blocks, spans, pagemap))
    return Found(result.gpa, text) if text is not None and result.gpa is not None else None
