"""Locate guest RAM through the monitor, without QEMU's debug info.

``info mtree -f`` gives the flat view of the ``memory`` address space
(what the guest sees at each physical address); ``gpa2hva`` gives where
each RAM range lives in QEMU's own address space. Together they are the
same map QEMU's ``dump-guest-memory`` builds from its memory listener.
"""

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .coalesce import GuestRange
from .errors import MonitorError
from .monitor import Monitor

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
# memory ("nv-" prefix) or MMIO ("i/o").
_DUMPED_TYPES = {"ram", "rom"}


@dataclass(frozen=True, slots=True)
class FlatRange:
    """One line of the flat view."""

    gpa: int
    size: int
    type: str
    name: str
    offset: int

    @property
    def dumped(self) -> bool:
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
                raise MonitorError(f"unexpected line in 'info mtree -f': {line.strip()!r}")
            first, last = int(m["first"], 16), int(m["last"], 16)
            if last < first or (ranges and first <= ranges[-1].gpa + ranges[-1].size - 1):
                raise MonitorError(f"'info mtree -f' ranges out of order at {line.strip()!r}")
            ranges.append(
                FlatRange(first, last - first + 1, m["type"], m["name"], int(m["offset"] or "0", 16))
            )
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
        raise MonitorError(f"unexpected 'gpa2hva' reply: {text.strip()!r}")
    return int(m["hva"], 16), m["name"]


def flat_view(monitor: Monitor) -> list[FlatRange]:
    """The flat view of the ``memory`` address space, as the monitor shows it now."""
    return parse_flatview(monitor.hmp("info mtree -f"))


def guest_ranges(monitor: Monitor, view: Sequence[FlatRange]) -> list[GuestRange]:
    """The RAM ranges of ``view`` that ``dump-guest-memory`` would dump, with host addresses."""
    result = []
    for fr in view:
        if not fr.dumped:
            continue
        hva, name = parse_gpa2hva(monitor.hmp(f"gpa2hva {fr.gpa:#x}"))
        if name != fr.name:
            raise MonitorError(
                f"gpa2hva {fr.gpa:#x} names region {name!r}, the flat view {fr.name!r}"
            )
        # A region is known by its name and where its start lies in QEMU.
        result.append(GuestRange(fr.gpa, fr.size, hva, (fr.name, hva - fr.offset), fr.name))
    return result
