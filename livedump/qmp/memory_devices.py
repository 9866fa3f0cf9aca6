"""virtio-mem devices, and which of their memory QEMU's dump takes.

A virtio-mem device shows its whole memory backend in the flat view, but
the guest has only the blocks it plugged: QEMU's ``dump-guest-memory``
takes those alone (its RamDiscardManager replays the populated parts), and
never reads the rest, which may not even exist on the host (an unplugged
block is discarded; reading it from a shared backend would allocate it).

The monitor tells how much is plugged (``query-memory-devices``), not
which blocks: nothing or everything is known from the size alone; for a
partly plugged device the blocks come from the program headers of QEMU's
own dump (:func:`livedump.qmp.notes.dump_header`), which is QEMU's exact
selection.
"""

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from livedump.errors import MonitorError
from livedump.qmp.monitor import Monitor, unexpected
from livedump.qmp.ram_map import FlatRange

Span = tuple[int, int]  # guest-physical start, size


@dataclass(frozen=True)
class VirtioMem:
    """A virtio-mem device: its window in guest-physical space and how much is plugged."""

    id: str
    memaddr: int
    max_size: int  # the window: its memory backend's size
    plugged: int  # bytes plugged now ("size" in QEMU's terms)
    block_size: int

    @property
    def end(self) -> int:
        return self.memaddr + self.max_size

    @property
    def partly_plugged(self) -> bool:
        return 0 < self.plugged < self.max_size

    def spans(self, loads: Sequence[Span] | None) -> list[Span]:
        """The plugged parts of the window: from the size when that says all,
        else from ``loads`` (the PT_LOADs of QEMU's dump), which must be given."""
        if self.plugged == 0:
            return []
        if self.plugged >= self.max_size:
            return [(self.memaddr, self.max_size)]
        if loads is None:
            raise ValueError(f"virtio-mem device {self.id} is partly plugged")
        found = [(max(gpa, self.memaddr), min(gpa + size, self.end))
                 for gpa, size in loads if gpa < self.end and self.memaddr < gpa + size]
        spans = [(start, end - start) for start, end in found]
        if sum(size for _, size in spans) != self.plugged:
            raise MonitorError(f"QEMU's dump shows {sum(s for _, s in spans):#x} bytes of "
                               f"virtio-mem device {self.id}, which has {self.plugged:#x} "
                               "bytes plugged")
        return spans


def virtio_mem_devices(monitor: Monitor) -> list[VirtioMem]:
    """The VM's virtio-mem devices, as QEMU reports them now."""
    reply = monitor.transport.execute("query-memory-devices")
    if not isinstance(reply, list):
        raise unexpected("query-memory-devices", reply)
    return parse_memory_devices(reply)


def parse_memory_devices(reply: list[object]) -> list[VirtioMem]:
    """The virtio-mem devices in a ``query-memory-devices`` reply."""
    devices = []
    for entry in reply:
        if not isinstance(entry, dict) or entry.get("type") != "virtio-mem":
            continue
        data = entry.get("data")
        try:
            assert isinstance(data, dict)
            device = VirtioMem(str(data.get("id") or "(no id)"), int(data["memaddr"]),
                               int(data["max-size"]), int(data["size"]),
                               int(data["block-size"]))
        except (AssertionError, KeyError, TypeError, ValueError):
            raise unexpected("query-memory-devices", entry) from None
        if not 0 <= device.plugged <= device.max_size:
            raise unexpected("query-memory-devices", entry)
        devices.append(device)
    return devices


def clip(view: Iterable[FlatRange], devices: Sequence[VirtioMem],
         plugged: dict[VirtioMem, list[Span]]) -> tuple[list[FlatRange], list[FlatRange]]:
    """``view`` with the dumped ranges cut down, in each device's window, to its
    ``plugged`` spans, what lies outside the windows as it is;
    and the parts cut out."""
    kept: list[FlatRange] = []
    cut: list[FlatRange] = []
    for fr in view:
        pieces = pieces_of(fr.gpa, fr.size, devices, plugged) if fr.dumped else None
        if pieces is None:
            kept.append(fr)
            continue
        at = fr.gpa
        for lo, hi in [*pieces, (fr.gpa + fr.size, fr.gpa + fr.size)]:
            if at < lo:
                cut.append(replace(fr, gpa=at, size=lo - at, offset=fr.offset + at - fr.gpa))
            if lo < hi:
                kept.append(replace(fr, gpa=lo, size=hi - lo, offset=fr.offset + lo - fr.gpa))
            at = hi
    return kept, cut


def pieces_of(gpa: int, size: int, devices: Sequence[VirtioMem],
              plugged: dict[VirtioMem, list[Span]]) -> list[tuple[int, int]] | None:
    """The (start, end) parts of the guest range ``gpa``, ``size`` that QEMU's dump
    takes, in order; None if it overlaps no device's window (all of it)."""
    end = gpa + size
    inside = [d for d in devices if gpa < d.end and d.memaddr < end]
    if not inside:
        return None
    keep = [(start, start + length) for d in inside for start, length in plugged[d]]
    edges = sorted({gpa, end, *(x for d in inside for x in (d.memaddr, d.end))})
    keep += [(lo, hi) for lo, hi in itertools.pairwise(edges)
             if not any(d.memaddr <= lo and hi <= d.end for d in inside)]
    pieces = [(max(lo, gpa), min(hi, end)) for lo, hi in sorted(keep)]
    return [(lo, hi) for lo, hi in pieces if lo < hi]
