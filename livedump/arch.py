"""Target architectures: what each one means for the ELF header."""

from dataclasses import dataclass
from typing import Literal

from .errors import UsageError

ByteOrder = Literal["little", "big"]  # as int.from_bytes and int.to_bytes take it

EM_386 = 3
EM_PPC64 = 21
EM_S390 = 22
EM_X86_64 = 62
EM_AARCH64 = 183


@dataclass(frozen=True)
class Arch:
    """ELF identity of a vmcore: word size, byte order and e_machine."""

    name: str
    bits: int
    byteorder: ByteOrder
    machine: int

    @property
    def little_endian(self) -> bool:
        return self.byteorder == "little"


ARCHES = {
    a.name: a
    for a in (
        Arch("x86_64", 64, "little", EM_X86_64),
        Arch("386", 32, "little", EM_386),
        Arch("aarch64-le", 64, "little", EM_AARCH64),
        Arch("aarch64-be", 64, "big", EM_AARCH64),
        Arch("ppc64-le", 64, "little", EM_PPC64),
        Arch("ppc64-be", 64, "big", EM_PPC64),
        Arch("s390", 64, "big", EM_S390),
    )
}

# Other spellings users type, and the names QMP `query-target` reports.
# A bare "aarch64" or "ppc64" does not say the byte order: the little-endian
# variant is what current Linux distributions run.
_ALIASES = {
    "x86-64": "x86_64",
    "amd64": "x86_64",
    "i386": "386",
    "i686": "386",
    "x86": "386",
    "aarch64": "aarch64-le",
    "arm64": "aarch64-le",
    "aarch64_be": "aarch64-be",
    "ppc64": "ppc64-le",
    "ppc64le": "ppc64-le",
    "s390x": "s390",
}


def lookup(name: str) -> Arch:
    """Return the architecture called ``name`` (case-insensitive, aliases allowed)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    try:
        return ARCHES[key]
    except KeyError:
        known = ", ".join(ARCHES)
        raise UsageError(f"unknown architecture {name!r} (known: {known})") from None


# Without QEMU's notes (--no-pause: its one-page dump would stop the guest)
# there is no CPU state to judge by. The QEMU target (QMP ``query-target``)
# then gives the machine; where QEMU would read the rest from the CPU
# state, the default is what most guests run, said to be an assumption.
_TARGET_DEFAULTS = {
    "x86_64": ("x86_64", "long mode assumed"),
    "i386": ("386", ""),
    "aarch64": ("aarch64-le", "little-endian assumed"),
    "ppc64": ("ppc64-le", "little-endian assumed"),
    "s390x": ("s390", ""),
}


@dataclass(frozen=True)
class TargetDefault:
    """The architecture a QEMU target implies when its CPU state is not known."""

    target: str
    arch: Arch
    assumed: str  # "" when the target alone decides

    def __str__(self) -> str:
        said = f"QEMU target {self.target}"
        return f"{said}, {self.assumed} (else give --arch)" if self.assumed else said


def for_target(target: str) -> TargetDefault:
    """What QEMU target ``target`` (as ``query-target`` names it) implies."""
    try:
        name, assumed = _TARGET_DEFAULTS[target]
    except KeyError:
        known = ", ".join(_TARGET_DEFAULTS)
        raise UsageError(f"QEMU target {target!r} is not one livedump supports ({known})"
                         ) from None
    return TargetDefault(target, ARCHES[name], assumed)


def from_elf(machine: int, bits: int, little_endian: bool) -> Arch:
    """The architecture of a vmcore's header (its e_machine, class and byte order).

    The class is kept as given: QEMU writes ELF64 for an i386 guest whose
    memory ends at or above 4 GiB.
    """
    byteorder: ByteOrder = "little" if little_endian else "big"
    for a in ARCHES.values():
        if a.machine == machine and a.byteorder == byteorder:
            return Arch(a.name, bits, byteorder, a.machine)
    raise UsageError(f"QEMU's vmcore is of an architecture livedump does not know "
                     f"(e_machine {machine}, {byteorder}-endian)")
