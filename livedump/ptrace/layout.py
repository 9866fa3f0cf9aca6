"""What livedump needs to know of one QEMU binary to walk its memory, kept
per build-id.

A :class:`QemuLayout` is the few structures, members and variables of QEMU
that the RAM map and the vCPUs' registers are read through, with their
offsets and sizes in this very build; :mod:`livedump.ptrace.dwarf` reads it
out of QEMU's DWARF. Reading takes long, so a layout is kept as JSON in
``~/.cache/livedump/layouts/`` under the binary's build-id, and one a
different livedump wrote, or one lacking a member this one reads, is read
again rather than trusted.
"""

import json
import os
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from livedump.ptrace.symbols import Symbol
from livedump.transfer.output import replacing
from livedump.vmcore.arch import ByteOrder

VARIABLE = "address_space_memory"

# The members read of each structure (QEMU's names): no more, so that a
# QEMU that renames any other member still works.
NEEDED: dict[str, tuple[str, ...]] = {
    "AddressSpace": ("current_map",),
    "FlatView": ("ranges", "nr"),
    "FlatRange": ("mr", "offset_in_region", "addr"),
    "AddrRange": ("start", "size"),
    "MemoryRegion": ("ram", "ram_device", "nonvolatile", "ram_block", "name"),
    "RAMBlock": ("host",),
}
# Read where this QEMU has them: a RAM region's discard manager (QEMU 6.1 on),
# in QEMU 7.2 to 10.0 only ever a virtio-mem device, whose bitmap says which
# blocks of its memory backend's region are plugged: the only ones dumped.
OPTIONAL: dict[str, tuple[str, ...]] = {"MemoryRegion": ("rdm",)}
VIRTIO_MEM_NEEDED: dict[str, tuple[str, ...]] = {
    "VirtIOMEM": ("memdev", "block_size", "bitmap", "bitmap_size"),
    "HostMemoryBackend": ("mr",),
}

# The x86 CPU state: the list of CPUs (renamed in QEMU 8.2), the structure
# holding a CPUState and its registers (named X86CPU before QEMU 6.0), and
# the members read, as above. kernelgsbase exists only in qemu-system-x86_64;
# vcpu_dirty (QEMU's copy of a KVM vCPU's registers is current) in QEMU >= 2.0.
CPU_LISTS = ("cpus", "cpus_queue")
CPU_STRUCTS = ("ArchCPU", "X86CPU")
CPU_NEEDED: dict[str, tuple[str, ...]] = {
    "CPUTailQ": ("tqh_first",),
    "CPUState": ("node.tqe_next", "cpu_index", "running"),
    "ArchCPU": ("parent_obj", "env"),
    "CPUArchState": ("regs", "eip", "eflags", "segs", "ldt", "tr", "gdt", "idt", "cr",
                     "efer"),
    "SegmentCache": ("selector", "base", "limit", "flags"),
}
CPU_OPTIONAL = {"CPUState": ("vcpu_dirty",), "CPUArchState": ("kernelgsbase",)}

# The flags that say which accelerator runs the vCPUs (kvm_enabled() and
# tcg_enabled() read them); a QEMU built without one has no flag for it.
ACCELERATORS = {"tcg": "tcg_allowed", "kvm": "kvm_allowed"}

_CACHE_FORMAT = 4


@dataclass(frozen=True)
class Field:
    """Where a member is in its structure, in bytes."""

    offset: int
    size: int


@dataclass(frozen=True)
class StructLayout:
    size: int
    fields: dict[str, Field]

    def __getitem__(self, member: str) -> Field:
        return self.fields[member]


@dataclass(frozen=True)
class Int128Layout:
    """How QEMU stores an Int128: a 16-byte integer in the binary's byte order
    (``scalar``), or a struct of two 64-bit halves at offsets ``lo`` and ``hi``."""

    scalar: bool
    lo: int | None = None
    hi: int | None = None


@dataclass(frozen=True)
class QemuLayout:
    """What a memory walk needs to know about one QEMU binary.

    ``address_space_memory`` is the variable's link-time address; in a
    ``pie`` binary add the load bias, the start of the executable's mapping
    at file offset 0 in ``/proc/PID/maps``.
    ``cpu_list`` is the address of QEMU's list of CPUs, with the structures of
    CPU_NEEDED in ``structs``; or None, and ``no_cpu_state`` says why.
    """

    build_id: str | None
    address_space_memory: int
    pie: bool
    pointer_size: int
    byteorder: ByteOrder
    int128: Int128Layout
    structs: dict[str, StructLayout]
    cpu_list: int | None
    no_cpu_state: str
    accelerators: dict[str, Symbol]

    def to_json(self) -> str:
        return json.dumps({"format": _CACHE_FORMAT, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "QemuLayout":
        """Parse :meth:`to_json`'s output; ValueError if it is anything else."""
        try:
            d = json.loads(text)
            if d["format"] != _CACHE_FORMAT or d["byteorder"] not in ("little", "big"):
                raise ValueError("not a layout of this livedump")
            i = d["int128"]
            return cls(
                build_id=_optional(d["build_id"], str),
                address_space_memory=_count(d["address_space_memory"]),
                pie=_typed(d["pie"], bool),
                pointer_size=_count(d["pointer_size"]),
                byteorder=d["byteorder"],
                int128=Int128Layout(_typed(i["scalar"], bool), _optional(i["lo"], int),
                                    _optional(i["hi"], int)),
                structs={name: StructLayout(_count(s["size"]), {
                    m: Field(_count(f["offset"]), _count(f["size"]))
                    for m, f in s["fields"].items()}) for name, s in d["structs"].items()},
                cpu_list=None if d["cpu_list"] is None else _count(d["cpu_list"]),
                no_cpu_state=_typed(d["no_cpu_state"], str),
                accelerators={name: Symbol(_count(a["address"]), _count(a["size"]))
                              for name, a in d["accelerators"].items()},
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed layout: {e!r}") from None

    def __post_init__(self) -> None:
        # A layout cached by another livedump may lack what this one reads.
        needed = NEEDED | (CPU_NEEDED if self.cpu_list is not None else {})
        for struct_name, members in needed.items():
            fields = self.structs.get(struct_name)
            if fields is None or not set(members) <= fields.fields.keys():
                raise ValueError(f"layout lacks members of {struct_name}")


_T = TypeVar("_T")


def _typed(value: object, kind: type[_T]) -> _T:
    if not isinstance(value, kind):
        raise ValueError(f"{value!r} is not {kind}")
    return value


def _optional(value: object, kind: type[_T]) -> _T | None:
    return None if value is None else _typed(value, kind)


def _count(value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{value!r} is not a size or offset")
    return value


# --- the cache -------------------------------------------------------------------


def layout_cache_dir() -> Path:
    """Where layouts are kept: under $XDG_CACHE_HOME, else ~/.cache, as elfutils does."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return Path(base if os.path.isabs(base) else Path.home() / ".cache") / "livedump" / "layouts"


def read_cached(build_id: str) -> QemuLayout | None:
    """The cached layout, or None if there is none or it is unusable (then rebuilt)."""
    try:
        layout = QemuLayout.from_json((layout_cache_dir() / f"{build_id}.json").read_text())
    except (OSError, ValueError):
        return None
    return layout if layout.build_id == build_id else None


def write_cached(layout: QemuLayout) -> None:
    """Store the layout atomically; a cache that cannot be written only costs time."""
    target = layout_cache_dir() / f"{layout.build_id}.json"
    with suppress(OSError):
        target.parent.mkdir(parents=True, exist_ok=True)
        with replacing(target, 0o644) as out:
            out.write(layout.to_json().encode())
