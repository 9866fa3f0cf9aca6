"""Locate guest RAM from QEMU's own data structures, with no monitor at all.

QEMU keeps the flat view of the guest's physical address space in memory:
``address_space_memory.current_map`` is a FlatView whose ``ranges`` each
name a MemoryRegion (aliases already resolved) and an offset into it; a
RAM region's RAMBlock holds the host address of its memory. Reading that
chain through ``process_vm_readv``, with member offsets from QEMU's DWARF
(:mod:`livedump.ptrace.dwarf`), gives the same ranges ``info mtree -f`` lists,
selected by the same rule as QEMU's ``dump-guest-memory``.

QEMU must be frozen meanwhile: the chain is replaced (RCU) when the map
changes.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass

from livedump.errors import GuestMemoryError
from livedump.ptrace.layout import Field, QemuLayout
from livedump.transfer.memory import PAGE_SIZE, Buffer, Mapping, MemorySource
from livedump.vmcore.blocks import GuestRange

# More ranges than this is not a flat view but garbage (a mismatched layout).
_MAX_RANGES = 1 << 20
_MAX_NAME = 256
_MAX_BLOCKS = 1 << 32  # virtio-mem's bitmap_size is an int32


def load_bias(pid: int, layout: QemuLayout, maps: Sequence[Mapping]) -> int:
    """How far the kernel moved QEMU's (PIE) executable: where its first segment is mapped."""
    if not layout.pie:
        return 0
    from elftools.common.exceptions import ELFError  # Slow to import: only where needed.
    from elftools.elf.elffile import ELFFile

    exe = f"/proc/{pid}/exe"  # The running binary, even if replaced on disk since.
    try:
        with open(exe, "rb") as f:
            first = min((s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"),
                        key=lambda s: s["p_vaddr"])
        path = os.readlink(exe)
    except (OSError, ELFError, ValueError) as e:
        raise GuestMemoryError(f"cannot read QEMU's executable: {e}") from None
    # pyelftools' header fields are untyped; ELF's are integers.
    return mapped_bias(first["p_offset"], first["p_vaddr"], first["p_align"], path, maps)


def mapped_bias(p_offset: int, p_vaddr: int, p_align: int, path: str,
                maps: Sequence[Mapping]) -> int:
    """The load bias of the executable ``path`` whose first PT_LOAD is given:
    where ``maps`` show the page of its file that segment starts in."""
    file_start = p_offset - p_offset % max(p_align, 1)
    link_start = p_vaddr - (p_offset - file_start)
    for m in maps:
        if m.offset == file_start and m.path == path:
            return m.start - link_start
    raise GuestMemoryError(f"cannot find where {path} is mapped in QEMU")


class Reader:
    """Typed reads of QEMU's memory in QEMU's byte order and pointer size."""

    def __init__(self, memory: MemorySource, layout: QemuLayout) -> None:
        self.memory = memory
        self.layout = layout

    def read(self, address: int, size: int) -> bytes:
        if address == 0:
            raise GuestMemoryError("NULL pointer in QEMU's memory map (does the debug info match?)")
        return bytes(self.memory.read(Buffer(size), size, address))

    def number(self, data: bytes, offset: int, size: int) -> int:
        return int.from_bytes(data[offset : offset + size], self.layout.byteorder)

    def field(self, data: bytes, member: Field, at: int = 0) -> int:
        """The integer ``member`` of the structure at ``data[at:]``."""
        return self.number(data, at + member.offset, member.size)

    def int128(self, data: bytes, offset: int) -> int:
        i = self.layout.int128
        if i.scalar:
            return self.number(data, offset, 16)
        assert i.lo is not None and i.hi is not None
        return self.number(data, offset + i.lo, 8) | self.number(data, offset + i.hi, 8) << 64

    def string(self, address: int) -> str:
        """A C string, read without crossing into a page that may not exist."""
        data = b""
        while b"\0" not in data and len(data) < _MAX_NAME:
            chunk = PAGE_SIZE - address % PAGE_SIZE
            data += self.read(address, min(chunk, _MAX_NAME))
            address += chunk
        return data.partition(b"\0")[0].decode(errors="replace")


def guest_ranges(memory: MemorySource, layout: QemuLayout, bias: int) -> list[GuestRange]:
    """The RAM ranges ``dump-guest-memory`` would dump, read from QEMU's memory."""
    r = Reader(memory, layout)
    s = layout.structs
    AS, FV, FR, AR, MR, RB = (s[n] for n in ("AddressSpace", "FlatView", "FlatRange",
                                              "AddrRange", "MemoryRegion", "RAMBlock"))
    ptr = layout.pointer_size
    field = r.field

    space = r.read(layout.address_space_memory + bias, AS.size)
    view = r.read(field(space, AS["current_map"]), FV.size)
    count = field(view, FV["nr"])
    if count > _MAX_RANGES:
        raise GuestMemoryError(f"QEMU's flat view claims {count} ranges: "
                               "the debug info does not match this QEMU")
    table = r.read(field(view, FV["ranges"]), count * FR.size) if count else b""

    regions: dict[int, tuple[bool, int, str, Plugged | None]] = {}
    result = []
    for i in range(count):
        entry = table[i * FR.size : (i + 1) * FR.size]
        mr = r.number(entry, FR["mr"].offset, ptr)
        if mr not in regions:
            region = r.read(mr, MR.size)
            # QEMU's rule: RAM, but not RAM devices (BARs) nor non-volatile memory.
            dumped = (field(region, MR["ram"]) and not field(region, MR["ram_device"])
                      and not field(region, MR["nonvolatile"]))
            host, name = 0, r.string(field(region, MR["name"]))
            plugged = None
            if dumped:
                host = r.number(r.read(field(region, MR["ram_block"]), RB.size),
                                RB["host"].offset, ptr)
                manager = field(region, MR["rdm"]) if "rdm" in MR.fields else 0
                if manager:
                    plugged = _plugged(r, manager, mr, name)
            regions[mr] = (bool(dumped), host, name, plugged)
        dumped, host, name, plugged = regions[mr]
        if not dumped:
            continue
        start = r.int128(entry, FR["addr"].offset + AR["start"].offset)
        size = r.int128(entry, FR["addr"].offset + AR["size"].offset)
        offset = field(entry, FR["offset_in_region"])
        for lo, hi in [(offset, offset + size)] if plugged is None else plugged.runs(offset, size):
            result.append(GuestRange(start + lo - offset, hi - lo, host + lo, mr, name))
    return result


@dataclass(frozen=True)
class Plugged:
    """A virtio-mem device's plugged blocks: bit ``i`` of ``bitmap`` is the
    ``block_size`` bytes at ``i * block_size`` in its memory backend's region."""

    block_size: int
    bitmap: int
    blocks: int

    def runs(self, offset: int, size: int) -> list[tuple[int, int]]:
        """The plugged (start, end) runs of the region's bytes ``offset`` to
        ``offset + size``, as offsets in the region."""
        bs, end = self.block_size, offset + size
        block = offset // bs
        last = min(-(-end // bs), self.blocks)
        window = self.bitmap >> block & ((1 << max(last - block, 0)) - 1)
        runs = []
        while window:
            skip = (window & -window).bit_length() - 1  # unplugged blocks
            window, block = window >> skip, block + skip
            run = (~window & (window + 1)).bit_length() - 1  # plugged ones
            runs.append((max(block * bs, offset), min((block + run) * bs, end)))
            window, block = window >> run, block + run
        return runs


def _plugged(r: Reader, manager: int, mr: int, name: str) -> Plugged:
    """The plugged blocks of RAM region ``name`` (at ``mr`` in QEMU), whose
    discard manager is at ``manager``: a virtio-mem device whose memory
    backend's region is this one, or the map is refused."""
    s = r.layout.structs
    if "VirtIOMEM" not in s:
        raise GuestMemoryError(f"RAM region {name!r} has a discard manager, and this QEMU's "
                               "debug info describes no virtio-mem device")
    VM, HMB = s["VirtIOMEM"], s["HostMemoryBackend"]
    device = r.read(manager, VM.size)
    if r.field(device, VM["memdev"]) + HMB["mr"].offset != mr:
        raise GuestMemoryError(f"the discard manager of RAM region {name!r} is not the "
                               "virtio-mem device of its memory backend")
    block_size, blocks = r.field(device, VM["block_size"]), r.field(device, VM["bitmap_size"])
    if block_size <= 0 or block_size % PAGE_SIZE or not 0 <= blocks <= _MAX_BLOCKS:
        raise GuestMemoryError(f"virtio-mem device of RAM region {name!r}: {blocks} blocks of "
                               f"{block_size:#x} bytes (does the debug info match?)")
    word = r.layout.pointer_size
    data = r.read(r.field(device, VM["bitmap"]), -(-blocks // (8 * word)) * word) if blocks else b""
    bitmap = 0
    for i in range(0, len(data), word):  # unsigned longs, bit i of word i // bits
        bitmap |= r.number(data, i, word) << (8 * i)
    return Plugged(block_size, bitmap, blocks)
