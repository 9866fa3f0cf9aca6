"""The ELF headers of a process's core file, and of the executable mapped in it.

Read with ``struct``, not pyelftools: only the headers and notes are
parsed (a core is gigabytes of memory behind them), and the same parser
reads the executable's own ELF header out of the core's memory, where the
kernel (and gdb's ``gcore``) keep the first page of every mapped ELF file.
"""

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from livedump.errors import CoreFileError
from livedump.vmcore.arch import ByteOrder

ET_CORE = 4
PT_LOAD, PT_NOTE = 1, 4
NT_PRSTATUS, NT_PRPSINFO, NT_AUXV = 1, 3, 6
NT_FILE = 0x46494C45
NT_GNU_BUILD_ID = 3
AT_PHDR, AT_ENTRY = 3, 9
_PN_XNUM = 0xFFFF
_MAX_NOTES = 64 << 20  # more note bytes than this is not a core but garbage

# (e_type .. e_shstrndx after e_ident) and a program header, per ELF class.
_EHDR = {64: "HHIQQQIHHHHHH", 32: "HHIIIIIHHHHHH"}
_PHDR = {64: "IIQQQQQQ", 32: "IIIIIIII"}
_SHDR_INFO = {64: (44, "I"), 32: (28, "I")}  # sh_info: where, and how it is packed


@dataclass(frozen=True)
class Segment:
    """A program header: for a core, a mapping of the process and where its
    bytes are in the file (``filesz`` may be less than ``memsz``: the rest
    was not dumped)."""

    type: int
    offset: int
    vaddr: int
    filesz: int
    memsz: int
    align: int


@dataclass(frozen=True)
class Header:
    bits: int
    byteorder: ByteOrder
    type: int
    machine: int
    segments: list[Segment]


Read = Callable[[int, int], bytes]  # (offset, size) -> bytes; fewer only at the end


def read_header(read: Read, what: str) -> Header:
    """The ELF header and program headers that ``read`` gives (a file, or
    the memory of a mapping); CoreFileError, naming ``what``, if they are not ELF's."""
    ident = read(0, 64)
    if len(ident) < 16 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) \
            or ident[5] not in (1, 2):
        raise CoreFileError(f"{what} is not an ELF file")
    bits = 64 if ident[4] == 2 else 32
    byteorder: ByteOrder = "little" if ident[5] == 1 else "big"
    prefix = "<" if byteorder == "little" else ">"
    size = struct.calcsize(prefix + _EHDR[bits])
    if len(ident) < 16 + size:
        raise CoreFileError(f"{what} is truncated within its ELF header")
    (e_type, machine, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, _,
     _) = struct.unpack_from(prefix + _EHDR[bits], ident, 16)
    if phnum == _PN_XNUM and shoff:  # more than 65534 headers: the count is in section 0
        at, fmt = _SHDR_INFO[bits]
        raw = read(shoff + at, 4)
        if len(raw) < 4:
            raise CoreFileError(f"{what} is truncated within its section header")
        (phnum,) = struct.unpack(prefix + fmt, raw)
    entry = struct.calcsize(prefix + _PHDR[bits])
    if phnum and phentsize < entry:
        raise CoreFileError(f"{what} has program headers of {phentsize} bytes")
    table = read(phoff, phnum * phentsize)
    if len(table) < phnum * phentsize:
        raise CoreFileError(f"{what} is truncated within its program headers")
    segments = []
    for i in range(phnum):
        fields = struct.unpack_from(prefix + _PHDR[bits], table, i * phentsize)
        if bits == 64:
            p_type, _, offset, vaddr, _, filesz, memsz, align = fields
        else:
            p_type, offset, vaddr, _, filesz, memsz, _, align = fields
        segments.append(Segment(p_type, offset, vaddr, filesz, memsz, align))
    return Header(bits, byteorder, e_type, machine, segments)


def iter_notes(data: bytes, byteorder: ByteOrder) -> Iterator[tuple[bytes, int, bytes]]:
    """Each note's owner (without its NUL), type and descriptor; 4-byte aligned,
    as cores and GNU notes are."""
    prefix = "<" if byteorder == "little" else ">"
    at = 0
    while at + 12 <= len(data):
        namesz, descsz, n_type = struct.unpack_from(prefix + "III", data, at)
        name_at = at + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        end = desc_at + (descsz + 3) // 4 * 4
        if desc_at + descsz > len(data):
            return
        yield data[name_at : name_at + namesz].rstrip(b"\0"), n_type, data[desc_at : desc_at +
                                                                            descsz]
        at = end


def read_notes(read: Read, header: Header, what: str) -> list[tuple[bytes, int, bytes]]:
    """Every note of a core file's PT_NOTE segments, in order."""
    found: list[tuple[bytes, int, bytes]] = []
    for s in header.segments:
        if s.type != PT_NOTE:
            continue
        if s.filesz > _MAX_NOTES:
            raise CoreFileError(f"{what} claims {s.filesz} bytes of notes: not a core")
        data = read(s.offset, s.filesz)
        if len(data) < s.filesz:
            raise CoreFileError(f"{what} is truncated within its notes")
        found.extend(iter_notes(data, header.byteorder))
    return found


@dataclass(frozen=True)
class FileMapping:
    """An entry of the NT_FILE note: a file mapped at ``[start, end)`` from
    ``offset`` in it."""

    start: int
    end: int
    offset: int
    path: str


def file_mappings(desc: bytes, bits: int, byteorder: ByteOrder) -> list[FileMapping]:
    """The NT_FILE note: count, page size, then (start, end, page offset)
    triples, then as many NUL-terminated paths."""
    word = bits // 8
    prefix = "<" if byteorder == "little" else ">"
    fmt = prefix + ("Q" if word == 8 else "I")
    if len(desc) < 2 * word:
        return []
    count, page = (struct.unpack_from(fmt, desc, i * word)[0] for i in (0, 1))
    names_at = (2 + 3 * count) * word
    if names_at > len(desc):
        return []
    names = desc[names_at:].split(b"\0")
    found = []
    for i in range(min(count, len(names))):
        start, end, pgoff = (struct.unpack_from(fmt, desc, (2 + 3 * i + j) * word)[0]
                             for j in range(3))
        found.append(FileMapping(start, end, pgoff * page, names[i].decode(errors="replace")))
    return found


def auxv(desc: bytes, bits: int, byteorder: ByteOrder) -> dict[int, int]:
    """The auxiliary vector (NT_AUXV): the kernel's (type, value) words."""
    prefix = "<" if byteorder == "little" else ">"
    pairs = struct.iter_unpack(prefix + ("QQ" if bits == 64 else "II"),
                               desc[: len(desc) // (bits // 4) * (bits // 4)])
    return {key: value for key, value in pairs if key}


def prpsinfo(desc: bytes, bits: int, byteorder: ByteOrder) -> tuple[int, str]:
    """The process's PID and the start of its command line (NT_PRPSINFO)."""
    prefix = "<" if byteorder == "little" else ">"
    # struct elf_prpsinfo: 4 chars, pr_flag (a long; 32-bit: after no padding),
    # uid and gid (32-bit ints on x86_64; 16 bits on i386), then pid.
    pid_at, args_at = (24, 56) if bits == 64 else (12, 44)
    if len(desc) < args_at + 80:
        return 0, ""
    (pid,) = struct.unpack_from(prefix + "i", desc, pid_at)
    args = desc[args_at : args_at + 80].partition(b"\0")[0].decode(errors="replace")
    return pid, args.strip()
