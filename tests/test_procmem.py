"""Mappings and memory reads, on this test process's own address space."""

import ctypes
import mmap
import os

import pytest

from livedump.errors import DumpIOError, GuestMemoryError
from livedump.transfer.memory import (
    Buffer,
    PageMap,
    ProcessMemory,
    check_blocks,
    check_ram,
    read_maps,
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
        got = check_blocks([Block(0, PAGE, region), Block(PAGE, PAGE, addr)],
                           read_maps(os.getpid()))
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
