"""The vmcore's CPU notes: QEMU's own, or why there are none.

crash finds the kernel (and its KASLR offset) through the per-CPU notes
(``NT_PRSTATUS`` and QEMU's own ``QEMU`` note with CR3, IDT, GDT...). QEMU
builds them for every target it supports, so livedump takes them from a
vmcore QEMU writes of one page (see :mod:`livedump.qmp.notes`) or, in
ptrace mode, builds QEMU's x86 records itself (:mod:`livedump.vmcore.x86_notes`).
Either way they come as encoded bytes with the ELF identity QEMU judged the
guest to be; a vmcore without them says why.
"""

from dataclasses import dataclass

from livedump.errors import MonitorError
from livedump.vmcore.arch import Arch, from_elf
from livedump.vmcore.elf import ElfStructs, read_core, read_notes


@dataclass(frozen=True)
class QemuNotes:
    """QEMU's notes as encoded bytes, the ELF identity they were encoded for,
    and where the registers in them came from (for the report)."""

    arch: Arch
    data: bytes
    names: tuple[str, ...]  # e.g. ("CORE", "CORE", "QEMU", "QEMU") for two CPUs
    source: str = "QEMU's dump-guest-memory"

    def encode(self, structs: ElfStructs) -> bytes:
        return self.data  # Already in the class and byte order of self.arch.

    def summary(self) -> str:
        """What the report says of them: which notes, from where."""
        return f"{', '.join(sorted(set(self.names)))} notes from {self.source}"


@dataclass(frozen=True)
class NoCpuNotes:
    """No CPU registers for this vmcore, and why (the report says it)."""

    reason: str

    def summary(self) -> str:
        return self.reason


CpuNotes = QemuNotes | NoCpuNotes


def notes_end(core: bytes) -> int | None:
    """Where the PT_NOTE of a partial vmcore ends, once its program headers are in."""
    try:
        found = read_core(core)
    except ValueError:
        return 0  # Not a vmcore: let parse() say so.
    if found is None:
        return None if len(core) < 1 << 16 else 0
    return found.note_offset + found.note_size



def parse(core: bytes) -> QemuNotes:
    """The notes of a vmcore QEMU wrote, with its class, byte order and machine.

    A vmcore of an architecture livedump cannot write is a UsageError, not a
    MonitorError: without QEMU's notes the dump would go on as the QEMU
    target's default, which QEMU has just said this VM is not.
    """
    try:
        found = read_core(core)
        if found is None:
            raise ValueError("it ends inside its headers")
        data = core[found.note_offset : found.note_offset + found.note_size]
        if len(data) < found.note_size:
            raise ValueError("it ends inside its notes")
        names = tuple(n.name for n in read_notes(found.structs, data))
    except ValueError as e:
        raise MonitorError(f"QEMU's dump of one page is not a vmcore livedump can read: {e}"
                           ) from None
    s = found.structs
    return QemuNotes(from_elf(found.machine, s.bits, s.little), data, names)
