"""--core's reading of a core file: its headers and notes, its memory by
address, and a zstd-compressed core read out of order."""

import io
import os
import random
import struct
from pathlib import Path

import pytest
import zstandard

from livedump.coredump import elfcore, image
from livedump.coredump.session import CoreMemory
from livedump.errors import CoreFileError, GuestMemoryError
from livedump.transfer.memory import Buffer

PAGE = 4096


def note(name: bytes, n_type: int, desc: bytes) -> bytes:
    name += b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), n_type) + pad(name) + pad(desc)


def make_core(path: Path, loads: list[tuple[int, bytes, int]]) -> bytes:
    """A little-endian ELF64 core: the notes a kernel writes that --core reads,
    then ``loads`` as (address, bytes in the file, size in memory)."""
    files = [(0x400000, 0x401000, 0), (0x401000, 0x402000, 1)]
    names = b"/usr/bin/qemu-system-x86_64\0/usr/bin/qemu-system-x86_64\0"
    nt_file = struct.pack("<QQ", len(files), PAGE) + b"".join(
        struct.pack("<QQQ", *f) for f in files) + names
    psinfo = bytearray(136)
    struct.pack_into("<i", psinfo, 24, 4242)
    psinfo[56:56 + 19] = b"qemu-system-x86_64 "
    notes = (note(b"CORE", elfcore.NT_PRPSINFO, bytes(psinfo))
             + note(b"CORE", elfcore.NT_AUXV, struct.pack("<QQQQ", elfcore.AT_ENTRY, 0x401010,
                                                           0, 0))
             + note(b"CORE", elfcore.NT_FILE, nt_file))
    phnum = 1 + len(loads)
    at = 64 + 56 * phnum
    phdrs = [struct.pack("<IIQQQQQQ", elfcore.PT_NOTE, 0, at, 0, 0, len(notes), 0, 4)]
    at += len(notes)
    body = bytearray(notes)
    for address, data, memsz in loads:
        phdrs.append(struct.pack("<IIQQQQQQ", elfcore.PT_LOAD, 4, at, address, 0, len(data),
                                 memsz, PAGE))
        body += data
        at += len(data)
    ehdr = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack(
        "<HHIQQQIHHHHHH", elfcore.ET_CORE, 62, 1, 0, 64, 0, 0, 64, 56, phnum, 0, 0, 0)
    content = ehdr + b"".join(phdrs) + bytes(body)
    path.write_bytes(content)
    return content


def test_headers_and_notes_of_a_core(tmp_path):
    make_core(tmp_path / "core", [(0x10000, b"a" * PAGE, PAGE)])
    core = image.open_core(str(tmp_path / "core"))
    header = elfcore.read_header(core.pread, "core")
    assert (header.bits, header.byteorder, header.type) == (64, "little", elfcore.ET_CORE)
    found = {t: d for n, t, d in elfcore.read_notes(core.pread, header, "core")}
    assert elfcore.prpsinfo(found[elfcore.NT_PRPSINFO], 64, "little") == (
        4242, "qemu-system-x86_64")
    assert elfcore.auxv(found[elfcore.NT_AUXV], 64, "little") == {elfcore.AT_ENTRY: 0x401010}
    assert elfcore.file_mappings(found[elfcore.NT_FILE], 64, "little") == [
        elfcore.FileMapping(0x400000, 0x401000, 0, "/usr/bin/qemu-system-x86_64"),
        elfcore.FileMapping(0x401000, 0x402000, PAGE, "/usr/bin/qemu-system-x86_64")]
    core.close()


@pytest.mark.parametrize("cut", [3, 40, 100])
def test_a_core_cut_within_its_headers_is_refused(tmp_path, cut):
    content = make_core(tmp_path / "core", [(0x10000, b"a" * PAGE, PAGE)])
    (tmp_path / "core").write_bytes(content[:cut])
    core = image.open_core(str(tmp_path / "core"))
    with pytest.raises(CoreFileError):
        header = elfcore.read_header(core.pread, "core")
        elfcore.read_notes(core.pread, header, "core")


def test_memory_by_address_across_segments_and_what_the_core_lacks(tmp_path):
    first, second = os.urandom(2 * PAGE), os.urandom(PAGE)
    make_core(tmp_path / "core", [(0x10000, first, 2 * PAGE), (0x12000, second, 2 * PAGE),
                                  (0x20000, b"", 4 * PAGE)])
    core = image.open_core(str(tmp_path / "core"))
    header = elfcore.read_header(core.pread, "core")
    memory = CoreMemory(core, header.segments[1:], "core")
    buf = Buffer(4 * PAGE)
    assert bytes(memory.read(buf, 3 * PAGE, 0x10000)) == first + second  # two segments
    with pytest.raises(GuestMemoryError, match="not dumped"):
        memory.read(buf, 2 * PAGE, 0x12000)  # its second page is not in the file
    with pytest.raises(GuestMemoryError, match="not in the core"):
        memory.read(buf, 8, 0x30000)
    with pytest.raises(GuestMemoryError, match="not dumped"):
        memory.read(buf, 8, 0x20000)  # a segment with nothing in the file
    # The copy: a segment with nothing in the file is a hole, the rest read.
    assert list(memory.extents(0x20000, 4 * PAGE)) == [(0, 4 * PAGE, False)]
    assert [e[2] for e in memory.extents(0x10000, 3 * PAGE)] == [True] * len(
        list(memory.extents(0x10000, 3 * PAGE)))
    core.close()


def zst(path: Path) -> Path:
    """``path`` compressed as the zstd program does by default (with a checksum)."""
    out = path.with_name(path.name + ".zst")
    out.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(path.read_bytes()))
    return out


def test_zstd_core_read_in_any_order(tmp_path, monkeypatch):
    """Random reads of a compressed file equal the file's bytes: kept spans
    from memory, recent ones from the window, earlier ones by a restart."""
    monkeypatch.setattr(image, "_PIECE", 4096)
    monkeypatch.setattr(image, "_WINDOW", 4 * 4096)
    rng = random.Random(1)
    data = bytes(rng.getrandbits(8) for _ in range(300_000))
    (tmp_path / "f").write_bytes(data)
    zst(tmp_path / "f")
    core = image.open_core(str(tmp_path / "f.zst"))
    assert isinstance(core, image.ZstdCore)
    # gcore puts its notes last: read before the pass that keeps what lies before them.
    assert core.pread(290_000, 100) == data[290_000:290_100]
    core.keep([(100_000, 5000), (250_000, 3000)])
    assert core.restarts == 0
    for offset, size in [(100_100, 100), (250_500, 2000), (0, 10), (120_000, 9000),
                         (119_000, 1500)]:
        assert core.pread(offset, size) == data[offset : offset + size]
    restarts = core.restarts
    for offset in range(0, 290_000, 7919):  # in order: no restart
        assert core.pread(offset, 8000) == data[offset : offset + 8000]
    assert core.restarts == restarts + 1  # 0 lies before what was read last
    assert core.pread(299_990, 100) == data[299_990:]  # short at the end
    view = memoryview(bytearray(100))
    with pytest.raises(CoreFileError, match="truncated"):
        core.readinto(view, 299_990)
    core.close()


def test_truncated_zstd_core_is_refused_where_read(tmp_path):
    (tmp_path / "f").write_bytes(os.urandom(1 << 20))
    zst(tmp_path / "f")
    os.truncate(tmp_path / "f.zst", os.path.getsize(tmp_path / "f.zst") // 2)
    core = image.open_core(str(tmp_path / "f.zst"))
    with pytest.raises(CoreFileError, match="truncated"):
        core.readinto(memoryview(bytearray(1 << 20)), 0)
    core.close()


def test_zstd_core_keeps_zeros_as_references(tmp_path, monkeypatch):
    """A kept segment mostly zeros (TCG's code buffer) costs memory only for its data."""
    monkeypatch.setattr(image, "_PIECE", 4096)
    monkeypatch.setattr(image, "_ZEROS", bytes(4096))
    data = os.urandom(10_000) + bytes(200_000) + os.urandom(10_000)
    (tmp_path / "f").write_bytes(data)
    zst(tmp_path / "f")
    core = image.open_core(str(tmp_path / "f.zst"))
    assert isinstance(core, image.ZstdCore)
    core.keep([(0, len(data))])
    held = sum(len(k) for k in core._kept if isinstance(k, bytes))
    assert 20_000 <= held < 40_000
    for offset, size in [(9_000, 5_000), (0, len(data)), (205_000, 15_000)]:
        assert core.pread(offset, size) == data[offset : offset + size]
    core.close()


def test_zstd_core_needs_no_zstd_program(tmp_path, monkeypatch):
    data = os.urandom(100_000)
    (tmp_path / "f").write_bytes(data)
    monkeypatch.setenv("PATH", str(tmp_path))
    core = image.open_core(str(zst(tmp_path / "f")))
    assert core.pread(0, len(data) + 1) == data
    core.close()


def compressible(size: int) -> bytes:
    """Random bytes, zeros and a pattern: raw, RLE and compressed blocks."""
    rng = random.Random(2)
    data = rng.randbytes(200_000) + bytes(400_000) + b"0123456789abcdef" * 30_000
    return (data * (size // len(data) + 1))[:size]


def test_zstd_core_of_several_frames(tmp_path):
    """Frames one after another, and a skippable frame between (the zstd
    program reads them all as one stream)."""
    data = compressible(3 << 20)
    half = len(data) // 2
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    (tmp_path / "f.zst").write_bytes(
        zstandard.ZstdCompressor().compress(data[:half]) + skippable
        + zstandard.ZstdCompressor(write_checksum=True, write_content_size=False)
        .compress(data[half:]))
    core = image.open_core(str(tmp_path / "f.zst"))
    assert core.pread(0, len(data) + 1) == data
    core.close()


def blocks(data: bytes) -> tuple[bytes, list[int]]:
    """``data`` as one zstd frame with a checksum, and where some of its
    blocks end: cut there, the library's reader just stops."""
    out = io.BytesIO()
    writer = zstandard.ZstdCompressor(write_checksum=True).stream_writer(out, closefd=False)
    ends = []
    for at in range(0, len(data), 500_000):
        writer.write(data[at : at + 500_000])
        writer.flush(zstandard.FLUSH_BLOCK)
        ends.append(out.tell())
    writer.close()
    return out.getvalue(), ends


@pytest.mark.parametrize("cut", ["header", "middle", "block end", "checksum"])
def test_zstd_core_cut_anywhere_is_truncated(tmp_path, cut):
    """Cut short anywhere, even where a block ends: one CoreFileError, read to
    the end in any way; only a cut in the checksum loses no data."""
    data = compressible(3 << 20)
    whole, ends = blocks(data)
    at = {"header": 6, "middle": len(whole) // 2, "block end": ends[2],
          "checksum": len(whole) - 2}[cut]
    (tmp_path / "f.zst").write_bytes(whole[:at])
    for read in ("pread", "readinto", "keep"):
        core = image.open_core(str(tmp_path / "f.zst"))
        assert isinstance(core, image.ZstdCore)
        if cut == "checksum" and read != "pread":
            assert core.pread(0, len(data)) == data
        else:
            with pytest.raises(CoreFileError, match="truncated"):
                if read == "pread":
                    core.pread(0, len(data) + 1)
                elif read == "readinto":
                    core.readinto(memoryview(bytearray(len(data))), 0)
                else:
                    core.keep([(len(data) - 100, 100)])
        core.close()
    (tmp_path / "f.zst").write_bytes(whole)
    core = image.open_core(str(tmp_path / "f.zst"))
    assert core.pread(0, len(data) + 1) == data
    core.close()


def test_corrupt_zstd_core_is_refused(tmp_path):
    data = os.urandom(300_000) + b"abc" * 100_000
    compressed = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(data))
    compressed[-100] ^= 0xFF  # in the last, compressed block (or else its checksum fails)
    (tmp_path / "f.zst").write_bytes(compressed)
    core = image.open_core(str(tmp_path / "f.zst"))
    with pytest.raises(CoreFileError, match="cannot be decompressed"):
        core.pread(0, len(data))
    core.close()
