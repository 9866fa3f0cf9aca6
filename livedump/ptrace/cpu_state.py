"""The vCPUs' registers, read from a frozen QEMU's memory through its DWARF.

Under TCG a vCPU *is* QEMU's CPUX86State: QEMU's list of CPUs
(``cpus``) leads to each CPUState, the first member of an X86CPU whose
``env`` holds the registers; every offset comes from QEMU's DWARF
(:mod:`livedump.ptrace.dwarf`). A vCPU that is not executing guest code (the VM
paused, or the vCPU halted) has its state complete there. One frozen
while it executes a translated block (``running`` in its CPUState) may
show the instruction pointer and flags of an earlier instruction: TCG
stores them back only when it leaves the block, and keeps the arithmetic
flags apart meanwhile.

Under KVM the registers live in the kernel, and QEMU's copy is refreshed
only when something asks for it (``info registers``, a dump, an internal
error QEMU reports); ``vcpu_dirty`` says it was, and stays set until the
vCPU runs again. Otherwise QEMU's copy is stale.
"""

import contextlib
import os
import platform
from dataclasses import dataclass

from livedump.errors import GuestMemoryError, UsageError
from livedump.ptrace.layout import QemuLayout
from livedump.ptrace.ram_map import Reader
from livedump.transfer.memory import MemorySource
from livedump.vmcore import arch as arches
from livedump.vmcore import x86_notes
from livedump.vmcore.blocks import Block
from livedump.vmcore.notes import CpuNotes, NoCpuNotes
from livedump.vmcore.x86_notes import SEGMENTS, Segment, X86State

# More CPUs than this is not QEMU's list but garbage (QEMU's limit is 4096 or so).
_MAX_CPUS = 1 << 16


@dataclass(frozen=True)
class VCpu:
    state: X86State
    running: bool  # executing guest code (TCG): rip and flags may lag
    synced: bool  # KVM: QEMU fetched the registers from the kernel since it last ran


def accelerator(memory: MemorySource, layout: QemuLayout, bias: int) -> str | None:
    """``"tcg"`` or ``"kvm"``, whichever QEMU enabled; None if neither (Xen, qtest...)."""
    r = Reader(memory, layout)
    for name, flag in layout.accelerators.items():
        if r.number(r.read(flag.address + bias, flag.size), 0, flag.size):
            return name
    return None


def read_cpus(memory: MemorySource, layout: QemuLayout, bias: int) -> list[VCpu]:
    """Every vCPU in QEMU's order (the order of its notes). QEMU must be frozen."""
    assert layout.cpu_list is not None
    r = Reader(memory, layout)
    s = layout.structs
    queue, cpu_state, x86cpu = s["CPUTailQ"], s["CPUState"], s["ArchCPU"]
    env = s["CPUArchState"]
    found: list[VCpu] = []
    seen: set[int] = set()
    cpu = r.field(r.read(layout.cpu_list + bias, queue.size), queue["tqh_first"])
    while cpu:
        if cpu in seen or len(seen) >= _MAX_CPUS:
            raise GuestMemoryError("QEMU's list of CPUs does not end: "
                                   "the debug info does not match this QEMU")
        seen.add(cpu)
        data = r.read(cpu, cpu_state.size)
        registers = r.read(cpu - x86cpu["parent_obj"].offset + x86cpu["env"].offset, env.size)
        dirty = cpu_state.fields.get("vcpu_dirty")
        found.append(VCpu(_x86_state(r, layout, r.field(data, cpu_state["cpu_index"]),
                                     registers),
                          running=bool(r.field(data, cpu_state["running"])),
                          synced=bool(dirty and r.field(data, dirty))))
        cpu = r.field(data, cpu_state["node.tqe_next"])
    if not found:
        raise GuestMemoryError("QEMU's list of CPUs is empty")
    return found


def target_arch(exe: str, layout: QemuLayout) -> str:
    """The QEMU target of the binary ``exe``, as ``query-target`` names it: from
    its name (qemu-system-TARGET; qemu-kvm runs the host's), else x86 if its
    debug info holds x86 CPU state. The vCPUs' state may refine it (:func:`notes`)."""
    name = os.path.basename(exe.removesuffix(" (deleted)"))
    target = platform.machine() if name == "qemu-kvm" else name.removeprefix("qemu-system-")
    with contextlib.suppress(UsageError):
        return arches.for_target(target).target
    if layout.cpu_list is not None:
        regs, word = (layout.structs["CPUArchState"][m].size for m in ("regs", "eip"))
        return "x86_64" if regs // word == 16 else "i386"
    raise UsageError(f"cannot tell which architecture {name} emulates: give --arch")


def notes(memory: MemorySource, layout: QemuLayout, bias: int, blocks: list[Block]) -> CpuNotes:
    """The vCPUs' registers from QEMU's memory (TCG only, or what QEMU fetched
    from KVM), as QEMU's notes; or why there are none. QEMU must be still."""
    if layout.cpu_list is None:
        return NoCpuNotes(f"no CPU registers ({layout.no_cpu_state})")
    try:
        accel = accelerator(memory, layout, bias)
        if accel is None:
            return NoCpuNotes("no CPU registers: QEMU runs its vCPUs under neither "
                              "TCG nor KVM")
        cpus = read_cpus(memory, layout, bias)
    except GuestMemoryError as e:
        return NoCpuNotes(f"no CPU registers ({e})")
    if accel == "kvm":
        if not all(c.synced for c in cpus):
            return NoCpuNotes("no CPU registers: under KVM the kernel holds them and "
                              "QEMU's copy is stale (QMP mode has QEMU fetch them)")
        source = "QEMU's memory (KVM's registers, which QEMU had fetched"
    else:
        source = "QEMU's memory (TCG's vCPU state"
        running = sum(c.running for c in cpus)
        if running:
            source += (f"; {running} of {len(cpus)} vCPUs were executing guest code: "
                       "their rip may be an earlier instruction's, their rflags lack "
                       "the arithmetic flags")
    return x86_notes.qemu_notes([c.state for c in cpus], blocks, source + ")")


def _x86_state(r: Reader, layout: QemuLayout, index: int, env: bytes) -> X86State:
    e, seg = layout.structs["CPUArchState"], layout.structs["SegmentCache"]
    word = e["eip"].size

    def words(member: str) -> tuple[int, ...]:
        f = e[member]
        return tuple(r.number(env, f.offset + i, word) for i in range(0, f.size, word))

    def segment(at: int) -> Segment:
        return Segment(*(r.field(env, seg[part], at)
                         for part in ("selector", "base", "limit", "flags")))

    segs = tuple(segment(e["segs"].offset + i) for i in range(0, e["segs"].size, seg.size))
    regs, cr = words("regs"), words("cr")
    if len(regs) not in (8, 16) or len(segs) != len(SEGMENTS) or len(cr) != 5:
        raise GuestMemoryError(f"QEMU's x86 CPU state has {len(regs)} registers, "
                               f"{len(segs)} segments, {len(cr)} control registers: "
                               "a QEMU version livedump does not know")
    gs_base = e.fields.get("kernelgsbase")
    return X86State(
        index=index, regs=regs, rip=r.field(env, e["eip"]), rflags=r.field(env, e["eflags"]),
        segs=segs, ldt=segment(e["ldt"].offset), tr=segment(e["tr"].offset),
        gdt=segment(e["gdt"].offset), idt=segment(e["idt"].offset), cr=cr,
        efer=r.field(env, e["efer"]),
        kernel_gs_base=r.field(env, gs_base) if gs_base else 0)
