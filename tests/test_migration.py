"""The migration stream reader and the page placement of ``--live``, on a real stream.

``tests/data/live`` holds a background snapshot QEMU 7.2 took of a 32 MiB
guest that halts at once, and the monitor's flat view of that guest
(``python3 -m integration.capture_stream tests/data/live``).
"""

import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import given, settings
from hypothesis import strategies as st

from integration.capture_stream import markers
from integration.firmware import X86_HALT
from livedump.errors import SnapshotError
from livedump.live.snapshot import Gathered, Placement, block_of
from livedump.live.stream import MigrationStream, RamBlock, min_page_bits
from livedump.qmp.monitor import parse_ram_blocks
from livedump.qmp.ram_map import parse_flatview
from livedump.transfer.output import Output
from livedump.vmcore.arch import lookup
from livedump.vmcore.blocks import Block
from livedump.vmcore.elf import CoreLayout

DATA = Path(__file__).parent / "data" / "live"
STREAM = (DATA / "stream.qevm").read_bytes()
VIEW = parse_flatview((DATA / "mtree.txt").read_text())
KNOWN = [RamBlock(b.name, b.used)
         for b in parse_ram_blocks((DATA / "ramblock.txt").read_text())]
MiB = 1 << 20
HALT = X86_HALT.build().read_bytes()[0xFFF0:0xFFF4]  # at the reset vector: cli; hlt; jmp
SETUP_END = 255  # where the stream's first "ram" part begins
FIRST_RECORD_END = SETUP_END + 5 + 16  # after the part's header: offset+flags, "pc.ram", 0
EOS = struct.pack(">Q", 0x10)


@contextmanager
def stream_of(data: bytes) -> Iterator[MigrationStream]:
    """A stream reading ``data`` through a file, as livedump reads QEMU's pipe."""
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        yield MigrationStream(os.dup(f.fileno()), "x86_64", KNOWN)


def all_pages(stream: MigrationStream) -> dict[tuple[int, int], bytes | int]:
    stream.wait_snapshot()
    return {(b, off): d if isinstance(d, int) else bytes(d) for b, off, d in stream.pages()}


def test_block_list_is_qemus():
    with stream_of(STREAM) as s:
        blocks = s.read_setup()
    assert blocks[0] == RamBlock("pc.ram", 32 * MiB)
    assert RamBlock("pc.bios", 64 << 10) in blocks
    assert s.page_size == 4096


def test_pages_with_the_markers_and_the_firmware():
    with stream_of(STREAM) as s:
        blocks = s.read_setup()
        pages = all_pages(s)
    ram, bios = 0, [b.name for b in blocks].index("pc.bios")
    for m in markers():
        page = pages[ram, m.gpa & ~4095]
        assert page[m.gpa % 4096:][:len(m.data)] == m.data
    assert pages[bios, 0xF000][0xFF0:0xFF4] == HALT
    # Zero pages come as markers (and are not handed out), the rest in full:
    # and every page came, or pages() would have raised.
    assert all(len(data) == 4096 and any(data) for data in pages.values())
    assert (ram, 0) not in pages
    assert s.reader.consumed == len(STREAM)


def test_placed_into_a_vmcore_at_guest_physical_addresses(tmp_path):
    # One PT_LOAD per dumped range, as if nothing coalesced: placement must
    # follow the layout whatever its blocks are.
    dumped = [fr for fr in VIEW if fr.dumped]
    layout = CoreLayout(lookup("x86_64"), [Block(fr.gpa, fr.size, 0) for fr in dumped], [])
    path = tmp_path / "live.vmcore"
    with stream_of(STREAM) as s, Output(str(path)) as out:
        placement = Placement(layout, VIEW, s.read_setup())
        out.write_at(0, layout.header)
        out.skip(layout.size)
        s.wait_snapshot()
        for page in s.pages():
            placement.place(out, page, s.page_size)
        out.commit()
    assert path.stat().st_size == layout.size
    for m in markers():
        assert read_phys(path, m.gpa, len(m.data)) == m.data
    # The firmware shows twice, below 1 MiB and below 4 GiB: both copies are written.
    for top in (0x10_0000, 0x1_0000_0000):
        assert read_phys(path, top - 16, 4) == HALT
    # Never-written memory is a hole: the file takes far less than 32 MiB.
    assert path.stat().st_blocks * 512 < 4 * MiB


def read_phys(path: Path, gpa: int, size: int) -> bytes:
    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            start = seg["p_paddr"]
            if seg["p_type"] == "PT_LOAD" and start <= gpa < start + seg["p_filesz"]:
                f.seek(seg["p_offset"] + gpa - seg["p_paddr"])
                return f.read(size)
    raise AssertionError(f"{gpa:#x} in no PT_LOAD")


def test_truncated_stream_is_an_error():
    with stream_of(STREAM[:len(STREAM) // 2]) as s:
        s.read_setup()
        with pytest.raises(SnapshotError, match="ended early"):
            all_pages(s)


def test_missing_pages_are_an_error():
    # The setup, then straight to the end of the stream: no page was sent.
    with stream_of(STREAM[:SETUP_END] + b"\x00") as s:
        s.read_setup()
        with pytest.raises(SnapshotError, match="holds no RAM"):
            s.wait_snapshot()
    # The first part's first record (page 0 of pc.ram, zeros), then the end.
    with stream_of(STREAM[:FIRST_RECORD_END] + EOS + b"\x00") as s:
        s.read_setup()
        with pytest.raises(SnapshotError, match="without 8191 pages of RAM block 'pc.ram'"):
            all_pages(s)


def test_unsupported_page_encoding_is_an_error():
    # The first record of the first part, flagged as an XBZRLE page.
    at = SETUP_END + 5
    (word,) = struct.unpack_from(">Q", STREAM, at)
    data = STREAM[:at] + struct.pack(">Q", word | 0x40) + STREAM[at + 8:]
    with stream_of(data) as s:
        s.read_setup()
        with pytest.raises(SnapshotError, match="unsupported RAM record flags 0x42"):
            all_pages(s)


@pytest.mark.parametrize("at, value, message", [
    (0, b"QEVN", "not a QEMU migration stream"),
    (7, b"\x02", "not a QEMU migration stream of version 3"),
])
def test_not_a_stream(at, value, message):
    with stream_of(STREAM[:at] + value + STREAM[at + len(value):]) as s:
        with pytest.raises(SnapshotError, match=message):
            s.read_setup()


def test_page_bits():
    assert min_page_bits("x86_64") == 12
    assert min_page_bits("aarch64") == 10


def test_region_to_block():
    names = ["pc.ram", "0000:00:02.0/vga.vram", "0000:00:03.0/vga.vram", "/rom@etc/acpi/tables"]
    assert block_of("pc.ram", names) == 0
    assert block_of("0000:00:03.0/vga.vram", names) == 2
    with pytest.raises(SnapshotError, match="RAM blocks .* for memory region 'vga.vram'"):
        block_of("vga.vram", names)
    with pytest.raises(SnapshotError, match="no RAM block"):
        block_of("pc.bios", names)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(STREAM) - 1), st.integers(0, 255)),
                min_size=1, max_size=4))
def test_altered_stream_is_read_or_refused(changes):
    """Bytes changed anywhere (the setup, a record, a page): our own error, or pages
    that lie within their blocks."""
    data = bytearray(STREAM)
    for at, value in changes:
        data[at] = value
    with stream_of(bytes(data)) as s:
        try:
            blocks = s.read_setup()
            for block, offset, _page in all_pages_iter(s):
                assert offset + s.page_size <= blocks[block].size
        except SnapshotError as e:
            assert "\n" not in str(e)


def all_pages_iter(s: MigrationStream):
    s.wait_snapshot()
    yield from s.pages()


def test_pages_for_consecutive_offsets_are_written_together(tmp_path):
    class Counted(Output):
        writes: list[tuple[int, int]] = []

        def write_at(self, offset, data):
            self.writes.append((offset, len(data)))
            super().write_at(offset, data)

    path = tmp_path / "gathered"
    pages = [(off, bytes([off // 4096 % 251 + 1]) * 4096) for off in
             [*range(0, 12 * 4096, 4096), 40 * 4096, 41 * 4096, 8 * 4096]]
    with Counted(str(path)) as out:
        gathered = Gathered(out, size=8 * 4096)
        for off, data in pages:
            gathered.write_at(off, data)
        gathered.write_at(100 * 4096, b"x" * (9 * 4096))  # more than it gathers: at once
        gathered.flush()
        out.commit()
    # 0-7 fill it, 8-11 run on, 40-41 after a gap; 8 again (an alias) breaks the run.
    assert Counted.writes == [(0, 8 * 4096), (8 * 4096, 4 * 4096), (40 * 4096, 2 * 4096),
                              (8 * 4096, 4096), (100 * 4096, 9 * 4096)]
    data = path.read_bytes()
    for off, page in pages:
        assert data[off:off + 4096] == page
    assert data[100 * 4096:] == b"x" * (9 * 4096)
