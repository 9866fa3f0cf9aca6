"""Merge guest RAM ranges into the blocks that become PT_LOAD segments.

The rule is QEMU's own (``guest_phys_blocks_region_add`` in its
``memory_mapping.c``): a range extends the block before it only when it
starts where that block ends in guest-physical space, starts where it
ends in QEMU's address space, and belongs to the same memory region.
Following it exactly is what makes our PT_LOAD list equal QEMU's.
"""

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from livedump.errors import GuestMemoryError


@dataclass(frozen=True)
class GuestRange:
    """A run of guest RAM as the memory map lists it.

    ``region`` identifies the QEMU MemoryRegion the range belongs to (equal
    for all ranges of one region); ``name`` is that region's name, for messages.
    """

    gpa: int
    size: int
    hva: int
    region: Hashable
    name: str

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass(frozen=True)
class Block:
    """Guest RAM contiguous in guest-physical and host-virtual space: one PT_LOAD.

    ``name`` is its memory region's, for messages (not part of its identity).
    """

    gpa: int
    size: int
    hva: int
    name: str = field(default="", compare=False)

    @property
    def end(self) -> int:
        return self.gpa + self.size


def coalesce(ranges: Iterable[GuestRange]) -> list[Block]:
    """Merge ``ranges`` (sorted by guest address, not overlapping) into blocks."""
    blocks: list[Block] = []
    last: GuestRange | None = None
    for r in ranges:
        if r.size <= 0:
            continue
        if last is not None and r.gpa < last.end:
            raise GuestMemoryError(f"guest RAM ranges overlap or are out of order at {r.gpa:#x}")
        if blocks and last is not None and _extends(blocks[-1], last, r):
            b = blocks[-1]
            blocks[-1] = Block(b.gpa, b.size + r.size, b.hva, b.name)
        else:
            blocks.append(Block(r.gpa, r.size, r.hva, r.name))
        last = r
    return blocks


def _extends(block: Block, last: GuestRange, r: GuestRange) -> bool:
    return (
        block.end == r.gpa
        and block.hva + block.size == r.hva
        and last.region == r.region
    )


def without_pages(blocks: Sequence[Block], private: Sequence[bool], pfns: Iterable[int],
                  page: int, end: int | None = None) -> tuple[list[Block], list[bool]]:
    """``blocks`` less the pages ``pfns`` (of ``page`` bytes) and all memory from
    guest-physical ``end`` on, each piece keeping its block's private flag."""
    cuts = sorted(pfns)
    out: list[tuple[Block, bool]] = []
    at = 0
    for b, p in zip(blocks, private, strict=True):
        stop = b.end if end is None else min(b.end, end)
        start = b.gpa
        while at < len(cuts) and cuts[at] * page < b.gpa:
            at += 1
        while start < stop:
            cut = cuts[at] * page if at < len(cuts) else stop
            cut = min(cut, stop)
            if cut > start:
                out.append((Block(start, cut - start, b.hva + start - b.gpa, b.name), p))
            if cut >= stop:
                break
            start = max(start, cut + page)  # (a pfn given twice cuts once)
            at += 1
    return [b for b, _ in out], [p for _, p in out]
