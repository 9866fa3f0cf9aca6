"""The device state at the end of a background snapshot, read by QEMU's own
description of it; and the x86 vCPUs' registers in it.

A background snapshot saves the devices (the vCPUs among them, their
registers synchronised from KVM first) at the snapshot point, and sends
them after RAM: one ``SECTION_FULL`` per device instance, then the end of
file, then, unless the machine suppresses it, a JSON description of every
section sent (``QEMU_VM_VMDESCRIPTION``): each field's name, type, size,
array length, nested structures and the subsections that were sent. That
description is what makes the sections readable at all (their encoding is
each device's own), so fields are found by name, never at fixed offsets;
a stream without it gives no CPU state, and livedump says so.
"""

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from livedump.errors import SnapshotError
from livedump.vmcore.x86_notes import SEGMENTS, Segment, X86State

# Stream elements (QEMU_VM_* in QEMU's savevm.h) met in the device state.
EOF = 0x00
SECTION_FULL = 0x04
SUBSECTION = 0x05
VMDESCRIPTION = 0x06
SECTION_FOOTER = 0x7E

_BE32 = struct.Struct(">I")
_MAX_DEPTH = 32  # nesting of structures and subsections: beyond, the description is garbage

# A field's value: a number (the description's intN/uintN types), bytes (any
# other type), a list (an array), or a structure's fields by name.
Value = int | bytes | list["Value"] | dict[str, "Value"]


@dataclass(frozen=True)
class Section:
    """One device instance's saved state, its fields by name (subsections'
    fields under the subsection's name)."""

    name: str
    instance: int
    version: int
    fields: dict[str, Value]


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise SnapshotError(f"the migration stream's device state ends inside a record "
                                f"(at byte {self.at} of {len(self.data)})")
        piece = self.data[self.at:self.at + n]
        self.at += n
        return piece

    def byte(self) -> int:
        return self.take(1)[0]

    def be32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def name(self) -> str:
        return self.take(self.byte()).decode("utf-8", "replace")


def description(data: bytes) -> tuple[int, dict[str, object]] | None:
    """Where the sections of ``data`` (the device state, from its first element)
    end, and QEMU's JSON description after them; None if there is none."""
    end = len(data)
    at = data.rfind(bytes([VMDESCRIPTION]), 0, end)
    while at >= 1:
        if at + 5 <= end and _BE32.unpack_from(data, at + 1)[0] == end - at - 5 \
                and data[at - 1] == EOF:
            try:
                desc = json.loads(data[at + 5:])
            except (ValueError, UnicodeDecodeError):
                desc = None
            if isinstance(desc, dict) and isinstance(desc.get("devices"), list):
                return at - 1, desc
        at = data.rfind(bytes([VMDESCRIPTION]), 0, at)
    return None


def sections(data: bytes) -> list[Section] | None:
    """Every device section of ``data`` (the stream from its first element after
    RAM to its end), decoded by the description; None if the stream has none."""
    found = description(data)
    if found is None:
        return None
    end, desc = found
    devices: dict[tuple[str, int], Mapping[str, object]] = {}
    for device in _list(desc["devices"]):
        devices[(str(device.get("name")), _int(device.get("instance_id", 0)))] = device
    c = _Cursor(data[:end])
    result = []
    while c.at < end:
        kind = c.byte()  # Up to the end of file, sections only.
        if kind != SECTION_FULL:
            raise SnapshotError(f"unexpected element {kind:#x} in the migration stream's "
                                "device state")
        section_id = c.be32()
        name = c.name()
        instance, version = c.be32(), c.be32()
        described = devices.get((name, instance))
        if described is None:
            raise SnapshotError(f"the migration stream's description lacks section {name!r} "
                                f"(instance {instance})")
        result.append(Section(name, instance, version, _struct(c, described, 0)))
        if c.at < end and c.data[c.at] == SECTION_FOOTER:
            c.byte()
            if c.be32() != section_id:
                raise SnapshotError(f"section {name!r} of the migration stream ends "
                                    "with another section's footer")
    return result


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SnapshotError(f"the migration stream's description has {value!r} for a number")
    return value


def _struct(c: _Cursor, desc: Mapping[str, object], depth: int) -> dict[str, Value]:
    """The fields of one structure (a section, a struct field, a subsection),
    then its subsections, as the description lists them."""
    if depth > _MAX_DEPTH:
        raise SnapshotError("the migration stream's description nests too deep")
    fields: dict[str, Value] = {}
    for field in _list(desc.get("fields", [])):
        count = field.get("array_len")
        values = [_field(c, field, depth) for _ in range(_int(count) if count is not None
                                                         else 1)]
        # QEMU splits an array around null pointers into several entries of one
        # name: the first is kept (livedump reads no such array).
        fields.setdefault(str(field.get("name")), values if count is not None else values[0])
    for sub in _list(desc.get("subsections", [])):
        if c.byte() != SUBSECTION:
            raise SnapshotError(f"subsection {sub.get('vmsd_name')!r} missing from the "
                                "migration stream")
        name = c.name()
        c.be32()  # its version
        fields[name] = _struct(c, sub, depth + 1)
    return fields


def _field(c: _Cursor, field: Mapping[str, object], depth: int) -> Value:
    kind = field.get("type")
    inner = field.get("struct")
    if kind == "struct" and isinstance(inner, dict):
        return _struct(c, inner, depth + 1)
    raw = c.take(_int(field.get("size")))
    if isinstance(kind, str) and kind.split(" ")[0] in _INTEGERS and len(raw) in (1, 2, 4, 8):
        return int.from_bytes(raw, "little" if kind.endswith(" le") else "big",
                              signed=kind.startswith("int"))
    return raw


_INTEGERS = {f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64)}


def _list(value: object) -> list[Mapping[str, object]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise SnapshotError("the migration stream's description is malformed")
    return value


# --- The x86 vCPUs (target/i386/machine.c's "cpu" sections) ---

X86_CPU_SECTION = "cpu"


def x86_cpus(found: Sequence[Section]) -> list[X86State]:
    """The registers of every vCPU, in QEMU's CPU order (a ``cpu`` section's
    instance is its CPU index): what QEMU's dump writes its notes from."""
    cpus = sorted((s for s in found if s.name == X86_CPU_SECTION), key=lambda s: s.instance)
    if not cpus:
        raise SnapshotError("the migration stream holds no x86 CPU state")
    return [_x86_state(s) for s in cpus]


def _x86_state(section: Section) -> X86State:
    f = section.fields

    def number(name: str, default: int | None = None) -> int:
        value = f.get(name, default)
        if not isinstance(value, int):
            raise SnapshotError(f"the migration stream's CPU {section.instance} has no "
                                f"number {name!r}")
        return value

    def segment(value: Value) -> Segment:
        if not isinstance(value, dict):
            raise SnapshotError(f"the migration stream's CPU {section.instance} has a "
                                "segment that is no structure")
        parts = [value.get(part) for part in ("selector", "base", "limit", "flags")]
        if not all(isinstance(p, int) for p in parts):
            raise SnapshotError(f"the migration stream's CPU {section.instance} has a "
                                "segment without selector, base, limit and flags")
        return Segment(*parts)  # type: ignore[arg-type]

    regs, segs = f.get("env.regs"), f.get("env.segs")
    if not isinstance(regs, list) or len(regs) not in (8, 16) \
            or not all(isinstance(r, int) for r in regs) \
            or not isinstance(segs, list) or len(segs) != len(SEGMENTS):
        raise SnapshotError(f"the migration stream's CPU {section.instance} is not an "
                            "x86 CPU livedump knows")
    named = {name: segment(f.get(f"env.{name}", b"")) for name in ("ldt", "tr", "gdt", "idt")}
    # QEMU saves CR0, CR2, CR3 and CR4; CR1 does not exist (QEMU's is always 0).
    cr = (number("env.cr[0]"), 0, number("env.cr[2]"), number("env.cr[3]"),
          number("env.cr[4]"))
    return X86State(
        index=section.instance, regs=tuple(regs),  # type: ignore[arg-type]
        rip=number("env.eip"), rflags=number("env.eflags"),
        segs=tuple(segment(s) for s in segs), cr=cr,
        efer=number("env.efer", 0),  # qemu-system-i386 has none
        kernel_gs_base=number("env.kernelgsbase", 0), **named)
