"""Copy guest memory into the vmcore: read side by side, write in order.

Reader threads fill a few reused buffers from guest memory, as many at
once as there are CPUs (up to four): the first read of a guest page costs
the kernel more than the copy itself, and readers on every core share that
cost. A writer thread writes the chunks out in order, so reading and
writing overlap and the guest can be resumed as soon as the last byte is
read. Pages QEMU never populated (private anonymous RAM only) are not read
at all, and chunks that read as all zeros are not written: both become
holes in a file (zeros in a pipe).
"""

import collections
import ctypes
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

from .coalesce import Block
from .elfcore import CoreLayout
from .output import Output
from . import signals
from .errors import DumpIOError
from .procmem import PAGE_SIZE, Buffer, PageMap, ProcessMemory

CHUNK = 1 << 20
# Zeros within a chunk of data become holes down to this size: what idle guests
# populate is mostly zeros around small islands of data (8 MiB populated, 0.5 MiB
# of it not zero, in the bench's idle guest), and a smaller granule costs the
# writer more calls than it saves.
HOLE_GRANULE = 64 << 10
READERS = max(1, min(4, os.cpu_count() or 1))
BUFFERS = 2 * READERS + 2  # enough for every reader to have one ready while one is written
_ZERO_CHUNK = Buffer(CHUNK)  # never written: every page of it is the kernel's zero page
_memcmp = ctypes.CDLL(None).memcmp
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_memcmp.restype = ctypes.c_int
_STOP_TIMEOUT = 10.0
_WAIT_STEP = 0.1

OnWritten = Callable[[int], None]  # told the length of each part written
Chunk = bytes | mmap.mmap  # bytes that slice, find and compare at C speed
# Shown each part written that is not a hole: its file offset, and the first
# ``length`` bytes of a buffer. Runs in the writer thread, so it costs the
# guest no pause while reading is the bottleneck; it must be quick all the same.
Inspect = Callable[[int, Chunk, int], None]


class _Read:
    """A chunk of guest memory a reader thread is filling."""

    __slots__ = ("buf", "length", "address", "done", "error")

    def __init__(self, buf: Buffer, length: int, address: int) -> None:
        self.buf, self.length, self.address = buf, length, address
        self.done = threading.Event()
        self.error: BaseException | None = None

    def result(self, timeout: float | None = None) -> memoryview | None:
        """The bytes read (None if not yet read within ``timeout``); raises the reader's error."""
        if not self.done.wait(timeout):
            return None
        if self.error is not None:
            raise self.error
        return self.buf.view[: self.length]


class Readers:
    """Threads that read queued chunks of guest memory side by side."""

    def __init__(self, memory: ProcessMemory, count: int = READERS) -> None:
        self.memory = memory
        self._jobs: queue.SimpleQueue[_Read | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"livedump-reader-{i}",
                                          daemon=True) for i in range(count)]
        self._abandoned = False

    def read(self, buf: Buffer, length: int, address: int) -> _Read:
        """Start reading ``length`` bytes at ``address`` into ``buf``."""
        job = _Read(buf, length, address)
        self._jobs.put(job)
        return job

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self._abandoned:
                    raise DumpIOError("read abandoned: the dump is ending")
                self.memory.read(job.buf, job.length, job.address)
            except BaseException as e:  # Raised where the chunk is waited for.
                job.error = e
            job.done.set()

    def __enter__(self) -> "Readers":
        with signals.deferred():  # Kept for life, as by the writer.
            for t in self._threads:
                t.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # On failure the chunks still queued are not read, but still marked
        # done, so the writer waiting on them is not left hanging.
        self._abandoned = exc_type is not None
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()


# What the writer is handed: the bytes to write (None for a hole, a _Read
# for a chunk still being read), their length, and the buffer to give back
# once written.
_Item = tuple[bytes | memoryview | _Read | None, int, Buffer | None]


class Writer:
    """A thread that writes queued chunks in order; its first error is raised to the reader."""

    def __init__(self, out: Output, progress: OnWritten | None = None) -> None:
        self.out = out
        self.progress = progress
        self.free: queue.Queue[Buffer] = queue.Queue()
        for _ in range(BUFFERS):
            self.free.put(Buffer(CHUNK))
        self._pending: queue.Queue[_Item | None] = queue.Queue()
        self._error: BaseException | None = None
        self.written = 0  # bytes of data written; the rest of the file is holes
        self.inspect: Inspect | None = None  # set before the first put
        self._offset = 0
        self._thread = threading.Thread(target=self._run, name="livedump-writer", daemon=True)

    def put(self, data: bytes | memoryview | _Read | None, length: int,
            buf: Buffer | None = None) -> None:
        self.check()
        self._pending.put((data, length, buf))

    def take(self) -> Buffer:
        """A free buffer, once the writer has given one back.

        Waits in short steps: a signal that lands just before a blocking wait
        would otherwise go unseen until the wait ended, which for a writer
        stuck on a pipe nobody reads is never.
        """
        while True:
            try:
                return self.free.get(timeout=_WAIT_STEP)
            except queue.Empty:
                self.check()

    def check(self) -> None:
        """Raise the writer's error, if it has met one."""
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        """Wait until everything queued is written."""
        self._pending.put(None)
        self._thread.join()
        self.check()

    def _run(self) -> None:
        while (item := self._pending.get()) is not None:
            data, length, buf = item
            try:
                if self._error is None:
                    self._write(data, length, buf)
            except BaseException as e:  # Raised in the reader's thread by check().
                self._error = e
            if buf is not None:
                self.free.put(buf)

    def _write(self, data: bytes | memoryview | _Read | None, length: int,
               buf: Buffer | None) -> None:
        if isinstance(data, _Read):
            data = data.result()
        if data is None:
            self.out.skip(length)
        elif buf is None:
            self.out.write(data)
            self.written += length
        else:
            wrote = False
            for start, end, nonzero in _runs(buf, length):
                if nonzero:
                    self.out.write(buf.view[start:end])
                    self.written += end - start
                    wrote = True
                else:
                    self.out.skip(end - start)
            if wrote and self.inspect:
                self.inspect(self._offset, buf.data, length)
        self._offset += length
        if self.progress:
            self.progress(length)

    def __enter__(self) -> "Writer":
        # Started with the terminating signals blocked, which it keeps for life:
        # they must reach the main thread, whose handlers end the dump.
        with signals.deferred():
            self._thread.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and self._thread.is_alive() and not self.out.is_stdout:
            # Let a write in progress end before the file is closed. (A write
            # blocked on a pipe nobody reads is abandoned with the process.)
            self._pending.put(None)
            self._thread.join(_STOP_TIMEOUT)


def _runs(buf: Buffer, length: int) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, nonzero)`` runs of the first ``length`` bytes of ``buf``,
    told apart by :data:`HOLE_GRANULE`. Compared with memcmp through ctypes:
    C speed, and the readers run meanwhile."""
    if _memcmp(buf.address, _ZERO_CHUNK.address, length) == 0:
        yield 0, length, False
        return
    start, nonzero = 0, True
    for at in range(0, length, HOLE_GRANULE):
        here = _memcmp(buf.address + at, _ZERO_CHUNK.address, min(HOLE_GRANULE, length - at)) != 0
        if here != nonzero and at > start:
            yield start, at, nonzero
            start = at
        nonzero = here
    yield start, length, nonzero


def copy(layout: CoreLayout, private: Sequence[bool], memory: ProcessMemory,
         pagemap: PageMap, writer: Writer) -> int:
    """Queue the header and every block; return, with the bytes read, once the last is read.

    ``private[i]`` says block ``i`` is private anonymous memory, whose
    never-populated pages ``pagemap`` can tell apart.
    """
    writer.put(layout.header, len(layout.header))
    read = 0
    reading: collections.deque[_Read] = collections.deque()
    with Readers(memory) as readers:
        for block, is_private in zip(layout.blocks, private):
            for offset, length, populated in _extents(block, is_private, pagemap):
                if not populated:
                    writer.put(None, length)
                    continue
                for done in range(0, length, CHUNK):
                    n = min(CHUNK, length - done)
                    buf = writer.take()
                    reading.append(readers.read(buf, n, block.hva + offset + done))
                    writer.put(reading[-1], n, buf)
                    read += n
                    while reading and reading[0].done.is_set():
                        reading.popleft().result()
        # The guest may run again only once every byte is read.
        while reading:
            if reading[0].result(_WAIT_STEP) is None:
                writer.check()
            else:
                reading.popleft()
    return read


def _extents(block: Block, private: bool, pagemap: PageMap) -> Iterator[tuple[int, int, bool]]:
    # The page map speaks in whole host pages; a block that is not made of
    # them (64 KiB host pages, say) is read in full.
    if private and (block.hva | block.size) % PAGE_SIZE == 0:
        return pagemap.extents(block.hva, block.size)
    return iter([(0, block.size, True)])
