"""The vmcore's notes: the CPU state QEMU would write, taken from QEMU itself.

crash finds the kernel (and its KASLR offset) through the per-CPU notes
(``NT_PRSTATUS`` and QEMU's own ``QEMU`` note with CR3, IDT, GDT...). QEMU
builds them for every target it supports, from registers it synchronises
with KVM first. So rather than rebuild them, livedump asks QEMU for a dump
of one page while the guest is paused: the answer carries exactly the
notes QEMU's full dump would carry (a VMCOREINFO note too, when the VM has
the vmcoreinfo device), and its ELF header says which class, byte order
and machine QEMU judges the guest to be (an x86 guest out of long mode is
EM_386). The page itself is dropped. It goes through a memfd passed over
the monitor socket, so no file is shared with QEMU.
"""

import io
import os
from dataclasses import dataclass, replace

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .arch import Arch, from_elf
from .elfcore import ElfStructs
from .errors import MonitorError, UsageError
from .monitor import Monitor

_FD_NAME = "livedump-notes"


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


def from_qemu(monitor: Monitor, gpa: int) -> QemuNotes:
    """QEMU's notes for the paused guest, from a one-page dump at guest address ``gpa``."""
    fd = os.memfd_create(_FD_NAME, os.MFD_CLOEXEC)
    try:
        monitor.send_fd(fd, _FD_NAME)
        monitor.transport.execute("dump-guest-memory", {
            "paging": False, "protocol": f"fd:{_FD_NAME}", "begin": gpa, "length": 4096})
        return parse(os.pread(fd, 1 << 24, 0))
    finally:
        os.close(fd)


def parse(core: bytes) -> QemuNotes:
    """The notes of a vmcore QEMU wrote, with its class, byte order and machine."""
    try:
        elf = ELFFile(io.BytesIO(core))
        note = next(s for s in elf.iter_segments() if s["p_type"] == "PT_NOTE")
        data = note.data()
        names = tuple(n["n_name"] for n in note.iter_notes())
        arch = from_elf(elf["e_machine"], elf.elfclass, elf.little_endian)
    except (ELFError, StopIteration, ValueError, UsageError) as e:
        raise MonitorError(f"QEMU's dump of one page is not a vmcore livedump can read: {e}")
    return QemuNotes(replace(arch, bits=elf.elfclass), data, names)
