"""makedumpfile's kdump-compressed vmcore: its layout, headers and page compression.

The file, in blocks of one guest page (what crash, makedumpfile and
libkdumpfile read, as makedumpfile's ``diskdump_mod.h`` declares it):

* block 0: ``struct disk_dump_header`` (signature ``KDUMP   ``, version 6);
* the sub-header blocks: ``struct kdump_sub_header`` (64-bit pfns), then the
  ELF notes as a PT_NOTE holds them, VMCOREINFO among them;
* the two bitmaps, each rounded up to whole blocks: the first says which
  pfns are RAM, the second which of those the file holds;
* one 24-byte page descriptor per pfn the second bitmap sets, in pfn order:
  where its data is, how long, and how it is compressed;
* the page data. As makedumpfile does, a page of zeros under dump level 1
  stays in the second bitmap and points at one page of zeros written first.

Every part's offset follows from the RAM map alone (the notes get a fixed
room), so pages can be written as they are compressed and the headers last.
Into a pipe the file goes as makedumpfile's flattened format: records of
(offset, length, data), which ``makedumpfile -R`` turns back into the file
and which libkdumpfile (drgn) reads as it is.

Only x86_64 is written: the headers hold the target's ``long`` and ``off_t``
in its byte order, and the layout is fixed (one page size) before memory is
read; the struct page decision (:mod:`livedump.vmcore.pagefilter`) walks
x86_64 page tables.
"""

import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from livedump.errors import UsageError
from livedump.vmcore.arch import EM_X86_64, Arch
from livedump.vmcore.blocks import Block
from livedump.vmcore.elf import ElfStructs

SIGNATURE = b"KDUMP   "
HEADER_VERSION = 6
PAGE_DESC = struct.Struct("<qIIQ")  # offset, size, flags, page_flags
_HEADER = struct.Struct("<8si390s6xqqIiiIIIIIIi")  # padded as the C struct on LP64
_SUB_HEADER = struct.Struct("<QiiQQqQqQqQQQQ")
_UTS_FIELD = 65
_FLAT_SIGNATURE = b"makedumpfile"
_FLAT_HEADER_SIZE = 4096
_FLAT_RECORD = struct.Struct(">qq")  # big-endian whatever the target, as makedumpfile's
_FLAT_END = -1

# Dump-level bits (makedumpfile's -d): what each excludes.
DL_ZERO, DL_CACHE, DL_CACHE_PRIVATE, DL_USER, DL_FREE = 1, 2, 4, 8, 16
MAX_DUMP_LEVEL = 31

# Page flags of the descriptors and the header's status.
COMPRESS_FLAGS = {"none": 0, "zlib": 0x1, "lzo": 0x2, "snappy": 0x4, "zstd": 0x20}
COMPRESSIONS = tuple(COMPRESS_FLAGS)
DEFAULT_COMPRESSION = "zstd"

# The targets written, as utsname.machine names them (crash checks it). Page size
# and layout are fixed before memory is read, so targets of one page size only.
_MACHINES = {EM_X86_64: b"x86_64"}
PAGE = 4096

Compress = Callable[[bytes], bytes]


class Sink(Protocol):
    """Where the file goes: bytes at offsets, in any order."""

    def write_at(self, offset: int, data: bytes | memoryview) -> None: ...


def compressor(name: str) -> Compress:
    """A page compressor for ``name``, at makedumpfile's levels (the fastest), safe to
    call from many threads at once; each library releases the GIL while it works.
    A library that is not installed is a UsageError naming the package."""
    if name == "zlib":
        return lambda page: zlib.compress(page, 1)
    if name == "zstd":
        try:
            import zstandard
        except ImportError:
            raise _missing("zstd", "zstandard", "livedump") from None
        local = threading.local()  # a ZstdCompressor serves one thread at a time

        def zstd(page: bytes) -> bytes:
            c = getattr(local, "c", None)
            if c is None:
                c = local.c = zstandard.ZstdCompressor(level=1)
            return c.compress(page)
        return zstd
    if name == "lzo":
        try:
            import lzo  # type: ignore[import-not-found]
        except ImportError:
            raise _missing("lzo", "python-lzo", "'livedump[lzo]'") from None
        return lambda page: bytes(lzo.compress(page, 1, False))  # raw lzo1x_1, no header
    if name == "snappy":
        try:
            import cramjam
        except ImportError:
            raise _missing("snappy", "cramjam", "livedump") from None
        return lambda page: bytes(cramjam.snappy.compress_raw(page))
    if name == "none":
        return lambda page: page
    raise UsageError(f"unknown compression {name!r} (known: {', '.join(COMPRESSIONS)})")


def check_format(fmt: str, compress: str | None, dump_level: int) -> None:
    """Refuse what cannot be written, before the VM is touched (a missing
    compression library included)."""
    if fmt not in ("elf", "kdump"):
        raise UsageError(f"unknown format {fmt!r} (known: elf, kdump)")
    if not 0 <= dump_level <= MAX_DUMP_LEVEL:
        raise UsageError(f"dump level {dump_level} is not one of makedumpfile's "
                         f"(0 to {MAX_DUMP_LEVEL})")
    if fmt == "elf":
        if compress is not None:
            raise UsageError("--compress is for --format kdump: an ELF vmcore is not compressed")
        return
    compressor(compress or DEFAULT_COMPRESSION)


def _missing(name: str, package: str, install: str) -> UsageError:
    return UsageError(f"--compress {name} needs the Python package {package} "
                      f"(pip install {install})")


@dataclass
class Utsname:
    """The guest's ``struct new_utsname``: crash checks ``machine`` against the target."""

    sysname: bytes = b"Linux"
    nodename: bytes = b""
    release: bytes = b""
    version: bytes = b""
    machine: bytes = b""
    domainname: bytes = b""

    SIZE = 6 * _UTS_FIELD

    def pack(self) -> bytes:
        return b"".join(f[: _UTS_FIELD - 1].ljust(_UTS_FIELD, b"\0") for f in (
            self.sysname, self.nodename, self.release, self.version, self.machine,
            self.domainname))

    @classmethod
    def unpack(cls, raw: bytes) -> "Utsname":
        fields = [raw[i * _UTS_FIELD:(i + 1) * _UTS_FIELD].split(b"\0", 1)[0] for i in range(6)]
        return cls(*fields)


class Bitmap:
    """One bit per pfn, least significant bit first, as the readers index it."""

    def __init__(self, pfns: int) -> None:
        self.size = pfns
        self.bits = bytearray((pfns + 7) // 8)

    @classmethod
    def of_ram(cls, blocks: Sequence[Block], page: int) -> "Bitmap":
        """The pfns of ``blocks`` (whole pages of ``page`` bytes)."""
        ram = cls(max(b.end for b in blocks) // page)
        for b in blocks:
            ram.set_range(b.gpa // page, b.size // page)
        return ram

    def set_range(self, first: int, count: int) -> None:
        pfn, end = first, first + count
        while pfn < end and pfn % 8:
            self.set(pfn)
            pfn += 1
        whole = (end - pfn) // 8  # whole bytes at once: RAM comes in long runs
        self.bits[pfn >> 3:(pfn >> 3) + whole] = b"\xff" * whole
        for rest in range(pfn + whole * 8, end):
            self.set(rest)

    def set(self, pfn: int) -> None:
        self.bits[pfn >> 3] |= 1 << (pfn & 7)

    def clear(self, pfns: Iterable[int]) -> None:
        bits = self.bits  # (a local: this runs for every page left out)
        for pfn in pfns:
            bits[pfn >> 3] &= ~(1 << (pfn & 7)) & 0xFF

    def clear_bits(self, other: bytes) -> None:
        """Clear every pfn ``other`` sets (a bitmap of the same form)."""
        n = min(len(other), len(self.bits))
        mine = int.from_bytes(self.bits[:n], "little")
        self.bits[:n] = (mine & ~int.from_bytes(other[:n], "little")).to_bytes(n, "little")

    def any_set(self, first: int, count: int) -> bool:
        """Whether any pfn of ``[first, first + count)`` is set."""
        bits = int.from_bytes(self.bits[first >> 3:(first + count + 7) >> 3], "little")
        return bits >> (first & 7) & (1 << count) - 1 != 0

    def runs(self, first: int, count: int) -> list[tuple[int, int]]:
        """(first pfn, count) of each run of set pfns in ``[first, first + count)``:
        a step per run, not per pfn."""
        bits = int.from_bytes(self.bits[first >> 3:(first + count + 7) >> 3], "little")
        bits = bits >> (first & 7) & (1 << count) - 1
        out, at = [], first
        while bits:
            gap = (bits & -bits).bit_length() - 1
            bits, at = bits >> gap, at + gap
            ones = (~bits & (bits + 1)).bit_length() - 1
            out.append((at, ones))
            bits, at = bits >> ones, at + ones
        return out

    def all_set(self, first: int, count: int) -> bool:
        """Whether every pfn of ``[first, first + count)`` is set."""
        if first % 8 == 0 and count % 8 == 0:
            whole = self.bits[first >> 3:(first + count) >> 3]
            return len(whole) == count >> 3 and whole.count(0xFF) == len(whole)
        return first + count <= self.size and all(p in self for p in range(first, first + count))

    def __contains__(self, pfn: int) -> bool:
        return bool(self.bits[pfn >> 3] >> (pfn & 7) & 1)

    def count(self) -> int:
        return int.from_bytes(self.bits, "little").bit_count()


class KdumpLayout:
    """Where every part of a kdump file of ``blocks`` goes.

    ``excluded`` pfns (what the dump level drops before anything is read) are
    left out of the second bitmap; ``note_room`` bytes are reserved for the
    notes, which are written with the header once memory is.
    """

    def __init__(self, arch: Arch, blocks: Sequence[Block], page_size: int, note_room: int,
                 excluded: Iterable[int] = ()) -> None:
        if (arch.machine not in _MACHINES or arch.bits != 64 or not arch.little_endian):
            raise UsageError(f"--format kdump writes x86_64 vmcores, "
                             f"not {arch.name}: use --format elf")
        self.arch, self.page = arch, page_size
        self.blocks = list(blocks)
        for b in self.blocks:
            if (b.gpa | b.size) % page_size:
                raise UsageError(f"guest RAM at {b.gpa:#x}-{b.end - 1:#x} is not made of whole "
                                 f"{page_size}-byte pages: --format kdump cannot hold it")
        self.ram = Bitmap.of_ram(self.blocks, page_size)
        self.max_mapnr = self.ram.size
        self.bitmap_size = _round_up(len(self.ram.bits), page_size)
        self.note_offset = page_size + _SUB_HEADER.size
        self.sub_blocks = -(-(_SUB_HEADER.size + note_room) // page_size)
        self.note_room = self.sub_blocks * page_size - _SUB_HEADER.size
        self.bitmap_offset = (1 + self.sub_blocks) * page_size
        self.desc_offset = self.bitmap_offset + 2 * self.bitmap_size
        self.dumpable = Bitmap(self.max_mapnr)
        self.dumpable.bits[:] = self.ram.bits
        self.exclude(excluded)

    def exclude(self, pfns: Iterable[int]) -> None:
        """Leave ``pfns`` out of the second bitmap (before any page is written)."""
        self.dumpable.clear(pfns)
        self._counted()

    def exclude_bits(self, bits: bytes) -> None:
        """Leave out of the second bitmap the pfns ``bits`` sets (one bit each)."""
        self.dumpable.clear_bits(bits)
        self._counted()

    def _counted(self) -> None:
        self.num_dumpable = self.dumpable.count()
        self.data_offset = self.desc_offset + PAGE_DESC.size * self.num_dumpable

    def bitmaps(self) -> list[tuple[int, bytes]]:
        """Both bitmaps, at their offsets."""
        return [(self.bitmap_offset, bytes(self.ram.bits)),
                (self.bitmap_offset + self.bitmap_size, bytes(self.dumpable.bits))]

    def headers(self, *, notes: bytes, vmcoreinfo: tuple[int, int] | None, uts: Utsname,
                compression: str, dump_level: int, phys_base: int, nr_cpus: int,
                timestamp: float | None = None) -> list[tuple[int, bytes]]:
        """The header, sub-header and notes, at their offsets. ``vmcoreinfo`` is
        (offset, size) of VMCOREINFO's text within ``notes``."""
        if len(notes) > self.note_room:
            raise ValueError(f"{len(notes)} bytes of notes do not fit the "
                             f"{self.note_room} reserved")
        now = time.time() if timestamp is None else timestamp
        uts.machine = uts.machine or _MACHINES[self.arch.machine]
        header = _HEADER.pack(
            SIGNATURE, HEADER_VERSION, uts.pack(), int(now), int(now % 1 * 1e6),
            COMPRESS_FLAGS[compression], self.page, self.sub_blocks, 2 * self.bitmap_size
            // self.page, min(self.max_mapnr, 0xFFFFFFFF), 0, 0, 0, 0, nr_cpus)
        info_offset, info_size = vmcoreinfo if vmcoreinfo else (0, 0)
        sub = _SUB_HEADER.pack(
            phys_base, dump_level, 0, 0, 0,
            self.note_offset + info_offset if vmcoreinfo else 0, info_size,
            self.note_offset if notes else 0, len(notes), 0, 0, 0, 0, self.max_mapnr)
        return [(0, header.ljust(self.page, b"\0")), (self.page, sub), (self.note_offset, notes)]


def find_note(notes: bytes, name: str) -> tuple[int, int] | None:
    """(offset, size) of the descriptor of the first note called ``name`` in
    ``notes`` (64-bit little-endian), as the sub-header points at VMCOREINFO's."""
    head = ElfStructs(64, True).nhdr
    at = 0
    while at + head.size <= len(notes):
        n = head.unpack(notes[at:at + head.size])
        desc = at + head.size + _round_up(n["n_namesz"], 4)
        if notes[at + head.size:at + head.size + n["n_namesz"]].rstrip(b"\0") == name.encode():
            return desc, n["n_descsz"]
        at = desc + _round_up(n["n_descsz"], 4)
    return None


def count_prstatus(notes: bytes) -> int:
    """The CPUs the notes hold registers of (``nr_cpus`` in the header)."""
    head = ElfStructs(64, True).nhdr
    at, cpus = 0, 0
    while at + head.size <= len(notes):
        n = head.unpack(notes[at:at + head.size])
        cpus += n["n_type"] == 1 and notes[at + head.size:at + head.size + 5] == b"CORE\0"
        at += head.size + _round_up(n["n_namesz"], 4) + _round_up(n["n_descsz"], 4)
    return cpus


def descriptor(offset: int, size: int, flags: int) -> bytes:
    return PAGE_DESC.pack(offset, size, flags, 0)


def compress_page(page: bytes, compress: Compress, flag: int) -> tuple[bytes, int]:
    """The page as stored and its descriptor flags: raw where compression does not
    make it smaller, as makedumpfile stores it."""
    if flag:
        packed = compress(page)
        if len(packed) < len(page):
            return packed, flag
    return page, 0


class FlatSink:
    """makedumpfile's flattened format on a stream: a 4 KiB header, then records of
    (offset, length) and data, ended by a record of (-1, -1)."""

    def __init__(self, write: Callable[[bytes | memoryview], None]) -> None:
        self._write = write
        self._lock = threading.Lock()
        head = _FLAT_SIGNATURE.ljust(16, b"\0") + struct.pack(">qq", 1, 1)
        write(head.ljust(_FLAT_HEADER_SIZE, b"\0"))

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        if not len(data):
            return
        with self._lock:
            self._write(_FLAT_RECORD.pack(offset, len(data)))
            self._write(data)

    def end(self) -> None:
        with self._lock:
            self._write(_FLAT_RECORD.pack(_FLAT_END, _FLAT_END))


def _round_up(n: int, to: int) -> int:
    return n + (-n % to)
