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

from .arch import EM_386, EM_X86_64, Arch, from_elf
from .elfcore import ElfStructs, Record
from .errors import MonitorError, UsageError
from .monitor import Monitor

_FD_NAME = "livedump-notes"

# QEMU's record of an x86 vCPU, its "QEMU" note (QEMUCPUState, version 1, in
# target/i386/arch_dump.c): the same in both ELF classes, little-endian.
_X86_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
X86_CPU_STATE = Record((
    ("version", "word"), ("size", "word"),
    *((name, "Q") for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8",
                               "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip",
                               "rflags")),
    *((f"{seg}.{part}", kind) for seg in _X86_SEGMENTS
      for part, kind in (("selector", "word"), ("limit", "word"), ("flags", "word"),
                         ("pad", "word"), ("base", "Q"))),
    *((f"cr{i}", "Q") for i in range(5)),
    ("kernel_gs_base", "Q"),
), 64, True)


@dataclass(frozen=True)
class QemuNotes:
    """QEMU's notes as encoded bytes, and the ELF identity they were encoded for."""

    arch: Arch
    data: bytes
    names: tuple[str, ...]  # e.g. ("CORE", "QEMU", "CORE", "QEMU") for two CPUs

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


def x86_page_tables(notes: QemuNotes) -> list[int]:
    """Each x86 vCPU's CR3 (the root of the page tables it runs on) from its
    ``QEMU`` note; none for other targets."""
    if notes.arch.machine not in (EM_X86_64, EM_386):
        return []
    nhdr = ElfStructs(notes.arch.bits, notes.arch.little_endian).nhdr
    roots, at, data = [], 0, notes.data
    while at + nhdr.size <= len(data):
        head = nhdr.unpack(data[at:])
        desc = at + nhdr.size + (head["n_namesz"] + 3) // 4 * 4
        name = data[at + nhdr.size : at + nhdr.size + head["n_namesz"]].rstrip(b"\0")
        if name == b"QEMU" and head["n_descsz"] >= X86_CPU_STATE.size:
            roots.append(X86_CPU_STATE.unpack(data[desc:])["cr3"])
        at = desc + (head["n_descsz"] + 3) // 4 * 4
    return roots
