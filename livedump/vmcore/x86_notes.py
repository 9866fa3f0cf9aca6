"""The per-CPU notes QEMU writes for an x86 guest, built from register values.

QEMU's ``dump-guest-memory`` gives each vCPU, in CPU order, an
``NT_PRSTATUS`` note (owner ``CORE``, process id = CPU index + 1), then
each vCPU a ``QEMU`` note (type 0) with QEMU's record of the CPU state:
the general registers, the segment caches, LDT, TR, GDT, IDT and CR0-CR4,
which is how crash finds the kernel's page tables and KASLR offset. The
prstatus is the x86_64 one when the first CPU is in long mode, else the
i386 one, whatever the ELF class. Every record is declared once below, as
kernel and QEMU define it, and packed with :class:`elfcore.Record`.
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace

from livedump.vmcore import arch as arches
from livedump.vmcore.blocks import Block
from livedump.vmcore.elf import ElfStructs, Note, Record, read_notes
from livedump.vmcore.notes import QemuNotes

NT_PRSTATUS = 1
QEMU_CPU_STATE_VERSION = 1
EFER_LMA = 1 << 10  # "long mode active", in the architecture's EFER MSR

# QEMU's env->regs[] and env->segs[] follow the instruction encoding's order.
GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs")


@dataclass(frozen=True)
class Segment:
    """A segment register as QEMU caches it (also LDT, TR, GDT, IDT)."""

    selector: int
    base: int
    limit: int
    flags: int


@dataclass(frozen=True)
class X86State:
    """One vCPU's registers, as QEMU's CPUX86State holds them.

    ``regs`` are in GPRS order: 16 in qemu-system-x86_64, 8 in -i386;
    ``segs`` in SEGMENTS order; ``cr`` is CR0 to CR4.
    """

    index: int  # QEMU's cpu_index
    regs: tuple[int, ...]
    rip: int
    rflags: int
    segs: tuple[Segment, ...]
    ldt: Segment
    tr: Segment
    gdt: Segment
    idt: Segment
    cr: tuple[int, ...]
    efer: int
    kernel_gs_base: int = 0

    @property
    def long_mode(self) -> bool:
        return len(self.regs) == 16 and bool(self.efer & EFER_LMA)

    def gprs(self) -> dict[str, int]:
        return dict.fromkeys(GPRS, 0) | dict(zip(GPRS, self.regs, strict=False))  # 8 or 16

    def segment(self, name: str) -> Segment:
        return self.segs[SEGMENTS.index(name)]


# The kernel's struct elf_prstatus, its longs the guest's word size.
def _prstatus(regs_size: int) -> tuple[tuple[str, str], ...]:
    return (
        ("si_signo", "word"), ("si_code", "word"), ("si_errno", "word"),
        ("pr_cursig", "half"), ("pad", "half"), ("pr_sigpend", "long"), ("pr_sighold", "long"),
        ("pr_pid", "word"), ("pr_ppid", "word"), ("pr_pgrp", "word"), ("pr_sid", "word"),
        *((f"{t}.{part}", "long") for t in ("pr_utime", "pr_stime", "pr_cutime", "pr_cstime")
          for part in ("tv_sec", "tv_usec")),
        ("pr_reg", f"{regs_size}s"), ("pr_fpvalid", "word"),
    )


# struct user_regs_struct of each.
_X86_64_REGS = tuple((name, "long") for name in (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
    "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
    "gs_base", "ds", "es", "fs", "gs"))
_I386_REGS = (
    ("ebx", "long"), ("ecx", "long"), ("edx", "long"), ("esi", "long"), ("edi", "long"),
    ("ebp", "long"), ("eax", "long"), ("ds", "half"), ("__ds", "half"), ("es", "half"),
    ("__es", "half"), ("fs", "half"), ("__fs", "half"), ("gs", "half"), ("__gs", "half"),
    ("orig_eax", "long"), ("eip", "long"), ("cs", "half"), ("__cs", "half"),
    ("eflags", "long"), ("esp", "long"), ("ss", "half"), ("__ss", "half"),
)

# QEMU's QEMUCPUState (version 1), the same in every ELF class.
_STATE_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
_QEMU_CPU_STATE_FIELDS = (
    ("version", "word"), ("size", "word"),
    *((name, "Q") for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                               *GPRS[8:], "rip", "rflags")),
    *((f"{seg}.{part}", kind) for seg in _STATE_SEGMENTS
      for part, kind in (("selector", "word"), ("limit", "word"), ("flags", "word"),
                         ("pad", "word"), ("base", "Q"))),
    *((f"cr{i}", "Q") for i in range(5)),
    ("kernel_gs_base", "Q"),
)

_X86_64_USER = Record(_X86_64_REGS, 64, True)
_I386_USER = Record(_I386_REGS, 32, True)
_PRSTATUS = {64: Record(_prstatus(_X86_64_USER.size), 64, True),
             32: Record(_prstatus(_I386_USER.size), 32, True)}
QEMU_CPU_STATE = Record(_QEMU_CPU_STATE_FIELDS, 64, True)


def qemu_notes(cpus: Sequence[X86State], blocks: Sequence[Block], source: str) -> QemuNotes:
    """QEMU's notes for ``cpus`` (in QEMU's CPU order) and the ELF identity
    QEMU would give the vmcore of ``blocks``: x86_64 if the first CPU is in
    long mode; else i386, in ELF64 if memory reaches 4 GiB."""
    if cpus[0].long_mode:
        arch, prstatus = arches.lookup("x86_64"), _x86_64_prstatus
    else:
        bits = 64 if any(b.end > 0xFFFFFFFF for b in blocks) else 32
        arch, prstatus = replace(arches.lookup("386"), bits=bits), _i386_prstatus
    notes = [*(Note("CORE", NT_PRSTATUS, prstatus(c)) for c in cpus),
             *(Note("QEMU", 0, qemu_cpu_state(c)) for c in cpus)]
    structs = ElfStructs(arch.bits, arch.little_endian)
    return QemuNotes(arch, b"".join(n.encode(structs) for n in notes),
                     tuple(n.name for n in notes), source)


def qemu_cpu_state(cpu: X86State) -> bytes:
    segments = {**{s: cpu.segment(s) for s in SEGMENTS},
                "ldt": cpu.ldt, "tr": cpu.tr, "gdt": cpu.gdt, "idt": cpu.idt}
    values = {f"{name}.{part}": getattr(seg, part) for name, seg in segments.items()
              for part in ("selector", "limit", "flags", "base")}
    return QEMU_CPU_STATE.pack(
        version=QEMU_CPU_STATE_VERSION, size=QEMU_CPU_STATE.size, **cpu.gprs(),
        rip=cpu.rip, rflags=cpu.rflags, **values,
        **{f"cr{i}": value for i, value in enumerate(cpu.cr)},
        kernel_gs_base=cpu.kernel_gs_base)


def _x86_64_prstatus(cpu: X86State) -> bytes:
    regs = _X86_64_USER.pack(
        **cpu.gprs(), rip=cpu.rip, eflags=cpu.rflags,
        **{s: cpu.segment(s).selector for s in SEGMENTS},
        fs_base=cpu.segment("fs").base, gs_base=cpu.segment("gs").base)
    return _pack_prstatus(64, cpu, regs)


def _i386_prstatus(cpu: X86State) -> bytes:
    """The 32-bit view: the low halves of the registers, 16-bit selectors."""
    low = {f"e{name[1:]}": value & 0xFFFFFFFF
           for name, value in zip(GPRS[:8], cpu.regs, strict=False)}
    regs = _I386_USER.pack(
        **low, eip=cpu.rip & 0xFFFFFFFF, eflags=cpu.rflags & 0xFFFFFFFF,
        **{s: cpu.segment(s).selector & 0xFFFF for s in SEGMENTS})
    return _pack_prstatus(32, cpu, regs)


def _pack_prstatus(bits: int, cpu: X86State, regs: bytes) -> bytes:
    data = _PRSTATUS[bits].pack(pr_pid=cpu.index + 1, pr_reg=regs)
    return data + bytes(-len(data) % (bits // 8))  # C pads the struct to a long


def x86_page_tables(notes: QemuNotes) -> list[int]:
    """Each x86 vCPU's CR3 (the root of the page tables it runs on) from its
    ``QEMU`` note; none for other targets."""
    if notes.arch.machine not in (arches.EM_X86_64, arches.EM_386):
        return []
    structs = ElfStructs(notes.arch.bits, notes.arch.little_endian)
    return [QEMU_CPU_STATE.unpack(n.desc)["cr3"] for n in read_notes(structs, notes.data)
            if n.name == "QEMU" and len(n.desc) >= QEMU_CPU_STATE.size]
