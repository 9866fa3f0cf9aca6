"""The copy into the vmcore, from this test process's own memory into a real file."""

import ctypes
import mmap
import os
import threading
import time

import pytest

from livedump.errors import DumpIOError
from livedump.transfer import copier
from livedump.transfer.copier import CHUNK, HOLE_GRANULE, READERS, Writer, copy
from livedump.transfer.memory import (
    BackingFiles,
    PageMap,
    ProcessMemory,
    Span,
    check_blocks,
    read_maps,
)
from livedump.transfer.output import Output
from livedump.vmcore.arch import lookup
from livedump.vmcore.blocks import Block
from livedump.vmcore.elf import CoreLayout

MiB = 1 << 20


def _address(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def _spans(blocks, private):
    """Each block in one mapping: private anonymous, or read in full through memory."""
    return [[Span(0, b.size, p)] for b, p in zip(blocks, private, strict=True)]


def _dump(tmp_path, blocks, private):
    path = tmp_path / "out.vmcore"
    layout = CoreLayout(lookup("x86_64"), blocks, [])
    pid = os.getpid()
    with Output(str(path)) as out, ProcessMemory(pid) as memory, PageMap(pid) as pagemap:
        with Writer(out) as writer:
            read = copy(layout, _spans(blocks, private), memory, pagemap, writer)
            writer.finish()
        out.commit()
    return path, layout, read


def test_chunks_read_side_by_side_land_in_order_and_zeros_become_holes(tmp_path):
    # More chunks than readers and buffers, each with its own contents, and
    # every other chunk zero; a block that is not a whole number of chunks.
    chunks = 4 * READERS + 3
    m = mmap.mmap(-1, chunks * CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(0, chunks, 2):
        m[i * CHUNK:(i + 1) * CHUNK] = bytes([i + 1]) * CHUNK
    size = chunks * CHUNK - 4096
    blocks = [Block(0, size, _address(m)), Block(1 << 32, CHUNK, _address(m))]
    path, layout, read = _dump(tmp_path, blocks, [False, False])
    data = path.read_bytes()
    assert data[:len(layout.header)] == layout.header
    assert data[layout.offsets[0]:layout.offsets[0] + size] == m[:size]
    assert data[layout.offsets[1]:] == m[:CHUNK]
    assert read == size + CHUNK
    written = (chunks + 1) // 2 + 1  # the non-zero chunks, and the header's page
    assert os.stat(path).st_blocks * 512 <= (written + 1) * CHUNK


def test_pages_never_populated_are_not_read(tmp_path):
    m = mmap.mmap(-1, 8 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m[3 * MiB:3 * MiB + 5] = b"hello"
    path, layout, read = _dump(tmp_path, [Block(0, 8 * MiB, _address(m))], [True])
    assert read == mmap.PAGESIZE
    assert path.read_bytes()[layout.offsets[0]:] == m[:]


def test_shared_memory_is_copied_without_creating_its_holes(tmp_path):
    # A sparse memfd mapped shared, as memory-backend-memfd: pages the mapping
    # has (written through it), pages only its file has (written through the
    # descriptor), and holes. The copy has them all, the file gains no page
    # and the mapping maps no new one.
    size = 4 * CHUNK
    fd = os.memfd_create("ram")
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size)
    try:
        m[5:10] = b"ours!"
        m[3 * CHUNK - 4096:3 * CHUNK + 4096] = b"z" * 8192
        os.pwrite(fd, b"theirs", CHUNK + 123)  # not mapped here: a reader of the file's
        allocated = os.fstat(fd).st_blocks
        block = Block(0, size, _address(m))
        layout = CoreLayout(lookup("x86_64"), [block], [])
        path = tmp_path / "out.vmcore"
        pid = os.getpid()
        with Output(str(path)) as out, ProcessMemory(pid) as memory, PageMap(pid) as pagemap, \
                BackingFiles(pid) as files:
            spans = [files.spans(block, check_blocks([block], read_maps(pid))[0])]
            assert spans[0][0].file is not None
            with Writer(out) as writer:
                read = copy(layout, spans, memory, pagemap, writer)
                writer.finish()
            out.commit()
        assert read == 4 * 4096 and os.fstat(fd).st_blocks == allocated
        with PageMap(pid) as pagemap:  # Just the three pages written through m.
            present = sum(n for _, n, kind in pagemap.extents(block.hva, size) if kind)
        assert present == 3 * 4096
        # (Compared with the file's read, which creates nothing either.)
        assert path.read_bytes()[layout.offsets[0]:] == os.pread(fd, size, 0)
        assert b"theirs" in path.read_bytes()
    finally:
        m.close()
        os.close(fd)


def test_a_failed_read_fails_the_copy_and_leaves_no_file(tmp_path):
    m = mmap.mmap(-1, 4 * CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.write(b"x" * len(m))
    libc = ctypes.CDLL(None, use_errno=True)
    # Unreadable, not unmapped: a mapping made meanwhile (a read buffer) could land there.
    assert libc.mprotect(ctypes.c_void_p(_address(m) + 2 * CHUNK), CHUNK, 0) == 0  # PROT_NONE
    # The guest's address and region first, then QEMU's, and why.
    with pytest.raises(DumpIOError, match=rf"reading guest memory at {2 * CHUNK:#x} in 'ram' "
                       rf"\(QEMU's {_address(m) + 2 * CHUNK:#x}\): QEMU made it unreadable"):
        _dump(tmp_path, [Block(0, 4 * CHUNK, _address(m), "ram")], [False])
    assert os.listdir(tmp_path) == []


def test_zeros_around_islands_of_data_become_holes_page_by_page(tmp_path):
    # Data at the start, the middle and the end of one chunk, across a page and
    # a chunk boundary, and two pages apart in one granule: the pages from the
    # first to the last holding a byte of an island are written, and no other.
    page = mmap.PAGESIZE
    m = mmap.mmap(-1, 2 * CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    islands = [0, 5 * HOLE_GRANULE + 17, 9 * HOLE_GRANULE - 2, CHUNK - 1,
               CHUNK + 3 * HOLE_GRANULE, CHUNK + 3 * HOLE_GRANULE + 2 * page]
    for at in islands:
        m[at:at + 3] = b"abc"
    first = CHUNK // page + 3 * HOLE_GRANULE // page
    # A page of zeros of its own: one never written would be the kernel's zero
    # page once the first copy has read it, and not read by the second.
    m[(first + 1) * page] = 0
    pages = {0, 5 * HOLE_GRANULE // page, 9 * HOLE_GRANULE // page - 1, 9 * HOLE_GRANULE // page,
             CHUNK // page - 1, CHUNK // page, first, first + 1, first + 2}  # first + 1: zeros
    path, layout, _ = _dump(tmp_path, [Block(0, 2 * CHUNK, _address(m))], [False])
    assert path.read_bytes()[layout.offsets[0]:] == m[:]
    allocated = os.stat(path).st_blocks * 512
    assert len(pages) * page <= allocated <= layout.data_offset + len(pages) * page
    # What the writer counts as written is exactly those pages.
    with Output(str(tmp_path / "again.vmcore")) as out, ProcessMemory(os.getpid()) as memory, \
            PageMap(os.getpid()) as pagemap:
        with Writer(out) as writer:
            copy(layout, _spans(layout.blocks, [False]), memory, pagemap, writer)
            writer.finish()
        assert writer.written == len(layout.header) + len(pages) * page


def test_into_a_pipe_chunks_keep_their_order_and_holes_are_zeros(capfdbinary):
    # Standard output, as "-": one writer thread, in order, behind the readers.
    chunks = 4 * READERS + 3
    m = mmap.mmap(-1, chunks * CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(0, chunks, 3):
        m[i * CHUNK + 5:i * CHUNK + 9] = bytes([i + 1]) * 4
    never = mmap.mmap(-1, 3 * CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    never[CHUNK:CHUNK + 1] = b"x"  # one page populated, the rest never
    blocks = [Block(0, chunks * CHUNK, _address(m)), Block(1 << 32, 3 * CHUNK, _address(never))]
    layout = CoreLayout(lookup("x86_64"), blocks, [])
    pid = os.getpid()
    with Output("-") as out, ProcessMemory(pid) as memory, PageMap(pid) as pagemap:
        with Writer(out) as writer:
            read = copy(layout, _spans(blocks, [False, True]), memory, pagemap, writer)
            writer.finish()
    data = capfdbinary.readouterr().out
    assert data == layout.header + m[:] + never[:]
    assert read == chunks * CHUNK + mmap.PAGESIZE


def test_into_a_stalled_pipe_the_copy_ends_once_the_last_byte_is_read():
    # The guest may run again once everything is read, however slow the pipe's
    # reader: here it reads nothing until the copy has returned. One reader,
    # whose two buffers both wait for the pipe when the holes come.
    m = mmap.mmap(-1, 2 * CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m[:] = b"\1" * len(m)
    never = mmap.mmap(-1, 4 * CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    layout = CoreLayout(lookup("x86_64"), [Block(0, 2 * CHUNK, _address(m)),
                                           Block(1 << 32, 4 * CHUNK, _address(never))], [])
    read_end, write_end = os.pipe()
    saved = os.dup(1)
    os.dup2(write_end, 1)
    os.close(write_end)
    received = []
    pid = os.getpid()
    try:
        with Output("-") as out, ProcessMemory(pid) as memory, PageMap(pid) as pagemap:
            with Writer(out) as writer:
                copied = threading.Event()
                drain = threading.Thread(target=lambda: (copied.wait(3), received.extend(
                    iter(lambda: os.read(read_end, 1 << 20), b""))))
                drain.start()
                started = time.monotonic()
                copy(layout, _spans(layout.blocks, [False, True]), memory, pagemap, writer,
                     readers=1)
                took = time.monotonic() - started
                copied.set()
                writer.finish()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        drain.join(10)
        os.close(read_end)
    assert took < 2  # not held up by the pipe, which nobody read for 3 s
    assert b"".join(received) == layout.header + m[:] + never[:]


def test_readers_that_cannot_get_a_buffer_fail_the_copy(tmp_path, monkeypatch):
    class NoMemory(copier.Buffer):
        def __init__(self, size: int) -> None:
            raise MemoryError("no buffer")

    monkeypatch.setattr(copier, "Buffer", NoMemory)
    m = mmap.mmap(-1, CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with pytest.raises(MemoryError, match="no buffer"):
        _dump(tmp_path, [Block(0, CHUNK, _address(m))], [False])
    assert os.listdir(tmp_path) == []
