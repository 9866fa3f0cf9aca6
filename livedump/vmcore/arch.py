"""Target architectures: what each one means for the ELF header."""

from dataclasses import dataclass, replace
from typing import Literal

from livedump.errors import UsageError

ByteOrder = Literal["little", "big"]  # as int.from_bytes and int.to_bytes take it

EM_386 = 3
EM_PPC = 20
EM_PPC64 = 21
EM_S390 = 22
EM_ARM = 40
EM_X86_64 = 62
EM_AARCH64 = 183
EM_RISCV = 243


@dataclass(frozen=True)
class Arch:
    """ELF identity of a vmcore: word size, byte order and e_machine.

    A 32-bit vmcore of memory whose addresses, sizes or file offsets do not
    fit ELF32's fields is ELF64 with the same e_machine where readers take
    that for this architecture (``widens``: kexec-tools writes such Arm
    vmcores, QEMU such i386 ones). Elsewhere such memory has no vmcore:
    ELF64 EM_RISCV is riscv64, and no tool writes ELF64 EM_PPC.
    ``widens_at_4g``: QEMU's i386 rule, ELF64 as soon as memory reaches 4 GiB.
    """

    name: str
    bits: int
    byteorder: ByteOrder
    machine: int
    widens: bool = True
    widens_at_4g: bool = False

    @property
    def little_endian(self) -> bool:
        return self.byteorder == "little"


ARCHES = {
    a.name: a
    for a in (
        Arch("x86_64", 64, "little", EM_X86_64),
        Arch("386", 32, "little", EM_386, widens_at_4g=True),
        Arch("aarch64-le", 64, "little", EM_AARCH64),
        Arch("aarch64-be", 64, "big", EM_AARCH64),
        Arch("ppc64-le", 64, "little", EM_PPC64),
        Arch("ppc64-be", 64, "big", EM_PPC64),
        Arch("s390", 64, "big", EM_S390),
        Arch("arm-le", 32, "little", EM_ARM),
        Arch("arm-be", 32, "big", EM_ARM),
        Arch("riscv64", 64, "little", EM_RISCV),
        Arch("riscv32", 32, "little", EM_RISCV, widens=False),
        Arch("ppc-be", 32, "big", EM_PPC, widens=False),
        Arch("ppc-le", 32, "little", EM_PPC, widens=False),
    )
}

# Other spellings users type, and the names QMP `query-target` reports.
# A bare "aarch64", "ppc64" or "arm" does not say the byte order: the
# little-endian variant is what current Linux distributions run (32-bit
# PowerPC ones run big-endian).
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
    "arm": "arm-le",
    "armhf": "arm-le",
    "armel": "arm-le",
    "armv7l": "arm-le",
    "armeb": "arm-be",
    "rv64": "riscv64",
    "rv32": "riscv32",
    "ppc": "ppc-be",
    "powerpc": "ppc-be",
    "ppcle": "ppc-le",
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


# Without QEMU's notes (--no-pause on a running guest: its one-page dump would
# stop it) there is no CPU state to judge by. The QEMU target (QMP
# ``query-target``) then gives the machine; where QEMU would read the rest
# from the CPU state, the default is what most guests run, said to be an
# assumption. QEMU dumps every RISC-V CPU little-endian, in its emulator's
# word size.
_TARGET_DEFAULTS = {
    "x86_64": ("x86_64", "long mode assumed"),
    "i386": ("386", ""),
    "aarch64": ("aarch64-le", "an AArch64 CPU, little-endian, assumed"),
    "arm": ("arm-le", "little-endian assumed"),
    "ppc64": ("ppc64-le", "little-endian assumed"),
    "s390x": ("s390", ""),
    "riscv64": ("riscv64", ""),
    "riscv32": ("riscv32", ""),
    "ppc": ("ppc-be", "big-endian assumed"),
}
# qemu-system-aarch64 also runs AArch32 CPUs (-cpu cortex-a15), which QEMU
# dumps as ELF32 EM_ARM: which kind the CPU is, the CPU model says (its QOM
# ``aarch64`` property), and then only the byte order is assumed.
_AARCH64_CPU = {
    True: ("aarch64-le", "an AArch64 CPU model, little-endian assumed"),
    False: ("arm-le", "an AArch32 CPU model, little-endian assumed"),
}
# Every identity QEMU's dump of a target can have: an --arch beyond them
# contradicts the target (x86 guests out of long mode are EM_386; an AArch64
# emulator runs AArch32 CPUs too; each byte order where the CPU chooses).
_TARGET_ARCHES = {
    "x86_64": ("x86_64", "386"),
    "i386": ("386",),
    "aarch64": ("aarch64-le", "aarch64-be", "arm-le", "arm-be"),
    "arm": ("arm-le", "arm-be"),
    "ppc64": ("ppc64-le", "ppc64-be"),
    "s390x": ("s390",),
    "riscv64": ("riscv64",),
    "riscv32": ("riscv32",),
    "ppc": ("ppc-be", "ppc-le"),
}


@dataclass(frozen=True)
class TargetDefault:
    """The architecture a QEMU target implies when its CPU state is not known;
    ``unknown`` says why none can be told (then ``arch`` must not be written)."""

    target: str
    arch: Arch
    assumed: str  # "" when the target alone decides
    unknown: str = ""

    def __str__(self) -> str:
        said = f"QEMU target {self.target}"
        return f"{said}, {self.assumed} (else give --arch)" if self.assumed else said


def for_target(target: str, aarch64_cpu: bool | None = None) -> TargetDefault:
    """What QEMU target ``target`` (as ``query-target`` names it) implies; for
    ``aarch64``, ``aarch64_cpu`` is whether its CPU model is AArch64, where known."""
    try:
        name, assumed = _TARGET_DEFAULTS[target]
    except KeyError:
        known = ", ".join(_TARGET_DEFAULTS)
        raise UsageError(f"QEMU target {target!r} is not one livedump supports ({known})"
                         ) from None
    if target == "aarch64" and aarch64_cpu is not None:
        name, assumed = _AARCH64_CPU[aarch64_cpu]
    return TargetDefault(target, ARCHES[name], assumed)


def unknown_cpu(target: str, why: str) -> TargetDefault:
    """A target whose CPU state decides more than its byte order, with that CPU
    state unknown: a vmcore of it must not be written as a guess."""
    return replace(for_target(target), unknown=f"cannot tell which kind of CPU QEMU target "
                   f"{target} runs without its registers ({why}): give --arch, or let "
                   f"livedump pause the guest")


def contradiction(wanted: Arch, target: str) -> str:
    """Why ``wanted`` is none of the identities QEMU's dump of ``target`` can have;
    "" if it is one (or the target is one livedump does not know)."""
    names = _TARGET_ARCHES.get(target)
    if names is None or wanted.name in names:
        return ""
    return (f"--arch {wanted.name} contradicts QEMU target {target}, whose vmcores are "
            f"{' or '.join(names)}: the vmcore says a machine the guest is not")


def from_elf(machine: int, bits: int, little_endian: bool) -> Arch:
    """The architecture of a vmcore's header (its e_machine, class and byte order).

    The class is kept as given: QEMU writes ELF64 for an i386 guest whose
    memory ends at or above 4 GiB. Where the class tells architectures of
    one e_machine apart (riscv32, riscv64), the one of that class.
    """
    byteorder: ByteOrder = "little" if little_endian else "big"
    found = [a for a in ARCHES.values() if (a.machine, a.byteorder) == (machine, byteorder)]
    exact = [a for a in found if a.bits == bits]
    widened = [a for a in found if a.widens and a.bits < bits]
    if fits := exact + widened:
        return replace(fits[0], bits=bits)
    raise UsageError(f"QEMU dumps this VM as ELF{bits} e_machine {machine} {byteorder}-endian, "
                     f"an architecture livedump cannot write")
