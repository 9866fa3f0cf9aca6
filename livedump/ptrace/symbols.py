"""Global variables of a binary, from its ELF symbol table.

Read with ``struct`` rather than pyelftools, which takes seconds over
QEMU's tens of thousands of symbols: only the names asked for are looked
up, by their offsets in the string table.
"""

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Not loaded for a cached layout: it takes long to import.
    from elftools.elf.elffile import ELFFile

# An ELF symbol per class: its struct format, where st_value, st_size, st_info
# and st_shndx are in it.
_SYMBOL_ENTRY = {64: ("IBBHQQ", 4, 5, 1, 3), 32: ("IIIBBH", 1, 2, 3, 5)}
_STB_GLOBAL, _STB_WEAK = 1, 2


@dataclass(frozen=True)
class Symbol:
    """A global variable: link-time address and size."""

    address: int
    size: int


def read_symbols(elf: "ELFFile", names: Iterable[str]) -> dict[str, Symbol]:
    """The defined global symbols of ``names`` there are, from .symtab (else .dynsym)."""
    layout, value_at, size_at, info_at, section_at = _SYMBOL_ENTRY[elf.elfclass]
    fmt = ("<" if elf.little_endian else ">") + layout
    found: dict[str, Symbol] = {}
    for table in (elf.get_section_by_name(".symtab"), elf.get_section_by_name(".dynsym")):
        if table is None or table["sh_type"] == "SHT_NOBITS":
            continue
        strings = elf.get_section(table["sh_link"]).data()
        wanted = {at: name for name in names if name not in found
                  for at in find_all(strings, name.encode() + b"\0")}
        for entry in struct.iter_unpack(fmt, table.data()):
            name = wanted.get(entry[0])
            if (name is not None and name not in found and entry[section_at] != 0
                    and entry[info_at] >> 4 in (_STB_GLOBAL, _STB_WEAK)):
                found[name] = Symbol(entry[value_at], entry[size_at])
    return found


def find_all(haystack: bytes, needle: bytes) -> Iterator[int]:
    """Every offset of ``needle`` in ``haystack``, overlapping ones too."""
    at = haystack.find(needle)
    while at >= 0:
        yield at
        at = haystack.find(needle, at + 1)
