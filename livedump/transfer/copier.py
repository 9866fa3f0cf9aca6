"""Copy guest memory into the vmcore: read and placed side by side.

Reader threads, one per CPU (up to four), take the chunks of guest memory
in file order, each into a buffer of its own. A reader finds the runs of
zeros in its chunk while the bytes are still in its cache, and puts the rest
at its offset in the file itself, so no chunk changes threads: on this
nested-virtualization machine each wake-up of another thread cost more than
a chunk's copy, and handing every chunk from reader to writer had halved the
rate. Into a pipe, where order matters, the chunks go through one writer
thread, in order, each reader keeping a second buffer to read into
meanwhile.

Pages that hold nothing are not read at all: those QEMU never populated
(private anonymous RAM), those mapped to the kernel's shared zero page
(read once, as by QEMU's own dump, never written), and the holes of the
file behind shared or file-backed RAM. Pages of that file QEMU has not
mapped are read from the file, not through QEMU: so a dump creates no
page, huge or not, and maps nothing new into QEMU. Zeros read (whole
chunks, or runs of pages in them) are not written; all of these become
holes in a file (zeros in a pipe). The guest may run again once
:func:`copy` returns: every byte has been read (and, into a file, written).
"""

import ctypes
import itertools
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from livedump import signals
from livedump.errors import DumpIOError
from livedump.transfer.memory import (
    ABSENT,
    DATA,
    PAGE_SIZE,
    Buffer,
    MemorySource,
    Populated,
    Span,
    file_extents,
    read_file,
)
from livedump.transfer.output import Output
from livedump.vmcore.blocks import Block
from livedump.vmcore.elf import CoreLayout
from livedump.vmcore.vmcoreinfo import Inspect

CHUNK = 1 << 20
# Zeros within a chunk of data are looked for in granules of this size, and
# the data found trimmed to whole pages: what idle guests populate is mostly
# zeros around small islands of data (8.1 MiB populated, 0.5 MiB of it not
# zero, in the bench's idle guest), and comparing page by page throughout
# would cost the readers 16 calls where one does.
HOLE_GRANULE = 64 << 10
READERS = max(1, min(4, os.cpu_count() or 1))
_STOP_TIMEOUT = 10.0
_WAIT_STEP = 0.1

_ZERO_CHUNK = Buffer(CHUNK)  # never written: every page of it is the kernel's zero page
_memcmp = ctypes.CDLL(None).memcmp
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_memcmp.restype = ctypes.c_int

OnWritten = Callable[[int], None]  # told the length of each part written



@dataclass(frozen=True)
class Source:
    """Where a piece of ``block`` at ``offset`` in it is read: QEMU's memory,
    or (``file`` not None) the file behind it at ``file_offset``."""

    block: Block
    offset: int
    file: int | None = None
    file_offset: int = 0

    def at(self, done: int) -> "Source":
        return Source(self.block, self.offset + done, self.file, self.file_offset + done)

    def read(self, memory: MemorySource, buf: Buffer, length: int) -> memoryview:
        """The first ``length`` bytes of the piece, read into ``buf``."""
        address = self.block.hva + self.offset
        if self.file is None:
            return memory.read(buf, length, address, self.block)
        return read_file(buf, length, self.file, self.file_offset, self.block, address)


# A chunk of the vmcore's memory, in file order: its file offset, its length,
# and where it is read from (None: a hole, nothing there).
_Piece = tuple[int, int, Source | None]
# The spans of a chunk that hold data, (start, end), in order; the rest is zeros.
_Extents = list[tuple[int, int]]


class Writer:
    """Where the readers' chunks go: straight to their offsets in a file; into
    a pipe, in order, by a writer thread. Its first error ends the copy."""

    def __init__(self, out: Output, progress: OnWritten | None = None) -> None:
        self.out = out
        self.progress = progress
        self.inspect: Inspect | None = None  # set before copy()
        self.written = 0  # bytes of data written; the rest of the file is holes
        self.ordered = out.is_stdout
        self.error: BaseException | None = None
        self._lock = threading.Lock()  # over the counts, progress and inspect
        # Pipe only: chunks read and waiting for their turn, by sequence number.
        self._ready = threading.Condition()
        self._pending: dict[int, tuple[int, Buffer | bytes | None, _Extents,
                                       queue.SimpleQueue[Buffer] | None]] = {}
        self._closed = False
        self._ended = threading.Event()  # the pipe's writer has ended (see _Readers)

    def place(self, seq: int, offset: int, data: Buffer | bytes | None, length: int,
              free: "queue.SimpleQueue[Buffer] | None" = None) -> None:
        """Write chunk number ``seq`` (bytes, a buffer just read, or None for a
        hole) at ``offset``; a buffer goes back into ``free`` once written."""
        if isinstance(data, Buffer):
            spans = _extents_of_data(data, length)
        else:
            spans = [] if data is None else [(0, length)]
        if not self.ordered:
            self._write(offset, data, length, spans)
            if isinstance(data, Buffer) and free is not None:
                free.put(data)
            return
        with self._ready:
            self._pending[seq] = (length, data, spans, free)
            self._ready.notify()

    def check(self) -> None:
        """Raise the first error met by a reader or the writer."""
        if self.error is not None:
            raise self.error

    def fail(self, error: BaseException) -> None:
        """Record the copy's first error (raised by :meth:`check`), and stop the writer."""
        with self._lock:
            if self.error is None:
                self.error = error
        with self._ready:
            self._ready.notify()

    def finish(self) -> None:
        """Wait until everything placed is written: in steps, for a pipe whose
        reader is slow or gone, so that signals are handled meanwhile."""
        if self.ordered:
            with self._ready:
                self._closed = True
                self._ready.notify()
            while not self._ended.wait(_WAIT_STEP):
                pass
        self.check()

    def _write(self, offset: int, data: Buffer | bytes | None, length: int,
               spans: _Extents) -> None:
        wrote, done = 0, 0  # bytes of data written; bytes of the chunk behind us
        for start, end in spans:
            assert data is not None  # A hole has no spans.
            part = data.view[start:end] if isinstance(data, Buffer) else data[start:end]
            if self.ordered:
                self.out.skip(start - done)
                self.out.write(part)
            else:
                self.out.write_at(offset + start, part)
            wrote, done = wrote + end - start, end
        if self.ordered:
            self.out.skip(length - done)
        with self._lock:
            self.written += wrote
            if wrote and self.inspect and isinstance(data, Buffer):
                self.inspect(offset, data.data, length)
            if self.progress:
                self.progress(length)

    def _run(self) -> None:
        """The pipe's writer: chunks in sequence, each buffer given back when written."""
        try:
            self._write_in_order()
        except BaseException as e:  # Raised in the main thread by check().
            self.fail(e)
        finally:
            self._ended.set()

    def _write_in_order(self) -> None:
        seq, offset = 0, 0
        while True:
            with self._ready:
                while seq not in self._pending and not (self._closed or self.error):
                    self._ready.wait()
                if seq not in self._pending:
                    return
                length, data, runs, free = self._pending.pop(seq)
            try:
                if self.error is None:
                    self._write(offset, data, length, runs)
            finally:
                if isinstance(data, Buffer) and free is not None:
                    free.put(data)  # Even after an error: its reader may be waiting.
            seq, offset = seq + 1, offset + length

    def __enter__(self) -> "Writer":
        if self.ordered:
            # Started with the terminating signals blocked, which it keeps for
            # life: they must reach the main thread, whose handlers end the dump.
            with signals.deferred():
                threading.Thread(target=self._run, name="livedump-writer", daemon=True).start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and self.ordered:
            # Stop after the write in progress. (One blocked on a pipe nobody
            # reads is abandoned with the process.)
            self.fail(DumpIOError("the dump is ending"))


class _Readers:
    """Threads that take the chunks in turn, read them and place them."""

    def __init__(self, memory: MemorySource, pieces: Iterator[_Piece], writer: Writer,
                 count: int = READERS) -> None:
        self.memory, self.writer = memory, writer
        self.read = 0  # bytes read
        self._pieces = pieces
        self._claim = threading.Lock()
        self._seq = itertools.count(1)  # 0 is the header
        self._all_claimed = False
        # Waited on rather than joined: a join cut short by a signal's exception
        # can leave a thread that still runs looking ended (CPython gh-90882),
        # and the file would be closed under its writes.
        self._ended = [threading.Event() for _ in range(count)]
        self._threads = [threading.Thread(target=self._run, args=(ended,),
                                          name=f"livedump-reader-{i}", daemon=True)
                         for i, ended in enumerate(self._ended)]

    def _run(self, ended: threading.Event) -> None:
        try:
            self._read()
        finally:
            ended.set()

    def _read(self) -> None:
        writer = self.writer
        try:
            free: queue.SimpleQueue[Buffer] = queue.SimpleQueue()
            for _ in range(2 if writer.ordered else 1):
                free.put(Buffer(CHUNK))
            while writer.error is None:
                # The chunk first, then a buffer: so a reader learns that none is
                # left without waiting on a slow pipe, and the guest runs again as
                # soon as the last byte is read. No deadlock: this reader's buffers
                # are held only for its earlier chunks, written before this one.
                with self._claim:
                    piece, seq = next(self._pieces, None), next(self._seq)
                    if piece is None:
                        self._all_claimed = True
                        return
                offset, length, source = piece
                if source is None:
                    writer.place(seq, offset, None, length)
                    continue
                buf = self._take(free)
                if buf is None:
                    return
                source.read(self.memory, buf, length)
                with self._claim:
                    self.read += length
                writer.place(seq, offset, buf, length, free)
        except BaseException as e:  # Raised in the main thread.
            writer.fail(e)

    def _take(self, free: "queue.SimpleQueue[Buffer]") -> Buffer | None:
        while self.writer.error is None:
            try:
                return free.get(timeout=_WAIT_STEP)
            except queue.Empty:
                pass
        return None

    def run(self) -> None:
        """Read every chunk; return once all are read, raising the first error."""
        with signals.deferred():  # Signals are for the main thread, as ever.
            for t in self._threads:
                t.start()
        try:
            for ended in self._ended:
                while not ended.wait(_WAIT_STEP):  # In steps: signals are handled meanwhile.
                    pass
        except BaseException as e:
            self.writer.fail(e)
            for ended in self._ended:
                ended.wait(_STOP_TIMEOUT)
            raise
        self.writer.check()
        if not self._all_claimed:  # Never silently short: every reader ended early.
            raise DumpIOError("the readers ended before every chunk of memory was read")


def _extents_of_data(buf: Buffer, length: int) -> _Extents:
    """The ``(start, end)`` spans of the first ``length`` bytes of ``buf`` that
    are not zeros: found :data:`HOLE_GRANULE` by granule, then trimmed to whole
    pages at each end, as idle memory is zeros around small islands of data.
    Compared with memcmp through ctypes: C speed, and other threads run meanwhile."""
    if _zero(buf, 0, length):
        return []
    spans: _Extents = []
    start: int | None = None
    for at in range(0, length, HOLE_GRANULE):
        if not _zero(buf, at, min(HOLE_GRANULE, length - at)):
            start = at if start is None else start
        elif start is not None:
            spans.append(_trimmed(buf, start, at))
            start = None
    if start is not None:
        spans.append(_trimmed(buf, start, length))
    return spans


def _trimmed(buf: Buffer, start: int, end: int) -> tuple[int, int]:
    """``[start, end)``, which holds data, less its leading and trailing zero pages."""
    while _zero(buf, start, min(PAGE_SIZE, end - start)):
        start += PAGE_SIZE
    last = start + (end - start - 1) // PAGE_SIZE * PAGE_SIZE  # the last page, maybe partial
    while _zero(buf, last, end - last):
        end, last = last, last - PAGE_SIZE
    return start, end


def _zero(buf: Buffer, at: int, length: int) -> bool:
    differs: int = _memcmp(buf.address + at, _ZERO_CHUNK.address, length)
    return differs == 0


def copy(layout: CoreLayout, spans: Sequence[Sequence[Span]], memory: MemorySource,
         pagemap: Populated, writer: Writer, readers: int = READERS) -> int:
    """Write the header and read every block with ``readers`` threads; return
    the bytes read once the last is read (and, into a file, written).

    ``spans[i]`` are block ``i``'s parts, each in one mapping of QEMU's
    (:meth:`BackingFiles.spans <livedump.transfer.memory.BackingFiles.spans>`):
    they say where pages the page map finds absent are.
    """
    writer.place(0, 0, layout.header, len(layout.header))
    copying = _Readers(memory, _pieces(layout, spans, pagemap), writer, readers)
    copying.run()
    if not writer.ordered:
        writer.out.extend(layout.size)  # a trailing hole, if the last chunk was one
    return copying.read


def _pieces(layout: CoreLayout, spans: Sequence[Sequence[Span]],
            pagemap: Populated) -> Iterator[_Piece]:
    for block, start, parts in zip(layout.blocks, layout.offsets, spans, strict=True):
        for offset, length, source in extents(block, parts, pagemap):
            if source is None:
                yield start + offset, length, None
                continue
            for done in range(0, length, CHUNK):
                yield start + offset + done, min(CHUNK, length - done), source.at(done)


def extents(block: Block, spans: Sequence[Span], pagemap: Populated, start: int = 0,
            end: int | None = None) -> Iterator[tuple[int, int, Source | None]]:
    """``(offset, length, source)`` runs of the block from offset ``start`` to
    ``end`` (host-page-aligned; its end by default), ``spans`` its parts
    (:meth:`BackingFiles.spans <livedump.transfer.memory.BackingFiles.spans>`):
    None where nothing is, so zeros never read (pages never populated, the zero
    page, holes in the file behind shared memory); else where to read them
    without creating a page."""
    end = block.size if end is None else end
    # The page map speaks in whole host pages; a block that is not made of
    # them (64 KiB host pages, say) is read in full, through QEMU.
    if (block.hva | block.size) % PAGE_SIZE:
        yield start, end - start, Source(block, start)
        return
    for span in spans:
        first, last = max(span.start, start), min(span.end, end)
        if first >= last:
            continue
        for offset, length, kind in pagemap.extents(block.hva + first, last - first):
            offset += first
            if kind == DATA or (kind == ABSENT and not span.private and span.file is None):
                yield offset, length, Source(block, offset)
            elif kind != ABSENT or span.private:
                yield offset, length, None  # the zero page, or never populated
            else:
                assert span.file is not None
                base = span.file_offset - span.start  # the file's offset of the block's start
                for at, stop, data in file_extents(span.file, base + offset,
                                                   base + offset + length):
                    yield (at - base, stop - at,
                           Source(block, at - base, span.file, at) if data else None)
