"""Read QEMU's migration stream (``QEVM`` version 3) for the guest RAM in it.

A background snapshot (migration capability ``background-snapshot``)
writes, in order: the file header and the ``configuration`` record; the
``ram`` section's start, which lists every RAM block by name and length;
``ram`` parts, each a run of page records closed by an end-of-section
marker, until every page was sent exactly once; then the device state,
saved at the snapshot point, and the end of file. Only RAM is read here;
the device state is kept as it came (up to a bound) for
:mod:`livedump.live.devices`.

A page record is a big-endian 64-bit word, the page's offset in its block
with flags in the bits below the target page size, then, unless the flag
``CONTINUE`` says "same block as before", the block's name; then either
the page (``PAGE``) or one fill byte (``ZERO``: the page is that byte
throughout, 0 in practice). Anything else (compressed or XBZRLE pages,
other iterative sections, commands) means QEMU was set up for something
livedump does not read: it is an error, never a guess.

Pages are handed out as views into one reused buffer, so memory stays
bounded and no Python code runs per byte of guest memory.
"""

import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from livedump.errors import SnapshotError

MAGIC = 0x5145564D  # "QEVM"
VERSION = 3

# Stream elements (QEMU_VM_* in QEMU's savevm.h).
EOF = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
SUBSECTION = 0x05
CONFIGURATION = 0x07
SECTION_FOOTER = 0x7E

# Flags of a RAM record (RAM_SAVE_FLAG_* in QEMU's ram.c).
FLAG_ZERO = 0x02
FLAG_MEM_SIZE = 0x04
FLAG_PAGE = 0x08
FLAG_EOS = 0x10
FLAG_CONTINUE = 0x20

# The record layouts, big-endian as QEMU writes them.
_FILE_HEADER = struct.Struct(">II")  # magic, version
_BE32 = struct.Struct(">I")  # section id, lengths, counts
_SECTION_START = struct.Struct(">II")  # after the name: instance id, version id
_BE64 = struct.Struct(">Q")  # a RAM record's offset and flags; a block's length
_ZERO_RECORD = struct.Struct(">QB")  # a zero page's offset and flags (CONTINUE), fill byte

RAM_SECTION = "ram"
_VIRTIO_MEM_EARLY = "virtio-mem-device-early"
_BE64_3 = struct.Struct(">QQQ")
# Without the configuration's "target-page-bits" subsection a stream's pages
# are the target's smallest: 1 KiB on Arm (whose page size varies), 4 KiB on
# every other target livedump writes vmcores for.
_MIN_PAGE_BITS = {"aarch64": 10, "arm": 10}
_DEFAULT_PAGE_BITS = 12
_PAGE_BITS = (10, 16)  # what QEMU's targets use (1 KiB to 64 KiB)

BUFFER_SIZE = 4 << 20
# The device state kept at most: far more than a VM's devices save (guest RAM,
# video memory included, is not device state), so that a stream cannot make
# livedump hold more.
DEVICE_STATE_LIMIT = 64 << 20


def min_page_bits(target: str) -> int:
    """The target page size a stream of QEMU target ``target`` has unless it says otherwise."""
    return _MIN_PAGE_BITS.get(target, _DEFAULT_PAGE_BITS)


@dataclass(frozen=True)
class RamBlock:
    """A RAM block as the stream lists it: QEMU's name (``idstr``) and used length."""

    name: str
    size: int


# A page as handed out: block index, offset in the block, and the page's bytes
# (valid until the next page is asked for) or the non-zero byte a ZERO record
# fills it with. Pages of zeros are not handed out.
Page = tuple[int, int, memoryview | int]


class Reader:
    """Buffered reads of a file descriptor, whole records at a time; ``on_read``
    is called after each read from it (the sign of progress)."""

    def __init__(self, fd: int, size: int = BUFFER_SIZE,
                 on_read: Callable[[], None] | None = None) -> None:
        self.fd = fd
        self.on_read = on_read
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._pos = 0
        self._end = 0
        self.consumed = 0  # bytes handed out so far, for messages

    def _fill(self, n: int) -> None:
        """Make ``n`` bytes available at the read position."""
        if n > len(self._buf):
            raise SnapshotError(f"a record of {n} bytes in the migration stream")
        if self._pos + n > len(self._buf):
            remaining = self._end - self._pos
            self._view[:remaining] = self._view[self._pos:self._end]
            self._pos, self._end = 0, remaining
        while self._end - self._pos < n:
            got = os.readv(self.fd, [self._view[self._end:]])
            if got == 0:
                raise SnapshotError(
                    f"the migration stream ended early (after {self.consumed} bytes)")
            self._end += got
            if self.on_read:
                self.on_read()

    def take(self, n: int) -> memoryview:
        if self._end - self._pos < n:
            self._fill(n)
        start = self._pos
        self._pos += n
        self.consumed += n
        return self._view[start:self._pos]

    def unpack(self, record: struct.Struct) -> tuple[int, ...]:
        return record.unpack(self.take(record.size))

    def byte(self) -> int:
        return self.take(1)[0]

    def buffered(self) -> memoryview:
        """What is read and not yet taken (valid until the next read)."""
        return self._view[self._pos:self._end]

    def peek(self) -> int:
        if self._end == self._pos:
            self._fill(1)
        return self._buf[self._pos]

    def name(self) -> str:
        """A name as QEMU writes one: a length byte, then the bytes."""
        return bytes(self.take(self.byte())).decode("utf-8", "replace")

    def rest(self, limit: int) -> bytes | None:
        """Read to the end of the stream; what was left of it, or None beyond ``limit``
        bytes (then dropped)."""
        kept = bytearray(self._view[self._pos:self._end])
        self.consumed += len(kept)
        self._pos = self._end = 0
        while got := os.readv(self.fd, [self._view]):
            if len(kept) <= limit:
                kept += self._view[:got]
            self.consumed += got
            if self.on_read:
                self.on_read()
        return bytes(kept) if len(kept) <= limit else None


class MigrationStream:
    """The RAM of one migration stream: :meth:`read_setup`, :meth:`wait_snapshot`,
    then :meth:`pages`."""

    def __init__(self, fd: int, target: str, known: Sequence[RamBlock],
                 on_read: Callable[[], None] | None = None) -> None:
        """``known``: the VM's RAM blocks as its monitor lists them; the stream may
        list only those (so what it says cannot make livedump allocate more).
        ``on_read``: called after each read from ``fd``."""
        self.reader = Reader(fd, on_read=on_read)
        self.known = set(known)
        self.page_bits = min_page_bits(target)
        self.blocks: list[RamBlock] = []
        self._section_id: int | None = None
        self._block = -1  # the block of the last record, for CONTINUE
        self._seen: list[bytearray] = []  # per block, 1 for each page sent
        self.done = 0  # bytes of RAM sent so far
        self._kind = EOF  # the last element read that was not a RAM part
        # What followed RAM (from that element on), once read; None if too long.
        self.device_state: bytes | None = None

    @property
    def page_size(self) -> int:
        return 1 << self.page_bits

    def read_setup(self) -> list[RamBlock]:
        """The header, the configuration and the ``ram`` section's list of blocks.

        QEMU writes these before it takes the snapshot point.
        """
        r = self.reader
        magic, version = r.unpack(_FILE_HEADER)
        if magic != MAGIC or version != VERSION:
            raise SnapshotError(f"not a QEMU migration stream of version {VERSION} "
                                f"(magic {magic:#x}, version {version})")
        if r.peek() == CONFIGURATION:
            r.byte()
            self._configuration()
        kind = r.byte()
        if kind != SECTION_START:
            raise SnapshotError(f"the migration stream starts with element {kind:#x}, "
                                "not the RAM section")
        self._section_start()
        list(self._ram_records(setup=True))  # The block list: no pages.
        self._footer()
        return self.blocks

    def _configuration(self) -> None:
        r = self.reader
        (length,) = r.unpack(_BE32)
        r.take(length)  # The machine type's name.
        while r.peek() == SUBSECTION:
            r.byte()
            name = r.name()
            r.unpack(_BE32)  # its version
            if name == "configuration/target-page-bits":
                (self.page_bits,) = r.unpack(_BE32)
                if not _PAGE_BITS[0] <= self.page_bits <= _PAGE_BITS[1]:
                    raise SnapshotError(f"target pages of 2**{self.page_bits} bytes "
                                        "in the migration stream")
            elif name == "configuration/capabilities":
                (count,) = r.unpack(_BE32)
                for _ in range(count):
                    r.name()
            elif name == "configuration/uuid":
                r.take(16)
            else:
                raise SnapshotError(f"unknown part {name!r} in the migration stream's "
                                    "configuration")

    def _section_start(self) -> None:
        r = self.reader
        (section_id,) = r.unpack(_BE32)
        name = r.name()
        r.unpack(_SECTION_START)
        if name != RAM_SECTION or self._section_id is not None:
            raise SnapshotError(f"the migration stream has a section {name!r} that livedump "
                                "does not read (is block migration or a VFIO device on?)")
        self._section_id = section_id

    def _footer(self) -> None:
        r = self.reader
        if r.peek() == SECTION_FOOTER:
            r.byte()
            (section_id,) = r.unpack(_BE32)
            if section_id != self._section_id:
                raise SnapshotError(f"section footer for section {section_id} "
                                    f"in section {self._section_id}")

    def wait_snapshot(self) -> None:
        """Read up to the first ``ram`` part. QEMU writes it once it has taken the
        snapshot point: saved the devices and write-protected guest RAM."""
        while self.reader.peek() == SECTION_FULL:
            self._early_device()
        if not self._next_part():
            raise SnapshotError("the migration stream holds no RAM")

    def _early_device(self) -> None:
        """Skip a device's state that QEMU sends before any RAM: from QEMU 8.2
        on, a virtio-mem device's ("virtio-mem-device-early", version 1): its
        address, region and block sizes, node, plugged size, and the bitmap of
        its plugged blocks (one bit a block, in 64-bit words)."""
        r = self.reader
        r.byte()
        (section_id,) = r.unpack(_BE32)
        name = r.name()
        _, version = r.unpack(_SECTION_START)
        if not name.endswith("/" + _VIRTIO_MEM_EARLY) or version != 1:
            raise SnapshotError(f"the migration stream has state of device {name!r} "
                                f"(version {version}) before its RAM, which livedump "
                                "does not read")
        _, region_size, block_size = r.unpack(_BE64_3)
        r.take(4 + 8)  # node, plugged size
        if not block_size or region_size % block_size:
            raise SnapshotError(f"virtio-mem state in the migration stream with blocks of "
                                f"{block_size:#x} bytes in {region_size:#x}")
        r.take(-(-(region_size // block_size) // 64) * 8)
        if r.peek() == SECTION_FOOTER:
            r.byte()
            if r.unpack(_BE32) != (section_id,):
                raise SnapshotError(f"the migration stream's state of device {name!r} "
                                    "is not of the form livedump knows")

    def pages(self) -> Iterator[Page]:
        """After :meth:`wait_snapshot`: every page that is not all zeros, as it
        arrives; then the rest of the stream is read and dropped, and every page
        is checked to have come."""
        while True:
            yield from self._ram_records(setup=False)
            self._footer()
            if not self._next_part():
                break
        rest = self.reader.rest(DEVICE_STATE_LIMIT)
        self.device_state = None if rest is None else bytes([self._kind]) + rest
        self._check_complete()

    def _next_part(self) -> bool:
        """Read the next section's header: True for a ``ram`` part, False where
        the device state (or the end) begins."""
        r = self.reader
        kind = r.byte()
        if kind in (SECTION_FULL, EOF):
            self._kind = kind
            return False
        if kind not in (SECTION_PART, SECTION_END):
            raise SnapshotError(f"unexpected element {kind:#x} in the migration stream")
        (section_id,) = r.unpack(_BE32)
        if section_id != self._section_id:
            raise SnapshotError(f"the migration stream has parts of section {section_id}, "
                                "which livedump does not read")
        return True

    def _ram_records(self, setup: bool) -> Iterator[Page]:
        r = self.reader
        page_size, bits = self.page_size, self.page_bits
        mask = page_size - 1
        take, unpack = r.take, _BE64.unpack  # The loop runs once a page: kept lean.
        while True:
            (word,) = unpack(take(_BE64.size))
            flags = word & mask
            offset = word ^ flags
            if flags & (FLAG_PAGE | FLAG_ZERO) and not setup:
                if not flags & FLAG_CONTINUE:
                    self._block = self._block_named(r.name())
                elif self._block < 0:
                    raise SnapshotError("the migration stream's first page names no RAM block")
                block = self._block
                if offset + page_size > self.blocks[block].size:
                    raise SnapshotError(f"page at {offset:#x} beyond the end of RAM block "
                                        f"{self.blocks[block].name!r}")
                self._seen[block][offset >> bits] = 1
                self.done += page_size
                kind = flags & ~FLAG_CONTINUE
                if kind == FLAG_PAGE:
                    yield block, offset, take(page_size)
                elif kind != FLAG_ZERO:
                    raise SnapshotError(f"unsupported RAM record flags {flags:#x}")
                elif fill := r.byte():
                    yield block, offset, fill
                else:
                    self._zero_run(block)
            elif flags == FLAG_EOS:
                return
            elif flags == FLAG_MEM_SIZE and setup and not self.blocks:
                self._block_list(offset)
            else:
                raise SnapshotError(f"unsupported RAM record flags {flags:#x} in the migration "
                                    "stream (compression, XBZRLE or multifd on?)")

    def _zero_run(self, block: int) -> None:
        """Take the zero-page records of ``block`` that follow in the buffer, at C
        speed for the record layout: most of an idle guest's stream is these."""
        r = self.reader
        buffered = r.buffered()
        seen = self._seen[block]
        end = self.blocks[block].size - self.page_size
        zero = FLAG_ZERO | FLAG_CONTINUE
        mask = self.page_size - 1
        bits = self.page_bits
        n = 0
        size = _ZERO_RECORD.size
        for word, fill in _ZERO_RECORD.iter_unpack(buffered[:len(buffered) // size * size]):
            if word & mask != zero or fill or word ^ zero > end:
                break  # Anything else, bounds errors included, goes the general way.
            seen[word >> bits] = 1
            n += 1
        r.take(n * size)
        self.done += n << bits

    def _block_list(self, total: int) -> None:
        r = self.reader
        listed = 0
        while listed < total:
            block = RamBlock(r.name(), *r.unpack(_BE64))
            if block not in self.known or block in self.blocks:
                raise SnapshotError(f"the migration stream lists RAM block {block.name!r} of "
                                    f"{block.size:#x} bytes, which the monitor does not")
            self.blocks.append(block)
            listed += block.size
        if listed != total:
            raise SnapshotError(f"the RAM blocks in the migration stream add up to {listed:#x} "
                                f"bytes, not {total:#x}")
        self._seen = [bytearray(-(-b.size >> self.page_bits)) for b in self.blocks]

    def excuse(self, block: int, offset: int, size: int) -> None:
        """Expect no pages of ``block`` at ``offset`` (``size`` bytes): QEMU sends
        none of a virtio-mem device's unplugged blocks."""
        seen = self._seen[block]
        first = offset >> self.page_bits
        last = min(-(-(offset + size) >> self.page_bits), len(seen))
        seen[first:last] = b"\1" * max(last - first, 0)

    def _block_named(self, name: str) -> int:
        for i, block in enumerate(self.blocks):
            if block.name == name:
                return i
        raise SnapshotError(f"the migration stream sends pages of RAM block {name!r}, "
                            "which it did not list")

    def _check_complete(self) -> None:
        for block, seen in zip(self.blocks, self._seen, strict=True):
            missing = seen.count(0)
            if missing:
                raise SnapshotError(f"the migration stream ended without {missing} pages of "
                                    f"RAM block {block.name!r}")
