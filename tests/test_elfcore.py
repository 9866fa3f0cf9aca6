"""The ELF writer, read back with pyelftools for every architecture."""

import tempfile

import pytest
from elftools.elf.elffile import ELFFile

from livedump.dump import NT_LIVEDUMP_INFO
from livedump.vmcore.arch import ARCHES, lookup
from livedump.vmcore.blocks import Block
from livedump.vmcore.elf import DATA_ALIGN, CoreLayout, ElfStructs, Note, read_core, read_notes

BLOCKS = [Block(0, 0xA0000, 0x7F00_0000_0000), Block(0xC0000, 0x3FF40000, 0x7F00_000C_0000)]
NOTE = Note("LIVEDUMP", NT_LIVEDUMP_INFO, b"livedump test\n")

# e_machine as pyelftools names it, class, byte order.
EXPECTED = {
    "x86_64": ("EM_X86_64", 64, "ELFDATA2LSB"),
    "386": ("EM_386", 32, "ELFDATA2LSB"),
    "aarch64-le": ("EM_AARCH64", 64, "ELFDATA2LSB"),
    "aarch64-be": ("EM_AARCH64", 64, "ELFDATA2MSB"),
    "ppc64-le": ("EM_PPC64", 64, "ELFDATA2LSB"),
    "ppc64-be": ("EM_PPC64", 64, "ELFDATA2MSB"),
    "s390": ("EM_S390", 64, "ELFDATA2MSB"),
    "arm-le": ("EM_ARM", 32, "ELFDATA2LSB"),
    "arm-be": ("EM_ARM", 32, "ELFDATA2MSB"),
    "riscv64": ("EM_RISCV", 64, "ELFDATA2LSB"),
    "riscv32": ("EM_RISCV", 32, "ELFDATA2LSB"),
    "ppc-be": ("EM_PPC", 32, "ELFDATA2MSB"),
    "ppc-le": ("EM_PPC", 32, "ELFDATA2LSB"),
}


def parse(layout: CoreLayout) -> ELFFile:
    """The layout's header followed by a sparse file's zeros for memory."""
    f = tempfile.TemporaryFile()
    f.write(layout.header)
    f.truncate(layout.size)
    return ELFFile(f)


def test_every_arch_is_covered():
    assert set(EXPECTED) == set(ARCHES)


@pytest.mark.parametrize("name", EXPECTED)
def test_header_per_arch(name):
    machine, bits, data = EXPECTED[name]
    layout = CoreLayout(lookup(name), BLOCKS, [NOTE])
    elf = parse(layout)
    assert elf.header["e_type"] == "ET_CORE"
    assert elf.header["e_machine"] == machine
    assert elf.elfclass == bits and layout.bits == bits
    assert elf.header["e_ident"]["EI_DATA"] == data

    segments = list(elf.iter_segments())
    assert segments[0]["p_type"] == "PT_NOTE"
    notes = list(segments[0].iter_notes())
    assert [(n["n_name"], n["n_type"], n["n_desc"]) for n in notes] == [
        ("LIVEDUMP", NT_LIVEDUMP_INFO, b"livedump test\n")
    ]
    loads = segments[1:]
    assert all(s["p_type"] == "PT_LOAD" for s in loads)
    assert [(s["p_paddr"], s["p_vaddr"], s["p_filesz"], s["p_memsz"]) for s in loads] == [
        (b.gpa, b.gpa, b.size, b.size) for b in BLOCKS
    ]
    assert all(s["p_flags"] == 0 and s["p_align"] == 0 for s in loads)
    assert loads[0]["p_offset"] == layout.data_offset
    assert layout.data_offset % DATA_ALIGN == 0
    assert loads[1]["p_offset"] == loads[0]["p_offset"] + BLOCKS[0].size
    assert layout.size == layout.data_offset + sum(b.size for b in BLOCKS)


@pytest.mark.parametrize("seed, name", [
    ("X86_64", "x86_64"), ("i386", "386"), ("s390x", "s390"), ("aarch64", "aarch64-le"),
    ("ppc64le", "ppc64-le"), ("PPC64-BE", "ppc64-be"), ("armhf", "arm-le"), ("ARM", "arm-le"),
    ("armeb", "arm-be"), ("rv64", "riscv64"), ("riscv32", "riscv32"), ("ppc", "ppc-be"),
])
def test_aliases(seed, name):
    assert lookup(seed).name == name


def test_unknown_arch_is_a_usage_error():
    from livedump.errors import UsageError

    with pytest.raises(UsageError, match="unknown architecture 'mips'.*x86_64"):
        lookup("mips")


def test_386_above_4g_becomes_elf64_like_qemu():
    blocks = [Block(0, 0xA0000, 0), Block(0x1_0000_0000, 0x1000, 0x1000)]
    layout = CoreLayout(lookup("386"), blocks, [NOTE])
    elf = parse(layout)
    assert elf.elfclass == 64 and elf.header["e_machine"] == "EM_386"
    assert [s["p_paddr"] for s in elf.iter_segments()][1:] == [0, 0x1_0000_0000]


def test_386_reaching_4g_is_elf64_like_qemu():
    """QEMU's rule: ELF64 once a block's end passes 0xffffffff, as SeaBIOS's
    ROM at 0xfffc0000-0xffffffff does (integration/test_arches.py, 386-elf64)."""
    below = [Block(0xFFFC0000, 0x3F000, 0)]
    assert CoreLayout(lookup("386"), below, [NOTE]).bits == 32
    reaching = [Block(0xFFFC0000, 0x40000, 0)]
    assert CoreLayout(lookup("386"), reaching, [NOTE]).bits == 64


def test_arm_beyond_elf32_becomes_elf64_like_kexec_tools():
    """An LPAE guest's memory that ELF32 cannot describe: QEMU's own dump cuts it."""
    for size in (0xC000_0000, 0xE000_0000):  # -m 3G, 3584M on virt: QEMU's ELF32 holds them.
        assert CoreLayout(lookup("arm-le"), [Block(0x4000_0000, size, 0)], [NOTE]).bits == 32
    blocks = [Block(0x4000_0000, 0x1000, 0), Block(0x1_0000_0000, 0x1000, 0x1000)]
    elf = parse(CoreLayout(lookup("arm-be"), blocks, [NOTE]))
    assert (elf.elfclass, elf.little_endian, elf.header["e_machine"]) == (64, False, "EM_ARM")
    assert [s["p_paddr"] for s in elf.iter_segments()][1:] == [0x4000_0000, 0x1_0000_0000]
    four_gib = [Block(0x4000_0000, 1 << 32, 0)]  # -m 4G: QEMU writes p_memsz 0.
    assert CoreLayout(lookup("arm-le"), four_gib, [NOTE]).bits == 64


@pytest.mark.parametrize("name", ["riscv32", "ppc-be"])
def test_beyond_elf32_without_an_elf64_form_is_refused(name):
    """ELF64 EM_RISCV is riscv64, and no tool writes ELF64 EM_PPC: a vmcore ELF32
    cannot hold has no right form for these."""
    from livedump.errors import UsageError

    across = [Block(0x8000_0000, 0xC000_0000, 0)]  # -m 3G on riscv32 virt: as QEMU's ELF32.
    assert CoreLayout(lookup(name), across, [NOTE]).bits == 32
    for blocks in ([Block(0x8000_0000, 1 << 32, 0)], [Block(0x1_0000_0000, 0x1000, 0)]):
        with pytest.raises(UsageError, match=f"^guest memory at {blocks[0].gpa:#x}-"
                                             f"{blocks[0].end - 1:#x} does not fit an ELF32 "
                                             f"{name} vmcore"):
            CoreLayout(lookup(name), blocks, [NOTE])


def test_extended_numbering_past_65534_segments():
    blocks = [Block(i * 0x2000, 0x1000, i * 0x2000) for i in range(70000)]
    layout = CoreLayout(lookup("ppc64-be"), blocks, [NOTE])
    elf = parse(layout)
    assert elf.header["e_phnum"] == 0xFFFF
    assert elf.num_segments() == 70001
    assert elf.get_section(0)["sh_info"] == 70001
    last = elf.get_segment(70000)
    assert (last["p_paddr"], last["p_filesz"]) == (69999 * 0x2000, 0x1000)
    assert last["p_offset"] == layout.data_offset + 69999 * 0x1000


def test_just_below_extended_numbering():
    blocks = [Block(i * 0x2000, 0x1000, 0) for i in range(65533)]
    elf = parse(CoreLayout(lookup("x86_64"), blocks, [NOTE]))
    assert elf.header["e_phnum"] == 65534 and elf.header["e_shnum"] == 0


@pytest.mark.parametrize("name", EXPECTED)
def test_read_back_by_our_own_reader(name):
    other = Note("CORE", 1, b"\1\2\3")  # a descriptor that needs padding
    layout = CoreLayout(lookup(name), BLOCKS, [NOTE, other])
    found = read_core(layout.header)
    assert (found.structs.bits, found.structs.little, found.machine) == (
        layout.bits, lookup(name).little_endian, lookup(name).machine)
    assert (found.note_offset, found.note_size) == (layout.note_offset, layout.note_size)
    span = layout.header[found.note_offset : found.note_offset + found.note_size]
    assert list(read_notes(found.structs, span)) == [NOTE, other]


def test_read_core_waits_for_all_program_headers():
    layout = CoreLayout(lookup("x86_64"), BLOCKS, [NOTE])
    phdrs_end = 64 + 3 * 56
    assert all(read_core(layout.header[:n]) is None for n in range(phdrs_end))
    assert read_core(layout.header[:phdrs_end]).note_offset == layout.note_offset


def test_read_core_with_extended_numbering():
    blocks = [Block(i * 0x2000, 0x1000, 0) for i in range(70000)]
    layout = CoreLayout(lookup("aarch64-be"), blocks, [NOTE])
    found = read_core(layout.header)
    assert (found.note_offset, found.note_size) == (layout.note_offset, layout.note_size)
    assert read_core(layout.header[: layout.note_offset - 1]) is None


@pytest.mark.parametrize("data, reason", [
    (b"\x7fELF\x03" + bytes(60), "not an ELF file"),
    (b"MZ" + bytes(100), "not an ELF file"),
])
def test_read_core_refuses_what_is_no_elf(data, reason):
    with pytest.raises(ValueError, match=reason):
        read_core(data)


def test_read_core_refuses_a_core_without_notes():
    layout = CoreLayout(lookup("x86_64"), BLOCKS, [NOTE])
    header = bytearray(layout.header)
    header[64:68] = (1).to_bytes(4, "little")  # the PT_NOTE made a PT_LOAD
    with pytest.raises(ValueError, match="no PT_NOTE"):
        read_core(bytes(header))


def test_a_note_running_past_its_segment_is_refused():
    layout = CoreLayout(lookup("s390"), BLOCKS, [NOTE])
    found = read_core(layout.header)
    span = layout.header[found.note_offset : found.note_offset + found.note_size - 4]
    with pytest.raises(ValueError, match="runs past the end"):
        list(read_notes(found.structs, span))


@pytest.mark.parametrize("bits, little", [(32, True), (64, False)])
def test_records_unpack_their_integers_and_leave_byte_strings_to_slicing(bits, little):
    structs = ElfStructs(bits, little)
    ident = b"\x7fELF".ljust(16, b"\0")
    data = structs.ehdr.pack(e_ident=ident, e_machine=62, e_phoff=structs.ehdr.size, e_phnum=3)
    fields = structs.ehdr.unpack(data)
    assert "e_ident" not in fields
    assert all(type(value) is int for value in fields.values())
    assert (fields["e_machine"], fields["e_phoff"], fields["e_phnum"]) == (62, structs.ehdr.size, 3)
    assert data[:16] == ident


@pytest.mark.parametrize("name", ["x86_64", "arm-be"])
def test_room_after_the_notes_is_outside_pt_note_until_a_note_is_added(name):
    layout = CoreLayout(lookup(name), BLOCKS, [NOTE], room=5000)
    assert layout.data_offset == DATA_ALIGN * 2  # The notes and 5000 bytes: two pages.
    found = read_core(layout.header)
    assert (found.note_offset, found.note_size) == (layout.note_offset, layout.note_size)
    assert layout.header[found.note_offset + found.note_size:] == bytes(
        layout.data_offset - found.note_offset - found.note_size)

    later = Note("VMCOREINFO", 0, b"OSRELEASE=6.1\n" * 100)
    header = bytearray(layout.header)
    for offset, data in layout.add_note(later.encode(layout.structs)):
        header[offset : offset + len(data)] = data
    assert len(header) == layout.data_offset
    found = read_core(bytes(header))
    span = header[found.note_offset : found.note_offset + found.note_size]
    assert list(read_notes(found.structs, bytes(span))) == [NOTE, later]
    with pytest.raises(ValueError, match="does not fit the 5000 reserved"):
        layout.add_note(bytes(5004))
