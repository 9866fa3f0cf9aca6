"""Copy guest memory into the vmcore: read while the previous chunk is written.

The calling thread reads guest memory into a few reused buffers; a writer
thread writes them out, so reading and writing overlap and the guest can
be resumed as soon as the last byte is read. Pages QEMU never populated
(private anonymous RAM only) are not read at all, and chunks that read as
all zeros are not written: both become holes in a file (zeros in a pipe).
"""

import queue
import threading
from collections.abc import Callable, Iterator, Sequence

from .coalesce import Block
from .elfcore import CoreLayout
from .output import Output
from . import signals
from .procmem import PAGE_SIZE, Buffer, PageMap, ProcessMemory

CHUNK = 1 << 20
BUFFERS = 4
_ZERO_CHUNK = bytes(CHUNK)
_STOP_TIMEOUT = 10.0
_WAIT_STEP = 0.1

OnWritten = Callable[[int], None]  # told the length of each part written
# What the writer is handed: bytes to write (None for a hole), their length,
# and the buffer to give back once written.
_Item = tuple[bytes | memoryview | None, int, Buffer | None]


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
        self._thread = threading.Thread(target=self._run, name="livedump-writer", daemon=True)

    def put(self, data: bytes | memoryview | None, length: int, buf: Buffer | None = None) -> None:
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

    def _write(self, data: bytes | memoryview | None, length: int, buf: Buffer | None) -> None:
        if data is None or (buf is not None and _is_zero(buf, length)):
            self.out.skip(length)
        else:
            self.out.write(data)
            self.written += length
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


def _is_zero(buf: Buffer, length: int) -> bool:
    if length == CHUNK:
        return buf.data == _ZERO_CHUNK  # memcmp speed; a memoryview compare is not
    return bytes(buf.view[:length]) == _ZERO_CHUNK[:length]


def copy(layout: CoreLayout, private: Sequence[bool], memory: ProcessMemory,
         pagemap: PageMap, writer: Writer) -> int:
    """Queue the header and every block; return, with the bytes read, once the last is read.

    ``private[i]`` says block ``i`` is private anonymous memory, whose
    never-populated pages ``pagemap`` can tell apart.
    """
    writer.put(layout.header, len(layout.header))
    read = 0
    for block, is_private in zip(layout.blocks, private):
        for offset, length, populated in _extents(block, is_private, pagemap):
            if not populated:
                writer.put(None, length)
                continue
            for done in range(0, length, CHUNK):
                n = min(CHUNK, length - done)
                buf = writer.take()
                writer.put(memory.read(buf, n, block.hva + offset + done), n, buf)
                read += n
    return read


def _extents(block: Block, private: bool, pagemap: PageMap) -> Iterator[tuple[int, int, bool]]:
    # The page map speaks in whole host pages; a block that is not made of
    # them (64 KiB host pages, say) is read in full.
    if private and (block.hva | block.size) % PAGE_SIZE == 0:
        return pagemap.extents(block.hva, block.size)
    return iter([(0, block.size, True)])
