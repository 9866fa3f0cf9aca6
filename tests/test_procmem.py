"""Mappings and memory reads, on this test process's own address space."""

import ctypes
import mmap
import os

import pytest

from livedump.errors import DumpIOError, GuestMemoryError
from livedump.transfer import memory
from livedump.transfer.memory import (
    ABSENT,
    DATA,
    ZERO,
    BackingFiles,
    Buffer,
    PageMap,
    ProcessMemory,
    check_blocks,
    check_ram,
    file_extents,
    read_maps,
    zero_frames,
)
from livedump.vmcore.blocks import Block

PAGE = mmap.PAGESIZE


@pytest.fixture
def region():
    """Three pages: readable, unmapped, readable."""
    m = mmap.mmap(-1, 3 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m[:PAGE] = b"A" * PAGE
    m[2 * PAGE :] = b"C" * PAGE
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.munmap(ctypes.c_void_p(addr + PAGE), PAGE) == 0
    yield addr


def test_readable_block_passes(region):
    check_blocks([Block(0, PAGE, region), Block(PAGE, PAGE, region + 2 * PAGE)],
                 read_maps(os.getpid()))


def test_block_over_a_hole_fails(region):
    hole = f"not mapped readable in QEMU at {region + PAGE:#x}"
    with pytest.raises(GuestMemoryError, match=hole):
        check_blocks([Block(0x1000, 3 * PAGE, region)], read_maps(os.getpid()))


def test_block_outside_any_mapping_fails():
    with pytest.raises(GuestMemoryError, match="guest RAM at 0x5000"):
        check_blocks([Block(0x5000, PAGE, 0x10)], read_maps(os.getpid()))


def test_reads_bytes_and_reports_unreadable(region):
    with ProcessMemory(os.getpid()) as mem:
        buf = Buffer(2 * PAGE)
        assert bytes(mem.read(buf, PAGE, region + 2 * PAGE)) == b"C" * PAGE
        with pytest.raises(DumpIOError, match=f"reading QEMU memory at {region + PAGE:#x}"):
            mem.read(buf, PAGE, region + PAGE)


def test_fallback_to_proc_pid_mem_reads_the_same(region):
    with ProcessMemory(os.getpid()) as mem:
        mem._use_syscall = False  # As when seccomp forbids process_vm_readv.
        assert bytes(mem.read(Buffer(PAGE), PAGE, region)) == b"A" * PAGE


def test_private_anonymous_blocks_are_told_apart(tmp_path, region):
    backing = tmp_path / "ram"
    backing.write_bytes(b"\0" * PAGE)
    with open(backing, "r+b") as f:
        shared = mmap.mmap(f.fileno(), PAGE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(shared))
        got = [all(m.private_anonymous for m in covering) for covering in check_blocks(
            [Block(0, PAGE, region), Block(PAGE, PAGE, addr)], read_maps(os.getpid()))]
        shared.close()
    assert got == [True, False]


def test_pagemap_extents_follow_touched_pages():
    n = 40
    m = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    touched = {0, 1, 2, 7, 20, 21, 39}
    for i in touched:
        m[i * PAGE] = 1
    expected, i = [], 0
    while i < n:
        j = i
        while j < n and (j in touched) == (i in touched):
            j += 1
        expected.append((i * PAGE, (j - i) * PAGE, i in touched))
        i = j
    with PageMap(os.getpid()) as pagemap:
        pagemap.WINDOW = 16  # Runs must join across look-up windows.
        assert list(pagemap.extents(addr, n * PAGE)) == expected


def _runs(pagemap, addr, size):
    return [(offset // PAGE, length // PAGE, kind)
            for offset, length, kind in pagemap.extents(addr, size)]


needs_frames = pytest.mark.skipif(not zero_frames(), reason="page frames need CAP_SYS_ADMIN")


@needs_frames
def test_pages_only_read_are_the_zero_page_and_written_ones_data():
    # Read as QEMU's own dump reads: the kernel maps its zero page, which holds
    # nothing to read; pages written, even with zeros, and pages never touched
    # are told apart from it.
    n = 40
    m = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    for i in range(10, 30):
        m[i * PAGE]
    m[12 * PAGE] = 1
    m[20 * PAGE] = 0
    with PageMap(os.getpid()) as pagemap:
        pagemap.WINDOW = 16  # Runs must join across look-up windows.
        assert _runs(pagemap, addr, n * PAGE) == [
            (0, 10, ABSENT), (10, 2, ZERO), (12, 1, DATA), (13, 7, ZERO), (20, 1, DATA),
            (21, 9, ZERO), (30, 10, ABSENT)]
        pagemap.WINDOW = 4  # Windows of the zero page alone, then of it and data.
        assert _runs(pagemap, addr + 13 * PAGE, 8 * PAGE) == [(0, 7, ZERO), (7, 1, DATA)]


@needs_frames
def test_the_huge_zero_page_is_the_zero_page_too():
    huge = next((count for _, count in zero_frames()[1:]), None)
    if huge is None:
        pytest.skip("no transparent huge zero page here")
    size = 3 * huge * PAGE
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    at = -base % (huge * PAGE)  # the first huge-page-aligned address
    m.madvise(mmap.MADV_HUGEPAGE)
    m[at]
    m[at + huge * PAGE + 5 * PAGE] = 1  # a huge page of data, or small ones
    with PageMap(os.getpid()) as pagemap:
        runs = _runs(pagemap, base + at, 2 * huge * PAGE)
    assert runs[0] == (0, huge, ZERO)
    assert any(o <= huge + 5 < o + n for o, n, kind in runs if kind == DATA)
    with PageMap(os.getpid()) as pagemap:  # A window of the huge zero page alone.
        assert _runs(pagemap, base + at, huge * PAGE) == [(0, huge, ZERO)]
        pagemap.WINDOW = huge // 4  # Windows of parts of it, not aligned to it.
        assert _runs(pagemap, base + at + 8 * PAGE, (huge - 8) * PAGE) == [(0, huge - 8, ZERO)]


def _huge_pages_free():
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("HugePages_Free:")).split()[1])


@pytest.mark.skipif(_huge_pages_free() != 0, reason="needs an empty huge page pool")
def test_a_read_the_huge_page_pool_cannot_serve_says_so():
    # Hugetlb memory without reservation, as QEMU's reserve=off maps it, on an
    # empty pool: a read through the mapping fails with EFAULT, which must
    # not come out as a bare host address.
    try:
        fd = os.memfd_create("ram", os.MFD_HUGETLB)
    except OSError:
        pytest.skip("no hugetlb memfd here")
    try:
        os.ftruncate(fd, 2 << 20)
        m = mmap.mmap(fd, 2 << 20, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_NORESERVE", 0x4000))
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        block = Block(0x4000_0000, 2 << 20, addr, "ram0")
        with ProcessMemory(os.getpid()) as mem, pytest.raises(DumpIOError) as failed:
            mem.read(Buffer(PAGE), PAGE, addr + PAGE, block)
        path = next(m.path for m in read_maps(os.getpid()) if m.start == addr)  # /memfd:ram...
        assert str(failed.value) == (
            f"reading guest memory at 0x40001000 in 'ram0' (QEMU's {addr + PAGE:#x}): "
            f"no huge page left in the host's pool (EFAULT, {path})")
    finally:
        os.close(fd)


def test_the_data_of_a_sparse_file_is_found_without_reading_it(tmp_path):
    fd = os.memfd_create("ram")
    try:
        os.ftruncate(fd, 64 * PAGE)
        os.pwrite(fd, b"x", 5 * PAGE + 7)
        os.pwrite(fd, b"y" * 3 * PAGE, 40 * PAGE)
        assert list(file_extents(fd, 2 * PAGE, 60 * PAGE)) == [
            (2 * PAGE, 5 * PAGE, False), (5 * PAGE, 6 * PAGE, True), (6 * PAGE, 40 * PAGE, False),
            (40 * PAGE, 43 * PAGE, True), (43 * PAGE, 60 * PAGE, False)]
        assert list(file_extents(fd, 50 * PAGE, 64 * PAGE)) == [(50 * PAGE, 64 * PAGE, False)]
    finally:
        os.close(fd)


def test_shared_memory_is_read_through_its_file(tmp_path):
    # memfd memory, as QEMU's memory-backend-memfd maps it: its file is found
    # through map_files (root) or the descriptor on it, at the right offset.
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 16 * PAGE)
    m = mmap.mmap(fd, 8 * PAGE, offset=8 * PAGE)
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        block = Block(0, 8 * PAGE, addr)
        with BackingFiles(os.getpid()) as files:
            [span] = files.spans(block, check_blocks([block], read_maps(os.getpid()))[0])
            assert (span.start, span.end, span.private, span.file_offset) == (0, 8 * PAGE,
                                                                           False, 8 * PAGE)
            assert span.file is not None
            os.pwrite(fd, b"seen", 9 * PAGE)
            assert os.pread(span.file, 4, 9 * PAGE) == b"seen"
    finally:
        del addr
        m.close()
        os.close(fd)


def test_without_map_files_the_descriptor_qemu_holds_serves(monkeypatch):
    # Without CAP_SYS_ADMIN map_files is closed: the memfd is found among the
    # process's descriptors by its device and inode, as maps shows them.
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 4 * PAGE)
    os.pwrite(fd, b"seen", PAGE)
    m = mmap.mmap(fd, 4 * PAGE)
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        block = Block(0, 4 * PAGE, addr)
        monkeypatch.setattr(memory.proc, "path", lambda pid, name: (
            "/nonexistent" if name.startswith("map_files/") else f"/proc/{pid}/{name}"))
        with BackingFiles(os.getpid()) as files:
            [span] = files.spans(block, check_blocks([block], read_maps(os.getpid()))[0])
            assert span.file is not None and span.file != fd
            assert os.pread(span.file, 4, PAGE) == b"seen"
    finally:
        del addr
        m.close()
        os.close(fd)


def test_ram_in_an_anonymous_mapping_passes(region):
    check_ram("'pc.ram'", region, region + PAGE, read_maps(os.getpid()))


def test_ram_in_the_heap_or_a_program_is_refused():
    maps = read_maps(os.getpid())
    heap = next(m for m in maps if m.path == "[heap]")
    with pytest.raises(GuestMemoryError, match=r"^QEMU's RAM block 'pc.ram' would be at "
                                               rf"{heap.start:#x}, in \[heap\]: not guest RAM$"):
        check_ram("'pc.ram'", heap.start, heap.start + PAGE, maps)
    # The program's writable data too: its file is mapped executable elsewhere.
    exe = os.path.realpath(f"/proc/{os.getpid()}/exe")
    data = next(m for m in maps if m.path == exe and "w" in m.perms)
    with pytest.raises(GuestMemoryError, match="not guest RAM$"):
        check_ram("'pc.ram'", data.start, data.start + PAGE, maps)


def test_ram_over_a_hole_is_refused(region):
    with pytest.raises(GuestMemoryError, match=f"is not mapped readable in QEMU at "
                                               f"{region + PAGE:#x}$"):
        check_ram("'pc.ram'", region, region + 3 * PAGE, read_maps(os.getpid()))
