"""Where QEMU keeps its memory map, read from QEMU's own DWARF debug info.

Without a monitor, guest RAM is found by walking QEMU's data:
``address_space_memory.current_map->ranges[0..nr]``, each range's
MemoryRegion and that region's RAMBlock. Those structures change between
QEMU versions and builds, so every offset comes from the DWARF of the very
binary that runs (matched by build-id), never from a table. This module
reduces that DWARF (found by :mod:`livedump.ptrace.debuginfo`) to a small
:class:`~livedump.ptrace.layout.QemuLayout` (:func:`load_layout`), cached
per build-id. It reads files only, never QEMU's memory.

pyelftools has no index to jump to a type or variable by name, and even
reading just the top-level DIEs of QEMU's thousand units takes many seconds,
so the few DIEs needed are found by searching the raw section bytes: the
variable by its location expression, ``DW_OP_addr <address>`` (the address
from the symbol table; GCC lists no data in .debug_aranges), and a struct
only declared there (FlatRange outside memory.c) by the references to its
name string (``DW_FORM_strp``) or the name inline (``DW_FORM_string``),
in units that also name its rarest members. Only what that finds is parsed,
and checked, with pyelftools. Other toolchains' forms (clang's
``DW_OP_addrx``, ``DW_FORM_strx``) fall back to .debug_aranges and to that
slow scan, once: the result is cached per build-id.

The vCPUs' registers are found the same way, from QEMU's list of CPUs
(``cpus``, a tail queue of CPUState) to each X86CPU's ``env``; a QEMU of
another target, or one whose CPU structures differ, still maps its memory
(:attr:`QemuLayout.no_cpu_state` says why it has no registers).
"""

import bisect
import contextlib
from collections.abc import Callable, Iterable, Iterator
from io import BytesIO
from pathlib import Path
from typing import IO

from elftools.common.exceptions import DWARFError, ELFError
from elftools.dwarf.die import DIE, AttributeValue
from elftools.dwarf.dwarf_expr import DWARFExprParser
from elftools.dwarf.dwarfinfo import DWARFInfo

from livedump.errors import DebugInfoError
from livedump.ptrace.debuginfo import (
    check_build_id,
    find_debug_file,
    open_elf,
    read_build_id,
    supplementary_file,
)
from livedump.ptrace.layout import (
    ACCELERATORS,
    CPU_LISTS,
    CPU_NEEDED,
    CPU_OPTIONAL,
    CPU_STRUCTS,
    NEEDED,
    OPTIONAL,
    VARIABLE,
    VIRTIO_MEM_NEEDED,
    Field,
    Int128Layout,
    QemuLayout,
    StructLayout,
    read_cached,
    write_cached,
)
from livedump.ptrace.symbols import Symbol, find_all, read_symbols
from livedump.vmcore.arch import ByteOrder

# How each structure is reached from the variable's type (AddressSpace):
# (structure, member, the member's structure, through a pointer).
_PATH = (
    ("AddressSpace", "current_map", "FlatView", True),
    ("FlatView", "ranges", "FlatRange", True),
    ("FlatRange", "addr", "AddrRange", False),
    ("FlatRange", "mr", "MemoryRegion", True),
    ("MemoryRegion", "ram_block", "RAMBlock", True),
)

# The members of QEMU's type Int128, and where that type is used.
_INT128_HALVES = ("lo", "hi")
_INT128_USES = (("AddrRange", "start"), ("AddrRange", "size"))

_TRANSPARENT = {"DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type",
                "DW_TAG_restrict_type", "DW_TAG_atomic_type"}
_DW_OP_ADDR = 0x03

# A member name is searched for only if it ends at most this many strings
# (each a search of the whole .debug_info): "env" ends 15 in QEMU 7.2.
_RARE_STRING = 4



# --- entry points -----------------------------------------------------------


def qemu_layout(exe: str, debug_file: str | None = None) -> QemuLayout:
    """The layout for the running binary ``exe`` (``/proc/PID/exe``).

    A layout cached for its build-id is returned without looking for debug
    info at all (which can mean checksumming a large file); otherwise this
    is :func:`find_debug_file` then :func:`load_layout`.
    """
    if debug_file is None:
        build_id = read_build_id(exe)
        cached = read_cached(build_id) if build_id else None
        if cached is not None:
            return cached
    return load_layout(exe, find_debug_file(exe, debug_file))


def load_layout(exe: str, debug_file: Path) -> QemuLayout:
    """The layout for the running binary ``exe``, read from ``debug_file``'s
    DWARF, or from the cache of an earlier run for the same build-id."""
    build_id = read_build_id(exe)
    if build_id:
        cached = read_cached(build_id)
        if cached is not None:
            return cached
    layout = _read_layout(exe, Path(debug_file), build_id)
    if build_id:
        write_cached(layout)
    return layout


# --- reading the layout from DWARF ----------------------------------------------


def _read_layout(exe: str, debug_file: Path, build_id: str | None) -> QemuLayout:
    check_build_id(debug_file, build_id)
    names = (VARIABLE, *CPU_LISTS, *ACCELERATORS.values())
    with open_elf(debug_file) as elf:
        symbols = read_symbols(elf, names)
        info = elf.get_dwarf_info(follow_links=False)
        supplementary = supplementary_file(elf, debug_file)
    with open_elf(exe) as elf:
        pie = elf["e_type"] == "ET_DYN"
        pointer_size = elf.elfclass // 8
        byteorder: ByteOrder = "little" if elf.little_endian else "big"
        symbols |= read_symbols(elf, [n for n in names if n not in symbols])
    if VARIABLE not in symbols:
        raise DebugInfoError(f"no symbol {VARIABLE} in {debug_file}: is this qemu-system-*?")
    address = symbols[VARIABLE].address
    try:
        walk = _Walk(_dwarfs(info, debug_file, supplementary, byteorder), debug_file)
        structs, int128 = walk.structs(walk.variable(address, pointer_size, VARIABLE))
        cpu_list, no_cpu_state = None, ""
        try:
            cpu_list, cpu_structs = walk.cpus(symbols, pointer_size)
            structs |= cpu_structs
        except DebugInfoError as e:
            no_cpu_state = str(e)
    except (ELFError, DWARFError) as e:
        raise DebugInfoError(f"cannot read the DWARF in {debug_file}: {e}") from None
    return QemuLayout(build_id=build_id, address_space_memory=address, pie=pie,
                      pointer_size=pointer_size, byteorder=byteorder, int128=int128,
                      structs=structs, cpu_list=cpu_list, no_cpu_state=no_cpu_state,
                      accelerators={accel: symbols[flag] for accel, flag in ACCELERATORS.items()
                                    if flag in symbols})


def _dwarfs(info: DWARFInfo, debug_file: Path, supplementary: Path | None,
            byteorder: ByteOrder) -> list["_Dwarf"]:
    """The debug file's DWARF, and its dwz common file's, linked as pyelftools expects."""
    if supplementary is None:
        return [_Dwarf(info, debug_file, byteorder)]
    with open_elf(supplementary) as elf:
        common_info = elf.get_dwarf_info(follow_links=False)
    info.supplementary_dwarfinfo = common_info
    common = _Dwarf(common_info, supplementary, byteorder)
    return [_Dwarf(info, debug_file, byteorder, alien_strings=common.strings), common]


class _Dwarf:
    """One file's DWARF with its raw bytes, for the searches pyelftools has no index for."""

    def __init__(self, info: DWARFInfo, path: Path, byteorder: ByteOrder,
                 alien_strings: bytes = b"") -> None:
        if info.debug_info_sec is None:
            raise DebugInfoError(f"{path} has no .debug_info section")
        self.info = info
        self.order = byteorder
        self.stream = info.debug_info_sec.stream
        self.data = _contents(self.stream)
        self.strings = _contents(info.debug_str_sec.stream) if info.debug_str_sec else b""
        self.alien_strings = alien_strings  # the dwz common file's (DW_FORM_GNU_strp_alt)
        self.units = self._unit_offsets()

    def _unit_offsets(self) -> list[int]:
        offsets, at = [], 0
        while at + 4 <= len(self.data):
            offsets.append(at)
            length = int.from_bytes(self.data[at:at + 4], self.order)
            if length == 0xFFFFFFFF:  # 64-bit DWARF
                length = 8 + int.from_bytes(self.data[at + 4:at + 12], self.order)
            at += 4 + length
        return offsets

    def unit_at(self, offset: int) -> int:
        return self.units[bisect.bisect_right(self.units, offset) - 1]

    def name_refs(self, name: str) -> list[int]:
        """Where in .debug_info the string ``name`` may be referred to: an
        offset into a string table with it (DW_FORM_strp, DW_FORM_GNU_strp_alt;
        also its tail, as linkers merge suffixes), or the string inline."""
        text = name.encode() + b"\0"
        hits = set(find_all(self.data, text))
        for table in (self.strings, self.alien_strings):
            for start in find_all(table, text):
                hits.update(find_all(self.data, start.to_bytes(4, self.order)))
        return sorted(hits)

    def units_naming(self, names: Iterable[str]) -> set[int]:
        """The units that may mention the rarest of ``names``, and the next
        rarest if it is rare too (the unit defining a struct names all its
        members). Common names ("size" ends hundreds of strings, each a search
        of the whole section) are left out."""
        rarest, *others = sorted(names, key=self._in_strings)
        units = {self.unit_at(hit) for hit in self.name_refs(rarest)}
        for name in others[:1]:
            if self._in_strings(name) <= _RARE_STRING:
                units &= {self.unit_at(hit) for hit in self.name_refs(name)}
        return units

    def _in_strings(self, name: str) -> int:
        text = name.encode() + b"\0"
        return self.strings.count(text) + self.alien_strings.count(text)

    def struct_named_at(self, offset: int, name: str) -> DIE | None:
        """The complete struct DIE whose DW_AT_name is at ``offset``, if the bytes there are one.

        The DIE starts with its abbreviation code, a ULEB128 ending just
        before the name; only a code that means "struct with members" is
        parsed, so stray matches cost a lookup and nothing more.
        """
        cu = self.info.get_CU_at(self.unit_at(offset))
        table = cu.get_abbrev_table()
        for start in _uleb_starts(self.data, offset, cu.cu_die_offset):
            try:
                abbrev = table.get_abbrev(_uleb(self.data, start))
            except KeyError:
                continue
            if (abbrev["tag"] != "DW_TAG_structure_type" or not abbrev.has_children()
                    or any(a == "DW_AT_declaration" for a, _ in abbrev.iter_attr_specs())):
                continue
            die = DIE(cu, self.stream, start)
            attr = die.attributes.get("DW_AT_name")
            if attr is not None and attr.offset == offset and attr.value == name.encode():
                return die
        return None


def _contents(stream: IO[bytes]) -> bytes:
    """A DWARF section's bytes. pyelftools holds each in a BytesIO, whose value
    is had without a copy."""
    if isinstance(stream, BytesIO):
        return stream.getvalue()
    stream.seek(0)
    return stream.read()


def _uleb(data: bytes, at: int) -> int:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value
        at, shift = at + 1, shift + 7


def _uleb_starts(data: bytes, end: int, floor: int) -> Iterator[int]:
    """Where a ULEB128 of up to 3 bytes ending just before ``end`` could start."""
    if end <= floor or data[end - 1] >= 0x80:
        return
    start = end - 1
    yield start
    while start > max(floor, end - 3) and data[start - 1] >= 0x80:
        start -= 1
        yield start


class _Walk:
    """Follows the types from address_space_memory to every structure in NEEDED,
    and from QEMU's list of CPUs to every structure in CPU_NEEDED."""

    def __init__(self, dwarfs: list[_Dwarf], path: Path) -> None:
        self.dwarfs = dwarfs  # the debug file's, then its dwz common file's
        self.path = path

    def variable(self, address: int, pointer_size: int, name: str) -> DIE:
        """The DIE that defines the variable at ``address`` (DW_OP_addr in its location)."""
        info = self.dwarfs[0].info
        for unit in _variable_units(self.dwarfs[0], address, pointer_size):
            die = _top_level(info.get_CU_at(unit).get_top_DIE(),
                             lambda d: _is_variable_at(d, address))
            if die is not None:
                return die
        die = _scan(info, lambda d: _is_variable_at(d, address))  # other toolchains
        if die is None:
            raise DebugInfoError(f"{self.path} has no DWARF for {name}")
        return die

    def definition(self, die: DIE, role: str, members: tuple[str, ...]) -> DIE:
        """The complete struct behind ``die``, which may be a declaration
        only (as FlatRange is outside QEMU's memory.c)."""
        struct_die = _strip(die)
        if struct_die.tag not in ("DW_TAG_structure_type", "DW_TAG_union_type"):
            raise DebugInfoError(f"{role} is a {struct_die.tag} in {self.path}, not a struct")
        if "DW_AT_declaration" not in struct_die.attributes:
            return struct_die
        return self.named((struct_die.attributes["DW_AT_name"].value.decode(),), members)

    def named(self, names: tuple[str, ...], members: tuple[str, ...]) -> DIE:
        """The complete struct called one of ``names`` (tried in order) with ``members``."""
        heads = tuple(dict.fromkeys(m.partition(".")[0] for m in members))
        for name in names:
            for dwarf in self.dwarfs:
                units = dwarf.units_naming(heads)
                for hit in dwarf.name_refs(name):
                    if dwarf.unit_at(hit) in units:
                        found = dwarf.struct_named_at(hit, name)
                        if found is not None and _has_members(found, heads):
                            return found
        for dwarf in self.dwarfs:  # names in forms the byte search misses
            found = _scan(dwarf.info, lambda d: any(_is_definition(d, n, heads) for n in names))
            if found is not None:
                return found
        raise DebugInfoError(f"{self.path} has no definition of struct {' or '.join(names)}")

    def structs(self, variable: DIE) -> tuple[dict[str, StructLayout], Int128Layout]:
        """The needed structures' layouts and Int128's, from the variable's DIE."""
        dies = {"AddressSpace": self.definition(_type(variable), "AddressSpace",
                                                NEEDED["AddressSpace"])}
        for role, member, target, pointer in _PATH:
            found = _type(_members(dies[role], role)[member][1])
            if pointer:
                found = _pointee(found, f"{role}.{member}")
            dies[target] = self.definition(found, target, NEEDED[target])
        members = {role: _members(dies[role], role, None, OPTIONAL.get(role, ()))
                   for role in NEEDED}
        if "rdm" in members["MemoryRegion"]:
            with contextlib.suppress(DebugInfoError):  # A QEMU built without virtio-mem.
                device = self.virtio_mem()
                dies |= device
                members |= {role: _members(device[role], role, VIRTIO_MEM_NEEDED[role])
                            for role in VIRTIO_MEM_NEEDED}
        kinds = {self.int128(_type(members[r][m][1])) for r, m in _INT128_USES}
        if len(kinds) != 1:
            raise DebugInfoError(f"Int128 is stored in different ways in {self.path}")
        return _layouts(dies, members), kinds.pop()

    def virtio_mem(self) -> dict[str, DIE]:
        """The structures of VIRTIO_MEM_NEEDED: VirtIOMEM, and its memory backend."""
        device = self.named(("VirtIOMEM",), VIRTIO_MEM_NEEDED["VirtIOMEM"])
        memdev = _members(device, "VirtIOMEM", VIRTIO_MEM_NEEDED["VirtIOMEM"])["memdev"][1]
        backend = self.definition(_pointee(_type(memdev), "VirtIOMEM.memdev"),
                                  "HostMemoryBackend", VIRTIO_MEM_NEEDED["HostMemoryBackend"])
        return {"VirtIOMEM": device, "HostMemoryBackend": backend}

    def cpus(self, symbols: dict[str, Symbol], pointer_size: int
             ) -> tuple[int, dict[str, StructLayout]]:
        """The address of QEMU's list of CPUs and the layouts of CPU_NEEDED:
        from the list to its CPUState, then the X86CPU around it and its ``env``."""
        name = next((n for n in CPU_LISTS if n in symbols), None)
        if name is None:
            raise DebugInfoError(f"no symbol {' or '.join(CPU_LISTS)} in {self.path}")
        address = symbols[name].address
        dies = {"CPUTailQ": self.definition(_type(self.variable(address, pointer_size, name)),
                                            "CPUTailQ", CPU_NEEDED["CPUTailQ"])}
        head = _members(dies["CPUTailQ"], "CPUTailQ", CPU_NEEDED["CPUTailQ"])
        dies["CPUState"] = self.definition(_pointee(_type(head["tqh_first"][1]), name),
                                           "CPUState", CPU_NEEDED["CPUState"])
        dies["ArchCPU"] = self.named(CPU_STRUCTS, CPU_NEEDED["ArchCPU"])
        cpu = _members(dies["ArchCPU"], "ArchCPU", CPU_NEEDED["ArchCPU"])
        env = _strip(_type(cpu["env"][1]))
        if not _has_members(env, ("eip",)):
            raise DebugInfoError("QEMU's CPUs are not x86 ones "
                                 "(ptrace mode reads x86 registers only)")
        dies["CPUArchState"] = self.definition(env, "CPUArchState", CPU_NEEDED["CPUArchState"])
        state = _members(dies["CPUArchState"], "CPUArchState", CPU_NEEDED["CPUArchState"])
        dies["SegmentCache"] = self.definition(_element(_type(state["segs"][1])),
                                               "SegmentCache", CPU_NEEDED["SegmentCache"])
        members = {role: _members(dies[role], role, CPU_NEEDED[role], CPU_OPTIONAL.get(role, ()))
                   for role in CPU_NEEDED}
        return address, _layouts(dies, members)

    def int128(self, die: DIE) -> Int128Layout:
        found = _strip(die)
        if found.tag == "DW_TAG_base_type" and _byte_size(found) == 16:
            return Int128Layout(scalar=True)
        if found.tag == "DW_TAG_structure_type":
            halves = _members(self.definition(found, "Int128", _INT128_HALVES), "Int128",
                              _INT128_HALVES)
            if all(_byte_size(_type(d)) == 8 for _, d in halves.values()):
                return Int128Layout(scalar=False, lo=halves["lo"][0], hi=halves["hi"][0])
        raise DebugInfoError(f"Int128 in {self.path} is neither a 16-byte integer "
                             "nor a struct of two 64-bit halves")


def _layouts(dies: dict[str, DIE], members: dict[str, dict[str, tuple[int, DIE]]]
             ) -> dict[str, StructLayout]:
    return {role: StructLayout(_byte_size(dies[role]), {
        name: Field(offset, _byte_size(_type(die))) for name, (offset, die) in found.items()})
        for role, found in members.items()}


def _variable_units(dwarf: _Dwarf, address: int, pointer_size: int) -> Iterator[int]:
    """Units that may define the variable at ``address``: those holding a
    location expression that is just ``DW_OP_addr address`` (GCC lists no
    data in .debug_aranges), then the unit .debug_aranges gives (clang's way)."""
    location = bytes([1 + pointer_size, _DW_OP_ADDR]) + address.to_bytes(pointer_size,
                                                                        dwarf.order)
    yield from dict.fromkeys(dwarf.unit_at(hit) for hit in find_all(dwarf.data, location))
    aranges = dwarf.info.get_aranges()
    unit = aranges.cu_offset_at_addr(address) if aranges else None
    if unit is not None:
        yield unit


def _top_level(top: DIE, wanted: Callable[[DIE], bool]) -> DIE | None:
    return next((d for d in top.iter_children() if wanted(d)), None)


def _scan(info: DWARFInfo, wanted: Callable[[DIE], bool]) -> DIE | None:
    """The first top-level DIE of any unit that is ``wanted``: slow, the last resort."""
    for cu in info.iter_CUs():
        found = _top_level(cu.get_top_DIE(), wanted)
        if found is not None:
            return found
    return None


def _is_variable_at(die: DIE, address: int) -> bool:
    if die.tag != "DW_TAG_variable" or "DW_AT_location" not in die.attributes:
        return False
    value = die.attributes["DW_AT_location"].value
    if not isinstance(value, list):
        return False  # a location list: not a global
    ops = DWARFExprParser(die.cu.structs).parse_expr(value)
    if len(ops) != 1:
        return False
    if ops[0].op_name == "DW_OP_addr":
        found: int = ops[0].args[0]  # pyelftools' operands are untyped
    elif ops[0].op_name in ("DW_OP_addrx", "DW_OP_GNU_addr_index"):
        found = die.dwarfinfo.get_addr(die.cu, ops[0].args[0])
    else:
        return False
    return found == address


def _is_definition(die: DIE, name: str, members: tuple[str, ...]) -> bool:
    attrs = die.attributes
    return (die.tag in ("DW_TAG_structure_type", "DW_TAG_union_type")
            and "DW_AT_declaration" not in attrs
            and "DW_AT_name" in attrs and attrs["DW_AT_name"].value == name.encode()
            and _has_members(die, members))


def _has_members(die: DIE, members: tuple[str, ...]) -> bool:
    return set(members) <= {name for name, _, _ in _iter_members(die, 0)}


def _iter_members(die: DIE, base: int) -> Iterator[tuple[str, int, DIE]]:
    """(name, offset, DIE) of each member, those of anonymous structs and unions included."""
    for child in die.iter_children():
        if child.tag != "DW_TAG_member":
            continue
        offset = base + _member_offset(child)
        if "DW_AT_name" in child.attributes:
            yield child.attributes["DW_AT_name"].value.decode(), offset, child
        elif _strip(_type(child)).tag in ("DW_TAG_structure_type", "DW_TAG_union_type"):
            yield from _iter_members(_strip(_type(child)), offset)


def _members(die: DIE, role: str, names: tuple[str, ...] | None = None,
             optional: tuple[str, ...] = ()) -> dict[str, tuple[int, DIE]]:
    """Offset and DIE of each needed member of the struct ``die`` (``a.b``:
    member ``b`` of member ``a``), and of those ``optional`` members it has."""
    names = names or NEEDED[role]
    found = {name: _member(die, role, name) for name in (*names, *optional)}
    missing = [n for n in names if found[n] is None]
    if missing:
        raise DebugInfoError(f"QEMU's {role} has no member {', '.join(missing)}: "
                             "a QEMU version livedump does not know")
    return {n: where for n, where in found.items() if where is not None}


def _member(die: DIE, role: str, path: str) -> tuple[int, DIE] | None:
    head, _, rest = path.partition(".")
    for name, offset, member in _iter_members(die, 0):
        if name == head:
            if any(a in member.attributes for a in
                   ("DW_AT_bit_size", "DW_AT_data_bit_offset", "DW_AT_bit_offset")):
                raise DebugInfoError(f"{role}.{name} is a bit-field: not supported")
            if not rest:
                return offset, member
            inner = _member(_strip(_type(member)), role, rest)
            return None if inner is None else (offset + inner[0], inner[1])
    return None


def _member_offset(member: DIE) -> int:
    attr = member.attributes.get("DW_AT_data_member_location")
    if attr is None:
        return 0
    if isinstance(attr.value, int):
        return attr.value
    ops = DWARFExprParser(member.cu.structs).parse_expr(attr.value)  # DWARF 2 style
    if len(ops) == 1 and ops[0].op_name == "DW_OP_plus_uconst":
        offset: int = ops[0].args[0]  # the operand of DW_OP_plus_uconst is a ULEB128
        return offset
    raise DebugInfoError(f"member location {attr.value} is not a constant")


def _type(die: DIE) -> DIE:
    """The type of a variable or member, through a declaration it completes."""
    for attr in ("DW_AT_type", "DW_AT_specification", "DW_AT_abstract_origin"):
        if attr in die.attributes:
            found = die.get_DIE_from_attribute(attr)
            return found if attr == "DW_AT_type" else _type(found)
    raise DebugInfoError(f"DIE at {die.offset:#x} has no type")


def _strip(die: DIE) -> DIE:
    """The type behind typedefs and qualifiers."""
    while die.tag in _TRANSPARENT:
        die = _type(die)
    return die


def _element(die: DIE) -> DIE:
    """The element type of an array type."""
    array = _strip(die)
    if array.tag != "DW_TAG_array_type":
        raise DebugInfoError(f"the type at {array.offset:#x} is not an array")
    return _type(array)


def _pointee(die: DIE, what: str) -> DIE:
    pointer = _strip(die)
    if pointer.tag != "DW_TAG_pointer_type":
        raise DebugInfoError(f"{what} is not a pointer")
    return _type(pointer)


def _byte_size(die: DIE) -> int:
    found = _strip(die)
    size = _constant(found.attributes.get("DW_AT_byte_size"))
    if size is not None:
        return size
    if found.tag == "DW_TAG_pointer_type":
        pointer_size: int = found.cu["address_size"]  # a field of the unit header
        return pointer_size
    if found.tag == "DW_TAG_array_type":
        count = 1
        for sub in found.iter_children():
            if sub.tag == "DW_TAG_subrange_type":
                count *= _extent(sub)
        return count * _byte_size(_type(found))
    raise DebugInfoError(f"no size for the {found.tag} at {found.offset:#x}")


def _extent(subrange: DIE) -> int:
    attrs = subrange.attributes
    count = _constant(attrs.get("DW_AT_count"))
    upper = _constant(attrs.get("DW_AT_upper_bound"))
    if count is None and upper is not None:
        count = upper - (_constant(attrs.get("DW_AT_lower_bound")) or 0) + 1
    if count is None:
        raise DebugInfoError(f"array of no fixed length at {subrange.offset:#x}")
    return count


def _constant(attr: AttributeValue | None) -> int | None:
    """An attribute's value if it is a constant (not a reference or an expression)."""
    if attr is None or not attr.form.startswith(("DW_FORM_data", "DW_FORM_udata",
                                                 "DW_FORM_sdata", "DW_FORM_implicit_const")):
        return None
    return attr.value if isinstance(attr.value, int) else None  # DW_FORM_data16 is bytes
