"""Mappings and memory reads, on this test process's own address space."""

import ctypes
import mmap
import os

import pytest

from livedump.coalesce import Block
from livedump.errors import DumpIOError, GuestMemoryError
from livedump.procmem import ProcessMemory, check_blocks, read_maps

PAGE = mmap.PAGESIZE


@pytest.fixture
def region():
    """Three pages: readable, unmapped, readable."""
    m = mmap.mmap(-1, 3 * PAGE)
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
    with pytest.raises(GuestMemoryError, match=f"not mapped readable in QEMU at {region + PAGE:#x}"):
        check_blocks([Block(0x1000, 3 * PAGE, region)], read_maps(os.getpid()))


def test_block_outside_any_mapping_fails():
    with pytest.raises(GuestMemoryError, match="guest RAM at 0x5000"):
        check_blocks([Block(0x5000, PAGE, 0x10)], read_maps(os.getpid()))


def test_reads_bytes_and_reports_unreadable(region):
    with ProcessMemory(os.getpid()) as mem:
        buf = memoryview(bytearray(PAGE))
        mem.read_into(buf, region + 2 * PAGE)
        assert bytes(buf) == b"C" * PAGE
        with pytest.raises(DumpIOError, match="reading QEMU memory at"):
            mem.read_into(buf, region + PAGE)
