"""VMCOREINFO found in guest memory: a real page captured from a Debian 6.1
guest, copied through livedump's own streaming (this process's memory
standing in for QEMU's), then read back with pyelftools; and crafted pages
that look like it and must not pass."""

import os
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from livedump.dump import NT_LIVEDUMP_INFO, provenance_note
from livedump.transfer.copier import Writer, copy
from livedump.transfer.memory import Buffer, PageMap, ProcessMemory, Span
from livedump.transfer.output import Output
from livedump.vmcore.arch import lookup
from livedump.vmcore.blocks import Block
from livedump.vmcore.elf import CoreLayout, ElfStructs, Note
from livedump.vmcore.notes import QemuNotes
from livedump.vmcore.notes import parse as parse_qemu
from livedump.vmcore.vmcoreinfo import (
    Invalid,
    Result,
    Search,
    parse,
    x86_64_mapping,
    x86_64_translate,
)
from livedump.vmcore.x86_notes import QEMU_CPU_STATE, x86_page_tables

from .conftest import DATA

RELEASE = "6.1.0-56-amd64"
# The page ``vmcoreinfo_data`` of the test guest (integration/linux_guest.py),
# as livedump found it at guest-physical 0x1376000.
PAGE = (DATA / f"vmcoreinfo-{RELEASE}.page").read_bytes()
TEXT = PAGE.rstrip(b"\0")
GPA = 0x1376000
# SYMBOL(init_uts_ns) - __START_KERNEL_map + NUMBER(phys_base) of that page;
# OFFSET(uts_namespace.name) is 0, and the release follows two 65-byte fields.
UTS_RELEASE = 0xFFFFFFFF941FB000 - 0xFFFFFFFF80000000 + 1186988032 + 130
MIB = 1 << 20
X86_64 = lookup("x86_64")


def guest_memory(contents: dict[int, bytes]) -> tuple[list[Block], list[Buffer]]:
    """Blocks of 1 MiB at each MiB that ``contents`` writes to, backed by buffers
    of this process; a little noise in each, so that no chunk is all zeros."""
    buffers: dict[int, Buffer] = {}
    for gpa, data in contents.items():
        base = gpa - gpa % MIB
        buf = buffers.setdefault(base, Buffer(MIB))
        buf.data[-16:] = b"noise, not zero."
        buf.data[gpa - base : gpa - base + len(data)] = data
    blocks = [Block(base, MIB, buf.address) for base, buf in sorted(buffers.items())]
    return blocks, [buffers[b.gpa] for b in blocks]


def dump(path: Path, contents: dict[int, bytes], arch=X86_64, cpu="no CPU notes") -> Result:
    """Stream a vmcore of ``contents`` to ``path`` as dump.py does; what was found."""
    blocks, _buffers = guest_memory(contents)
    search = Search(arch, cpu, to_stdout=False)
    with Output(str(path)) as out, Writer(out) as writer:
        layout = CoreLayout(arch, blocks, [provenance_note(1)], search.room)
        writer.inspect = search.inspector(layout)
        copy(layout, [[Span(0, b.size, False)] for b in blocks], ProcessMemory(os.getpid()),
             PageMap(os.getpid()), writer)
        writer.finish()
        result = search.finish(out)
        out.commit()
    return result


def notes(path: Path) -> list[tuple[str, int, bytes]]:
    with open(path, "rb") as f:
        elf = ELFFile(f)
        [segment] = [s for s in elf.iter_segments() if s["p_type"] == "PT_NOTE"]
        return [(n["n_name"], n["n_type"], n["n_descdata"]) for n in segment.iter_notes()]


def real_guest() -> dict[int, bytes]:
    return {GPA: PAGE, UTS_RELEASE: RELEASE.encode() + b"\0"}


def test_the_real_page_is_parsed():
    entries = parse(TEXT)
    assert entries["OSRELEASE"] == RELEASE
    assert entries["PAGESIZE"] == "4096"
    assert entries["KERNELOFFSET"] == "11600000"
    assert len(entries) > 100


def test_the_real_page_is_found_and_written_after_the_notes(tmp_path):
    result = dump(tmp_path / "core", real_guest())
    assert (result.source, result.gpa, result.release) == ("guest", GPA, RELEASE)
    assert f"at GPA {GPA:#x}" in result.detail
    [(owner, ours, _), (name, type_, text)] = notes(tmp_path / "core")
    assert (owner, ours) == ("LIVEDUMP", NT_LIVEDUMP_INFO)
    assert (name, type_, text) == ("VMCOREINFO", 0, TEXT)


def test_without_a_find_the_room_is_zeros_outside_the_notes(tmp_path):
    result = dump(tmp_path / "core", {0x100000: b"firmware, not Linux"})
    assert result.source == "none" and "none found" in result.detail
    [(name, type_, _)] = notes(tmp_path / "core")  # No placeholder for readers to show.
    assert (name, type_) == ("LIVEDUMP", NT_LIVEDUMP_INFO)
    with open(tmp_path / "core", "rb") as f:
        elf = ELFFile(f)
        [note] = [s for s in elf.iter_segments() if s["p_type"] == "PT_NOTE"]
        [first, *_] = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        end = note["p_offset"] + note["p_filesz"]
        f.seek(end)
        room = f.read(first["p_offset"] - end)
    assert room == bytes(len(room)) and len(room) >= 4096 + 24


@pytest.mark.parametrize("arch", ["s390", "386"])
def test_the_note_is_encoded_for_every_class_and_byte_order(tmp_path, arch):
    # Neither has a rule to find init_uts_ns: found, but said to be unchecked.
    result = dump(tmp_path / "core", {GPA: PAGE}, lookup(arch))
    assert result.source == "guest" and "not cross-checked" in result.detail
    assert notes(tmp_path / "core")[1:] == [("VMCOREINFO", 0, TEXT)]


def test_a_page_from_an_earlier_kernel_is_refused(tmp_path):
    # Its init_uts_ns address now holds something else.
    result = dump(tmp_path / "core", {GPA: PAGE, UTS_RELEASE: b"5.10.0-30-amd64\0"})
    assert result.source == "none" and "stale" in result.detail
    assert [n[0] for n in notes(tmp_path / "core")] == ["LIVEDUMP"]


def test_two_different_valid_pages_are_both_refused(tmp_path):
    later = TEXT + b"CRASHTIME=1700000000\n"
    result = dump(tmp_path / "core", real_guest() | {GPA + 0x3000: later})
    assert result.source == "none" and "2 different" in result.detail


def test_the_same_text_twice_is_one_find(tmp_path):
    result = dump(tmp_path / "core", real_guest() | {GPA + 0x5000: PAGE})
    assert (result.source, result.gpa) == ("guest", GPA)


def _replace(old: bytes, new: bytes) -> bytes:
    assert old in TEXT
    return TEXT.replace(old, new)


@pytest.mark.parametrize("text, why", [
    (b"OSRELEASE=6.1.0\nPAGESIZE=4096\n", "lacks SYMBOL(init_uts_ns)"),
    (_replace(b"PAGESIZE=4096\n", b"PAGESIZE=4096\nnot a key value line\n"), "malformed line"),
    (_replace(b"PAGESIZE=4096", b"PAGESIZE=1000"), "not a page size"),
    (_replace(b"PAGESIZE=4096", b"PAGESIZE=8192"), "not aligned"),
    (_replace(b"NUMBER(phys_base)=1186988032\n", b""), "lacks phys_base"),
    (TEXT[:-1], "newline"),
    (TEXT + b"\0junk after the end", "zeros"),
    (b"OSRELEASE=" + b"A" * 4096, "no end"),
    (_replace(b"PAGESIZE=4096", b"PAGESIZE=4096\xff"), "malformed line"),
])
def test_look_alikes_are_refused(tmp_path, text, why):
    # At an odd 4 KiB page: aligned for PAGESIZE=4096 only.
    result = dump(tmp_path / "core", {GPA + 0x1000: text, UTS_RELEASE: RELEASE.encode()})
    assert result.source == "none"
    assert why in result.detail


def test_a_page_not_at_a_page_boundary_is_not_looked_at(tmp_path):
    result = dump(tmp_path / "core", {GPA + 64: PAGE[:-64], UTS_RELEASE: RELEASE.encode()})
    assert result.source == "none" and "rejected" not in result.detail


def test_parse_refuses_what_readers_could_not_use():
    with pytest.raises(Invalid, match="begin with OSRELEASE"):
        parse(b"PAGESIZE=4096\nOSRELEASE=6.1\nSYMBOL(init_uts_ns)=ffff\n")


def test_qemus_own_note_is_carried_and_not_looked_for():
    qemu = QemuNotes(X86_64, b"", ("CORE", "QEMU", "VMCOREINFO"))
    search = Search(X86_64, qemu, to_stdout=False)
    assert search.room == 0
    layout = CoreLayout(X86_64, [Block(0, MIB, 0)], [], search.room)
    assert search.inspector(layout) is None
    assert search.finish(None).source == "qemu"


def test_qemus_notes_without_it_get_room_for_it():
    qemu = QemuNotes(X86_64, b"", ("CORE", "QEMU"))
    assert Search(X86_64, qemu, to_stdout=False).room == 4096 + 24
    assert Search(lookup("aarch64-le"), qemu, to_stdout=False).room == 65536 + 24


def test_standard_output_keeps_the_room_unused_and_says_why():
    search = Search(X86_64, "no CPU notes", to_stdout=True)
    assert search.room == 4096 + 24  # The bytes a file would hold.
    layout = CoreLayout(X86_64, [Block(0, MIB, 0)], [provenance_note(1)], search.room)
    assert search.inspector(layout) is None
    result = search.finish(None)
    assert result.source == "none" and "standard output" in result.detail


def test_a_search_finished_without_its_layout_is_a_bug_not_a_result():
    search = Search(X86_64, "no CPU notes", to_stdout=False)
    with pytest.raises(RuntimeError, match="before inspector"):
        search.finish(None)


def test_look_alikes_at_every_other_offset_hide_nothing(tmp_path):
    # A MiB where OSRELEASE= begins every 10 bytes but at no page start.
    spam = (b"y" + b"OSRELEASE=" * 409 + b"zzzzz") * 255
    result = dump(tmp_path / "core", {0x1000000: spam} | real_guest())
    assert (result.source, result.gpa) == ("guest", GPA)


def test_a_guest_full_of_look_alikes_gets_no_vmcoreinfo(tmp_path):
    fakes = {GPA + 0x1000 * (i + 1): b"OSRELEASE=fake\n" for i in range(64)}
    result = dump(tmp_path / "core", real_guest() | fakes)
    assert result.source == "none" and "more than 64 pages" in result.detail


INIT_UTS_NS = 0xFFFFFFFF941FB000  # SYMBOL(init_uts_ns) of the real page
TABLES = 0x3000000  # where the crafted page tables go


def page_tables(va: int, pa: int) -> dict[int, bytes]:
    """4-level x86_64 tables at TABLES that map the 2 MiB page of ``va`` to ``pa``'s."""
    def entry(address: int, huge: bool = False) -> bytes:
        return (address | 1 | (1 << 7 if huge else 0)).to_bytes(8, "little")
    return {TABLES + (va >> 39 & 511) * 8: entry(TABLES + 0x1000),
            TABLES + 0x1000 + (va >> 30 & 511) * 8: entry(TABLES + 0x2000),
            TABLES + 0x2000 + (va >> 21 & 511) * 8: entry(pa & -(2 << 20), huge=True)}


def qemu_notes(cr3: int) -> QemuNotes:
    state = QEMU_CPU_STATE.pack(version=1, size=QEMU_CPU_STATE.size, cr3=cr3)
    data = Note("QEMU", 0, state).encode(ElfStructs(64, True))
    return QemuNotes(X86_64, data, ("QEMU",))


def test_x86_64_translate_walks_to_a_2mib_page():
    memory = page_tables(INIT_UTS_NS, UTS_RELEASE - 130)

    def read_at(gpa, n):
        return memory.get(gpa, bytes(8))
    assert x86_64_translate(TABLES, INIT_UTS_NS + 130, 4, read_at) == UTS_RELEASE
    assert x86_64_translate(TABLES, INIT_UTS_NS + (4 << 20), 4, read_at) is None


def test_x86_64_mapping_says_how_far_the_2mib_page_goes_on():
    memory = page_tables(INIT_UTS_NS, UTS_RELEASE - 130)

    def read_at(gpa, n):
        return memory.get(gpa, bytes(8))
    # INIT_UTS_NS lies 0x1fb000 into its 2 MiB page: 0x5000 bytes of it are left.
    assert x86_64_mapping(TABLES, INIT_UTS_NS + 130, 4, read_at) == (UTS_RELEASE, 0x5000 - 130)
    assert x86_64_mapping(TABLES, INIT_UTS_NS + (4 << 20), 4, read_at) is None


def test_of_two_valid_pages_the_one_the_vcpus_page_tables_map_is_chosen(tmp_path):
    # An earlier kernel's page, 16 MiB further in both spaces, with its release in place.
    earlier = TEXT.replace(b"SYMBOL(init_uts_ns)=ffffffff941fb000",
                           b"SYMBOL(init_uts_ns)=ffffffff951fb000")
    contents = (real_guest() | page_tables(INIT_UTS_NS, UTS_RELEASE - 130)
                | {GPA + 0x3000: earlier, UTS_RELEASE + (16 << 20): RELEASE.encode()})
    # CR3 as with page-table isolation, in user mode: the user half of the pair.
    result = dump(tmp_path / "core", contents, cpu=qemu_notes(TABLES | 1 << 12))
    assert (result.source, result.gpa) == ("guest", GPA), result
    assert f"GPA {GPA + 0x3000:#x} is an earlier kernel's" in result.detail


def test_an_earlier_kernels_page_whose_image_is_overwritten_is_named_in_the_report(tmp_path):
    # After a reboot the new kernel may overwrite the earlier one's image but not its
    # VMCOREINFO page: the page fails the release check, and the report says so.
    earlier = TEXT.replace(b"SYMBOL(init_uts_ns)=ffffffff941fb000",
                           b"SYMBOL(init_uts_ns)=ffffffff951fb000")
    contents = (real_guest() | page_tables(INIT_UTS_NS, UTS_RELEASE - 130)
                | {GPA + 0x3000: earlier, UTS_RELEASE + (16 << 20): b"5.10.0-99-amd64"})
    result = dump(tmp_path / "core", contents, cpu=qemu_notes(TABLES))
    assert (result.source, result.gpa) == ("guest", GPA), result
    assert f"GPA {GPA + 0x3000:#x} set aside: init_uts_ns" in result.detail, result
    assert "a stale page" in result.detail


@pytest.mark.parametrize("capture", sorted(DATA.glob("*one-page*.vmcore")), ids=lambda p: p.stem)
def test_page_table_roots_are_read_from_qemus_captured_notes(capture):
    notes = parse_qemu(capture.read_bytes())
    roots = x86_page_tables(notes)
    if notes.arch.machine in (X86_64.machine, lookup("386").machine):
        assert len(roots) == notes.names.count("QEMU") >= 1
    else:
        assert roots == []
