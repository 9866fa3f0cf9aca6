"""A VM with no usable monitor: its threads frozen with ptrace, its RAM map and
vCPU state read from QEMU's own structures, through QEMU's DWARF."""

import contextlib
import os
import platform
from collections.abc import Iterator
from contextlib import AbstractContextManager

from livedump.errors import GuestMemoryError, UsageError
from livedump.ptrace import cpu_state, dwarf, ram_map
from livedump.ptrace.freeze import frozen
from livedump.transfer.memory import ProcessMemory, read_maps
from livedump.vm.guardian import STALL_TIMEOUT, Guardian
from livedump.vm.pause import Pause
from livedump.vm.process import qemu_executable
from livedump.vm.session import RamMap
from livedump.vmcore import arch as arches
from livedump.vmcore import x86_notes
from livedump.vmcore.blocks import Block
from livedump.vmcore.notes import CpuNotes, NoCpuNotes


class PtraceSession:
    """The VM with no monitor: threads frozen by ptrace, the map read via QEMU's DWARF."""

    via = "ptrace"

    def __init__(self, pid: int, debug_file: str | None, reason: str,
                 stall: float = STALL_TIMEOUT) -> None:
        self.pid = pid
        self.detail = reason
        self.stall = stall
        self.exe = qemu_executable(pid)
        self.layout = dwarf.qemu_layout(f"/proc/{pid}/exe", debug_file)
        self.bias = ram_map.load_bias(pid, self.layout, read_maps(pid))
        self._frozen = False
        self._guardian: Guardian | None = None

    def target_arch(self) -> str:
        """The QEMU target, as ``query-target`` names it: from the binary's name
        (qemu-system-TARGET; qemu-kvm runs the host's), else x86 if its debug
        info holds x86 CPU state. The vCPUs' state may refine it (:meth:`cpu_notes`)."""
        name = os.path.basename(self.exe.removesuffix(" (deleted)"))
        target = platform.machine() if name == "qemu-kvm" else name.removeprefix("qemu-system-")
        with contextlib.suppress(UsageError):
            return arches.for_target(target).target
        if self.layout.cpu_list is not None:
            regs, word = (self.layout.structs["CPUArchState"][m].size for m in ("regs", "eip"))
            return "x86_64" if regs // word == 16 else "i386"
        raise UsageError(f"cannot tell which architecture {name} emulates: give --arch")

    def target_default(self, target: str) -> arches.TargetDefault:
        """What ``target`` implies without the CPU state (the CPU model is not
        read from QEMU's structures: on qemu-system-aarch64, AArch64 assumed)."""
        return arches.for_target(target)

    def prepare(self) -> None:
        return None  # QEMU may change its map until it is frozen.

    def hold(self, pause: bool) -> AbstractContextManager[Pause]:
        self._frozen = pause
        if pause:
            return self._freeze()
        return contextlib.nullcontext(Pause(was_running=True))

    @contextlib.contextmanager
    def _freeze(self) -> Iterator[Pause]:
        """QEMU frozen, its guardian told: should livedump stop (SIGSTOP, Ctrl-Z)
        with QEMU frozen, only its death lets QEMU go, and the guardian kills it."""
        guardian = self.watcher()
        guardian.paused()
        try:
            with frozen(self.pid) as pause:
                yield pause
        finally:
            guardian.resumed()

    def watcher(self) -> Guardian:
        """The session's guardian, started on first need."""
        if self._guardian is None:
            self._guardian = Guardian.over_ptrace(self.stall)
        return self._guardian

    def ranges(self, memory: ProcessMemory, prepared: RamMap | None) -> RamMap:
        with self._still():
            return RamMap(ram_map.guest_ranges(memory, self.layout, self.bias))

    def cpu_notes(self, memory: ProcessMemory, blocks: list[Block]) -> CpuNotes:
        """The vCPUs' registers from QEMU's memory (TCG only), as QEMU's notes;
        or why there are none."""
        if self.layout.cpu_list is None:
            return NoCpuNotes(f"no CPU registers ({self.layout.no_cpu_state})")
        try:
            with self._still():
                accel = cpu_state.accelerator(memory, self.layout, self.bias)
                if accel is None:
                    return NoCpuNotes("no CPU registers: QEMU runs its vCPUs under neither "
                                      "TCG nor KVM")
                cpus = cpu_state.read_cpus(memory, self.layout, self.bias)
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

    def _still(self) -> AbstractContextManager[Pause]:
        """Frozen for a walk of QEMU's structures: already, or (--no-pause) just for it."""
        return contextlib.nullcontext(Pause(was_running=True)) if self._frozen \
            else self._freeze()

    def close(self) -> None:
        if self._guardian is not None:
            self._guardian.close()
