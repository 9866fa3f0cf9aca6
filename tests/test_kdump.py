"""The kdump-compressed writer, without QEMU: guest memory is this process's own."""

import ctypes
import mmap
import os
import random

import pytest

from livedump.errors import UsageError
from livedump.transfer.kdump_copy import _with_kept, guest_reader, write_kdump
from livedump.transfer.memory import (
    ABSENT,
    BackingFiles,
    PageMap,
    ProcessMemory,
    Span,
    check_blocks,
    read_maps,
)
from livedump.transfer.output import Output
from livedump.vmcore.arch import ARCHES
from livedump.vmcore.blocks import Block, without_pages
from livedump.vmcore.elf import Note
from livedump.vmcore.kdump import COMPRESSIONS, Bitmap, KdumpLayout, check_format
from livedump.vmcore.notes import NoCpuNotes

from .kdump_file import read, unflatten

PAGE = 4096
X86_64 = ARCHES["x86_64"]
FLAGS = {"none": 0, "zlib": 0x1, "lzo": 0x2, "snappy": 0x4, "zstd": 0x20}
# Where the test's kernel image says its init_uts_ns is, and its phys_base.
UTS_VA, UTS_PA, PHYS_BASE = 0xFFFFFFFF80001000, 0x3000, 0x2000  # __START_KERNEL_map + pa - base
RELEASE = b"6.1.0-test"


class Guest:
    """Guest RAM in this process: two blocks with a hole between, pages of several
    kinds, some never touched (never populated), and VMCOREINFO with its init_uts_ns."""

    def __init__(self, vmcoreinfo: bool = True) -> None:
        self.low = mmap.mmap(-1, 16 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.high = mmap.mmap(-1, 600 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        rng = random.Random(7)
        self.low[PAGE:2 * PAGE] = bytes(rng.randrange(256) for _ in range(PAGE))  # random
        self.low[5 * PAGE:6 * PAGE] = b"compress me " * (PAGE // 12) + b"x" * (PAGE % 12)
        if vmcoreinfo:
            text = (f"OSRELEASE={RELEASE.decode()}\nPAGESIZE=4096\n"
                    f"SYMBOL(init_uts_ns)={UTS_VA:x}\nOFFSET(uts_namespace.name)=0\n"
                    f"NUMBER(phys_base)={PHYS_BASE}\n").encode()
            self.low[8 * PAGE:8 * PAGE + len(text)] = text
            uts = b"".join(f.ljust(65, b"\0") for f in (
                b"Linux", b"node", RELEASE, b"#1 test", b"x86_64", b"(none)"))
            self.low[UTS_PA:UTS_PA + len(uts)] = uts
        self.high[300 * PAGE:301 * PAGE] = b"\1" * PAGE  # beyond the first chunk
        self.high[599 * PAGE:600 * PAGE] = b"end!" * (PAGE // 4)
        self.low[12 * PAGE:13 * PAGE] = bytes(PAGE)  # touched, but zeros
        self.blocks = [Block(0, 16 * PAGE, _address(self.low)),
                       Block(1 << 20, 600 * PAGE, _address(self.high))]

    def page(self, pfn: int) -> bytes:
        for b, m in zip(self.blocks, (self.low, self.high), strict=True):
            if b.gpa <= pfn * PAGE < b.end:
                at = pfn * PAGE - b.gpa
                return m[at:at + PAGE]
        raise KeyError(pfn)

    def pfns(self) -> list[int]:
        return [b.gpa // PAGE + i for b in self.blocks for i in range(b.size // PAGE)]


def _address(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def dump(guest: Guest, out: Output, compression: str, level: int, budget: int = 0):
    with ProcessMemory(os.getpid()) as memory, PageMap(os.getpid()) as pagemap:
        return write_kdump(out, X86_64, NoCpuNotes("none"), guest.blocks,
                           [[Span(0, b.size, True)] for b in guest.blocks],
                           memory, pagemap, compression, level,
                           Note("LIVEDUMP", 0x4C564450, b"livedump test\n"), workers=2,
                           budget=budget)


# Pages compressed as read (no budget), all waiting, or some of each.
@pytest.mark.parametrize("budget", [0, 1 << 30, 2 * PAGE])
@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("level", [0, 1])
def test_every_page_reads_back_as_it_was(tmp_path, compression, level, budget):
    guest = Guest()
    path = tmp_path / "vmcore"
    with Output(str(path)) as out:
        made = dump(guest, out, compression, level, budget)
        out.commit()
    k = read(path.read_bytes())
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert made.size == path.stat().st_size
    assert k.page == PAGE and k.dump_level == level and k.max_mapnr == (1 << 20) // PAGE + 600
    assert k.status == FLAGS[compression]
    assert k.pfns(k.ram) == guest.pfns() == k.pfns(k.dumpable)  # -d 1 keeps zero pages
    for pfn in guest.pfns():
        assert k.page_at(pfn) == guest.page(pfn), pfn
    assert k.descs[5][2] == FLAGS[compression]  # the repetitive page: compressed
    assert k.descs[1][2] in (0, FLAGS[compression])  # random: stored raw where not smaller
    zeros = [pfn for pfn in guest.pfns() if not any(guest.page(pfn))]
    zero_descs = {k.descs[pfn] for pfn in zeros}
    if level & 1:  # all zero pages share the one page of zeros, first in the data
        assert len(zero_descs) == 1
        [(zero_at, size, flags)] = zero_descs
        assert size == PAGE and flags == 0
        assert zero_at == min(d[0] for d in k.descs.values())
    else:
        assert len(zero_descs) == len(zeros)
    stats = made.stats
    assert stats.zero_pages + stats.stored_pages == len(guest.pfns())
    assert stats.zero_pages == (len(zeros) if level & 1 else 0)
    # Never-populated pages are not read.
    assert stats.read_bytes < sum(b.size for b in guest.blocks)


def test_shared_memory_is_read_from_its_file_creating_no_page(tmp_path):
    """Guest RAM in a memfd this process maps shared and never touches, its data
    (VMCOREINFO and init_uts_ns too) written to the file only: every page, the
    headers' utsname too, is read from the file, and no page gets mapped."""
    guest = Guest()
    size = 16 * PAGE
    fd = os.memfd_create("ram")
    os.ftruncate(fd, size)
    for pfn in range(16):  # the pages of zeros left holes
        if guest.page(pfn) != bytes(PAGE):
            os.pwrite(fd, guest.page(pfn), pfn * PAGE)
    m = mmap.mmap(fd, size)
    try:
        address = _address(m)
        blocks = [Block(0, size, address)]
        with BackingFiles(os.getpid()) as files, ProcessMemory(os.getpid()) as memory, \
                PageMap(os.getpid()) as pagemap, Output(str(tmp_path / "vmcore")) as out:
            spans = [files.spans(blocks[0], check_blocks(blocks, read_maps(os.getpid()))[0])]
            made = write_kdump(out, X86_64, NoCpuNotes("none"), blocks, spans, memory, pagemap,
                               "zstd", 0, Note("LIVEDUMP", 0x4C564450, b"test\n"), workers=2)
            out.commit()
            # The kernel's pages read alone, across holes of the file and its data.
            read_at = guest_reader(memory, blocks, spans, pagemap)
            assert read_at(PAGE - 5, 5 * PAGE + 10) == guest.low[PAGE - 5:6 * PAGE + 5]
            assert read_at(UTS_PA, 5) == b"Linux" and read_at(size - 4, 8) is None
            assert list(pagemap.extents(address, size)) == [(0, size, ABSENT)]
        k = read((tmp_path / "vmcore").read_bytes())
        assert [k.page_at(pfn) for pfn in range(16)] == [guest.page(pfn) for pfn in range(16)]
        assert made.vmcoreinfo.gpa == 8 * PAGE and RELEASE in k.utsname
    finally:
        del address
        m.close()
        os.close(fd)


def test_headers_carry_vmcoreinfo_notes_and_utsname(tmp_path):
    guest = Guest()
    path = tmp_path / "vmcore"
    with Output(str(path)) as out:
        made = dump(guest, out, "zlib", 1)
        out.commit()
    k = read(path.read_bytes())
    assert made.vmcoreinfo.source == "guest" and made.vmcoreinfo.gpa == 8 * PAGE
    assert k.vmcoreinfo.startswith(b"OSRELEASE=" + RELEASE + b"\n")
    assert k.vmcoreinfo == guest.page(8).rstrip(b"\0")
    assert b"VMCOREINFO\0" in k.notes and b"LIVEDUMP\0" in k.notes
    assert k.phys_base == PHYS_BASE
    fields = [k.utsname[i * 65:(i + 1) * 65].rstrip(b"\0") for i in range(6)]
    assert fields == [b"Linux", b"node", RELEASE, b"#1 test", b"x86_64", b"(none)"]
    assert k.nr_cpus == 0  # no NT_PRSTATUS notes given


def test_without_vmcoreinfo_the_machine_is_still_named(tmp_path):
    path = tmp_path / "vmcore"
    with Output(str(path)) as out:
        made = dump(Guest(vmcoreinfo=False), out, "none", 0)
        out.commit()
    k = read(path.read_bytes())
    assert made.vmcoreinfo.source == "none"
    assert k.vmcoreinfo == b"" and k.utsname[4 * 65:4 * 65 + 6] == b"x86_64"


class _Pipe:
    """Output's face to standard output, into bytes."""

    is_stdout = True

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes | memoryview) -> None:
        self.data += data


def test_flattened_stream_is_the_file(tmp_path):
    guest = Guest()
    path = tmp_path / "vmcore"
    with Output(str(path)) as out:
        dump(guest, out, "zstd", 1)
        out.commit()
    pipe = _Pipe()
    dump(guest, pipe, "zstd", 1)  # type: ignore[arg-type]
    restored = unflatten(bytes(pipe.data))
    whole = path.read_bytes()
    # The same file but for the header's timestamp (8 + 4 + 390, padded, 16 bytes).
    assert restored[:408] == whole[:408] and restored[424:] == whole[424:]


def test_layout_places_parts_on_block_boundaries():
    blocks = [Block(0, 640 << 10, 0), Block(1 << 20, 127 << 20, 0)]
    layout = KdumpLayout(X86_64, blocks, PAGE, note_room=5000, excluded=[3, 300])
    assert layout.max_mapnr == 128 << 8
    assert layout.sub_blocks == 2  # 104 bytes of sub-header and 5000 of notes
    assert layout.bitmap_offset == 3 * PAGE
    assert layout.bitmap_size == PAGE  # 32768 pfns: one page of bits each
    assert layout.desc_offset == 5 * PAGE
    assert layout.num_dumpable == 160 + (127 << 8) - 2
    assert layout.data_offset == layout.desc_offset + 24 * layout.num_dumpable
    assert 200 not in layout.ram and 159 in layout.ram and 256 in layout.ram
    assert 3 not in layout.dumpable and 4 in layout.dumpable


def test_only_pieces_with_a_page_kept_are_handed_out_and_all_are_counted():
    blocks = [Block(0, 64 * PAGE, 0), Block(1 << 20, 64 * PAGE, 1 << 30)]
    layout = KdumpLayout(X86_64, blocks, PAGE, note_room=0)
    layout.exclude([*range(0, 20), *range(21, 64), *range(256 + 32, 256 + 64)])
    pieces = [(0, 16 * PAGE, 0), (16 * PAGE, 16 * PAGE, None), (32 * PAGE, 32 * PAGE, 32 * PAGE),
              (1 << 20, 32 * PAGE, 1 << 30), ((1 << 20) + 32 * PAGE, 32 * PAGE, None)]
    work = _with_kept(pieces, layout)
    # pfn 20 is in the second piece, 256-287 in the fourth; the rest is counted with them.
    assert work == [((16 * PAGE, 16 * PAGE, None), 32 * PAGE),
                    (((1 << 20), 32 * PAGE, 1 << 30), 64 * PAGE), ((0, 0, None), 32 * PAGE)]
    assert sum(n for _, n in work) == sum(b.size for b in blocks)


@pytest.mark.parametrize("args, message", [
    (("kdump", None, 32), "dump level 32"),
    (("elf", "zstd", 0), "--compress is for --format kdump"),
])
def test_what_cannot_be_written_is_refused_up_front(args, message):
    with pytest.raises(UsageError, match=message):
        check_format(*args)


def test_every_format_and_level_can_be_taken_live():
    # --live writes kdump through a spool: nothing about the format refuses it.
    check_format("kdump", None, 31)
    check_format("kdump", "none", 1)


def test_other_targets_are_refused():
    with pytest.raises(UsageError, match="x86_64"):
        KdumpLayout(ARCHES["aarch64-le"], [Block(0, PAGE, 0)], PAGE, 0)


def test_pages_left_out_split_the_blocks_that_held_them():
    blocks = [Block(0, 10 * PAGE, 1 << 30), Block(20 * PAGE, 5 * PAGE, 2 << 30)]
    kept, private = without_pages(blocks, [True, False], [0, 3, 4, 9, 21, 24, 24], PAGE)
    assert kept == [Block(PAGE, 2 * PAGE, (1 << 30) + PAGE),
                    Block(5 * PAGE, 4 * PAGE, (1 << 30) + 5 * PAGE),
                    Block(20 * PAGE, PAGE, 2 << 30),
                    Block(22 * PAGE, 2 * PAGE, (2 << 30) + 2 * PAGE)]
    assert private == [True, True, False, False]
    kept, _ = without_pages(blocks, [True, False], [2], PAGE, end=22 * PAGE)
    assert kept == [Block(0, 2 * PAGE, 1 << 30), Block(3 * PAGE, 7 * PAGE, (1 << 30) + 3 * PAGE),
                    Block(20 * PAGE, 2 * PAGE, 2 << 30)]


def test_bitmap_counts_and_runs():
    ram = Bitmap.of_ram([Block(0, 640 << 10, 0), Block(1 << 20, 3 << 20, 0)], PAGE)
    assert ram.size == 1024 and ram.count() == 160 + 768
    assert ram.all_set(0, 160) and ram.all_set(256, 768) and ram.all_set(3, 5)
    assert not ram.all_set(152, 16) and not ram.all_set(1016, 16)
    ram.clear([3, 300])
    assert ram.count() == 160 + 768 - 2 and not ram.all_set(0, 8) and 4 in ram
