"""The ELF core file: record layouts and where each part of a vmcore goes.

Every record is declared once, as named fields of abstract kinds; the
kinds resolve to sizes per ELF class and the byte order is chosen per
target, so one table serves 32/64-bit and little/big-endian cores.

The whole layout is computed from the block list before any memory is
read, so the file can be written front to back in one pass (a pipe works).

Conventions, and why:

* PT_NOTE comes first, then one PT_LOAD per block, in guest-physical order.
* ``p_vaddr`` equals ``p_paddr``, and ``p_flags`` and ``p_align`` are 0:
  QEMU's ``dump-guest-memory`` (paging off) writes the same, and tools
  that read its vmcores read ours.
* Memory starts at a page-aligned file offset (QEMU packs it right after
  the notes). Aligned pages let readers mmap the file and let zero pages
  become filesystem holes.
* A 32-bit target's vmcore is ELF32 while its addresses, sizes and file
  offsets fit ELF32's fields, as QEMU's is (a segment may run past 4 GiB).
  Beyond, QEMU's own dump cuts them to 32 bits; livedump writes ELF64 with
  the same ``e_machine`` instead, as kexec-tools does for Arm, or refuses
  where readers would not take that for the same architecture (ELF64
  EM_RISCV is riscv64; no tool knows ELF64 EM_PPC).
  For i386 QEMU's rule holds: ELF64 once memory reaches 4 GiB.
* More than 65534 program headers use extended numbering: ``e_phnum`` is
  PN_XNUM and section header 0 holds the real count in ``sh_info``.
"""

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from livedump.errors import UsageError
from livedump.vmcore.arch import Arch
from livedump.vmcore.blocks import Block

ET_CORE = 4
EV_CURRENT = 1
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2
PT_LOAD, PT_NOTE = 1, 4
PN_XNUM = 0xFFFF
DATA_ALIGN = 4096  # memory starts page-aligned in the file

# "long" is C's long of the target, for records other than ELF's own (notes).
_SIZES = {
    32: {"half": "H", "word": "I", "addr": "I", "off": "I", "xword": "I", "long": "I"},
    64: {"half": "H", "word": "I", "addr": "Q", "off": "Q", "xword": "Q", "long": "Q"},
}

_EHDR = (
    ("e_ident", "16s"), ("e_type", "half"), ("e_machine", "half"),
    ("e_version", "word"), ("e_entry", "addr"), ("e_phoff", "off"),
    ("e_shoff", "off"), ("e_flags", "word"), ("e_ehsize", "half"),
    ("e_phentsize", "half"), ("e_phnum", "half"), ("e_shentsize", "half"),
    ("e_shnum", "half"), ("e_shstrndx", "half"),
)
# p_flags moved in ELF64 to keep the 64-bit fields aligned.
_PHDR = {
    32: (
        ("p_type", "word"), ("p_offset", "off"), ("p_vaddr", "addr"),
        ("p_paddr", "addr"), ("p_filesz", "word"), ("p_memsz", "word"),
        ("p_flags", "word"), ("p_align", "word"),
    ),
    64: (
        ("p_type", "word"), ("p_flags", "word"), ("p_offset", "off"),
        ("p_vaddr", "addr"), ("p_paddr", "addr"), ("p_filesz", "xword"),
        ("p_memsz", "xword"), ("p_align", "xword"),
    ),
}
_SHDR = (
    ("sh_name", "word"), ("sh_type", "word"), ("sh_flags", "xword"),
    ("sh_addr", "addr"), ("sh_offset", "off"), ("sh_size", "xword"),
    ("sh_link", "word"), ("sh_info", "word"), ("sh_addralign", "xword"),
    ("sh_entsize", "xword"),
)
_NHDR = (("n_namesz", "word"), ("n_descsz", "word"), ("n_type", "word"))


class Record:
    """A fixed binary record; fields not given to :meth:`pack` are zero.

    A field's kind is an abstract size from ``_SIZES`` or a struct code;
    ``Ns`` fields are byte strings, all others integers.
    """

    def __init__(self, fields: Sequence[tuple[str, str]], bits: int, little: bool) -> None:
        self.names = tuple(name for name, _ in fields)
        codes = [_SIZES[bits].get(kind, kind) for _, kind in fields]
        self._integer = tuple(not code.endswith("s") for code in codes)
        self._struct = struct.Struct(("<" if little else ">") + "".join(codes))
        self.size = self._struct.size

    def pack(self, **values: int | bytes) -> bytes:
        unknown = values.keys() - set(self.names)
        if unknown:
            raise TypeError(f"unknown fields {sorted(unknown)}")
        return self._struct.pack(*(values.get(name, 0) for name in self.names))

    def unpack(self, data: bytes) -> dict[str, int]:
        """The integer fields at the start of ``data``, by name. Byte strings
        (``e_ident``, ``pr_reg``) are not numbers: slice ``data`` for them."""
        return {name: value for name, integer, value
                in zip(self.names, self._integer, self._struct.unpack_from(data), strict=True)
                if integer}


class ElfStructs:
    """The records of one ELF class and byte order."""

    def __init__(self, bits: int, little: bool) -> None:
        self.bits = bits
        self.little = little
        self.ehdr = Record(_EHDR, bits, little)
        self.phdr = Record(_PHDR[bits], bits, little)
        self.shdr = Record(_SHDR, bits, little)
        self.nhdr = Record(_NHDR, bits, little)


@dataclass(frozen=True)
class Note:
    """One ELF note: owner name, type and descriptor bytes."""

    name: str
    type: int
    desc: bytes

    def encode(self, structs: ElfStructs) -> bytes:
        name = self.name.encode() + b"\0"
        head = structs.nhdr.pack(n_namesz=len(name), n_descsz=len(self.desc), n_type=self.type)
        return head + _pad4(name) + _pad4(self.desc)


def read_notes(structs: ElfStructs, data: bytes) -> Iterator[Note]:
    """The notes of a PT_NOTE segment's bytes, in order."""
    at, head = 0, structs.nhdr
    while at + head.size <= len(data):
        n = head.unpack(data[at : at + head.size])
        name = at + head.size
        desc = name + _align(n["n_namesz"], 4)
        if desc + n["n_descsz"] > len(data):
            raise ValueError(f"note at {at:#x} runs past the end of its segment")
        yield Note(data[name : name + n["n_namesz"]].rstrip(b"\0").decode("ascii", "replace"),
                   n["n_type"], data[desc : desc + n["n_descsz"]])
        at = desc + _align(n["n_descsz"], 4)


@dataclass(frozen=True)
class CoreFile:
    """What livedump reads of a vmcore another tool wrote: its ELF identity, and
    where its notes are."""

    structs: ElfStructs
    machine: int
    note_offset: int
    note_size: int


def read_core(data: bytes) -> CoreFile | None:
    """The header of the vmcore that ``data`` begins; None until its program
    headers are all in. Raises ValueError for what is no ELF core with notes."""
    if len(data) < 16:
        return None
    if data[:4] != b"\x7fELF" or data[4] not in (ELFCLASS32, ELFCLASS64) \
            or data[5] not in (ELFDATA2LSB, ELFDATA2MSB):
        raise ValueError("not an ELF file")
    s = ElfStructs(64 if data[4] == ELFCLASS64 else 32, data[5] == ELFDATA2LSB)
    if len(data) < s.ehdr.size:
        return None
    e = s.ehdr.unpack(data[: s.ehdr.size])
    phnum = e["e_phnum"]
    if phnum == PN_XNUM:  # The count is in section header 0.
        if len(data) < e["e_shoff"] + s.shdr.size:
            return None
        phnum = s.shdr.unpack(data[e["e_shoff"] : e["e_shoff"] + s.shdr.size])["sh_info"]
    end = e["e_phoff"] + phnum * s.phdr.size
    if len(data) < end:
        return None
    for at in range(e["e_phoff"], end, s.phdr.size):
        p = s.phdr.unpack(data[at : at + s.phdr.size])
        if p["p_type"] == PT_NOTE:
            return CoreFile(s, e["e_machine"], p["p_offset"], p["p_filesz"])
    raise ValueError("no PT_NOTE segment")


def read_loads(data: bytes) -> list[tuple[int, int]]:
    """The (guest-physical address, size) of each PT_LOAD of the vmcore that
    ``data`` begins, its program headers all in (as :func:`read_core` found)."""
    s = ElfStructs(64 if data[4] == ELFCLASS64 else 32, data[5] == ELFDATA2LSB)
    e = s.ehdr.unpack(data[: s.ehdr.size])
    phnum = e["e_phnum"]
    if phnum == PN_XNUM:
        phnum = s.shdr.unpack(data[e["e_shoff"] : e["e_shoff"] + s.shdr.size])["sh_info"]
    loads = []
    for at in range(e["e_phoff"], e["e_phoff"] + phnum * s.phdr.size, s.phdr.size):
        p = s.phdr.unpack(data[at : at + s.phdr.size])
        if p["p_type"] == PT_LOAD:
            loads.append((p["p_paddr"], p["p_memsz"]))
    return loads


class Notes(Protocol):
    """Anything that encodes as ELF notes for a class and byte order."""

    def encode(self, structs: ElfStructs) -> bytes: ...


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _align(value: int, to: int) -> int:
    return value + (-value % to)


class CoreLayout:
    """File offsets of every part of a vmcore, and its header bytes.

    ``header`` holds everything before ``data_offset`` (ELF header, program
    headers, the extended-numbering section header, notes, padding);
    block ``i`` occupies ``[offsets[i], offsets[i] + blocks[i].size)``;
    ``notes[j]`` starts at ``note_offsets[j]``. Memory starts at
    ``data_offset`` or later: a dump whose notes are known only once memory
    is written places memory where the largest notes it may get leave it.

    ``room`` bytes of zeros are reserved after the notes, outside PT_NOTE,
    for a note learnt once memory is written (:meth:`add_note`): until then
    they are padding like that which aligns memory, which every reader
    passes over, and no reader sees a placeholder.
    """

    def __init__(self, arch: Arch, blocks: Sequence[Block], notes: Sequence[Notes],
                 room: int = 0, data_offset: int = 0) -> None:
        self.arch = arch
        self._min_data_offset = data_offset
        self.blocks = list(blocks)
        self.bits = arch.bits
        self.room = room
        notes = list(notes)
        if self.bits == 32:
            self._place(ElfStructs(32, arch.little_endian), notes)
            beyond = [b for b, offset in zip(self.blocks, self.offsets, strict=True)
                      if max(b.gpa, b.size, offset) >> 32]
            if beyond or arch.widens_at_4g and any(b.end >= 1 << 32 for b in self.blocks):
                if not arch.widens:
                    b = beyond[0]
                    raise UsageError(
                        f"guest memory at {b.gpa:#x}-{b.end - 1:#x} does not fit an ELF32 "
                        f"{arch.name} vmcore, which has no ELF64 form (QEMU's own dump "
                        f"cuts it to 32 bits)")
                self.bits = 64
        s = self.structs = ElfStructs(self.bits, arch.little_endian)
        self._place(s, notes)
        self.header = self._pack(s, notes)

    def _place(self, s: ElfStructs, notes: Sequence[Notes]) -> None:
        phnum = 1 + len(self.blocks)
        self.extended = phnum >= PN_XNUM
        self.phnum = phnum
        self.note_offset = _align(
            s.ehdr.size + phnum * s.phdr.size + (s.shdr.size if self.extended else 0), 8
        )
        sizes = [len(n.encode(s)) for n in notes]
        self.note_offsets = [self.note_offset + sum(sizes[:j]) for j in range(len(sizes))]
        self.note_size = sum(sizes)
        self.data_offset = max(_align(self.note_offset + self.note_size + self.room, DATA_ALIGN),
                               self._min_data_offset)
        self.offsets = []
        offset = self.data_offset
        for b in self.blocks:
            self.offsets.append(offset)
            offset += b.size
        self.size = offset

    def _pack(self, s: ElfStructs, notes: Sequence[Notes]) -> bytes:
        phoff = s.ehdr.size
        shoff = phoff + self.phnum * s.phdr.size if self.extended else 0
        ident = b"\x7fELF" + bytes([
            ELFCLASS64 if self.bits == 64 else ELFCLASS32,
            ELFDATA2LSB if s.little else ELFDATA2MSB,
            EV_CURRENT,
        ])
        parts = [
            s.ehdr.pack(
                e_ident=ident.ljust(16, b"\0"), e_type=ET_CORE,
                e_machine=self.arch.machine, e_version=EV_CURRENT,
                e_phoff=phoff, e_shoff=shoff, e_ehsize=s.ehdr.size,
                e_phentsize=s.phdr.size,
                e_phnum=PN_XNUM if self.extended else self.phnum,
                e_shentsize=s.shdr.size if self.extended else 0,
                e_shnum=1 if self.extended else 0,
            ),
            self._note_phdr(self.note_size),
        ]
        parts += [
            s.phdr.pack(p_type=PT_LOAD, p_offset=off, p_vaddr=b.gpa, p_paddr=b.gpa,
                        p_filesz=b.size, p_memsz=b.size)
            for b, off in zip(self.blocks, self.offsets, strict=True)
        ]
        if self.extended:
            parts.append(s.shdr.pack(sh_info=self.phnum))
        head = b"".join(parts).ljust(self.note_offset, b"\0")
        body = b"".join(n.encode(s) for n in notes)
        return (head + body).ljust(self.data_offset, b"\0")

    def _note_phdr(self, size: int) -> bytes:
        return self.structs.phdr.pack(p_type=PT_NOTE, p_offset=self.note_offset,
                                      p_filesz=size, p_memsz=size)

    def add_note(self, encoded: bytes) -> list[tuple[int, bytes]]:
        """Where to write note ``encoded`` (in ``structs``) into the reserved room,
        and the PT_NOTE program header that then takes it in: (file offset, bytes),
        the note first, so that the header never points at what is not there."""
        if len(encoded) > self.room:
            raise ValueError(f"a note of {len(encoded)} bytes does not fit the "
                             f"{self.room} reserved")
        return [(self.note_offset + self.note_size, encoded),
                (self.structs.ehdr.size, self._note_phdr(self.note_size + len(encoded)))]
