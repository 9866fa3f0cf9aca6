"""Locate guest RAM through the monitor, without QEMU's debug info.

``info mtree -f`` gives the flat view of the ``memory`` address space
(what the guest sees at each physical address); ``gpa2hva`` gives where
each RAM range lives in QEMU's own address space. Together they are the
same map QEMU's ``dump-guest-memory`` builds from its memory listener.
:func:`check_map` holds that map against QEMU's RAM blocks (``info
ramblock``) and mappings, so a wrong answer is refused, not dumped.
"""

import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from livedump.errors import GuestMemoryError, MonitorError
from livedump.qmp.monitor import Monitor, RamBlock, unexpected
from livedump.qmp.transport import excerpt
from livedump.transfer.memory import Mapping, check_ram
from livedump.vmcore.blocks import GuestRange

# "  0000000100000000-000000013fffffff (prio 0, ram): pc.ram @00000000c0000000 KVM"
# End addresses are inclusive; "@offset" (into the region) only when non-zero.
_RANGE = re.compile(
    r"^\s+(?P<first>[0-9a-f]+)-(?P<last>[0-9a-f]+)"
    r" \(prio -?\d+, (?P<type>[a-z/-]+)\): (?P<name>.*?)"
    r"(?: @(?P<offset>[0-9a-f]+))?(?: KVM)?$"
)
_GPA2HVA = re.compile(
    r"^Host virtual address for 0x(?P<gpa>[0-9a-f]+) \((?P<name>.*)\) is 0x(?P<hva>[0-9a-f]+)$"
)

# What dump-guest-memory keeps: RAM, read-only RAM included. Not ROM devices
# ("romd"), RAM devices such as passed-through BARs ("ramd"), non-volatile
# memory or MMIO ("i/o"). The flat view marks a range non-volatile ("nv-"
# prefix) if its region or an alias on the way to it is; QEMU's dump skips
# only non-volatile regions: an NVDIMM's memory backend, shown through the
# non-volatile alias "nvdimm-memory", is dumped.
_DUMPED_TYPES = {"ram", "rom"}
_NONVOLATILE = "nv-"


# A byte of RAM is at two guest addresses at most in QEMU's flat views: the
# PC BIOS's last 128 KiB is also at 0xe0000 (isa-bios) until the firmware
# shadows it. More would be a map that writes the same memory over and over.
MAX_ALIASES = 2


@dataclass(frozen=True)
class Region:
    """A memory region as the map shows it: its name, and where its start lies in QEMU."""

    name: str
    base: int


@dataclass(frozen=True, slots=True)
class FlatRange:
    """One line of the flat view."""

    gpa: int
    size: int
    type: str
    name: str
    offset: int
    volatile_region: bool = False  # non-volatile only through an alias

    @property
    def dumped(self) -> bool:
        if self.volatile_region and self.type.startswith(_NONVOLATILE):
            return self.type.removeprefix(_NONVOLATILE) in _DUMPED_TYPES
        return self.type in _DUMPED_TYPES


def parse_flatview(text: str, address_space: str = "memory") -> list[FlatRange]:
    """Return the ranges of ``address_space``'s flat view in ``info mtree -f`` output."""
    ranges: list[FlatRange] = []
    for section in _flatview_sections(text):
        if f' AS "{address_space}", ' not in section[0]:
            continue
        for line in section[1]:
            m = _RANGE.match(line)
            if not m:
                raise MonitorError(
                    f"unexpected line in 'info mtree -f': {excerpt(line.strip())}")
            first, last = int(m["first"], 16), int(m["last"], 16)
            if last < first or (ranges and first <= ranges[-1].gpa + ranges[-1].size - 1):
                raise MonitorError(
                    f"'info mtree -f' ranges out of order at {excerpt(line.strip())}")
            offset = int(m["offset"] or "0", 16)
            ranges.append(FlatRange(first, last - first + 1, m["type"], m["name"], offset))
        return ranges
    raise MonitorError(f"'info mtree -f' shows no flat view for address space {address_space!r}")


def _flatview_sections(text: str) -> Iterator[tuple[str, list[str]]]:
    """Yield (header lines, range lines) for each "FlatView #N" section."""
    header: list[str] = []
    body: list[str] | None = None
    for line in text.splitlines() + [""]:
        if line.startswith("FlatView #"):
            header, body = [], None
        elif not line.strip():
            if body is not None:
                yield "\n".join(header), body
            header, body = [], None
        elif body is not None:
            body.append(line)
        elif line.startswith(" Root memory region:"):
            body = []
        elif line.startswith(" No rendered FlatView"):
            header, body = [], None
        else:
            header.append(line)


def parse_gpa2hva(text: str) -> tuple[int, str]:
    """Return (host address, region name) from a ``gpa2hva`` reply."""
    m = _GPA2HVA.match(text.strip())
    if not m:
        raise unexpected("gpa2hva", text.strip())
    return int(m["hva"], 16), m["name"]


def flat_view(monitor: Monitor) -> list[FlatRange]:
    """The flat view of the ``memory`` address space, as the monitor shows it now;
    where it shows non-volatile ranges, ``info mtree`` says which regions are."""
    view = parse_flatview(monitor.hmp("info mtree -f"))
    if not any(fr.type.startswith(_NONVOLATILE) for fr in view):
        return view
    volatile = volatile_alias_targets(monitor.hmp("info mtree"))
    return [replace(fr, volatile_region=True) if fr.type.startswith(_NONVOLATILE)
            and fr.name in volatile else fr for fr in view]


def volatile_alias_targets(text: str) -> set[str]:
    """The regions that ``info mtree`` lists as aliased (each under a
    ``memory-region:`` line of its own) with a type that is not non-volatile."""
    found = set()
    lines = text.splitlines()
    for header, first in itertools.pairwise(lines):
        name = header.removeprefix("memory-region: ")
        m = _RANGE.match(first) if name != header else None
        if m and m["name"] == name and not m["type"].startswith(_NONVOLATILE):
            found.add(name)
    return found


def guest_ranges(monitor: Monitor, view: Sequence[FlatRange]) -> list[GuestRange]:
    """The RAM ranges of ``view`` that ``dump-guest-memory`` would dump, with host addresses."""
    result = []
    for fr in view:
        if not fr.dumped:
            continue
        hva, name = parse_gpa2hva(monitor.hmp(f"gpa2hva {fr.gpa:#x}"))
        if name != fr.name:
            raise MonitorError(f"gpa2hva {fr.gpa:#x} names region {excerpt(name)}, "
                               f"the flat view {excerpt(fr.name)}")
        result.append(GuestRange(fr.gpa, fr.size, hva, Region(fr.name, hva - fr.offset), fr.name))
    return result


def check_map(ranges: Sequence[GuestRange], blocks: Sequence[RamBlock],
              maps: Sequence[Mapping]) -> None:
    """Fail unless ``ranges`` (from :func:`guest_ranges`) fit QEMU's RAM ``blocks``
    and its mappings ``maps``.

    Each region's ranges agree on where it lies in QEMU, and that is one RAM
    block of its name (at that address, where QEMU shows it); each range lies
    within the block's used length; no byte is shown at more than
    :data:`MAX_ALIASES` guest addresses; no two blocks overlap in QEMU; and
    every block lies in mappings that can hold guest RAM.
    """
    by_region: dict[Region, list[GuestRange]] = {}
    for r in ranges:
        assert isinstance(r.region, Region)
        by_region.setdefault(r.region, []).append(r)
    taken: dict[int, Region] = {}
    spans = []
    for region, members in by_region.items():
        offsets = [(r.hva - region.base, r.size) for r in members]
        extent = max(offset + size for offset, size in offsets)
        block = blocks[_block_of(region, extent, blocks, taken)]
        for r, (offset, size) in zip(members, offsets, strict=True):
            if offset + size > block.used:
                raise GuestMemoryError(
                    f"guest RAM at {r.gpa:#x} ({size:#x} bytes at offset {offset:#x} of "
                    f"{excerpt(region.name)}) lies beyond its RAM block "
                    f"{excerpt(block.name)}, of which {block.used:#x} bytes are in use")
        _check_aliases(region.name, offsets)
        spans.append((region.base, region.base + block.used, block.name))
    spans.sort()
    for (_, end, name), (start, _, other) in itertools.pairwise(spans):
        if start < end:
            raise GuestMemoryError(f"RAM blocks {excerpt(name)} and {excerpt(other)} would "
                                   f"overlap in QEMU at {start:#x}")
    for start, end, name in spans:
        check_ram(excerpt(name), start, end, maps)


def _block_of(region: Region, extent: int, blocks: Sequence[RamBlock],
              taken: dict[int, Region]) -> int:
    """The index of the RAM block backing ``region`` (``extent`` bytes of it
    shown): the block of its name, or a device's block named ``PATH/NAME``;
    where QEMU shows blocks' addresses, the one at the region's."""
    named = ([i for i, b in enumerate(blocks) if b.name == region.name]
             or [i for i, b in enumerate(blocks) if b.name.endswith("/" + region.name)])
    if blocks and blocks[0].host is not None:
        at = [i for i in named if blocks[i].host == region.base]
        if not at:
            raise GuestMemoryError(f"memory region {excerpt(region.name)} would start at "
                                   f"{region.base:#x} in QEMU, where QEMU has no RAM "
                                   "block of that name")
        return at[0]
    free = [i for i in named if i not in taken]
    if not free:
        if named:
            raise GuestMemoryError(
                f"the ranges of memory region {excerpt(region.name)} disagree on where it "
                f"lies in QEMU ({taken[named[0]].base:#x} and {region.base:#x})")
        raise GuestMemoryError(f"memory region {excerpt(region.name)} has no RAM block in "
                               "QEMU's 'info ramblock'")
    index = next((i for i in free if blocks[i].used >= extent), free[0])
    taken[index] = region
    return index


def _check_aliases(name: str, offsets: Sequence[tuple[int, int]]) -> None:
    """Fail if a byte of region ``name`` is shown at more than :data:`MAX_ALIASES`
    guest addresses (``offsets``: each range's offset in the region, and size)."""
    # At one offset, ranges that end there are counted out before those that start.
    events = sorted([(o, 1) for o, _ in offsets] + [(o + size, -1) for o, size in offsets])
    depth = 0
    for offset, step in events:
        depth += step
        if depth > MAX_ALIASES:
            raise GuestMemoryError(
                f"memory region {excerpt(name)}: its bytes at offset {offset:#x} are shown at "
                f"{depth} guest addresses or more (QEMU shows RAM at {MAX_ALIASES} at most)")
