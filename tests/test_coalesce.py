"""QEMU's coalescing rule, case by case."""

import pytest

from livedump.errors import GuestMemoryError
from livedump.vmcore.blocks import Block, GuestRange, coalesce

A, B = ("pc.ram", 0x7F0000000000), ("pc.bios", 0x7F8000000000)


def r(gpa, size, hva, region=A):
    return GuestRange(gpa, size, hva, region, region[0])


def test_contiguous_in_both_spaces_and_same_region_merge():
    got = coalesce([r(0xC0000, 0xB000, 0x1000C0000), r(0xCB000, 0x3000, 0x1000CB000)])
    assert got == [Block(0xC0000, 0xE000, 0x1000C0000)]


def test_gap_in_guest_physical_space_splits():
    got = coalesce([r(0, 0xA0000, 0x100000000), r(0xC0000, 0x1000, 0x1000C0000)])
    assert len(got) == 2


def test_host_discontinuity_splits():
    got = coalesce([r(0, 0x1000, 0x100000000), r(0x1000, 0x1000, 0x200000000)])
    assert got == [Block(0, 0x1000, 0x100000000), Block(0x1000, 0x1000, 0x200000000)]


def test_other_region_splits_even_when_contiguous():
    got = coalesce([r(0xE0000, 0x20000, 0x100000000, B), r(0x100000, 0x1000, 0x100020000, A)])
    assert len(got) == 2


def test_empty_ranges_are_skipped():
    got = coalesce([r(0, 0x1000, 0x100000000), r(0x1000, 0, 0x100001000),
                    r(0x1000, 0x1000, 0x100001000)])
    assert got == [Block(0, 0x2000, 0x100000000)]


def test_overlap_is_refused():
    with pytest.raises(GuestMemoryError, match="overlap"):
        coalesce([r(0, 0x2000, 0x100000000), r(0x1000, 0x1000, 0x100001000)])
